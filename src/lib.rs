//! Agora: a matching runtime for exchanges. `book` is the pure order book, `wire` the wire
//! format, `replay`/`workload`/`fuzzing` the offline tools; with the `runtime` feature
//! (default), `bus`, `actors`, `cluster`, `config`, `query`, `node` and `web` (the page) make up the NATS-driven runtime, `client`
//! talks to it, and `bench` measures it end to end.

#[cfg(feature = "runtime")]
pub mod actors;
#[cfg(feature = "runtime")]
pub mod bench;
pub mod book;
#[cfg(feature = "runtime")]
pub mod bus;
#[cfg(feature = "runtime")]
pub mod client;
#[cfg(feature = "runtime")]
#[macro_use]
pub mod cluster;
#[cfg(feature = "runtime")]
pub mod config;
#[cfg(feature = "runtime")]
pub mod control;
pub mod fuzzing;
#[cfg(feature = "runtime")]
pub mod history;
#[cfg(feature = "runtime")]
pub mod node;
#[cfg(feature = "runtime")]
pub mod query;
pub mod replay;
#[cfg(feature = "runtime")]
pub mod telemetry;
#[cfg(feature = "runtime")]
pub mod web;
pub mod wire;
pub mod workload;

/// The version and the commit it was built from, as `agora --version` prints them
/// (`0.1.0 (commit 1a2b3c4d5e6f)`).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("AGORA_COMMIT"),
    ")"
);

/// The commit the binary was built from ("unknown" without a git checkout or `AGORA_COMMIT`).
pub const COMMIT: &str = env!("AGORA_COMMIT");
