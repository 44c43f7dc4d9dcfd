//! One order's trace, received by a real OpenTelemetry collector: `rotel` (an OTLP collector,
//! `pip install rotel==0.0.1a15`) prints every span it receives, and the test reads them. An
//! `agora node` exports over OTLP/gRPC, `agora order` over OTLP/HTTP; the client's span and the
//! engine's spans must share one trace id and nest: `agora.order.new` (client) ←
//! `agora.market.command` ← `agora.match`, `agora.journal.publish`, `agora.reports.publish`.
//! Untraced and unsampled orders must leave no engine span. `AGORA_TRACES_DUMP=1` prints what
//! the collector received.

use crate::common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agora::bus::LocalServer;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// One span as the collector printed it.
#[derive(Clone, Debug, Default)]
struct Span {
    service: String,
    trace_id: String,
    parent_id: String,
    id: String,
    name: String,
    attributes: HashMap<String, String>,
}

/// Reads the collector's debug output (the OpenTelemetry collector's "detailed" text format):
/// `Resource attributes:` with `-> service.name: Str(...)`, then per span `Trace ID`,
/// `Parent ID`, `ID`, `Name`, and its `Attributes:` as `-> key: Type(value)`.
fn parse_spans(text: &str) -> Vec<Span> {
    #[derive(PartialEq)]
    enum Section {
        Resource,
        Span,
        SpanAttributes,
        Other,
    }
    let mut spans: Vec<Span> = Vec::new();
    let mut service = String::new();
    let mut section = Section::Other;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("ResourceSpans #") {
            service.clear();
            section = Section::Other;
        } else if trimmed == "Resource attributes:" {
            section = Section::Resource;
        } else if trimmed.starts_with("Span #") {
            spans.push(Span {
                service: service.clone(),
                ..Span::default()
            });
            section = Section::Span;
        } else if trimmed == "Attributes:" && section == Section::Span {
            section = Section::SpanAttributes;
        } else if trimmed.starts_with("ScopeSpans #") || matches!(trimmed, "Events:" | "Links:") {
            // Sections the test does not read.
            section = Section::Other;
        } else if let Some(attribute) = trimmed.strip_prefix("-> ") {
            let Some((key, value)) = attribute.split_once(": ") else {
                continue;
            };
            let value = value
                .split_once('(')
                .map_or(value, |(_, v)| v.strip_suffix(')').unwrap_or(v))
                .to_string();
            match section {
                Section::Resource if key == "service.name" => service = value,
                Section::SpanAttributes => {
                    if let Some(span) = spans.last_mut() {
                        span.attributes.insert(key.to_string(), value);
                    }
                }
                _ => {}
            }
        } else if section == Section::Span
            && let Some((key, value)) = trimmed.split_once(':')
            && let Some(span) = spans.last_mut()
        {
            let value = value.trim().to_string();
            match key.trim() {
                "Trace ID" => span.trace_id = value,
                "Parent ID" => span.parent_id = value,
                "ID" => span.id = value,
                "Name" => span.name = value,
                _ => {}
            }
        }
    }
    spans
}

/// A `rotel` collector on free loopback ports, printing what it receives; killed when dropped.
struct Collector {
    child: Child,
    output: Arc<Mutex<String>>,
    grpc: u16,
    http: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The collector's binary: `AGORA_ROTEL` if set, else the one the `rotel` wheel installed.
fn rotel_agent() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("AGORA_ROTEL") {
        return path.into();
    }
    let found = Command::new("python3")
        .args([
            "-c",
            "import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), 'rotel-agent'))",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match found {
        Some(path) if std::path::Path::new(&path).is_file() => path.into(),
        _ => panic!(
            "the rotel OTLP collector is not installed: pip install rotel==0.0.1a15 \
             (or set AGORA_ROTEL to a rotel-agent binary)"
        ),
    }
}

impl Collector {
    fn start() -> Collector {
        let (grpc, http) = (free_port(), free_port());
        let mut child = Command::new(rotel_agent())
            .args(["start", "--exporter", "blackhole", "--debug-log", "traces"])
            .args(["--debug-log-verbosity", "detailed"])
            .arg("--otlp-grpc-endpoint")
            .arg(format!("127.0.0.1:{grpc}"))
            .arg("--otlp-http-endpoint")
            .arg(format!("127.0.0.1:{http}"))
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("rotel-agent starts");
        let output = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("piped")),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut text = output.lock().expect("not poisoned");
                    text.push_str(&line);
                    text.push('\n');
                }
            });
        }
        let collector = Collector {
            child,
            output,
            grpc,
            http,
        };
        collector.wait_for(|text| text.contains("Starting Rotel"), "its start line");
        for port in [grpc, http] {
            let deadline = Instant::now() + WAIT;
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "rotel never listened on {port}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        collector
    }

    fn text(&self) -> String {
        self.output.lock().expect("not poisoned").clone()
    }

    fn wait_for(&self, done: impl Fn(&str) -> bool, what: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = self.text();
            if done(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "the collector never received {what}; it printed:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `agora order place ...` with `env`; returns its output lines as JSON.
fn place(url: &str, env: &[(&str, String)], account: &str, rest: &[&str]) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_agora"))
        .args(["order", "place", "--nats-url", url, "--market", "TEST-USD"])
        .args(["--account", account])
        .args(rest)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("agora order runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "agora order failed: {stderr}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// The `traceparent` header of the order stream's messages `seqs`.
fn traceparents(url: &str, seqs: &[u64]) -> Vec<Option<String>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = async_nats::connect(url).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        let stream = js.get_stream("ORDERS_TEST-USD").await.expect("stream");
        let mut found = Vec::new();
        for seq in seqs {
            let m = stream.get_raw_message(*seq).await.expect("message");
            found.push(m.headers.get("traceparent").map(|v| v.as_str().to_string()));
        }
        found
    })
}

#[test]
fn one_order_is_one_trace_from_the_client_through_the_engine() {
    let collector = Collector::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let server = LocalServer::start(&dir.path().join("nats")).unwrap_or_else(|e| panic!("{e}"));
    let url = server.url();
    let config = format!(
        "node_id = \"n1\"\n[[markets]]\nsymbol = \"TEST-USD\"\nprice_decimals = 2\nsize_decimals = 0\n\
         [tracing]\nendpoint = \"http://127.0.0.1:{}\"\nprotocol = \"grpc\"\n",
        collector.grpc
    );
    let mut node = common::Agora::node(&url, dir.path(), &config);

    // bob rests a sell without tracing; carol's buy is traced but not sampled.
    let bob = place(
        &url,
        &[],
        "bob",
        &[
            "--side", "sell", "--price", "10.00", "--qty", "3", "--cid", "b1",
        ],
    );
    let otel = |sampler: &str| {
        vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{}", collector.http),
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_string()),
            ("OTEL_TRACES_SAMPLER", sampler.to_string()),
        ]
    };
    let carol = place(
        &url,
        &otel("always_off"),
        "carol",
        &[
            "--side", "buy", "--price", "9.00", "--qty", "1", "--cid", "c1",
        ],
    );
    // alice's buy is traced and fills against bob's sell.
    let lines = place(
        &url,
        &otel("always_on"),
        "alice",
        &[
            "--side", "buy", "--price", "10.00", "--qty", "2", "--cid", "a1",
        ],
    );
    let sent = |lines: &[Value]| lines[0]["sent"]["seq"].as_u64().expect("sent.seq");
    let seq = sent(&lines);
    assert!(
        lines.iter().any(|l| l["type"] == "fill"),
        "alice's order filled: {lines:?}"
    );

    let engine = [
        "agora.market.command",
        "agora.match",
        "agora.journal.publish",
        "agora.reports.publish",
    ];
    collector.wait_for(|t| t.contains("agora.order.new"), "the client's span");
    // The node flushes its spans on the way out.
    let status = node.terminate(WAIT);
    assert!(status.success(), "agora node exited with {status}");
    let text = collector.wait_for(
        |t| {
            engine
                .iter()
                .all(|name| t.contains(&format!("Name           : {name}")))
        },
        "the engine's spans",
    );
    let spans = parse_spans(&text);
    if std::env::var_os("AGORA_TRACES_DUMP").is_some() {
        eprintln!("{text}");
    }

    let clients: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "agora.order.new")
        .collect();
    assert_eq!(clients.len(), 1, "one sampled client span: {clients:#?}");
    let client = clients[0];
    assert_eq!(client.service, "agora-client");
    assert_eq!(client.attributes["market"], "TEST-USD");
    assert_eq!(client.attributes["account"], "alice");
    assert_eq!(client.attributes["cid"], "a1");
    assert_eq!(client.attributes["seq"], seq.to_string());

    // The W3C header: none without tracing, "not sampled" from carol, the client's span from
    // alice.
    let headers = traceparents(&url, &[sent(&bob), sent(&carol), seq]);
    assert_eq!(headers[0], None);
    assert!(
        headers[1].as_ref().is_some_and(|h| h.ends_with("-00")),
        "{headers:?}"
    );
    assert_eq!(
        headers[2],
        Some(format!("00-{}-{}-01", client.trace_id, client.id))
    );

    let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.id.as_str(), s)).collect();
    for name in engine {
        let found: Vec<&Span> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(
            found.len(),
            1,
            "one {name} span (untraced and unsampled orders have none): {found:#?}"
        );
        let span = found[0];
        assert_eq!(span.service, "agora-node", "{span:#?}");
        assert_eq!(
            span.trace_id, client.trace_id,
            "{name} is in the client's trace"
        );
        // Its parent chain leads to the client's span.
        let mut at = span;
        let mut hops = 0;
        while at.parent_id != client.id {
            at = by_id
                .get(at.parent_id.as_str())
                .unwrap_or_else(|| panic!("{name}'s parent {} was not received", at.parent_id));
            hops += 1;
            assert!(hops < 5, "{name}'s parents never reach the client's span");
        }
    }
    let command = spans
        .iter()
        .find(|s| s.name == "agora.market.command")
        .expect("command span");
    assert_eq!(
        command.parent_id, client.id,
        "the engine's span is the client's child"
    );
    for name in [
        "agora.match",
        "agora.journal.publish",
        "agora.reports.publish",
    ] {
        let span = spans.iter().find(|s| s.name == name).expect("span");
        assert_eq!(
            span.parent_id, command.id,
            "{name} is under agora.market.command"
        );
    }
    let matched = spans
        .iter()
        .find(|s| s.name == "agora.match")
        .expect("match span");
    let attribute = |key: &str| matched.attributes.get(key).map(String::as_str);
    assert_eq!(attribute("market"), Some("TEST-USD"));
    assert_eq!(attribute("seq"), Some(seq.to_string().as_str()));
    assert_eq!(attribute("oid"), Some((seq * 1000).to_string().as_str()));
    assert_eq!(attribute("cid"), Some("a1"));
    assert_eq!(attribute("account"), Some("alice"));
    assert_eq!(attribute("fills"), Some("1"));
}

#[test]
fn the_collector_output_parses() {
    let text = "ResourceSpans #0\nResource SchemaURL: \nResource attributes:\n     -> service.name: Str(svc)\n\
        ScopeSpans #0\nInstrumentationScope agora \nSpan #0\n    Trace ID       : t1\n    Parent ID      : \n\
        ID             : s1\n    Name           : agora.match\n    Kind           : SPAN_KIND_INTERNAL\n\
        Start time: 1\nEnd time: 2\nAttributes:\n     -> market: Str(TEST-USD)\n     -> fills: Int(1)\n\
        Events:\n     -> Name: x\n";
    let spans = parse_spans(text);
    assert_eq!(spans.len(), 1);
    let s = &spans[0];
    assert_eq!(
        (s.service.as_str(), s.trace_id.as_str(), s.id.as_str()),
        ("svc", "t1", "s1")
    );
    assert_eq!(s.parent_id, "");
    assert_eq!(s.name, "agora.match");
    assert_eq!(s.attributes["market"], "TEST-USD");
    assert_eq!(s.attributes["fills"], "1");
    assert!(!s.attributes.contains_key("Name"));
}

/// A planned move is one trace across both nodes: `agora.market.handoff` (on the node that
/// answered `market.move`) ← `agora.node.follow` (target) and `agora.node.release` (source) ←
/// `agora.market.recover` (target, from its warm copy, at the new epoch).
#[test]
fn a_move_is_one_trace_across_both_nodes() {
    let collector = Collector::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let server = LocalServer::start(&dir.path().join("nats")).unwrap_or_else(|e| panic!("{e}"));
    let url = server.url();
    let config = |id: &str| {
        format!(
            "node_id = \"{id}\"\n[[markets]]\nsymbol = \"TEST-USD\"\nprice_decimals = 2\nsize_decimals = 0\n\
             [tracing]\nendpoint = \"http://127.0.0.1:{}\"\nprotocol = \"grpc\"\nsampler = \"always_on\"\n",
            collector.grpc
        )
    };
    let (d1, d2) = (dir.path().join("n1"), dir.path().join("n2"));
    std::fs::create_dir_all(&d1).expect("dir");
    std::fs::create_dir_all(&d2).expect("dir");
    let mut n1 = common::Agora::node(&url, &d1, &config("n1"));
    let mut n2 = common::Agora::node(&url, &d2, &config("n2"));
    common::run_ok(&[
        "ctl",
        "market.move",
        "TEST-USD",
        "--to",
        "n2",
        "--nats-url",
        &url,
    ]);
    for node in [&mut n1, &mut n2] {
        let status = node.terminate(WAIT);
        assert!(status.success(), "agora node exited with {status}");
    }
    let names = [
        "agora.market.handoff",
        "agora.node.follow",
        "agora.node.release",
    ];
    let text = collector.wait_for(
        |t| {
            names
                .iter()
                .all(|name| t.contains(&format!("Name           : {name}")))
        },
        "the handoff's spans",
    );
    if std::env::var_os("AGORA_TRACES_DUMP").is_some() {
        eprintln!("{text}");
    }
    let spans = parse_spans(&text);
    let one = |name: &str| -> &Span {
        let found: Vec<&Span> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "one {name} span: {found:#?}");
        found[0]
    };
    let handoff = one("agora.market.handoff");
    assert_eq!(handoff.attributes["market"], "TEST-USD");
    assert_eq!(handoff.attributes["from"], "n1");
    assert_eq!(handoff.attributes["to"], "n2");
    assert_eq!(handoff.attributes["epoch"], "2");
    assert!(handoff.attributes.contains_key("pause_us"), "{handoff:#?}");
    let follow = one("agora.node.follow");
    let release = one("agora.node.release");
    for (span, node) in [(follow, "n2"), (release, "n1")] {
        assert_eq!(span.trace_id, handoff.trace_id, "{span:#?}");
        assert_eq!(span.parent_id, handoff.id, "{span:#?}");
        assert_eq!(span.attributes["node"], node);
    }
    // The target's recovery at the new epoch is the release's child.
    let recover = spans
        .iter()
        .find(|s| s.name == "agora.market.recover" && s.trace_id == handoff.trace_id)
        .unwrap_or_else(|| panic!("no recovery in the handoff's trace: {spans:#?}"));
    assert_eq!(recover.parent_id, release.id);
    assert_eq!(recover.attributes["node"], "n2");
    assert_eq!(recover.attributes["warm"], "true");
    assert_eq!(recover.attributes["epoch"], "2");
}
