//! The node's HTTP port (`--http-port`, bound on `--http-addr`): `/metrics` for Prometheus
//! (rendered by `telemetry`), `/health` (liveness) and `/ready` (readiness) for orchestrators,
//! and the web page (`/`, `/api/...`: `web`).
//!
//! `/health`: the process answers and its runtime is responsive (NATS is not looked at: a NATS
//! blip must not make an orchestrator restart every node). `/ready`: NATS is connected, the
//! node's lease is held (a node whose heartbeat fails runs no markets, and says why), and every
//! market the node runs is running and caught up with its order stream (at most
//! `READY_LAG_MAX` commands behind, counted in stream messages). Both answer JSON with the
//! reason when they say no (HTTP 503); `docs/observability.md` spells out the body. The node
//! serves the port only once its markets have started, so `/ready` never says yes before they
//! run. The server is a small HTTP/1.1 responder on tokio: GET only, one request per
//! connection, bounded request size, so nothing a client sends can hold the node. This module
//! must never touch a market's state: it asks the supervisor and JetStream.

use std::time::Duration;

use actix::Addr;
use async_nats::jetstream;
use serde_json::{Value, json};

use crate::actors::{Held, Lease, ListMarkets, Supervisor};
use crate::bus::Subjects;
use crate::cluster::membership::HeartbeatStatus;
use crate::telemetry::http::Endpoints;
pub use crate::telemetry::http::{bind, serve};

/// A market further behind its stream than this is not ready.
pub const READY_LAG_MAX: u64 = 1_000;

/// What the endpoints look at.
#[derive(Clone)]
pub struct Probes {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub subjects: Subjects,
    pub supervisor: Addr<Supervisor>,
    /// Renders the metrics; `None` when no recorder could be installed.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// The node's right to run markets: while it has lapsed the node runs none.
    pub lease: Lease,
    /// Why the heartbeat fails, when it does.
    pub heartbeat: HeartbeatStatus,
    /// The web page (`GET /`) and what it reads.
    pub web: crate::web::Web,
}

/// How long the runtime may take to answer the liveness probe.
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(2);

impl Endpoints for Probes {
    async fn health(&self) -> (bool, Value) {
        Probes::health(self).await
    }

    async fn ready(&self) -> (bool, Value) {
        Probes::ready(self).await
    }

    fn metrics(&self) -> Option<&metrics_exporter_prometheus::PrometheusHandle> {
        self.metrics.as_ref()
    }

    async fn other(&self, path: &str, query: &str) -> Option<crate::telemetry::http::Reply> {
        self.web.route(path, query).await
    }
}

impl Probes {
    /// `(alive, body)`: liveness. The process answers and its runtime is responsive (the
    /// supervisor answers within `LIVENESS_TIMEOUT`). NATS's state is shown but does not count:
    /// a NATS outage is for readiness, or every node would be restarted during a NATS blip.
    pub async fn health(&self) -> (bool, Value) {
        let state = self.client.connection_state();
        let responsive = matches!(
            tokio::time::timeout(LIVENESS_TIMEOUT, self.supervisor.send(Held)).await,
            Ok(Ok(_))
        );
        let reason = (!responsive)
            .then(|| format!("the node's supervisor did not answer within {LIVENESS_TIMEOUT:?}"));
        (
            responsive,
            json!({"status": if responsive { "ok" } else { "unhealthy" }, "nats": state.to_string(), "reason": reason}),
        )
    }

    /// `(ready, body)`: NATS connected, the node's lease held (else it runs no markets), and
    /// each market with its sequence, its stream's, and why it is not ready.
    pub async fn ready(&self) -> (bool, Value) {
        let healthy = self.client.connection_state() == async_nats::connection::State::Connected;
        let lease_reason = (!self.lease.valid()).then(|| match self.heartbeat.failing() {
            Some((since, why)) => format!(
                "this node runs no markets: its heartbeat has failed for {:.0} s ({why})",
                since.as_secs_f64()
            ),
            None => "this node runs no markets: its lease is not renewed yet".to_string(),
        });
        let markets = match self.supervisor.send(ListMarkets).await {
            Ok(m) => m,
            Err(_) => {
                return (
                    false,
                    json!({"ready": false, "reason": "the supervisor is gone"}),
                );
            }
        };
        let mut all = healthy && lease_reason.is_none();
        let mut out = Vec::new();
        // A warm copy kept for another node's market is not this node's to serve.
        for m in markets.into_iter().filter(|m| m.running || !m.following) {
            let stream_seq = match self
                .js
                .get_stream(self.subjects.orders_stream(&m.symbol))
                .await
            {
                Ok(mut s) => s.info().await.ok().map(|i| i.state.last_sequence),
                Err(_) => None,
            };
            // Only a running market that answered knows where it is; otherwise no lag is
            // made up from a zero.
            let last_seq = m.stats.as_ref().map(|s| s.last_seq);
            let lag = stream_seq.zip(last_seq).map(|(s, l)| s.saturating_sub(l));
            let why = if !m.running {
                Some("not running".to_string())
            } else if last_seq.is_none() {
                Some("the market does not answer".to_string())
            } else if let Some(lag) = lag.filter(|l| *l > READY_LAG_MAX) {
                Some(format!("{lag} commands behind its stream"))
            } else if stream_seq.is_none() {
                Some("its stream cannot be read".to_string())
            } else {
                None
            };
            all &= why.is_none();
            out.push(json!({
                "market": m.symbol,
                "running": m.running,
                "last_seq": last_seq,
                "stream_seq": stream_seq,
                "lag": lag,
                "ready": why.is_none(),
                "reason": why,
            }));
        }
        let reason = if !healthy {
            Some("the NATS connection is down".to_string())
        } else {
            lease_reason
        };
        (all, json!({"ready": all, "reason": reason, "markets": out}))
    }
}
