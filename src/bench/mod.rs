//! `agora bench`: the whole path through NATS, measured from outside. A node runs as a child
//! process (this same binary, `agora node`) against a nats-server (the given one, or one started
//! here); the bench publishes seeded, cancel-heavy flow (`crate::workload`, one flow per market)
//! to the markets' order streams with JetStream and times each command from its publish to its
//! first execution report. In the same run it measures the ceiling of the machine: the same
//! payloads published to a plain stream and read back by pull consumers, with no engine between.
//!
//! Four phases, each on the same commands: `raw` (JetStream publish + pull consume, the
//! ceiling), `max` (end to end as fast as the window allows), `paced` (end to end at half the
//! `max` rate, or at `--rate`) and `raw_paced` (JetStream alone at that rate: the latency floor
//! under `paced`). The window bounds the commands published and not yet answered
//! (reported, or consumed for `raw`), so every phase is a closed loop: the rate it measures is
//! sustained, and its latency is that of the rate, not of a backlog growing in a stream.
//! CPU time of the node, of the nats-server (when started here) and of the bench itself is read
//! from `/proc` around each phase, so the node's cost shows apart from NATS's.
//!
//! Everything it creates lives under a prefix of its own (`agora-bench-<id>`): on a shared NATS
//! it never touches another deployment's streams, and it deletes its own when done. This module
//! must never assert a speed (it reports, the reader judges), and never leave a process it
//! started running.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, consumer, stream};
use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::bus::{self, Journal, LocalServer, Subjects};

mod print;
mod process;
mod raw;

use crate::telemetry::process::cpu_ms;
use crate::wire::WireCommandOut;
use crate::workload::{self, FlowParams};
use process::{NodeProcess, TempDir};
use raw::raw_phase;

/// How long a phase may go without a single command answered before it is declared stuck.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the progress line is refreshed (on a terminal).
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// Messages a pull request of the raw consumers asks for: the node's default `fetch_max`.
const RAW_FETCH_MAX: usize = 256;
/// The p99 target of the paced phase, in microseconds.
const P99_TARGET_US: u64 = 5_000;
/// The share of the raw ceiling the end-to-end rate should reach.
const RATIO_TARGET: f64 = 0.5;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// A running NATS; `None` starts a nats-server for the run in a temporary directory.
    pub nats_url: Option<String>,
    pub markets: usize,
    /// Commands per phase, over all markets (each market gets an equal share).
    pub orders: usize,
    /// Resting orders each market starts with (published before the timed commands).
    pub resting: usize,
    /// Commands/s of the paced phase, over all markets; 0 means half the `max` phase's rate.
    pub rate: f64,
    pub seed: u64,
    /// Commands published and not yet answered, over all markets.
    pub window: usize,
    /// Memory streams (node and raw) instead of file streams.
    pub memory: bool,
    /// Replicas of every stream, node and raw alike (3 against a NATS cluster of three).
    pub replicas: usize,
    /// Where to write every timed command's publish time and latency (CSV), to see when the
    /// slow ones happened; `None`: nowhere.
    pub latency_log: Option<PathBuf>,
}

impl Default for BenchOptions {
    fn default() -> BenchOptions {
        BenchOptions {
            nats_url: None,
            markets: 2,
            orders: 200_000,
            resting: 1_000,
            rate: 0.0,
            seed: 42,
            window: 2_000,
            memory: false,
            replicas: 1,
            latency_log: None,
        }
    }
}

/// A bench that could not run to the end, with what failed and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BenchError(pub String);

impl BenchError {
    fn new(message: impl Into<String>) -> BenchError {
        BenchError(message.into())
    }
}

impl From<bus::BusError> for BenchError {
    fn from(e: bus::BusError) -> BenchError {
        BenchError(e.to_string())
    }
}

/// Latency percentiles, in microseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

/// One phase's numbers.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseResult {
    /// `raw`, `max` or `paced`.
    pub name: String,
    /// The pace asked for (commands/s over all markets); `None` when as fast as possible.
    pub target_rate: Option<f64>,
    pub commands: u64,
    pub seconds: f64,
    pub commands_per_sec: f64,
    /// Publish → first execution report (`raw`: publish → pull-consumed).
    pub latency_us: Latency,
    /// CPU time of the node per 1,000 commands.
    pub node_cpu_ms_per_1000: f64,
    /// CPU time of the nats-server per 1,000 commands, when it runs here.
    pub nats_cpu_ms_per_1000: Option<f64>,
    /// CPU time of this load generator per 1,000 commands (it shares the machine).
    pub bench_cpu_ms_per_1000: f64,
    /// Journal messages (batches) the node wrote for the phase's commands; `None` for `raw`
    /// (or when the server did not say).
    pub batches: Option<u64>,
    /// Execution-report messages (one per account per batch) the node wrote for the phase's
    /// commands; `None` for `raw`.
    pub report_messages: Option<u64>,
}

/// Whether a target was met, with the number it is judged on.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub what: String,
    pub met: bool,
    pub value: f64,
    /// `ratio` or `us`.
    pub unit: &'static str,
}

/// The result of a run.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub markets: usize,
    pub orders_per_phase: u64,
    pub resting_per_market: usize,
    pub seed: u64,
    pub window: usize,
    pub storage: &'static str,
    pub replicas: usize,
    /// `started by the bench` or the URL given.
    pub nats: String,
    pub phases: Vec<PhaseResult>,
    /// End-to-end `max` rate over the `raw` rate.
    pub ratio: f64,
    pub targets: Vec<Target>,
}

// ---------------------------------------------------------------------------------------------
// The run

/// Runs the four phases and returns their numbers. Everything started is stopped, and
/// everything created deleted, whether the run succeeds or not.
pub fn run(options: &BenchOptions) -> Result<BenchReport, BenchError> {
    check(options)?;
    let dir = TempDir::create()?;
    let run_id = dir.id.clone();
    let prefix = format!("agora-bench-{run_id}");
    let subjects = Subjects::new(&prefix)?;

    eprintln!(
        "agora bench: generating {} commands of flow for {} markets (seed {})",
        per_market(options) * options.markets,
        options.markets,
        options.seed
    );
    let flows = generate(options)?;
    if let Some(path) = &options.latency_log {
        std::fs::write(path, LATENCY_LOG_HEADER).map_err(|e| {
            BenchError::new(format!(
                "cannot write the latency log {}: {e}; pass a path in a writable directory",
                path.display()
            ))
        })?;
    }

    let (server, url) = match &options.nats_url {
        Some(url) => (None, url.clone()),
        None => {
            let server = LocalServer::start_tied(&dir.path.join("nats"))?;
            let url = server.url();
            (Some(server), url)
        }
    };
    let max_markets: Vec<String> = (1..=options.markets)
        .map(|i| format!("BENCH{i}-USD"))
        .collect();
    let paced_markets: Vec<String> = (1..=options.markets)
        .map(|i| format!("PACED{i}-USD"))
        .collect();
    let all: Vec<&String> = max_markets.iter().chain(&paced_markets).collect();
    let config = node_config(&url, &dir.path, &prefix, options, &all)?;
    let config_path = dir.path.join("node.toml");
    std::fs::write(&config_path, config).map_err(|e| {
        BenchError::new(format!(
            "cannot write the node's configuration {}: {e}",
            config_path.display()
        ))
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError::new(format!("cannot start the async runtime: {e}")))?;
    eprintln!("agora bench: starting the node under test");
    let mut node = NodeProcess::start(&config_path, &dir.path.join("node.log"))?;
    let pids = Pids {
        node: node.pid(),
        nats: server.as_ref().and_then(LocalServer::pid),
    };
    let measured = match node.wait_ready() {
        Ok(()) => runtime.block_on(phases(Run {
            url: url.clone(),
            subjects: subjects.clone(),
            options: options.clone(),
            flows,
            max_markets,
            paced_markets,
            raw_stream: format!("AGORA_BENCH_{}_RAW", run_id.to_ascii_uppercase()),
            pids,
            node: &mut node,
        })),
        Err(e) => Err(e),
    };
    // Whatever happened, the node stops before its NATS does (and before its streams go).
    let stopped = node.stop();
    if options.nats_url.is_some()
        && let Err(e) = runtime.block_on(delete_run_streams(&url, &subjects, &run_id))
    {
        eprintln!("agora bench: could not delete this run's streams (prefix {prefix}): {e}");
    }
    drop(runtime);
    drop(server);
    let phases = measured?;
    stopped?;
    Ok(report(options, phases))
}

fn check(options: &BenchOptions) -> Result<(), BenchError> {
    if options.markets == 0 || options.markets > 64 {
        return Err(BenchError::new(format!(
            "--markets {}: use 1 to 64",
            options.markets
        )));
    }
    if options.orders < options.markets {
        return Err(BenchError::new(format!(
            "--orders {}: use at least one a market ({})",
            options.orders, options.markets
        )));
    }
    if options.window < options.markets {
        return Err(BenchError::new(format!(
            "--window {}: use at least one a market ({})",
            options.window, options.markets
        )));
    }
    if !options.rate.is_finite() || options.rate < 0.0 {
        return Err(BenchError::new(format!(
            "--rate {}: use 0 (half the maximum) or a number of commands per second",
            options.rate
        )));
    }
    Ok(())
}

fn per_market(options: &BenchOptions) -> usize {
    options.orders.div_ceil(options.markets)
}

/// One market's generated flow, encoded as it goes on the wire.
struct Flow {
    prefill: Arc<Vec<Vec<u8>>>,
    commands: Arc<Vec<Vec<u8>>>,
}

fn generate(options: &BenchOptions) -> Result<Vec<Flow>, BenchError> {
    let commands = per_market(options);
    (0..options.markets)
        .map(|m| {
            let params = FlowParams {
                resting: options.resting,
                ..FlowParams::small_book(options.seed.wrapping_add(m as u64), commands)
            };
            let w = workload::generate(&params);
            let encode = |cmds: &[crate::book::Command]| -> Result<Vec<Vec<u8>>, BenchError> {
                cmds.iter()
                    .map(|c| {
                        rmp_serde::to_vec_named(&WireCommandOut::from_command(&w.spec, c, false))
                            .map_err(|e| BenchError::new(format!("cannot encode a command: {e}")))
                    })
                    .collect()
            };
            Ok(Flow {
                prefill: Arc::new(encode(&w.prefill)?),
                commands: Arc::new(encode(&w.commands)?),
            })
        })
        .collect()
}

/// The node's configuration: the NATS to use, its data directory, the run's prefix and the
/// bench markets (the generator's spec under each market's symbol).
fn node_config(
    url: &str,
    dir: &Path,
    prefix: &str,
    options: &BenchOptions,
    markets: &[&String],
) -> Result<String, BenchError> {
    // The generator's market, under each bench symbol, as a market created now runs it (with
    // the default cid window).
    let spec = workload::bench_spec();
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut toml = format!(
        "node_id = \"bench\"\nnats_url = {}\ndata_dir = {}\nprefix = {}\n\n[streams]\nmemory = {}\nreplicas = {}\n",
        quote(url),
        quote(&dir.join("node").to_string_lossy()),
        quote(prefix),
        options.memory,
        options.replicas,
    );
    for symbol in markets {
        let mut input = spec.to_input();
        input.cid_window_secs = None;
        let mut input = input.for_new_market();
        input.symbol = (*symbol).clone();
        input.base_token = None;
        input.quote_token = None;
        let value = serde_json::to_value(&input)
            .map_err(|e| BenchError::new(format!("cannot write the market spec: {e}")))?;
        toml.push_str("\n[[markets]]\n");
        if let serde_json::Value::Object(fields) = value {
            for (key, v) in fields {
                match v {
                    serde_json::Value::Null => {}
                    serde_json::Value::String(s) => {
                        toml.push_str(&format!("{key} = {}\n", quote(&s)))
                    }
                    other => toml.push_str(&format!("{key} = {other}\n")),
                }
            }
        }
    }
    Ok(toml)
}

fn report(options: &BenchOptions, phases: Vec<PhaseResult>) -> BenchReport {
    let rate = |name: &str| {
        phases
            .iter()
            .find(|p| p.name == name)
            .map_or(0.0, |p| p.commands_per_sec)
    };
    let ratio = rate("max") / rate("raw").max(1e-9);
    let mut targets = vec![Target {
        what: format!(
            "sustained end to end at least {:.0}% of the raw JetStream ceiling",
            RATIO_TARGET * 100.0
        ),
        met: ratio >= RATIO_TARGET,
        value: ratio,
        unit: "ratio",
    }];
    if let Some(paced) = phases.iter().find(|p| p.name == "paced") {
        let at = if options.rate > 0.0 {
            format!("at --rate {:.0}/s (not half the maximum)", options.rate)
        } else {
            format!(
                "at half the maximum rate ({:.0}/s)",
                paced.target_rate.unwrap_or(0.0)
            )
        };
        targets.push(Target {
            what: format!(
                "p99 publish to report under {} ms {at}",
                P99_TARGET_US / 1000
            ),
            met: paced.latency_us.p99 < P99_TARGET_US,
            value: paced.latency_us.p99 as f64,
            unit: "us",
        });
    }
    BenchReport {
        markets: options.markets,
        orders_per_phase: phases.first().map_or(0, |p| p.commands),
        resting_per_market: options.resting,
        seed: options.seed,
        window: options.window,
        storage: if options.memory { "memory" } else { "file" },
        replicas: options.replicas,
        nats: options.nats_url.as_deref().map_or_else(
            || "started by the bench".into(),
            crate::bus::connect::redact,
        ),
        phases,
        ratio,
        targets,
    }
}

// ---------------------------------------------------------------------------------------------
// The phases

struct Pids {
    node: u32,
    nats: Option<u32>,
}

struct Run<'a> {
    url: String,
    subjects: Subjects,
    options: BenchOptions,
    flows: Vec<Flow>,
    max_markets: Vec<String>,
    paced_markets: Vec<String>,
    raw_stream: String,
    pids: Pids,
    node: &'a mut NodeProcess,
}

async fn phases(mut run: Run<'_>) -> Result<Vec<PhaseResult>, BenchError> {
    let publisher = bus::connect(&run.url, "agora-bench-publisher").await?;
    let listener = bus::connect(&run.url, "agora-bench-listener").await?;
    // Room for every market's window of acks, so publishing never waits on the client.
    let js = jetstream::context::ContextBuilder::new()
        .max_ack_inflight(run.options.window * 2 + 1024)
        .build(publisher.clone());
    let mut results = Vec::new();

    results.push(raw_phase(&mut run, &js, None).await?);
    let max = end_to_end_phase(&mut run, &js, &listener, None).await?;
    let pace = if run.options.rate > 0.0 {
        run.options.rate
    } else {
        max.commands_per_sec / 2.0
    };
    results.push(max);
    results.push(end_to_end_phase(&mut run, &js, &listener, Some(pace)).await?);
    // JetStream alone at the paced rate: the latency floor the paced phase stands on.
    results.push(raw_phase(&mut run, &js, Some(pace)).await?);
    let _ = publisher.flush().await;
    Ok(results)
}

/// The latency log's first line; then one line per timed command, phase by phase, each
/// phase's lines in publish order.
const LATENCY_LOG_HEADER: &str = "phase,market,command,published_us,latency_us\n";

/// One answered command, for the latency log: its market's index, its index in that market's
/// flow, when it was published (microseconds from the phase's start) and its latency.
struct Sample {
    market: u32,
    command: u32,
    published_us: u64,
    latency_us: u64,
}

/// Appends a phase's samples to the latency log, in publish order.
fn append_latency_log(path: &Path, phase: &str, shared: &Shared) -> Result<(), BenchError> {
    let Some(samples) = &shared.samples else {
        return Ok(());
    };
    let mut samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
    samples.sort_unstable_by_key(|s| (s.published_us, s.market, s.command));
    let failed = |e: std::io::Error| {
        BenchError::new(format!(
            "cannot write the latency log {}: {e}; is the disk full?",
            path.display()
        ))
    };
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(failed)?;
    let mut out = std::io::BufWriter::new(file);
    for s in &samples {
        writeln!(
            out,
            "{phase},{},{},{},{}",
            s.market, s.command, s.published_us, s.latency_us
        )
        .map_err(failed)?;
    }
    out.flush().map_err(failed)
}

/// What a phase shares between its publishers, its collector and its progress line.
struct Shared {
    started: Instant,
    /// Per market, per command: nanoseconds from `started` to its publish, plus one (0: not
    /// yet published).
    published_at: Vec<Vec<AtomicU64>>,
    sent: AtomicU64,
    acked: AtomicU64,
    answered: AtomicU64,
    /// Per market: commands that may still be published (the window).
    windows: Vec<Arc<Semaphore>>,
    /// Every answered command, when the run keeps a latency log.
    samples: Option<std::sync::Mutex<Vec<Sample>>>,
}

impl Shared {
    fn new(counts: &[usize], window: usize, log: bool) -> Arc<Shared> {
        let per_market = (window / counts.len()).max(1);
        Arc::new(Shared {
            started: Instant::now(),
            published_at: counts
                .iter()
                .map(|&n| (0..n).map(|_| AtomicU64::new(0)).collect())
                .collect(),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            windows: counts
                .iter()
                .map(|_| Arc::new(Semaphore::new(per_market)))
                .collect(),
            samples: log
                .then(|| std::sync::Mutex::new(Vec::with_capacity(counts.iter().sum::<usize>()))),
        })
    }

    fn stamp(&self, market: usize, i: usize) {
        let ns = self.started.elapsed().as_nanos() as u64 + 1;
        self.published_at[market][i].store(ns, Ordering::Release);
    }

    /// Microseconds from the publish of `(market, i)` to `now`, if it was published (and
    /// the sample, when the run keeps a latency log).
    fn latency_us(&self, market: usize, i: usize, now: Instant) -> Option<u64> {
        let at = self.published_at[market][i].load(Ordering::Acquire);
        if at == 0 {
            return None;
        }
        let now_ns = now.duration_since(self.started).as_nanos() as u64;
        let latency_us = now_ns.saturating_sub(at - 1) / 1_000;
        if let Some(samples) = &self.samples {
            samples
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Sample {
                    market: market as u32,
                    command: i as u32,
                    published_us: (at - 1) / 1_000,
                    latency_us,
                });
        }
        Some(latency_us)
    }

    /// One more command answered: counted, and its place in the window given back.
    fn answered(&self, market: usize) {
        self.answered.fetch_add(1, Ordering::Relaxed);
        self.windows[market].add_permits(1);
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 10 minutes at 3 significant digits; the bounds are constants, so this holds.
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .unwrap_or_else(|e| unreachable!("valid histogram bounds: {e}"))
}

/// How a publisher paces itself: command `i` leaves at `start + i / per_sec`.
#[derive(Clone, Copy)]
struct Pace {
    start: tokio::time::Instant,
    per_sec: f64,
}

/// What a publisher task publishes, and how.
struct Publish {
    js: jetstream::Context,
    subject: String,
    market: usize,
    payloads: Arc<Vec<Vec<u8>>>,
    /// The stream sequence the first publish must get (one publisher per stream, in order);
    /// `None` when the stream is shared (raw).
    first_seq: Option<u64>,
    /// Give the window back on each acknowledgement (prefill) instead of on each answer.
    release_on_ack: bool,
    pace: Option<Pace>,
}

/// Publishes every payload in order, within the market's window, checking every ack.
async fn publish(p: Publish, shared: Arc<Shared>) -> Result<(), BenchError> {
    let window = shared.windows[p.market].clone();
    let mut acks = FuturesUnordered::new();
    let check = |(i, ack): (usize, Result<PublishAck, PublishError>)| {
        let ack = ack.map_err(|e| {
            BenchError::new(format!(
                "publish #{} to {} was not acknowledged: {e}; is the nats-server overloaded or out of disk?",
                i + 1,
                p.subject
            ))
        })?;
        if let Some(first) = p.first_seq
            && ack.sequence != first + i as u64
        {
            return Err(BenchError::new(format!(
                "publish #{} to {} was stored at stream sequence {}, expected {}: something else \
                 publishes to {}; run the bench alone on its streams",
                i + 1,
                p.subject,
                ack.sequence,
                first + i as u64,
                ack.stream
            )));
        }
        shared.acked.fetch_add(1, Ordering::Relaxed);
        if p.release_on_ack {
            window.add_permits(1);
        }
        Ok::<(), BenchError>(())
    };
    for (i, payload) in p.payloads.iter().enumerate() {
        if let Some(pace) = p.pace {
            let due = pace.start + Duration::from_secs_f64(i as f64 / pace.per_sec);
            let sleep = tokio::time::sleep_until(due);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    biased;
                    _ = &mut sleep => break,
                    Some(r) = acks.next(), if !acks.is_empty() => check(r)?,
                }
            }
        }
        loop {
            tokio::select! {
                biased;
                permit = window.acquire() => {
                    permit
                        .map_err(|_| BenchError::new("the publish window was closed"))?
                        .forget();
                    break;
                }
                Some(r) = acks.next(), if !acks.is_empty() => check(r)?,
            }
        }
        while let Some(Some(r)) = acks.next().now_or_never() {
            check(r)?;
        }
        shared.stamp(p.market, i);
        let ack =
            p.js.publish(p.subject.clone(), payload.clone().into())
                .await
                .map_err(|e| {
                    BenchError::new(format!(
                        "cannot publish to {}: {e}; does its stream exist?",
                        p.subject
                    ))
                })?;
        shared.sent.fetch_add(1, Ordering::Relaxed);
        acks.push(ack.into_future().map(move |r| (i, r)));
    }
    while let Some(r) = acks.next().await {
        check(r)?;
    }
    Ok(())
}

/// CPU readings of the three processes at one moment.
#[derive(Clone, Copy)]
struct Cpu {
    node: Option<f64>,
    nats: Option<f64>,
    bench: Option<f64>,
}

impl Cpu {
    fn read(pids: &Pids) -> Cpu {
        Cpu {
            node: cpu_ms(Some(pids.node)),
            nats: pids.nats.and_then(|pid| cpu_ms(Some(pid))),
            bench: cpu_ms(None),
        }
    }
}

fn per_1000(before: Option<f64>, after: Option<f64>, commands: u64) -> Option<f64> {
    Some((after? - before?).max(0.0) * 1000.0 / commands.max(1) as f64)
}

/// How a phase ended: its latencies and the moment its last command was answered.
struct Collected {
    histogram: Histogram<u64>,
    last: Instant,
}

/// Waits for a phase's publishers and collector, printing progress, until every command is
/// answered; fails when the node dies, a publisher fails, or nothing is answered for
/// `STALL_TIMEOUT`.
async fn wait_phase(
    label: &str,
    total: u64,
    shared: &Shared,
    publishers: &mut JoinSet<Result<(), BenchError>>,
    mut collector: tokio::task::JoinHandle<Result<Collected, BenchError>>,
    node: &mut NodeProcess,
) -> Result<Collected, BenchError> {
    let terminal = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let mut last_answered = 0;
    let mut last_progress = Instant::now();
    let mut last_line = Instant::now();
    let result = loop {
        tokio::select! {
            done = &mut collector => {
                break done.map_err(|e| BenchError::new(format!("the {label} collector failed: {e}")))?;
            }
            Some(done) = publishers.join_next(), if !publishers.is_empty() => {
                match done {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Err(e),
                    Err(e) => break Err(BenchError::new(format!("a {label} publisher failed: {e}"))),
                }
            }
            _ = tick.tick() => {
                let answered = shared.answered.load(Ordering::Relaxed);
                let elapsed = shared.started.elapsed().as_secs_f64();
                let line = format!(
                    "{label}: sent {} acked {} answered {answered} of {total}, {:.0}/s, {elapsed:.1} s",
                    shared.sent.load(Ordering::Relaxed),
                    shared.acked.load(Ordering::Relaxed),
                    answered as f64 / elapsed.max(1e-9),
                );
                if terminal {
                    eprint!("\r{line}    ");
                } else if last_line.elapsed() >= Duration::from_secs(2) {
                    eprintln!("{line}");
                    last_line = Instant::now();
                }
                if answered != last_answered {
                    last_answered = answered;
                    last_progress = Instant::now();
                }
                if let Err(e) = node.check_alive() {
                    break Err(e);
                }
                if last_progress.elapsed() > STALL_TIMEOUT {
                    break Err(BenchError::new(format!(
                        "{label}: {} of {total} commands got no answer, and none came for {} s; {}",
                        total - answered,
                        STALL_TIMEOUT.as_secs(),
                        node.log_tail()
                    )));
                }
            }
        }
    };
    if terminal {
        eprintln!();
    }
    collector.abort();
    if result.is_err() {
        publishers.abort_all();
        return result;
    }
    while let Some(done) = publishers.join_next().await {
        done.map_err(|e| BenchError::new(format!("a {label} publisher failed: {e}")))??;
    }
    result
}

async fn merge(mut tasks: JoinSet<Result<Collected, BenchError>>) -> Result<Collected, BenchError> {
    let mut all = Collected {
        histogram: histogram(),
        last: Instant::now(),
    };
    let mut first = true;
    while let Some(done) = tasks.join_next().await {
        let c = done.map_err(|e| BenchError::new(format!("a consumer failed: {e}")))??;
        all.histogram
            .add(&c.histogram)
            .map_err(|e| BenchError::new(format!("cannot merge latencies: {e:?}")))?;
        if first || c.last > all.last {
            all.last = c.last;
            first = false;
        }
    }
    Ok(all)
}

fn phase_result(
    name: &str,
    target_rate: Option<f64>,
    commands: u64,
    shared: &Shared,
    collected: &Collected,
    (before, after): (Cpu, Cpu),
    written: Written,
) -> PhaseResult {
    let seconds = collected
        .last
        .saturating_duration_since(shared.started)
        .as_secs_f64()
        .max(1e-9);
    let h = &collected.histogram;
    PhaseResult {
        name: name.into(),
        target_rate,
        commands,
        seconds,
        commands_per_sec: commands as f64 / seconds,
        latency_us: Latency {
            p50: h.value_at_quantile(0.50),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        },
        node_cpu_ms_per_1000: per_1000(before.node, after.node, commands).unwrap_or(0.0),
        nats_cpu_ms_per_1000: per_1000(before.nats, after.nats, commands),
        bench_cpu_ms_per_1000: per_1000(before.bench, after.bench, commands).unwrap_or(0.0),
        batches: written.batches,
        report_messages: written.reports,
    }
}

/// What the node wrote for a phase: journal messages (one a batch) and report messages.
#[derive(Clone, Copy, Default)]
struct Written {
    batches: Option<u64>,
    reports: Option<u64>,
}

impl Written {
    /// Messages now in the journal and report streams for `markets`, if the server says.
    async fn count(
        events: &jetstream::stream::Stream,
        execs: &jetstream::stream::Stream,
        subjects: &Subjects,
        markets: &[String],
    ) -> Written {
        let journal: Vec<String> = markets.iter().map(|m| subjects.events(m)).collect();
        let reports: Vec<String> = markets
            .iter()
            .map(|m| format!("{}.execs.*.{m}", subjects.prefix()))
            .collect();
        Written {
            batches: count_messages(events, &journal).await,
            reports: count_messages(execs, &reports).await,
        }
    }

    fn since(self, before: Written) -> Written {
        let minus = |a: Option<u64>, b: Option<u64>| Some(a?.saturating_sub(b?));
        Written {
            batches: minus(self.batches, before.batches),
            reports: minus(self.reports, before.reports),
        }
    }
}

/// Messages in `stream` on the subjects matching `filters`, if the server says.
async fn count_messages(stream: &jetstream::stream::Stream, filters: &[String]) -> Option<u64> {
    let mut total = 0;
    for filter in filters {
        let mut info = stream.info_with_subjects(filter).await.ok()?;
        while let Some(entry) = info.next().await {
            total += entry.ok()?.1 as u64;
        }
    }
    Some(total)
}

/// An execution-report message, as much of it as the bench reads.
#[derive(Deserialize)]
struct ReportMessage {
    market: String,
    reports: Vec<ReportSeq>,
}

#[derive(Deserialize)]
struct ReportSeq {
    seq: u64,
}

/// Waits until every market's journal reaches its sequence.
async fn wait_journals(
    run: &mut Run<'_>,
    journal: &Journal,
    markets: &[String],
    seqs: &[u64],
) -> Result<(), BenchError> {
    let mut last_progress = Instant::now();
    let mut reached = vec![0; markets.len()];
    loop {
        let mut all = true;
        for (m, market) in markets.iter().enumerate() {
            if reached[m] >= seqs[m] {
                continue;
            }
            let seq = journal
                .last_seq(market)
                .await
                .map_err(|e| BenchError::new(e.to_string()))?;
            if seq > reached[m] {
                reached[m] = seq;
                last_progress = Instant::now();
            }
            all &= seq >= seqs[m];
        }
        if all {
            return Ok(());
        }
        run.node.check_alive()?;
        if last_progress.elapsed() > STALL_TIMEOUT {
            let stuck: Vec<String> = markets
                .iter()
                .zip(&reached)
                .zip(seqs)
                .filter(|((_, r), s)| r < s)
                .map(|((m, r), s)| format!("{m} at {r} of {s}"))
                .collect();
            return Err(BenchError::new(format!(
                "the journals stopped moving for {} s: {}; {}",
                STALL_TIMEOUT.as_secs(),
                stuck.join(", "),
                run.node.log_tail()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Phases 2 and 3: commands to the node, each timed from its publish to its first execution
/// report. `pace` is `None` for as fast as the window allows.
async fn end_to_end_phase(
    run: &mut Run<'_>,
    js: &jetstream::Context,
    listener: &async_nats::Client,
    pace: Option<f64>,
) -> Result<PhaseResult, BenchError> {
    let (name, markets) = match pace {
        None => ("max", run.max_markets.clone()),
        Some(_) => ("paced", run.paced_markets.clone()),
    };
    let label = match pace {
        None => "end to end, as fast as possible".to_string(),
        Some(rate) => format!("end to end at {rate:.0}/s"),
    };
    let events_name = run.subjects.events_stream();
    let events = js
        .get_stream(&events_name)
        .await
        .map_err(|e| BenchError::new(format!("cannot open the stream {events_name}: {e}")))?;
    let journal = Journal::of(events.clone(), &run.subjects);
    let execs_name = run.subjects.execs_stream();
    let execs = js
        .get_stream(&execs_name)
        .await
        .map_err(|e| BenchError::new(format!("cannot open the stream {execs_name}: {e}")))?;

    // Every stream must be fresh: the generated cancels name orders by the stream sequence
    // their orders will get.
    for market in &markets {
        let name = run.subjects.orders_stream(market);
        let mut stream = js
            .get_stream(&name)
            .await
            .map_err(|e| BenchError::new(format!("cannot open the stream {name}: {e}")))?;
        let last = stream
            .info()
            .await
            .map_err(|e| BenchError::new(format!("cannot read the stream {name}: {e}")))?
            .state
            .last_sequence;
        if last != 0 {
            return Err(BenchError::new(format!(
                "the stream {name} already holds {last} messages; the bench needs new streams"
            )));
        }
    }

    let market_index: HashMap<String, usize> = markets
        .iter()
        .enumerate()
        .map(|(m, s)| (s.clone(), m))
        .collect();
    let mut subscriptions = Vec::new();
    for market in &markets {
        let subject = format!("{}.execs.*.{market}", run.subjects.prefix());
        subscriptions.push(
            listener
                .subscribe(subject.clone())
                .await
                .map_err(|e| BenchError::new(format!("cannot subscribe to {subject}: {e}")))?,
        );
    }
    let _ = listener.flush().await;
    let mut reports = futures::stream::select_all(subscriptions);

    // The resting orders, untimed: published, then waited for in the journals.
    eprintln!(
        "agora bench: {label}: prefill of {} resting orders a market",
        run.options.resting
    );
    let prefill_counts: Vec<usize> = run.flows.iter().map(|f| f.prefill.len()).collect();
    let prefill = Shared::new(&prefill_counts, run.options.window, false);
    let mut publishers = JoinSet::new();
    for (m, flow) in run.flows.iter().enumerate() {
        publishers.spawn(publish(
            Publish {
                js: js.clone(),
                subject: run.subjects.orders(&markets[m]),
                market: m,
                payloads: flow.prefill.clone(),
                first_seq: Some(1),
                release_on_ack: true,
                pace: None,
            },
            prefill.clone(),
        ));
    }
    while let Some(done) = publishers.join_next().await {
        done.map_err(|e| BenchError::new(format!("a prefill publisher failed: {e}")))??;
    }
    let bases: Vec<u64> = prefill_counts.iter().map(|&n| n as u64).collect();
    wait_journals(run, &journal, &markets, &bases).await?;
    let written_before = Written::count(&events, &execs, &run.subjects, &markets).await;

    let counts: Vec<usize> = run.flows.iter().map(|f| f.commands.len()).collect();
    let total: u64 = counts.iter().map(|&n| n as u64).sum();
    let cpu_before = Cpu::read(&run.pids);
    let shared = Shared::new(
        &counts,
        run.options.window,
        run.options.latency_log.is_some(),
    );
    let collector = {
        let shared = shared.clone();
        let bases = bases.clone();
        let counts = counts.clone();
        tokio::spawn(async move {
            let mut histogram = histogram();
            let mut seen: Vec<Vec<bool>> = counts.iter().map(|&n| vec![false; n]).collect();
            let mut missing = total;
            while let Some(message) = reports.next().await {
                let now = Instant::now();
                let batch: ReportMessage = rmp_serde::from_slice(&message.payload).map_err(|e| {
                    BenchError::new(format!(
                        "an execution report on {} cannot be read: {e}; are the bench and the node the same build?",
                        message.subject
                    ))
                })?;
                let Some(&m) = market_index.get(&batch.market) else {
                    continue;
                };
                for report in batch.reports {
                    let Some(i) = report.seq.checked_sub(bases[m] + 1) else {
                        continue;
                    };
                    let i = i as usize;
                    if i >= counts[m] || seen[m][i] {
                        continue;
                    }
                    seen[m][i] = true;
                    if let Some(us) = shared.latency_us(m, i, now) {
                        histogram.saturating_record(us.max(1));
                    }
                    shared.answered(m);
                    missing -= 1;
                }
                if missing == 0 {
                    return Ok(Collected {
                        histogram,
                        last: now,
                    });
                }
            }
            Err(BenchError::new(
                "the execution-report subscription ended; did the NATS connection drop?",
            ))
        })
    };
    let start = tokio::time::Instant::now();
    let per_market_rate = pace.map(|rate| rate / markets.len() as f64);
    for (m, flow) in run.flows.iter().enumerate() {
        publishers.spawn(publish(
            Publish {
                js: js.clone(),
                subject: run.subjects.orders(&markets[m]),
                market: m,
                payloads: flow.commands.clone(),
                first_seq: Some(bases[m] + 1),
                release_on_ack: false,
                pace: per_market_rate.map(|per_sec| Pace { start, per_sec }),
            },
            shared.clone(),
        ));
    }
    let collected =
        wait_phase(&label, total, &shared, &mut publishers, collector, run.node).await?;
    let cpu_after = Cpu::read(&run.pids);

    // Every report is published after its journal message; the journal holds the phase too.
    let ends: Vec<u64> = bases
        .iter()
        .zip(&counts)
        .map(|(b, &n)| b + n as u64)
        .collect();
    wait_journals(run, &journal, &markets, &ends).await?;
    let written = Written::count(&events, &execs, &run.subjects, &markets)
        .await
        .since(written_before);
    if let Some(path) = &run.options.latency_log {
        append_latency_log(path, name, &shared)?;
    }
    Ok(phase_result(
        name,
        pace,
        total,
        &shared,
        &collected,
        (cpu_before, cpu_after),
        written,
    ))
}

/// Deletes the streams, buckets and object stores of this run (on a NATS the bench did not
/// start; its own server's data goes with its temporary directory).
async fn delete_run_streams(
    url: &str,
    subjects: &Subjects,
    run_id: &str,
) -> Result<(), BenchError> {
    let client = bus::connect(url, "agora-bench-cleanup").await?;
    let js = jetstream::new(client);
    let stream_prefix = format!("AGORA_BENCH_{}_", run_id.to_ascii_uppercase());
    let bucket_prefix = subjects.bucket("");
    let mut names = js.stream_names();
    let mut ours = Vec::new();
    while let Some(name) = names.next().await {
        let name = name.map_err(|e| {
            BenchError::new(format!("cannot list the streams to delete this run's: {e}"))
        })?;
        if name.starts_with(&stream_prefix)
            || name.starts_with(&format!("KV_{bucket_prefix}"))
            || name.starts_with(&format!("OBJ_{bucket_prefix}"))
        {
            ours.push(name);
        }
    }
    for name in ours {
        js.delete_stream(&name).await.map_err(|e| {
            BenchError::new(format!(
                "cannot delete the stream {name} this run created: {e}; delete it with `nats stream rm {name}`"
            ))
        })?;
    }
    Ok(())
}
