//! The control subject: `<prefix>.ctl.<verb>` requests, answered by any node (a queue group).
//! Requests are MessagePack maps (or JSON with `Content-Type: application/json`); every reply
//! is `{ok: true, ...}` or `{ok: false, error, message}`. Who may send them is decided by NATS
//! permissions (see `config/nats/permissions.conf`).
//!
//! Verbs: `market.add` (a market spec: creates the stream, stores the spec, places the market
//! on the least loaded live node, answers once it consumes), `market.remove`, `market.halt`,
//! `market.resume` (sequenced through the market's own stream on the operators' subject,
//! answered once the journal shows them applied), `market.list`, `market.move` (a planned
//! handoff), `node.list` (with load), `node.drain` and `node.undrain`. Markets may run on any
//! node: this module acts through the buckets, the streams and the nodes' own requests, never
//! on a market directly.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::watch;

use crate::actors::MarketInfo;
use crate::actors::market::MarketStatus;
use crate::book::{MarketSpec, MarketSpecInput};
use crate::wire::WireCommandOut;

pub mod protocol;

use crate::bus::{self, BusError, Journal, StreamSettings, Subjects};
use crate::cluster::handoff;
use crate::cluster::membership::{self, NodeRecord, REBALANCER_KEY, Renewal, unix_ms};
use crate::cluster::placement::{self, Placement, PlacementState};
use protocol::{
    Failure, MarketAdded, MarketHalted, MarketList, MarketMoved, MarketRemoved, MarketRow,
    MarketState, MarketUpdated, NodeDrained, NodeList, NodeRow, NodeUndrained, Request,
    reply_value,
};

/// The request header holding the time (Unix milliseconds) after which the sender no longer
/// waits for the reply. A node that takes the request later (it was stalled: paused, swapped,
/// cut off) drops it instead of carrying it out, so an operator who saw a timeout never sees
/// the verb take effect afterwards. Nodes and senders need clocks in step (NTP).
pub const DEADLINE_HEADER: &str = "Agora-Deadline";

/// When a control request's sender stops waiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline {
    unix_ms: u64,
}

impl Deadline {
    /// `timeout` from now.
    pub fn after(timeout: Duration) -> Deadline {
        Deadline {
            unix_ms: unix_ms()
                .saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    /// The header's value.
    pub fn header(&self) -> String {
        self.unix_ms.to_string()
    }

    /// Reads a header's value; `None` when it is not a number.
    pub fn parse(value: &str) -> Option<Deadline> {
        value
            .trim()
            .parse()
            .ok()
            .map(|unix_ms| Deadline { unix_ms })
    }

    /// How long ago it passed, if it has.
    pub fn passed_by(&self) -> Option<Duration> {
        let now = unix_ms();
        (now > self.unix_ms).then(|| Duration::from_millis(now - self.unix_ms))
    }
}

/// How long a halt or resume may take to be applied before the request fails.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new market may take to start consuming.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a drain may take before it answers with what is left.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(50);

/// Everything the control service acts on.
#[derive(Clone)]
pub struct Control {
    pub js: jetstream::Context,
    pub client: async_nats::Client,
    pub subjects: Subjects,
    pub streams: StreamSettings,
    pub markets: kv::Store,
    pub placement: kv::Store,
    pub nodes: kv::Store,
    /// A node not heard from for this long is dead.
    pub lease: Duration,
    /// The node answering, and why its heartbeat fails if it does (said in `market.list`:
    /// such a node runs no markets, and the others no longer see it).
    pub node: String,
    pub heartbeat: crate::cluster::membership::HeartbeatStatus,
    /// What a market added now gets for the fields its spec leaves out.
    pub market_defaults: crate::book::spec::MarketDefaults,
}

/// The control service, subscribed (`Control::listen`): `serve` answers until told to stop.
pub struct Listening {
    control: Control,
    requests: async_nats::Subscriber,
}

impl Listening {
    pub async fn serve(self, stop: watch::Receiver<bool>) -> Result<(), BusError> {
        self.control.serve(self.requests, stop).await
    }
}

/// The operator commands sent through a market's own stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AdminOp {
    Halt,
    Resume,
}

/// The placement bucket read once: each market's placement with its revision, and the
/// drained nodes.
#[derive(Default)]
struct Placements {
    markets: HashMap<String, (Placement, u64)>,
    drained: std::collections::BTreeSet<String>,
}

impl Placements {
    /// How many markets the placement bucket gives each node.
    fn placed_per_node(&self) -> HashMap<&str, usize> {
        let mut out = HashMap::new();
        for (p, _) in self.markets.values() {
            *out.entry(p.node.as_str()).or_insert(0) += 1;
        }
        out
    }
}

/// One try of a request that waits up to a lease for the nodes bucket to agree
/// (`Control::within_one_lease`).
enum Attempt<T> {
    Done(T),
    /// Refused for good: waiting would not change the answer.
    Refuse(Failure),
    /// Refused for now, with the answer should the lease run out.
    Retry(Failure),
}

/// A node's record and whether it is alive (renewed within twice the lease, by the server's
/// timestamps: this is for choosing and showing, never for ownership).
struct NodeEntry {
    record: NodeRecord,
    alive: bool,
    age_ms: u64,
}

impl Control {
    /// Answers control requests until `stop` flips. One node of a cluster answers each request
    /// (a queue group).
    /// Subscribes to the control subject, and makes sure the server has the subscription
    /// (a node says it is ready only once it answers control requests).
    pub async fn listen(self) -> Result<Listening, BusError> {
        let subject = self.subjects.ctl(">");
        let group = format!("{}-ctl", self.subjects.prefix());
        let requests = bus::subscribe_flushed(&self.client, &subject, Some(&group)).await?;
        Ok(Listening {
            control: self,
            requests,
        })
    }

    async fn serve(
        self,
        mut requests: async_nats::Subscriber,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), BusError> {
        // `<prefix>.ctl.`: what follows is the verb.
        let prefix = self.subjects.ctl("");
        loop {
            let request = tokio::select! {
                _ = stop.changed() => return Ok(()),
                r = requests.next() => r,
            };
            let Some(request) = request else {
                return Ok(());
            };
            let Some(reply_to) = request.reply.clone() else {
                continue;
            };
            let json = request
                .headers
                .as_ref()
                .and_then(|h| h.get("Content-Type"))
                .is_some_and(|v| v.as_str().starts_with("application/json"));
            let verb = request
                .subject
                .as_str()
                .strip_prefix(&prefix)
                .unwrap_or("")
                .to_string();
            let deadline = request
                .headers
                .as_ref()
                .and_then(|h| h.get(DEADLINE_HEADER))
                .and_then(|v| Deadline::parse(v.as_str()));
            if let Some(late) = deadline.and_then(|d| d.passed_by()) {
                // The sender has given up: doing it now would surprise the operator.
                tracing::warn!(
                    verb,
                    "control request dropped: its sender stopped waiting {:.1} s ago (this node took it late: was it paused or cut off?)",
                    late.as_secs_f64()
                );
                continue;
            }
            let reply = match Request::decode(&verb, &request.payload, json) {
                Ok(request) => self.handle(request).await,
                Err(failure) => reply_value::<()>(&Err(failure)),
            };
            tracing::info!(verb, ok = %reply["ok"], "control request");
            let bytes = if json {
                serde_json::to_vec(&reply).unwrap_or_default()
            } else {
                rmp_serde::to_vec_named(&reply).unwrap_or_default()
            };
            let _ = self.client.publish(reply_to, bytes.into()).await;
        }
    }

    /// The answer to one request, as it travels (`{ok: true, ...}` or `{ok: false, ...}`).
    pub async fn handle(&self, request: Request) -> Value {
        match request {
            Request::MarketAdd(input) => reply_value(&self.add(input).await),
            Request::MarketUpdate(input) => reply_value(&self.update(input).await),
            Request::MarketRemove(r) => reply_value(&self.remove(&r.symbol).await),
            Request::MarketHalt(r) => {
                reply_value(&self.admin(&r.symbol, AdminOp::Halt, r.cancel_orders).await)
            }
            Request::MarketResume(r) => {
                reply_value(&self.admin(&r.symbol, AdminOp::Resume, false).await)
            }
            Request::MarketList => reply_value(&Ok::<_, Failure>(self.list().await)),
            Request::MarketMove(r) => reply_value(&self.move_market(&r.symbol, &r.node).await),
            Request::NodeList => reply_value(&Ok::<_, Failure>(self.node_list().await)),
            Request::NodeDrain(r) => reply_value(&self.drain(&r.node).await),
            Request::NodeUndrain(r) => reply_value(&self.undrain(&r.node).await),
        }
    }

    /// Every node record, alive or not, by node name (none when the bucket cannot be read).
    async fn node_entries(&self) -> Vec<NodeEntry> {
        self.read_node_entries().await.unwrap_or_default()
    }

    /// Every node record, alive or not, by node name.
    async fn read_node_entries(&self) -> Result<Vec<NodeEntry>, BusError> {
        let mut out = Vec::new();
        let mut entries = bus::bucket_entries(&self.client, &self.nodes).await?;
        // Renewals without load (`load_every_ms`): (instance, when) by node.
        let renewed: std::collections::HashMap<String, (u64, u64)> = entries
            .iter()
            .filter_map(|e| {
                let node = membership::renewed_node(&e.key)?;
                let renewal = serde_json::from_slice::<Renewal>(&e.value).ok()?;
                Some((node.to_string(), (renewal.instance, e.created_ms)))
            })
            .collect();
        entries.retain(|e| !e.key.contains('.'));
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        let now = unix_ms();
        for entry in entries {
            let Ok(record) = serde_json::from_slice::<NodeRecord>(&entry.value) else {
                continue;
            };
            let last = match renewed.get(&entry.key) {
                Some(&(instance, at)) if instance == record.instance => at.max(entry.created_ms),
                _ => entry.created_ms,
            };
            let age_ms = now.saturating_sub(last);
            out.push(NodeEntry {
                record,
                alive: u128::from(age_ms) < 2 * self.lease.as_millis(),
                age_ms,
            });
        }
        Ok(out)
    }

    /// Tries `attempt` every 100 ms for up to one lease, until it is done or refuses; then
    /// the last reason to try again is the answer. A busy node renews its record late and a
    /// busy server reads the bucket slowly: neither may make a live node look dead.
    async fn within_one_lease<T>(
        &self,
        mut attempt: impl AsyncFnMut() -> Attempt<T>,
    ) -> Result<T, Failure> {
        let deadline = Instant::now() + self.lease;
        loop {
            match attempt().await {
                Attempt::Done(value) => return Ok(value),
                Attempt::Refuse(failure) => return Err(failure),
                Attempt::Retry(failure) if Instant::now() >= deadline => return Err(failure),
                Attempt::Retry(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Waits until `node` is alive, for up to one lease. A node the bucket has no record of is
    /// refused at once.
    async fn live_node(&self, node: &str) -> Result<(), Failure> {
        self.within_one_lease(async || match self.read_node_entries().await {
            Ok(nodes) => match nodes.iter().find(|n| n.record.node == node) {
                Some(n) if n.alive => Attempt::Done(()),
                Some(n) => Attempt::Retry(Failure::new(
                    "unknown_node",
                    format!(
                        "{node} is not a live node: its last heartbeat is {} ms old (alive means within {} ms); node.list shows them",
                        n.age_ms,
                        2 * self.lease.as_millis()
                    ),
                )),
                None => Attempt::Refuse(Failure::new(
                    "unknown_node",
                    format!("{node} is not a node; node.list shows them"),
                )),
            },
            Err(e) => Attempt::Retry(Failure::new(
                "kv",
                format!("cannot tell whether {node} is alive: {e}; ask again"),
            )),
        })
        .await
    }

    async fn placement_of(&self, market: &str) -> Result<Option<(Placement, u64)>, Failure> {
        match self.placement.entry(market).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => {
                Ok(Placement::decode(&e.value).map(|p| (p, e.revision)))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(Failure::new(
                "kv",
                format!("cannot read the placement of {market}: {e}"),
            )),
        }
    }

    /// Every market's placement and every drained node, read in one pass over the bucket.
    async fn placements(&self) -> Result<Placements, bus::BusError> {
        let mut out = Placements::default();
        for e in bus::bucket_entries(&self.client, &self.placement).await? {
            if let Some(node) = placement::drained_node(&e.key) {
                out.drained.insert(node.to_string());
            } else if !e.key.contains('.')
                && let Some(p) = Placement::decode(&e.value)
            {
                out.markets.insert(e.key, (p, e.revision));
            }
        }
        Ok(out)
    }

    async fn drained(&self) -> std::collections::BTreeSet<String> {
        self.placements().await.unwrap_or_default().drained
    }

    /// The spec stored for `symbol`: `None` when none is, `Some(None)` when the stored one
    /// cannot be used (it does not decode or validate).
    async fn stored_spec(&self, symbol: &str) -> Result<Option<Option<MarketSpec>>, Failure> {
        match self.markets.get(symbol).await {
            Ok(Some(bytes)) => Ok(Some(
                serde_json::from_slice::<MarketSpecInput>(&bytes)
                    .ok()
                    .and_then(|i| i.validate().ok()),
            )),
            Ok(None) => Ok(None),
            Err(e) => Err(Failure::new(
                "kv",
                format!("cannot read the market specs: {e}"),
            )),
        }
    }

    async fn add(&self, input: MarketSpecInput) -> Result<MarketAdded, Failure> {
        let spec = input
            .with_defaults(&self.market_defaults)
            .validate()
            .map_err(|e| {
                Failure::new("invalid_spec", format!("{} (field {})", e.message, e.field))
            })?;
        let symbol = spec.symbol.clone();
        let created = match self.stored_spec(&symbol).await? {
            Some(stored) => {
                if stored.as_ref() != Some(&spec) {
                    return Err(Failure::new(
                        "market_exists",
                        format!(
                            "{symbol} exists with another spec; remove it first (market.remove)"
                        ),
                    ));
                }
                false
            }
            None => {
                let bytes = serde_json::to_vec(&spec.to_input()).unwrap_or_default();
                match self.markets.create(&symbol, bytes.into()).await {
                    Ok(_) => true,
                    // Added meanwhile (another operator, a node starting): the same spec is
                    // as good, another is refused.
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                        let stored = self.stored_spec(&symbol).await?.flatten();
                        if stored.as_ref() != Some(&spec) {
                            return Err(Failure::new(
                                "market_exists",
                                format!(
                                    "{symbol} was added meanwhile with another spec; market.list shows it"
                                ),
                            ));
                        }
                        false
                    }
                    Err(e) => {
                        return Err(Failure::new(
                            "kv",
                            format!("{symbol} could not be stored: {e}"),
                        ));
                    }
                }
            }
        };
        let mut stream =
            bus::ensure_market_stream(&self.js, &self.subjects, &symbol, &self.streams)
                .await
                .map_err(|e| Failure::new("stream", e.to_string()))?;
        // A market added again after market.remove resumes its kept stream: commands stored
        // before the removal and never applied are applied now.
        let stored = stream
            .info()
            .await
            .map(|i| i.state.last_sequence)
            .unwrap_or(0);
        let pending = stored.saturating_sub(self.journal_last_seq(&symbol).await);
        let (node, epoch) = self.place_and_wait(&symbol).await?;
        Ok(MarketAdded {
            orders: self.subjects.orders(&symbol),
            market: symbol,
            created,
            node,
            epoch,
            pending_applied: pending,
        })
    }

    /// Places a market that has no placement on the least loaded live node, and waits until
    /// it runs. Answers where it runs.
    async fn place_and_wait(&self, symbol: &str) -> Result<(String, u64), Failure> {
        let nodes = self.node_entries().await;
        let alive = |node: &str| nodes.iter().any(|n| n.alive && n.record.node == node);
        // Announcements are awaited from before the market is placed.
        let mut status = self
            .client
            .subscribe(self.subjects.status(symbol))
            .await
            .map_err(|e| Failure::new("nats", e.to_string()))?;
        match self.placement_of(symbol).await? {
            Some((p, _)) if p.state == PlacementState::Active && alive(&p.node) => {
                return Ok((p.node, p.epoch));
            }
            Some(_) => {}
            None => {
                // Markets placed on each node, from the placement bucket (read once, with the
                // drained nodes): a node's own record says what it ran at its last heartbeat,
                // so a node that has just started (or been given markets) looks emptier than
                // it is there.
                let placements = self.placements().await.unwrap_or_default();
                let drained = &placements.drained;
                let placed = placements.placed_per_node();
                let load = |n: &NodeEntry| {
                    (
                        placed
                            .get(n.record.node.as_str())
                            .copied()
                            .unwrap_or(0)
                            .max(n.record.markets.len()),
                        n.record.commands_per_sec,
                    )
                };
                let node = nodes
                    .iter()
                    .filter(|n| n.alive && !drained.contains(&n.record.node))
                    .min_by(|a, b| {
                        load(a)
                            .partial_cmp(&load(b))
                            .unwrap_or(std::cmp::Ordering::Equal)
                    })
                    .map(|n| n.record.node.clone())
                    .ok_or_else(|| {
                        Failure::new(
                            "no_nodes",
                            format!("no live node can take {symbol}; start a node (agora node) and try again"),
                        )
                    })?;
                // Placed meanwhile (by the rebalancer) is as good.
                let _ = self
                    .placement
                    .create(symbol, Placement::assigned(&node, 1).encode().into())
                    .await;
            }
        }
        let started = Instant::now();
        loop {
            let left = START_TIMEOUT.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, status.next()).await {
                Ok(Some(m)) => {
                    if let Some(s) = MarketStatus::decode(&m.payload)
                        && s.is_active()
                    {
                        return Ok((s.node, s.epoch));
                    }
                }
                _ => {
                    return Err(Failure::new(
                        "start_timeout",
                        format!(
                            "{symbol} is placed but did not start within {START_TIMEOUT:?}; market.list shows where it is placed, the node's log why it did not start"
                        ),
                    ));
                }
            }
        }
    }

    async fn remove(&self, symbol: &str) -> Result<MarketRemoved, Failure> {
        let placed = self.placement_of(symbol).await?;
        let stored = matches!(self.markets.get(symbol).await, Ok(Some(_)));
        if placed.is_none() && !stored {
            return Err(Failure::new(
                "unknown_market",
                format!("{symbol} is not a market; market.list shows them"),
            ));
        }
        let mut status = self
            .client
            .subscribe(self.subjects.status(symbol))
            .await
            .map_err(|e| Failure::new("nats", e.to_string()))?;
        // The stream stops taking commands first: from now on publishing to the market fails
        // at once, and nothing is stored for a market nobody will run.
        let stream_last = bus::detach_market_stream(&self.js, &self.subjects, symbol)
            .await
            .map_err(|e| Failure::new("stream", e.to_string()))?;
        // Then the spec, so the rebalancer does not place it again.
        if stored {
            self.markets.delete(symbol).await.map_err(|e| {
                Failure::new("kv", format!("cannot delete the spec of {symbol}: {e}"))
            })?;
        }
        let mut stopped = false;
        if let Some((p, _)) = &placed {
            self.placement.delete(symbol).await.map_err(|e| {
                Failure::new(
                    "kv",
                    format!("cannot delete the placement of {symbol}: {e}"),
                )
            })?;
            let live = self
                .node_entries()
                .await
                .iter()
                .any(|n| n.alive && n.record.node == p.node);
            let started = Instant::now();
            while live && started.elapsed() < APPLY_TIMEOUT {
                let left = APPLY_TIMEOUT.saturating_sub(started.elapsed());
                match tokio::time::timeout(left, status.next()).await {
                    Ok(Some(m)) => {
                        if MarketStatus::decode(&m.payload).is_some_and(|s| !s.is_active()) {
                            stopped = true;
                            break;
                        }
                    }
                    _ => break,
                }
            }
        }
        // Commands the stream took before the removal that the market did not apply: they
        // are applied if the market is added again (and said so then), never silently.
        let applied = self.journal_last_seq(symbol).await;
        let unapplied = stream_last.map_or(0, |last| last.saturating_sub(applied));
        Ok(MarketRemoved {
            market: symbol.to_string(),
            stopped,
            unapplied,
            message: format!(
                "the market no longer takes orders (publishing to it fails at once); its streams are kept (history, and a new market.add with the same spec resumes it){}",
                if unapplied > 0 {
                    format!(
                        "; {unapplied} commands that arrived before the removal were not applied and will be if it is added again"
                    )
                } else {
                    String::new()
                }
            ),
        })
    }

    /// Sends a new spec through the market's stream (so it is sequenced with the orders and
    /// every replay applies it at the same point), and answers once it is applied, or with
    /// the market's refusal (a new tick that open orders are off, say).
    async fn update(&self, input: MarketSpecInput) -> Result<MarketUpdated, Failure> {
        let symbol = input.symbol.clone();
        input.validate().map_err(|e| {
            Failure::new("invalid_spec", format!("{} (field {})", e.message, e.field))
        })?;
        let Some(stored) = self.stored_spec(&symbol).await?.flatten() else {
            return Err(Failure::new(
                "unknown_market",
                format!(
                    "{symbol} is not a market; add it with market.add (market.list shows them)"
                ),
            ));
        };
        // What the update leaves out that it may (the cid window) stays as it is.
        let spec = stored.complete_update(&input).validate().map_err(|e| {
            Failure::new("invalid_spec", format!("{} (field {})", e.message, e.field))
        })?;
        // What may not change is refused here already, with the field named.
        stored.update_rules(&input).map_err(|e| {
            Failure::new("invalid_spec", format!("{} (field {})", e.message, e.field))
        })?;
        let command = WireCommandOut {
            op: "update_spec".into(),
            account: "operator".into(),
            spec: Some(spec.to_input()),
            ..WireCommandOut::default()
        };
        let seq = self.send_admin(&symbol, &command).await?;
        self.wait_applied(&symbol, seq, "update_spec").await?;
        if let Some(message) = self.refusal(&symbol, seq).await {
            return Err(Failure::new("refused", message));
        }
        Ok(MarketUpdated {
            market: symbol,
            seq,
            spec: spec.to_input(),
        })
    }

    /// The journal's reader.
    async fn journal(&self) -> Result<Journal, Failure> {
        Journal::open(&self.js, &self.subjects)
            .await
            .map_err(|e| Failure::new("stream", e.to_string()))
    }

    /// The last input sequence the market's journal covers (0: none, or unreadable).
    async fn journal_last_seq(&self, symbol: &str) -> u64 {
        match self.journal().await {
            Ok(journal) => journal.last_seq(symbol).await.unwrap_or(0),
            Err(_) => 0,
        }
    }

    /// The `rejected` event the journal holds for the command at `seq`, if any.
    async fn refusal(&self, symbol: &str, seq: u64) -> Option<String> {
        // The journal message covering `seq` is the last one or close before it.
        let journal = self.journal().await.ok()?;
        let payload = journal.batch_covering(symbol, seq, 64).await.ok()??;
        let batch: Value = rmp_serde::from_slice(&payload).ok()?;
        batch["events"].as_array()?.iter().find_map(|e| {
            (e["type"] == "rejected" && e["seq"].as_u64() == Some(seq))
                .then(|| e["message"].as_str().unwrap_or("refused").to_string())
        })
    }

    /// Publishes an operator command on the market's admin subject; answers its sequence.
    async fn send_admin(&self, symbol: &str, command: &WireCommandOut) -> Result<u64, Failure> {
        if self.placement_of(symbol).await?.is_none() {
            return Err(Failure::new(
                "unknown_market",
                format!("{symbol} is not a running market; market.list shows them"),
            ));
        }
        let bytes = rmp_serde::to_vec_named(command).unwrap_or_default();
        Ok(self
            .js
            .publish(self.subjects.admin(symbol), bytes.into())
            .await
            .map_err(|e| Failure::new("publish", e.to_string()))?
            .await
            .map_err(|e| Failure::new("publish", e.to_string()))?
            .sequence)
    }

    /// Sends halt or resume through the market's stream and waits until it is applied.
    async fn admin(
        &self,
        symbol: &str,
        op: AdminOp,
        cancel_orders: bool,
    ) -> Result<MarketHalted, Failure> {
        let halt = op == AdminOp::Halt;
        let name = if halt { "halt" } else { "resume" };
        let command = WireCommandOut {
            op: name.into(),
            account: "operator".into(),
            cancel_orders: halt.then_some(cancel_orders),
            ..WireCommandOut::default()
        };
        let seq = self.send_admin(symbol, &command).await?;
        self.wait_applied(symbol, seq, name).await?;
        Ok(MarketHalted {
            market: symbol.to_string(),
            seq,
            halted: halt,
        })
    }

    /// Waits until the market's journal covers `seq`, wherever the market runs.
    async fn wait_applied(&self, symbol: &str, seq: u64, op: &str) -> Result<(), Failure> {
        let journal = self.journal().await?;
        if journal
            .wait_covers(symbol, seq, APPLY_TIMEOUT, Duration::from_millis(10))
            .await
        {
            return Ok(());
        }
        Err(Failure::new(
            "timeout",
            format!(
                "{op} was sent at stream sequence {seq} but not applied within {APPLY_TIMEOUT:?}; is the market running (market.list)?"
            ),
        ))
    }

    /// Every market: its placement, and its figures from the node running it.
    async fn list(&self) -> MarketList {
        let (mut symbols, listing) = match bus::bucket_keys(&self.client, &self.markets).await {
            Ok(keys) => (keys, None),
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        symbols.sort();
        let nodes = self.node_entries().await;
        // Each market as the node running it (or restarting it) says, with that node's name.
        let mut running: std::collections::BTreeMap<String, (MarketInfo, String)> =
            Default::default();
        let alive: Vec<&NodeEntry> = nodes.iter().filter(|n| n.alive).collect();
        let asked =
            futures::future::join_all(alive.iter().map(|n| self.markets_of(&n.record.node))).await;
        for (n, markets) in alive.into_iter().zip(asked) {
            let Some(markets) = markets else { continue };
            for m in markets {
                // A node that runs the market wins over one restarting it or following it.
                if m.following && !m.running {
                    continue;
                }
                if m.running || !running.contains_key(&m.symbol) {
                    running.insert(m.symbol.clone(), (m, n.record.node.clone()));
                }
            }
        }
        let mut placements = self.placements().await.unwrap_or_default().markets;
        let mut markets = Vec::new();
        for symbol in symbols {
            let placed = placements.remove(&symbol);
            let state = if placed.is_some() {
                MarketState::Starting
            } else {
                MarketState::Unplaced
            };
            let mut row = MarketRow {
                node: placed.as_ref().map(|(p, _)| p.node.clone()),
                epoch: placed.as_ref().map(|(p, _)| p.epoch),
                placement: placed.as_ref().map(|(p, _)| p.state),
                preferred: nodes
                    .iter()
                    .filter(|n| n.record.prefers.contains(&symbol))
                    .map(|n| n.record.node.clone())
                    .collect(),
                ..MarketRow::new(symbol, state)
            };
            match running.remove(&row.symbol) {
                Some((m, node)) if !m.running => {
                    row.node = Some(node);
                    row.state = MarketState::Restarting;
                    row.restarts = Some(m.restarts);
                }
                Some((m, node)) => {
                    row.running = true;
                    row.node = Some(node);
                    row.restarts = Some(m.restarts);
                    row.last_seq = Some(m.last_seq);
                    let halted = m.stats.as_ref().is_some_and(|s| s.halted);
                    row.state = if halted {
                        MarketState::Halted
                    } else {
                        MarketState::Active
                    };
                    if let Some(stats) = m.stats {
                        row.resting_orders = Some(stats.resting_orders);
                        row.stop_orders = Some(stats.stop_orders);
                        row.bid_levels = Some(stats.bid_levels);
                        row.ask_levels = Some(stats.ask_levels);
                        row.commands_per_sec = Some(stats.commands_per_sec);
                        row.snapshot_seq = Some(stats.snapshot_seq);
                    }
                }
                None => {}
            }
            markets.push(row);
        }
        let mut problems: Vec<String> = listing.into_iter().collect();
        if let Some((since, why)) = self.heartbeat.failing() {
            let problem = format!(
                "node {} runs no markets: its heartbeat has failed for {:.0} s ({why})",
                self.node,
                since.as_secs_f64()
            );
            for m in &mut markets {
                if m.node.as_deref() == Some(self.node.as_str()) && !m.running {
                    m.reason = Some(problem.clone());
                }
            }
            problems.push(problem);
        }
        MarketList { markets, problems }
    }

    async fn node_list(&self) -> NodeList {
        let drained = self.drained().await;
        let rebalancer = match self.nodes.get(REBALANCER_KEY).await {
            Ok(Some(holder)) => Some(String::from_utf8_lossy(&holder).into_owned()),
            _ => None,
        };
        let now = unix_ms();
        let entries = self.node_entries().await;
        // What each live node runs, as it says now: its record says it as of its last
        // heartbeat, which misses a market started since (one placed by `market.add` just now).
        let asked = futures::future::join_all(entries.iter().map(|n| async move {
            if n.alive {
                self.markets_of(&n.record.node).await
            } else {
                None
            }
        }))
        .await;
        let nodes = entries
            .into_iter()
            .zip(asked)
            .map(|(n, asked)| {
                let r = n.record;
                let (market_names, following) = match asked {
                    Some(markets) => {
                        let running = markets
                            .iter()
                            .filter(|m| m.running)
                            .map(|m| m.symbol.clone())
                            .collect::<Vec<_>>();
                        let following = markets
                            .iter()
                            .filter(|m| m.following && !m.running)
                            .map(|m| m.symbol.clone())
                            .collect();
                        (running, following)
                    }
                    None => (
                        r.markets.iter().map(|m| m.symbol.clone()).collect(),
                        r.following,
                    ),
                };
                NodeRow {
                    alive: n.alive,
                    last_heartbeat_ms_ago: n.age_ms,
                    draining: drained.contains(&r.node),
                    rebalancer: rebalancer.as_deref() == Some(r.node.as_str()),
                    markets: market_names.len(),
                    market_names,
                    following,
                    commands_per_sec: r.commands_per_sec,
                    cpu_pct: r.cpu_pct,
                    uptime_secs: now.saturating_sub(r.started_unix_ms) / 1000,
                    node: r.node,
                }
            })
            .collect();
        NodeList { nodes, rebalancer }
    }

    /// What a node runs and follows, as it answers `<prefix>.node.<ID>.markets` (`None`: no
    /// answer within 2 s).
    async fn markets_of(&self, node: &str) -> Option<Vec<MarketInfo>> {
        let subject = self.subjects.node(node, "markets");
        let asked = tokio::time::timeout(
            Duration::from_secs(2),
            self.client.request(subject, "{}".into()),
        )
        .await;
        let Ok(Ok(answer)) = asked else { return None };
        serde_json::from_slice::<protocol::node::Markets>(&answer.payload)
            .ok()
            .map(|a| a.markets)
    }

    async fn move_market(&self, symbol: &str, node: &str) -> Result<MarketMoved, Failure> {
        self.live_node(node).await?;
        let moved = handoff::move_market(
            &self.client,
            &self.subjects,
            &self.placement,
            symbol,
            node,
            Duration::from_secs(40),
        )
        .await
        .map_err(|e| Failure::new(e.error, e.message))?;
        Ok(MarketMoved {
            market: moved.market,
            from: moved.from,
            to: moved.to,
            epoch: moved.epoch,
            seq: moved.seq,
            pause_ms: moved.pause_us as f64 / 1000.0,
            lag: moved.lag,
            state_hash: moved.state_hash,
            state_hash_equal: moved.state_hash_equal,
        })
    }

    /// Marks the node drained (nothing is placed on it) and waits until the rebalancer moved
    /// its markets away.
    async fn drain(&self, node: &str) -> Result<NodeDrained, Failure> {
        // Another node must be alive to take the markets; as for a move, a heartbeat late by
        // less than one lease does not count as none.
        self.within_one_lease(async || {
            let nodes = match self.read_node_entries().await {
                Ok(nodes) => nodes,
                Err(e) => {
                    return Attempt::Retry(Failure::new(
                        "kv",
                        format!("cannot read the node records to drain {node}: {e}; ask again"),
                    ));
                }
            };
            if !nodes.iter().any(|n| n.record.node == node) {
                return Attempt::Refuse(Failure::new(
                    "unknown_node",
                    format!("{node} is not a node; node.list shows them"),
                ));
            }
            let drained = self.drained().await;
            if nodes
                .iter()
                .any(|n| n.alive && n.record.node != node && !drained.contains(&n.record.node))
            {
                Attempt::Done(())
            } else {
                Attempt::Retry(Failure::new(
                    "no_target",
                    format!("no other live node can take the markets of {node}; start one first"),
                ))
            }
        })
        .await?;
        self.placement
            .put(placement::drain_key(node), "1".into())
            .await
            .map_err(|e| Failure::new("kv", format!("cannot mark {node} drained: {e}")))?;
        let started = Instant::now();
        loop {
            // A reading that failed says nothing: the drain is not over until one says so.
            let listed = self.placements().await;
            let left: Vec<String> = listed
                .as_ref()
                .map(|p| {
                    p.markets
                        .iter()
                        .filter(|(_, (p, _))| p.node == node)
                        .map(|(market, _)| market.clone())
                        .collect()
                })
                .unwrap_or_default();
            // Placed elsewhere, and the node says (at its next heartbeat) that it runs none of
            // them: then `node.list` shows it empty too. A dead node's record never changes.
            let still_running = || async {
                self.node_entries()
                    .await
                    .into_iter()
                    .any(|n| n.alive && n.record.node == node && !n.record.markets.is_empty())
            };
            if listed.is_ok() && left.is_empty() && !still_running().await {
                return Ok(NodeDrained {
                    node: node.to_string(),
                    markets_left: 0,
                    elapsed_ms: started.elapsed().as_millis() as u64,
                });
            }
            if started.elapsed() > DRAIN_TIMEOUT {
                return Err(Failure::new(
                    "drain_incomplete",
                    if left.is_empty() {
                        format!(
                            "{node}'s markets are placed elsewhere, but its heartbeat still lists some after {DRAIN_TIMEOUT:?}; node.list shows them, its log why"
                        )
                    } else {
                        format!(
                            "{node} still holds {} after {DRAIN_TIMEOUT:?} (moves go one at a time); ask again to keep waiting",
                            left.join(", ")
                        )
                    },
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn undrain(&self, node: &str) -> Result<NodeUndrained, Failure> {
        let known = self
            .node_entries()
            .await
            .iter()
            .any(|n| n.record.node == node);
        if !known && !self.drained().await.contains(node) {
            return Err(Failure::new(
                "unknown_node",
                format!("{node} is not a node and is not drained; node.list shows them"),
            ));
        }
        self.placement
            .delete(placement::drain_key(node))
            .await
            .map_err(|e| Failure::new("kv", format!("cannot clear the drain of {node}: {e}")))?;
        Ok(NodeUndrained {
            node: node.to_string(),
            draining: false,
        })
    }
}
