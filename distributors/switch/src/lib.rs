#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod backend;
mod config;
mod core;
mod error;

pub use backend::SwitchDistributor;
pub use config::{InnerConfig, Side, SwitchConfig, SwitchPayload, TimeSpec};
pub use core::format_time;

distributor_core::reexports::inventory::submit!(
    distributor_core::Registration::of::<SwitchConfig>()
);
