#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod backend;
mod config;
mod core;
mod error;
mod push;

pub use backend::SwarmingDistributor;
pub use config::{SwarmingConfig, SwarmingPayload, TokenSource};
pub use push::{PushError, decode_push};

distributor_core::reexports::inventory::submit!(
    distributor_core::Registration::of::<SwarmingConfig>()
);
