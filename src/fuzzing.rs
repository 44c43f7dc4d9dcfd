//! Entry points for the fuzz targets in `fuzz/` and for the tests that run the same code on
//! random input in CI: untrusted bytes through the wire decoder into a book.
//!
//! Whatever the bytes, decoding must return commands or rejections (never panic) and the book
//! must keep every invariant. This module must never weaken a check to make fuzzing pass.

use crate::book::{Event, MarketSpec, MarketSpecInput, OrderBook, StpMode};
use crate::wire::{self, DecodeContext};

/// A market with every rule switched on: tick and lot above one unit, min and max quantity,
/// a price band, a default self-trade mode and a small order cap.
pub fn fuzz_spec() -> MarketSpec {
    let mut input = MarketSpecInput::new("FUZZ-USD", 2, 3);
    input.tick_size = Some("0.05".into());
    input.lot_size = Some("0.010".into());
    input.min_qty = Some("0.020".into());
    input.max_qty = Some("1000".into());
    input.price_band_pct = Some("20".into());
    input.stp_default = Some(StpMode::CancelOldest);
    input.orders_max = Some(500);
    match input.validate() {
        Ok(spec) => spec,
        Err(e) => unreachable!("the fuzz spec is valid: {e}"),
    }
}

/// Splits `data` into messages (`[flags][len_lo][len_hi][bytes...]`, flags bit 0 = JSON), decodes
/// each, applies what decodes to one book, and checks the book after every command.
pub fn decode_and_apply(data: &[u8]) {
    let spec = fuzz_spec();
    let mut book = OrderBook::new(spec.clone());
    let mut events: Vec<Event> = Vec::new();
    let mut rest = data;
    let mut seq = 0u64;
    let mut ts = 0u64;
    while rest.len() >= 3 {
        let flags = rest[0];
        let len = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let message = &rest[3..3 + len];
        rest = &rest[3 + len..];
        seq += 1;
        ts += u64::from(flags >> 1) * 1_000;
        let ctx = DecodeContext {
            spec: &spec,
            seq,
            ts,
            default_account: None,
            // Some messages come on an account's own subject.
            bound_account: (flags & 4 == 4)
                .then(|| crate::book::Account::new("acct-1").ok())
                .flatten(),
            batch_max: 50,
            operator: flags & 2 == 2,
        };
        for cmd in wire::decode(message, flags & 1 == 1, &ctx)
            .into_iter()
            .flatten()
        {
            events.clear();
            book.apply(&cmd, &mut events);
            if let Err(e) = book.check_invariants() {
                panic!("invariant broken after {cmd:?}: {e}");
            }
        }
    }
    let snapshot = book.snapshot();
    match OrderBook::restore(&snapshot) {
        Ok(restored) => assert_eq!(restored.snapshot(), snapshot, "restore changed the book"),
        Err(e) => panic!("a book's own snapshot did not restore: {e}"),
    }
}
