//! Proof that the book allocates nothing per command once warm: a counting allocator (per
//! thread, so other tests do not disturb it) watches the second half of each benchmark flow,
//! after the first half has brought every container to its working size.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use agora::book::Event;
use agora::workload::{self, FlowParams};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counter is a
// const-initialised thread local, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
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
