//! Every test that starts real servers on one node, in one binary (one build and link instead
//! of fourteen): the bus against nats-server, a market actor and a node, the operator's paths
//! (`agora ctl`, `/metrics`, configuration errors), the history store on SQLite, PostgreSQL
//! and MariaDB, the web page in Chromium, the Rust client, the control plane from the shell,
//! NATS permissions, the Python example and SDK, a slow consumer, traces into a collector, and
//! `agora bench`. Each starts its servers (nats-server, `agora node`, the databases) on free
//! loopback ports with temporary data directories. The cluster (`tests/cluster/`), the book
//! (`tests/engine/`) and the allocation count (`tests/alloc.rs`, its own allocator) have
//! binaries of their own.

#[path = "../common/mod.rs"]
mod common;

mod bench;
mod bus;
mod client;
mod control;
mod history;
mod market;
mod node;
mod operate;
mod permissions;
mod python_example;
mod python_sdk;
mod slow_consumer;
mod traces;
mod web;
