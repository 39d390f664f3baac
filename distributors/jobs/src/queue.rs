//! The in-memory queue: the live (unfinished) jobs, their order, leases and holders.
//!
//! Every mutation runs under one lock and describes its durable effect as rows for the writer
//! (see `store`), which commits them in order before anyone is answered. Finished jobs leave
//! memory; SQLite keeps them.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use distributor_core::{AbnormalKind, ExecutionId, Outcome, Status};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::error::{ApiFailure, JobsError};
use crate::wire::{ClaimedJob, Disposition, ErrorCode, JobId, Lease, LeaseId, LeaseReply};

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum JobState {
    /// Waiting for a worker.
    Queued,
    /// Held by a worker that has not reported yet.
    Claimed,
    /// Held by a worker that has heartbeated or reported progress.
    Running,
    /// Done; `outcome` is set.
    Finished,
}

impl JobState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Claimed => "claimed",
            Self::Running => "running",
            Self::Finished => "finished",
        }
    }
    pub(crate) fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "claimed" => Self::Claimed,
            "running" => Self::Running,
            "finished" => Self::Finished,
            _ => return None,
        })
    }
    /// The status the engine sees.
    pub(crate) fn status(self, outcome: Option<&Outcome>) -> Status {
        match (self, outcome) {
            (Self::Queued, _) => Status::Pending,
            (Self::Claimed | Self::Running, _) => Status::Running,
            (Self::Finished, Some(o)) => Status::Finished(o.clone()),
            (Self::Finished, None) => Status::Finished(Outcome::abnormal(
                AbnormalKind::ResultMalformed,
                "job finished without a recorded outcome",
            )),
        }
    }
}

/// One job, as stored.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub(crate) id: i64,
    pub(crate) request_id: Arc<str>,
    pub(crate) execution_id: u64,
    pub(crate) task_type: Arc<str>,
    pub(crate) priority: i32,
    pub(crate) payload: Arc<str>,
    pub(crate) input: Arc<Value>,
    pub(crate) activation: Arc<str>,
    pub(crate) auth_token: Arc<str>,
    pub(crate) state: JobState,
    pub(crate) cancel_requested: bool,
    pub(crate) worker: Option<Arc<str>>,
    pub(crate) lease_id: Option<String>,
    pub(crate) lease_gen: i64,
    pub(crate) lease_expires: Option<i64>,
    pub(crate) offers: i64,
    pub(crate) stage: Option<String>,
    pub(crate) progress: Option<f64>,
    pub(crate) message: Option<String>,
    pub(crate) outcome: Option<Outcome>,
    pub(crate) seq: i64,
    pub(crate) created_ms: i64,
    pub(crate) updated_ms: i64,
    pub(crate) heartbeat_ms: Option<i64>,
}

/// One recorded worker error (or lapsed lease).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ErrorRow {
    pub(crate) job_id: i64,
    pub(crate) worker: Option<String>,
    pub(crate) at_ms: i64,
    pub(crate) transient: bool,
    pub(crate) message: String,
}

/// A worker as last seen.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct WorkerSeen {
    pub(crate) name: String,
    pub(crate) last_seen_ms: i64,
    pub(crate) last_heartbeat_ms: Option<i64>,
    pub(crate) task_types: Vec<String>,
    pub(crate) capacity: u32,
    pub(crate) holds: u32,
}

/// A status change to push to the engine once its rows are committed.
#[derive(Debug, Clone)]
pub(crate) struct Push {
    pub(crate) job: i64,
    pub(crate) execution: ExecutionId,
    pub(crate) auth_token: Arc<str>,
    pub(crate) seq: i64,
    pub(crate) status: Status,
}

/// What a mutation did, beyond its answer.
#[derive(Debug, Default)]
pub(crate) struct Effects {
    pub(crate) rows: Vec<Job>,
    pub(crate) errors: Vec<ErrorRow>,
    pub(crate) pushes: Vec<Push>,
    pub(crate) wake: bool,
    pub(crate) finished: Vec<(Arc<str>, i64)>,
}

/// One unit for the writer: rows to commit, then an acknowledgement.
#[derive(Debug)]
pub(crate) struct WriteBatch {
    pub(crate) rows: Vec<Job>,
    pub(crate) errors: Vec<ErrorRow>,
    pub(crate) ack: oneshot::Sender<Result<(), String>>,
}

/// Why a report or claim was refused.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The job is not live (finished, or never existed): the caller looks it up in SQLite.
    NotLive,
    /// Refused with this answer.
    Api(ApiFailure),
}

impl From<ApiFailure> for Refusal {
    fn from(a: ApiFailure) -> Self {
        Self::Api(a)
    }
}

/// Timing and budget settings the queue applies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    pub(crate) lease_ms: u64,
    pub(crate) max_reoffers: u32,
}

/// The live queue.
#[derive(Debug)]
pub(crate) struct Queue {
    jobs: HashMap<i64, Job>,
    by_request: HashMap<Arc<str>, i64>,
    ready: HashMap<Arc<str>, BTreeSet<(Reverse<i32>, i64)>>,
    leases: BTreeSet<(i64, i64)>,
    held: HashMap<Arc<str>, u32>,
    workers: BTreeMap<Arc<str>, WorkerSeen>,
    next_id: i64,
    budget: Budget,
    writer: Option<mpsc::UnboundedSender<WriteBatch>>,
}

fn lease_ms(b: Budget) -> i64 {
    i64::try_from(b.lease_ms).unwrap_or(i64::MAX)
}

impl Queue {
    /// A queue holding the live jobs loaded from SQLite. Held jobs get a fresh full lease, so
    /// their workers have time to reach a restarted server.
    pub(crate) fn new(
        live: Vec<Job>,
        next_id: i64,
        budget: Budget,
        writer: mpsc::UnboundedSender<WriteBatch>,
        now: i64,
    ) -> Self {
        let mut q = Self {
            jobs: HashMap::new(),
            by_request: HashMap::new(),
            ready: HashMap::new(),
            leases: BTreeSet::new(),
            held: HashMap::new(),
            workers: BTreeMap::new(),
            next_id,
            budget,
            writer: Some(writer),
        };
        for mut job in live {
            q.by_request.insert(job.request_id.clone(), job.id);
            match job.state {
                JobState::Queued => {
                    q.ready_insert(&job);
                }
                JobState::Claimed | JobState::Running => {
                    let exp = now.saturating_add(lease_ms(budget));
                    job.lease_expires = Some(exp);
                    q.leases.insert((exp, job.id));
                    if let Some(w) = &job.worker {
                        *q.held.entry(w.clone()).or_default() += 1;
                    }
                }
                JobState::Finished => continue,
            }
            q.jobs.insert(job.id, job);
        }
        q
    }

    /// Stops accepting writes (shutdown): later mutations fail with `Shutdown`.
    pub(crate) fn close(&mut self) {
        self.writer = None;
    }

    /// Sends `fx`'s rows to the writer; the receiver resolves once they are committed. `None`
    /// when there is nothing to write.
    pub(crate) fn enqueue(
        &mut self,
        fx: &mut Effects,
        barrier: bool,
    ) -> Result<Option<oneshot::Receiver<Result<(), String>>>, JobsError> {
        if fx.rows.is_empty() && fx.errors.is_empty() && !barrier {
            return Ok(None);
        }
        let writer = self.writer.as_ref().ok_or(JobsError::Shutdown)?;
        let (ack, rx) = oneshot::channel();
        writer
            .send(WriteBatch {
                rows: std::mem::take(&mut fx.rows),
                errors: std::mem::take(&mut fx.errors),
                ack,
            })
            .map_err(|_| JobsError::Shutdown)?;
        Ok(Some(rx))
    }

    /// Drops request ids of jobs whose final row is committed (SQLite answers for them now).
    pub(crate) fn forget(&mut self, finished: &[(Arc<str>, i64)]) {
        for (req, id) in finished {
            if self.by_request.get(req) == Some(id) {
                self.by_request.remove(req);
            }
        }
    }

    /// The job id of a live (or just finished, not yet committed) request.
    pub(crate) fn by_request(&self, request: &str) -> Option<i64> {
        self.by_request.get(request).copied()
    }

    /// Allocates the next job id.
    pub(crate) fn next_id(&mut self) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Adds a new queued job.
    pub(crate) fn insert(&mut self, job: Job, fx: &mut Effects) {
        self.by_request.insert(job.request_id.clone(), job.id);
        self.ready_insert(&job);
        fx.rows.push(job.clone());
        fx.wake = true;
        self.jobs.insert(job.id, job);
    }

    fn ready_insert(&mut self, job: &Job) {
        self.ready
            .entry(job.task_type.clone())
            .or_default()
            .insert((Reverse(job.priority), job.id));
    }

    fn ready_remove(&mut self, job: &Job) {
        if let Some(set) = self.ready.get_mut(&job.task_type) {
            set.remove(&(Reverse(job.priority), job.id));
        }
    }

    /// Records that `worker` called.
    pub(crate) fn see(&mut self, worker: &Arc<str>, now: i64, claim: Option<(&[String], u32)>) {
        let w = self
            .workers
            .entry(worker.clone())
            .or_insert_with(|| WorkerSeen {
                name: worker.to_string(),
                last_seen_ms: now,
                last_heartbeat_ms: None,
                task_types: Vec::new(),
                capacity: 0,
                holds: 0,
            });
        w.last_seen_ms = now;
        if let Some((types, capacity)) = claim {
            if w.task_types != types {
                w.task_types = types.to_vec();
            }
            w.capacity = capacity;
        }
    }

    /// Workers seen since start, with how many jobs each holds.
    pub(crate) fn workers(&self) -> Vec<WorkerSeen> {
        self.workers
            .values()
            .map(|w| WorkerSeen {
                holds: self.held.get(w.name.as_str()).copied().unwrap_or(0),
                ..w.clone()
            })
            .collect()
    }

    /// Hands the best queued job among `types` to `worker`: highest priority first, then oldest.
    pub(crate) fn claim_next(
        &mut self,
        worker: &Arc<str>,
        types: &[String],
        capacity: u32,
        now: i64,
        fx: &mut Effects,
    ) -> Result<Option<ClaimedJob>, Refusal> {
        let holds = self.held.get(worker).copied().unwrap_or(0);
        if holds >= capacity {
            return Err(ApiFailure::new(
                ErrorCode::CapacityExhausted,
                format!(
                    "worker `{worker}` already holds {holds} job(s), its capacity is {capacity}"
                ),
            )
            .into());
        }
        let best = types
            .iter()
            .filter_map(|t| self.ready.get(t.as_str()).and_then(|s| s.first()).copied())
            .min();
        let Some((prio, id)) = best else {
            return Ok(None);
        };
        let Some(mut job) = self.jobs.remove(&id) else {
            return Ok(None);
        };
        if let Some(set) = self.ready.get_mut(&job.task_type) {
            set.remove(&(prio, id));
        }
        let claimed = self.claim(&mut job, worker, now, fx);
        self.jobs.insert(id, job);
        Ok(Some(claimed))
    }

    /// Claims job `id` by its activation token: the first claim wins.
    pub(crate) fn activate(
        &mut self,
        worker: &Arc<str>,
        id: i64,
        token: &str,
        now: i64,
        fx: &mut Effects,
    ) -> Result<ClaimedJob, Refusal> {
        let job = self.jobs.get(&id).ok_or(Refusal::NotLive)?;
        if !crate::core::ct_eq(job.activation.as_bytes(), token.as_bytes()) {
            return Err(ApiFailure::new(
                ErrorCode::WrongActivationToken,
                format!("wrong activation token for job {id}"),
            )
            .into());
        }
        if job.state != JobState::Queued {
            return Err(ApiFailure::new(
                ErrorCode::AlreadyClaimed,
                format!("job {id} is already claimed"),
            )
            .into());
        }
        let Some(mut job) = self.jobs.remove(&id) else {
            return Err(Refusal::NotLive);
        };
        self.ready_remove(&job);
        let claimed = self.claim(&mut job, worker, now, fx);
        self.jobs.insert(id, job);
        Ok(claimed)
    }

    fn claim(
        &mut self,
        job: &mut Job,
        worker: &Arc<str>,
        now: i64,
        fx: &mut Effects,
    ) -> ClaimedJob {
        job.offers += 1;
        job.lease_gen += 1;
        let lease = LeaseId(format!("{}.{:016x}", job.lease_gen, rand::random::<u64>()));
        let exp = now.saturating_add(lease_ms(self.budget));
        job.lease_id = Some(lease.0.clone());
        job.lease_expires = Some(exp);
        job.worker = Some(worker.clone());
        job.state = JobState::Claimed;
        job.heartbeat_ms = None;
        job.updated_ms = now;
        self.leases.insert((exp, job.id));
        *self.held.entry(worker.clone()).or_default() += 1;
        self.changed(job, fx, true);
        ClaimedJob {
            id: JobId(job.id),
            execution_id: job.execution_id,
            task_type: job.task_type.to_string(),
            input: Value::clone(&job.input),
            priority: job.priority,
            activation_token: job.activation.to_string(),
            lease: Lease {
                id: lease,
                expires_at_ms: exp,
                duration_ms: self.budget.lease_ms,
            },
            offer: u32::try_from(job.offers).unwrap_or(u32::MAX),
        }
    }

    /// Records a row for `job` (and a push of its status when `push`).
    fn changed(&self, job: &mut Job, fx: &mut Effects, push: bool) {
        if push {
            job.seq += 1;
            fx.pushes.push(Push {
                job: job.id,
                execution: ExecutionId(job.execution_id),
                auth_token: job.auth_token.clone(),
                seq: job.seq,
                status: job.state.status(job.outcome.as_ref()),
            });
        }
        fx.rows.push(job.clone());
    }

    /// Takes job `id` out for a report by `worker` holding `lease`.
    fn take_held(&mut self, worker: &Arc<str>, id: i64, lease: &LeaseId) -> Result<Job, Refusal> {
        let job = self.jobs.get(&id).ok_or(Refusal::NotLive)?;
        let holder_ok = job.worker.as_ref() == Some(worker);
        if holder_ok && job.lease_id.as_deref() == Some(lease.0.as_str()) {
            return self.jobs.remove(&id).ok_or(Refusal::NotLive);
        }
        // Someone else holds it: a lease from an earlier claim is stale (LeaseLost); anything
        // else is an attempt to report on another worker's job.
        let stale = lease.generation().is_some_and(|g| g < job.lease_gen);
        if job.worker.is_some() && !holder_ok && !stale {
            return Err(ApiFailure::new(
                ErrorCode::NotHolder,
                format!("job {id} is held by another worker"),
            )
            .into());
        }
        Err(ApiFailure::new(
            ErrorCode::LeaseLost,
            format!(
                "lease `{lease}` on job {id} was taken over (job is {}, lease generation {})",
                job.state.as_str(),
                job.lease_gen
            ),
        )
        .into())
    }

    fn end_lease(&mut self, job: &mut Job) {
        if let Some(exp) = job.lease_expires.take() {
            self.leases.remove(&(exp, job.id));
        }
        if let Some(h) = job.worker.take().and_then(|w| self.held.get_mut(&w)) {
            *h = h.saturating_sub(1);
        }
        job.lease_id = None;
    }

    fn finish(&mut self, mut job: Job, outcome: Outcome, now: i64, fx: &mut Effects) {
        self.end_lease(&mut job);
        job.state = JobState::Finished;
        job.outcome = Some(outcome);
        job.updated_ms = now;
        self.changed(&mut job, fx, true);
        fx.finished.push((job.request_id.clone(), job.id));
    }

    fn requeue(&mut self, mut job: Job, now: i64, fx: &mut Effects) {
        self.end_lease(&mut job);
        job.state = JobState::Queued;
        job.updated_ms = now;
        self.ready_insert(&job);
        self.changed(&mut job, fx, true);
        fx.wake = true;
        self.jobs.insert(job.id, job);
    }

    /// Extends the lease; with `progress`, records stage/progress/message too.
    pub(crate) fn heartbeat(
        &mut self,
        worker: &Arc<str>,
        id: i64,
        lease: &LeaseId,
        progress: Option<(Option<String>, Option<f64>, Option<String>)>,
        now: i64,
        fx: &mut Effects,
    ) -> Result<LeaseReply, Refusal> {
        let mut job = self.take_held(worker, id, lease)?;
        if let Some(old) = job.lease_expires {
            self.leases.remove(&(old, id));
        }
        let exp = now.saturating_add(lease_ms(self.budget));
        self.leases.insert((exp, id));
        job.lease_expires = Some(exp);
        job.heartbeat_ms = Some(now);
        job.updated_ms = now;
        if let Some((stage, p, message)) = progress {
            if stage.is_some() {
                job.stage = stage;
            }
            if p.is_some() {
                job.progress = p;
            }
            if message.is_some() {
                job.message = message;
            }
        }
        let first = job.state == JobState::Claimed;
        job.state = JobState::Running;
        if let Some(w) = self.workers.get_mut(worker) {
            w.last_heartbeat_ms = Some(now);
        }
        self.changed(&mut job, fx, first);
        let reply = LeaseReply {
            expires_at_ms: exp,
            cancelled: job.cancel_requested,
        };
        self.jobs.insert(id, job);
        Ok(reply)
    }

    /// The worker's handler failed with `(message, permanent)`.
    pub(crate) fn error(
        &mut self,
        worker: &Arc<str>,
        id: i64,
        lease: &LeaseId,
        (message, permanent): (String, bool),
        now: i64,
        fx: &mut Effects,
    ) -> Result<Disposition, Refusal> {
        let job = self.take_held(worker, id, lease)?;
        fx.errors.push(ErrorRow {
            job_id: id,
            worker: Some(worker.to_string()),
            at_ms: now,
            transient: !permanent,
            message: message.clone(),
        });
        let offers = job.offers;
        Ok(if job.cancel_requested {
            let o = format!("cancelled; worker `{worker}` reported: {message}");
            self.finish(job, Outcome::abnormal(AbnormalKind::Cancelled, o), now, fx);
            Disposition::Cancelled
        } else if permanent {
            self.finish(
                job,
                Outcome::abnormal(AbnormalKind::Failed, message),
                now,
                fx,
            );
            Disposition::Failed
        } else if offers <= i64::from(self.budget.max_reoffers) {
            self.requeue(job, now, fx);
            Disposition::Requeued
        } else {
            let o = format!("{message} (transient error; gave up after {offers} offers)");
            self.finish(job, Outcome::abnormal(AbnormalKind::Failed, o), now, fx);
            Disposition::Failed
        })
    }

    /// The worker's handler succeeded with `result`.
    pub(crate) fn complete(
        &mut self,
        worker: &Arc<str>,
        id: i64,
        lease: &LeaseId,
        result: Value,
        now: i64,
        fx: &mut Effects,
    ) -> Result<Disposition, Refusal> {
        let job = self.take_held(worker, id, lease)?;
        self.finish(job, Outcome::Succeeded { data: result }, now, fx);
        Ok(Disposition::Succeeded)
    }

    /// The worker gives the job back (cancel acknowledged, or shutting down).
    pub(crate) fn release(
        &mut self,
        worker: &Arc<str>,
        id: i64,
        lease: &LeaseId,
        reason: Option<String>,
        now: i64,
        fx: &mut Effects,
    ) -> Result<Disposition, Refusal> {
        let mut job = self.take_held(worker, id, lease)?;
        Ok(if job.cancel_requested {
            let why = format!(
                "cancelled; worker `{worker}` stopped{}",
                reason.map(|r| format!(": {r}")).unwrap_or_default()
            );
            self.finish(
                job,
                Outcome::abnormal(AbnormalKind::Cancelled, why),
                now,
                fx,
            );
            Disposition::Cancelled
        } else {
            job.offers = (job.offers - 1).max(0);
            job.message = reason;
            self.requeue(job, now, fx);
            Disposition::Requeued
        })
    }

    /// Cancels job `id`: a queued job ends at once; a held one is flagged, and its worker learns
    /// it from its next heartbeat. Unknown or finished jobs: nothing to do.
    pub(crate) fn cancel(&mut self, id: i64, now: i64, fx: &mut Effects) {
        let Some(mut job) = self.jobs.remove(&id) else {
            return;
        };
        match job.state {
            JobState::Queued => {
                self.ready_remove(&job);
                let o = Outcome::abnormal(AbnormalKind::Cancelled, "cancelled while queued");
                self.finish(job, o, now, fx);
            }
            _ => {
                if !job.cancel_requested {
                    job.cancel_requested = true;
                    job.updated_ms = now;
                    self.changed(&mut job, fx, false);
                }
                self.jobs.insert(id, job);
            }
        }
    }

    /// Ends every lease that lapsed by `now`: the job is offered again while its budget lasts,
    /// then ends `Crashed`; a cancelled job ends `Cancelled`.
    pub(crate) fn expire(&mut self, now: i64, fx: &mut Effects) {
        while let Some(&(exp, id)) = self.leases.first() {
            if exp > now {
                break;
            }
            self.leases.remove(&(exp, id));
            let Some(mut job) = self.jobs.remove(&id) else {
                continue;
            };
            job.lease_expires = None;
            let holder = job.worker.as_deref().unwrap_or("?").to_owned();
            fx.errors.push(ErrorRow {
                job_id: id,
                worker: Some(holder.clone()),
                at_ms: now,
                transient: true,
                message: format!("lease expired (held by `{holder}`)"),
            });
            if job.cancel_requested {
                let o = format!("cancelled; lease of `{holder}` lapsed before it acknowledged");
                self.finish(job, Outcome::abnormal(AbnormalKind::Cancelled, o), now, fx);
            } else if job.offers <= i64::from(self.budget.max_reoffers) {
                self.requeue(job, now, fx);
            } else {
                let o = format!(
                    "lease expired {} times without a report; last holder `{holder}`",
                    job.offers
                );
                self.finish(job, Outcome::abnormal(AbnormalKind::Crashed, o), now, fx);
            }
        }
    }
}
