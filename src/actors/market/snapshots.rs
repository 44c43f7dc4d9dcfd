//! Snapshots: when a market takes one (by count or by time, between batches, with every
//! output acknowledged, and within the node's budget of bytes a second), how it is written
//! (encoded off the actor threads, one at a time, so they land in order), and the one read at
//! recovery.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::driver::Driver;
use super::{MarketError, SnapshotSaved, TakeSnapshot};
use crate::actors::core::{self, MarketSnapshot, UnhashedSnapshot};
use crate::book::Seq;
use crate::bus::{SnapshotBlob, SnapshotStore};

/// A snapshot read and decoded, and its slot among the snapshots being restored at once
/// (`restore_slots`): kept until the market has restored it and dropped the decoded copy.
pub(super) struct Loaded {
    pub snapshot: MarketSnapshot,
    pub _slot: Option<tokio::sync::SemaphorePermit<'static>>,
}

/// How many snapshots this process decodes and restores at once: one a core. The work is
/// all CPU, so more at once finishes none sooner, while each holds its bytes, its columns and
/// its records (~400 bytes an order) until restored: at a restart of 200 markets together,
/// the allocator kept ~300 MB of that after the start.
fn restore_slots() -> &'static tokio::sync::Semaphore {
    static SLOTS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    SLOTS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        tokio::sync::Semaphore::new(cores)
    })
}

impl Driver {
    /// The latest snapshot, or `None` when there is none or it cannot be used (then the
    /// stream is replayed from its start, and the log says why).
    pub(super) async fn load_snapshot(&self) -> Option<Loaded> {
        let store = self.snapshots.as_ref()?;
        let blob = match store.load(&self.market).await {
            Ok(blob) => blob?,
            Err(e) => {
                tracing::warn!(market = %self.market, "{e}; recovering from the stream alone");
                return None;
            }
        };
        // Never closed, so this cannot fail; without a slot the restore would go on regardless.
        let slot = restore_slots().acquire().await.ok();
        let decoded =
            tokio::task::spawn_blocking(move || core::decode_snapshot(&blob.bytes, &blob.encoding))
                .await;
        match decoded {
            Ok(Ok(snapshot)) => Some(Loaded {
                snapshot,
                _slot: slot,
            }),
            Ok(Err(e)) => {
                tracing::warn!(market = %self.market, "{e}; recovering from the stream alone");
                None
            }
            Err(e) => {
                tracing::warn!(market = %self.market, "decoding the snapshot failed: {e}");
                None
            }
        }
    }

    /// Whether a snapshot is due: enough commands, or commands and enough time.
    pub(super) fn snapshot_due(&self) -> bool {
        let s = &self.settings;
        self.snapshots.is_some()
            && self.since_snapshot > 0
            && ((s.snapshot_every_commands > 0 && self.since_snapshot >= s.snapshot_every_commands)
                || (!s.snapshot_every.is_zero() && self.snapshot_at.elapsed() >= s.snapshot_every))
    }

    /// Collects a finished snapshot write, logging how it went. Returns whether none is running.
    pub(super) async fn reap_snapshot(&mut self, wait: bool) -> bool {
        let Some(task) = self.snapshot_task.take_if(|t| wait || t.is_finished()) else {
            return self.snapshot_task.is_none();
        };
        let budget = &self.settings.snapshot_budget;
        match task.await {
            Ok(Ok(saved)) => {
                budget.settle(self.snapshot_estimate, saved.bytes);
                self.snapshot_bytes = saved.bytes;
                self.metrics.snapshot(saved.micros, saved.bytes);
                let _ = self.addr.send(SnapshotSaved(saved.seq)).await;
            }
            Ok(Err(e)) => {
                budget.settle(self.snapshot_estimate, 0);
                tracing::warn!(market = %self.market, "snapshot not saved: {e}; the next one is tried at the next batch");
                // Count it as not taken, so the next batch tries again.
                self.snapshot_at = Instant::now() - self.settings.snapshot_every;
            }
            Err(e) => {
                budget.settle(self.snapshot_estimate, 0);
                tracing::warn!(market = %self.market, "snapshot task failed: {e}");
            }
        }
        true
    }

    /// Takes a snapshot (every output up to it is acknowledged: this runs between batches) and
    /// writes it in the background; one write at a time. When the node's snapshot budget is
    /// spent, a due snapshot waits (the next batch, or the next second's tick, asks again).
    pub(super) async fn snapshot_if_due(&mut self) -> Result<(), MarketError> {
        if !self.snapshot_due() || !self.reap_snapshot(false).await {
            return Ok(());
        }
        let Some(store) = self.snapshots.clone() else {
            return Ok(());
        };
        // The estimate is this market's last snapshot: its size changes slowly.
        if !self.settings.snapshot_budget.try_take(self.snapshot_bytes) {
            if !self.snapshot_deferred {
                self.snapshot_deferred = true;
                self.metrics.snapshot_deferred();
                tracing::debug!(market = %self.market, since = self.since_snapshot, "snapshot due, waiting for the node's snapshot budget");
            }
            return Ok(());
        }
        self.snapshot_deferred = false;
        self.snapshot_estimate = self.snapshot_bytes;
        // A snapshot covers outputs that are all acknowledged.
        self.settle_views().await?;
        let snapshot = self
            .send(TakeSnapshot {
                epoch: self.settings.takeover.epoch,
            })
            .await?;
        self.since_snapshot = 0;
        self.snapshot_at = Instant::now();
        let market = self.market.clone();
        self.snapshot_task = Some(tokio::spawn(write_snapshot(store, market, snapshot)));
        Ok(())
    }

    /// On a clean stop: waits for the write in flight and writes one more if anything changed
    /// (whatever the budget says: the next start replays less; its bytes still count).
    pub(super) async fn final_snapshot(&mut self) -> Result<(), MarketError> {
        self.reap_snapshot(true).await;
        let Some(store) = self.snapshots.clone() else {
            return Ok(());
        };
        if self.since_snapshot == 0 {
            return Ok(());
        }
        let snapshot = self
            .send(TakeSnapshot {
                epoch: self.settings.takeover.epoch,
            })
            .await?;
        match write_snapshot(store, self.market.clone(), snapshot).await {
            Ok(saved) => {
                self.settings.snapshot_budget.settle(0, saved.bytes);
                self.metrics.snapshot(saved.micros, saved.bytes);
                self.since_snapshot = 0;
                let _ = self.addr.send(SnapshotSaved(saved.seq)).await;
            }
            // The streams still hold everything: the next start replays more, that is all.
            Err(e) => tracing::warn!(market = %self.market, "snapshot at stop not saved: {e}"),
        }
        Ok(())
    }
}

/// A snapshot written: the sequence it covers, how long it took (microseconds) and its size.
pub(super) struct Saved {
    seq: Seq,
    micros: u64,
    bytes: u64,
}

/// Hashes and encodes a snapshot (off the actor threads) and saves it.
async fn write_snapshot(
    store: SnapshotStore,
    market: String,
    snapshot: UnhashedSnapshot,
) -> Result<Saved, String> {
    let started = Instant::now();
    let encoded = tokio::task::spawn_blocking(move || {
        let snapshot = snapshot.hash();
        let b = &snapshot.book;
        let orders = b.bids.len() + b.asks.len() + b.stops.len();
        core::encode_snapshot(&snapshot)
            .map(|bytes| (snapshot.last_seq, snapshot.epoch, orders, bytes))
    });
    let (last_seq, epoch, orders, bytes) = encoded.await.map_err(|e| e.to_string())??;
    let size = bytes.len();
    let blob = SnapshotBlob {
        last_seq,
        epoch,
        bytes,
        encoding: core::SNAPSHOT_ENCODING.to_string(),
    };
    let placed = store
        .save(&market, &blob)
        .await
        .map_err(|e| e.to_string())?;
    tracing::debug!(
        market = %market,
        last_seq,
        orders,
        bytes = size,
        placed = ?placed,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "snapshot saved"
    );
    Ok(Saved {
        seq: last_seq,
        micros: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        bytes: size as u64,
    })
}

/// The node's budget of snapshot bytes a second, shared by its markets, so that snapshot
/// writes stay under it however many books change: a market whose snapshot is due starts it
/// only while the budget is not in debt, and takes its last snapshot's size from it; the size
/// actually written settles the difference. Over any stretch of time the bytes started are at
/// most the rate times its length, plus one second's worth, plus what the snapshots then in
/// flight exceeded their estimates by. Snapshots at a clean stop do not wait, but count.
/// Unbounded (every due snapshot starts) when the rate is 0.
#[derive(Clone, Debug, Default)]
pub struct SnapshotBudget(Option<Arc<Mutex<Bucket>>>);

#[derive(Debug)]
pub struct Bucket {
    /// Bytes a second.
    rate: f64,
    /// Bytes that may start now; negative: in debt.
    tokens: f64,
    at: Instant,
}

impl SnapshotBudget {
    /// `bytes_per_sec` a second for the node's snapshots; 0: unbounded.
    pub fn per_second(bytes_per_sec: u64) -> SnapshotBudget {
        SnapshotBudget((bytes_per_sec > 0).then(|| {
            Arc::new(Mutex::new(Bucket {
                rate: bytes_per_sec as f64,
                tokens: bytes_per_sec as f64,
                at: Instant::now(),
            }))
        }))
    }

    /// Whether a due snapshot can wait for the budget (then markets look every second).
    pub fn bounded(&self) -> bool {
        self.0.is_some()
    }

    /// How often a market with a due snapshot asks again while the budget is spent.
    pub(super) const RETRY: Duration = Duration::from_secs(1);

    /// Whether a snapshot of about `estimate` bytes may start now; if so, the estimate is
    /// taken from the budget.
    pub fn try_take(&self, estimate: u64) -> bool {
        self.try_take_at(estimate, Instant::now())
    }

    fn try_take_at(&self, estimate: u64, now: Instant) -> bool {
        let Some(bucket) = &self.0 else { return true };
        let mut b = bucket.lock().unwrap_or_else(|e| e.into_inner());
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * b.rate;
        b.tokens = (b.tokens + refill).min(b.rate);
        b.at = b.at.max(now);
        if b.tokens < 0.0 {
            return false;
        }
        b.tokens -= estimate as f64;
        true
    }

    /// A snapshot taken against `estimate` wrote `actual` bytes (0 when it failed).
    pub fn settle(&self, estimate: u64, actual: u64) {
        if let Some(bucket) = &self.0 {
            let mut b = bucket.lock().unwrap_or_else(|e| e.into_inner());
            b.tokens -= actual as f64 - estimate as f64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many markets asking all the time start no more than the rate allows, plus the first
    /// second's worth and one snapshot.
    #[test]
    fn the_budget_holds_snapshot_bytes_to_its_rate() {
        let budget = SnapshotBudget::per_second(1_000_000);
        let start = Instant::now();
        let snapshot = 300_000;
        let mut started = 0u64;
        // 100 markets ask every 10 ms for 10 s; each snapshot writes what it estimated.
        for tick in 0..1_000u64 {
            let now = start + Duration::from_millis(10 * tick);
            for _ in 0..100 {
                if budget.try_take_at(snapshot, now) {
                    budget.settle(snapshot, snapshot);
                    started += snapshot;
                }
            }
        }
        let most = 10 * 1_000_000 + 1_000_000 + snapshot;
        assert!(
            started <= most,
            "{started} bytes started in 10 s, at most {most}"
        );
        assert!(
            started >= 9 * 1_000_000,
            "{started} bytes: the budget must also be used"
        );
    }

    /// A snapshot bigger than estimated puts the budget in debt: nothing starts until it is
    /// paid back; a failed one gives its estimate back.
    #[test]
    fn debt_waits_and_a_failed_snapshot_is_refunded() {
        let budget = SnapshotBudget::per_second(1_000);
        let t0 = Instant::now();
        assert!(budget.try_take_at(0, t0));
        budget.settle(0, 5_000);
        assert!(!budget.try_take_at(100, t0 + Duration::from_secs(3)));
        assert!(budget.try_take_at(600, t0 + Duration::from_secs(4)));
        budget.settle(600, 0);
        assert!(budget.try_take_at(600, t0 + Duration::from_secs(4)));
        let unbounded = SnapshotBudget::per_second(0);
        assert!(!unbounded.bounded());
        budget.settle(0, u64::MAX / 2);
        assert!(unbounded.try_take(u64::MAX));
    }
}
