//! The conformance suite over every adapter, end-to-end and fault tests.
//!
//! This crate links every workspace adapter (the force-link rule, rust-lang/rust#64731), so tests
//! that need the full registry write `use distributor_tests as _;`.
#![deny(missing_docs)]

use distributor_jobs as _;
use distributor_local as _;
use distributor_nats as _;
use distributor_slurm as _;
use distributor_swarming as _;
use distributor_switch as _;
