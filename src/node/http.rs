//! The node's HTTP port (`--http-port`, bound on `--http-addr`): `/metrics` for Prometheus
//! (rendered by `telemetry`), `/health` (liveness) and `/ready` (readiness) for orchestrators.
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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::actors::{Held, Lease, ListMarkets, Supervisor};
use crate::bus::Subjects;
use crate::cluster::membership::HeartbeatStatus;
use crate::telemetry::process;

/// A market further behind its stream than this is not ready.
pub const READY_LAG_MAX: u64 = 1_000;

/// Longest request head read; longer ones are refused.
const REQUEST_MAX: usize = 8 * 1024;

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
}

/// How long the runtime may take to answer the liveness probe.
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(2);

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

/// Binds `addr:port`, failing with what to do when the port is taken.
pub async fn bind(addr: &str, port: u16) -> Result<TcpListener, String> {
    let ip: std::net::IpAddr = addr.parse().map_err(|_| {
        format!("http_addr {addr:?} is not an IP address; use 0.0.0.0, 127.0.0.1 or one of this machine's")
    })?;
    TcpListener::bind((ip, port)).await.map_err(|e| {
        format!(
            "cannot listen on HTTP port {port} at {addr}: {e}; pick another with --http-port (0 turns it off) or --http-addr"
        )
    })
}

/// Serves the endpoints on `listener` until `stop`.
pub async fn serve(listener: TcpListener, probes: Probes, mut stop: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let probes = probes.clone();
        actix_rt::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(stream, &probes)).await;
        });
    }
}

/// Reads one request head and answers it.
async fn answer(mut stream: TcpStream, probes: &Probes) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > REQUEST_MAX {
            return respond(
                &mut stream,
                431,
                &json!({"error": "request head too large"}),
            )
            .await;
        }
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    if method != "GET" {
        return respond(
            &mut stream,
            405,
            &json!({"error": format!("{method} is not served; use GET /metrics, /health or /ready")}),
        )
        .await;
    }
    match path {
        "/health" => {
            let (ok, body) = probes.health().await;
            respond(&mut stream, if ok { 200 } else { 503 }, &body).await
        }
        "/ready" => {
            let (ok, body) = probes.ready().await;
            respond(&mut stream, if ok { 200 } else { 503 }, &body).await
        }
        "/metrics" => match &probes.metrics {
            Some(handle) => {
                handle.run_upkeep();
                let text = handle.render() + &process::exposition();
                respond_text(&mut stream, &text).await
            }
            None => {
                respond(
                    &mut stream,
                    503,
                    &json!({"error": "no metrics recorder in this process"}),
                )
                .await
            }
        },
        _ => {
            respond(
                &mut stream,
                404,
                &json!({"error": format!("{path} is not served; use /metrics, /health or /ready")}),
            )
            .await
        }
    }
}

async fn respond_text(stream: &mut TcpStream, body: &str) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

async fn respond(stream: &mut TcpStream, status: u16, body: &Value) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let body = body.to_string();
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
