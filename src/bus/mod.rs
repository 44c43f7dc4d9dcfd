//! Everything NATS: subject names, connections, JetStream streams and KV buckets, and the
//! local `nats-server` that tests (and a node started without a NATS URL) run.
//!
//! The wire format of the messages themselves is in `crate::wire`; the rules of matching are
//! in `crate::book`. This module must never decide anything about an order: it moves bytes
//! and reports, in words an operator can act on, what went wrong with NATS.

pub mod acks;
pub mod connect;
pub mod error;
pub mod feed;
pub mod follow;
pub mod journal;
pub mod landed;
pub mod outputs;
pub mod responder;
pub mod server;
pub mod snapshots;
pub mod streams;
pub mod subjects;

pub use connect::{NatsOptions, closing, connect_with, redact};
pub use error::BusError;
pub use feed::{Delivered, Feed, Pull, PullCap, RangeReader};
pub use follow::KvFollower;
pub use journal::Journal;
pub use responder::{Responder, subscribe_flushed};
pub use server::LocalServer;
pub use snapshots::{SnapshotBlob, SnapshotStore};
pub use streams::{
    BucketEntry, Buckets, StreamSettings, bucket_entries, bucket_keys, connect,
    detach_market_stream, ensure_buckets, ensure_core_streams, ensure_market_stream,
};
pub use subjects::Subjects;
