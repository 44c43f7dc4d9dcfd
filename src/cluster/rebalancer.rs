//! The rebalancer: every node runs one, and exactly one is active, the holder of the lease
//! `lease.rebalancer` in the nodes bucket (renewed by compare-and-set every heartbeat; taken
//! over by compare-and-set once it went a whole lease without renewal).
//!
//! The active one, every heartbeat (and for failovers also the moment a node's lease runs out):
//! - places markets that have a spec and no placement (seen so on two heartbeats in a row,
//!   leaving `market.add` the time to place them on the least loaded node) by rendezvous
//!   hashing over the live nodes not being drained;
//! - gives the markets of dead nodes (not heard from for a lease) to live ones at the next
//!   epoch (failover), by compare-and-set;
//! - moves the markets of drained nodes away, one planned handoff at a time;
//! - every `rebalance_every`, when one node has been overloaded three checks in a row, moves
//!   its hottest market that fits to the least busy node; at most `max_moves_per_minute`
//!   moves a minute, and a market moved is not moved again for five minutes.

use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use tokio::sync::watch;

use super::handoff;
use super::membership::REBALANCER_KEY;
use super::placement::{self, Placement};
use super::plan::{Action, MoveReason, Planner, Seen};
use super::{ClusterSettings, Lease};
use crate::bus::{KvFollower, Subjects};
use crate::telemetry::traces;

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

/// The buckets as watched (what the planner decides from), and the rebalancer lease as last
/// seen: holder, revision, when seen.
#[derive(Default)]
struct View {
    seen: Seen,
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
                KvFollower::open(store)
                    .await
                    .map_err(|e| format!("cannot watch the {what} bucket: {e}"))
            }
        };
        let mut nodes = watch(&self.nodes, "nodes").await?;
        let mut placements = watch(&self.placement, "placement").await?;
        let mut specs = watch(&self.markets, "markets").await?;
        let mut timer = tokio::time::interval(self.settings.heartbeat);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut follow_check = tokio::time::interval(super::agent::FOLLOW_CHECK);
        follow_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut view = View::default();
        let mut leader: Option<Leadership> = None;
        let mut planner = Planner::new(Instant::now());
        let mut moving: Option<MoveTask> = None;
        loop {
            // When the next live node's lease runs out (a millisecond after, so it counts dead).
            let expiry = view
                .seen
                .nodes
                .next_expiry(Instant::now(), self.settings.lease)
                .map(|at| tokio::time::Instant::from_std(at + Duration::from_millis(1)));
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
                    Ok(entry) => view.seen.nodes.apply(&entry),
                    Err(e) => tracing::warn!("nodes watch: {e}"),
                },
                Some(entry) = placements.next() => match entry {
                    Ok(entry) => {
                        if let Some(node) = placement::drained_node(&entry.key) {
                            if entry.operation == kv::Operation::Put {
                                view.seen.drained.insert(node.to_string());
                            } else {
                                view.seen.drained.remove(node);
                            }
                        } else if entry.operation == kv::Operation::Put {
                            if let Some(p) = Placement::decode(&entry.value) {
                                view.seen.placement.insert(entry.key.clone(), (p, entry.revision));
                            }
                        } else {
                            view.seen.placement.remove(&entry.key);
                        }
                    }
                    Err(e) => tracing::warn!("placement watch: {e}"),
                },
                Some(entry) = specs.next() => match entry {
                    Ok(entry) if entry.operation == kv::Operation::Put => {
                        view.seen.specs.insert(entry.key.clone());
                    }
                    Ok(entry) => {
                        view.seen.specs.remove(&entry.key);
                    }
                    Err(e) => tracing::warn!("markets watch: {e}"),
                },
                // A node's lease ran out: its markets fail over now, not at the next heartbeat.
                () = async {
                    match expiry {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let Some(l) = &leader else { continue };
                    if !l.lease.valid() {
                        continue;
                    }
                    let actions = Planner::fail_overs(&view.seen, &self.settings, Instant::now());
                    self.carry_out_all(&view.seen, actions, &mut moving).await;
                }
                _ = follow_check.tick() => {
                    nodes.check().await;
                    placements.check().await;
                    specs.check().await;
                }
                _ = timer.tick() => {
                    leader = self.hold_lease(&mut view, leader).await;
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
                                planner.moved(&market, Instant::now());
                            }
                            Err(e) => tracing::warn!(market = %market, "move failed: {} ({})", e.message, e.error),
                        }
                    }
                    let actions = planner.tick(&view.seen, &self.settings, Instant::now(), moving.is_some());
                    self.carry_out_all(&view.seen, actions, &mut moving).await;
                }
            }
        }
    }

    /// Renews the lease, or takes it when its holder went a whole lease without renewing.
    async fn hold_lease(&self, view: &mut View, leader: Option<Leadership>) -> Option<Leadership> {
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
        let taken = match taken {
            Ok(revision) => Ok(revision),
            // The record the watch showed may be gone: the nodes bucket's records expire with
            // its max age, silently (a watch sees no deletion), so a dead holder's record
            // vanishes and an update at its revision would fail for ever. Read what is there
            // now: nothing, take it; a newer record, wait a lease from now as for any other.
            Err(e) => match self.nodes.entry(REBALANCER_KEY).await {
                Ok(None) => self
                    .nodes
                    .create(REBALANCER_KEY, self.node.clone().into())
                    .await
                    .map_err(|e| e.to_string()),
                Ok(Some(entry)) if entry.operation != kv::Operation::Put => self
                    .nodes
                    .create(REBALANCER_KEY, self.node.clone().into())
                    .await
                    .map_err(|e| e.to_string()),
                Ok(Some(entry)) => {
                    let newer = view
                        .lease_seen
                        .as_ref()
                        .is_none_or(|(_, revision, _)| entry.revision != *revision);
                    if newer {
                        view.lease_seen = Some((
                            String::from_utf8_lossy(&entry.value).into_owned(),
                            entry.revision,
                            Instant::now(),
                        ));
                    }
                    Err(e)
                }
                Err(read) => Err(format!("{e}; reading it: {read}")),
            },
        };
        if let Err(e) = &taken {
            tracing::warn!(node = %self.node, "rebalancer lease not taken: {e}");
        }
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

    /// Makes one of the planner's writes, by compare-and-set (a lost race changes nothing;
    /// the watch brings what won). Answers the task of a move it started.
    /// Carries out `actions` in order; a move started among them becomes `moving`.
    async fn carry_out_all(
        &self,
        seen: &Seen,
        actions: Vec<Action>,
        moving: &mut Option<MoveTask>,
    ) {
        for action in actions {
            if let Some(task) = self.carry_out(seen, action).await {
                *moving = Some(task);
            }
        }
    }

    async fn carry_out(&self, seen: &Seen, action: Action) -> Option<MoveTask> {
        match action {
            Action::Place { market, node } => {
                if self
                    .placement
                    .create(&market, Placement::assigned(&node, 1).encode().into())
                    .await
                    .is_ok()
                {
                    tracing::info!(market = %market, node, "placed");
                }
                None
            }
            Action::FailOver {
                market,
                from,
                to,
                epoch,
                revision,
            } => {
                let span = traces::failover_span(&market, &from, &to, epoch);
                let next = Placement::assigned(&to, epoch).with_trace(traces::traceparent(&span));
                match self
                    .placement
                    .update(&market, next.encode().into(), revision)
                    .await
                {
                    Ok(_) => {
                        metrics::counter!("matching_failovers_total").increment(1);
                        tracing::info!(market = %market, from = %from, to = %to, epoch, "failover written");
                        say!(
                            "agora node {}: failover: {market} from {from} (not heard from for {:?}) to {to} at epoch {epoch}",
                            self.node,
                            self.settings.lease,
                        );
                    }
                    // Another write won (the watch brings it), or NATS did not take it: the
                    // next heartbeat decides again.
                    Err(e) => {
                        tracing::warn!(market = %market, from = %from, to = %to, epoch, revision, "failover not written: {e}")
                    }
                }
                None
            }
            Action::NameStandby {
                market,
                standby,
                revision,
            } => {
                let (p, _) = seen.placement.get(&market)?;
                let next = p.clone().with_standby(standby.as_deref());
                if self
                    .placement
                    .update(&market, next.encode().into(), revision)
                    .await
                    .is_ok()
                {
                    tracing::info!(market = %market, standby = ?standby, "standby named");
                }
                None
            }
            Action::Move {
                market,
                from,
                to,
                reason,
            } => {
                match reason {
                    MoveReason::Drain => {
                        tracing::info!(market = %market, from = %from, to = %to, "draining")
                    }
                    MoveReason::Load { rate } => {
                        tracing::info!(market = %market, from = %from, to = %to, rate, "moving for load")
                    }
                    MoveReason::Preferred => {
                        tracing::info!(market = %market, from = %from, to = %to, "moving back to a node that prefers it")
                    }
                }
                Some(self.start_move(&market, &to))
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
}
