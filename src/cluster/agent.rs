//! The cluster agent, one per node: runs exactly the markets placement gives this node.
//!
//! It watches `<prefix>_placement`. A market `assigned` to this node is claimed by a
//! compare-and-set to `active` at the same epoch, then started (from a warm copy when one is
//! kept here). A market `active` here that this node does not run (after a restart, a lapsed
//! lease, or a fence) is claimed again at the next epoch, by compare-and-set too, so a node
//! that lost the market meanwhile simply fails the claim. A market placed elsewhere, or
//! removed, is stopped. While the node's lease has lapsed it claims nothing and stops
//! everything.
//!
//! It answers `<prefix>.node.<NODE>.<verb>` (JSON): `markets` (what runs here, with figures),
//! and the node's part of a planned move: `follow {market}` (keep a warm copy; answers once it is close behind the owner),
//! `unfollow {market}`, and `release {market, to, epoch}` (stop at a batch boundary with
//! every output published, then hand the market to `to` at the next epoch by compare-and-set).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::Addr;
use async_nats::jetstream::kv;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use super::placement::{Placement, PlacementState};
use super::{ClusterSettings, Lease};
use crate::actors::market::MarketStatus;
use crate::actors::takeover::{Takeover, TakeoverKind};
use crate::actors::{
    Follow, FollowAhead, FollowerLag, Held, ListMarkets, StartMarket, StopMarket, Supervisor,
    Unfollow,
};
use crate::book::{MarketSpec, MarketSpecInput};
use crate::bus::{self, BusError, KvFollower, Subjects};
use crate::control::protocol::node::{self, MarketRequest, ReleaseRequest};
use crate::control::protocol::{Failure, Reply, reply_value};
use crate::telemetry::traces;
use tracing::Instrument;

/// A warm copy counts as caught up when this close behind the owner.
pub const FOLLOW_READY_LAG: u64 = 2_000;

/// Wait after a failed start before claiming the market again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How often a node checks that its bucket watches keep up (`bus::KvFollower`).
pub(super) const FOLLOW_CHECK: Duration = Duration::from_secs(1);

/// What the agent works with.
#[derive(Clone)]
pub struct Agent {
    pub node: String,
    pub client: async_nats::Client,
    pub subjects: Subjects,
    pub placement: kv::Store,
    pub markets: kv::Store,
    pub supervisor: Addr<Supervisor>,
    pub lease: Lease,
    pub settings: ClusterSettings,
    /// The specs of the markets this node keeps a warm copy of, read when the copy started:
    /// taking one over then reads nothing from the markets bucket inside a move's pause.
    pub specs: Specs,
}

/// Market specs read for warm copies. A spec never changes while its market exists
/// (`market.add` refuses another spec for a known symbol; `market.remove` deletes the
/// placement, which drops the copy and this entry).
#[derive(Clone, Default)]
pub struct Specs(Arc<Mutex<HashMap<String, MarketSpec>>>);

impl Specs {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, MarketSpec>) -> T) -> T {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut map)
    }

    fn keep(&self, spec: &MarketSpec) {
        self.with(|m| m.insert(spec.symbol.clone(), spec.clone()));
    }

    fn forget(&self, market: &str) {
        self.with(|m| m.remove(market));
    }

    fn get(&self, market: &str) -> Option<MarketSpec> {
        self.with(|m| m.get(market).cloned())
    }
}

#[derive(Default)]
struct State {
    /// The placement bucket as watched: market → (record, revision).
    view: HashMap<String, (Placement, u64)>,
    /// Markets this node claimed, at their epoch.
    owned: HashMap<String, u64>,
    starting: HashSet<String>,
    /// No claim before this (after a failed start).
    retry_at: HashMap<String, Instant>,
    /// Markets this node keeps a warm copy of as their standby.
    standing_by: HashSet<String>,
}

/// A finished start: the market, its epoch, and whether it came from a warm copy (or what
/// went wrong).
type Started = (String, u64, Result<bool, String>);

/// A market's spec from the markets bucket.
pub async fn spec_of(markets: &kv::Store, market: &str) -> Result<MarketSpec, String> {
    let bytes = markets
        .get(market)
        .await
        .map_err(|e| format!("{market}: cannot read its spec: {e}"))?
        .ok_or_else(|| format!("{market}: no spec is stored (market.add it)"))?;
    serde_json::from_slice::<MarketSpecInput>(&bytes)
        .map_err(|e| format!("{market}: the stored spec cannot be read: {e}"))?
        .validate()
        .map_err(|e| format!("{market}: the stored spec is not valid: {e}"))
}

/// An agent whose request subject is subscribed on the server: `market.move --to` this node,
/// sent once the node says it is ready, finds it answering.
pub struct Listening {
    agent: Agent,
    requests: async_nats::Subscriber,
}

impl Listening {
    /// Runs until `stop` flips (markets are left to the supervisor's shutdown).
    pub async fn run(self, stop: watch::Receiver<bool>) -> Result<(), String> {
        self.agent.run(self.requests, stop).await
    }
}

impl Agent {
    /// Subscribes to `<prefix>.node.<NODE>.*` and waits until the server has the
    /// subscription, so the node's ready line is not printed before it can be asked to follow.
    pub async fn listen(self) -> Result<Listening, BusError> {
        let subject = self.subjects.node(&self.node, "*");
        let requests = bus::subscribe_flushed(&self.client, &subject, None).await?;
        Ok(Listening {
            agent: self,
            requests,
        })
    }

    async fn run(
        self,
        mut requests: async_nats::Subscriber,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), String> {
        let mut entries = KvFollower::open(self.placement.clone())
            .await
            .map_err(|e| format!("cannot watch the placement bucket: {e}"))?;
        let mut follow_check = tokio::time::interval(FOLLOW_CHECK);
        follow_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut timer = tokio::time::interval(self.settings.heartbeat);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let (started_tx, mut started) = mpsc::unbounded_channel::<Started>();
        let mut state = State::default();
        let mut lapsed = false;
        loop {
            tokio::select! {
                _ = stop.changed() => return Ok(()),
                entry = entries.next() => {
                    let Some(entry) = entry else {
                        return Err("the placement watch ended".to_string());
                    };
                    match entry {
                        Ok(entry) => {
                            let market = entry.key.clone();
                            if market.contains('.') {
                                continue;
                            }
                            match entry.operation {
                                kv::Operation::Put => {
                                    if let Some(p) = Placement::decode(&entry.value) {
                                        state.view.insert(market.clone(), (p, entry.revision));
                                    }
                                }
                                _ => {
                                    state.view.remove(&market);
                                }
                            }
                            self.act(&mut state, &market, &started_tx).await;
                        }
                        Err(e) => tracing::warn!("placement watch: {e}"),
                    }
                }
                request = requests.next() => {
                    let Some(request) = request else {
                        return Err("the node request subscription ended".to_string());
                    };
                    self.answer(&mut state, request).await;
                }
                done = started.recv() => {
                    let Some((market, epoch, result)) = done else { continue };
                    state.starting.remove(&market);
                    match result {
                        Err(e) => {
                            tracing::error!(market = %market, epoch, "{e}; claiming it again in {RETRY_AFTER:?}");
                            if state.owned.get(&market) == Some(&epoch) {
                                state.owned.remove(&market);
                            }
                            state.retry_at.insert(market, Instant::now() + RETRY_AFTER);
                        }
                        Ok(warm) => say!(
                            "agora node {}: running {market} at epoch {epoch}{}",
                            self.node,
                            if warm { " (from its warm copy)" } else { "" }
                        ),
                    }
                }
                _ = timer.tick() => {
                    if !self.lease.valid() {
                        if !lapsed && !state.owned.is_empty() {
                            tracing::error!(node = %self.node, "this node's lease lapsed; stopping its markets");
                        }
                        lapsed = true;
                        for (market, _) in state.owned.drain() {
                            self.stop_market(&market, true);
                        }
                        continue;
                    }
                    lapsed = false;
                    self.reconcile(&mut state, &started_tx).await;
                }
                _ = follow_check.tick() => {
                    entries.check().await;
                }
            }
        }
    }

    /// Markets this node claimed that the supervisor no longer holds (fenced, lease lapsed) are
    /// forgotten; then every market placed here is looked at again.
    async fn reconcile(&self, state: &mut State, started: &mpsc::UnboundedSender<Started>) {
        let held: HashSet<String> = self
            .supervisor
            .send(Held)
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|(m, _)| m)
            .collect();
        let starting = &state.starting;
        state
            .owned
            .retain(|m, _| held.contains(m) || starting.contains(m));
        let mine: Vec<String> = state
            .view
            .iter()
            .filter(|(_, (p, _))| p.node == self.node)
            .map(|(m, _)| m.clone())
            .collect();
        for market in mine {
            self.act(state, &market, started).await;
        }
        // Held here but placed elsewhere (or nowhere): stop.
        for market in held {
            if !state.owned.contains_key(&market) && !state.starting.contains(&market) {
                tracing::warn!(market = %market, "running here without a claim; stopping it");
                self.stop_market(&market, true);
            }
        }
    }

    /// Brings one market in line with its placement record.
    async fn act(&self, state: &mut State, market: &str, started: &mpsc::UnboundedSender<Started>) {
        let Some((p, revision)) = state.view.get(market).cloned() else {
            if state.owned.remove(market).is_some() {
                say!("agora node {}: {market} removed; stopping it", self.node);
                self.stop_market(market, false);
            }
            if state.standing_by.remove(market) {
                let _ = self.supervisor.send(Unfollow(market.to_string())).await;
            }
            self.specs.forget(market);
            return;
        };
        let standby = p.standby.as_deref() == Some(self.node.as_str()) && p.node != self.node;
        if standby && !state.standing_by.contains(market) && self.lease.valid() {
            state.standing_by.insert(market.to_string());
            self.keep_warm_copy(market);
        } else if !standby && state.standing_by.remove(market) && p.node != self.node {
            let _ = self.supervisor.send(Unfollow(market.to_string())).await;
            self.specs.forget(market);
        } else if p.node == self.node {
            state.standing_by.remove(market);
        }
        if p.node != self.node {
            if state.owned.remove(market).is_some() {
                say!(
                    "agora node {}: {market} is now placed on {} (epoch {}); stopping it here",
                    self.node,
                    p.node,
                    p.epoch
                );
                self.stop_market(market, true);
            }
            return;
        }
        if !self.lease.valid()
            || state.starting.contains(market)
            || state
                .retry_at
                .get(market)
                .is_some_and(|at| Instant::now() < *at)
        {
            return;
        }
        let epoch = match p.state {
            PlacementState::Assigned => p.epoch,
            PlacementState::Active if state.owned.get(market) == Some(&p.epoch) => return,
            // Placed here and active, but not run by this process: claim it anew.
            PlacementState::Active => p.epoch + 1,
        };
        let claim = Placement::active(&self.node, epoch).with_standby(p.standby.as_deref());
        match self
            .placement
            .update(market, claim.encode().into(), revision)
            .await
        {
            Ok(new_revision) => {
                state.view.insert(market.to_string(), (claim, new_revision));
                state.owned.insert(market.to_string(), epoch);
                state.starting.insert(market.to_string());
                state.retry_at.remove(market);
                // A release (Assigned with `released`) lets the new owner skip republishing.
                let kind = match p.state {
                    PlacementState::Assigned if p.released => TakeoverKind::Handoff {
                        stop_point: p.stopped_at,
                    },
                    PlacementState::Assigned if epoch == 1 => TakeoverKind::Placement,
                    PlacementState::Assigned => TakeoverKind::Failover,
                    PlacementState::Active => TakeoverKind::Reclaim,
                };
                self.start_market(
                    market,
                    Takeover {
                        epoch,
                        trace: p.trace.clone(),
                        kind,
                    },
                    started.clone(),
                );
            }
            // Someone changed the record first: the watch brings the new one.
            Err(e) => tracing::debug!(market, "claim at epoch {epoch} not taken: {e}"),
        }
    }

    fn start_market(&self, market: &str, takeover: Takeover, done: mpsc::UnboundedSender<Started>) {
        let (epoch, kind) = (takeover.epoch, takeover.kind.name());
        let (markets, supervisor, market) = (
            self.markets.clone(),
            self.supervisor.clone(),
            market.to_string(),
        );
        // A handoff's warm copy had its spec read when it started (and runs on it anyway).
        let cached = self
            .specs
            .get(&market)
            .filter(|_| takeover.kind.handed_over());
        self.specs.forget(&market);
        actix_rt::spawn(async move {
            let claimed = Instant::now();
            let spec = match cached {
                Some(spec) => Ok(spec),
                None => spec_of(&markets, &market).await,
            };
            tracing::debug!(market = %market, epoch, kind, spec_ms = claimed.elapsed().as_secs_f64() * 1e3, "claimed; starting");
            let result = match spec {
                Ok(spec) => supervisor
                    .send(StartMarket { spec, takeover })
                    .await
                    .map_err(|e| format!("the supervisor is gone: {e}"))
                    .and_then(|r| r),
                Err(e) => Err(e),
            };
            if result.is_ok() {
                // From the claim to the market consuming: a failover's recovery, a handoff's
                // takeover (the part of its pause on this node).
                metrics::histogram!("matching_takeover_us", "kind" => kind)
                    .record(claimed.elapsed().as_micros() as f64);
            }
            let _ = done.send((market, epoch, result));
        });
    }

    /// Starts the standby's warm copy (in the background; a failure is tried again at the
    /// next change of the record or lapse).
    fn keep_warm_copy(&self, market: &str) {
        let (markets, supervisor, market, specs) = (
            self.markets.clone(),
            self.supervisor.clone(),
            market.to_string(),
            self.specs.clone(),
        );
        actix_rt::spawn(async move {
            let followed = match spec_of(&markets, &market).await {
                Ok(spec) => {
                    specs.keep(&spec);
                    supervisor
                        .send(Follow(spec))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r)
                }
                Err(e) => Err(e),
            };
            if let Err(e) = followed {
                specs.forget(&market);
                tracing::warn!(market = %market, "no warm copy kept here: {e}");
            }
        });
    }

    fn stop_market(&self, market: &str, handoff: bool) {
        let (supervisor, market) = (self.supervisor.clone(), market.to_string());
        actix_rt::spawn(async move {
            let _ = supervisor.send(StopMarket { market, handoff }).await;
        });
    }

    async fn answer(&self, state: &mut State, request: async_nats::Message) {
        let Some(reply) = request.reply.clone() else {
            return;
        };
        let verb = request
            .subject
            .as_str()
            .rsplit('.')
            .next()
            .unwrap_or("")
            .to_string();
        let parent = traces::traceparent_of(request.headers.as_ref());
        let answer = match verb.as_str() {
            "follow" => match serde_json::from_slice::<MarketRequest>(&request.payload) {
                Ok(r) => {
                    // Catching up may take a while: answered from its own task.
                    let (this, reply) = (self.clone(), reply.clone());
                    let span =
                        traces::node_span("follow", &r.market, &self.node, parent.as_deref());
                    actix_rt::spawn(
                        async move {
                            let answer = this.follow(&r).await;
                            let span = tracing::Span::current();
                            match &answer {
                                Ok(followed) => {
                                    span.record("lag", traces::int(followed.lag));
                                }
                                Err(e) => {
                                    span.record("lag", -1);
                                    traces::fail(&span, &e.message);
                                }
                            }
                            this.respond(reply, &reply_value(&answer)).await;
                        }
                        .instrument(span),
                    );
                    return;
                }
                Err(e) => reply_value::<()>(&Err(Failure::new(
                    "bad_request",
                    format!("follow takes {{market}}: {e}"),
                ))),
            },
            "markets" => {
                let markets = self.supervisor.send(ListMarkets).await.unwrap_or_default();
                reply_value::<_>(&Ok::<_, Failure>(node::Markets {
                    node: self.node.clone(),
                    markets,
                }))
            }
            "unfollow" => match serde_json::from_slice::<MarketRequest>(&request.payload) {
                Ok(r) => {
                    let _ = self.supervisor.send(Unfollow(r.market.clone())).await;
                    self.specs.forget(&r.market);
                    reply_value(&Ok::<_, Failure>(node::Unfollowed { market: r.market }))
                }
                Err(e) => reply_value::<()>(&Err(Failure::new(
                    "bad_request",
                    format!("unfollow takes {{market}}: {e}"),
                ))),
            },
            "release" => match serde_json::from_slice::<ReleaseRequest>(&request.payload) {
                Ok(r) => {
                    let span =
                        traces::node_span("release", &r.market, &self.node, parent.as_deref());
                    let Release { answer, stopped } = self
                        .release(state, &r, traces::traceparent(&span).or(parent))
                        .instrument(span.clone())
                        .await;
                    match &answer {
                        Ok(released) => {
                            if let Some(seq) = released.seq {
                                span.record("seq", traces::int(seq));
                            }
                        }
                        Err(e) => traces::fail(&span, &e.message),
                    }
                    let (Some(stopped), Ok(mut released)) = (stopped, answer.clone()) else {
                        self.respond(reply, &reply_value(&answer)).await;
                        return;
                    };
                    // Answered with the stopped book's hash, from a task of its own: the agent
                    // goes on meanwhile.
                    let this = self.clone();
                    actix_rt::spawn(
                        async move {
                            released.state_hash = stopped.state_hash().await;
                            this.respond(reply, &reply_value(&Ok::<_, Failure>(released)))
                                .await;
                        }
                        .instrument(span),
                    );
                    return;
                }
                Err(e) => reply_value::<()>(&Err(Failure::new(
                    "bad_request",
                    format!("release takes {{market, to, epoch}}: {e}"),
                ))),
            },
            other => reply_value::<()>(&Err(Failure::new(
                "unknown_verb",
                format!(
                    "{other:?} is not a node verb; use {}",
                    node::VERBS.join(", ")
                ),
            ))),
        };
        self.respond(reply, &answer).await;
    }

    async fn respond(&self, reply: async_nats::Subject, answer: &Value) {
        let bytes = serde_json::to_vec(answer).unwrap_or_default();
        let _ = self.client.publish(reply, bytes.into()).await;
    }

    /// Starts a warm copy and answers once it is close behind the owner.
    async fn follow(&self, r: &MarketRequest) -> Reply<node::Followed> {
        let spec = match spec_of(&self.markets, &r.market).await {
            Ok(spec) => spec,
            Err(e) => return Err(Failure::new("unknown_market", e)),
        };
        self.specs.keep(&spec);
        match self.supervisor.send(Follow(spec)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.specs.forget(&r.market);
                return Err(Failure::new("follow_failed", e));
            }
            Err(e) => return Err(Failure::new("node", format!("the supervisor is gone: {e}"))),
        }
        // Only a move asks (`move_market`): the copy applies the journal's last batches now,
        // outside the move's pause, and is answered for once it has.
        let _ = self.supervisor.send(FollowAhead(r.market.clone())).await;
        let timeout = Duration::from_millis(r.timeout_ms.unwrap_or(30_000));
        let deadline = Instant::now() + timeout;
        loop {
            let lag = self
                .supervisor
                .send(FollowerLag(r.market.clone()))
                .await
                .ok()
                .flatten();
            match lag {
                // Running here already (placed here meanwhile).
                None => {
                    return Ok(node::Followed {
                        market: r.market.clone(),
                        lag: 0,
                    });
                }
                Some(lag) if lag <= FOLLOW_READY_LAG => {
                    return Ok(node::Followed {
                        market: r.market.clone(),
                        lag,
                    });
                }
                Some(lag) if Instant::now() > deadline => {
                    let _ = self.supervisor.send(Unfollow(r.market.clone())).await;
                    self.specs.forget(&r.market);
                    let behind = if lag == u64::MAX {
                        "has not read the journal".to_string()
                    } else {
                        format!("is {lag} commands behind")
                    };
                    return Err(Failure::new(
                        "not_caught_up",
                        format!(
                            "the warm copy of {} on {} {behind} after {timeout:?}",
                            r.market, self.node
                        ),
                    ));
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// Stops the market at a batch boundary, every output published and no snapshot, then
    /// names `to` at the next epoch by compare-and-set, with where it stopped.
    async fn release(
        &self,
        state: &mut State,
        r: &ReleaseRequest,
        trace: Option<String>,
    ) -> Release {
        let refused = |failure| Release {
            answer: Err(failure),
            stopped: None,
        };
        let Some((p, revision)) = state.view.get(&r.market).cloned() else {
            return refused(Failure::new(
                "unknown_market",
                format!("{} has no placement", r.market),
            ));
        };
        if p.node != self.node
            || p.state != PlacementState::Active
            || p.epoch != r.epoch
            || state.owned.get(&r.market) != Some(&p.epoch)
            || state.starting.contains(&r.market)
        {
            return refused(Failure::new(
                "not_owner",
                format!(
                    "{} is placed on {} at epoch {} ({:?}); {} cannot release it at epoch {}",
                    r.market, p.node, p.epoch, p.state, self.node, r.epoch
                ),
            ));
        }
        let started = Instant::now();
        state.owned.remove(&r.market);
        let stopped = self
            .supervisor
            .send(StopMarket {
                market: r.market.clone(),
                handoff: true,
            })
            .await
            .ok()
            .flatten();
        let at = stopped.as_ref().map(|(at, _)| *at);
        let stopped_us = started.elapsed().as_micros() as u64;
        // Only when it stopped cleanly here (every output acknowledged): `released`, and where.
        let next_record = |standby: Option<&str>| {
            let mut next = Placement::assigned(&r.to, p.epoch + 1)
                .with_standby(standby)
                .with_trace(trace.clone());
            next.released = at.is_some();
            next.stopped_at = at;
            next
        };
        // Watched from before the handover: the stopped book is hashed once the new owner runs.
        let announced = self
            .client
            .subscribe(self.subjects.status(&r.market))
            .await
            .ok();
        let mut next = next_record(p.standby.as_deref());
        let mut revision = revision;
        let mut handed = self
            .placement
            .update(&r.market, next.encode().into(), revision)
            .await;
        // Only the standby may have changed meanwhile (the rebalancer names them): read the
        // record again and retry while it still names this node, active, at this epoch.
        for _ in 0..3 {
            if handed.is_ok() {
                break;
            }
            match self.placement.entry(&r.market).await {
                Ok(Some(e)) => match Placement::decode(&e.value) {
                    Some(now)
                        if now.node == self.node
                            && now.epoch == p.epoch
                            && now.state == PlacementState::Active =>
                    {
                        revision = e.revision;
                        next = next_record(now.standby.as_deref());
                        handed = self
                            .placement
                            .update(&r.market, next.encode().into(), revision)
                            .await;
                    }
                    _ => break,
                },
                _ => break,
            }
        }
        match handed {
            Ok(new_revision) => {
                state.view.insert(r.market.clone(), (next, new_revision));
                say!(
                    "agora node {}: released {} at seq {} to {} (epoch {})",
                    self.node,
                    r.market,
                    at.map_or(0, |a| a.seq),
                    r.to,
                    p.epoch + 1
                );
                Release {
                    answer: Ok(node::Released {
                        market: r.market.clone(),
                        seq: at.map(|a| a.seq),
                        state_hash: None,
                        epoch: p.epoch + 1,
                        stopped_us,
                        released_us: started.elapsed().as_micros() as u64,
                    }),
                    stopped: stopped.map(|(_, addr)| Stopped {
                        addr,
                        announced,
                        to: r.to.clone(),
                        epoch: p.epoch + 1,
                    }),
                }
            }
            Err(e) => refused(Failure::new(
                "placement_changed",
                format!(
                    "{} stopped here but its placement changed meanwhile ({e}); it is claimed again where placement says",
                    r.market
                ),
            )),
        }
    }
}

/// What `release` did: its answer, and the stopped market whose book's hash completes it.
struct Release {
    answer: Reply<node::Released>,
    stopped: Option<Stopped>,
}

/// A released market's stopped actor, and the status subject watched for the new owner.
struct Stopped {
    addr: Addr<crate::actors::MarketActor>,
    announced: Option<async_nats::Subscriber>,
    to: String,
    epoch: u64,
}

/// How long the old owner waits for the new one's announcement before hashing its stopped book
/// anyway.
const HASH_AFTER_MAX: Duration = Duration::from_secs(2);

impl Stopped {
    /// The stopped book's state hash, computed once the new owner announced itself running
    /// (or after `HASH_AFTER_MAX`), at a low priority: hashing 20,000 orders takes milliseconds
    /// of a core, which on a small machine the new owner's takeover needs more.
    async fn state_hash(mut self) -> Option<String> {
        if let Some(status) = self.announced.as_mut() {
            let (to, epoch) = (self.to.as_str(), self.epoch);
            let running = async {
                while let Some(m) = status.next().await {
                    if MarketStatus::decode(&m.payload).is_some_and(|s| s.runs_on(to, epoch)) {
                        return;
                    }
                }
            };
            let _ = tokio::time::timeout(HASH_AFTER_MAX, running).await;
        }
        if let Some(status) = self.announced.as_mut() {
            let _ = status.unsubscribe().await;
        }
        // A copy, hashed off the market's arbiter (other markets run there).
        let forked = self.addr.send(crate::actors::market::Fork).await.ok()?;
        let hash = crate::actors::market::hash_aside(forked).await.ok()?;
        Some(hash.to_string())
    }
}
