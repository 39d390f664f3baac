CREATE TABLE IF NOT EXISTS executions (
    id          INTEGER PRIMARY KEY,
    task_id     INTEGER NOT NULL,
    state       TEXT    NOT NULL,
    live        INTEGER NOT NULL,
    distributor TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    record      TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS executions_live ON executions (live) WHERE live = 1;
CREATE INDEX IF NOT EXISTS executions_state ON executions (state, id);
CREATE INDEX IF NOT EXISTS executions_task ON executions (task_id, id);
CREATE INDEX IF NOT EXISTS executions_distributor ON executions (distributor, id);
CREATE TABLE IF NOT EXISTS history (
    execution_id INTEGER NOT NULL,
    version      INTEGER NOT NULL,
    entry        TEXT    NOT NULL,
    PRIMARY KEY (execution_id, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deferred (
    id          INTEGER PRIMARY KEY,
    distributor TEXT NOT NULL,
    work        TEXT NOT NULL
);
