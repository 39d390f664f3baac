//! The manager of workflow runs: one driver task per run that owns its state, submits its
//! steps' tasks to the engine, follows them, and writes every change to the store first.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use distributor_core::store::ListFilter;
use distributor_core::{
    AbnormalKind, Engine, ExecutionId, ExecutionRecord, Labels, Outcome, RetryPolicy, State, Task,
    Timeouts, Timestamp,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::error::WorkflowError;
use crate::run::{
    RUNS, RunDoc, RunId, RunSnapshot, RunState, StepDoc, StepState, UnitDoc, UnitState, decode,
    encode, run_key, step_key, unit_key,
};
use crate::spec::{OnFailure, StepSpec, WorkflowSpec, parse_duration};
use crate::template::{Scope, StepValue};

/// Label naming the run on every execution of a workflow step.
pub const LABEL_RUN: &str = "workflow.run";
/// Label naming the step.
pub const LABEL_STEP: &str = "workflow.step";
/// Label with the unit's index (fan-out item).
pub const LABEL_UNIT: &str = "workflow.unit";
/// Label with the step's generation (re-runs).
pub const LABEL_GEN: &str = "workflow.gen";

/// Something that happened to a run, published after it was stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum WorkflowEvent {
    /// A run was started.
    Created {
        /// The run.
        run: RunId,
        /// Its workflow's name.
        workflow: String,
    },
    /// A step changed state.
    StepChanged {
        /// The run.
        run: RunId,
        /// The step.
        step: String,
        /// Its new state.
        state: StepState,
        /// Its generation.
        generation: u32,
    },
    /// The run's state changed (cancelling, or back to running after a re-run).
    RunChanged {
        /// The run.
        run: RunId,
        /// Its state.
        state: RunState,
    },
    /// The run ended.
    Finished {
        /// The run.
        run: RunId,
        /// How.
        state: RunState,
    },
    /// Someone asked for an immediate status poll of the run's live executions.
    Poked {
        /// The run.
        run: RunId,
    },
}

/// A caller's answer channel and the answer to send once the change is stored.
type Reply = (
    oneshot::Sender<Result<(), WorkflowError>>,
    Result<(), WorkflowError>,
);

enum Msg {
    Done {
        step: String,
        index: u32,
        generation: u32,
        rec: Result<Box<ExecutionRecord>, String>,
    },
    Cancel(oneshot::Sender<Result<(), WorkflowError>>),
    Approve(String, String, oneshot::Sender<Result<(), WorkflowError>>),
    Rerun(String, oneshot::Sender<Result<(), WorkflowError>>),
    Poke(oneshot::Sender<Result<(), WorkflowError>>),
}

struct Inner {
    engine: Engine,
    events: broadcast::Sender<WorkflowEvent>,
    drivers: Mutex<HashMap<RunId, mpsc::UnboundedSender<Msg>>>,
    /// Dropped with the last `Workflows`: every driver and follower task stops (like a crash:
    /// nothing stored is lost, a new `Workflows` resumes).
    alive: tokio::sync::watch::Sender<()>,
}

/// Starts, follows and operates workflow runs over an [`Engine`]. Cheap to clone.
///
/// Durability: every run lives in the engine's store ([`crate::run`] lists the keys). A new
/// `Workflows` on the same store ([`Workflows::open`]) resumes every unfinished run: a step's
/// task whose submission was recorded but whose execution id was not is looked up by its
/// labels before it is submitted again, so no task is lost or run twice.
///
/// Only one `Workflows` may drive a store at a time (as only one engine may).
#[derive(Clone)]
pub struct Workflows {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Workflows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workflows").finish_non_exhaustive()
    }
}

/// One line of [`Workflows::list`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// The run.
    pub id: RunId,
    /// Its workflow's name.
    pub workflow: String,
    /// Its state.
    pub state: RunState,
    /// Started.
    pub created_at: Timestamp,
    /// Ended.
    pub finished_at: Option<Timestamp>,
}

impl Workflows {
    /// Opens the workflow runs kept in `engine`'s store and resumes every unfinished one.
    ///
    /// Errors: store errors, a corrupt run document.
    pub async fn open(engine: Engine) -> Result<Self, WorkflowError> {
        let (events, _) = broadcast::channel(4096);
        let w = Self {
            inner: Arc::new(Inner {
                engine,
                events,
                drivers: Mutex::new(HashMap::new()),
                alive: tokio::sync::watch::channel(()).0,
            }),
        };
        for s in w.list().await? {
            if !s.state.is_terminal() {
                w.driver(&s.id).await?;
            }
        }
        Ok(w)
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The event stream (published after each change is stored).
    pub fn subscribe(&self) -> broadcast::Receiver<WorkflowEvent> {
        self.inner.events.subscribe()
    }

    /// Starts a run of `spec` with `params` (defaults filled in) and returns its id once the
    /// run is stored.
    ///
    /// Errors: [`WorkflowError::Invalid`] for unknown, missing parameters (`/params/<name>`) or
    /// an unknown distributor (`/steps/<i>/distributor`); store errors.
    pub async fn start(
        &self,
        spec: WorkflowSpec,
        params: BTreeMap<String, Value>,
    ) -> Result<RunId, WorkflowError> {
        let params = spec.resolve_params(&params)?;
        let mut problems = Vec::new();
        for (i, s) in spec.steps.iter().enumerate() {
            if let Some(d) = &s.distributor
                && let Err(e) = self.inner.engine.instance(d)
            {
                problems.push(distributor_core::Violation {
                    pointer: format!("/steps/{i}/distributor"),
                    expected: "a configured distributor".into(),
                    message: e.to_string(),
                    suggestion: None,
                });
            }
        }
        if !problems.is_empty() {
            return Err(distributor_core::ValidationError {
                subject: format!("workflow {}", spec.name),
                violations: problems,
            }
            .into());
        }
        let now = self.inner.engine.clock().now();
        let id = RunId::new(now);
        let doc = RunDoc {
            id: id.clone(),
            spec,
            params,
            state: RunState::Running,
            created_at: now,
            updated_at: now,
            finished_at: None,
        };
        let mut writes = vec![(run_key(&id), encode(&doc))];
        for s in &doc.spec.steps {
            writes.push((step_key(&id, &s.name), encode(&StepDoc::new())));
        }
        self.inner.engine.put_meta(writes).await?;
        let _ = self.inner.events.send(WorkflowEvent::Created {
            run: id.clone(),
            workflow: doc.spec.name.clone(),
        });
        self.driver(&id).await?;
        Ok(id)
    }

    /// Every run, newest first.
    pub async fn list(&self) -> Result<Vec<RunSummary>, WorkflowError> {
        let mut out = Vec::new();
        for (k, v) in self.inner.engine.meta_prefix(RUNS).await? {
            let d: RunDoc = decode(&k, &v)?;
            out.push(RunSummary {
                id: d.id,
                workflow: d.spec.name,
                state: d.state,
                created_at: d.created_at,
                finished_at: d.finished_at,
            });
        }
        out.reverse();
        Ok(out)
    }

    /// A run as stored now.
    pub async fn get(&self, run: &RunId) -> Result<RunSnapshot, WorkflowError> {
        RunSnapshot::load(&self.inner.engine, run).await
    }

    /// Waits until the run is over and returns it.
    pub async fn wait(&self, run: &RunId) -> Result<RunSnapshot, WorkflowError> {
        let mut rx = self.subscribe();
        loop {
            let snap = self.get(run).await?;
            if snap.run.state.is_terminal() {
                return Ok(snap);
            }
            loop {
                match rx.recv().await {
                    Ok(WorkflowEvent::Finished { run: r, .. }) if &r == run => break,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(distributor_core::Error::Shutdown.into());
                    }
                }
            }
        }
    }

    /// Cancels the run: steps not started never start, approvals stop waiting, running tasks
    /// are cancelled; the run ends `cancelled` once they have stopped. Idempotent.
    ///
    /// Errors: [`WorkflowError::UnknownRun`]; [`WorkflowError::Conflict`] if the run is over.
    pub async fn cancel(&self, run: &RunId) -> Result<(), WorkflowError> {
        self.ask(run, Msg::Cancel).await
    }

    /// Approves a step that is awaiting approval; `by` is recorded in its result.
    ///
    /// Errors: unknown run or step; [`WorkflowError::Conflict`] if it is not awaiting approval.
    pub async fn approve(&self, run: &RunId, step: &str, by: &str) -> Result<(), WorkflowError> {
        let (step, by) = (step.to_owned(), by.to_owned());
        self.ask(run, |r| Msg::Approve(step, by, r)).await
    }

    /// Re-runs a step that failed or was cancelled, and every step after it: they get a new
    /// generation (new executions) and the run is running again.
    ///
    /// Errors: unknown run or step; [`WorkflowError::Conflict`] if the step did not fail or
    /// the run is being cancelled.
    pub async fn rerun(&self, run: &RunId, step: &str) -> Result<(), WorkflowError> {
        let step = step.to_owned();
        self.ask(run, |r| Msg::Rerun(step, r)).await
    }

    /// Polls the backends of the run's live executions now.
    pub async fn poke(&self, run: &RunId) -> Result<(), WorkflowError> {
        self.ask(run, Msg::Poke).await
    }

    async fn ask(
        &self,
        run: &RunId,
        make: impl FnOnce(oneshot::Sender<Result<(), WorkflowError>>) -> Msg,
    ) -> Result<(), WorkflowError> {
        let tx = self.driver(run).await?;
        let (rtx, rrx) = oneshot::channel();
        tx.send(make(rtx))
            .map_err(|_| WorkflowError::Engine(distributor_core::Error::Shutdown))?;
        rrx.await
            .map_err(|_| WorkflowError::Engine(distributor_core::Error::Shutdown))?
    }

    /// The driver of `run`, started from the store if it is not running. Drivers live as long
    /// as the `Workflows` (a finished run's driver is idle until it is operated on).
    async fn driver(&self, run: &RunId) -> Result<mpsc::UnboundedSender<Msg>, WorkflowError> {
        if let Some(tx) = self.lock().get(run).filter(|t| !t.is_closed()) {
            return Ok(tx.clone());
        }
        let snap = RunSnapshot::load(&self.inner.engine, run).await?;
        let mut g = self.lock();
        if let Some(tx) = g.get(run).filter(|t| !t.is_closed()) {
            return Ok(tx.clone());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let d = Driver {
            engine: self.inner.engine.clone(),
            events: self.inner.events.clone(),
            tx: tx.downgrade(),
            alive: self.inner.alive.subscribe(),
            run: snap.run,
            steps: snap.steps,
            units: snap.units,
            dirty: BTreeSet::new(),
            changed: Vec::new(),
        };
        tokio::spawn(d.drive(rx));
        g.insert(run.clone(), tx.clone());
        Ok(tx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RunId, mpsc::UnboundedSender<Msg>>> {
        self.inner.drivers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Run,
    Step(String),
    Unit(String, u32),
}

struct Driver {
    engine: Engine,
    events: broadcast::Sender<WorkflowEvent>,
    tx: mpsc::WeakUnboundedSender<Msg>,
    alive: tokio::sync::watch::Receiver<()>,
    run: RunDoc,
    steps: BTreeMap<String, StepDoc>,
    units: BTreeMap<String, Vec<UnitDoc>>,
    dirty: BTreeSet<Key>,
    changed: Vec<WorkflowEvent>,
}

impl Driver {
    async fn drive(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let run = self.run.id.clone();
        if let Err(e) = self.recover().await {
            tracing::error!(run = %run, error = %e, "cannot resume workflow run");
        }
        loop {
            if let Err(e) = self.advance().await {
                tracing::error!(run = %run, error = %e, "workflow step could not be started");
            }
            if let Err(e) = self.flush().await {
                // The store refused the write: stop driving; a restart resumes from what is stored.
                tracing::error!(run = %run, error = %e, "cannot store workflow run; stopping its driver");
                return;
            }
            let Some(first) = rx.recv().await else { return };
            let mut replies = Vec::new();
            self.handle(first, &mut replies).await;
            // Take what else is waiting, so that one write covers a burst of finished tasks.
            let mut n = 0;
            while n < 1024 {
                match rx.try_recv() {
                    Ok(m) => self.handle(m, &mut replies).await,
                    Err(_) => break,
                }
                n += 1;
            }
            if let Err(e) = self.advance().await {
                tracing::error!(run = %run, error = %e, "workflow step could not be started");
            }
            let stored = self.flush().await;
            for (r, res) in replies {
                let _ = r.send(match (&stored, res) {
                    (Err(e), _) => Err(WorkflowError::Conflict(format!("not stored: {e}"))),
                    (Ok(()), res) => res,
                });
            }
            if stored.is_err() {
                return;
            }
        }
    }

    fn now(&self) -> Timestamp {
        self.engine.clock().now()
    }

    fn spec(&self, step: &str) -> StepSpec {
        self.run
            .spec
            .step(step)
            .cloned()
            .expect("steps of the run's spec")
    }

    fn set_step(&mut self, step: &str, state: StepState) {
        let now = self.now();
        let d = self.steps.get_mut(step).expect("known step");
        d.state = state;
        if state == StepState::Running || state == StepState::AwaitingApproval {
            d.started_at = Some(now);
            d.finished_at = None;
        }
        if state.is_terminal() {
            d.finished_at = Some(now);
        }
        let generation = d.generation;
        self.dirty.insert(Key::Step(step.to_owned()));
        self.changed.push(WorkflowEvent::StepChanged {
            run: self.run.id.clone(),
            step: step.to_owned(),
            state,
            generation,
        });
    }

    fn set_run(&mut self, state: RunState) {
        self.run.state = state;
        self.run.updated_at = self.now();
        self.run.finished_at = state.is_terminal().then_some(self.run.updated_at);
        self.dirty.insert(Key::Run);
        self.changed.push(if state.is_terminal() {
            WorkflowEvent::Finished {
                run: self.run.id.clone(),
                state,
            }
        } else {
            WorkflowEvent::RunChanged {
                run: self.run.id.clone(),
                state,
            }
        });
    }

    /// Writes every changed document in one transaction, then publishes the events.
    async fn flush(&mut self) -> Result<(), WorkflowError> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        let id = self.run.id.clone();
        let writes: Vec<(String, String)> = std::mem::take(&mut self.dirty)
            .into_iter()
            .filter_map(|k| match k {
                Key::Run => Some((run_key(&id), encode(&self.run))),
                Key::Step(s) => Some((step_key(&id, &s), encode(&self.steps[&s]))),
                Key::Unit(s, i) => self
                    .units
                    .get(&s)
                    .and_then(|u| u.get(i as usize))
                    .map(|u| (unit_key(&id, &s, i), encode(u))),
            })
            .collect();
        self.engine.put_meta(writes).await?;
        for e in std::mem::take(&mut self.changed) {
            let _ = self.events.send(e);
        }
        Ok(())
    }

    fn follow(&self, step: &str, index: u32, generation: u32, id: ExecutionId) {
        let (engine, tx, step) = (self.engine.clone(), self.tx.clone(), step.to_owned());
        let mut alive = self.alive.clone();
        tokio::spawn(async move {
            let rec = tokio::select! {
                r = engine.wait_task(id) => r,
                _ = alive.changed() => return,
            };
            let rec = match rec {
                Ok(r) => Ok(Box::new(r)),
                Err(distributor_core::Error::Shutdown) => return,
                Err(e) => Err(e.to_string()),
            };
            if let Some(tx) = tx.upgrade() {
                let _ = tx.send(Msg::Done {
                    step,
                    index,
                    generation,
                    rec,
                });
            }
        });
    }

    /// After a restart: follow every live unit; find the executions of units whose submission
    /// was recorded without an id, and submit only those that do not exist.
    async fn recover(&mut self) -> Result<(), WorkflowError> {
        let run = self.run.id.clone();
        let running: Vec<String> = self
            .steps
            .iter()
            .filter(|(_, d)| d.state == StepState::Running)
            .map(|(n, _)| n.clone())
            .collect();
        for step in running {
            let generation = self.steps[&step].generation;
            let units = self.units.get(&step).cloned().unwrap_or_default();
            if units.iter().any(|u| u.execution.is_none()) {
                let filter = ListFilter {
                    labels: Labels::from([
                        (LABEL_RUN.to_owned(), run.0.clone()),
                        (LABEL_STEP.to_owned(), step.clone()),
                        (LABEL_GEN.to_owned(), generation.to_string()),
                    ]),
                    limit: Some(usize::MAX),
                    ..ListFilter::default()
                };
                let mut found: BTreeMap<u32, ExecutionId> = BTreeMap::new();
                for r in self.engine.list(&filter).await? {
                    if let Some(i) = r.task.labels.get(LABEL_UNIT).and_then(|i| i.parse().ok()) {
                        let e = found.entry(i).or_insert(r.id);
                        *e = (*e).min(r.id);
                    }
                }
                let missing: Vec<u32> = units
                    .iter()
                    .filter(|u| u.execution.is_none() && !found.contains_key(&u.index))
                    .map(|u| u.index)
                    .collect();
                if let Some(list) = self.units.get_mut(&step) {
                    for u in list.iter_mut() {
                        if u.execution.is_none()
                            && let Some(id) = found.get(&u.index)
                        {
                            u.execution = Some(*id);
                            u.state = UnitState::Running;
                            self.dirty.insert(Key::Unit(step.clone(), u.index));
                        }
                    }
                }
                if !missing.is_empty() {
                    tracing::info!(run = %run, step = %step, units = missing.len(), "submitting step tasks that were never stored");
                    self.submit_units(&step, &missing).await;
                }
            }
            for u in self.units.get(&step).cloned().unwrap_or_default() {
                if let (Some(id), UnitState::Running) = (u.execution, u.state) {
                    self.follow(&step, u.index, generation, id);
                }
            }
            // A step whose units all ended but whose end was not recorded.
            self.settle(&step);
        }
        Ok(())
    }

    fn satisfied(&self, dep: &str) -> bool {
        let d = &self.steps[dep];
        d.state == StepState::Succeeded
            || (matches!(d.state, StepState::Failed | StepState::Cancelled)
                && self.spec(dep).on_failure == OnFailure::Continue)
    }

    fn stopping(&self) -> bool {
        self.steps.iter().any(|(n, d)| {
            matches!(d.state, StepState::Failed | StepState::Cancelled)
                && self.spec(n).on_failure == OnFailure::Stop
        })
    }

    /// Starts every step whose dependencies are over, and ends the run when nothing is left.
    async fn advance(&mut self) -> Result<(), WorkflowError> {
        if self.run.state == RunState::Running && !self.stopping() {
            let order: Vec<String> = self
                .run
                .spec
                .topological()
                .into_iter()
                .map(str::to_owned)
                .collect();
            for name in order {
                if self.steps[&name].state != StepState::Waiting {
                    continue;
                }
                let spec = self.spec(&name);
                if !spec.depends_on.iter().all(|d| self.satisfied(d)) {
                    continue;
                }
                self.start_step(&spec).await;
                if self.stopping() {
                    break;
                }
            }
        }
        if self.run.state.is_terminal() {
            return Ok(());
        }
        let stopping = self.stopping() || self.run.state == RunState::Cancelling;
        if stopping {
            // Nothing new starts: approvals stop waiting, waiting steps will never run.
            let idle: Vec<String> = self
                .steps
                .iter()
                .filter(|(_, d)| {
                    matches!(d.state, StepState::Waiting | StepState::AwaitingApproval)
                })
                .map(|(n, _)| n.clone())
                .collect();
            for n in idle {
                let cancelled = self.run.state == RunState::Cancelling
                    && self.steps[&n].state == StepState::AwaitingApproval;
                self.set_step(
                    &n,
                    if cancelled {
                        StepState::Cancelled
                    } else {
                        StepState::NotRun
                    },
                );
            }
        }
        if self.steps.values().all(|d| d.state.is_terminal()) {
            let end = if self.run.state == RunState::Cancelling {
                RunState::Cancelled
            } else if self.stopping() {
                RunState::Failed
            } else {
                RunState::Succeeded
            };
            self.set_run(end);
        }
        Ok(())
    }

    fn scope_value(&self, dep: &str) -> StepValue {
        let d = &self.steps[dep];
        StepValue {
            state: d.state.as_str().to_owned(),
            result: if d.state == StepState::Succeeded {
                d.result.clone().unwrap_or(Value::Null)
            } else {
                Value::Null
            },
        }
    }

    fn fail_step(&mut self, step: &str, error: String) {
        tracing::warn!(run = %self.run.id, step, error = %error, "workflow step failed");
        let d = self.steps.get_mut(step).expect("known step");
        d.error = Some(error);
        self.set_step(step, StepState::Failed);
    }

    async fn start_step(&mut self, spec: &StepSpec) {
        let name = spec.name.clone();
        {
            let d = self.steps.get_mut(&name).expect("known step");
            d.error = None;
            d.result = None;
        }
        if spec.approval.is_some() {
            self.steps.get_mut(&name).expect("known step").units = 0;
            self.set_step(&name, StepState::AwaitingApproval);
            return;
        }
        let index = self
            .run
            .spec
            .steps
            .iter()
            .position(|s| s.name == name)
            .unwrap_or(0);
        let deps: Vec<(String, StepValue)> = spec
            .depends_on
            .iter()
            .map(|d| (d.clone(), self.scope_value(d)))
            .collect();
        let mut scope = Scope {
            params: Some(&self.run.params),
            run_id: &self.run.id.0,
            run_name: &self.run.spec.name,
            ..Scope::default()
        };
        for (d, v) in &deps {
            scope.steps.insert(d.as_str(), v.clone());
        }
        let items: Option<Vec<Value>> = match &spec.for_each {
            None => None,
            Some(fe) => match scope.render(fe, &format!("/steps/{index}/for_each")) {
                Ok(Value::Array(a)) => Some(a),
                Ok(other) => {
                    let msg = format!(
                        "/steps/{index}/for_each: expected an array, got {}",
                        short(&other)
                    );
                    self.fail_step(&name, msg);
                    return;
                }
                Err((p, m)) => {
                    self.fail_step(&name, format!("{p}: {m}"));
                    return;
                }
            },
        };
        let payload = spec.payload.clone().unwrap_or(json!({}));
        let mut units = Vec::new();
        let generation = self.steps[&name].generation;
        let now = self.now();
        let list: Vec<Option<Value>> = match items {
            None => vec![None],
            Some(a) => a.into_iter().map(Some).collect(),
        };
        for (i, item) in list.into_iter().enumerate() {
            // Render now so that a bad reference fails the step before anything is submitted.
            let rendered = {
                let mut sc = scope.clone();
                sc.item = item.as_ref();
                sc.render(&payload, &format!("/steps/{index}/payload"))
                    .map(|_| ())
            };
            if let Err((p, m)) = rendered {
                self.fail_step(&name, format!("{p}: {m}"));
                return;
            }
            units.push(UnitDoc {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                generation,
                item,
                state: UnitState::Submitting,
                execution: None,
                last_execution: None,
                result: None,
                error: None,
                started_at: Some(now),
                finished_at: None,
            });
        }
        let n = u32::try_from(units.len()).unwrap_or(u32::MAX);
        self.steps.get_mut(&name).expect("known step").units = n;
        for u in &units {
            self.dirty.insert(Key::Unit(name.clone(), u.index));
        }
        self.units.insert(name.clone(), units);
        self.set_step(&name, StepState::Running);
        if n == 0 {
            self.steps.get_mut(&name).expect("known step").result = Some(json!([]));
            self.set_step(&name, StepState::Succeeded);
            return;
        }
        // The intent (units Submitting) is durable before anything is submitted: a crash
        // after the submit is found again by the executions' labels.
        if let Err(e) = self.flush().await {
            tracing::error!(run = %self.run.id, step = %name, error = %e, "cannot record step; not submitting");
            return;
        }
        let all: Vec<u32> = (0..n).collect();
        self.submit_units(&name, &all).await;
    }

    /// Renders and submits the given units of `step` (all in one engine transaction).
    async fn submit_units(&mut self, step: &str, which: &[u32]) {
        let spec = self.spec(step);
        let index = self
            .run
            .spec
            .steps
            .iter()
            .position(|s| s.name == step)
            .unwrap_or(0);
        let generation = self.steps[step].generation;
        let deps: Vec<(String, StepValue)> = spec
            .depends_on
            .iter()
            .map(|d| (d.clone(), self.scope_value(d)))
            .collect();
        let units = self.units.get(step).cloned().unwrap_or_default();
        let mut tasks = Vec::with_capacity(which.len());
        {
            let mut scope = Scope {
                params: Some(&self.run.params),
                run_id: &self.run.id.0,
                run_name: &self.run.spec.name,
                ..Scope::default()
            };
            for (d, v) in &deps {
                scope.steps.insert(d.as_str(), v.clone());
            }
            let payload = spec.payload.clone().unwrap_or(json!({}));
            for &i in which {
                let Some(u) = units.get(i as usize) else {
                    continue;
                };
                scope.item = u.item.as_ref();
                let rendered = match scope.render(&payload, &format!("/steps/{index}/payload")) {
                    Ok(v) => v,
                    Err((p, m)) => {
                        drop(scope);
                        self.fail_step(step, format!("{p}: {m}"));
                        return;
                    }
                };
                let mut task = Task::new(spec.distributor.clone().unwrap_or_default(), rendered);
                task.retry = RetryPolicy::attempts(spec.retries.saturating_add(1));
                task.timeouts = Timeouts {
                    start: spec.timeouts.start.as_deref().and_then(parse_duration),
                    run: spec.timeouts.run.as_deref().and_then(parse_duration),
                    stop: None,
                };
                task.labels = spec.labels.clone().into_iter().collect();
                task.labels.insert(LABEL_RUN.into(), self.run.id.0.clone());
                task.labels.insert(LABEL_STEP.into(), step.to_owned());
                task.labels.insert(LABEL_UNIT.into(), i.to_string());
                task.labels.insert(LABEL_GEN.into(), generation.to_string());
                tasks.push((i, task));
            }
        }
        let (idx, tasks): (Vec<u32>, Vec<Task>) = tasks.into_iter().unzip();
        match self.engine.submit_many(tasks).await {
            Ok(ids) => {
                for (i, id) in idx.into_iter().zip(ids) {
                    if let Some(u) = self.units.get_mut(step).and_then(|l| l.get_mut(i as usize)) {
                        u.execution = Some(id);
                        u.state = UnitState::Running;
                    }
                    self.dirty.insert(Key::Unit(step.to_owned(), i));
                    self.follow(step, i, generation, id);
                }
            }
            Err(e) => {
                let msg = match &e {
                    distributor_core::Error::Validation(v) => {
                        let mut v = v.clone();
                        for x in &mut v.violations {
                            x.pointer = format!("/steps/{index}/payload{}", x.pointer);
                        }
                        v.to_string()
                    }
                    other => other.to_string(),
                };
                for i in idx {
                    if let Some(u) = self.units.get_mut(step).and_then(|l| l.get_mut(i as usize)) {
                        u.state = UnitState::Failed;
                        u.error = Some(msg.clone());
                    }
                    self.dirty.insert(Key::Unit(step.to_owned(), i));
                }
                self.fail_step(step, format!("not submitted: {msg}"));
            }
        }
    }

    /// Ends a running step whose units are all over.
    fn settle(&mut self, step: &str) {
        if self.steps[step].state != StepState::Running {
            return;
        }
        let units = self.units.get(step).cloned().unwrap_or_default();
        if units
            .iter()
            .any(|u| matches!(u.state, UnitState::Submitting | UnitState::Running))
        {
            return;
        }
        let spec = self.spec(step);
        if let Some(bad) = units.iter().find(|u| u.state != UnitState::Succeeded) {
            let cancelled = bad.state == UnitState::Cancelled;
            let err = match spec.for_each {
                Some(_) => format!(
                    "item {} failed: {}",
                    bad.index,
                    bad.error.clone().unwrap_or_default()
                ),
                None => bad.error.clone().unwrap_or_default(),
            };
            self.steps.get_mut(step).expect("known step").error = Some(err);
            self.set_step(
                step,
                if cancelled {
                    StepState::Cancelled
                } else {
                    StepState::Failed
                },
            );
            return;
        }
        let result = match spec.for_each {
            Some(_) => Value::Array(
                units
                    .iter()
                    .map(|u| u.result.clone().unwrap_or(Value::Null))
                    .collect(),
            ),
            None => units
                .first()
                .and_then(|u| u.result.clone())
                .unwrap_or(Value::Null),
        };
        self.steps.get_mut(step).expect("known step").result = Some(result);
        self.set_step(step, StepState::Succeeded);
    }

    async fn handle(&mut self, m: Msg, replies: &mut Vec<Reply>) {
        match m {
            Msg::Done {
                step,
                index,
                generation,
                rec,
            } => {
                if self
                    .steps
                    .get(&step)
                    .is_none_or(|d| d.generation != generation)
                {
                    return; // an earlier generation's task
                }
                let now = self.now();
                let Some(u) = self
                    .units
                    .get_mut(&step)
                    .and_then(|l| l.get_mut(index as usize))
                else {
                    return;
                };
                u.finished_at = Some(now);
                match rec {
                    Ok(r) => {
                        u.last_execution = Some(r.id);
                        match (&r.state, &r.outcome) {
                            (State::Succeeded, Some(Outcome::Succeeded { data })) => {
                                u.state = UnitState::Succeeded;
                                u.result = Some(data.clone());
                            }
                            (State::Abnormal(AbnormalKind::Cancelled), o) => {
                                u.state = UnitState::Cancelled;
                                u.error = Some(reason(o.as_ref(), "cancelled"));
                            }
                            (st, o) => {
                                u.state = UnitState::Failed;
                                u.error = Some(reason(o.as_ref(), st.as_str()));
                            }
                        }
                    }
                    Err(e) => {
                        u.state = UnitState::Failed;
                        u.error = Some(e);
                    }
                }
                self.dirty.insert(Key::Unit(step.clone(), index));
                self.settle(&step);
            }
            Msg::Cancel(r) => {
                let res = if self.run.state.is_terminal() {
                    Err(WorkflowError::Conflict(format!(
                        "run {} is already {}",
                        self.run.id,
                        self.run.state.as_str()
                    )))
                } else {
                    if self.run.state != RunState::Cancelling {
                        self.set_run(RunState::Cancelling);
                    }
                    let mut res = Ok(());
                    let live: Vec<ExecutionId> = self
                        .units
                        .values()
                        .flatten()
                        .filter(|u| u.state == UnitState::Running)
                        .filter_map(|u| u.execution)
                        .collect();
                    for id in live {
                        if let Err(e) = self.cancel_task(id).await {
                            res = Err(e);
                        }
                    }
                    res
                };
                replies.push((r, res));
            }
            Msg::Approve(step, by, r) => {
                let res = match self.steps.get(&step).map(|d| d.state) {
                    None => Err(WorkflowError::UnknownStep {
                        run: self.run.id.0.clone(),
                        step,
                    }),
                    Some(StepState::AwaitingApproval) => {
                        let now = self.now();
                        let d = self.steps.get_mut(&step).expect("known step");
                        d.result = Some(json!({"approved_by": by, "approved_at": now.0}));
                        self.set_step(&step, StepState::Succeeded);
                        Ok(())
                    }
                    Some(s) => Err(WorkflowError::Conflict(format!(
                        "step `{step}` is {}, not awaiting approval",
                        s.as_str()
                    ))),
                };
                replies.push((r, res));
            }
            Msg::Rerun(step, r) => {
                let res = self.rerun(&step);
                replies.push((r, res));
            }
            Msg::Poke(r) => {
                let live: Vec<ExecutionId> = self
                    .units
                    .values()
                    .flatten()
                    .filter(|u| u.state == UnitState::Running)
                    .filter_map(|u| u.execution)
                    .collect();
                let mut res = Ok(());
                for id in live {
                    let poked = match self.current(id).await {
                        Ok(cur) => self.engine.poke(cur).await.map_err(WorkflowError::from),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = poked {
                        res = Err(e);
                    }
                }
                self.changed.push(WorkflowEvent::Poked {
                    run: self.run.id.clone(),
                });
                self.dirty.insert(Key::Run);
                replies.push((r, res));
            }
        }
    }

    /// The task's current attempt: follows retries from its first execution.
    async fn current(&self, mut id: ExecutionId) -> Result<ExecutionId, WorkflowError> {
        loop {
            let rec = self.engine.get(id).await?;
            match rec.retried_by {
                Some(next) if rec.state.is_terminal() => id = next,
                _ => return Ok(id),
            }
        }
    }

    async fn cancel_task(&self, id: ExecutionId) -> Result<(), WorkflowError> {
        let id = self.current(id).await?;
        self.engine
            .cancel(id, format!("workflow run {} cancelled", self.run.id))
            .await?;
        Ok(())
    }

    fn rerun(&mut self, step: &str) -> Result<(), WorkflowError> {
        let Some(state) = self.steps.get(step).map(|d| d.state) else {
            return Err(WorkflowError::UnknownStep {
                run: self.run.id.0.clone(),
                step: step.to_owned(),
            });
        };
        if self.run.state == RunState::Cancelling {
            return Err(WorkflowError::Conflict(format!(
                "run {} is being cancelled",
                self.run.id
            )));
        }
        if !matches!(state, StepState::Failed | StepState::Cancelled) {
            return Err(WorkflowError::Conflict(format!(
                "step `{step}` is {}; only a failed or cancelled step can be re-run",
                state.as_str()
            )));
        }
        let mut reset: Vec<String> = vec![step.to_owned()];
        reset.extend(self.run.spec.descendants(step));
        for s in &reset {
            let live = self.steps[s].state == StepState::Running;
            if live {
                continue; // a descendant still running (after a continue) keeps its tasks
            }
            let d = self.steps.get_mut(s).expect("known step");
            if d.state == StepState::Waiting {
                continue;
            }
            d.generation += 1;
            d.units = 0;
            d.result = None;
            d.error = None;
            d.started_at = None;
            d.finished_at = None;
            self.units.remove(s);
            self.set_step(s, StepState::Waiting);
        }
        // Steps that never ran because the run stopped get their chance again too.
        let not_run: Vec<String> = self
            .steps
            .iter()
            .filter(|(_, d)| d.state == StepState::NotRun)
            .map(|(n, _)| n.clone())
            .collect();
        for s in not_run {
            self.set_step(&s, StepState::Waiting);
        }
        if self.run.state != RunState::Running {
            self.set_run(RunState::Running);
        }
        Ok(())
    }
}

fn reason(o: Option<&Outcome>, fallback: &str) -> String {
    match o {
        Some(Outcome::Abnormal { kind, reason }) => format!("{}: {reason}", kind.as_str()),
        _ => fallback.to_owned(),
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}…", &s[..s.floor_char_boundary(60)])
    } else {
        s
    }
}
