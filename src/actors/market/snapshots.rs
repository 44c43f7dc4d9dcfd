//! Snapshots: when a market takes one (by count or by time, between batches, with every
//! output acknowledged), how it is written (encoded off the actor threads, one at a time, so
//! they land in order), and the one read at recovery.

use std::time::Instant;

use super::driver::Driver;
use super::{MarketError, SnapshotSaved, TakeSnapshot};
use crate::actors::core::{self, MarketSnapshot};
use crate::book::Seq;
use crate::bus::{SnapshotBlob, SnapshotStore};

impl Driver {
    /// The latest snapshot, or `None` when there is none or it cannot be used (then the
    /// stream is replayed from its start, and the log says why).
    pub(super) async fn load_snapshot(&self) -> Option<MarketSnapshot> {
        let store = self.snapshots.as_ref()?;
        let blob = match store.load(&self.market).await {
            Ok(blob) => blob?,
            Err(e) => {
                tracing::warn!(market = %self.market, "{e}; recovering from the stream alone");
                return None;
            }
        };
        let decoded =
            tokio::task::spawn_blocking(move || core::decode_snapshot(&blob.bytes, &blob.encoding))
                .await;
        match decoded {
            Ok(Ok(snapshot)) => Some(snapshot),
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
        match task.await {
            Ok(Ok((seq, micros))) => {
                self.metrics.snapshot(micros);
                let _ = self.addr.send(SnapshotSaved(seq)).await;
            }
            Ok(Err(e)) => {
                tracing::warn!(market = %self.market, "snapshot not saved: {e}; the next one is tried at the next batch");
                // Count it as not taken, so the next batch tries again.
                self.snapshot_at = Instant::now() - self.settings.snapshot_every;
            }
            Err(e) => tracing::warn!(market = %self.market, "snapshot task failed: {e}"),
        }
        true
    }

    /// Takes a snapshot (every output up to it is acknowledged: this runs between batches) and
    /// writes it in the background; one write at a time.
    pub(super) async fn snapshot_if_due(&mut self) -> Result<(), MarketError> {
        if !self.snapshot_due() || !self.reap_snapshot(false).await {
            return Ok(());
        }
        let Some(store) = self.snapshots.clone() else {
            return Ok(());
        };
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

    /// On a clean stop: waits for the write in flight and writes one more if anything changed.
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
            Ok((seq, micros)) => {
                self.metrics.snapshot(micros);
                self.since_snapshot = 0;
                let _ = self.addr.send(SnapshotSaved(seq)).await;
            }
            // The streams still hold everything: the next start replays more, that is all.
            Err(e) => tracing::warn!(market = %self.market, "snapshot at stop not saved: {e}"),
        }
        Ok(())
    }
}

/// Encodes a snapshot (off the actor threads) and saves it. Returns the sequence it covers and
/// how long it took, in microseconds.
async fn write_snapshot(
    store: SnapshotStore,
    market: String,
    snapshot: MarketSnapshot,
) -> Result<(Seq, u64), String> {
    let started = Instant::now();
    let (last_seq, epoch, orders) = (
        snapshot.last_seq,
        snapshot.epoch,
        snapshot.book.bids.len() + snapshot.book.asks.len() + snapshot.book.stops.len(),
    );
    let bytes = tokio::task::spawn_blocking(move || core::encode_snapshot(&snapshot))
        .await
        .map_err(|e| e.to_string())??;
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
    Ok((
        last_seq,
        u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
    ))
}
