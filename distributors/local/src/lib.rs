#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

#[cfg(not(unix))]
compile_error!("distributor-local supports Unix only (process groups, signals, fork)");

mod backend;
mod config;
mod core;
mod error;
mod supervisor;

pub use backend::LocalDistributor;
pub use config::{LocalConfig, LocalPayload};

distributor_core::reexports::inventory::submit!(distributor_core::Registration::of::<LocalConfig>());
