//! The control subject: `<prefix>.ctl.<verb>` requests, answered by the node. Requests are
//! MessagePack maps (or JSON with `Content-Type: application/json`); every reply is
//! `{ok: true, ...}` or `{ok: false, error, message}`. Who may send them is decided by NATS
//! permissions (see `config/nats/permissions.conf`).
//!
//! Verbs: `market.add` (a market spec: creates the stream, stores the spec, starts the market,
//! answers once it consumes), `market.remove`, `market.halt`, `market.resume` (sequenced through
//! the market's own stream on the operators' subject, answered once applied), `market.list`,
//! `node.list`. This module must never change a market except through its stream or its actor.

use std::time::{Duration, Instant};

use actix::Addr;
use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::actors::{ListMarkets, StartMarket, StopMarket, Supervisor};
use crate::book::{MarketSpec, MarketSpecInput};
use crate::bus::{self, BusError, StreamSettings, Subjects};

/// How long a halt or resume may take to be applied before the request fails.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the control service acts on.
#[derive(Clone)]
pub struct Control {
    pub js: jetstream::Context,
    pub client: async_nats::Client,
    pub subjects: Subjects,
    pub streams: StreamSettings,
    pub markets: kv::Store,
    pub supervisor: Addr<Supervisor>,
    pub node_id: String,
    pub started: Instant,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SymbolRequest {
    symbol: String,
    #[serde(default)]
    cancel_orders: bool,
}

fn err(error: &str, message: impl Into<String>) -> Value {
    json!({"ok": false, "error": error, "message": message.into()})
}

fn decode<T: for<'de> Deserialize<'de>>(
    payload: &[u8],
    json: bool,
    what: &str,
) -> Result<T, Value> {
    let decoded = if json {
        serde_json::from_slice(payload).map_err(|e| e.to_string())
    } else {
        rmp_serde::from_slice(payload).map_err(|e| e.to_string())
    };
    decoded.map_err(|e| err("bad_request", format!("the request is not {what}: {e}")))
}

impl Control {
    /// Answers control requests until `stop` flips. One node of a cluster answers each request
    /// (a queue group).
    pub async fn serve(self, mut stop: watch::Receiver<bool>) -> Result<(), BusError> {
        let subject = self.subjects.ctl(">");
        let mut requests = self
            .client
            .queue_subscribe(subject.clone(), format!("{}-ctl", self.subjects.prefix()))
            .await
            .map_err(|e| BusError::Subscribe {
                subject,
                reason: e.to_string(),
            })?;
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
            let reply = self.handle(&verb, &request.payload, json).await;
            tracing::info!(verb, ok = %reply["ok"], "control request");
            let bytes = if json {
                serde_json::to_vec(&reply).unwrap_or_default()
            } else {
                rmp_serde::to_vec_named(&reply).unwrap_or_default()
            };
            let _ = self.client.publish(reply_to, bytes.into()).await;
        }
    }

    /// The answer to one request.
    pub async fn handle(&self, verb: &str, payload: &[u8], json: bool) -> Value {
        let result = match verb {
            "market.add" => match decode::<MarketSpecInput>(payload, json, "a market spec") {
                Ok(input) => self.add(input).await,
                Err(e) => Err(e),
            },
            "market.remove" | "market.halt" | "market.resume" => {
                match decode::<SymbolRequest>(payload, json, "{symbol}") {
                    Ok(r) if verb == "market.remove" => self.remove(&r.symbol).await,
                    Ok(r) if verb == "market.halt" => {
                        self.admin(&r.symbol, "halt", r.cancel_orders).await
                    }
                    Ok(r) => self.admin(&r.symbol, "resume", false).await,
                    Err(e) => Err(e),
                }
            }
            "market.list" => Ok(self.list().await),
            "node.list" => Ok(self.nodes().await),
            _ => Err(err(
                "unknown_verb",
                format!(
                    "{verb:?} is not a control verb; use market.add, market.remove, market.halt, market.resume, market.list or node.list"
                ),
            )),
        };
        result.unwrap_or_else(|e| e)
    }

    async fn running(&self, symbol: &str) -> bool {
        self.supervisor
            .send(ListMarkets)
            .await
            .is_ok_and(|markets| markets.iter().any(|m| m.symbol == symbol && m.running))
    }

    async fn add(&self, input: MarketSpecInput) -> Result<Value, Value> {
        let spec = input
            .validate()
            .map_err(|e| err("invalid_spec", format!("{} (field {})", e.message, e.field)))?;
        let symbol = spec.symbol.clone();
        let created = match self.markets.get(&symbol).await {
            Ok(Some(bytes)) => {
                let stored: Option<MarketSpec> = serde_json::from_slice::<MarketSpecInput>(&bytes)
                    .ok()
                    .and_then(|i| i.validate().ok());
                if stored.as_ref() != Some(&spec) {
                    return Err(err(
                        "market_exists",
                        format!(
                            "{symbol} exists with another spec; remove it first (market.remove)"
                        ),
                    ));
                }
                false
            }
            Ok(None) => {
                let bytes = serde_json::to_vec(&spec.to_input()).unwrap_or_default();
                self.markets
                    .create(&symbol, bytes.into())
                    .await
                    .map_err(|e| {
                        err(
                            "market_exists",
                            format!("{symbol} could not be stored (added meanwhile?): {e}"),
                        )
                    })?;
                true
            }
            Err(e) => return Err(err("kv", format!("cannot read the market specs: {e}"))),
        };
        bus::ensure_market_stream(&self.js, &self.subjects, &symbol, &self.streams)
            .await
            .map_err(|e| err("stream", e.to_string()))?;
        self.supervisor
            .send(StartMarket(spec))
            .await
            .map_err(|e| err("node", format!("the supervisor is gone: {e}")))?
            .map_err(|e| err("start_failed", e))?;
        Ok(json!({
            "ok": true,
            "market": symbol,
            "created": created,
            "node": self.node_id,
            "orders": self.subjects.orders(&symbol),
        }))
    }

    async fn remove(&self, symbol: &str) -> Result<Value, Value> {
        let stopped = self
            .supervisor
            .send(StopMarket(symbol.to_string()))
            .await
            .map_err(|e| err("node", format!("the supervisor is gone: {e}")))?;
        let stored = matches!(self.markets.get(symbol).await, Ok(Some(_)));
        if !stopped && !stored {
            return Err(err(
                "unknown_market",
                format!("{symbol} is not a market here"),
            ));
        }
        if stored {
            self.markets
                .delete(symbol)
                .await
                .map_err(|e| err("kv", format!("cannot delete the spec of {symbol}: {e}")))?;
        }
        Ok(json!({
            "ok": true,
            "market": symbol,
            "stopped": stopped,
            "message": "the market no longer takes orders; its streams are kept (history, and a new market.add with the same spec resumes it)",
        }))
    }

    /// Sends halt or resume through the market's stream and waits until it is applied.
    async fn admin(&self, symbol: &str, op: &str, cancel_orders: bool) -> Result<Value, Value> {
        if !self.running(symbol).await {
            return Err(err(
                "unknown_market",
                format!("{symbol} does not run on this node"),
            ));
        }
        let mut command = json!({"op": op, "account": "operator"});
        if op == "halt" {
            command["cancel_orders"] = json!(cancel_orders);
        }
        let bytes = rmp_serde::to_vec_named(&command).unwrap_or_default();
        let seq = self
            .js
            .publish(self.subjects.admin(symbol), bytes.into())
            .await
            .map_err(|e| err("publish", e.to_string()))?
            .await
            .map_err(|e| err("publish", e.to_string()))?
            .sequence;
        let deadline = Instant::now() + APPLY_TIMEOUT;
        loop {
            let markets = self.supervisor.send(ListMarkets).await.unwrap_or_default();
            let stats = markets
                .into_iter()
                .find(|m| m.symbol == symbol)
                .and_then(|m| m.stats);
            if let Some(stats) = stats.filter(|s| s.last_seq >= seq) {
                return Ok(
                    json!({"ok": true, "market": symbol, "seq": seq, "halted": stats.halted}),
                );
            }
            if Instant::now() > deadline {
                return Err(err(
                    "timeout",
                    format!(
                        "{op} was sent at stream sequence {seq} but not applied within {APPLY_TIMEOUT:?}"
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn list(&self) -> Value {
        let markets = self.supervisor.send(ListMarkets).await.unwrap_or_default();
        let list: Vec<Value> = markets
            .iter()
            .map(|m| {
                let mut v = json!({
                    "symbol": m.symbol,
                    "node": self.node_id,
                    "epoch": 0,
                    "running": m.running,
                    "restarts": m.restarts,
                    "last_seq": m.last_seq,
                });
                if let Some(s) = &m.stats {
                    v["state"] = json!(if s.halted { "halted" } else { "active" });
                    v["resting_orders"] = json!(s.resting_orders);
                    v["stop_orders"] = json!(s.stop_orders);
                    v["bid_levels"] = json!(s.bid_levels);
                    v["ask_levels"] = json!(s.ask_levels);
                    v["commands_per_sec"] = json!(s.commands_per_sec);
                } else {
                    v["state"] = json!("stopped");
                }
                v
            })
            .collect();
        json!({"ok": true, "markets": list})
    }

    async fn nodes(&self) -> Value {
        let markets = self.supervisor.send(ListMarkets).await.unwrap_or_default();
        let running = markets.iter().filter(|m| m.running).count();
        json!({"ok": true, "nodes": [{
            "node": self.node_id,
            "markets": running,
            "uptime_secs": self.started.elapsed().as_secs(),
        }]})
    }
}
