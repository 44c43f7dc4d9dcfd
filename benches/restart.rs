//! What a restart costs a market, one step at a time: a book of 20,000 resting orders (a cid on
//! each, 2,000 accounts) taken to its stored snapshot and back. `cargo bench --bench restart`;
//! the figures, per order, go into BENCHMARKS.md ("Restart: where the time goes").

use std::hint::black_box;
use std::io::Read;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

use agora::actors::core::{self, MARKET_SNAPSHOT_VERSION, MarketCore, MarketSnapshot};
use agora::book::OrderBook;
use agora::bus::subjects::Subjects;
use agora::workload::{self, FlowParams};

const SEED: u64 = 42;

fn snapshot() -> MarketSnapshot {
    let mut params = FlowParams::large_book(SEED, 0);
    params.resting = 20_000;
    params.spread_ticks = 2_000;
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

fn restart(c: &mut Criterion) {
    let snapshot = snapshot();
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
    let mut group = c.benchmark_group("restart_20k_resting");
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
    group.bench_function("book_snapshot", |b| b.iter(|| black_box(book.snapshot())));
    group.bench_function("book_state_hash", |b| {
        b.iter(|| black_box(book.state_hash()))
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
