//! The node's web page, on its HTTP port: `GET /` and its assets (the files of `web/`,
//! compiled in: no Node.js to build, nothing fetched from elsewhere at run time), and what the
//! page reads, all public data:
//!
//! - `/api/overview`: markets (owner, epoch, state, best prices, last trade, load, lag, the
//!   history's ticker), nodes, the rebalancer's holder, recent handoffs and failovers;
//! - `/api/stream?market=M`: server-sent events (`hello`, `overview` every second, M's L2
//!   deltas as `book` and its `trades`, every market's `status`, `cluster` events);
//! - `/api/book/M[?depth=N]`: the market's L2 book with its sequence (the snapshot a page
//!   resynchronises from);
//! - `/api/trades/M`, `/api/candles/M?interval=1m|5m|1h|1d`, `/api/ticker/M`: from the
//!   history process when it runs (trades: else those this node saw).
//!
//! Every node serves the same page; what it shows comes from NATS (`hub`), never from the
//! node's own markets, so it is the same whichever node a browser asks.

pub mod assets;
pub mod hub;

use std::sync::Arc;

use serde_json::{Value, json};

use crate::bus::Subjects;
use crate::telemetry::http::Reply;
pub use hub::Hub;

/// The page and its API.
#[derive(Clone)]
pub struct Web {
    hub: Arc<Hub>,
}

impl Web {
    pub fn new(hub: Arc<Hub>) -> Web {
        Web { hub }
    }

    /// Answers a GET of `path` (`query`: after the `?`), or `None` when it is not the page's.
    pub async fn route(&self, path: &str, query: &str) -> Option<Reply> {
        if let Some(file) = assets::find(path) {
            return Some(Reply::File(file.content_type, file.body));
        }
        let api = path.strip_prefix("/api/")?;
        let (what, market) = api.split_once('/').unwrap_or((api, ""));
        let param = |name: &str| {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v)
        };
        let market = if what == "stream" {
            param("market").unwrap_or("")
        } else {
            market
        };
        let reply = |r: Result<Value, (u16, Value)>| match r {
            Ok(v) => Reply::Json(200, v),
            Err((status, v)) => Reply::Json(status, v),
        };
        const KNOWN: &[&str] = &["overview", "stream", "book", "trades", "candles", "ticker"];
        if !KNOWN.contains(&what) {
            return Some(Reply::Json(
                404,
                json!({"error": "not_found", "message": format!("/api/{what} is not served; the page reads /api/overview, /api/stream, /api/book, /api/trades, /api/candles and /api/ticker")}),
            ));
        }
        if what != "overview"
            && let Err(e) = Subjects::check_token("market", market)
        {
            return Some(Reply::Json(
                400,
                json!({"error": "bad_request", "message": format!("{e}; ask /api/{what}/<MARKET> with a market's symbol, such as BTC-USDC")}),
            ));
        }
        Some(match what {
            "overview" => {
                self.hub.ensure_running();
                self.hub
                    .wait_synced(std::time::Duration::from_secs(2))
                    .await;
                Reply::Json(200, self.hub.overview())
            }
            "stream" => match self.hub.stream(market.to_string()) {
                Ok(events) => Reply::Events(events),
                Err((status, v)) => Reply::Json(status, v),
            },
            "book" => {
                let depth = param("depth").and_then(|d| d.parse::<usize>().ok());
                reply(
                    self.hub
                        .book(market, depth)
                        .await
                        .map(|b| serde_json::to_value(b).unwrap_or(Value::Null)),
                )
            }
            "trades" => match self
                .hub
                .history(&format!("trades.{market}"), json!({"limit": 100}))
                .await
            {
                Ok(v) => Reply::Json(200, json!({"market": market, "trades": v["trades"]})),
                Err(_) => Reply::Json(200, self.hub.recent_trades(market)),
            },
            "candles" => {
                let interval = param("interval").unwrap_or("1m");
                let answer = self
                    .hub
                    .history(
                        &format!("candles.{market}"),
                        json!({"interval": interval}),
                    )
                    .await
                    .map(|v| json!({"market": market, "interval": interval, "candles": v["candles"]}));
                reply(answer)
            }
            _ => reply(
                self.hub
                    .history(&format!("ticker.{market}"), json!({}))
                    .await,
            ),
        })
    }
}
