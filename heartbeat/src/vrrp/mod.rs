//! VRRPv3 (RFC 5798): wire format, state machine, sync groups.
pub mod group;
pub mod state;
pub mod wire;
