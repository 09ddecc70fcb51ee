pub mod bundles;
pub mod checkpoints;
pub mod dirs;
pub mod doctor;
pub mod events;
pub mod exec;
pub mod files;
pub mod lifecycle;
pub mod operations;
pub mod ports;
pub mod processes;
pub mod remotes;
pub mod sandboxes;
pub mod snapshots;
pub mod system;
pub mod volumes;

use std::sync::Arc;

use kiln_core::Engine;

pub type AppState = Arc<Engine>;
