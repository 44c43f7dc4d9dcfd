//! The control protocol: one request type per verb of `<prefix>.ctl.<verb>` and one reply type
//! per verb, shared by the server (`control`), the command line (`agora ctl`) and anyone
//! scripting against the subject. Requests are MessagePack maps (or JSON with
//! `Content-Type: application/json`); every reply is `{ok: true, ...}` with the verb's fields,
//! or `{ok: false, error, message}` (`Failure`). `docs/protocol.md` lists them for people.
//!
//! Plain data: this module never talks to NATS and never decides anything.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::book::MarketSpecInput;
use crate::cluster::placement::PlacementState;

/// Every verb, in the order `agora ctl --help` shows them.
pub const VERBS: [&str; 10] = [
    "market.add",
    "market.update",
    "market.remove",
    "market.halt",
    "market.resume",
    "market.list",
    "market.move",
    "node.list",
    "node.drain",
    "node.undrain",
];

/// A verb that names a market.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SymbolRequest {
    pub symbol: String,
    /// `market.halt` only: cancel every open order too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_orders: bool,
}

/// `market.move`: the market, and the live node to move it to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    pub symbol: String,
    pub node: String,
}

/// A verb that names a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRequest {
    pub node: String,
}

/// A control request: the verb and what it carries.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    MarketAdd(MarketSpecInput),
    MarketUpdate(MarketSpecInput),
    MarketRemove(SymbolRequest),
    MarketHalt(SymbolRequest),
    MarketResume(SymbolRequest),
    MarketList,
    MarketMove(MoveRequest),
    NodeList,
    NodeDrain(NodeRequest),
    NodeUndrain(NodeRequest),
}

/// An empty request body (the list verbs).
#[derive(Serialize)]
struct Empty {}

impl Request {
    /// The verb: the last tokens of the subject it is sent on.
    pub fn verb(&self) -> &'static str {
        match self {
            Request::MarketAdd(_) => "market.add",
            Request::MarketUpdate(_) => "market.update",
            Request::MarketRemove(_) => "market.remove",
            Request::MarketHalt(_) => "market.halt",
            Request::MarketResume(_) => "market.resume",
            Request::MarketList => "market.list",
            Request::MarketMove(_) => "market.move",
            Request::NodeList => "node.list",
            Request::NodeDrain(_) => "node.drain",
            Request::NodeUndrain(_) => "node.undrain",
        }
    }

    /// Whether the verb only reads (a sender may ask again without doing anything twice).
    pub fn read_only(&self) -> bool {
        matches!(self, Request::MarketList | Request::NodeList)
    }

    /// The request's body as MessagePack (named fields).
    pub fn encode(&self) -> Vec<u8> {
        let encoded = match self {
            Request::MarketAdd(spec) | Request::MarketUpdate(spec) => rmp_serde::to_vec_named(spec),
            Request::MarketRemove(r) | Request::MarketHalt(r) | Request::MarketResume(r) => {
                rmp_serde::to_vec_named(r)
            }
            Request::MarketMove(r) => rmp_serde::to_vec_named(r),
            Request::NodeDrain(r) | Request::NodeUndrain(r) => rmp_serde::to_vec_named(r),
            Request::MarketList | Request::NodeList => rmp_serde::to_vec_named(&Empty {}),
        };
        // Plain structs of strings, numbers and booleans always encode.
        encoded.unwrap_or_default()
    }

    /// Reads a request sent on `verb` (`json`: the body is JSON, else MessagePack). The list
    /// verbs take no body and ignore one.
    pub fn decode(verb: &str, payload: &[u8], json: bool) -> Result<Request, Failure> {
        Ok(match verb {
            "market.add" => Request::MarketAdd(body(payload, json, "a market spec")?),
            "market.update" => Request::MarketUpdate(body(payload, json, "a market spec")?),
            "market.remove" => Request::MarketRemove(body(payload, json, "{symbol}")?),
            "market.halt" => Request::MarketHalt(body(payload, json, "{symbol}")?),
            "market.resume" => Request::MarketResume(body(payload, json, "{symbol}")?),
            "market.list" => Request::MarketList,
            "market.move" => Request::MarketMove(body(payload, json, "{symbol, node}")?),
            "node.list" => Request::NodeList,
            "node.drain" => Request::NodeDrain(body(payload, json, "{node}")?),
            "node.undrain" => Request::NodeUndrain(body(payload, json, "{node}")?),
            _ => {
                return Err(Failure::new(
                    "unknown_verb",
                    format!(
                        "{verb:?} is not a control verb; use {}",
                        VERBS[..VERBS.len() - 1].join(", ") + " or " + VERBS[VERBS.len() - 1]
                    ),
                ));
            }
        })
    }
}

/// The body of a request as `T`, or a `bad_request` failure saying what it should be.
fn body<T: DeserializeOwned>(payload: &[u8], json: bool, what: &str) -> Result<T, Failure> {
    let decoded = if json {
        serde_json::from_slice(payload).map_err(|e| e.to_string())
    } else {
        rmp_serde::from_slice(payload).map_err(|e| e.to_string())
    };
    decoded.map_err(|e| Failure::new("bad_request", format!("the request is not {what}: {e}")))
}

/// A refused or failed request: a machine-readable code, and a message that says what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub error: String,
    pub message: String,
}

impl Failure {
    pub fn new(error: &str, message: impl Into<String>) -> Failure {
        Failure {
            error: error.to_string(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error, self.message)
    }
}

/// A reply as it travels: `{ok: true, ...fields of T}` or `{ok: false, error, message}`.
pub type Reply<T> = Result<T, Failure>;

/// A reply as a JSON value (the server encodes it as MessagePack, or JSON for a JSON request).
pub fn reply_value<T: Serialize>(reply: &Reply<T>) -> Value {
    let (ok, body) = match reply {
        Ok(body) => (true, serde_json::to_value(body)),
        Err(failure) => (false, serde_json::to_value(failure)),
    };
    let mut value = match body {
        Ok(Value::Object(map)) => Value::Object(map),
        // Every reply type is a struct of named fields.
        Ok(_) | Err(_) => Value::Object(Default::default()),
    };
    value["ok"] = Value::Bool(ok);
    value
}

/// Reads a reply (MessagePack or JSON, as a value) as `T`, or the failure it carries.
pub fn read_reply<T: DeserializeOwned>(value: &Value) -> Result<Reply<T>, String> {
    match value.get("ok") {
        Some(Value::Bool(true)) => serde_json::from_value(value.clone())
            .map(Ok)
            .map_err(|e| format!("the reply does not read as this verb's: {e}")),
        Some(Value::Bool(false)) => serde_json::from_value(value.clone())
            .map(Err)
            .map_err(|e| format!("the refusal does not read: {e}")),
        _ => Err("the reply has no `ok`".to_string()),
    }
}

/// `market.add`: where the market runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketAdded {
    pub market: String,
    /// Stored now (`false`: it existed with the same spec).
    pub created: bool,
    pub node: String,
    pub epoch: u64,
    /// The subject its orders go to.
    pub orders: String,
    /// Commands stored before an earlier removal that the market applies now.
    pub pending_applied: u64,
}

/// `market.update`: the stream sequence the new spec was applied at.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MarketUpdated {
    pub market: String,
    pub seq: u64,
    pub spec: MarketSpecInput,
}

/// `market.remove`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketRemoved {
    pub market: String,
    /// Its owner announced it stopped.
    pub stopped: bool,
    /// Commands the stream took before the removal that were not applied.
    pub unapplied: u64,
    pub message: String,
}

/// `market.halt` and `market.resume`: the stream sequence the command was applied at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketHalted {
    pub market: String,
    pub seq: u64,
    pub halted: bool,
}

/// What `market.list` says of a market's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarketState {
    Active,
    Halted,
    /// It failed where it runs and is being started again.
    Restarting,
    /// Placed, not running yet.
    Starting,
    /// Not placed on any node.
    Unplaced,
}

/// One market of `market.list`. The figures are there while it runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MarketRow {
    pub symbol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementState>,
    pub running: bool,
    pub state: MarketState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resting_orders: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_orders: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bid_levels: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ask_levels: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commands_per_sec: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_seq: Option<u64>,
    /// Why it does not run where it is placed, when the answering node knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The nodes that prefer it (`cluster.prefer`) among those with a record: it runs on one
    /// of them while one lives, and moves back to one after a failover.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preferred: Vec<String>,
}

impl MarketRow {
    /// A market known by name only (no placement, not running): the figures are filled in
    /// as they are known.
    pub fn new(symbol: impl Into<String>, state: MarketState) -> MarketRow {
        MarketRow {
            symbol: symbol.into(),
            node: None,
            epoch: None,
            placement: None,
            running: false,
            state,
            restarts: None,
            last_seq: None,
            resting_orders: None,
            stop_orders: None,
            bid_levels: None,
            ask_levels: None,
            commands_per_sec: None,
            snapshot_seq: None,
            reason: None,
            preferred: Vec::new(),
        }
    }
}

/// `market.list`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MarketList {
    pub markets: Vec<MarketRow>,
    /// What keeps markets from running (the answering node's failing heartbeat, say).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// `market.move`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MarketMoved {
    pub market: String,
    pub from: String,
    pub to: String,
    pub epoch: u64,
    /// The last stream sequence the old owner applied.
    pub seq: Option<u64>,
    /// From the release request to the new owner's announcement, milliseconds.
    pub pause_ms: f64,
    /// How far behind the new owner's copy was when the release started.
    pub lag: u64,
    pub state_hash: Option<String>,
    pub state_hash_equal: bool,
}

/// One node of `node.list`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRow {
    pub node: String,
    pub alive: bool,
    pub last_heartbeat_ms_ago: u64,
    pub draining: bool,
    pub rebalancer: bool,
    /// How many markets it runs, and which.
    pub markets: usize,
    pub market_names: Vec<String>,
    /// The markets it keeps warm copies of.
    pub following: Vec<String>,
    pub commands_per_sec: f64,
    pub cpu_pct: f64,
    pub uptime_secs: u64,
}

/// `node.list`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeList {
    pub nodes: Vec<NodeRow>,
    /// The node holding the rebalancer's lock (`None`: nobody yet).
    pub rebalancer: Option<String>,
}

/// `node.drain`: every market moved off.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDrained {
    pub node: String,
    pub markets_left: usize,
    pub elapsed_ms: u64,
}

/// `node.undrain`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeUndrained {
    pub node: String,
    pub draining: bool,
}

/// The requests the nodes answer on `<prefix>.node.<ID>.<verb>` (a planned move's steps, and
/// `market.list`'s question): sent by the control service and the handoff, answered by the
/// node's cluster agent. JSON, with the same `{ok, ...}` / `{ok: false, error, message}`
/// replies.
pub mod node {
    use serde::{Deserialize, Serialize};

    use crate::actors::MarketInfo;

    /// Every node verb.
    pub const VERBS: [&str; 4] = ["markets", "follow", "unfollow", "release"];

    /// `follow` (with how long the copy may take to catch up) and `unfollow`.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct MarketRequest {
        pub market: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub timeout_ms: Option<u64>,
    }

    /// `release`: stop the market at a batch boundary and hand it to `to` at `epoch + 1`.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ReleaseRequest {
        pub market: String,
        pub to: String,
        /// The epoch the market runs at on the releasing node.
        pub epoch: u64,
    }

    /// `markets`: what the node runs, restarts and follows.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct Markets {
        pub node: String,
        pub markets: Vec<MarketInfo>,
    }

    /// `follow`: the warm copy is this close behind the owner.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Followed {
        pub market: String,
        pub lag: u64,
    }

    /// `unfollow`.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Unfollowed {
        pub market: String,
    }

    /// `release`: where the market stopped, and its book's state hash there.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Released {
        pub market: String,
        /// The last sequence it applied (`None`: it had applied nothing).
        pub seq: Option<u64>,
        pub state_hash: Option<String>,
        /// The epoch the new owner runs it at.
        pub epoch: u64,
        /// From the request to the market stopped, and to the release written, microseconds.
        pub stopped_us: u64,
        pub released_us: u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MarketSpecInput {
        let seeds = crate::config::seed_markets().unwrap_or_else(|e| panic!("{e}"));
        seeds[0].clone()
    }

    fn requests() -> Vec<Request> {
        let symbol = |cancel_orders| SymbolRequest {
            symbol: "BTC-USDC".into(),
            cancel_orders,
        };
        let node = || NodeRequest { node: "n1".into() };
        vec![
            Request::MarketAdd(spec()),
            Request::MarketUpdate(spec()),
            Request::MarketRemove(symbol(false)),
            Request::MarketHalt(symbol(true)),
            Request::MarketResume(symbol(false)),
            Request::MarketList,
            Request::MarketMove(MoveRequest {
                symbol: "BTC-USDC".into(),
                node: "n2".into(),
            }),
            Request::NodeList,
            Request::NodeDrain(node()),
            Request::NodeUndrain(node()),
        ]
    }

    #[test]
    fn every_verb_round_trips_in_msgpack_and_json() {
        let requests = requests();
        let verbs: Vec<_> = requests.iter().map(Request::verb).collect();
        assert_eq!(verbs, VERBS, "one request per verb, in order");
        for request in requests {
            let verb = request.verb();
            let decoded = Request::decode(verb, &request.encode(), false)
                .unwrap_or_else(|e| panic!("{verb}: {e}"));
            assert_eq!(decoded, request, "{verb} (MessagePack)");
            let as_json: Value =
                rmp_serde::from_slice(&request.encode()).unwrap_or_else(|e| panic!("{e}"));
            let json = serde_json::to_vec(&as_json).unwrap_or_else(|e| panic!("{e}"));
            let decoded =
                Request::decode(verb, &json, true).unwrap_or_else(|e| panic!("{verb}: {e}"));
            assert_eq!(decoded, request, "{verb} (JSON)");
        }
    }

    #[test]
    fn bad_requests_say_what_was_expected() {
        let e = Request::decode("market.halt", b"{\"node\":\"x\"}", true).unwrap_err();
        assert_eq!(e.error, "bad_request");
        assert!(e.message.contains("{symbol}"), "{e}");
        let e = Request::decode("market.explode", b"", false).unwrap_err();
        assert_eq!(e.error, "unknown_verb");
        assert!(e.message.contains("market.add") && e.message.contains("or node.undrain"));
        // The list verbs ignore whatever body they get.
        assert_eq!(
            Request::decode("market.list", b"\xc1", false),
            Ok(Request::MarketList)
        );
    }

    fn round_trip<T>(reply: Reply<T>)
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let value = reply_value(&reply);
        assert_eq!(value["ok"], Value::Bool(reply.is_ok()), "{value}");
        // As it travels: MessagePack with named fields.
        let bytes = rmp_serde::to_vec_named(&value).unwrap_or_else(|e| panic!("{e}"));
        let back: Value = rmp_serde::from_slice(&bytes).unwrap_or_else(|e| panic!("{e}"));
        let read = read_reply::<T>(&back).unwrap_or_else(|e| panic!("{e}: {back}"));
        assert_eq!(read, reply);
    }

    #[test]
    fn every_reply_round_trips() {
        round_trip::<MarketAdded>(Ok(MarketAdded {
            market: "BTC-USDC".into(),
            created: true,
            node: "n1".into(),
            epoch: 1,
            orders: "agora.orders.BTC-USDC".into(),
            pending_applied: 0,
        }));
        round_trip::<MarketUpdated>(Ok(MarketUpdated {
            market: "BTC-USDC".into(),
            seq: 9,
            spec: spec(),
        }));
        round_trip::<MarketRemoved>(Ok(MarketRemoved {
            market: "BTC-USDC".into(),
            stopped: true,
            unapplied: 2,
            message: "kept".into(),
        }));
        round_trip::<MarketHalted>(Ok(MarketHalted {
            market: "BTC-USDC".into(),
            seq: 3,
            halted: true,
        }));
        let running = MarketRow {
            symbol: "BTC-USDC".into(),
            node: Some("n1".into()),
            epoch: Some(2),
            placement: Some(PlacementState::Active),
            running: true,
            state: MarketState::Halted,
            restarts: Some(0),
            last_seq: Some(40),
            resting_orders: Some(3),
            stop_orders: Some(1),
            bid_levels: Some(2),
            ask_levels: Some(1),
            commands_per_sec: Some(12.5),
            snapshot_seq: Some(0),
            reason: None,
            preferred: vec!["n1".into()],
        };
        let unplaced = MarketRow::new("ETH-USDC", MarketState::Unplaced);
        round_trip::<MarketList>(Ok(MarketList {
            markets: vec![running, unplaced],
            problems: vec!["node n1 runs no markets".into()],
        }));
        round_trip::<MarketMoved>(Ok(MarketMoved {
            market: "BTC-USDC".into(),
            from: "n1".into(),
            to: "n2".into(),
            epoch: 3,
            seq: Some(10),
            pause_ms: 1.5,
            lag: 0,
            state_hash: Some("ab".into()),
            state_hash_equal: true,
        }));
        round_trip::<NodeList>(Ok(NodeList {
            nodes: vec![NodeRow {
                node: "n1".into(),
                alive: true,
                last_heartbeat_ms_ago: 12,
                draining: false,
                rebalancer: true,
                markets: 1,
                market_names: vec!["BTC-USDC".into()],
                following: vec![],
                commands_per_sec: 0.0,
                cpu_pct: 1.5,
                uptime_secs: 3,
            }],
            rebalancer: Some("n1".into()),
        }));
        round_trip::<NodeDrained>(Ok(NodeDrained {
            node: "n1".into(),
            markets_left: 0,
            elapsed_ms: 10,
        }));
        round_trip::<NodeUndrained>(Ok(NodeUndrained {
            node: "n1".into(),
            draining: false,
        }));
        round_trip::<MarketAdded>(Err(Failure::new("unknown_market", "no such market")));
        round_trip::<node::Markets>(Ok(node::Markets {
            node: "n1".into(),
            markets: vec![crate::actors::MarketInfo {
                symbol: "BTC-USDC".into(),
                running: true,
                epoch: 2,
                following: false,
                arbiter: 0,
                restarts: 0,
                last_seq: 4,
                stats: Some(crate::actors::market::MarketStats {
                    last_seq: 4,
                    halted: false,
                    resting_orders: 1,
                    stop_orders: 0,
                    bid_levels: 1,
                    ask_levels: 0,
                    commands_per_sec: 0.5,
                    snapshot_seq: 0,
                }),
            }],
        }));
        round_trip::<node::Followed>(Ok(node::Followed {
            market: "BTC-USDC".into(),
            lag: 3,
        }));
        round_trip::<node::Unfollowed>(Ok(node::Unfollowed {
            market: "BTC-USDC".into(),
        }));
        round_trip::<node::Released>(Ok(node::Released {
            market: "BTC-USDC".into(),
            seq: Some(4),
            state_hash: None,
            epoch: 3,
            stopped_us: 800,
            released_us: 1200,
        }));
        // And the node requests, as JSON.
        for request in [
            serde_json::to_value(node::MarketRequest {
                market: "BTC-USDC".into(),
                timeout_ms: Some(5),
            }),
            serde_json::to_value(node::ReleaseRequest {
                market: "BTC-USDC".into(),
                to: "n2".into(),
                epoch: 2,
            }),
        ] {
            let value = request.unwrap_or_else(|e| panic!("{e}"));
            let text = value.to_string();
            let back: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(back, value);
        }
        let r: node::MarketRequest =
            serde_json::from_str(r#"{"market":"BTC-USDC","timeout_ms":5}"#)
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.timeout_ms, Some(5));
        let r: node::ReleaseRequest =
            serde_json::from_str(r#"{"market":"BTC-USDC","to":"n2","epoch":2}"#)
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.to.as_str(), r.epoch), ("n2", 2));
    }
}
