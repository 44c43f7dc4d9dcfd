//! What a restart costs a market, one step at a time: a book of 20,000 resting orders (a cid on
//! each, 2,000 accounts) taken to its stored snapshot and back. `cargo bench --bench restart`;
//! the figures, per order, go into BENCHMARKS.md ("Restart: where the time goes").
//!
//! It also times the first orders a restored book takes (printed, not a criterion group: each
//! needs a fresh restore): a restored book is sized to its snapshot, so the first order that
//! rests grows its order slab. `AGORA_RESTART_RESTING` sets the resting orders (20,000).

use std::hint::black_box;
use std::io::Read;
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

use agora::actors::core::{self, MARKET_SNAPSHOT_VERSION, MarketCore, MarketSnapshot};
use agora::book::{Command, Event, HashVersion, NewOrder, Op, OrderBook};
use agora::bus::subjects::Subjects;
use agora::workload::{self, FlowParams};

const SEED: u64 = 42;

/// The node's allocator (`main.rs`), so that steps which allocate a book's worth cost here
/// what they cost there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn resting() -> usize {
    match std::env::var("AGORA_RESTART_RESTING") {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("AGORA_RESTART_RESTING={v:?} is not a number")),
        Err(_) => 20_000,
    }
}

fn snapshot() -> MarketSnapshot {
    let mut params = FlowParams::large_book(SEED, 0);
    params.resting = resting();
    params.spread_ticks = (params.resting / 10).max(2_000) as u64;
    let book = workload::generate(&params).prefilled_book();
    MarketSnapshot {
        format_version: MARKET_SNAPSHOT_VERSION,
        market: book.spec().symbol.clone(),
        last_seq: 20_000,
        epoch: 3,
        book_seq: 19_990,
        state_hash: book.state_hash(),
        book: book.snapshot(),
    }
}

/// Microseconds each of the first `n` orders that rest takes on a freshly restored book,
/// the median of `runs` restores each.
fn first_orders(snapshot: &MarketSnapshot, n: usize, runs: usize) -> Vec<f64> {
    // A copy of the best bid joins its level: it rests and crosses nothing.
    let best = snapshot.book.bids.first().expect("a bid rests");
    let mut times = vec![Vec::with_capacity(runs); n];
    let mut events: Vec<Event> = Vec::with_capacity(64);
    for _ in 0..runs {
        let mut book = OrderBook::restore(&snapshot.book).expect("restores");
        let (seq, _) = snapshot.book.last_input.expect("an applied input");
        for (k, t) in times.iter_mut().enumerate() {
            let cmd = Command {
                seq: seq + 1 + k as u64,
                pos: 0,
                ts: best.ts + 1,
                account: best.account,
                op: Op::New(NewOrder::limit(
                    best.side,
                    best.price.expect("a resting limit has a price"),
                    best.qty,
                )),
            };
            events.clear();
            let started = Instant::now();
            book.apply(&cmd, &mut events);
            t.push(started.elapsed().as_secs_f64() * 1e6);
        }
        black_box(&book);
    }
    times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect()
}

fn restart(c: &mut Criterion) {
    let snapshot = snapshot();
    let first = first_orders(&snapshot, 4, 15);
    eprintln!(
        "restart: the first orders resting on a restored book of {} orders took (µs, medians of \
         15 restores) {first:.1?}",
        snapshot.book.bids.len() + snapshot.book.asks.len()
    );
    let orders = (snapshot.book.bids.len() + snapshot.book.asks.len()) as u64;
    let bytes = core::encode_snapshot(&snapshot).expect("encodes");
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .read_to_end(&mut raw)
        .expect("gunzip");
    eprintln!(
        "restart: {orders} orders, {} bytes stored ({:.1} an order), {} before compression \
         ({:.1} an order), encoding {}",
        bytes.len(),
        bytes.len() as f64 / orders as f64,
        raw.len(),
        raw.len() as f64 / orders as f64,
        core::SNAPSHOT_ENCODING,
    );
    let mut group = c.benchmark_group(format!("restart_{}k_resting", resting() / 1000));
    group.throughput(Throughput::Elements(orders));
    group.sample_size(20);
    group.bench_function("encode", |b| {
        b.iter(|| black_box(core::encode_snapshot(&snapshot).expect("encodes")))
    });
    group.bench_function("gunzip", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(raw.len());
            flate2::read::GzDecoder::new(&bytes[..])
                .read_to_end(&mut out)
                .expect("gunzip");
            black_box(out)
        })
    });
    group.bench_function("decode", |b| {
        b.iter(|| {
            black_box(core::decode_snapshot(&bytes, core::SNAPSHOT_ENCODING).expect("decodes"))
        })
    });
    let records = core::encode_snapshot_records(&snapshot).expect("encodes");
    eprintln!(
        "restart: the same as records ({}): {} bytes stored ({:.1} an order)",
        core::SNAPSHOT_ENCODING_RECORDS,
        records.len(),
        records.len() as f64 / orders as f64
    );
    group.bench_function("decode_records", |b| {
        b.iter(|| {
            black_box(
                core::decode_snapshot(&records, core::SNAPSHOT_ENCODING_RECORDS).expect("decodes"),
            )
        })
    });
    group.bench_function("book_restore", |b| {
        b.iter(|| black_box(OrderBook::restore(&snapshot.book).expect("restores")))
    });
    let book = OrderBook::restore(&snapshot.book).expect("restores");
    // What a release restore leaves out: the structures it built, walked whole (debug
    // builds, and tests after every command, still do).
    group.bench_function("book_check_invariants", |b| {
        b.iter(|| black_box(book.check_invariants()).expect("holds"))
    });
    group.bench_function("book_snapshot", |b| b.iter(|| black_box(book.snapshot())));
    group.bench_function("book_state_hash", |b| {
        b.iter(|| black_box(book.state_hash()))
    });
    // The version snapshots of format 1 hold, timed beside the current one.
    group.bench_function("book_state_hash_fnv1", |b| {
        b.iter(|| black_box(book.state_hash_as(HashVersion::Fnv1)))
    });
    group.bench_function("market_restore", |b| {
        b.iter(|| {
            black_box(MarketCore::restore(Subjects::default(), &snapshot, 100).expect("restores"))
        })
    });
    group.bench_function("whole", |b| {
        b.iter(|| {
            let s = core::decode_snapshot(&bytes, core::SNAPSHOT_ENCODING).expect("decodes");
            black_box(MarketCore::restore(Subjects::default(), &s, 100).expect("restores"))
        })
    });
    group.finish();
}

criterion_group!(benches, restart);
criterion_main!(benches);
