//! Tests of what users run, as they run it, in one binary (one link instead of seven): the
//! Rust client, the control plane from the shell, NATS permissions, the Python example, a
//! slow consumer, traces into a collector, and `agora bench`. Each starts real servers
//! (nats-server, `agora node`) on free loopback ports.

#[path = "../common/mod.rs"]
mod common;

mod bench;
mod client;
mod control;
mod permissions;
mod python_example;
mod python_sdk;
mod slow_consumer;
mod traces;
