//! The balancer node.

pub mod agent;
pub mod cluster;
pub mod config;
pub mod conntrack;
pub mod control;
pub mod dataplane;
pub mod error;
pub mod feedback;
pub mod health;
pub mod node;
pub mod peers;
pub mod persist;
pub mod sched;
pub mod setup;
pub mod shed;
pub mod stats;
pub mod sync;

pub use config::Config;
pub use error::{ConfigError, ConfigErrorKind, Error, Result};
pub use stats::{DropReason, Stats, StatusSnapshot};
