//! The fhirmesh binary's library half: configuration and the composition of services, shared by
//! `main.rs` and by tests that run the real wiring in-process.

pub mod buses;
pub mod config;
pub mod ig;
mod metered;
pub mod provision;
pub mod reindex;
pub mod serve;
pub mod stores;
pub mod tools;

pub use config::{Config, Overrides};
pub use serve::{Running, Target};
