//! Network-namespace test bed: a harness that builds hosts, bridges and
//! links in namespaces of its own, plus the integration tests, `drill` and
//! `bench` built on it. Everything needs root.

pub mod cgroup;
pub mod client;
pub mod cluster;
pub mod drill;
pub mod experiments;
pub mod single;
pub mod topo;
