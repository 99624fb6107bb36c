//! VRRPv3 (RFC 5798) election and membership heartbeats.
