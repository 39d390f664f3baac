#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod config;
mod distributor;
mod error;
mod registry;
mod schema;
mod types;

pub use config::{ConfigHash, DistributorsConfig, InstanceConfig};
pub use distributor::Distributor;
pub use error::{
    BoxError, ConfigError, ConfigProblem, Error, NotificationRejection, Result, ValidationError,
    Violation, nearest,
};
pub use registry::{
    BuildContext, DeferredQueue, Instance, Kind, KindConfig, Notifier, Registration, Registry,
};
pub use schema::SchemaValidator;
pub use types::*;

/// Re-exports adapter crates need in their registration and derive code.
pub mod reexports {
    pub use async_trait::async_trait;
    pub use inventory;
    pub use schemars;
}
