//! `KvFollower`: a watch on a whole KV bucket that notices when it has fallen silent while the
//! bucket moved on, and opens itself again from the last revision it delivered.
//!
//! A KV watch is an ordered consumer living on one server of the bucket's stream. When that
//! server dies (a NATS cluster losing a member), the client notices only after two missed idle
//! heartbeats (10 s), then makes the consumer again with a back-off that grows to 10 s between
//! attempts, each of which fails while the stream elects a new leader. Meanwhile the watcher
//! sees nothing: a rebalancer sees every node dead, a node does not see the market it was
//! assigned. `check` compares the bucket's last stream sequence (a fresh stream info, bounded
//! by a timeout) with the last revision delivered; behind on two checks in a row with nothing
//! delivered between them (a busy bucket is behind at every check by the put in flight), the
//! watch is replaced by one that starts right after that revision, so nothing is skipped and
//! nothing delivered twice. This module must never decide what an entry means: callers do.

use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;

/// How long a stream info may take before a check gives up (and tries again next time).
const INFO_TIMEOUT: Duration = Duration::from_millis(500);

pub struct KvFollower {
    store: kv::Store,
    watch: kv::Watch,
    /// The revision of the last entry delivered (0: none yet).
    last_revision: u64,
    /// The stream's last sequence when the watch was last opened: a sequence not above it
    /// that never arrives (an entry removed by age) does not count as falling behind.
    opened_at: u64,
    /// The last check found the watch behind, having delivered up to this revision.
    behind: Option<u64>,
    reopened: u64,
}

impl KvFollower {
    /// Follows every key of `store`, its current entries first.
    pub async fn open(store: kv::Store) -> Result<KvFollower, kv::WatchError> {
        let watch = store.watch_with_history(">").await?;
        let opened_at = store.stream.cached_info().state.last_sequence;
        Ok(KvFollower {
            store,
            watch,
            last_revision: 0,
            opened_at,
            behind: None,
            reopened: 0,
        })
    }

    /// The next entry (or watch error); `None` only if the watch ended.
    pub async fn next(&mut self) -> Option<Result<kv::Entry, kv::WatcherError>> {
        let item = self.watch.next().await;
        if let Some(Ok(entry)) = &item {
            self.last_revision = self.last_revision.max(entry.revision);
        }
        item
    }

    /// How often the watch was opened again.
    pub fn reopened(&self) -> u64 {
        self.reopened
    }

    /// Checks whether the watch keeps up with its bucket; opens it again after the last
    /// delivered revision when it was behind at the previous check too. Answers whether it
    /// did. Call it every second or so.
    pub async fn check(&mut self) -> bool {
        let last = match tokio::time::timeout(INFO_TIMEOUT, self.store.stream.get_info()).await {
            Ok(Ok(info)) => info.state.last_sequence,
            // No answer (an election, no quorum): nothing to compare with this time.
            _ => return false,
        };
        let behind = last > self.last_revision.max(self.opened_at);
        if !behind {
            self.behind = None;
            return false;
        }
        // Behind twice with entries delivered in between is a busy bucket (a heartbeat's put
        // in flight at each check), not a silent watch.
        if self.behind != Some(self.last_revision) {
            self.behind = Some(self.last_revision);
            return false;
        }
        let from = self.last_revision + 1;
        match tokio::time::timeout(INFO_TIMEOUT * 4, self.store.watch_all_from_revision(from)).await
        {
            Ok(Ok(watch)) => {
                tracing::warn!(
                    bucket = %self.store.name,
                    from,
                    last,
                    "the bucket's watch fell silent while the bucket moved on; watching again from revision {from}"
                );
                self.watch = watch;
                self.opened_at = last;
                self.behind = None;
                self.reopened += 1;
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(bucket = %self.store.name, "cannot watch the bucket again yet: {e}");
                false
            }
            Err(_) => false,
        }
    }
}
