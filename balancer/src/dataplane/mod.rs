//! The forwarding path: frame I/O on the front and back NICs, the TUN into
//! the node's own stack, the back-segment neighbour table, and the engine
//! that decides what happens to each frame.

pub mod engine;
pub mod hold;
pub mod neigh;
pub mod ring;
pub mod syncio;
pub mod tun;
pub mod view;
