//! The `switch` distributor: routes each task to `before` or `after` by its interval start and
//! the cutover, and sends every later call about an execution to the side that ran it.

use async_trait::async_trait;
use distributor_core::{
    AbnormalKind, AdapterHandle, BuildContext, Capabilities, ConfigHash, DeferredQueue,
    DeferredWork, Distributor, Error, Execution, Instance, KindConfig, Launch, Notification,
    Outcome, Result, Status, TaskDescription, Timestamp, ValidationError, Violation,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use url::Url;

use crate::config::{Side, SwitchConfig, check_side};
use crate::core::{Interval, Request, Router, interval_of};
use crate::error::SwitchError;

/// Version of the launch handle layout.
const HANDLE_VERSION: u32 = 1;

/// What the switch keeps in each execution's handle: the side that ran it, the interval it
/// covers, and that side's own handle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SwitchHandle {
    side: Side,
    interval: Interval,
    inner: AdapterHandle,
}

/// A `switch` distributor instance. Built from a [`SwitchConfig`].
#[derive(Debug)]
pub struct SwitchDistributor {
    name: String,
    before: Instance,
    after: Instance,
    router: Router,
    caps: Capabilities,
}

impl SwitchDistributor {
    /// Builds both sides (from the context's registry, each with a child context: its state
    /// under `before/` or `after/`, its deferred work tagged with its side) and the router.
    ///
    /// Errors: a side's kind is not registered or its config is invalid (permanent, naming the
    /// field under `/before` or `/after`); a side's own build error.
    pub(crate) async fn build(config: SwitchConfig, ctx: BuildContext) -> Result<Self> {
        let mut violations = Vec::new();
        for side in Side::BOTH {
            let inner = config.side(side);
            check_side(
                side,
                &inner.kind,
                &inner.config,
                &ctx.registry,
                &mut violations,
            );
        }
        if !violations.is_empty() {
            return Err(Error::Validation(ValidationError {
                subject: format!("config of distributor `{}`", ctx.name),
                violations,
            }));
        }
        let before = build_side(&config, Side::Before, &ctx).await?;
        let after = build_side(&config, Side::After, &ctx).await?;
        let (b, a) = (
            before.distributor().capabilities(),
            after.distributor().capabilities(),
        );
        let caps = Capabilities {
            push_notifications: b.push_notifications || a.push_notifications,
            cancel: b.cancel || a.cancel,
            batch_status: b.batch_status || a.batch_status,
            recover: b.recover || a.recover,
            deferred: b.deferred || a.deferred,
        };
        Ok(Self {
            name: ctx.name.to_string(),
            router: Router::new(ctx.state.clone(), config.grid_secs, config.history_limit),
            before,
            after,
            caps,
        })
    }

    fn side(&self, side: Side) -> &Instance {
        match side {
            Side::Before => &self.before,
            Side::After => &self.after,
        }
    }

    /// The side and the side's view of an execution; `Ok(None)` for the empty handle (work
    /// this switch never launched).
    fn inner(&self, e: &Execution) -> Result<Option<(Side, Execution)>, SwitchError> {
        if e.handle.is_empty() {
            return Ok(None);
        }
        if e.handle.version != HANDLE_VERSION {
            return Err(SwitchError::Handle(format!(
                "version {} is not {HANDLE_VERSION}",
                e.handle.version
            )));
        }
        let h: SwitchHandle = serde_json::from_value(e.handle.data.clone())
            .map_err(|err| SwitchError::Handle(err.to_string()))?;
        let inner = Execution {
            payload: inner_payload(&e.payload),
            handle: h.inner,
            ..e.clone()
        };
        Ok(Some((h.side, inner)))
    }
}

async fn build_side(config: &SwitchConfig, side: Side, ctx: &BuildContext) -> Result<Instance> {
    let inner = config.side(side);
    let kind = ctx.registry.kind(&inner.kind)?;
    let value = inner.config_value();
    let hash = ConfigHash::of(&inner.kind, &value);
    let mut child = ctx.child(side.as_str());
    child.deferred = tag_deferred(side, &child, ctx.deferred.clone());
    kind.build(value, child, hash).await
}

/// A deferred queue for one side that tags its work with the side and forwards it to the
/// switch's own queue, so that it comes back to the switch's `handle_deferred`.
fn tag_deferred(side: Side, child: &BuildContext, outer: DeferredQueue) -> DeferredQueue {
    let (tx, mut rx) =
        mpsc::unbounded_channel::<(distributor_core::DistributorName, DeferredWork)>();
    tokio::spawn(async move {
        while let Some((_, work)) = rx.recv().await {
            let data = json!({ "side": side, "data": work.data });
            outer.schedule(DeferredWork { data, ..work });
        }
    });
    DeferredQueue::new(child.name.clone(), tx)
}

fn inner_payload(payload: &Value) -> Value {
    payload.get("payload").cloned().unwrap_or(Value::Null)
}

#[async_trait]
impl Distributor for SwitchDistributor {
    /// Decides the side (recording the hand-off durably first), then runs the inner payload
    /// there with the same request id, so the side's own dedupe makes a repeated `run` start
    /// nothing new; a repeat goes to the same side because its interval's side cannot change
    /// once recorded (see the crate docs).
    async fn run(&self, task: &TaskDescription) -> Result<Launch> {
        // The engine fills a missing start at submit (`prepare`); a direct caller gets now.
        let interval = interval_of(&task.payload, Timestamp::now())?;
        let route = self.router.route(interval).await?;
        let inner_task = TaskDescription {
            payload: inner_payload(&task.payload),
            ..task.clone()
        };
        let launch = self.side(route.side).distributor().run(&inner_task).await?;
        let handle = SwitchHandle {
            side: route.side,
            interval: route.interval,
            inner: launch.handle,
        };
        Ok(Launch {
            token: launch.token,
            handle: AdapterHandle {
                version: HANDLE_VERSION,
                data: serde_json::to_value(&handle)
                    .map_err(|e| Error::permanent_from("cannot encode the switch handle", e))?,
            },
            poll_interval: launch.poll_interval,
        })
    }

    async fn cancel(&self, execution: &Execution) -> Result<()> {
        match self.inner(execution) {
            Ok(Some((side, e))) => self.side(side).distributor().cancel(&e).await,
            // Never launched by this switch, or a handle it cannot read: nothing to stop here.
            Ok(None) | Err(_) => Ok(()),
        }
    }

    async fn status(&self, execution: &Execution) -> Result<Status> {
        match self.inner(execution)? {
            Some((side, e)) => self.side(side).distributor().status(&e).await,
            None => Ok(Status::Finished(Outcome::abnormal(
                AbnormalKind::Missing,
                format!(
                    "switch `{}` has no record of launching this work",
                    self.name
                ),
            ))),
        }
    }

    /// One `status_batch` per side, answers put back in input order.
    async fn status_batch(&self, executions: &[Execution]) -> Vec<Result<Status>> {
        let mut out: Vec<Option<Result<Status>>> = (0..executions.len()).map(|_| None).collect();
        let mut groups: [(Vec<usize>, Vec<Execution>); 2] = Default::default();
        for (i, e) in executions.iter().enumerate() {
            match self.inner(e) {
                Ok(Some((side, inner))) => {
                    let g = &mut groups[side as usize];
                    g.0.push(i);
                    g.1.push(inner);
                }
                Ok(None) => out[i] = Some(self.status(e).await),
                Err(err) => out[i] = Some(Err(err.into())),
            }
        }
        for side in Side::BOTH {
            let (idx, execs) = &groups[side as usize];
            if execs.is_empty() {
                continue;
            }
            let answers = self.side(side).distributor().status_batch(execs).await;
            for (slot, answer) in idx.iter().zip(answers) {
                out[*slot] = Some(answer);
            }
        }
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| Err(Error::permanent("the side gave no answer"))))
            .collect()
    }

    fn info_url(&self, execution: &Execution) -> Option<Url> {
        let (side, e) = self.inner(execution).ok()??;
        self.side(side).distributor().info_url(&e)
    }

    async fn handle_notification(
        &self,
        execution: &Execution,
        notification: &Notification,
    ) -> Result<Option<Status>> {
        match self.inner(execution) {
            Ok(Some((side, e))) => {
                self.side(side)
                    .distributor()
                    .handle_notification(&e, notification)
                    .await
            }
            Ok(None) | Err(_) => Ok(None),
        }
    }

    /// The interval start must mean a time, and the inner payload must be valid for both
    /// sides (schema and semantic checks), each problem named under `/payload`.
    fn validate(&self, payload: &Value) -> Result<(), ValidationError> {
        let mut violations: Vec<Violation> = Vec::new();
        if let Err(SwitchError::BadPayload { pointer, message }) =
            interval_of(payload, Timestamp(0))
        {
            violations.push(Violation {
                pointer,
                expected: "an RFC 3339 time or milliseconds since the epoch".into(),
                message,
                suggestion: None,
            });
        }
        let inner = inner_payload(payload);
        for side in Side::BOTH {
            if let Err(e) = self.side(side).validate(&inner) {
                for mut v in e.violations {
                    v.pointer = format!("/payload{}", v.pointer);
                    if !violations.contains(&v) {
                        violations.push(v);
                    }
                }
            }
        }
        if violations.is_empty() {
            Ok(())
        } else {
            Err(ValidationError {
                subject: format!("payload for kind `{}`", SwitchConfig::KIND),
                violations,
            })
        }
    }

    /// A task without `interval_start` covers its submit time, written into the payload so
    /// every attempt goes to the same side.
    fn prepare(&self, payload: &Value, submitted_at: Timestamp) -> Option<Value> {
        let obj = payload.as_object()?;
        if obj.get("interval_start").is_some_and(|v| !v.is_null()) {
            return None;
        }
        let mut obj = obj.clone();
        obj.insert("interval_start".into(), json!(submitted_at.0));
        Some(Value::Object(obj))
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    async fn recover(&self, execution: &Execution) -> Result<Status> {
        match self.inner(execution)? {
            Some((side, e)) => self.side(side).distributor().recover(&e).await,
            None => self.status(execution).await,
        }
    }

    async fn handle_deferred(&self, work: &DeferredWork) -> Result<Vec<Notification>> {
        let side: Side = work
            .data
            .get("side")
            .cloned()
            .and_then(|s| serde_json::from_value(s).ok())
            .ok_or_else(|| Error::permanent("switch deferred work without a side"))?;
        let inner = DeferredWork {
            data: work.data.get("data").cloned().unwrap_or(Value::Null),
            ..work.clone()
        };
        self.side(side).distributor().handle_deferred(&inner).await
    }

    /// Control requests (see the crate docs): `show`, `set`, `clear`.
    async fn control(&self, request: &Value) -> Result<Value> {
        let request = Request::parse(request)?;
        let mut answer = self.router.control(request, Timestamp::now().0).await?;
        if let Some(obj) = answer.as_object_mut() {
            obj.insert("name".into(), json!(self.name));
            obj.insert("kind".into(), json!(SwitchConfig::KIND));
            obj.insert("before".into(), json!(self.before.kind().name()));
            obj.insert("after".into(), json!(self.after.kind().name()));
        }
        Ok(answer)
    }
}
