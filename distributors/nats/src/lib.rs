#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod backend;
mod config;
mod core;
mod error;
pub mod wire;
pub mod worker;

pub use backend::NatsDistributor;
pub use config::{Credentials, Layout, NatsConfig, NatsPayload, TaskTypeConfig};
pub use core::Records;
pub use error::NatsError;
pub use worker::{Activation, JobContext, JobFailure, Lease, Worker, WorkerOptions};

/// The async-nats client this crate is built on (for tests and tools that talk to the broker).
pub use async_nats;

distributor_core::reexports::inventory::submit!(distributor_core::Registration::of::<NatsConfig>());
