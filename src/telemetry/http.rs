//! The HTTP port of an agora process (`agora node`, `agora history`): `/metrics` for
//! Prometheus, `/health` (liveness) and `/ready` (readiness), each process saying what they
//! mean through `Endpoints`. A small HTTP/1.1 responder on tokio: GET only, one request per
//! connection, bounded request size, so nothing a client sends can hold the process.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::process;

/// Longest request head read; longer ones are refused.
const REQUEST_MAX: usize = 8 * 1024;

/// What a process answers on its probes.
pub trait Endpoints: Clone + 'static {
    /// `(alive, body)`.
    fn health(&self) -> impl Future<Output = (bool, Value)>;
    /// `(ready, body)`.
    fn ready(&self) -> impl Future<Output = (bool, Value)>;
    /// Renders the metrics; `None` when no recorder could be installed.
    fn metrics(&self) -> Option<&metrics_exporter_prometheus::PrometheusHandle>;
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
pub async fn serve<E: Endpoints>(
    listener: TcpListener,
    probes: E,
    mut stop: watch::Receiver<bool>,
) {
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
async fn answer<E: Endpoints>(mut stream: TcpStream, probes: &E) -> std::io::Result<()> {
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
        "/metrics" => match probes.metrics() {
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
