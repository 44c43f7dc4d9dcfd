//! `Supervisor`: one per node. Starts one market actor per market it is given, spread over a
//! pool of actix arbiters (threads; one per core by default), restarts a market whose driver
//! failed (it recovers from the streams; a restart that fails is tried again, waiting longer
//! each time, until the market runs, is removed or the node shuts down), and on shutdown stops
//! every market at a batch boundary and waits for them. Meanwhile `ListMarkets` reports the
//! market as not running, which is what `/ready` answers.
//!
//! A market fenced by another owner is not restarted here: ownership belongs to placement (the
//! cluster's rebalancer). This module must never run two actors for one market on one node.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::{oneshot, watch};

use super::market::{self, MarketBus, MarketControl, MarketError, MarketSettings};
use super::takeover::{StopPoint, Takeover, TakeoverKind};
use crate::book::{MarketSpec, Seq};

/// Wait before restarting a failed market; each restart that fails doubles it, up to
/// `RESTART_DELAY_MAX`.
const RESTART_DELAY: Duration = Duration::from_secs(1);
const RESTART_DELAY_MAX: Duration = Duration::from_secs(30);

struct Entry {
    spec: MarketSpec,
    /// The placement epoch it runs at.
    epoch: u64,
    control: Option<MarketControl>,
    /// A warm copy kept for a takeover (while the market runs elsewhere).
    follower: Option<market::Follower>,
    done: Option<watch::Receiver<bool>>,
    /// Set when its driver ended cleanly: stopped at a batch boundary, every output
    /// acknowledged.
    clean: std::sync::Arc<std::sync::atomic::AtomicBool>,
    arbiter: usize,
    restarts: u32,
}

/// How each arbiter opens its own NATS connection.
#[derive(Clone)]
struct OwnConnection {
    url: String,
    options: crate::bus::NatsOptions,
    name: String,
}

/// An arbiter's own connection, made on first use from that arbiter's thread.
type ArbiterBus = std::sync::Arc<tokio::sync::Mutex<Option<MarketBus>>>;

pub struct Supervisor {
    bus: MarketBus,
    /// When set, each arbiter talks to NATS through a connection of its own, whose I/O task
    /// then runs on the arbiter's thread beside its markets: publishes and acknowledgements
    /// no longer cross threads.
    own_connection: Option<OwnConnection>,
    arbiter_buses: Vec<ArbiterBus>,
    settings: MarketSettings,
    arbiters: Vec<Arbiter>,
    next: usize,
    markets: BTreeMap<String, Entry>,
    /// Markets whose start is under way: another start of one of them is refused meanwhile,
    /// so one market never gets two actors here.
    starting: BTreeSet<String>,
    shutting_down: bool,
}

impl Supervisor {
    /// A supervisor with `arbiters` threads for markets (0: one per core).
    pub fn new(bus: MarketBus, settings: MarketSettings, arbiters: usize) -> Supervisor {
        let n = if arbiters == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            arbiters
        };
        Supervisor {
            bus,
            own_connection: None,
            arbiter_buses: (0..n).map(|_| ArbiterBus::default()).collect(),
            settings,
            arbiters: (0..n).map(|_| Arbiter::new()).collect(),
            next: 0,
            markets: BTreeMap::new(),
            starting: BTreeSet::new(),
            shutting_down: false,
        }
    }
}

impl Supervisor {
    /// Gives each arbiter its own NATS connection to `url` (made when its first market starts;
    /// the shared one is used if that fails).
    pub fn with_own_connections(
        mut self,
        url: &str,
        options: &crate::bus::NatsOptions,
        name: &str,
    ) -> Supervisor {
        self.own_connection = Some(OwnConnection {
            url: url.to_string(),
            options: options.clone(),
            name: name.to_string(),
        });
        self
    }
}

/// The bus for a market on this arbiter: the arbiter's own connection (made here, on its
/// thread, the first time), else the shared one.
async fn arbiter_bus(shared: MarketBus, own: Option<OwnConnection>, slot: ArbiterBus) -> MarketBus {
    let Some(own) = own else { return shared };
    let mut slot = slot.lock().await;
    if let Some(bus) = slot.as_ref() {
        return bus.clone();
    }
    let started = std::time::Instant::now();
    match crate::bus::connect_with(&own.url, &own.name, &own.options).await {
        Ok(client) => {
            tracing::debug!(
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                "arbiter's own NATS connection made"
            );
            let bus = MarketBus {
                js: async_nats::jetstream::new(client.clone()),
                client,
                // A connection of its own: a cap of its own.
                pull_cap: crate::bus::PullCap::new(),
                ..shared
            };
            *slot = Some(bus.clone());
            bus
        }
        Err(e) => {
            tracing::warn!("{e}; this arbiter's markets use the node's shared connection");
            shared
        }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;
}

/// Start (or restart) a market on this node at a placement epoch; from its warm copy when
/// there is one. Answers once the market is consuming: whether it came from a warm copy.
#[derive(Message)]
#[rtype(result = "Result<bool, String>")]
pub struct StartMarket {
    pub spec: MarketSpec,
    /// At which epoch, in whose trace, and why (a handoff says where its owner stopped).
    pub takeover: Takeover,
}

impl StartMarket {
    /// At epoch 0: a node outside a cluster.
    pub fn standalone(spec: MarketSpec) -> StartMarket {
        StartMarket {
            spec,
            takeover: Takeover::standalone(),
        }
    }
}

/// Stop one market at a batch boundary, wait for it, and forget it. Answers where it stopped
/// (its last applied sequence and the journal's last message) and its (stopped) actor, to ask
/// about its final state; `None` when it did not run here or did not stop cleanly. `handoff`:
/// no final snapshot (another node takes it over from its own copy).
#[derive(Message)]
#[rtype(result = "Option<(StopPoint, Addr<market::MarketActor>)>")]
pub struct StopMarket {
    pub market: String,
    pub handoff: bool,
}

impl StopMarket {
    pub fn named(market: &str) -> StopMarket {
        StopMarket {
            market: market.to_string(),
            handoff: false,
        }
    }
}

/// Keep a warm copy of a market that runs elsewhere (for a planned move or a standby).
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct Follow(pub MarketSpec);

/// Drop the warm copy of a market.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unfollow(pub String);

/// How far the warm copy of a market is behind its owner (`None`: no copy here; `u64::MAX`:
/// not measured yet).
#[derive(Message)]
#[rtype(result = "Option<u64>")]
pub struct FollowerLag(pub String);

/// A planned move of this market to this node is coming: its warm copy goes ahead to the
/// journal's head (`market::Follower::go_ahead`). No effect without a copy.
#[derive(Message)]
#[rtype(result = "()")]
pub struct FollowAhead(pub String);

/// Stop every market at a batch boundary and wait for them.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

/// The markets this node holds: (symbol, running), without asking them anything.
#[derive(Message)]
#[rtype(result = "Vec<(String, bool)>")]
pub struct Held;

impl Handler<Held> for Supervisor {
    type Result = Vec<(String, bool)>;

    fn handle(&mut self, _: Held, _: &mut Self::Context) -> Self::Result {
        self.markets
            .iter()
            .filter(|(_, e)| e.control.is_some() || e.done.is_some())
            .map(|(s, e)| (s.clone(), e.control.is_some()))
            .collect()
    }
}

/// What runs here.
#[derive(Message)]
#[rtype(result = "Vec<MarketInfo>")]
pub struct ListMarkets;

/// What runs here and what is followed, from the supervisor's own list: no market is asked,
/// so no `stats` and `last_seq` 0 (cheap enough for every heartbeat of a node of thousands of
/// markets).
#[derive(Message)]
#[rtype(result = "Vec<MarketInfo>")]
pub struct ListMarketsBrief;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MarketInfo {
    pub symbol: String,
    pub running: bool,
    pub epoch: u64,
    /// A warm copy is kept here (the market runs elsewhere).
    pub following: bool,
    pub arbiter: usize,
    /// Restarts tried since the node first started it; one that failed counts too.
    pub restarts: u32,
    pub last_seq: Seq,
    /// The market's own figures, while it runs.
    pub stats: Option<market::MarketStats>,
}

#[derive(Message)]
#[rtype(result = "()")]
struct MarketEnded {
    market: String,
    error: Option<MarketError>,
}

/// Start again a market whose driver failed, unless it runs, is starting, was removed or the
/// node is shutting down; if the start fails, try again after twice `delay`.
#[derive(Message)]
#[rtype(result = "()")]
struct Restart {
    market: String,
    delay: Duration,
}

impl Handler<StartMarket> for Supervisor {
    type Result = ResponseActFuture<Self, Result<bool, String>>;

    fn handle(&mut self, msg: StartMarket, _: &mut Self::Context) -> Self::Result {
        self.start(msg.spec, msg.takeover)
    }
}

impl Supervisor {
    /// Starts `spec`'s market at `epoch` (answers once it consumes: whether from a warm copy),
    /// or answers at once if it runs.
    fn start(
        &mut self,
        spec: MarketSpec,
        takeover: Takeover,
    ) -> ResponseActFuture<Self, Result<bool, String>> {
        let epoch = takeover.epoch;
        let symbol = spec.symbol.clone();
        if self.shutting_down {
            return Box::pin(fut::ready(Err(format!(
                "{symbol}: the node is shutting down"
            ))));
        }
        if self
            .markets
            .get(&symbol)
            .is_some_and(|e| e.control.is_some())
        {
            return Box::pin(fut::ready(Ok(false)));
        }
        if self.starting.contains(&symbol) {
            return Box::pin(fut::ready(Err(format!(
                "{symbol} is being started already; ask again once it runs"
            ))));
        }
        let arbiter = match self.markets.get(&symbol) {
            Some(e) => e.arbiter,
            None => {
                self.next += 1;
                (self.next - 1) % self.arbiters.len()
            }
        };
        let (tx, rx) = oneshot::channel();
        let mut settings = self.settings.clone();
        settings.takeover = takeover.clone();
        let (bus, start_spec) = (self.bus.clone(), spec.clone());
        let (own, slot) = (
            self.own_connection.clone(),
            self.arbiter_buses[arbiter].clone(),
        );
        let follower = self
            .markets
            .get_mut(&symbol)
            .and_then(|e| e.follower.take());
        let spawned = self.arbiters[arbiter].spawn(async move {
            let bus = arbiter_bus(bus, own, slot).await;
            let started = match follower {
                Some(follower) => match follower
                    .promote(takeover)
                    .await
                {
                    Ok(running) => Ok((running, true)),
                    Err(e) => {
                        tracing::warn!(market = %start_spec.symbol, "{e}; starting from the snapshot and the stream instead");
                        market::start(bus, start_spec, settings).await.map(|r| (r, false))
                    }
                },
                None => market::start(bus, start_spec, settings).await.map(|r| (r, false)),
            };
            let _ = tx.send(started.map(|(r, warm)| (r.split(), warm)));
        });
        if !spawned {
            return Box::pin(fut::ready(Err(format!(
                "{symbol}: arbiter {arbiter} is gone"
            ))));
        }
        self.starting.insert(symbol.clone());
        Box::pin(
            fut::wrap_future::<_, Self>(rx).map(move |started, act, ctx| {
                act.starting.remove(&symbol);
                let started =
                    started.map_err(|_| format!("{symbol}: the market's start was dropped"))?;
                let ((control, join), warm) = started.map_err(|e| e.to_string())?;
                let (done_tx, done_rx) = watch::channel(false);
                let market = symbol.clone();
                let clean = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let ended_clean = clean.clone();
                ctx.spawn(fut::wrap_future::<_, Self>(join).map(move |ended, _, ctx| {
                    let error = match ended {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(e),
                        Err(e) => Some(MarketError::Nats {
                            market: market.clone(),
                            what: "driver task",
                            reason: e.to_string(),
                        }),
                    };
                    ended_clean.store(error.is_none(), std::sync::atomic::Ordering::Release);
                    let _ = done_tx.send(true);
                    ctx.notify(MarketEnded { market, error });
                }));
                let entry = act.markets.entry(symbol.clone()).or_insert(Entry {
                    spec: spec.clone(),
                    epoch,
                    control: None,
                    follower: None,
                    done: None,
                    clean: Default::default(),
                    arbiter,
                    restarts: 0,
                });
                entry.epoch = epoch;
                entry.control = Some(control);
                entry.done = Some(done_rx);
                entry.clean = clean;
                tracing::info!(market = %symbol, arbiter, epoch, warm, "market running");
                Ok(warm)
            }),
        )
    }
}

impl Handler<MarketEnded> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: MarketEnded, ctx: &mut Self::Context) {
        let Some(entry) = self.markets.get_mut(&msg.market) else {
            return;
        };
        entry.control = None;
        match msg.error {
            None => tracing::info!(market = %msg.market, "market stopped"),
            Some(e @ (MarketError::Fenced { .. } | MarketError::LeaseLapsed { .. })) => {
                // Not ours any more (or not sure): forgotten here; placement decides again.
                tracing::warn!(market = %msg.market, "{e}");
                self.markets.remove(&msg.market);
            }
            Some(e) if !self.shutting_down => {
                entry.restarts += 1;
                tracing::error!(market = %msg.market, restarts = entry.restarts, "{e}; restarting from the streams in {RESTART_DELAY:?}");
                let restart = Restart {
                    market: msg.market,
                    delay: RESTART_DELAY,
                };
                ctx.notify_later(restart, RESTART_DELAY);
            }
            Some(e) => tracing::error!(market = %msg.market, "{e}"),
        }
    }
}

impl Handler<Restart> for Supervisor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, msg: Restart, _: &mut Self::Context) -> Self::Result {
        let wanted = self.markets.get(&msg.market).filter(|e| {
            !self.shutting_down && e.control.is_none() && !self.starting.contains(&msg.market)
        });
        let Some(entry) = wanted else {
            return Box::pin(fut::ready(()));
        };
        let (spec, epoch) = (entry.spec.clone(), entry.epoch);
        // Its own market, failed here, at the same epoch: rebuilt like any unplanned start.
        let takeover = Takeover::at(epoch, TakeoverKind::Reclaim);
        Box::pin(self.start(spec, takeover).map(move |started, act, ctx| {
            let Err(e) = started else { return };
            let Some(entry) = act.markets.get_mut(&msg.market) else {
                return;
            };
            if act.shutting_down || entry.control.is_some() {
                return;
            }
            entry.restarts += 1;
            let delay = (msg.delay * 2).min(RESTART_DELAY_MAX);
            tracing::error!(market = %msg.market, restarts = entry.restarts, "restart failed: {e}; trying again in {delay:?}");
            let market = msg.market;
            ctx.notify_later(Restart { market, delay }, delay);
        }))
    }
}

impl Handler<Shutdown> for Supervisor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Shutdown, _: &mut Self::Context) -> Self::Result {
        self.shutting_down = true;
        let mut waiting = Vec::new();
        for entry in self.markets.values_mut() {
            if let Some(follower) = entry.follower.take() {
                follower.stop();
            }
            if let Some(control) = &entry.control {
                control.request_stop();
            }
            if let Some(done) = &entry.done {
                waiting.push(done.clone());
            }
        }
        Box::pin(
            fut::wrap_future::<_, Self>(async move {
                for mut done in waiting {
                    let _ = done.wait_for(|d| *d).await;
                }
            })
            .map(|(), act, _| {
                for arbiter in &act.arbiters {
                    arbiter.stop();
                }
            }),
        )
    }
}

impl Handler<StopMarket> for Supervisor {
    type Result = ResponseActFuture<Self, Option<(StopPoint, Addr<market::MarketActor>)>>;

    fn handle(&mut self, msg: StopMarket, _: &mut Self::Context) -> Self::Result {
        let Some(entry) = self.markets.remove(&msg.market) else {
            return Box::pin(fut::ready(None));
        };
        if let Some(follower) = &entry.follower {
            follower.stop();
        }
        let Some(control) = entry.control else {
            return Box::pin(fut::ready(None));
        };
        if msg.handoff {
            control.request_handoff();
        } else {
            control.request_stop();
        }
        let (done, clean) = (entry.done.clone(), entry.clean.clone());
        Box::pin(fut::wrap_future::<_, Self>(async move {
            if let Some(mut done) = done {
                let _ = done.wait_for(|d| *d).await;
            }
            // Only a clean end says where it stopped: after a failure some outputs may be
            // missing, and the next owner must republish.
            if !clean.load(std::sync::atomic::Ordering::Acquire) {
                return None;
            }
            // Recorded by the driver as it ended, so no hop to the market's thread here.
            Some((control.stopped_at()?, control.addr))
        }))
    }
}

impl Handler<Follow> for Supervisor {
    type Result = ResponseActFuture<Self, Result<(), String>>;

    fn handle(&mut self, msg: Follow, _: &mut Self::Context) -> Self::Result {
        let spec = msg.0;
        let symbol = spec.symbol.clone();
        if self.shutting_down {
            return Box::pin(fut::ready(Err(format!(
                "{symbol}: the node is shutting down"
            ))));
        }
        if self
            .markets
            .get(&symbol)
            .is_some_and(|e| e.control.is_some() || e.follower.is_some())
        {
            return Box::pin(fut::ready(Ok(())));
        }
        let arbiter = match self.markets.get(&symbol) {
            Some(e) => e.arbiter,
            None => {
                self.next += 1;
                (self.next - 1) % self.arbiters.len()
            }
        };
        let (tx, rx) = oneshot::channel();
        let (bus, settings, follow_spec) = (self.bus.clone(), self.settings.clone(), spec.clone());
        let (own, slot) = (
            self.own_connection.clone(),
            self.arbiter_buses[arbiter].clone(),
        );
        let spawned = self.arbiters[arbiter].spawn(async move {
            let bus = arbiter_bus(bus, own, slot).await;
            let _ = tx.send(market::follow(bus, follow_spec, settings).await);
        });
        if !spawned {
            return Box::pin(fut::ready(Err(format!(
                "{symbol}: arbiter {arbiter} is gone"
            ))));
        }
        Box::pin(
            fut::wrap_future::<_, Self>(rx).map(move |followed, act, _| {
                let follower = followed
                    .map_err(|_| format!("{symbol}: the warm copy's start was dropped"))?
                    .map_err(|e| e.to_string())?;
                let entry = act.markets.entry(symbol.clone()).or_insert(Entry {
                    spec,
                    epoch: 0,
                    control: None,
                    follower: None,
                    done: None,
                    clean: Default::default(),
                    arbiter,
                    restarts: 0,
                });
                if entry.control.is_some() {
                    // Started here meanwhile: the copy is not needed.
                    follower.stop();
                } else {
                    entry.follower = Some(follower);
                    tracing::info!(market = %symbol, arbiter, "warm copy following the journal");
                }
                Ok(())
            }),
        )
    }
}

impl Handler<Unfollow> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: Unfollow, _: &mut Self::Context) {
        if let Some(entry) = self.markets.get_mut(&msg.0)
            && let Some(follower) = entry.follower.take()
        {
            follower.stop();
            if entry.control.is_none() {
                self.markets.remove(&msg.0);
            }
        }
    }
}

impl Handler<FollowerLag> for Supervisor {
    type Result = Option<u64>;

    fn handle(&mut self, msg: FollowerLag, _: &mut Self::Context) -> Option<u64> {
        self.markets
            .get(&msg.0)
            .and_then(|e| e.follower.as_ref())
            .map(market::Follower::lag)
    }
}

impl Handler<FollowAhead> for Supervisor {
    type Result = ();

    fn handle(&mut self, msg: FollowAhead, _: &mut Self::Context) {
        if let Some(follower) = self.markets.get(&msg.0).and_then(|e| e.follower.as_ref()) {
            follower.go_ahead();
        }
    }
}

impl Handler<ListMarketsBrief> for Supervisor {
    type Result = Vec<MarketInfo>;

    fn handle(&mut self, _: ListMarketsBrief, _: &mut Self::Context) -> Self::Result {
        self.markets
            .iter()
            .map(|(symbol, e)| MarketInfo {
                symbol: symbol.clone(),
                running: e.control.is_some(),
                epoch: e.epoch,
                following: e.follower.is_some(),
                arbiter: e.arbiter,
                restarts: e.restarts,
                last_seq: 0,
                stats: None,
            })
            .collect()
    }
}

impl Handler<ListMarkets> for Supervisor {
    type Result = ResponseActFuture<Self, Vec<MarketInfo>>;

    fn handle(&mut self, _: ListMarkets, _: &mut Self::Context) -> Self::Result {
        type Listed = (String, Option<MarketControl>, usize, u32, u64, bool);
        let entries: Vec<Listed> = self
            .markets
            .iter()
            .map(|(s, e)| {
                (
                    s.clone(),
                    e.control.clone(),
                    e.arbiter,
                    e.restarts,
                    e.epoch,
                    e.follower.is_some(),
                )
            })
            .collect();
        // Every market at once: asked one after the other, the answer would wait for the sum
        // of every busy market's delay (each sits on an arbiter thread, maybe mid-batch).
        Box::pin(fut::wrap_future::<_, Self>(futures::future::join_all(
            entries.into_iter().map(
                |(symbol, control, arbiter, restarts, epoch, following)| async move {
                    let stats = match &control {
                        Some(c) => c.addr.send(market::Stats).await.ok(),
                        None => None,
                    };
                    MarketInfo {
                        symbol,
                        running: control.is_some(),
                        epoch,
                        following,
                        arbiter,
                        restarts,
                        last_seq: stats.as_ref().map_or(0, |s| s.last_seq),
                        stats,
                    }
                },
            ),
        )))
    }
}
