-- Executions, split into shards (id modulo the shard count). A row is updated in place four
-- times or more in its life: only columns that never change are indexed, so that every update
-- is a heap-only (HOT) update that touches no index, and pages keep room for them.
CREATE TABLE IF NOT EXISTS executions (
    id          BIGINT  PRIMARY KEY,
    shard       INTEGER NOT NULL,
    task_id     BIGINT  NOT NULL,
    state       TEXT    NOT NULL,
    live        BOOLEAN NOT NULL,
    distributor TEXT    NOT NULL,
    version     BIGINT  NOT NULL,
    record      JSONB   NOT NULL
) WITH (fillfactor = 50);
CREATE INDEX IF NOT EXISTS executions_task ON executions (task_id, id);
CREATE INDEX IF NOT EXISTS executions_distributor ON executions (distributor, id);
-- The non-terminal executions (a row from insert until the terminal state), for recovery and
-- takeover without scanning every execution ever stored.
CREATE TABLE IF NOT EXISTS live_executions (
    shard INTEGER NOT NULL,
    id    BIGINT  NOT NULL,
    PRIMARY KEY (shard, id)
);
CREATE TABLE IF NOT EXISTS history (
    execution_id BIGINT NOT NULL,
    version      BIGINT NOT NULL,
    entry        JSONB  NOT NULL,
    PRIMARY KEY (execution_id, version)
);
-- Byte-wise key order (prefix listing), whatever the database's collation.
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT COLLATE "C" PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deferred (
    id          BIGINT  PRIMARY KEY,
    shard       INTEGER NOT NULL,
    distributor TEXT    NOT NULL,
    work        JSONB   NOT NULL
);
CREATE INDEX IF NOT EXISTS deferred_shard ON deferred (shard, id);
-- One row per shard: who owns it, until when, and the fencing epoch (bumped on every
-- acquisition; every write of an execution checks it in its own transaction).
CREATE TABLE IF NOT EXISTS shard_lease (
    shard      INTEGER     PRIMARY KEY,
    owner      TEXT,
    epoch      BIGINT      NOT NULL DEFAULT 0,
    expires_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- Engine instances sharing the database, for the fair share of shards.
CREATE TABLE IF NOT EXISTS instances (
    id         TEXT        PRIMARY KEY,
    expires_at TIMESTAMPTZ NOT NULL
);
-- Commands (pushes, cancels, pokes) received by one instance for an execution another owns.
CREATE TABLE IF NOT EXISTS inbox (
    id           BIGSERIAL   PRIMARY KEY,
    shard        INTEGER     NOT NULL,
    execution_id BIGINT      NOT NULL,
    cmd          JSONB       NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS inbox_shard ON inbox (shard, id);
