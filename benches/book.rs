//! The book alone on the seeded workloads of BENCHMARKS.md: (a) ~1,000 resting orders and
//! (b) ~100,000, each with the cancel-heavy mix (~55% limit, ~10% market, ~35% cancel, ~25% of
//! commands trading). The fast book runs beside the naive reference book as the baseline.
//! `cargo bench --bench book`; results and the machine go into BENCHMARKS.md.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

use agora::book::Event;
use agora::book::reference::ReferenceBook;
use agora::workload::{self, FlowParams, Workload};

const SEED: u64 = 42;
const COMMANDS: usize = 200_000;

fn reference_prefilled(w: &Workload) -> ReferenceBook {
    let mut book = ReferenceBook::new(w.spec.clone());
    let mut events = Vec::new();
    for cmd in &w.prefill {
        events.clear();
        book.apply(cmd, &mut events);
    }
    book
}

fn run(c: &mut Criterion, name: &str, params: FlowParams) {
    let w = workload::generate(&params);
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(w.commands.len() as u64));
    group.sample_size(10);
    group.bench_function("fast", |b| {
        b.iter_batched_ref(
            || (w.prefilled_book(), Vec::<Event>::with_capacity(4096)),
            |(book, events)| {
                for cmd in &w.commands {
                    events.clear();
                    book.apply(black_box(cmd), events);
                }
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("reference", |b| {
        b.iter_batched_ref(
            || (reference_prefilled(&w), Vec::<Event>::with_capacity(4096)),
            |(book, events)| {
                for cmd in &w.commands {
                    events.clear();
                    book.apply(black_box(cmd), events);
                }
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

/// What a handoff and a snapshot cost on a book of 20,000 resting orders: the canonical
/// snapshot, the state hash, and a clone of the book.
fn state(c: &mut Criterion) {
    let mut params = FlowParams::large_book(SEED, 0);
    params.resting = 20_000;
    params.spread_ticks = 2_000;
    let book = workload::generate(&params).prefilled_book();
    let mut group = c.benchmark_group("state_20k_resting");
    group.sample_size(20);
    group.bench_function("snapshot", |b| b.iter(|| black_box(book.snapshot())));
    group.bench_function("state_hash", |b| b.iter(|| black_box(book.state_hash())));
    group.bench_function("clone", |b| b.iter(|| black_box(book.clone())));
    group.finish();
}

/// The same handoff costs on a book whose cid window is full at a busy market's size: 20,000
/// resting orders and the last 120 s of a flow taking 0.5 ms a command (~165,000 remembered
/// orders): the snapshot, its MessagePack encoding (what a handoff ships), and the restore
/// (what the target runs before it resumes).
fn state_with_window(c: &mut Criterion) {
    let mut params = FlowParams::large_book(SEED, 240_000);
    params.resting = 20_000;
    params.spread_ticks = 2_000;
    let mut w = workload::generate(&params);
    w.spec.cid_window_secs = 120;
    w.spec.cid_window_orders = 200_000;
    let mut book = w.prefilled_book();
    let mut events = Vec::new();
    for cmd in &w.commands {
        events.clear();
        book.apply(cmd, &mut events);
    }
    let snapshot = book.snapshot();
    let bytes = rmp_serde::to_vec_named(&snapshot).expect("encode");
    eprintln!(
        "state_with_cid_window: {} resting, {} in the cid window, {} bytes encoded",
        snapshot.bids.len() + snapshot.asks.len(),
        snapshot.cid_window.len(),
        bytes.len()
    );
    let mut group = c.benchmark_group("state_with_cid_window");
    group.sample_size(10);
    group.bench_function("snapshot", |b| b.iter(|| black_box(book.snapshot())));
    group.bench_function("encode", |b| {
        b.iter(|| black_box(rmp_serde::to_vec_named(&snapshot).expect("encode")))
    });
    group.bench_function("restore", |b| {
        b.iter(|| black_box(agora::book::OrderBook::restore(&snapshot).expect("restore")))
    });
    group.finish();
}

fn books(c: &mut Criterion) {
    run(c, "a_1k_resting", FlowParams::small_book(SEED, COMMANDS));
    run(c, "b_100k_resting", FlowParams::large_book(SEED, COMMANDS));
}

criterion_group!(benches, books, state, state_with_window);
criterion_main!(benches);
