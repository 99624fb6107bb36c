//! The parts of the `bench` program (`src/bin/bench.rs`): backends, load
//! generators, the compared paths, `/proc` readings and the report. They
//! live in the binary, not in the `netns_tests` library.

pub mod paths;
pub mod procfs;
pub mod report;
pub mod servers;
pub mod udp;
pub mod wrk;
