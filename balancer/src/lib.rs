//! The balancer node.

pub mod dataplane;
