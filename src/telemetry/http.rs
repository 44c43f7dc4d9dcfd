//! The HTTP port of an agora process (`agora node`, `agora history`): `/metrics` for
//! Prometheus, `/health` (liveness) and `/ready` (readiness), each process saying what they
//! mean through `Endpoints`, and whatever else a process serves there (`Endpoints::other`: the
//! node's web page). A small HTTP/1.1 responder on tokio: GET only, one request per
//! connection, bounded request size, a deadline on everything but an event stream the process
//! chose to open (bounded in number by that process), so nothing a client sends can hold the
//! process.

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
    /// Any other GET `path` (with its `query`, the part after `?`); `None`: 404.
    fn other(&self, path: &str, query: &str) -> impl Future<Output = Option<Reply>> {
        let _ = (path, query);
        async { None }
    }
}

/// An answer of `Endpoints::other`.
pub enum Reply {
    Json(u16, Value),
    /// A file: its content type and bytes.
    File(&'static str, &'static [u8]),
    /// Server-sent events (`text/event-stream`): each item is written as it comes (whole
    /// `event:`/`data:` frames), with a comment every 15 s so proxies keep the connection,
    /// until the sender is dropped or the client goes away.
    Events(tokio::sync::mpsc::Receiver<String>),
}

/// How often an idle event stream says it is still there.
const KEEPALIVE: Duration = Duration::from_secs(15);

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
            let answered = tokio::time::timeout(Duration::from_secs(10), answer(stream, &probes));
            if let Ok(Ok(Some((stream, events)))) = answered.await {
                let _ = stream_events(stream, events).await;
            }
        });
    }
}

/// An event stream to go on with, past the deadline of the request.
type Streaming = Option<(TcpStream, tokio::sync::mpsc::Receiver<String>)>;

/// Reads one request head and answers it; an event stream is handed back to be written
/// without the request's deadline.
async fn answer<E: Endpoints>(mut stream: TcpStream, probes: &E) -> std::io::Result<Streaming> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > REQUEST_MAX {
            respond(
                &mut stream,
                431,
                &json!({"error": "request head too large"}),
            )
            .await?;
            return Ok(None);
        }
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    if method != "GET" {
        respond(
            &mut stream,
            405,
            &json!({"error": format!("{method} is not served; use GET /metrics, /health or /ready")}),
        )
        .await?;
        return Ok(None);
    }
    let done = match path {
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
        _ => match probes.other(path, query).await {
            Some(Reply::Json(status, body)) => respond(&mut stream, status, &body).await,
            Some(Reply::File(content_type, body)) => {
                respond_bytes(&mut stream, 200, content_type, body).await
            }
            Some(Reply::Events(events)) => {
                let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n";
                stream.write_all(head.as_bytes()).await?;
                return Ok(Some((stream, events)));
            }
            None => respond(
                &mut stream,
                404,
                &json!({"error": format!("{path} is not served; use /metrics, /health or /ready")}),
            )
            .await,
        },
    };
    done.map(|()| None)
}

/// Writes an event stream's frames until its sender is done or the client is gone.
async fn stream_events(
    mut stream: TcpStream,
    mut events: tokio::sync::mpsc::Receiver<String>,
) -> std::io::Result<()> {
    loop {
        let frame = match tokio::time::timeout(KEEPALIVE, events.recv()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_) => ": still here\n\n".to_string(),
        };
        stream.write_all(frame.as_bytes()).await?;
    }
    stream.shutdown().await
}

async fn respond_bytes(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.shutdown().await
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        504 => "Gateway Timeout",
        _ => "Service Unavailable",
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
    let body = body.to_string();
    let response = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        reason(status),
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
