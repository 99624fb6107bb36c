//! Load feedback from agents on the real servers (feedbackd / NECP) and
//! autoscaling (the DVS service proxy's load levels and rules).
//!
//! - [`necp`]: the wire format, HMAC and replay gate (pure).
//! - [`session`]: master and agent session state machines (pure).
//! - [`smooth`]: health -> weight, `w = a*max(1,h) + (1-a)*w_prev` (pure).
//! - [`levels`]: UNLOADED / LOADED / SATURATED with hysteresis (pure).
//! - [`autoscale`]: scale-up / scale-down rules (pure).
//! - [`master`]: the tokio task in the node that accepts agents, publishes
//!   weights to [`crate::Stats`] and runs the autoscale commands.

pub mod autoscale;
pub mod levels;
pub mod master;
pub mod necp;
pub mod session;
pub mod smooth;
