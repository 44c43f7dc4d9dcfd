//! `MarketCore`: the pure part of a market actor. Stream messages in (payload, stream sequence,
//! stream timestamp), decoded, stamped, applied to the book; the batch's outgoing messages out.
//!
//! No I/O and no clock: the same messages give the same book and the same outputs on any node,
//! which is what makes recovery by replay and republishing with the same `Nats-Msg-Id`s work.
//! This module must never publish, wait, or read anything but its arguments.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::book::columns::BookColumns;
use crate::book::columns_read::{self, Reader};
use crate::book::{
    BookSnapshot, Event, HashVersion, LOOKAHEAD, MarketSpec, OrderBook, Seq, StateHash, Timestamp,
};
use crate::bus::Subjects;
use crate::bus::outputs::{self, Batch, BatchOutputs, Entry, Outcome};
use crate::wire::{self, DecodeContext};

/// Levels per side that L2 deltas cover.
pub const TOP_LEVELS_DEFAULT: usize = 50;

/// A batch ends after the message that brings its events to this many, so its journal message
/// (~150-250 bytes an event) stays well under NATS' 1 MiB payload limit; the rest of the
/// messages form the next batch.
pub const BATCH_EVENTS_MAX: usize = 2_000;

/// A message decoded: its commands (or their rejections), or the rejection of its subject's
/// account.
type Decoded = Result<Vec<Result<crate::book::Command, wire::WireReject>>, wire::WireReject>;

/// One message of the market's order stream.
#[derive(Clone, Debug)]
pub struct Incoming {
    /// Its stream sequence.
    pub seq: Seq,
    /// The stream's timestamp of it, in nanoseconds.
    pub ts: Timestamp,
    pub payload: Vec<u8>,
    /// Sent with `Content-Type: application/json`; MessagePack otherwise.
    pub json: bool,
    /// Published on the operators' subject (`<prefix>.admin.<MARKET>`), not the orders one.
    pub operator: bool,
    /// Published on an account's own subject (`<prefix>.orders.<MARKET>.<ACCOUNT>`): its
    /// commands may only be for that account. `Err` holds a token that is no valid account:
    /// the whole message is refused.
    pub account: Option<Result<crate::book::Account, String>>,
}

/// Bumped whenever the layout of `MarketSnapshot` changes, or how its state hash is computed.
/// 2: the hash is `HashVersion::Words2`. Restore reads 1 (its hash `Fnv1`) and 2, and refuses
/// others.
pub const MARKET_SNAPSHOT_VERSION: u32 = 2;

/// How the state hash of a snapshot of `format_version` was computed; `None` for a version
/// this build does not read.
pub fn snapshot_hash_version(format_version: u32) -> Option<HashVersion> {
    match format_version {
        1 => Some(HashVersion::Fnv1),
        2 => Some(HashVersion::Words2),
        _ => None,
    }
}

/// A snapshot format this build reads and writes, with the state hash version its snapshots
/// hold: one checked value, so no later step falls back on a default for a format it does
/// not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotFormat {
    version: u32,
    hash: HashVersion,
}

impl SnapshotFormat {
    /// `MARKET_SNAPSHOT_VERSION`.
    pub const CURRENT: SnapshotFormat = SnapshotFormat {
        version: MARKET_SNAPSHOT_VERSION,
        hash: HashVersion::CURRENT,
    };

    /// The format of `version`; `None` for one this build does not read.
    pub fn of(version: u32) -> Option<SnapshotFormat> {
        snapshot_hash_version(version).map(|hash| SnapshotFormat { version, hash })
    }

    pub fn version(self) -> u32 {
        self.version
    }

    /// The state hash version its snapshots hold.
    pub fn hash_version(self) -> HashVersion {
        self.hash
    }
}

impl Default for SnapshotFormat {
    fn default() -> SnapshotFormat {
        SnapshotFormat::CURRENT
    }
}

/// Everything a market needs to go on from a stream sequence: the book and the sequences its
/// outputs follow. One object, so the book and the sequence it covers can never disagree.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MarketSnapshot {
    pub format_version: u32,
    pub market: String,
    /// The last stream sequence applied to `book`.
    pub last_seq: Seq,
    /// The placement epoch of the owner that wrote it.
    pub epoch: u64,
    /// `seq` of the last L2 delta published, so deltas go on without a gap.
    pub book_seq: Seq,
    /// The book's state hash (`snapshot_hash_version` of `format_version`), checked again
    /// after restoring.
    pub state_hash: StateHash,
    pub book: BookSnapshot,
}

/// A market's snapshot whose state hash is not computed yet; `hash` completes it.
#[derive(Debug)]
pub struct UnhashedSnapshot(MarketSnapshot, HashVersion);

impl UnhashedSnapshot {
    /// The snapshot, with the hash of the book it holds in its format's version.
    pub fn hash(mut self) -> MarketSnapshot {
        self.0.state_hash = self.0.book.state_hash_as(self.1);
        self.0
    }
}

/// A snapshot that cannot be restored, and why.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "snapshot format version {found} is not supported; this build reads versions 1 to {expected}"
    )]
    Version { found: u32, expected: u32 },
    #[error("snapshot of {found} cannot restore market {expected}")]
    WrongMarket { found: String, expected: String },
    #[error(transparent)]
    Book(#[from] crate::book::RestoreError),
    #[error(
        "snapshot at sequence {seq} restores to state hash {got}, but it was written at {want}"
    )]
    Hash {
        seq: Seq,
        got: StateHash,
        want: StateHash,
    },
}

/// What one batch did, for the metrics (counted from its entries; the book's sizes after it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Commands applied (each command of a batch message counts).
    pub commands: u64,
    pub trades: u64,
    /// Execution-report messages the batch publishes (one per account it touched).
    pub report_messages: u64,
    /// Rejections by reason, in order of first appearance.
    pub rejects: Vec<(&'static str, u64)>,
    pub resting_orders: u64,
    pub bid_levels: u64,
    pub ask_levels: u64,
}

impl BatchStats {
    /// Counts trades and rejections in `entries`, and the book's sizes.
    fn count(&mut self, entries: &[Entry], book: &OrderBook) {
        self.trades = 0;
        self.rejects.clear();
        for e in entries {
            let reason = match e {
                Entry::Event(Event::Trade(_)) => {
                    self.trades += 1;
                    continue;
                }
                Entry::Event(Event::Rejected(r)) => r.reason.as_str(),
                Entry::Event(_) => continue,
                Entry::Reject(r) => r.reason.as_str(),
            };
            match self.rejects.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, n)) => *n += 1,
                None => self.rejects.push((reason, 1)),
            }
        }
        self.resting_orders = book.order_count() as u64;
        self.bid_levels = book.level_count(crate::book::Side::Buy) as u64;
        self.ask_levels = book.level_count(crate::book::Side::Sell) as u64;
    }
}

pub struct MarketCore {
    subjects: Subjects,
    book: OrderBook,
    events: Vec<Event>,
    batch_max: u16,
    top_levels: usize,
    /// Stream sequence of the last message applied.
    last_seq: Seq,
    /// `seq` of the last L2 delta built.
    book_seq: Seq,
    /// What the last processed batch did.
    stats: BatchStats,
    /// The book's spec, beside the book so decoding can borrow it while the book changes.
    spec: MarketSpec,
    /// The top of book after the last processed batch, the next batch's "before"; `None`
    /// after anything else changed the book.
    top: Option<outputs::Top>,
}

impl MarketCore {
    pub fn new(subjects: Subjects, spec: MarketSpec, batch_max: u16) -> MarketCore {
        MarketCore {
            subjects,
            spec: spec.clone(),
            top: None,
            book: OrderBook::new(spec),
            events: Vec::with_capacity(256),
            batch_max,
            top_levels: TOP_LEVELS_DEFAULT,
            last_seq: 0,
            book_seq: 0,
            stats: BatchStats::default(),
        }
    }

    /// Rebuilds a core from a snapshot, checking its version, market and state hash.
    pub fn restore(
        subjects: Subjects,
        snapshot: &MarketSnapshot,
        batch_max: u16,
    ) -> Result<MarketCore, SnapshotError> {
        let Some(hash_version) = snapshot_hash_version(snapshot.format_version) else {
            return Err(SnapshotError::Version {
                found: snapshot.format_version,
                expected: MARKET_SNAPSHOT_VERSION,
            });
        };
        if snapshot.market != snapshot.book.spec.symbol {
            return Err(SnapshotError::WrongMarket {
                found: snapshot.book.spec.symbol.clone(),
                expected: snapshot.market.clone(),
            });
        }
        let book = OrderBook::restore(&snapshot.book)?;
        let got = book.state_hash_as(hash_version);
        if got != snapshot.state_hash {
            return Err(SnapshotError::Hash {
                seq: snapshot.last_seq,
                got,
                want: snapshot.state_hash,
            });
        }
        Ok(MarketCore {
            subjects,
            spec: book.spec().clone(),
            top: None,
            book,
            events: Vec::with_capacity(256),
            batch_max,
            top_levels: TOP_LEVELS_DEFAULT,
            last_seq: snapshot.last_seq,
            book_seq: snapshot.book_seq,
            stats: BatchStats::default(),
        })
    }

    /// The market's whole state as of the last applied message.
    pub fn snapshot(&self, epoch: u64) -> MarketSnapshot {
        self.unhashed_snapshot(epoch, SnapshotFormat::CURRENT)
            .hash()
    }

    /// The same in `format` (an older one only while nodes of older builds still run), its
    /// state hash still to compute: the copy is what needs the book (about 30 ns an order);
    /// the hash is better taken off the actor.
    pub fn unhashed_snapshot(&self, epoch: u64, format: SnapshotFormat) -> UnhashedSnapshot {
        UnhashedSnapshot(
            MarketSnapshot {
                format_version: format.version(),
                market: self.book.spec().symbol.clone(),
                last_seq: self.last_seq,
                epoch,
                book_seq: self.book_seq,
                state_hash: StateHash(0),
                book: self.book.snapshot(),
            },
            format.hash_version(),
        )
    }

    /// What the last `process` did.
    pub fn stats(&self) -> &BatchStats {
        &self.stats
    }

    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    pub fn batch_max(&self) -> u16 {
        self.batch_max
    }

    pub fn book(&self) -> &OrderBook {
        &self.book
    }

    pub fn spec(&self) -> &MarketSpec {
        self.book.spec()
    }

    /// Stream sequence of the last message applied (0 before any).
    pub fn last_seq(&self) -> Seq {
        self.last_seq
    }

    /// Decodes one message: its commands (or their rejections), or the rejection of the
    /// account its subject names.
    fn decode(&self, msg: &Incoming) -> Decoded {
        let bound_account = match &msg.account {
            None => None,
            Some(Ok(account)) => Some(*account),
            Some(Err(token)) => {
                return Err(wire::WireReject {
                    seq: msg.seq,
                    pos: 0,
                    ts: msg.ts,
                    op: None,
                    account: None,
                    cid: None,
                    reason: crate::book::RejectReason::NotPermitted,
                    message: format!(
                        "the subject names account {token:?}, which is not a valid account (letters, digits, '-', '_'; at most 36)"
                    ),
                });
            }
        };
        let ctx = DecodeContext {
            spec: &self.spec,
            seq: msg.seq,
            ts: msg.ts,
            default_account: None,
            bound_account,
            batch_max: self.batch_max,
            operator: msg.operator,
        };
        Ok(wire::decode(&msg.payload, msg.json, &ctx))
    }

    /// Decodes and applies messages in order, appending what they produced to `entries`, until
    /// `entries` reaches `events_max` (the message that reaches it included); returns how many
    /// messages it took. The next few messages are decoded ahead of their turn, so that the
    /// book can be told which commands come next (`OrderBook::prefetch`) and fetch what they
    /// read while it works on the one before: on a deep book, the orders a cancel names are
    /// cache misses. A market-spec change is decoded against: the messages after it are
    /// decoded again with the new spec.
    fn apply_run(
        &mut self,
        msgs: &[Incoming],
        entries: &mut Vec<Entry>,
        events_max: usize,
    ) -> usize {
        let mut window: VecDeque<Decoded> = VecDeque::with_capacity(LOOKAHEAD + 1);
        let mut decoded_to = 0;
        let mut taken = 0;
        while taken < msgs.len() {
            while decoded_to < msgs.len() && decoded_to <= taken + LOOKAHEAD {
                window.push_back(self.decode(&msgs[decoded_to]));
                decoded_to += 1;
            }
            let Some(decoded) = window.pop_front() else {
                break;
            };
            let spec_changed = self.apply_decoded(decoded, &window, entries);
            self.last_seq = self.last_seq.max(msgs[taken].seq);
            taken += 1;
            if spec_changed {
                window.clear();
                decoded_to = taken;
            }
            if entries.len() >= events_max {
                break;
            }
        }
        taken
    }

    /// Applies one decoded message; `next` are the messages decoded after it. Returns whether
    /// it changed the market's spec.
    fn apply_decoded(
        &mut self,
        decoded: Decoded,
        next: &VecDeque<Decoded>,
        entries: &mut Vec<Entry>,
    ) -> bool {
        let cmds = match decoded {
            Ok(cmds) => cmds,
            Err(reject) => {
                entries.push(Entry::Reject(reject));
                self.stats.commands += 1;
                return false;
            }
        };
        self.stats.commands += cmds.len() as u64;
        let mut spec_changed = false;
        for (i, decoded) in cmds.iter().enumerate() {
            match decoded {
                Ok(cmd) => {
                    if self.book.prefetches() {
                        let coming = cmds[i + 1..]
                            .iter()
                            .chain(next.iter().filter_map(|d| d.as_ref().ok()).flatten())
                            .filter_map(|c| c.as_ref().ok())
                            .take(LOOKAHEAD);
                        for (ahead, c) in coming.enumerate() {
                            self.book.prefetch(c, ahead + 1);
                        }
                    }
                    self.events.clear();
                    self.book.apply(cmd, &mut self.events);
                    if matches!(cmd.op, crate::book::command::Op::UpdateSpec(_)) {
                        self.spec = self.book.spec().clone();
                        spec_changed = true;
                    }
                    entries.extend(self.events.drain(..).map(Entry::Event));
                }
                Err(reject) => entries.push(Entry::Reject(reject.clone())),
            }
        }
        spec_changed
    }

    /// Applies messages already processed before (recovery), building nothing.
    pub fn replay(&mut self, msgs: &[Incoming]) {
        self.top = None;
        let mut scratch = Vec::new();
        for chunk in msgs.chunks(256) {
            scratch.clear();
            self.apply_run(chunk, &mut scratch, usize::MAX);
        }
    }

    /// Applies messages as one or more batches, each ending after the message that brings its
    /// events to `BATCH_EVENTS_MAX`: what each sends, and what it did. The split depends on
    /// the messages alone, so processing one of these batches again gives the same outputs.
    pub fn process_split(&mut self, msgs: &[Incoming]) -> Vec<(BatchOutputs, BatchStats)> {
        self.process_traced(msgs, &[], &mut [])
    }

    /// `process_split`, also adding to `outcomes` what each message of `traced` (input
    /// sequences, same length as `outcomes`) did. Free when `traced` is empty.
    pub fn process_traced(
        &mut self,
        msgs: &[Incoming],
        traced: &[Seq],
        outcomes: &mut [Outcome],
    ) -> Vec<(BatchOutputs, BatchStats)> {
        let mut out = Vec::new();
        let mut rest = msgs;
        while !rest.is_empty() {
            let (batch, n) = self.process_some(rest, BATCH_EVENTS_MAX, traced, outcomes);
            if let Some(batch) = batch {
                let mut stats = self.stats.clone();
                stats.report_messages = batch.execs.len() as u64;
                out.push((batch, stats));
            }
            rest = &rest[n.max(1)..];
        }
        out
    }

    /// Applies a batch and builds everything it sends. Returns `None` for an empty batch.
    pub fn process(&mut self, msgs: &[Incoming]) -> Option<BatchOutputs> {
        self.process_some(msgs, usize::MAX, &[], &mut []).0
    }

    /// Applies messages until their events reach `events_max` (the message that reaches it
    /// included) and builds what they send; returns how many messages it took.
    fn process_some(
        &mut self,
        msgs: &[Incoming],
        events_max: usize,
        traced: &[Seq],
        outcomes: &mut [Outcome],
    ) -> (Option<BatchOutputs>, usize) {
        let Some(first) = msgs.first().map(|m| m.seq) else {
            return (None, 0);
        };
        let before = match self.top.take() {
            Some(top) => top,
            None => outputs::top(&self.book, self.top_levels),
        };
        let mut entries = Vec::with_capacity(msgs.len() * 2);
        self.stats.commands = 0;
        let taken = self.apply_run(msgs, &mut entries, events_max);
        self.stats.count(&entries, &self.book);
        if !traced.is_empty() {
            Outcome::add(&entries, traced, outcomes);
        }
        let after = outputs::top(&self.book, self.top_levels);
        let out = outputs::build(
            &self.subjects,
            self.book.spec(),
            &Batch {
                first_seq: first,
                last_seq: self.last_seq,
                entries: &entries,
                before: &before,
                after: &after,
                prev_book_seq: self.book_seq,
            },
        );
        if out.book.is_some() {
            self.book_seq = self.last_seq;
        }
        self.top = Some(after);
        (Some(out), taken)
    }
}

/// How snapshots are written: named-field MessagePack (readable by any tool) of the market's
/// sequences and its book with each field of the orders as one column (`book::columns`),
/// gzip-compressed. About a fifth of the bytes of records before compression, and several
/// times faster to decode, which is most of a restart.
pub const SNAPSHOT_ENCODING: &str = "msgpack-columns+gzip";

/// What builds before the columns wrote: the same, with the orders as records. Still read.
pub const SNAPSHOT_ENCODING_RECORDS: &str = "msgpack+gzip";

/// `MarketSnapshot` as `SNAPSHOT_ENCODING` stores it.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct StoredSnapshot {
    format_version: u32,
    market: String,
    last_seq: Seq,
    epoch: u64,
    book_seq: Seq,
    state_hash: StateHash,
    book: BookColumns,
}

impl StoredSnapshot {
    /// What `encode_snapshot` wrote, read straight from the bytes (`book::columns_read`);
    /// `None` where rmp_serde must decide, for a value or an error.
    fn read(raw: &[u8]) -> Option<StoredSnapshot> {
        let mut r = Reader::new(raw);
        let mut format_version = None;
        let mut market = None;
        let mut last_seq = None;
        let mut epoch = None;
        let mut book_seq = None;
        let mut state_hash = None;
        let mut book = None;
        r.fields(|r, name| match name {
            "format_version" => columns_read::once(&mut format_version, r.int()),
            "market" => columns_read::once(&mut market, r.str().map(str::to_owned)),
            "last_seq" => columns_read::once(&mut last_seq, r.int()),
            "epoch" => columns_read::once(&mut epoch, r.int()),
            "book_seq" => columns_read::once(&mut book_seq, r.int()),
            "state_hash" => columns_read::once(&mut state_hash, r.int().map(StateHash)),
            "book" => columns_read::once(&mut book, BookColumns::read(r)),
            _ => None,
        })?;
        Some(StoredSnapshot {
            format_version: format_version?,
            market: market?,
            last_seq: last_seq?,
            epoch: epoch?,
            book_seq: book_seq?,
            state_hash: state_hash?,
            book: book?,
        })
    }
}

/// Encodes a snapshot for the snapshot store, in `SNAPSHOT_ENCODING`.
pub fn encode_snapshot(snapshot: &MarketSnapshot) -> Result<Vec<u8>, String> {
    let stored = StoredSnapshot {
        format_version: snapshot.format_version,
        market: snapshot.market.clone(),
        last_seq: snapshot.last_seq,
        epoch: snapshot.epoch,
        book_seq: snapshot.book_seq,
        state_hash: snapshot.state_hash,
        book: BookColumns::from(&snapshot.book),
    };
    gzip_named(&stored)
}

/// Encodes a snapshot as builds before the columns wrote it (`SNAPSHOT_ENCODING_RECORDS`):
/// what the tests and the restart bench compare the columns with. Nothing stores it.
pub fn encode_snapshot_records(snapshot: &MarketSnapshot) -> Result<Vec<u8>, String> {
    gzip_named(snapshot)
}

/// MessagePack with named fields, gzip-compressed (fast).
fn gzip_named(value: &impl serde::Serialize) -> Result<Vec<u8>, String> {
    use std::io::Write;
    let raw = rmp_serde::to_vec_named(value).map_err(|e| e.to_string())?;
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(raw.len() / 4),
        flate2::Compression::fast(),
    );
    gz.write_all(&raw).map_err(|e| e.to_string())?;
    gz.finish().map_err(|e| e.to_string())
}

/// Decodes what `encode_snapshot` wrote, or a snapshot of older builds
/// (`SNAPSHOT_ENCODING_RECORDS`).
pub fn decode_snapshot(bytes: &[u8], encoding: &str) -> Result<MarketSnapshot, String> {
    use std::io::Read;
    if encoding != SNAPSHOT_ENCODING && encoding != SNAPSHOT_ENCODING_RECORDS {
        return Err(format!(
            "snapshot encoding {encoding:?} is not supported; this build reads \
             {SNAPSHOT_ENCODING:?} and {SNAPSHOT_ENCODING_RECORDS:?}"
        ));
    }
    // gzip checks its CRC-32 and length at the end of the stream: bytes changed anywhere
    // after they were written fail here.
    let mut raw = Vec::with_capacity(bytes.len() * 6);
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut raw)
        .map_err(|e| format!("the snapshot does not decompress: {e}"))?;
    let undecodable = |e: rmp_serde::decode::Error| format!("the snapshot does not decode: {e}");
    if encoding == SNAPSHOT_ENCODING_RECORDS {
        return rmp_serde::from_slice(&raw).map_err(undecodable);
    }
    let stored = match StoredSnapshot::read(&raw) {
        Some(stored) => stored,
        None => rmp_serde::from_slice(&raw).map_err(undecodable)?,
    };
    Ok(MarketSnapshot {
        format_version: stored.format_version,
        market: stored.market,
        last_seq: stored.last_seq,
        epoch: stored.epoch,
        book_seq: stored.book_seq,
        state_hash: stored.state_hash,
        book: stored
            .book
            .into_snapshot()
            .map_err(|e| format!("the snapshot does not decode: {e}"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{self, FlowParams};

    fn messages() -> (MarketSpec, Vec<Incoming>) {
        messages_on(200, 30, 2000, true)
    }

    /// A flow of `commands` (of every type with `full_mix`) on a book of `resting` orders over
    /// `spread_ticks`.
    fn messages_on(
        resting: usize,
        spread_ticks: u64,
        commands: usize,
        full_mix: bool,
    ) -> (MarketSpec, Vec<Incoming>) {
        let w = workload::generate(&FlowParams {
            seed: 3,
            resting,
            spread_ticks,
            commands,
            accounts: 5,
            full_mix,
            young_cancel_pct: 80,
        });
        let msgs = w
            .prefill
            .iter()
            .chain(&w.commands)
            .enumerate()
            .map(|(i, c)| Incoming {
                seq: i as u64 + 1,
                ts: 1_000 + i as u64,
                payload: serde_json::to_vec(&crate::wire::WireCommandOut::from_command(
                    &w.spec, c, false,
                ))
                .expect("json"),
                json: true,
                operator: false,
                account: None,
            })
            .collect();
        (w.spec, msgs)
    }

    #[test]
    fn a_restored_snapshot_goes_on_exactly_like_the_original() {
        let (spec, msgs) = messages();
        let (head, tail) = msgs.split_at(1200);
        let mut original = MarketCore::new(Subjects::default(), spec, 100);
        for chunk in head.chunks(7) {
            original.process(chunk);
        }
        let bytes = encode_snapshot(&original.snapshot(4)).expect("encodes");
        let snapshot = decode_snapshot(&bytes, SNAPSHOT_ENCODING).expect("decodes");
        assert_eq!(snapshot.last_seq, 1200);
        assert_eq!(snapshot.epoch, 4);
        let mut restored =
            MarketCore::restore(Subjects::default(), &snapshot, 100).expect("restores");
        for chunk in tail.chunks(7) {
            let a = original.process(chunk).expect("outputs");
            let b = restored.process(chunk).expect("outputs");
            let payloads = |o: &BatchOutputs| {
                o.execs
                    .iter()
                    .chain(&o.trades)
                    .chain(&o.book)
                    .chain(std::iter::once(&o.journal))
                    .map(|m| (m.subject.clone(), m.payload.clone(), m.msg_id.clone()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(payloads(&a), payloads(&b));
        }
        assert_eq!(original.book().state_hash(), restored.book().state_hash());
    }

    #[test]
    fn a_large_batch_is_split_so_each_journal_message_fits() {
        let (spec, msgs) = messages();
        let mut whole = MarketCore::new(Subjects::default(), spec.clone(), 100);
        let batches = whole.process_split(&msgs);
        assert!(batches.len() > 1, "{} messages in one batch", msgs.len());
        let mut next = 1;
        for (out, stats) in &batches {
            assert!(
                out.journal.payload.len() < 1 << 20,
                "{}",
                out.journal.payload.len()
            );
            let head: serde_json::Value =
                rmp_serde::from_slice(&out.journal.payload).expect("decodes");
            assert_eq!(head["first_seq"].as_u64(), Some(next), "contiguous");
            next = head["last_seq"].as_u64().expect("last_seq") + 1;
            assert!(stats.commands > 0);
        }
        assert_eq!(next, msgs.len() as u64 + 1);
        // The same messages in small batches end in the same book.
        let mut small = MarketCore::new(Subjects::default(), spec, 100);
        for chunk in msgs.chunks(3) {
            small.process(chunk);
        }
        assert_eq!(whole.book().state_hash(), small.book().state_hash());
    }

    /// Messages are decoded a few ahead of their turn, so that the book can fetch what the next
    /// commands read. Applied all in one go or one message at a time, the same messages give
    /// the same events and rejections and end in the same book, an operator's spec change among
    /// them (after which the messages decoded ahead are decoded again) included.
    #[test]
    fn decoding_ahead_changes_nothing_a_market_sends() {
        let (spec, msgs) = messages();
        decoded_ahead_or_not_the_same(spec, msgs, 1500);
    }

    /// The same on a book deep enough for the book's prefetch hints all along
    /// (`OrderBook::prefetches`), whose cancels look orders up by oid and by cid: one message
    /// at a time, there is no next command to hint.
    #[test]
    fn prefetch_hints_change_nothing_a_market_sends() {
        let (spec, msgs) = messages_on(20_000, 4_000, 6_000, false);
        let whole = decoded_ahead_or_not_the_same(spec, msgs, 23_000);
        assert!(
            whole.book().prefetches(),
            "{} orders",
            whole.book().order_count()
        );
    }

    /// `msgs` with a spec change inserted at `at`, applied in one go and one at a time.
    fn decoded_ahead_or_not_the_same(
        spec: MarketSpec,
        mut msgs: Vec<Incoming>,
        at: usize,
    ) -> MarketCore {
        let mut rules = spec.rules();
        // Orders over 5 lots are refused from here on.
        rules.max_qty = Some(crate::book::Qty(spec.lot.0 * 5));
        let change = crate::book::Command {
            seq: 0,
            pos: 0,
            ts: 0,
            account: crate::book::Account::new("ops").expect("account"),
            op: crate::book::Op::UpdateSpec(rules),
        };
        let payload = serde_json::to_vec(&crate::wire::WireCommandOut::from_command(
            &spec, &change, false,
        ))
        .expect("json");
        msgs.insert(
            at,
            Incoming {
                payload,
                operator: true,
                ..msgs[at].clone()
            },
        );
        for (i, m) in msgs.iter_mut().enumerate() {
            m.seq = i as u64 + 1;
        }
        // Every event and rejection, in order: what reports and trades are built from (their
        // messages group a batch's events, so differ with the batching).
        let sent = |o: &BatchOutputs| {
            let journal: serde_json::Value =
                rmp_serde::from_slice(&o.journal.payload).expect("journal decodes");
            journal["events"].as_array().expect("events").clone()
        };
        let mut whole = MarketCore::new(Subjects::default(), spec.clone(), 100);
        let batches = whole.process_split(&msgs);
        let all: Vec<_> = batches.iter().flat_map(|(o, _)| sent(o)).collect();
        let mut single = MarketCore::new(Subjects::default(), spec.clone(), 100);
        let mut one_by_one = Vec::new();
        for m in &msgs {
            if let Some(o) = single.process(std::slice::from_ref(m)) {
                one_by_one.extend(sent(&o));
            }
        }
        assert!(all.len() > msgs.len(), "{} events", all.len());
        assert_eq!(all.len(), one_by_one.len());
        assert!(all == one_by_one, "events differ");
        assert_eq!(
            whole.book().spec().max_qty,
            rules.max_qty,
            "the change applied"
        );
        assert_eq!(whole.book().state_hash(), single.book().state_hash());
        assert_eq!(whole.last_seq(), msgs.len() as u64);
        whole
    }

    #[test]
    fn a_damaged_snapshot_is_refused_with_the_reason() {
        let (spec, msgs) = messages();
        let mut core = MarketCore::new(Subjects::default(), spec, 100);
        core.process(&msgs[..500]);
        let good = core.snapshot(0);

        // A change the book accepts, but not the one the snapshot was written from.
        let mut tampered = good.clone();
        let order = tampered
            .book
            .bids
            .iter_mut()
            .find(|o| o.display_qty.is_none())
            .expect("a plain resting bid");
        order.qty = crate::book::Qty(order.qty.0 + 1);
        order.leaves = crate::book::Qty(order.leaves.0 + 1);
        order.visible = order.leaves;
        let e = MarketCore::restore(Subjects::default(), &tampered, 100)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("state hash"), "{e}");

        // A change the book itself refuses.
        let mut broken = good.clone();
        let order = broken.book.bids.first_mut().expect("resting bids");
        order.leaves = crate::book::Qty(order.leaves.0 + 1);
        let e = MarketCore::restore(Subjects::default(), &broken, 100)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("do not add up"), "{e}");

        // Format 1, its hash the older version's: restored, and checked in that version.
        let mut format_1 = good.clone();
        format_1.format_version = 1;
        format_1.state_hash = good.book.state_hash_as(HashVersion::Fnv1);
        assert_ne!(format_1.state_hash, good.state_hash);
        let restored = MarketCore::restore(Subjects::default(), &format_1, 100).expect("restores");
        assert_eq!(restored.book().state_hash(), good.state_hash);
        // A format-1 snapshot with the current version's hash was not written by anyone.
        let mut mixed = format_1.clone();
        mixed.state_hash = good.state_hash;
        let e = MarketCore::restore(Subjects::default(), &mixed, 100)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("state hash"), "{e}");

        let mut newer = good.clone();
        newer.format_version += 1;
        let e = MarketCore::restore(Subjects::default(), &newer, 100)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("not supported"), "{e}");

        let mut other = good.clone();
        other.market = "ETH-USDC".into();
        assert!(MarketCore::restore(Subjects::default(), &other, 100).is_err());

        let e = decode_snapshot(b"not gzip", SNAPSHOT_ENCODING).expect_err("refused");
        assert!(e.contains("decompress"), "{e}");
        let e = decode_snapshot(b"", "json").expect_err("refused");
        assert!(e.contains("not supported"), "{e}");
    }

    #[test]
    fn snapshots_of_older_builds_still_restore_and_the_new_ones_are_more_compact() {
        let (spec, msgs) = messages();
        let mut core = MarketCore::new(Subjects::default(), spec, 100);
        core.process(&msgs[..1500]);
        let snapshot = core.snapshot(2);
        let old = encode_snapshot_records(&snapshot).expect("encodes");
        let new = encode_snapshot(&snapshot).expect("encodes");
        assert_eq!(
            decode_snapshot(&old, SNAPSHOT_ENCODING_RECORDS).expect("decodes"),
            snapshot
        );
        assert_eq!(
            decode_snapshot(&new, SNAPSHOT_ENCODING).expect("decodes"),
            snapshot
        );
        // Less to inflate and to decode (on a book this small the spec weighs as much as the
        // orders; 20,000 orders take 35 bytes an order against 184, `benches/restart.rs`).
        let inflated = |bytes: &[u8]| {
            use std::io::Read;
            let mut raw = Vec::new();
            flate2::read::GzDecoder::new(bytes)
                .read_to_end(&mut raw)
                .expect("inflates");
            raw.len()
        };
        let (old_raw, new_raw) = (inflated(&old), inflated(&new));
        assert!(new_raw < old_raw, "{new_raw} against {old_raw}");
        // Each encoding is read as what it says it is.
        assert!(decode_snapshot(&old, SNAPSHOT_ENCODING).is_err());
        assert!(decode_snapshot(&new, SNAPSHOT_ENCODING_RECORDS).is_err());
        // A byte changed after writing is caught by gzip's check, whatever it hits.
        for at in [new.len() / 3, new.len() / 2, new.len() - 6] {
            let mut spoiled = new.clone();
            spoiled[at] ^= 0x20;
            let e = decode_snapshot(&spoiled, SNAPSHOT_ENCODING).expect_err("refused");
            assert!(e.contains("decompress") || e.contains("decode"), "{e}");
        }
    }

    /// The direct reader of stored snapshots gives what rmp_serde gives, or leaves the bytes
    /// to it: it reads real snapshots whole, and of damaged ones never a value rmp_serde would
    /// not decode the same (so the values and the error words stay rmp_serde's).
    #[test]
    fn stored_snapshots_read_directly_decode_as_rmp_serde_decodes_them() {
        use std::io::Read;
        let (mut same, mut left) = (0, 0);
        for (seed, resting, full_mix) in [(1u64, 300, true), (2, 40, false)] {
            let (mut spec, msgs) = messages_on(resting, 30, 1500, full_mix);
            spec.cid_window_secs = 60;
            spec.cid_window_orders = 1_000;
            let mut core = MarketCore::new(Subjects::default(), spec, 100);
            for chunk in msgs.chunks(7) {
                core.process(chunk);
            }
            let snapshot = core.snapshot(3);
            let book = &snapshot.book;
            assert!(!book.bids.is_empty() && !book.asks.is_empty());
            assert!(!book.cid_window.is_empty());
            assert_eq!(full_mix, !book.stops.is_empty());
            let mut raw = Vec::new();
            flate2::read::GzDecoder::new(&encode_snapshot(&snapshot).expect("encodes")[..])
                .read_to_end(&mut raw)
                .expect("inflates");
            let decoded: StoredSnapshot = rmp_serde::from_slice(&raw).expect("decodes");
            assert_eq!(StoredSnapshot::read(&raw).as_ref(), Some(&decoded));
            let mut rng = seed;
            let mut next = |below: usize| {
                // splitmix64
                rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = rng;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                ((z ^ (z >> 31)) % below as u64) as usize
            };
            for round in 0..3_000 {
                let mut bad = raw.clone();
                let at = next(bad.len());
                match next(4) {
                    0 => bad[at] = next(256) as u8,
                    1 => bad.truncate(at),
                    2 => bad.insert(at, next(256) as u8),
                    _ => {
                        bad.remove(at);
                    }
                }
                let slow = rmp_serde::from_slice::<StoredSnapshot>(&bad).ok();
                match StoredSnapshot::read(&bad) {
                    Some(direct) => {
                        assert_eq!(Some(&direct), slow.as_ref(), "seed {seed} round {round}");
                        same += 1;
                    }
                    None => left += 1,
                }
            }
        }
        assert!(
            same > 500 && left > 500,
            "{same} read directly, {left} left"
        );
    }
}
