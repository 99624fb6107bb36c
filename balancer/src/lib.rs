//! The balancer node.

pub mod conntrack;
pub mod sched;
