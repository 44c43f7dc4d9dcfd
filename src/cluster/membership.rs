//! Membership: each node's record in `<prefix>_nodes`, renewed every heartbeat with its load,
//! and how the others read that bucket.
//!
//! A renewal acknowledged by JetStream extends the node's lease to the time it was sent plus
//! three quarters of `lease`; the others declare the node dead only after `lease` without
//! seeing a renewal, so a node stops publishing before its markets are given away. With
//! `load_every` set, the record (and its load) is written at most that often, and at the next
//! heartbeat when the markets it runs or follows change; the renewals between are a few dozen bytes at `alive.<node>`,
//! which count for the record of the same instance. The same bucket holds the rebalancer's
//! lease (`lease.rebalancer`; node ids have no dots).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::Addr;
use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{ClusterSettings, Lease};
use crate::actors::{ListMarkets, ListMarketsBrief, Supervisor};

/// The key of the rebalancer's lease in the nodes bucket.
pub const REBALANCER_KEY: &str = "lease.rebalancer";

/// Where a node renews between writes of its record when `load_every` is set.
pub const ALIVE_PREFIX: &str = "alive.";

/// The key of `node`'s renewals without load.
pub fn alive_key(node: &str) -> String {
    format!("{ALIVE_PREFIX}{node}")
}

/// The node whose renewal `key` is, if it is one.
pub fn renewed_node(key: &str) -> Option<&str> {
    key.strip_prefix(ALIVE_PREFIX)
}

/// A renewal without load (`alive.<node>`): it keeps alive the record of the same instance,
/// and no other (a restarted node is known by its record first).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewal {
    pub node: String,
    pub instance: u64,
}

/// Why the heartbeat is failing, if it is: shared with the HTTP probes, so `/ready` can say
/// why a node runs nothing (NATS's own error, such as "no space left on device").
#[derive(Clone, Debug, Default)]
pub struct HeartbeatStatus(std::sync::Arc<std::sync::Mutex<Option<(Instant, String)>>>);

impl HeartbeatStatus {
    /// Since when and why renewals fail; `None` while they succeed.
    pub fn failing(&self) -> Option<(Duration, String)> {
        let guard = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        guard
            .as_ref()
            .map(|(since, why)| (since.elapsed(), why.clone()))
    }

    fn set(&self, failing: Option<(Instant, String)>) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = failing;
    }
}

/// An error with every cause under it (`failed to put: ... : insufficient resources`), since
/// the cause is often what tells the operator what to do.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
}

/// What a node says about itself every heartbeat.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node: String,
    /// Random per process: tells a restarted node (or a second process misconfigured with the
    /// same id) from the one before.
    pub instance: u64,
    pub started_unix_ms: u64,
    pub commands_per_sec: f64,
    /// CPU of the process, percent of one core, over the last heartbeat.
    pub cpu_pct: f64,
    pub markets: Vec<MarketLoad>,
    /// Markets of which this node keeps a warm copy.
    #[serde(default)]
    pub following: Vec<String>,
    /// Markets this node prefers to run (`cluster.prefer`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefers: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MarketLoad {
    pub symbol: String,
    pub epoch: u64,
    pub last_seq: u64,
    pub commands_per_sec: f64,
    pub resting_orders: usize,
    pub halted: bool,
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What the supervisor says runs here: with every market's figures, or (`figures` false) only
/// which markets run, at which epochs, and which are followed.
#[derive(Clone, Debug, Default)]
struct Load {
    markets: Vec<MarketLoad>,
    following: Vec<String>,
    figures: bool,
}

/// The node's load as the supervisor knows it; without `figures`, from the supervisor's own
/// list, no market asked.
async fn load(supervisor: &Addr<Supervisor>, figures: bool) -> Load {
    let markets = if figures {
        supervisor.send(ListMarkets).await
    } else {
        supervisor.send(ListMarketsBrief).await
    }
    .unwrap_or_default();
    let following = markets
        .iter()
        .filter(|m| m.following && !m.running)
        .map(|m| m.symbol.clone())
        .collect();
    let running = markets
        .into_iter()
        .filter(|m| m.running)
        .map(|m| {
            let stats = m.stats.unwrap_or_default();
            MarketLoad {
                symbol: m.symbol,
                epoch: m.epoch,
                last_seq: m.last_seq,
                commands_per_sec: stats.commands_per_sec,
                resting_orders: stats.resting_orders,
                halted: stats.halted,
            }
        })
        .collect();
    Load {
        markets: running,
        following,
        figures,
    }
}

/// Asks the supervisor for the node's load each time `wanted` changes (with the figures when
/// it holds true), until `stop`, and sends it to `latest`. Apart from the renewals: a market
/// busy recovering or matching a large batch answers late, and a lease must never wait for
/// that (a lapse stops every market here, whose restarts load the node further, so the
/// renewals would lapse again). Requests made while one is answered are answered together.
async fn watch_load(
    supervisor: Addr<Supervisor>,
    mut wanted: watch::Receiver<bool>,
    latest: watch::Sender<Load>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            asked = wanted.changed() => if asked.is_err() { break },
        }
        let figures = *wanted.borrow_and_update();
        let now = tokio::select! {
            _ = stop.changed() => break,
            now = load(&supervisor, figures) => now,
        };
        if latest.send(now).is_err() {
            break;
        }
    }
}

/// Renews the node's record every heartbeat until `stop`, extending `lease` on each
/// acknowledged renewal; then deletes the record, so the others see the node leave at once.
/// A renewal waits at most half a heartbeat for a fresh load (`watch_load`); then it goes with
/// the last one known.
pub async fn heartbeat(
    nodes: kv::Store,
    node: String,
    supervisor: Addr<Supervisor>,
    lease: Lease,
    settings: ClusterSettings,
    status: HeartbeatStatus,
    mut stop: watch::Receiver<bool>,
) {
    let healthy = metrics::gauge!("matching_node_heartbeat_ok");
    let failures = metrics::counter!("matching_node_heartbeat_failures_total");
    failures.increment(0);
    let instance = {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t ^ (u64::from(std::process::id()) << 32)
    };
    let started_unix_ms = unix_ms();
    let mut timer = tokio::time::interval(settings.heartbeat);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut cpu = (
        Instant::now(),
        crate::telemetry::process::cpu_ms(None).unwrap_or(0.0),
    );
    let mut cpu_pct = 0.0;
    let mut failing_since: Option<Instant> = None;
    let (want, wanted) = watch::channel(true);
    let (latest, mut known) = watch::channel(Load::default());
    let loads = actix_rt::spawn(watch_load(supervisor, wanted, latest, stop.clone()));
    let light = !settings.load_every.is_zero();
    let alive = alive_key(&node);
    // When the record was last written, and what it said beyond its figures. Between records
    // each heartbeat asks only what runs here; a change (a move, a new warm copy) makes the
    // next heartbeat write the record.
    let mut written: Option<(Instant, Shape)> = None;
    let mut changed = false;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = timer.tick() => {}
        }
        let due = !light
            || changed
            || written
                .as_ref()
                .is_none_or(|(at, _)| at.elapsed() >= settings.load_every);
        // A fresh load if it comes within half a heartbeat; else the last one known.
        want.send_modify(|figures| *figures = due);
        let _ = tokio::time::timeout(settings.heartbeat / 2, known.changed()).await;
        let Load {
            markets,
            following,
            figures,
        } = known.borrow_and_update().clone();
        let shape = Shape::of(&markets, &following);
        let with_load = !light || (due && figures);
        if !with_load && written.as_ref().is_some_and(|(_, was)| *was != shape) {
            changed = true;
        }
        // CPU over at least a second (the kernel counts it in 10 ms ticks).
        let now = Instant::now();
        if now.duration_since(cpu.0) >= Duration::from_secs(1) {
            let used = crate::telemetry::process::cpu_ms(None).unwrap_or(cpu.1);
            let wall = now.duration_since(cpu.0).as_secs_f64();
            cpu_pct = ((used - cpu.1) / 10.0 / wall).max(0.0);
            cpu = (now, used);
        }
        let record = NodeRecord {
            node: node.clone(),
            instance,
            started_unix_ms,
            // + 0.0: an empty sum of floats is -0.0, which would print as "-0.0".
            commands_per_sec: markets.iter().map(|m| m.commands_per_sec).sum::<f64>() + 0.0,
            cpu_pct,
            markets,
            following,
            prefers: settings.prefer.clone(),
        };
        let (key, bytes) = if with_load {
            (&node, serde_json::to_vec(&record))
        } else {
            let renewal = Renewal {
                node: node.clone(),
                instance,
            };
            (&alive, serde_json::to_vec(&renewal))
        };
        let bytes = bytes.unwrap_or_default();
        let sent = Instant::now();
        match tokio::time::timeout(settings.lease, nodes.put(key, bytes.into())).await {
            Ok(Ok(_)) => {
                lease.extend_to(sent + settings.own_lease());
                if with_load {
                    written = Some((sent, shape));
                    changed = false;
                }
                healthy.set(1.0);
                if let Some(since) = failing_since.take() {
                    status.set(None);
                    tracing::warn!(node = %node, "heartbeat renewed after {:?}; the node takes markets again", since.elapsed());
                }
            }
            failed => {
                let reason = match failed {
                    Ok(Err(e)) => error_chain(&e),
                    _ => format!("NATS did not answer within {:?}", settings.lease),
                };
                failures.increment(1);
                healthy.set(0.0);
                // Said when it starts and again when the reason changes, not every heartbeat.
                let changed = status.failing().is_none_or(|(_, was)| was != reason);
                let since = *failing_since.get_or_insert_with(Instant::now);
                if changed {
                    tracing::error!(node = %node, "heartbeat not renewed: {reason}; while it fails this node runs no markets (they stop once its lease lapses, {:?} from now)", lease.remaining());
                    status.set(Some((since, reason)));
                }
            }
        }
    }
    loads.abort();
    let _ = nodes.delete(&node).await;
    if light {
        let _ = nodes.delete(&alive).await;
    }
}

/// What a node record says beyond its figures: the markets run (at which epoch) and followed,
/// which the supervisor knows without asking them.
#[derive(Debug, PartialEq)]
struct Shape {
    running: Vec<(String, u64)>,
    following: Vec<String>,
}

impl Shape {
    fn of(markets: &[MarketLoad], following: &[String]) -> Shape {
        Shape {
            running: markets
                .iter()
                .map(|m| (m.symbol.clone(), m.epoch))
                .collect(),
            following: following.to_vec(),
        }
    }
}

/// The nodes bucket as one node sees it: every record, and when it was last seen renewed by
/// this process's clock (records are only ever compared with this clock, never with another
/// node's).
#[derive(Clone, Debug, Default)]
pub struct NodeView {
    pub records: BTreeMap<String, (NodeRecord, Instant)>,
}

impl NodeView {
    /// Takes one entry of a watch on the bucket.
    pub fn apply(&mut self, entry: &kv::Entry) {
        if let Some(node) = renewed_node(&entry.key) {
            if entry.operation == kv::Operation::Put {
                self.renewed(node, &entry.value);
            }
            return;
        }
        if entry.key.contains('.') {
            return;
        }
        match entry.operation {
            kv::Operation::Put => {
                if let Ok(record) = serde_json::from_slice::<NodeRecord>(&entry.value) {
                    self.records
                        .insert(entry.key.clone(), (record, Instant::now()));
                }
            }
            kv::Operation::Delete | kv::Operation::Purge => {
                self.records.remove(&entry.key);
            }
        }
    }

    /// A renewal without load: `node`'s record, if of the same instance, is seen now.
    pub fn renewed(&mut self, node: &str, value: &[u8]) {
        let Ok(renewal) = serde_json::from_slice::<Renewal>(value) else {
            return;
        };
        if let Some((record, seen)) = self.records.get_mut(node)
            && record.instance == renewal.instance
        {
            *seen = Instant::now();
        }
    }

    /// Nodes renewed within `lease`.
    pub fn live(&self, lease: Duration) -> impl Iterator<Item = &NodeRecord> {
        self.live_at(Instant::now(), lease)
    }

    pub fn is_live(&self, node: &str, lease: Duration) -> bool {
        self.is_live_at(Instant::now(), node, lease)
    }

    /// Nodes renewed within `lease` before `now`: a node counts as dead once a whole lease
    /// passed without a renewal.
    pub fn live_at(&self, now: Instant, lease: Duration) -> impl Iterator<Item = &NodeRecord> {
        self.records
            .values()
            .filter(move |(_, seen)| now.saturating_duration_since(*seen) < lease)
            .map(|(r, _)| r)
    }

    /// The first instant after `now` at which a node now live counts as dead (its last renewal
    /// plus `lease`), if one is live: the rebalancer wakes then rather than at its next
    /// heartbeat, so a failover starts a whole lease after the last renewal, not up to a
    /// heartbeat later.
    pub fn next_expiry(&self, now: Instant, lease: Duration) -> Option<Instant> {
        self.records
            .values()
            .map(|(_, seen)| *seen + lease)
            .filter(|at| *at > now)
            .min()
    }

    pub fn is_live_at(&self, now: Instant, node: &str, lease: Duration) -> bool {
        self.records
            .get(node)
            .is_some_and(|(_, seen)| now.saturating_duration_since(*seen) < lease)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(node: &str, instance: u64) -> NodeRecord {
        NodeRecord {
            node: node.into(),
            instance,
            started_unix_ms: 0,
            commands_per_sec: 0.0,
            cpu_pct: 0.0,
            markets: Vec::new(),
            following: Vec::new(),
            prefers: Vec::new(),
        }
    }

    #[test]
    fn a_renewal_keeps_alive_only_the_record_of_its_instance() {
        let lease = Duration::from_millis(500);
        let long_ago = Instant::now() - Duration::from_secs(2);
        let mut view = NodeView::default();
        view.records
            .insert("n1".into(), (record("n1", 7), long_ago));
        view.records
            .insert("n2".into(), (record("n2", 8), long_ago));
        assert_eq!(view.live(lease).count(), 0);
        let renewal = |node: &str, instance| {
            serde_json::to_vec(&Renewal {
                node: node.into(),
                instance,
            })
            .expect("json")
        };
        // A renewal of another instance (the node before a restart) does not count; nor does a
        // value that is not a renewal; nor a renewal of a node without a record.
        view.renewed("n1", &renewal("n1", 6));
        view.renewed("n1", b"{\"node\": 1}");
        view.renewed("n3", &renewal("n3", 9));
        assert!(!view.is_live("n1", lease));
        assert!(!view.records.contains_key("n3"));
        view.renewed("n1", &renewal("n1", 7));
        assert!(view.is_live("n1", lease));
        assert!(!view.is_live("n2", lease));
        assert_eq!(renewed_node(&alive_key("n2")), Some("n2"));
        assert_eq!(renewed_node("n2"), None);
        assert_eq!(renewed_node(REBALANCER_KEY), None);
    }

    #[test]
    fn a_record_is_written_again_when_what_it_runs_changes() {
        let load = |symbol: &str, epoch, halted| MarketLoad {
            symbol: symbol.into(),
            epoch,
            last_seq: 10,
            commands_per_sec: 5.0,
            resting_orders: 3,
            halted,
        };
        let base = Shape::of(&[load("A-USD", 1, false)], &[]);
        // Figures (a halt among them) wait for the next load.
        let mut busier = load("A-USD", 1, true);
        busier.commands_per_sec = 900.0;
        busier.last_seq = 5000;
        assert_eq!(Shape::of(&[busier], &[]), base);
        // A new epoch (a move), another market or a warm copy go with the next heartbeat.
        assert_ne!(Shape::of(&[load("A-USD", 2, false)], &[]), base);
        assert_ne!(
            Shape::of(&[load("A-USD", 1, false), load("B-USD", 1, false)], &[]),
            base
        );
        assert_ne!(
            Shape::of(&[load("A-USD", 1, false)], &["B-USD".into()]),
            base
        );
    }
}
