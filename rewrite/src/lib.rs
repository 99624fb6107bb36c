//! Packet formats and rewrites for the balancer's dataplane. No I/O, no clock.

pub mod flow;

pub use flow::{FlowHasher, FlowKey};
