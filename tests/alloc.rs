//! Proof that the book allocates nothing per command once warm: a counting allocator (per
//! thread, so other tests do not disturb it) watches the second half of each benchmark flow,
//! after the first half has brought every container to its working size. The same allocator
//! weighs a book restored from a snapshot, as a node holds it after a restart.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use agora::book::Event;
use agora::workload::{self, FlowParams};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    /// Bytes allocated and not yet freed by this thread (may go below 0 when it frees what
    /// another allocated).
    static LIVE: Cell<i64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counter is a
// const-initialised thread local, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        LIVE.with(|c| c.set(c.get() + layout.size() as i64));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.with(|c| c.set(c.get() - layout.size() as i64));
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        LIVE.with(|c| c.set(c.get() + new_size as i64 - layout.size() as i64));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

fn live_bytes() -> i64 {
    LIVE.with(Cell::get)
}

/// `window`: the market's cid window (seconds, entries), or none; `limits`: its per-account
/// rate, burst and open-order cap, or none.
fn check(
    name: &str,
    params: FlowParams,
    window: Option<(u32, u32)>,
    limits: Option<(u32, u32, u32)>,
) {
    let mut w = workload::generate(&params);
    if let Some((secs, orders)) = window {
        w.spec.cid_window_secs = secs;
        w.spec.cid_window_orders = orders;
    }
    if let Some((rate, burst, open)) = limits {
        w.spec.account_rate = rate;
        w.spec.account_burst = burst;
        w.spec.account_orders_max = open;
    }
    let mut book = w.prefilled_book();
    let mut events: Vec<Event> = Vec::with_capacity(4096);
    let (warm, measured) = w.commands.split_at(w.commands.len() / 2);
    for cmd in warm {
        events.clear();
        book.apply(cmd, &mut events);
    }
    let before = allocations();
    let mut produced = 0usize;
    for cmd in measured {
        events.clear();
        book.apply(cmd, &mut events);
        produced += events.len();
    }
    let allocated = allocations() - before;
    assert!(
        produced > measured.len(),
        "{name}: the flow should produce events"
    );
    assert_eq!(
        allocated,
        0,
        "{name}: {allocated} heap allocations over {} commands once warm",
        measured.len()
    );
}

#[test]
fn no_heap_allocation_per_command_once_warm() {
    // Debug builds check every invariant after each command; keep them to the small book.
    if cfg!(debug_assertions) {
        check(
            "a (small book)",
            FlowParams::small_book(7, 10_000),
            None,
            None,
        );
        check(
            "a (small book, cid window)",
            FlowParams::small_book(7, 10_000),
            Some((120, 1_000)),
            None,
        );
    } else {
        check(
            "a (1k resting)",
            FlowParams::small_book(7, 400_000),
            None,
            None,
        );
        check(
            "b (100k resting)",
            FlowParams::large_book(7, 400_000),
            None,
            None,
        );
        // The window full (by its cap) for the whole measured half: entries leave and come.
        check(
            "a (1k resting, cid window)",
            FlowParams::small_book(7, 400_000),
            Some((120, 50_000)),
            None,
        );
        // Every account's rate debt tracked, some commands refused by each limit.
        check(
            "a (1k resting, per-account limits)",
            FlowParams::small_book(7, 400_000),
            None,
            Some((200, 20, 8)),
        );
    }
}

/// Heap bytes an order of a book restored from a snapshot of `orders` resting limit orders
/// (over 1,000 levels a side, 8 accounts, as the big node of BENCHMARKS.md holds them), each
/// with a cid of `cid_len` bytes when given. The snapshot is written out record by record from
/// one order's (applying 20,000 orders would check every invariant after each in debug
/// builds).
fn restored_bytes_an_order(orders: u64, cid_len: Option<usize>) -> f64 {
    use agora::book::{Account, Cid, Command, NewOrder, Op, OrderBook, OrderId, Price, Qty, Side};
    let mut book = OrderBook::new(workload::bench_spec());
    let mut events = Vec::new();
    let first = NewOrder::limit(Side::Buy, Price(9_999), Qty(1000));
    book.apply(
        &Command {
            seq: 1,
            pos: 0,
            ts: 1_700_000_000_000_000_000,
            account: Account::new("mm-0").expect("account"),
            op: Op::New(first),
        },
        &mut events,
    );
    let mut snapshot = book.snapshot();
    let template = snapshot.bids[0].clone();
    snapshot.bids.clear();
    // Levels best first; within a level, oldest (lowest oid) first.
    let per_side = orders / 2;
    let levels = 1000u64;
    for (side, list) in [(Side::Buy, 0u64), (Side::Sell, 1u64)] {
        for level in 0..levels {
            let mut k = level * 2 + list;
            while k < orders && k / 2 < per_side {
                let mut r = template.clone();
                r.oid = OrderId::from_input(k + 1, 0);
                r.account = Account::new(&format!("mm-{}", k % 8)).expect("account");
                r.cid = cid_len.map(|n| Cid::new(&format!("{k:0n$}")).expect("cid"));
                r.side = side;
                r.price = Some(Price(match side {
                    Side::Buy => 9_999 - level,
                    Side::Sell => 10_001 + level,
                }));
                r.ts = template.ts + k;
                r.last_seq = k + 1;
                match side {
                    Side::Buy => snapshot.bids.push(r),
                    Side::Sell => snapshot.asks.push(r),
                }
                k += levels * 2;
            }
        }
    }
    snapshot.last_input = Some((orders, 0));
    drop(book);
    let before = live_bytes();
    let restored = OrderBook::restore(&snapshot).expect("restore");
    let held = live_bytes() - before;
    assert_eq!(restored.order_count() as u64, orders);
    held as f64 / orders as f64
}

/// The memory target of a big node (BENCHMARKS.md: at most 150 bytes an order resident) for
/// the book itself, as a market holds it after a restart. Deterministic: a count of bytes, not
/// a timing.
#[test]
fn a_restored_book_holds_at_most_150_bytes_an_order() {
    let plain = restored_bytes_an_order(20_000, None);
    println!("20,000 orders without cids: {plain:.1} bytes an order");
    assert!(
        plain <= 150.0,
        "a restored book of 20,000 plain orders holds {plain:.1} bytes an order"
    );
    // A cid costs its slot (48 bytes) and the cid index.
    let with_cids = restored_bytes_an_order(20_000, Some(36));
    println!("20,000 orders with 36-byte cids: {with_cids:.1} bytes an order");
    assert!(
        with_cids <= 210.0,
        "a restored book of 20,000 orders with cids holds {with_cids:.1} bytes an order"
    );
}
