//! kiln-core: the engine behind the API. It owns the state database, the sandboxes' directories and their
//! VMs (through kiln-vmm) and guest agents (through kiln-agent-client), and serialises lifecycle operations
//! per sandbox while letting different sandboxes proceed in parallel.

mod balloon;
mod capacity;
pub mod config;
pub mod confine;
pub mod console;
mod create;
pub mod db;
mod deadline;
pub mod dirs;
pub mod diskfloor;
pub mod doctor;
pub mod engine;
pub mod error;
pub mod events;
pub mod faults;
pub mod fork;
pub mod fsutil;
mod guest;
pub mod headroom;
pub mod ids;
pub mod layout;
mod lifecycle;
pub mod lifetime;
mod machine;
pub mod metrics;
pub mod model;
pub mod net;
pub mod operations;
pub mod ports;
mod procs;
pub mod ramdir;
mod recovery;
pub mod remote;
pub mod snapshot;
mod template_fit;
mod template_gc;
pub mod template_snap;
mod timing;
pub mod validate;
mod vm;
pub mod volume;
mod warm;

pub use config::Config;
pub use doctor::{DoctorReport, Problem};
pub use engine::{CreateSandbox, Engine, ExecSpec};
pub use error::{Error, ErrorCode, Result};
pub use fork::{ForkRequest, ForkResult};
/// A file or tar streamed out of a guest, chunk by chunk (answers of `read_file` and `download_dir`).
pub use kiln_agent_client::FileDownload;
pub use lifetime::checkpoint::{CheckpointPolicy, Rewind, SetCheckpointPolicy};
pub use lifetime::{Lifetime, OnTimeout, SetTimeout};
pub use model::{PortMapping, PortRequest, Sandbox, SandboxState};
pub use operations::{Operation, OperationError, OperationState, Resources};
pub use snapshot::capture::CreateSnapshot;
pub use snapshot::delete::SnapshotDeleted;
pub use snapshot::restore::ResumeSnapshot;
pub use snapshot::{Snapshot, SnapshotType};
pub use volume::{CreateVolume, Volume, VolumeMount};

pub use kiln_agent_client as agent;

/// Whether `sb` is one of kiln's own machines (a warm spare, or a machine booted to make a template
/// snapshot) rather than a sandbox a client made: such machines are not listed and never hold a template.
pub fn is_internal_sandbox(sb: &Sandbox) -> bool {
    warm::is_spare(sb) || template_snap::is_builder(sb)
}
