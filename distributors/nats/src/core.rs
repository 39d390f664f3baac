//! Connecting, the stream, bucket and consumers, and the execution records: what the adapter
//! and the worker SDK share.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};

use async_nats::{Client, ConnectErrorKind, ConnectOptions, ServerAddr};
use bytes::Bytes;
use distributor_core::Outcome;

use distributor_core::Secret;

use crate::config::{Credentials, Layout, cancel_key, record_key};
use crate::error::NatsError;
use crate::wire::{ExecRecord, JobMessage, RecordState};

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    distributor_core::Timestamp::now().0
}

/// Connects to the first reachable server of `servers`, with `credentials`.
///
/// `retry_initial`: keep trying until a server answers (a worker waiting for its broker);
/// otherwise a broker that is down is a [`NatsError::Connect`] (transient) at once.
pub(crate) async fn connect(
    servers: &[String],
    credentials: &Credentials,
    name: &str,
    retry_initial: bool,
) -> Result<Client, NatsError> {
    let addrs = servers
        .iter()
        .map(|s| {
            s.parse::<ServerAddr>()
                .map_err(|e| NatsError::Config(format!("server `{s}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err(NatsError::Config("`servers` is empty".into()));
    }
    let mut opts = ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(|attempts| {
            // 0, 100, 200, … ms, at most 2 s: a restarted broker is found quickly.
            Duration::from_millis((attempts as u64 * 100).min(2000))
        });
    if retry_initial {
        opts = opts.retry_on_initial_connect();
    }
    opts = match credentials {
        Credentials::None => opts,
        Credentials::Token { token } => opts.token(resolve_secret("/credentials/token", token)?),
        Credentials::UserPassword { user, password } => opts.user_and_password(
            user.clone(),
            resolve_secret("/credentials/password", password)?,
        ),
        Credentials::NkeyFile { path } => {
            let text = tokio::fs::read_to_string(path)
                .await
                .map_err(|e| NatsError::Config(format!("nkey file {}: {e}", path.display())))?;
            let seed = text
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with('S'))
                .ok_or_else(|| {
                    NatsError::Config(format!("nkey file {}: no seed in it", path.display()))
                })?;
            opts.nkey(seed.to_owned())
        }
    };
    opts.connect(addrs).await.map_err(|e| match e.kind() {
        ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
            NatsError::Unauthorized(e.to_string())
        }
        ConnectErrorKind::ServerParse | ConnectErrorKind::Tls => NatsError::Config(e.to_string()),
        _ => NatsError::Connect(e.to_string()),
    })
}

/// Gets the work queue stream, creating it (WorkQueue retention, file storage, the duplicate
/// window) if it does not exist. An existing stream is used as it is.
pub(crate) async fn ensure_stream(
    js: &jetstream::Context,
    layout: &Layout,
    duplicate_window: Duration,
) -> Result<stream::Stream, NatsError> {
    js.get_or_create_stream(stream::Config {
        name: layout.stream.clone(),
        subjects: vec![layout.stream_subjects()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        duplicate_window,
        ..Default::default()
    })
    .await
    .map_err(|e| NatsError::broker("create the work stream")(e.into()))
}

/// Gets the execution record bucket, creating it if it does not exist.
pub(crate) async fn ensure_bucket(
    js: &jetstream::Context,
    layout: &Layout,
    max_age: Duration,
) -> Result<kv::Store, NatsError> {
    if let Ok(store) = js.get_key_value(layout.bucket()).await {
        return Ok(store);
    }
    // The bucket's stream is created directly: the client's `create_key_value` first reads
    // the account info in a shape servers before 2.10 do not send.
    let bucket = layout.bucket();
    let created = js
        .create_stream(stream::Config {
            name: format!("KV_{bucket}"),
            description: Some(format!(
                "execution records of the work stream {}",
                layout.stream
            )),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            max_bytes: -1,
            max_message_size: -1,
            max_age,
            storage: stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            deny_purge: false,
            allow_direct: true,
            num_replicas: 1,
            discard: stream::DiscardPolicy::New,
            duplicate_window: if max_age.is_zero() {
                Duration::from_secs(120)
            } else {
                max_age.min(Duration::from_secs(120))
            },
            ..Default::default()
        })
        .await;
    match created {
        Ok(_) => js
            .get_key_value(bucket)
            .await
            .map_err(|e| NatsError::broker("open the record bucket")(e.into())),
        // Another instance may have created it in between.
        Err(e) => js
            .get_key_value(bucket)
            .await
            .map_err(|_| NatsError::broker("create the record bucket")(e.into())),
    }
}

/// Opens the execution record bucket, which MUST exist (workers).
pub(crate) async fn open_bucket(
    js: &jetstream::Context,
    layout: &Layout,
) -> Result<kv::Store, NatsError> {
    js.get_key_value(layout.bucket())
        .await
        .map_err(|e| NatsError::broker("open the record bucket")(e.into()))
}

/// Delivery settings of the consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Delivery {
    pub(crate) ack_wait: Duration,
    pub(crate) max_deliver: u32,
    pub(crate) max_ack_pending: u32,
}

/// Creates (or updates to `delivery`) the durable pull consumer of one task type.
pub(crate) async fn ensure_consumer(
    stream: &stream::Stream,
    layout: &Layout,
    task_type: &str,
    subject: &str,
    delivery: Delivery,
) -> Result<(), NatsError> {
    let name = layout.consumer(task_type);
    let config = consumer::pull::Config {
        durable_name: Some(name.clone()),
        description: Some(format!("workers of task type {task_type}")),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: delivery.ack_wait,
        max_deliver: i64::from(delivery.max_deliver),
        max_ack_pending: i64::from(delivery.max_ack_pending),
        filter_subject: subject.to_owned(),
        ..Default::default()
    };
    match stream.create_consumer(config).await {
        Ok(_) => Ok(()),
        Err(create) => {
            // It exists with other settings (another instance's config): use it as it is.
            match stream.consumer_info(&name).await {
                Ok(_) => {
                    tracing::warn!(
                        consumer = %name,
                        error = %create,
                        "nats: the consumer exists with other settings; using it as it is"
                    );
                    Ok(())
                }
                Err(_) => Err(NatsError::broker("create the consumer")(create.into())),
            }
        }
    }
}

/// The execution records of one bucket.
#[derive(Debug, Clone)]
pub struct Records {
    pub(crate) kv: kv::Store,
}

/// A record as stored.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) record: ExecRecord,
    pub(crate) revision: u64,
    /// When the broker stored it (ms since the Unix epoch, the broker's clock).
    pub(crate) written_ms: i64,
}

/// The result of a compare-and-set write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Write {
    /// Written; the new revision.
    Done(u64),
    /// The record changed since it was read (or exists, for a create).
    Conflict,
}

impl Records {
    /// The records in `kv`.
    pub(crate) fn new(kv: kv::Store) -> Self {
        Self { kv }
    }

    /// The record of `request_id` and its revision, if any.
    pub async fn read(&self, request_id: &str) -> Result<Option<(ExecRecord, u64)>, NatsError> {
        Ok(self
            .read_stored(request_id)
            .await?
            .map(|s| (s.record, s.revision)))
    }

    /// The record of `request_id` with its revision and write time, if any.
    pub(crate) async fn read_stored(&self, request_id: &str) -> Result<Option<Stored>, NatsError> {
        let entry = self
            .kv
            .entry(record_key(request_id))
            .await
            .map_err(|e| NatsError::broker("read an execution record")(e.into()))?;
        let Some(entry) = entry else { return Ok(None) };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let record = serde_json::from_slice(&entry.value).map_err(|e| NatsError::Corrupt {
            what: format!("execution record of {request_id}"),
            message: e.to_string(),
        })?;
        let written_ms =
            i64::try_from(entry.created.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
        Ok(Some(Stored {
            record,
            revision: entry.revision,
            written_ms,
        }))
    }

    /// Creates the record of `request_id`; [`Write::Conflict`] if one exists.
    pub(crate) async fn create(
        &self,
        request_id: &str,
        record: &ExecRecord,
    ) -> Result<Write, NatsError> {
        let body = Bytes::from(serde_json::to_vec(record).map_err(NatsError::Payload)?);
        match self.kv.create(record_key(request_id), body).await {
            Ok(rev) => Ok(Write::Done(rev)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(Write::Conflict),
            Err(e) => Err(NatsError::broker("create an execution record")(e.into())),
        }
    }

    /// Replaces the record of `request_id` if its revision is still `revision`.
    pub(crate) async fn update(
        &self,
        request_id: &str,
        record: &ExecRecord,
        revision: u64,
    ) -> Result<Write, NatsError> {
        let body = Bytes::from(serde_json::to_vec(record).map_err(NatsError::Payload)?);
        match self.kv.update(record_key(request_id), body, revision).await {
            Ok(rev) => Ok(Write::Done(rev)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(Write::Conflict),
            Err(e) => Err(NatsError::broker("update an execution record")(e.into())),
        }
    }

    /// Whether a cancel of `request_id` was asked for.
    pub async fn cancel_requested(&self, request_id: &str) -> Result<bool, NatsError> {
        let entry = self
            .kv
            .entry(cancel_key(request_id))
            .await
            .map_err(|e| NatsError::broker("read a cancel request")(e.into()))?;
        Ok(entry.is_some_and(|e| e.operation == kv::Operation::Put))
    }

    /// Asks the worker running `request_id` to stop.
    pub(crate) async fn request_cancel(&self, request_id: &str) -> Result<(), NatsError> {
        self.kv
            .put(cancel_key(request_id), Bytes::from_static(b"{}"))
            .await
            .map(|_| ())
            .map_err(|e| NatsError::broker("write a cancel request")(e.into()))
    }

    /// Ends the work of `job` (message `seq`) with `outcome` on the orchestrator's side (a
    /// cancel before any worker took it, deliveries exhausted), unless it already ended.
    /// Returns the record as it stands afterwards.
    pub(crate) async fn end(
        &self,
        job: &JobMessage,
        seq: u64,
        outcome: Outcome,
    ) -> Result<ExecRecord, NatsError> {
        loop {
            let current = self.read(&job.request_id).await?;
            let (base, write) = match &current {
                Some((r, _)) if r.is_finished() => return Ok(r.clone()),
                Some((r, rev)) => (r.clone(), Some(*rev)),
                None => (
                    ExecRecord {
                        execution_id: job.execution_id,
                        auth_token: job.auth_token.clone(),
                        seq,
                        activation: job.activation.clone(),
                        state: RecordState::Active {
                            worker: String::new(),
                            delivered: 0,
                            holder: String::new(),
                            progress: None,
                        },
                    },
                    None,
                ),
            };
            let record = ExecRecord {
                state: RecordState::Finished {
                    outcome: outcome.clone(),
                    worker: None,
                },
                ..base
            };
            let w = match write {
                Some(rev) => self.update(&job.request_id, &record, rev).await?,
                None => self.create(&job.request_id, &record).await?,
            };
            if let Write::Done(_) = w {
                return Ok(record);
            }
        }
    }
}

/// Reads the work message at `seq` of `stream`, if it is still there.
pub(crate) async fn read_job(
    stream: &stream::Stream,
    seq: u64,
) -> Result<Option<JobMessage>, NatsError> {
    match stream.get_raw_message(seq).await {
        Ok(m) => serde_json::from_slice(&m.payload)
            .map(Some)
            .map_err(|e| NatsError::Corrupt {
                what: format!("work message {seq}"),
                message: e.to_string(),
            }),
        Err(e)
            if e.kind() == stream::RawMessageErrorKind::NoMessageFound
                || e.to_string().contains("no message found") =>
        {
            Ok(None)
        }
        Err(e) => Err(NatsError::broker("read a work message")(e.into())),
    }
}

/// Removes the work message at `seq` (already gone: fine).
pub(crate) async fn remove_job(stream: &stream::Stream, seq: u64) -> Result<(), NatsError> {
    match stream.delete_message(seq).await {
        Ok(_) => Ok(()),
        Err(e) => {
            let text = e.to_string();
            if text.contains("no message found") || text.contains("10037") {
                Ok(())
            } else {
                Err(NatsError::broker("remove a work message")(e.into()))
            }
        }
    }
}

/// Reads a credential, naming its config field when it cannot be read.
fn resolve_secret(field: &str, secret: &Secret) -> Result<String, NatsError> {
    secret
        .resolve()
        .map_err(|e| NatsError::Config(format!("{field}: {e}")))
}
