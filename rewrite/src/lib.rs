//! Packet formats and rewrites for the balancer's dataplane. No I/O, no clock.
