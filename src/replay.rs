//! `agora replay`: drive one book offline from a file of JSON-lines commands, with no NATS.
//!
//! Each line is one command exactly as on the wire, plus optional `ts` (ns, default 0),
//! `account` (default `replay`) and `seq` (default the line number). Every event goes out as one
//! JSON line; a line that cannot be decoded becomes a `rejected` event naming the line, and the
//! replay goes on. `--bench K` parses everything first and then times only the book. This module
//! must never touch the network or a clock inside the timed region other than to read it.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use flate2::read::MultiGzDecoder;
use hdrhistogram::Histogram;

use crate::book::{Account, Command, Event, LOOKAHEAD, MarketSpec, Matching, OrderBook, StateHash};
use crate::wire::{self, DecodeContext, EventView, RejectView, WireReject};

/// One input line, decoded.
pub enum Input {
    Command(Command),
    Reject(WireReject),
}

/// Opens `path`, reading gzip transparently (by its magic bytes, whatever its name).
pub fn open_input(path: &Path) -> Result<Box<dyn BufRead>> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut magic = [0u8; 2];
    let n = file
        .read(&mut magic)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    if n == 2 && magic == [0x1f, 0x8b] {
        Ok(Box::new(BufReader::new(MultiGzDecoder::new(file))))
    } else {
        Ok(Box::new(BufReader::new(file)))
    }
}

/// Decodes every line of `reader` into inputs for `spec`.
pub fn read_inputs(reader: impl BufRead, spec: &MarketSpec) -> Result<Vec<Input>> {
    let default_account = Account::new("replay").ok();
    let mut inputs = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line_no = i as u64 + 1;
        let line = line.with_context(|| format!("cannot read line {line_no}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let decoded = match wire::parse_json(line.as_bytes()) {
            Ok(cmd) => {
                let seq = cmd.seq.unwrap_or(line_no);
                let ts = cmd.ts.unwrap_or(0);
                let ctx = DecodeContext {
                    spec,
                    seq,
                    ts,
                    default_account,
                    bound_account: None,
                    batch_max: crate::book::types::BATCH_COMMANDS_MAX,
                    operator: true,
                };
                cmd.into_commands(&ctx)
            }
            Err(message) => vec![Err(WireReject {
                seq: line_no,
                pos: 0,
                ts: 0,
                op: None,
                account: None,
                cid: None,
                reason: crate::book::RejectReason::Malformed,
                message,
            })],
        };
        for result in decoded {
            inputs.push(match result {
                Ok(cmd) => Input::Command(cmd),
                Err(mut reject) => {
                    reject.message = format!("line {line_no}: {}", reject.message);
                    Input::Reject(reject)
                }
            });
        }
    }
    Ok(inputs)
}

/// Counts of one replay.
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    pub commands: u64,
    pub events: u64,
    pub trades: u64,
    pub rejected: u64,
    pub seconds: f64,
}

/// Applies `inputs` to `book`, writing every event as a JSON line.
pub fn run(book: &mut OrderBook, inputs: &[Input], out: &mut impl Write) -> Result<Summary> {
    let mut summary = Summary::default();
    let mut events: Vec<Event> = Vec::with_capacity(256);
    let spec = book.spec().clone();
    let started = Instant::now();
    for input in inputs {
        match input {
            Input::Command(cmd) => {
                summary.commands += 1;
                events.clear();
                book.apply(cmd, &mut events);
                for e in &events {
                    summary.events += 1;
                    match e {
                        Event::Trade(_) => summary.trades += 1,
                        Event::Rejected(_) => summary.rejected += 1,
                        _ => {}
                    }
                    serde_json::to_writer(&mut *out, &EventView::new(&spec, e))?;
                    out.write_all(b"\n")?;
                }
            }
            Input::Reject(r) => {
                summary.events += 1;
                summary.rejected += 1;
                serde_json::to_writer(&mut *out, &RejectView::new(&spec, r))?;
                out.write_all(b"\n")?;
            }
        }
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// What `--bench` measured for one book.
#[derive(Clone, Debug)]
pub struct BenchReport {
    pub commands: usize,
    pub repetitions: usize,
    pub commands_per_sec_median: f64,
    pub commands_per_sec_all: Vec<f64>,
    /// Per-command latency (ns) from one extra timed pass: p50, p99, p99.9, p99.99, max. Each
    /// includes reading the clock twice (tens of ns).
    pub latency_ns: [u64; 5],
    pub state_hash: StateHash,
}

impl BenchReport {
    /// Prints `key: value` lines, each key prefixed by `prefix` (empty for the main book).
    pub fn print(&self, out: &mut impl Write, prefix: &str) -> io::Result<()> {
        writeln!(out, "{prefix}commands: {}", self.commands)?;
        writeln!(out, "{prefix}repetitions: {}", self.repetitions)?;
        let runs: Vec<String> = self
            .commands_per_sec_all
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect();
        writeln!(out, "{prefix}commands_per_sec_runs: {}", runs.join(" "))?;
        writeln!(
            out,
            "{prefix}commands_per_sec_median: {:.0}",
            self.commands_per_sec_median
        )?;
        let [p50, p99, p999, p9999, max] = self.latency_ns;
        writeln!(out, "{prefix}latency_ns_p50: {p50}")?;
        writeln!(out, "{prefix}latency_ns_p99: {p99}")?;
        writeln!(out, "{prefix}latency_ns_p99.9: {p999}")?;
        writeln!(out, "{prefix}latency_ns_p99.99: {p9999}")?;
        writeln!(out, "{prefix}latency_ns_max: {max}")?;
        writeln!(out, "{prefix}state_hash: {}", self.state_hash)
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The commands of `inputs`, without the lines that did not decode.
pub fn commands(inputs: &[Input]) -> Vec<&Command> {
    inputs
        .iter()
        .filter_map(|i| match i {
            Input::Command(c) => Some(c),
            Input::Reject(_) => None,
        })
        .collect()
}

/// Times only the book `B`: `repetitions` runs over the commands, each on a fresh book, then
/// one more run timing every command on its own for the latency percentiles. With `lookahead`
/// the book is told of the next `LOOKAHEAD` commands before each one, as a market does.
pub fn bench<B: Matching>(
    spec: &MarketSpec,
    commands: &[&Command],
    repetitions: usize,
    lookahead: bool,
) -> Result<BenchReport> {
    if repetitions == 0 {
        bail!("--bench needs at least 1 repetition");
    }
    if commands.is_empty() {
        bail!("the file holds no valid command to time");
    }
    let ahead = if lookahead { LOOKAHEAD } else { 0 };
    let step = |book: &mut B, i: usize, events: &mut Vec<Event>| {
        if ahead > 0 && book.prefetches() {
            for k in (1..=ahead).rev() {
                if let Some(c) = commands.get(i + k) {
                    book.prefetch(c, k);
                }
            }
        }
        events.clear();
        book.apply(commands[i], events);
    };
    let mut events: Vec<Event> = Vec::with_capacity(1024);
    let mut rates = Vec::with_capacity(repetitions);
    let mut hash = None;
    for _ in 0..repetitions {
        let mut book = B::with_spec(spec.clone());
        let started = Instant::now();
        for i in 0..commands.len() {
            step(&mut book, i, &mut events);
        }
        let seconds = started.elapsed().as_secs_f64().max(1e-9);
        rates.push(commands.len() as f64 / seconds);
        hash = Some(book.state_hash());
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
        .context("cannot build the latency histogram")?;
    let mut book = B::with_spec(spec.clone());
    for i in 0..commands.len() {
        let started = Instant::now();
        step(&mut book, i, &mut events);
        let ns = started.elapsed().as_nanos() as u64;
        latency.saturating_record(ns.max(1));
    }
    Ok(BenchReport {
        commands: commands.len(),
        repetitions,
        commands_per_sec_median: median(&rates),
        commands_per_sec_all: rates,
        latency_ns: [
            latency.value_at_quantile(0.5),
            latency.value_at_quantile(0.99),
            latency.value_at_quantile(0.999),
            latency.value_at_quantile(0.9999),
            latency.max(),
        ],
        state_hash: hash.unwrap_or(StateHash(0)),
    })
}
