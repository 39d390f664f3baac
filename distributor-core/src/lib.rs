#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod config;
mod distributor;
pub mod engine;
mod error;
pub mod push;
mod registry;
mod schema;
mod secret;
mod state;
pub mod store;
mod types;

#[cfg(feature = "testing")]
pub mod testing;

pub use config::{ConfigHash, DistributorsConfig, InstanceConfig};
pub use distributor::Distributor;
pub use engine::{
    Engine, EngineBuilder, Event, ExecutionRecord, RetryPolicy, Settings, State, Task,
};
pub use error::{
    BoxError, ConfigError, ConfigProblem, Error, NotificationRejection, Result, ValidationError,
    Violation, nearest,
};
pub use registry::{
    BuildContext, DeferredQueue, Instance, Kind, KindConfig, Notifier, Registration, Registry,
};
pub use schema::SchemaValidator;
pub use secret::Secret;
pub use state::InstanceState;
pub use types::*;

/// Re-exports adapter crates need in their registration and derive code.
pub mod reexports {
    pub use async_trait::async_trait;
    pub use inventory;
    pub use schemars;
}
