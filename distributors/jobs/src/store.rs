//! The queue's SQLite file (WAL): schema, load at start, the group-commit writer, and reads.
//!
//! One writer task owns a dedicated connection. It takes every batch waiting, upserts the job
//! rows as full snapshots (last one per job wins) with multi-row statements in one transaction,
//! commits, and only then acknowledges; a request is answered after its rows are durable, and
//! one commit serves many requests.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use distributor_core::Outcome;
use serde::Serialize;
use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool};
use tokio::sync::mpsc;

use crate::error::JobsError;
use crate::queue::{ErrorRow, Job, JobState, WriteBatch};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    execution_id INTEGER NOT NULL,
    task_type TEXT NOT NULL,
    priority INTEGER NOT NULL,
    payload TEXT NOT NULL,
    activation TEXT NOT NULL,
    auth_token TEXT NOT NULL,
    state TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL,
    worker TEXT,
    lease_id TEXT,
    lease_gen INTEGER NOT NULL,
    lease_expires INTEGER,
    offers INTEGER NOT NULL,
    stage TEXT,
    progress REAL,
    message TEXT,
    outcome TEXT,
    seq INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    heartbeat_ms INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_request_id ON jobs (request_id);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, updated_ms);
CREATE TABLE IF NOT EXISTS errors (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,
    worker TEXT,
    at_ms INTEGER NOT NULL,
    transient INTEGER NOT NULL,
    message TEXT NOT NULL
);
"#;

macro_rules! columns {
    () => {
        "id, request_id, execution_id, task_type, priority, payload, activation, \
    auth_token, state, cancel_requested, worker, lease_id, lease_gen, lease_expires, offers, \
    stage, progress, message, outcome, seq, created_ms, updated_ms, heartbeat_ms"
    };
}
const COLUMNS: &str = columns!();

const UPDATE: &str = " ON CONFLICT (id) DO UPDATE SET state = excluded.state, \
    cancel_requested = excluded.cancel_requested, worker = excluded.worker, \
    lease_id = excluded.lease_id, lease_gen = excluded.lease_gen, \
    lease_expires = excluded.lease_expires, offers = excluded.offers, stage = excluded.stage, \
    progress = excluded.progress, message = excluded.message, outcome = excluded.outcome, \
    seq = excluded.seq, updated_ms = excluded.updated_ms, heartbeat_ms = excluded.heartbeat_ms";

/// 23 columns × 400 rows stays well under SQLite's 32766 bound variables.
const ROWS_PER_STATEMENT: usize = 400;

/// Read access to the queue file.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    pool: SqlitePool,
}

fn options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(5))
}

/// Opens (creating) the file: a read pool and the writer's own connection.
pub(crate) async fn open(path: &Path) -> Result<(Store, SqliteConnection), JobsError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            JobsError::Config(format!("cannot create directory {}: {e}", dir.display()))
        })?;
    }
    let mut writer = SqliteConnection::connect_with(&options(path)).await?;
    sqlx::raw_sql(SCHEMA).execute(&mut writer).await?;
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options(path))
        .await?;
    Ok((Store { pool }, writer))
}

/// Runs the group-commit writer until every sender is gone.
pub(crate) async fn writer(
    mut conn: SqliteConnection,
    mut rx: mpsc::UnboundedReceiver<WriteBatch>,
) {
    while let Some(first) = rx.recv().await {
        let mut batches = vec![first];
        while batches.len() < 4096 {
            match rx.try_recv() {
                Ok(b) => batches.push(b),
                Err(_) => break,
            }
        }
        let result = write(&mut conn, &batches).await.map_err(|e| {
            tracing::error!(error = %e, "jobs queue: commit failed");
            e.to_string()
        });
        for b in batches {
            let _ = b.ack.send(result.clone());
        }
    }
    let _ = conn.close().await;
}

async fn write(conn: &mut SqliteConnection, batches: &[WriteBatch]) -> Result<(), sqlx::Error> {
    let mut latest: HashMap<i64, &Job> = HashMap::new();
    let mut errors: Vec<&ErrorRow> = Vec::new();
    for b in batches {
        for r in &b.rows {
            latest.insert(r.id, r);
        }
        errors.extend(b.errors.iter());
    }
    if latest.is_empty() && errors.is_empty() {
        return Ok(());
    }
    let rows: Vec<&Job> = latest.into_values().collect();
    if errors.is_empty() && rows.len() <= ROWS_PER_STATEMENT {
        // One statement is atomic on its own: skip BEGIN/COMMIT (two round trips to the
        // connection's thread) in the common case.
        return upsert(&mut *conn, &rows).await;
    }
    let mut tx = conn.begin().await?;
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        upsert(&mut tx, chunk).await?;
    }
    for chunk in errors.chunks(ROWS_PER_STATEMENT) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO errors (job_id, worker, at_ms, transient, message) ",
        );
        q.push_values(chunk, |mut b, e| {
            b.push_bind(e.job_id)
                .push_bind(e.worker.clone())
                .push_bind(e.at_ms)
                .push_bind(e.transient)
                .push_bind(e.message.clone());
        });
        q.build().execute(&mut *tx).await?;
    }
    tx.commit().await
}

async fn upsert(conn: &mut SqliteConnection, chunk: &[&Job]) -> Result<(), sqlx::Error> {
    let mut q = QueryBuilder::<Sqlite>::new(format!("INSERT INTO jobs ({COLUMNS}) "));
    q.push_values(chunk, |mut b, j| {
        b.push_bind(j.id)
            .push_bind(j.request_id.to_string())
            .push_bind(j.execution_id as i64)
            .push_bind(j.task_type.to_string())
            .push_bind(j.priority)
            .push_bind(j.payload.to_string())
            .push_bind(j.activation.to_string())
            .push_bind(j.auth_token.to_string())
            .push_bind(j.state.as_str())
            .push_bind(j.cancel_requested)
            .push_bind(j.worker.as_deref().map(str::to_owned))
            .push_bind(j.lease_id.clone())
            .push_bind(j.lease_gen)
            .push_bind(j.lease_expires)
            .push_bind(j.offers)
            .push_bind(j.stage.clone())
            .push_bind(j.progress)
            .push_bind(j.message.clone())
            .push_bind(
                j.outcome
                    .as_ref()
                    .and_then(|o| serde_json::to_string(o).ok()),
            )
            .push_bind(j.seq)
            .push_bind(j.created_ms)
            .push_bind(j.updated_ms)
            .push_bind(j.heartbeat_ms);
    });
    q.push(UPDATE);
    q.build().execute(conn).await?;
    Ok(())
}

/// A job as the status page and `status` see it (no secrets).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct JobView {
    pub(crate) id: i64,
    #[serde(skip)]
    pub(crate) request_id: String,
    pub(crate) execution_id: u64,
    pub(crate) task_type: String,
    pub(crate) priority: i32,
    pub(crate) state: JobState,
    pub(crate) cancel_requested: bool,
    pub(crate) worker: Option<String>,
    pub(crate) offers: i64,
    pub(crate) stage: Option<String>,
    pub(crate) progress: Option<f64>,
    pub(crate) message: Option<String>,
    pub(crate) outcome: Option<Outcome>,
    pub(crate) lease_expires_ms: Option<i64>,
    pub(crate) created_ms: i64,
    pub(crate) updated_ms: i64,
    pub(crate) heartbeat_ms: Option<i64>,
}

macro_rules! view_columns {
    () => {
        "id, request_id, execution_id, task_type, priority, state, \
    cancel_requested, worker, offers, stage, progress, message, outcome, lease_expires, \
    created_ms, updated_ms, heartbeat_ms"
    };
}

fn corrupt(id: i64, message: impl Into<String>) -> JobsError {
    JobsError::Corrupt {
        id,
        message: message.into(),
    }
}

fn view(row: &SqliteRow) -> Result<JobView, JobsError> {
    let id: i64 = row.try_get("id")?;
    let state: String = row.try_get("state")?;
    let outcome: Option<String> = row.try_get("outcome")?;
    Ok(JobView {
        id,
        request_id: row.try_get("request_id")?,
        execution_id: row.try_get::<i64, _>("execution_id")? as u64,
        task_type: row.try_get("task_type")?,
        priority: row.try_get("priority")?,
        state: JobState::parse(&state).ok_or_else(|| corrupt(id, format!("state `{state}`")))?,
        cancel_requested: row.try_get("cancel_requested")?,
        worker: row.try_get("worker")?,
        offers: row.try_get("offers")?,
        stage: row.try_get("stage")?,
        progress: row.try_get("progress")?,
        message: row.try_get("message")?,
        // An unreadable outcome is reported as ResultMalformed by `JobState::status`.
        outcome: outcome.and_then(|o| serde_json::from_str(&o).ok()),
        lease_expires_ms: row.try_get("lease_expires")?,
        created_ms: row.try_get("created_ms")?,
        updated_ms: row.try_get("updated_ms")?,
        heartbeat_ms: row.try_get("heartbeat_ms")?,
    })
}

fn job(row: &SqliteRow) -> Result<Job, JobsError> {
    let v = view(row)?;
    let payload: String = row.try_get("payload")?;
    let input = serde_json::from_str::<Value>(&payload)
        .map_err(|e| corrupt(v.id, format!("payload: {e}")))?
        .get("input")
        .cloned()
        .unwrap_or(Value::Null);
    Ok(Job {
        id: v.id,
        request_id: Arc::from(v.request_id),
        execution_id: v.execution_id,
        task_type: Arc::from(v.task_type),
        priority: v.priority,
        payload: Arc::from(payload),
        input: Arc::new(input),
        activation: Arc::from(row.try_get::<String, _>("activation")?),
        auth_token: Arc::from(row.try_get::<String, _>("auth_token")?),
        state: v.state,
        cancel_requested: v.cancel_requested,
        worker: v.worker.map(Arc::from),
        lease_id: row.try_get("lease_id")?,
        lease_gen: row.try_get("lease_gen")?,
        lease_expires: v.lease_expires_ms,
        offers: v.offers,
        stage: v.stage,
        progress: v.progress,
        message: v.message,
        outcome: v.outcome,
        seq: row.try_get("seq")?,
        created_ms: v.created_ms,
        updated_ms: v.updated_ms,
        heartbeat_ms: v.heartbeat_ms,
    })
}

impl Store {
    /// Every unfinished job, and the next free id.
    pub(crate) async fn load_live(&self) -> Result<(Vec<Job>, i64), JobsError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM jobs WHERE state != 'finished' ORDER BY id"
        ))
        .fetch_all(&self.pool)
        .await?;
        let jobs = rows.iter().map(job).collect::<Result<Vec<_>, _>>()?;
        let max: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM jobs")
            .fetch_one(&self.pool)
            .await?;
        Ok((jobs, max.unwrap_or(0) + 1))
    }

    /// The job started for `request_id`, if any.
    pub(crate) async fn find_request(&self, request_id: &str) -> Result<Option<i64>, JobsError> {
        Ok(
            sqlx::query_scalar("SELECT id FROM jobs WHERE request_id = ?")
                .bind(request_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// One job's committed state.
    pub(crate) async fn view(&self, id: i64) -> Result<Option<JobView>, JobsError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            view_columns!(),
            " FROM jobs WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(view).transpose()
    }

    /// Unfinished jobs (oldest first, at most `limit`) and the latest finished ones.
    pub(crate) async fn overview(
        &self,
        limit: i64,
    ) -> Result<(Vec<JobView>, Vec<JobView>), JobsError> {
        let live = sqlx::query(concat!(
            "SELECT ",
            view_columns!(),
            " FROM jobs WHERE state != 'finished' ORDER BY id LIMIT ?"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let done = sqlx::query(concat!(
            "SELECT ",
            view_columns!(),
            " FROM jobs WHERE state = 'finished' ORDER BY updated_ms DESC, id DESC LIMIT ?"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok((
            live.iter().map(view).collect::<Result<_, _>>()?,
            done.iter().map(view).collect::<Result<_, _>>()?,
        ))
    }

    /// The latest recorded errors, newest first.
    pub(crate) async fn recent_errors(&self, limit: i64) -> Result<Vec<ErrorRow>, JobsError> {
        let rows = sqlx::query(
            "SELECT job_id, worker, at_ms, transient, message FROM errors ORDER BY id DESC LIMIT ?",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ErrorRow {
                    job_id: r.try_get("job_id")?,
                    worker: r.try_get("worker")?,
                    at_ms: r.try_get("at_ms")?,
                    transient: r.try_get("transient")?,
                    message: r.try_get("message")?,
                })
            })
            .collect()
    }

    /// Closes the read pool.
    pub(crate) async fn close(&self) {
        self.pool.close().await;
    }
}
