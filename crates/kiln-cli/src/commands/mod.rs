pub mod doctor;
pub mod exec;
pub mod files;
pub mod image;
pub mod sandbox;
pub mod serve;
pub mod snapshot;
pub mod token;
