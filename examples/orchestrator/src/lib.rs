#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

// Force-link every adapter crate so that their `inventory` registrations are in the binary
// (rust-lang/rust#64731): a crate no code names is not linked.
use distributor_jobs as _;
use distributor_local as _;
use distributor_slurm as _;
use distributor_switch as _;

pub mod api;
pub mod client;
pub mod config;
pub mod duration;
pub mod openapi;
mod page;
pub mod run;
pub mod security;
pub mod serve;
pub mod switch;
pub mod taskfile;
pub mod workflow;
pub mod workflow_http;
mod workflow_page;

pub use config::{OrchestratorConfig, StoreLocation, registry};
pub use run::{Progress, RunReport, TaskResult, run};
pub use security::{ApiTokens, Scope, Security};
pub use serve::{Limits, router, routes, serve};
pub use taskfile::{TaskFile, TaskFileError, TaskSpec};
