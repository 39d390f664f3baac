//! The server core shared by the HTTP handlers, the lease reaper and the `Distributor` impl:
//! settings, the queue under its lock, the store, wake-ups for long polls and pushes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use distributor_core::{Notification, Notifier, Timestamp};
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::sync::{Notify, watch};
use url::Url;

use crate::error::{ApiFailure, JobsError};
use crate::queue::{Effects, Push, Queue, Refusal};
use crate::store::Store;
use crate::wire::ErrorCode;

/// Constant-time byte comparison (tokens).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Wall-clock milliseconds since the Unix epoch (leases are persisted, so they use the wall
/// clock).
pub(crate) fn now_ms() -> i64 {
    Timestamp::now().0
}

/// Resolved settings of one instance.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) lease_ms: u64,
    pub(crate) long_poll: Duration,
    pub(crate) tokens: Vec<(String, Arc<str>)>,
    pub(crate) public_url: Url,
}

/// Everything the tasks of one instance share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) settings: Settings,
    queue: Mutex<Queue>,
    pub(crate) store: Store,
    pub(crate) wake: Notify,
    routes: Mutex<Routes>,
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// Where pushes go: to the notifier of the instance that ran the job, else (jobs loaded from
/// the file, or an instance that was dropped) to the newest instance's.
#[derive(Debug)]
struct Routes {
    by_job: HashMap<i64, Notifier>,
    fallback: Notifier,
}

impl Shared {
    pub(crate) fn new(
        settings: Settings,
        queue: Queue,
        store: Store,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            settings,
            queue: Mutex::new(queue),
            store,
            wake: Notify::new(),
            routes: Mutex::new(Routes {
                by_job: HashMap::new(),
                fallback: Notifier::detached(),
            }),
            shutdown,
        }
    }

    fn routes(&self) -> MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pushes about `job` go to `notifier` from now on.
    pub(crate) fn route(&self, job: i64, notifier: Notifier) {
        self.routes().by_job.insert(job, notifier);
    }

    /// Pushes without a live route go to `notifier` from now on.
    pub(crate) fn set_fallback(&self, notifier: Notifier) {
        self.routes().fallback = notifier;
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock cannot leave the queue half-updated in a way later
        // calls would trip on more than on a fresh error, so keep serving.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The worker presenting `authorization` (`Bearer <token>`), if any matches.
    pub(crate) fn worker_for(&self, authorization: Option<&str>) -> Option<Arc<str>> {
        let token = authorization?.strip_prefix("Bearer ")?.trim();
        let mut found = None;
        for (t, name) in &self.settings.tokens {
            if ct_eq(t.as_bytes(), token.as_bytes()) {
                found = Some(name.clone());
            }
        }
        found
    }

    /// Runs `f` on the queue, commits what it changed, pushes the resulting statuses, and
    /// answers. With `barrier`, also waits for every earlier write to be committed.
    pub(crate) async fn apply<T>(
        &self,
        barrier: bool,
        f: impl FnOnce(&mut Queue, &mut Effects) -> Result<T, Refusal>,
    ) -> Result<T, Refusal> {
        let mut fx = Effects::default();
        let (result, ack) = {
            let mut q = self.lock();
            let result = f(&mut q, &mut fx);
            let ack = q.enqueue(&mut fx, barrier);
            (result, ack)
        };
        if fx.wake {
            self.wake.notify_waiters();
        }
        let ack = ack.map_err(|e| Refusal::Api(e.into()))?;
        if let Some(ack) = ack {
            match ack.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err(Refusal::Api(ApiFailure::new(
                        ErrorCode::Unavailable,
                        format!("jobs queue database: {e}"),
                    )));
                }
                Err(_) => return Err(Refusal::Api(JobsError::Shutdown.into())),
            }
        }
        for p in fx.pushes {
            self.push(p);
        }
        if !fx.finished.is_empty() {
            self.lock().forget(&fx.finished);
        }
        result
    }

    fn push(&self, p: Push) {
        let mut attributes = BTreeMap::new();
        attributes.insert("auth_token".to_owned(), p.auth_token.to_string());
        attributes.insert("job".to_owned(), p.job.to_string());
        let mut n = Notification::json(&json!({ "job": p.job, "status": p.status }));
        n.attributes = attributes;
        n.sequence = u64::try_from(p.seq).ok();
        n.message_id = Some(format!("jobs-{}-{}", p.job, p.seq));
        let finished = matches!(p.status, distributor_core::Status::Finished(_));
        let mut routes = self.routes();
        let routed = match routes.by_job.get(&p.job) {
            Some(r) => r.send(p.execution, n.clone()),
            None => false,
        };
        if !routed {
            routes.fallback.send(p.execution, n);
        }
        if finished {
            routes.by_job.remove(&p.job);
        }
    }

    /// The lease reaper: ends lapsed leases until shutdown.
    pub(crate) async fn reap(self: Arc<Self>) {
        let tick = Duration::from_millis((self.settings.lease_ms / 4).clamp(5, 1000));
        let mut shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.changed() => return,
            }
            let now = now_ms();
            if let Err(Refusal::Api(e)) = self
                .apply(false, |q, fx| {
                    q.expire(now, fx);
                    Ok(())
                })
                .await
            {
                tracing::warn!(error = %e.message, "jobs: lease reaper could not commit");
            }
        }
    }
}
