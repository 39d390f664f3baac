#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod backend;
mod config;
mod core;
mod error;

pub use backend::HttpGetDistributor;
pub use config::{HttpGetConfig, HttpGetPayload};

// Registration: the registry finds the kind in any binary that links this crate. Binaries and
// tests that use it MUST name the crate (`use custom_adapter as _;`), or the linker drops it
// together with this line (rust-lang/rust#64731).
distributor_core::reexports::inventory::submit!(
    distributor_core::Registration::of::<HttpGetConfig>()
);
