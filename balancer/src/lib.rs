//! The balancer node.
