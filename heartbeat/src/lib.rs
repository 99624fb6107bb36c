//! VRRPv3 (RFC 5798) election and membership heartbeats.
//!
//! Pure parts (no I/O, no clock): [`vrrp::wire`], [`vrrp::state`],
//! [`vrrp::group`], [`member`], [`arp`] (decision and frame building).
//! Drivers (I/O): [`driver`] runs the protocol on its own OS thread.
pub mod arp;
pub mod config;
pub mod control;
pub mod driver;
pub mod member;
pub mod vrrp;
