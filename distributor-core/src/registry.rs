//! The registry of kinds: which adapter builds which config type.
//!
//! Adapter crates register themselves at link time:
//!
//! ```text
//! inventory::submit!(distributor_core::Registration::of::<LocalConfig>());
//! ```
//!
//! and [`Registry::from_inventory`] collects every registration linked into the binary.
//!
//! # The force-link rule
//!
//! rustc links only the crates a final artifact refers to (rust-lang/rust#64731): an adapter crate
//! that is a dependency but never named is not linked, and its registration silently disappears.
//! Every binary, integration test file and doctest that needs an adapter MUST name it, for
//! example with `use distributor_local as _;`. Linking is transitive, so one crate that names every
//! adapter can be named instead.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::config::{ConfigHash, DistributorsConfig};
use crate::distributor::Distributor;
use crate::error::{Error, Result, ValidationError, nearest};
use crate::schema::SchemaValidator;
use crate::state::InstanceState;
use crate::types::{DeferredWork, DistributorName, ExecutionId, KindName, Notification};

/// A kind's config type. Implement it on the config struct of an adapter crate.
///
/// The config and payload types derive `serde::Deserialize` and `schemars::JsonSchema` (with
/// `#[serde(deny_unknown_fields)]`, so that typos are caught); their JSON Schemas are derived from
/// them and compiled once. No hand-written schemas.
#[async_trait]
pub trait KindConfig: DeserializeOwned + Serialize + JsonSchema + Send + Sync + 'static {
    /// The kind name: the registry key and the `kind` field in distributor configs.
    const KIND: &'static str;

    /// The payload type of tasks for this kind.
    type Payload: DeserializeOwned + JsonSchema;

    /// Builds a distributor instance from a validated config.
    ///
    /// Errors: a permanent error means the config cannot work (the engine refuses to start with
    /// it); a transient one means the backend is unreachable right now (the engine retries).
    async fn build(self, ctx: BuildContext) -> Result<Arc<dyn Distributor>>;

    /// Checks of a config document beyond its JSON Schema that need the registry: a kind whose
    /// config embeds other kinds' configs (a kind that routes between two distributors) validates them
    /// here against their own kinds, naming each problem by a JSON Pointer into *this* document
    /// (`/before/url`). Runs at load ([`DistributorsConfig`] and
    /// [`Kind::validate_config_in`]), after the schema check passed, before any factory. It MUST
    /// NOT do I/O. The default accepts everything the schema accepts.
    fn validate_config(config: &Value, registry: &Registry) -> Result<(), ValidationError> {
        let _ = (config, registry);
        Ok(())
    }
}

/// What a factory receives besides its config.
#[derive(Debug, Clone)]
pub struct BuildContext {
    /// The instance's name.
    pub name: DistributorName,
    /// Schedules deferred work on the engine's durable timer queue; it comes back through
    /// `handle_deferred`.
    pub deferred: DeferredQueue,
    /// Pushes notifications into the engine in-process (for adapters whose work reports back to
    /// this process: local supervisors, an embedded jobs server). Pushes MUST carry the
    /// execution's `auth_token` attribute; the engine authenticates them like any other.
    pub notifier: Notifier,
    /// The instance's durable values in the engine's store (see [`InstanceState`]); in memory
    /// for a [`detached`](Self::detached) context.
    pub state: InstanceState,
    /// The registry the instance is built from, for kinds that build other kinds' instances
    /// inside themselves (see [`BuildContext::child`]).
    pub registry: Registry,
}

impl BuildContext {
    /// A context for building an instance outside an engine (tests, tools): deferred work is
    /// dropped.
    pub fn detached(name: impl Into<DistributorName>) -> Self {
        let name = name.into();
        let name_for_state = name.to_string();
        Self {
            name,
            deferred: DeferredQueue::detached(),
            notifier: Notifier::detached(),
            state: InstanceState::in_memory(&name_for_state),
            registry: Registry::new(),
        }
    }

    /// A detached context whose registry is `registry` (tools and tests that build a kind
    /// which builds other kinds inside itself).
    pub fn detached_with(name: impl Into<DistributorName>, registry: Registry) -> Self {
        Self {
            registry,
            ..Self::detached(name)
        }
    }

    /// The context for an instance built inside this one under `scope` (one side of a
    /// kind that routes between two): the same deferred queue, notifier and registry (deferred work and pushes are
    /// attributed to this instance, which routes them), the name `<name>/<scope>`, and the
    /// state scoped under `<scope>/`.
    pub fn child(&self, scope: &str) -> Self {
        Self {
            name: DistributorName::new(format!("{}/{scope}", self.name)),
            deferred: self.deferred.clone(),
            notifier: self.notifier.clone(),
            state: self.state.scoped(scope),
            registry: self.registry.clone(),
        }
    }
}

/// An in-process channel into the engine's notification path.
#[derive(Clone)]
pub struct Notifier {
    sink: Sink,
}

type PushFn = dyn Fn(ExecutionId, Notification) -> bool + Send + Sync;

#[derive(Clone)]
enum Sink {
    Detached,
    Channel(mpsc::UnboundedSender<(ExecutionId, Notification)>),
    Func(Arc<PushFn>),
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sink = match &self.sink {
            Sink::Detached => "detached",
            Sink::Channel(_) => "channel",
            Sink::Func(_) => "function",
        };
        f.debug_struct("Notifier").field("sink", &sink).finish()
    }
}

impl Notifier {
    /// A notifier feeding `tx` (test harnesses that want to see what an adapter pushes).
    pub fn new(tx: mpsc::UnboundedSender<(ExecutionId, Notification)>) -> Self {
        Self {
            sink: Sink::Channel(tx),
        }
    }
    /// A notifier calling `f` on the pusher's own thread (the engine's side: it authenticates
    /// the push there and hands it to the engine without an extra task in between). `f` returns
    /// whether anything is listening; it MUST NOT block.
    pub fn from_fn(f: impl Fn(ExecutionId, Notification) -> bool + Send + Sync + 'static) -> Self {
        Self {
            sink: Sink::Func(Arc::new(f)),
        }
    }
    /// A notifier that drops everything (outside an engine).
    pub fn detached() -> Self {
        Self {
            sink: Sink::Detached,
        }
    }
    /// Pushes `notification` about `execution`. Returns false if no engine is listening.
    /// Delivery is best effort: the engine's polling is the hedge for anything lost.
    pub fn send(&self, execution: ExecutionId, notification: Notification) -> bool {
        match &self.sink {
            Sink::Detached => false,
            Sink::Channel(tx) => tx.send((execution, notification)).is_ok(),
            Sink::Func(f) => f(execution, notification),
        }
    }
}

/// A handle to the engine's durable timer queue for one distributor instance.
#[derive(Debug, Clone)]
pub struct DeferredQueue {
    name: Option<DistributorName>,
    tx: Option<mpsc::UnboundedSender<(DistributorName, DeferredWork)>>,
}

impl DeferredQueue {
    /// A queue feeding `tx`, tagged with the instance name (the engine's side).
    pub fn new(
        name: DistributorName,
        tx: mpsc::UnboundedSender<(DistributorName, DeferredWork)>,
    ) -> Self {
        Self {
            name: Some(name),
            tx: Some(tx),
        }
    }
    /// A queue that drops everything.
    pub fn detached() -> Self {
        Self {
            name: None,
            tx: None,
        }
    }
    /// Schedules `work`. Returns false if no engine is listening (the work is dropped).
    pub fn schedule(&self, work: DeferredWork) -> bool {
        match (&self.name, &self.tx) {
            (Some(n), Some(tx)) => tx.send((n.clone(), work)).is_ok(),
            _ => false,
        }
    }
}

/// Builds an instance; returns it with the config as the snapshot stores it (deserialized into
/// the kind's type and serialized again, so [`Secret`](crate::Secret) literals are redacted).
type Factory = fn(Value, BuildContext) -> BoxFuture<'static, Result<(Arc<dyn Distributor>, Value)>>;

/// One kind's entry: what `inventory::submit!` carries. Build it with [`Registration::of`].
#[derive(Clone, Copy)]
pub struct Registration {
    kind: &'static str,
    config_schema: fn() -> SchemaValidator,
    payload_schema: fn() -> SchemaValidator,
    factory: Factory,
    check: fn(&Value, &Registry) -> Result<(), ValidationError>,
    snapshot: fn(&Value) -> Result<Value>,
}

inventory::collect!(Registration);

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Registration {
    /// The registration of config type `C`. `const`, so it can go in `inventory::submit!`.
    pub const fn of<C: KindConfig>() -> Self {
        Self {
            kind: C::KIND,
            config_schema: SchemaValidator::of::<C>,
            payload_schema: SchemaValidator::of::<C::Payload>,
            factory: factory::<C>,
            check: C::validate_config,
            snapshot: snapshot_of::<C>,
        }
    }

    /// The kind name.
    pub fn kind(&self) -> &'static str {
        self.kind
    }
}

fn factory<C: KindConfig>(
    config: Value,
    ctx: BuildContext,
) -> BoxFuture<'static, Result<(Arc<dyn Distributor>, Value)>> {
    Box::pin(async move {
        let name = ctx.name.clone();
        let config: C = serde_json::from_value(config).map_err(|e| {
            Error::permanent(format!(
                "config of distributor `{name}` (kind `{}`): {e}",
                C::KIND
            ))
        })?;
        let snapshot = serde_json::to_value(&config).map_err(|e| {
            Error::permanent(format!(
                "config of distributor `{name}` (kind `{}`) cannot be serialized for its \
                 snapshot: {e}",
                C::KIND
            ))
        })?;
        let built = config
            .build(ctx)
            .await
            .map_err(|e| in_instance(e, &name, C::KIND))?;
        Ok((built, snapshot))
    })
}

/// A config as the kind's type serializes it (secret literals redacted).
fn snapshot_of<C: KindConfig>(config: &Value) -> Result<Value> {
    let typed: C = serde_json::from_value(config.clone())
        .map_err(|e| Error::permanent(format!("config of kind `{}`: {e}", C::KIND)))?;
    serde_json::to_value(&typed).map_err(|e| {
        Error::permanent(format!(
            "config of kind `{}` cannot be serialized for its snapshot: {e}",
            C::KIND
        ))
    })
}

/// Prefixes a factory's error with the instance it was building (`distributor `hpc` (kind
/// `slurm`): …`), keeping whether it is transient.
fn in_instance(e: Error, name: &DistributorName, kind: &str) -> Error {
    let prefix = format!("distributor `{name}` (kind `{kind}`)");
    match e {
        Error::Transient { message, source } => Error::Transient {
            message: format!("{prefix}: {message}"),
            source,
        },
        Error::Permanent { message, source } => Error::Permanent {
            message: format!("{prefix}: {message}"),
            source,
        },
        Error::Validation(mut v) => {
            v.subject = format!("{prefix}: {}", v.subject);
            Error::Validation(v)
        }
        other => other,
    }
}

/// A registered kind with its compiled schemas.
#[derive(Debug, Clone)]
pub struct Kind {
    registration: Registration,
    config_schema: SchemaValidator,
    payload_schema: SchemaValidator,
}

impl Kind {
    /// The kind name.
    pub fn name(&self) -> KindName {
        KindName::new(self.registration.kind)
    }
    /// The JSON Schema of its config.
    pub fn config_schema(&self) -> &Value {
        self.config_schema.schema()
    }
    /// The JSON Schema of its payloads.
    pub fn payload_schema(&self) -> &Value {
        self.payload_schema.schema()
    }
    /// Checks a config document (without `kind`) against the kind's config schema.
    pub fn validate_config(&self, subject: &str, config: &Value) -> Result<(), ValidationError> {
        self.config_schema.validate(subject, config)
    }
    /// Checks a config document (without `kind`) against the kind's config schema and then its
    /// [`KindConfig::validate_config`] checks, which may look up other kinds in `registry`.
    /// What [`DistributorsConfig`] runs at load.
    pub fn validate_config_in(
        &self,
        registry: &Registry,
        subject: &str,
        config: &Value,
    ) -> Result<(), ValidationError> {
        self.config_schema.validate(subject, config)?;
        (self.registration.check)(config, registry).map_err(|mut e| {
            if e.subject.is_empty() {
                e.subject = subject.to_owned();
            }
            e
        })
    }
    /// The config as an execution snapshot stores it: deserialized into the kind's type and
    /// serialized again, so [`Secret`](crate::Secret) literals come out redacted. A kind whose
    /// config embeds other kinds' configs (as JSON values) calls this on each of them in its
    /// own serialization, or their secrets reach the snapshot in clear text.
    ///
    /// Errors (permanent): the config does not deserialize into the kind's type.
    pub fn snapshot(&self, config: &Value) -> Result<Value> {
        (self.registration.snapshot)(config)
    }

    /// Checks a payload against the kind's payload schema.
    pub fn validate_payload(&self, payload: &Value) -> Result<(), ValidationError> {
        self.payload_schema.validate(
            &format!("payload for kind `{}`", self.registration.kind),
            payload,
        )
    }
    /// Builds an instance from a config that passed [`validate_config`](Self::validate_config).
    ///
    /// The instance keeps the config as deserialized into the kind's type and serialized again
    /// (defaults filled in, [`Secret`](crate::Secret) literals redacted): that is what
    /// [`Instance::config`] returns and what execution records store as their snapshot.
    /// Errors from the factory name the instance and the kind.
    pub async fn build(
        &self,
        config: Value,
        ctx: BuildContext,
        hash: ConfigHash,
    ) -> Result<Instance> {
        let name = ctx.name.clone();
        let (distributor, snapshot) = (self.registration.factory)(config, ctx).await?;
        let inner = InstanceInner {
            name,
            kind: self.clone(),
            config: Arc::new(snapshot),
            hash,
            distributor,
        };
        Ok(Instance {
            inner: Arc::new(inner),
        })
    }
}

/// A built distributor instance with its kind, config snapshot and payload validator.
#[derive(Debug, Clone)]
pub struct Instance {
    inner: Arc<InstanceInner>,
}

#[derive(Debug)]
struct InstanceInner {
    name: DistributorName,
    kind: Kind,
    config: Arc<Value>,
    hash: ConfigHash,
    distributor: Arc<dyn Distributor>,
}

impl Instance {
    /// The instance name.
    pub fn name(&self) -> &DistributorName {
        &self.inner.name
    }
    /// Its kind.
    pub fn kind(&self) -> &Kind {
        &self.inner.kind
    }
    /// The config it was built from, as its snapshot stores it (secret literals redacted; see
    /// [`Kind::build`]).
    pub fn config(&self) -> &Value {
        &self.inner.config
    }
    /// The config, shared (execution records keep it as their snapshot).
    pub fn shared_config(&self) -> Arc<Value> {
        self.inner.config.clone()
    }
    /// The config's content hash.
    pub fn config_hash(&self) -> &ConfigHash {
        &self.inner.hash
    }
    /// The adapter.
    pub fn distributor(&self) -> &Arc<dyn Distributor> {
        &self.inner.distributor
    }
    /// Validates a payload: the kind's schema first (every violation, with pointers), then the
    /// adapter's own semantic checks.
    pub fn validate(&self, payload: &Value) -> Result<(), ValidationError> {
        self.inner.kind.validate_payload(payload)?;
        self.inner.distributor.validate(payload)
    }
}

/// Kinds by name.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Kind>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every registration linked into this binary (see the module docs on force-linking).
    /// Errors with [`Error::DuplicateKind`] if two crates register the same kind.
    pub fn from_inventory() -> Result<Self> {
        let mut r = Self::new();
        for reg in inventory::iter::<Registration> {
            r.add(*reg)?;
        }
        Ok(r)
    }

    /// Adds config type `C` (for tests and embedders that do not use inventory).
    pub fn register<C: KindConfig>(mut self) -> Result<Self> {
        self.add(Registration::of::<C>())?;
        Ok(self)
    }

    /// Adds a registration. Errors with [`Error::DuplicateKind`] if the kind is taken.
    pub fn add(&mut self, reg: Registration) -> Result<()> {
        if self.kinds.contains_key(reg.kind) {
            return Err(Error::DuplicateKind(KindName::new(reg.kind)));
        }
        let kind = Kind {
            registration: reg,
            config_schema: (reg.config_schema)(),
            payload_schema: (reg.payload_schema)(),
        };
        self.kinds.insert(reg.kind, kind);
        Ok(())
    }

    /// The kind named `kind`, or [`Error::UnknownKind`] listing the known ones and the nearest.
    pub fn kind(&self, kind: &str) -> Result<&Kind> {
        self.kinds.get(kind).ok_or_else(|| Error::UnknownKind {
            kind: kind.to_owned(),
            known: self.kind_names(),
            suggestion: nearest(kind, self.kinds.keys().copied()),
        })
    }

    /// The registered kind names, sorted.
    pub fn kind_names(&self) -> Vec<KindName> {
        self.kinds.keys().map(|k| KindName::new(*k)).collect()
    }

    /// All kinds.
    pub fn kinds(&self) -> impl Iterator<Item = &Kind> {
        self.kinds.values()
    }

    /// Builds every instance of a (validated) config. Aliases map to their target's instance.
    pub async fn build_all(
        &self,
        config: &DistributorsConfig,
        deferred: impl Fn(&DistributorName) -> DeferredQueue,
        notifier: &Notifier,
    ) -> Result<BTreeMap<DistributorName, Instance>> {
        self.build_all_with(config, deferred, notifier, |n| {
            InstanceState::in_memory(n.as_str())
        })
        .await
    }

    /// As [`build_all`](Self::build_all), with each instance's durable state from `state` (the
    /// engine passes handles into its store).
    pub async fn build_all_with(
        &self,
        config: &DistributorsConfig,
        deferred: impl Fn(&DistributorName) -> DeferredQueue,
        notifier: &Notifier,
        state: impl Fn(&DistributorName) -> InstanceState,
    ) -> Result<BTreeMap<DistributorName, Instance>> {
        let mut out = BTreeMap::new();
        for (name, inst) in config.instances() {
            let kind = self.kind(inst.kind.as_str())?;
            let ctx = BuildContext {
                name: name.clone(),
                deferred: deferred(name),
                notifier: notifier.clone(),
                state: state(name),
                registry: self.clone(),
            };
            out.insert(
                name.clone(),
                kind.build(inst.config.clone(), ctx, inst.hash.clone())
                    .await?,
            );
        }
        for (alias, target) in config.aliases() {
            if let Some(i) = out.get(target).cloned() {
                out.insert(alias.clone(), i);
            }
        }
        Ok(out)
    }
}
