//! The rebalancer: every node runs one, and exactly one is active, the holder of the lease
//! `lease.rebalancer` in the nodes bucket (renewed by compare-and-set every heartbeat; taken
//! over by compare-and-set once it went a whole lease without renewal).
//!
//! The active one, every heartbeat:
//! - places markets that have a spec and no placement (seen so on two heartbeats in a row,
//!   leaving `market.add` the time to place them on the least loaded node) by rendezvous
//!   hashing over the live nodes not being drained;
//! - gives the markets of dead nodes (not heard from for a lease) to live ones at the next
//!   epoch (failover), by compare-and-set;
//! - moves the markets of drained nodes away, one planned handoff at a time;
//! - every `rebalance_every`, when one node has been overloaded three checks in a row, moves
//!   its hottest market that fits to the least busy node; at most `max_moves_per_minute`
//!   moves a minute, and a market moved is not moved again for five minutes.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use futures::StreamExt;
use tokio::sync::watch;

use super::handoff;
use super::membership::{NodeView, REBALANCER_KEY};
use super::placement::{self, Placement};
use super::{ClusterSettings, Lease};
use crate::bus::Subjects;
use crate::telemetry::traces;

/// A market moved by load stays where it went at least this long.
const MOVED_STAYS: Duration = Duration::from_secs(300);
/// Checks in a row a node must be overloaded before a load move.
const OVERLOADED_CHECKS: u32 = 3;

#[derive(Clone)]
pub struct Rebalancer {
    pub node: String,
    pub client: async_nats::Client,
    pub subjects: Subjects,
    pub nodes: kv::Store,
    pub placement: kv::Store,
    pub markets: kv::Store,
    pub settings: ClusterSettings,
}

#[derive(Default)]
struct View {
    nodes: NodeView,
    placement: BTreeMap<String, (Placement, u64)>,
    drained: BTreeSet<String>,
    specs: BTreeSet<String>,
    /// The rebalancer lease as last seen: holder, revision, when seen.
    lease_seen: Option<(String, u64, Instant)>,
}

struct Leadership {
    revision: u64,
    lease: Lease,
}

type MoveTask = tokio::task::JoinHandle<(String, Result<handoff::Moved, handoff::MoveError>)>;

impl Rebalancer {
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Result<(), String> {
        let watch = |store: &kv::Store, what: &'static str| {
            let store = store.clone();
            async move {
                store
                    .watch_with_history(">")
                    .await
                    .map_err(|e| format!("cannot watch the {what} bucket: {e}"))
            }
        };
        let mut nodes = watch(&self.nodes, "nodes").await?;
        let mut placements = watch(&self.placement, "placement").await?;
        let mut specs = watch(&self.markets, "markets").await?;
        let mut timer = tokio::time::interval(self.settings.heartbeat);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut view = View::default();
        let mut leader: Option<Leadership> = None;
        let mut unplaced_before: BTreeSet<String> = BTreeSet::new();
        let mut moving: Option<MoveTask> = None;
        let mut moves: VecDeque<Instant> = VecDeque::new();
        let mut moved_at: HashMap<String, Instant> = HashMap::new();
        let mut overloaded: (Option<String>, u32) = (None, 0);
        let mut last_load_check = Instant::now();
        loop {
            tokio::select! {
                _ = stop.changed() => {
                    if let Some(l) = leader.take() {
                        // Leave the lease to the others at once.
                        let _ = self.nodes.delete_expect_revision(REBALANCER_KEY, Some(l.revision)).await;
                    }
                    return Ok(());
                }
                Some(entry) = nodes.next() => match entry {
                    Ok(entry) if entry.key == REBALANCER_KEY => {
                        view.lease_seen = match entry.operation {
                            kv::Operation::Put => Some((
                                String::from_utf8_lossy(&entry.value).into_owned(),
                                entry.revision,
                                Instant::now(),
                            )),
                            _ => None,
                        };
                    }
                    Ok(entry) => view.nodes.apply(&entry),
                    Err(e) => tracing::warn!("nodes watch: {e}"),
                },
                Some(entry) = placements.next() => match entry {
                    Ok(entry) => {
                        if let Some(node) = placement::drained_node(&entry.key) {
                            if entry.operation == kv::Operation::Put {
                                view.drained.insert(node.to_string());
                            } else {
                                view.drained.remove(node);
                            }
                        } else if entry.operation == kv::Operation::Put {
                            if let Some(p) = Placement::decode(&entry.value) {
                                view.placement.insert(entry.key.clone(), (p, entry.revision));
                            }
                        } else {
                            view.placement.remove(&entry.key);
                        }
                    }
                    Err(e) => tracing::warn!("placement watch: {e}"),
                },
                Some(entry) = specs.next() => match entry {
                    Ok(entry) if entry.operation == kv::Operation::Put => {
                        view.specs.insert(entry.key.clone());
                    }
                    Ok(entry) => {
                        view.specs.remove(&entry.key);
                    }
                    Err(e) => tracing::warn!("markets watch: {e}"),
                },
                _ = timer.tick() => {
                    leader = self.hold_lease(&view, leader).await;
                    let Some(l) = &leader else { continue };
                    if !l.lease.valid() {
                        continue;
                    }
                    if let Some(task) = moving.take_if(|t| t.is_finished())
                        && let Ok((market, result)) = task.await
                    {
                        match result {
                            Ok(m) => {
                                tracing::info!(market = %market, from = %m.from, to = %m.to, pause_us = m.pause_us, "moved");
                                moved_at.insert(market, Instant::now());
                            }
                            Err(e) => tracing::warn!(market = %market, "move failed: {} ({})", e.message, e.error),
                        }
                    }
                    self.place(&view, &mut unplaced_before).await;
                    self.fail_over(&view).await;
                    if self.settings.standbys > 0 {
                        self.keep_standbys(&view).await;
                    }
                    if moving.is_none() {
                        moving = self.drain(&view);
                    }
                    let every = self.settings.rebalance_every;
                    if moving.is_none() && !every.is_zero() && last_load_check.elapsed() >= every {
                        last_load_check = Instant::now();
                        moves.retain(|t| t.elapsed() < Duration::from_secs(60));
                        if (moves.len() as u32) < self.settings.max_moves_per_minute {
                            moving = self.balance(&view, &mut overloaded, &moved_at);
                            if moving.is_some() {
                                moves.push_back(Instant::now());
                            }
                        }
                    }
                }
            }
        }
    }

    /// Renews the lease, or takes it when its holder went a whole lease without renewing.
    async fn hold_lease(&self, view: &View, leader: Option<Leadership>) -> Option<Leadership> {
        let sent = Instant::now();
        if let Some(l) = leader {
            return match self
                .nodes
                .update(REBALANCER_KEY, self.node.clone().into(), l.revision)
                .await
            {
                Ok(revision) => {
                    l.lease.extend_to(sent + self.settings.own_lease());
                    Some(Leadership { revision, ..l })
                }
                Err(e) => {
                    if l.lease.valid() {
                        // Not answered in time, or taken: hold on until the lease says otherwise.
                        tracing::warn!(node = %self.node, "rebalancer lease not renewed: {e}");
                        return Some(l);
                    }
                    tracing::warn!(node = %self.node, "rebalancer lease lost: {e}");
                    None
                }
            };
        }
        let taken = match &view.lease_seen {
            Some((holder, _, seen))
                if holder != &self.node && seen.elapsed() < self.settings.lease =>
            {
                return None;
            }
            Some((_, revision, _)) => self
                .nodes
                .update(REBALANCER_KEY, self.node.clone().into(), *revision)
                .await
                .map_err(|e| e.to_string()),
            None => self
                .nodes
                .create(REBALANCER_KEY, self.node.clone().into())
                .await
                .map_err(|e| e.to_string()),
        };
        match taken {
            Ok(revision) => {
                let lease = Lease::new();
                lease.extend_to(sent + self.settings.own_lease());
                say!("agora node {}: rebalancer active here", self.node);
                Some(Leadership { revision, lease })
            }
            Err(_) => None,
        }
    }

    /// Live nodes that may take markets.
    fn targets<'a>(&self, view: &'a View) -> Vec<&'a str> {
        view.nodes
            .live(self.settings.lease)
            .map(|r| r.node.as_str())
            .filter(|n| !view.drained.contains(*n))
            .collect()
    }

    async fn place(&self, view: &View, unplaced_before: &mut BTreeSet<String>) {
        let unplaced: BTreeSet<String> = view
            .specs
            .iter()
            .filter(|m| !view.placement.contains_key(*m))
            .cloned()
            .collect();
        let targets = self.targets(view);
        for market in unplaced.intersection(unplaced_before) {
            let Some(node) = placement::rendezvous(market, targets.iter().copied()) else {
                break;
            };
            if self
                .placement
                .create(market, Placement::assigned(node, 1).encode().into())
                .await
                .is_ok()
            {
                tracing::info!(market = %market, node, "placed");
            }
        }
        *unplaced_before = unplaced;
    }

    async fn fail_over(&self, view: &View) {
        let targets = self.targets(view);
        for (market, (p, revision)) in &view.placement {
            if view.nodes.is_live(&p.node, self.settings.lease) {
                continue;
            }
            // The standby first: its warm copy takes over without a snapshot or a replay.
            let standby = p.standby.as_deref().filter(|s| targets.contains(s));
            let Some(node) =
                standby.or_else(|| placement::rendezvous(market, targets.iter().copied()))
            else {
                return;
            };
            let span = traces::failover_span(market, &p.node, node, p.epoch + 1);
            let next =
                Placement::assigned(node, p.epoch + 1).with_trace(traces::traceparent(&span));
            if self
                .placement
                .update(market, next.encode().into(), *revision)
                .await
                .is_ok()
            {
                metrics::counter!("matching_failovers_total").increment(1);
                say!(
                    "agora node {}: failover: {market} from {} (not heard from for {:?}) to {node} at epoch {}",
                    self.node,
                    p.node,
                    self.settings.lease,
                    p.epoch + 1
                );
            }
        }
    }

    /// Names a standby for every running market that lacks a live one: rendezvous over the
    /// live nodes other than the owner.
    async fn keep_standbys(&self, view: &View) {
        let targets = self.targets(view);
        for (market, (p, revision)) in &view.placement {
            if p.state != placement::PlacementState::Active
                || !view.nodes.is_live(&p.node, self.settings.lease)
            {
                continue;
            }
            let current = p
                .standby
                .as_deref()
                .filter(|s| *s != p.node && targets.contains(s));
            if current.is_some() {
                continue;
            }
            let others = targets.iter().copied().filter(|n| *n != p.node);
            let standby = placement::rendezvous(market, others);
            if standby == p.standby.as_deref() {
                continue;
            }
            let next = p.clone().with_standby(standby);
            if self
                .placement
                .update(market, next.encode().into(), *revision)
                .await
                .is_ok()
            {
                tracing::info!(market = %market, standby = ?standby, "standby named");
            }
        }
    }

    fn start_move(&self, market: &str, to: &str) -> MoveTask {
        let (this, market, to) = (self.clone(), market.to_string(), to.to_string());
        tokio::spawn(async move {
            let moved = handoff::move_market(
                &this.client,
                &this.subjects,
                &this.placement,
                &market,
                &to,
                Duration::from_secs(60),
            )
            .await;
            (market, moved)
        })
    }

    /// The next market of a drained node to move, if any.
    fn drain(&self, view: &View) -> Option<MoveTask> {
        let targets = self.targets(view);
        for (market, (p, _)) in &view.placement {
            if view.drained.contains(&p.node)
                && p.state == placement::PlacementState::Active
                && view.nodes.is_live(&p.node, self.settings.lease)
            {
                let to = placement::rendezvous(market, targets.iter().copied())?;
                tracing::info!(market = %market, from = %p.node, to, "draining");
                return Some(self.start_move(market, to));
            }
        }
        None
    }

    /// A load move when one node has been overloaded long enough.
    fn balance(
        &self,
        view: &View,
        overloaded: &mut (Option<String>, u32),
        moved_at: &HashMap<String, Instant>,
    ) -> Option<MoveTask> {
        let live: Vec<_> = view
            .nodes
            .live(self.settings.lease)
            .filter(|r| !view.drained.contains(&r.node))
            .collect();
        if live.len() < 2 {
            *overloaded = (None, 0);
            return None;
        }
        let mean = live.iter().map(|r| r.commands_per_sec).sum::<f64>() / live.len() as f64;
        let by_load = |a: &&&super::membership::NodeRecord, b: &&&super::membership::NodeRecord| {
            a.commands_per_sec.total_cmp(&b.commands_per_sec)
        };
        let hot = live.iter().max_by(by_load)?;
        let cool = live.iter().min_by(by_load)?;
        let gap = hot.commands_per_sec - cool.commands_per_sec;
        if hot.commands_per_sec < mean * self.settings.imbalance_ratio
            || gap < self.settings.min_rate_gap
        {
            *overloaded = (None, 0);
            return None;
        }
        if overloaded.0.as_deref() == Some(hot.node.as_str()) {
            overloaded.1 += 1;
        } else {
            *overloaded = (Some(hot.node.clone()), 1);
        }
        if overloaded.1 < OVERLOADED_CHECKS {
            return None;
        }
        // The hottest market whose move narrows the gap (it must not simply swap the roles).
        let market = hot
            .markets
            .iter()
            .filter(|m| m.commands_per_sec > 0.0 && m.commands_per_sec < gap)
            .filter(|m| {
                moved_at
                    .get(&m.symbol)
                    .is_none_or(|t| t.elapsed() > MOVED_STAYS)
            })
            .max_by(|a, b| a.commands_per_sec.total_cmp(&b.commands_per_sec))?;
        *overloaded = (None, 0);
        tracing::info!(market = %market.symbol, from = %hot.node, to = %cool.node, rate = market.commands_per_sec, "moving for load");
        Some(self.start_move(&market.symbol, &cool.node))
    }
}
