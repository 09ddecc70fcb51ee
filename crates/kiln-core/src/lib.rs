//! kiln-core: the engine behind the API. It owns the state database, the sandboxes' directories and their
//! VMs (through kiln-vmm) and guest agents (through kiln-agent-client), and serialises lifecycle operations
//! per sandbox while letting different sandboxes proceed in parallel.

pub mod config;
pub mod db;
pub mod engine;
pub mod error;
pub mod ids;
pub mod model;
pub mod validate;
mod vm;

pub use config::Config;
pub use engine::{CreateSandbox, Engine, ExecSpec};
pub use error::{Error, ErrorCode, Result};
pub use model::{PortMapping, Sandbox, SandboxState};

pub use kiln_agent_client as agent;
