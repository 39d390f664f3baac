#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod api;
mod backend;
mod config;
mod core;
mod error;
mod job;
mod v0038;

pub use backend::SlurmDistributor;
pub use config::{ApiVersion, SbatchOptions, SlurmConfig, SlurmPayload, TokenSource};

distributor_core::reexports::inventory::submit!(distributor_core::Registration::of::<SlurmConfig>());
