//! Recovery: a market taken over (at start, from a warm copy, after a move or a failover)
//! restores its latest snapshot, replays the order stream silently up to the journal's last
//! two batches, and rebuilds those byte for byte to republish the views not yet stored
//! (`bus::landed` looks; JetStream's duplicate window would drop them only inside it). No
//! command is lost or applied twice; no output is stored twice.

use std::time::Instant;

use super::driver::Driver;
use super::driver::Routes;
use super::{LastSeq, MarketError, Process, Replay, Restore, Stats, incoming};
use crate::actors::core::{BatchStats, Incoming};
use crate::book::{Seq, StateHash};
use crate::bus::journal::JournalTail;
use crate::bus::landed::Landed;
use crate::bus::{Feed, Pull, RangeReader};
use crate::telemetry::traces;

/// What recovery found and did, for the log.
#[derive(Debug, Default)]
struct Recovered {
    /// Taken over from a warm copy (no snapshot loaded).
    warm: bool,
    snapshot_seq: Option<Seq>,
    /// The restored snapshot's state hash (checked against the book by the restore).
    snapshot_hash: Option<StateHash>,
    replayed: u64,
    republished: u64,
    /// Views of the rebuilt batches found already stored, and so not sent again.
    stored: u64,
}

impl Driver {
    /// short of the journal's last two batches), replays the stream from it up to the journal's
    /// last two batches, and republishes their derived views (JetStream drops those that landed).
    pub(super) async fn recover(&mut self, warm: bool) -> Result<(), MarketError> {
        let started = Instant::now();
        // Released with every output acknowledged, and the release record says where: the
        // journal's head is that, unless someone wrote after the release, which the fence
        // catches at the first publish (see `StopPoint`). Otherwise the journal says.
        let stop_point = self.settings.takeover.kind.stop_point();
        let tail = match stop_point {
            Some(at) => {
                self.journal_seq = at.journal_seq;
                None
            }
            None => {
                self.journal
                    .tail(
                        &self.market,
                        None,
                        !self.settings.takeover.kind.handed_over(),
                    )
                    .await?
            }
        };
        if let Some(t) = &tail {
            self.journal_seq = Some(t.seq);
            if t.prev.is_none() && t.prev_seq != 0 && !self.settings.takeover.kind.handed_over() {
                tracing::warn!(market = %self.market, journal_seq = t.prev_seq, "the journal's batch before the last is not there; only the last batch's views are republished");
            }
        }
        // Whether `seq` falls inside a batch whose outputs may have to be rebuilt: a book there
        // cannot rebuild them.
        let inside = |seq: Seq| {
            tail.iter()
                .flat_map(JournalTail::unsettled)
                .find(|b| seq >= b.first_seq && seq < b.last_seq)
        };
        let mut done = Recovered::default();
        let mut from = 1;
        if warm {
            let applied = self.send(LastSeq).await?;
            if !self.settings.takeover.kind.handed_over() && self.ahead {
                return Err(MarketError::Recovery {
                    market: self.market.clone(),
                    reason: format!(
                        "the warm copy went ahead for a planned move (it is at {applied}, past the start of the journal's last batches), so it cannot rebuild their outputs"
                    ),
                });
            }
            if !self.settings.takeover.kind.handed_over()
                && let Some(b) = inside(applied)
            {
                return Err(MarketError::Recovery {
                    market: self.market.clone(),
                    reason: format!(
                        "the warm copy is at {applied}, inside one of the journal's last batches ({}..={})",
                        b.first_seq, b.last_seq
                    ),
                });
            }
            done.warm = true;
            from = applied + 1;
        } else if let Some(loaded) = self.load_snapshot().await {
            let snapshot = loaded.snapshot;
            let seq = snapshot.last_seq;
            // Announced as the book's hash only when in the version this node announces (a
            // snapshot of another format: the book is hashed again).
            let hash = (snapshot.format_version == self.settings.snapshot_format.version())
                .then_some(snapshot.state_hash);
            // A snapshot inside the last batches cannot rebuild their outputs; snapshots are
            // taken at batch boundaries, so this means the journal and the snapshot disagree:
            // trust the stream.
            if inside(seq).is_none() {
                self.send(Restore(Box::new(snapshot))).await?.map_err(|e| {
                    MarketError::Recovery {
                        market: self.market.clone(),
                        reason: format!("restoring the snapshot at {seq}: {e}"),
                    }
                })?;
                done.snapshot_seq = Some(seq);
                done.snapshot_hash = hash;
                from = seq + 1;
            } else {
                tracing::warn!(market = %self.market, snapshot_seq = seq, "the snapshot falls inside the journal's last batches; recovering from the stream alone");
            }
        }
        if let Some(at) = stop_point {
            // Released where the record says, every output published: all of it, silently.
            if at.seq >= from {
                done.replayed = self.replay_range(from, at.seq).await?;
            }
        } else if let Some(tail) = tail.filter(|_| self.settings.takeover.kind.handed_over())
            && tail.head.last_seq >= from
        {
            // Released by its owner with every output published: all of it, silently.
            done.replayed = self.replay_range(from, tail.head.last_seq).await?;
        } else if let Some(tail) = tail {
            let mut landed: Option<Landed> = None;
            // Everything before the last two batches, silently; then each of them again (unless
            // the snapshot or the copy is past it: a snapshot is taken with every output
            // acknowledged), to rebuild its outputs byte for byte and republish its views.
            for b in tail.unsettled() {
                if b.last_seq < from {
                    continue;
                }
                if b.first_seq > from {
                    done.replayed += self.replay_range(from, b.first_seq - 1).await?;
                }
                let mut batch = Vec::new();
                let mut reader = self.read_range(b.first_seq, b.last_seq).await?;
                let read = async {
                    while let Some(chunk) = reader.next_chunk().await? {
                        batch.extend(chunk);
                    }
                    Ok::<_, MarketError>(())
                }
                .await;
                self.done_reading(reader);
                read?;
                done.republished += batch.len() as u64;
                let batch = Process {
                    batch,
                    traced: Vec::new(),
                };
                let lookup = match landed.take() {
                    Some(lookup) => lookup,
                    None => Landed::open(&self.js, &self.subjects).await?,
                };
                for (mut out, _) in self.send(batch).await? {
                    done.stored += lookup.drop_stored(&mut out).await? as u64;
                    self.send_views(out, false).await?;
                    self.settle_views().await?;
                }
                from = b.last_seq + 1;
                landed = Some(lookup);
            }
        }
        let stats = self.send(Stats).await?;
        let last_seq = stats.last_seq;
        // The book's hash there: the snapshot's, which restore checked, when nothing came
        // after it; otherwise computed once the market is announced (`launch`).
        let known_hash = done
            .snapshot_hash
            .filter(|_| done.snapshot_seq == Some(last_seq));
        self.recovered_at = Some((last_seq, known_hash));
        self.book_seq
            .store(last_seq, std::sync::atomic::Ordering::Release);
        self.since_snapshot = if done.warm {
            last_seq.saturating_sub(stats.snapshot_seq)
        } else {
            last_seq.saturating_sub(done.snapshot_seq.unwrap_or(0))
        };
        self.metrics.book(&BatchStats {
            resting_orders: stats.resting_orders as u64,
            bid_levels: stats.bid_levels as u64,
            ask_levels: stats.ask_levels as u64,
            ..BatchStats::default()
        });
        self.metrics.running(true);
        let span = tracing::Span::current();
        span.record("warm", done.warm);
        span.record("epoch", traces::int(self.settings.takeover.epoch));
        traces::record_recovered(
            &span,
            done.snapshot_seq,
            done.replayed,
            done.republished,
            last_seq,
        );
        tracing::info!(
            market = %self.market,
            warm = done.warm,
            epoch = self.settings.takeover.epoch,
            snapshot_seq = ?done.snapshot_seq,
            replayed = done.replayed,
            republished = done.republished,
            views_already_stored = done.stored,
            last_seq,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "market recovered"
        );
        Ok(())
    }

    /// Replays stream messages `from..=to` into the actor, building nothing. Returns how many.
    pub(super) async fn replay_range(&mut self, from: Seq, to: Seq) -> Result<u64, MarketError> {
        let mut count = 0;
        let mut reader = self.read_range(from, to).await?;
        let replayed = async {
            while let Some(chunk) = reader.next_chunk().await? {
                count += chunk.len() as u64;
                self.send(Replay(chunk)).await?;
            }
            Ok(count)
        }
        .await;
        self.done_reading(reader);
        replayed
    }

    /// Keeps the warm copy's feed once a range was read from it.
    pub(super) fn done_reading(&mut self, reader: Replaying) {
        if reader.kept {
            self.feed = Some(reader.reader.into_feed());
        }
    }

    /// Reads stream messages `from..=to` in chunks: from the warm copy's feed when it is there,
    /// otherwise with a consumer of its own.
    pub(super) async fn read_range(
        &mut self,
        from: Seq,
        to: Seq,
    ) -> Result<Replaying, MarketError> {
        let stream = self.subjects.orders_stream(&self.market);
        let reader = |feed: Feed, kept: bool| Replaying {
            reader: RangeReader::new(feed, &self.market, stream, from, to),
            kept,
            routes: self.routes.clone(),
            market: self.market.clone(),
        };
        if let Some(feed) = self.feed.take() {
            if feed.at() == from {
                return Ok(reader(feed, true));
            }
            // Out of step with the book (it cannot happen, but a fresh feed is cheap): start
            // the warm copy's over from here.
            tracing::warn!(market = %self.market, feed = feed.at(), from, "the warm copy's feed is out of step; opening it again");
            let feed = Feed::open(
                &self.orders,
                &self.client,
                &self.market,
                from,
                Pull::Consume(self.settings.fetch_max),
                &self.pull_cap,
            )
            .await?;
            return Ok(reader(feed, true));
        }
        let feed = Feed::open(
            &self.orders,
            &self.client,
            &self.market,
            from,
            Pull::Replay,
            &self.pull_cap,
        )
        .await?;
        Ok(reader(feed, false))
    }
}

/// A range of the order stream read for recovery, decoded as the core takes it.
pub(super) struct Replaying {
    reader: RangeReader,
    /// The feed is the warm copy's: it goes back to the driver once read.
    kept: bool,
    routes: Routes,
    market: String,
}

impl Replaying {
    /// The next chunk, or `None` once the range was read.
    pub(super) async fn next_chunk(&mut self) -> Result<Option<Vec<Incoming>>, MarketError> {
        let Some(chunk) = self.reader.next_chunk().await? else {
            return Ok(None);
        };
        chunk
            .iter()
            .map(|m| incoming(&self.market, &self.routes, m))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}
