#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod api;
mod backend;
#[cfg(feature = "worker")]
mod client;
mod config;
mod core;
mod error;
mod page;
mod queue;
mod store;
mod wire;

pub use backend::JobsServer;
#[cfg(feature = "worker")]
pub use client::{
    ClientError, Handler, JobContext, JobFailure, ShutdownPolicy, Worker, WorkerClient,
};
pub use config::{JobsConfig, JobsPayload, WorkerCredential};
pub use wire::{
    ActivateRequest, ApiError, ApiErrorDetail, ClaimManyRequest, ClaimManyResponse, ClaimRequest,
    ClaimResponse, ClaimedJob, CompleteItem, CompleteManyRequest, CompleteManyResponse,
    CompleteRequest, Disposition, ErrorCode, ErrorRequest, FinalReply, HeartbeatRequest, ItemReply,
    JobId, Lease, LeaseId, LeaseReply, MAX_BATCH, ReleaseRequest, UpdateRequest,
};

distributor_core::reexports::inventory::submit!(distributor_core::Registration::of::<JobsConfig>());
