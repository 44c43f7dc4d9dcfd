//! The cluster: which node runs which market, and moving markets between nodes. The contract
//! is in `docs/protocol.md` ("Cluster records") and `docs/operations.md`; every decision about ownership is a compare-and-set result on the
//! placement bucket, never a read.
//!
//! - `Lease` (kept in `actors::lease`, where markets check it before every journal publish):
//!   a node's right to publish for its markets, extended by each acknowledged heartbeat.
//! - `membership`: the node's heartbeat record in `<prefix>_nodes` (with its load), and what
//!   the others read from that bucket.
//! - `placement`: the records of `<prefix>_placement` (market → node, epoch, state) and the
//!   choice of a node for a market (rendezvous hashing, least loaded).
//! - `agent`: on every node, claims the markets placed on it, starts and stops them, keeps warm
//!   copies for planned moves, and answers the node's own requests (`<prefix>.node.<id>.*`).
//! - `rebalancer`: on one node at a time (a lease in the nodes bucket): places new markets,
//!   reassigns the markets of dead nodes, drains, and moves hot markets off busy nodes.
//! - `handoff`: the planned move of one market, driven by whoever asks (`market.move`, the
//!   rebalancer).
//!
//! This module must never apply a command or publish a market's outputs: markets do, and only
//! while this node's claim and lease hold.

use std::time::Duration;

/// `println!` for operator lines that never panics (see `say`).
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::cluster::say(format_args!($($arg)*))
    };
}

pub mod agent;
pub mod handoff;
pub mod membership;
pub mod placement;
pub mod plan;
pub mod rebalancer;

/// The node's lease lives with the markets that check it (`actors::lease`); the cluster
/// extends it.
pub use crate::actors::Lease;

/// How the cluster's timers are set (`[cluster]` in the configuration).
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// A node renews its record this often.
    pub heartbeat: Duration,
    /// A node not heard from for this long is dead; a node whose last renewal is older stops
    /// publishing.
    pub lease: Duration,
    /// Load-based moves are considered this often (zero: never).
    pub rebalance_every: Duration,
    /// The busiest node's commands/s over the mean that counts as overloaded.
    pub imbalance_ratio: f64,
    /// Commands/s between the busiest and the least busy node below which nothing moves.
    pub min_rate_gap: f64,
    /// Planned moves the rebalancer starts per minute, at most.
    pub max_moves_per_minute: u32,
    /// Warm copies per market on other nodes (0 or 1).
    pub standbys: u32,
    /// Markets this node prefers to run (static placement): while it lives, the rebalancer
    /// places them here, and moves them back here after a failover.
    pub prefer: Vec<String>,
    /// How long a node that prefers a market must have been live before the market moves
    /// back to it (hysteresis: a node that flaps does not drag markets back and forth).
    pub failback_after: Duration,
    /// How often the node's record is written with its load (zero: at every renewal). Between
    /// those, renewals go to `alive.<node>` and carry no load: a node of thousands of markets
    /// writes a few dozen bytes a heartbeat instead of its whole record. Every node of the
    /// cluster must read such renewals (this build and later) before one writes them.
    pub load_every: Duration,
}

impl ClusterSettings {
    /// How long a record stays in the nodes bucket without renewal (the bucket's max age):
    /// well above the lease, so a dead node is seen as dead (by age) before its record goes.
    pub fn record_ttl(&self) -> Duration {
        (self.lease * 4).max(Duration::from_secs(3))
    }

    /// The part of the lease a node uses: it stops a quarter lease before the others may
    /// declare it dead, for clocks that run at slightly different rates.
    pub fn own_lease(&self) -> Duration {
        self.lease * 3 / 4
    }
}

impl Default for ClusterSettings {
    fn default() -> ClusterSettings {
        ClusterSettings {
            heartbeat: Duration::from_millis(100),
            lease: Duration::from_millis(500),
            rebalance_every: Duration::from_secs(10),
            imbalance_ratio: 1.5,
            min_rate_gap: 5000.0,
            max_moves_per_minute: 6,
            standbys: 0,
            prefer: Vec::new(),
            failback_after: Duration::from_secs(30),
            load_every: Duration::ZERO,
        }
    }
}

/// A line for the operator on stdout; a closed stdout (the reader went away) is not an error
/// worth stopping a node for.
pub(crate) fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if crate::telemetry::traces::log_json() {
        // The same shape as the JSON log lines, so one parser reads both streams.
        let object = serde_json::json!({
            "timestamp": crate::telemetry::traces::rfc3339(std::time::SystemTime::now()),
            "level": "INFO",
            "target": "agora",
            "message": line.to_string(),
        });
        let _ = writeln!(out, "{object}");
    } else {
        let _ = out.write_fmt(line);
        let _ = out.write_all(b"\n");
    }
    let _ = out.flush();
}
