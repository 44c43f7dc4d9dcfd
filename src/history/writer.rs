//! The writer: one per database, chosen by a lease in NATS KV (`<prefix>_history`, key
//! `writer-<store id>`, expiring after `lease_ms` unless renewed); the others wait as standbys
//! and take the role when the key expires or is released. The writer reads `EVENTS` from the
//! database's own position (the highest `events_seq` written, plus one) through an ordered
//! consumer (gaps in delivery are repaired by the client, which re-creates it after the last
//! message seen), and writes each run of waiting messages (up to `batch_max`) in one fenced
//! transaction. A refused transaction is written again after a back-off (0.1 s doubling to
//! 5 s) with nothing read meanwhile: the journal is the buffer, however long the outage.
//!
//! The database is the one cursor: nothing is acknowledged to NATS (the journal stream keeps
//! its messages by its limits, not by consumers), so a new database, a restored backup or a
//! rebuild always starts exactly where its own rows end.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv};
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;

use super::project::{Changes, Message, Projector};
use super::store::{Dialect, Store, StoreError};
use super::{Health, HistoryConfig, HistoryError};
use crate::actors::Lease;
use crate::bus::{Journal, Subjects};

pub struct Writer {
    pub client: async_nats::Client,
    pub subjects: Subjects,
    /// Replicas of the lease bucket (`[streams] replicas`).
    pub replicas: usize,
    pub store: Store,
    pub settings: HistoryConfig,
    pub health: Health,
    pub rebuild: bool,
}

/// Why a writer stopped writing.
enum Stopped {
    Shutdown,
    /// The lease lapsed or another writer fenced this one: back to standby.
    Lost(String),
}

/// The lease on a database's writer role. Once taken it is renewed by a task of its own
/// every quarter of its time to live, so a database that stalls the writer never costs it the
/// role; the writer checks `held` before each transaction (and the transaction's fence makes
/// even a stale holder harmless).
struct WriterLease {
    kv: kv::Store,
    key: String,
    holder: String,
    lease: Lease,
    ttl: Duration,
    renewer: Option<(
        tokio::task::JoinHandle<()>,
        std::sync::Arc<std::sync::atomic::AtomicU64>,
    )>,
}

impl WriterLease {
    async fn open(
        js: &jetstream::Context,
        subjects: &Subjects,
        store_id: &str,
        ttl: Duration,
        replicas: usize,
    ) -> Result<WriterLease, HistoryError> {
        let bucket = subjects.bucket("history");
        let kv = match js.get_key_value(&bucket).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: bucket.clone(),
                    description: "agora history: the writer of each database".into(),
                    history: 1,
                    max_age: ttl,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .or(js.get_key_value(&bucket).await.map_err(|e| e.to_string()))
                .map_err(|e| {
                    HistoryError::Other(format!("cannot open the KV bucket {bucket}: {e}"))
                })?,
        };
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "host".into());
        Ok(WriterLease {
            kv,
            key: format!("writer-{store_id}"),
            holder: format!("{host}:{}", std::process::id()),
            lease: Lease::new(),
            ttl,
            renewer: None,
        })
    }

    /// Takes the role if nobody holds it, and starts renewing it. `true` when held.
    async fn try_take(&mut self) -> bool {
        let sent = Instant::now();
        let Ok(rev) = self.kv.create(&self.key, self.holder.clone().into()).await else {
            return false;
        };
        self.lease.extend_to(sent + self.ttl * 3 / 4);
        let revision = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rev));
        let (kv, key, holder, lease, ttl) = (
            self.kv.clone(),
            self.key.clone(),
            self.holder.clone(),
            self.lease.clone(),
            self.ttl,
        );
        let rev = revision.clone();
        let task = actix_rt::spawn(async move {
            use std::sync::atomic::Ordering;
            loop {
                tokio::time::sleep(ttl / 4).await;
                let sent = Instant::now();
                let asked = kv.update(&key, holder.clone().into(), rev.load(Ordering::Acquire));
                match tokio::time::timeout(ttl / 2, asked).await {
                    Ok(Ok(r)) => {
                        rev.store(r, Ordering::Release);
                        lease.extend_to(sent + ttl * 3 / 4);
                    }
                    Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                        // Taken by another: the role is gone.
                        lease.lapse();
                        return;
                    }
                    Ok(Err(e)) => tracing::warn!("history writer lease not renewed: {e}"),
                    Err(_) => tracing::warn!("history writer lease not renewed in time"),
                }
                if !lease.valid() {
                    return;
                }
            }
        });
        self.renewer = Some((task, revision));
        true
    }

    fn held(&self) -> bool {
        self.lease.valid()
    }

    async fn release(&mut self) {
        if let Some((task, rev)) = self.renewer.take() {
            task.abort();
            let rev = rev.load(std::sync::atomic::Ordering::Acquire);
            let _ = self.kv.delete_expect_revision(&self.key, Some(rev)).await;
        }
        self.lease.lapse();
    }
}

impl Writer {
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Result<(), HistoryError> {
        let js = jetstream::new(self.client.clone());
        let store_id = self.store.store_id().await?;
        let ttl = Duration::from_millis(self.settings.lease_ms);
        let mut lease =
            WriterLease::open(&js, &self.subjects, &store_id, ttl, self.replicas).await?;
        let journal = loop {
            match Journal::open(&js, &self.subjects).await {
                Ok(j) => break j,
                Err(e) => {
                    tracing::warn!("waiting for the journal stream: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => return Ok(()),
                    }
                }
            }
        };
        self.spawn_lag(journal, stop.clone());
        let mut rebuild = self.rebuild;
        let mut said_standby = false;
        loop {
            self.health.set_role("standby");
            // Wait for the role.
            loop {
                if lease.try_take().await {
                    break;
                }
                if !said_standby {
                    println!(
                        "agora history: another process writes {}; waiting as a standby",
                        self.store.shown
                    );
                    said_standby = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(ttl / 8) => {}
                    _ = stop.changed() => return Ok(()),
                }
            }
            said_standby = false;
            self.health.set_role("writer");
            if rebuild {
                self.clear_waiting(&mut stop).await?;
                println!(
                    "agora history: emptied the tables of {}; writing them again from the start of the journal",
                    self.store.shown
                );
                rebuild = false;
            }
            println!("agora history: writing {}", self.store.shown);
            let outcome = self.write(&js, &mut lease, &mut stop).await;
            match outcome {
                Ok(Stopped::Shutdown) => {
                    lease.release().await;
                    self.health.set_role("standby");
                    return Ok(());
                }
                Ok(Stopped::Lost(why)) => {
                    tracing::warn!("history writer: {why}; waiting as a standby");
                    println!("agora history: no longer the writer ({why}); waiting as a standby");
                    lease.release().await;
                }
                Err(e) => {
                    lease.release().await;
                    return Err(e);
                }
            }
        }
    }

    async fn clear_waiting(&self, stop: &mut watch::Receiver<bool>) -> Result<(), HistoryError> {
        let mut wait = Duration::from_millis(100);
        loop {
            match self.store.clear().await {
                Ok(()) => return Ok(()),
                Err(StoreError::Database { what, reason }) => {
                    self.health.database_failed(&format!("{what}: {reason}"));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.changed() => return Ok(()),
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads progress, and the journal position every market is written through, until the
    /// database answers (or the lease is lost meanwhile).
    async fn progress_waiting(
        &self,
        lease: &mut WriterLease,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Option<(HashMap<String, super::project::Progress>, u64)>, HistoryError> {
        let mut wait = Duration::from_millis(100);
        loop {
            let read = async {
                let progress = self.store.progress().await?;
                let highest = progress.values().map(|p| p.events_seq).max().unwrap_or(0);
                let through = self.store.read_through(highest).await?;
                Ok::<_, StoreError>((progress, through))
            };
            match read.await {
                Ok(p) => {
                    self.health.database_ok();
                    return Ok(Some(p));
                }
                Err(StoreError::Database { what, reason }) => {
                    self.health.database_failed(&format!("{what}: {reason}"));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.changed() => return Ok(None),
                    }
                    if !lease.held() {
                        return Ok(None);
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn write(
        &self,
        js: &jetstream::Context,
        lease: &mut WriterLease,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Stopped, HistoryError> {
        let Some((progress, through)) = self.progress_waiting(lease, stop).await? else {
            return Ok(if *stop.borrow() {
                Stopped::Shutdown
            } else {
                Stopped::Lost("the lease lapsed while the database was down".into())
            });
        };
        // From the first message not yet written for every market: transactions written at
        // once may have left some markets of the last run written and others not, and the
        // projection skips what a market has already.
        let start = through + 1;
        let mut projector = Projector::new(progress);
        let stream = js
            .get_stream(self.subjects.events_stream())
            .await
            .map_err(|e| HistoryError::Other(format!("cannot open the journal stream: {e}")))?;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.subjects.events(">"),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| HistoryError::Other(format!("cannot read the journal: {e}")))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| HistoryError::Other(format!("cannot read the journal: {e}")))?;
        tracing::info!(start, "history writer reads the journal");
        let mut check = tokio::time::interval(lease.ttl / 4);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let committer = Committer {
            store: self.store.clone(),
            health: self.health.clone(),
            lease: lease.lease.clone(),
            parts: if self.store.dialect == Dialect::Postgres {
                self.settings.parallel_transactions
            } else {
                1
            },
            through: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(through)),
        };
        // One transaction in flight while the next run is read and projected.
        let mut inflight: Option<tokio::task::JoinHandle<Commit>> = None;
        loop {
            // The first message, waiting; then whatever else is already here.
            let first = tokio::select! {
                _ = stop.changed() => {
                    settle(&mut inflight).await?;
                    return Ok(Stopped::Shutdown);
                }
                _ = check.tick() => {
                    if !lease.held() {
                        settle(&mut inflight).await?;
                        return Ok(Stopped::Lost("the writer lease was lost".into()));
                    }
                    continue;
                }
                m = messages.next() => m,
            };
            let mut run = Vec::new();
            let mut next = first;
            loop {
                match next {
                    Some(Ok(m)) => {
                        let events_seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                        run.push(Message {
                            events_seq,
                            batch: super::project::JournalBatch::decode(&m.payload),
                        });
                    }
                    Some(Err(e)) => {
                        tracing::warn!("reading the journal: {e}");
                        break;
                    }
                    None => {
                        settle(&mut inflight).await?;
                        return Err(HistoryError::Other(
                            "the journal consumer ended; start again".into(),
                        ));
                    }
                }
                if run.len() >= self.settings.batch_max {
                    break;
                }
                match messages.next().now_or_never() {
                    Some(m) => next = m,
                    None => break,
                }
            }
            if run.is_empty() {
                continue;
            }
            let count = run.len() as u64;
            let run_end = run.iter().map(|m| m.events_seq).max().unwrap_or(0);
            let prepared = Instant::now();
            let changes = match committer.prepare(&mut projector, run, stop).await? {
                Ok(changes) => changes,
                Err(stopped) => {
                    settle(&mut inflight).await?;
                    return Ok(stopped);
                }
            };
            let prepare_us = prepared.elapsed().as_micros();
            let settled = Instant::now();
            if let Some(stopped) = settle(&mut inflight).await? {
                return Ok(stopped);
            }
            tracing::debug!(
                messages = count,
                rows = changes.rows(),
                prepare_us,
                waited_for_the_last_us = settled.elapsed().as_micros(),
                "history run"
            );
            metrics::counter!("history_journal_messages_total").increment(count);
            if !changes.is_empty() {
                inflight = Some(actix_rt::spawn(committer.clone().commit(
                    changes,
                    run_end,
                    stop.clone(),
                )));
            }
        }
    }

    /// Every 5 s: each market's lag (journal's last command minus the last written).
    fn spawn_lag(&self, journal: Journal, mut stop: watch::Receiver<bool>) {
        let store = self.store.clone();
        let health = self.health.clone();
        let client = self.client.clone();
        let js = jetstream::new(client.clone());
        let subjects = self.subjects.clone();
        actix_rt::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                let progress = match store.progress().await {
                    Ok(p) => p,
                    Err(e) => {
                        health.set_lag(Vec::new(), Some(e.to_string()));
                        continue;
                    }
                };
                let mut markets: Vec<String> = progress.keys().cloned().collect();
                if let Ok(kv) = js.get_key_value(subjects.bucket("markets")).await
                    && let Ok(keys) = crate::bus::streams::bucket_keys(&client, &kv).await
                {
                    markets.extend(keys);
                }
                markets.sort();
                markets.dedup();
                let mut lag = Vec::new();
                for m in markets {
                    if let Ok(last) = journal.last_seq(&m).await {
                        let written = progress.get(&m).map_or(0, |p| p.last_seq);
                        lag.push((m, last.saturating_sub(written)));
                    }
                }
                health.set_lag(lag, None);
            }
        });
    }
}

/// What a transaction came to: `Some` when the writer must stop.
type Commit = Result<Option<Stopped>, HistoryError>;

/// Waits for the transaction in flight, if any.
async fn settle(inflight: &mut Option<tokio::task::JoinHandle<Commit>>) -> Commit {
    match inflight.take() {
        Some(h) => h
            .await
            .unwrap_or_else(|e| Err(HistoryError::Other(format!("a write task failed: {e}")))),
        None => Ok(None),
    }
}

/// Prepares and commits runs: what the writer's loop and its transactions in flight share.
#[derive(Clone)]
struct Committer {
    store: Store,
    health: Health,
    lease: Lease,
    /// Transactions a run is split into, each for different markets, written at once.
    parts: usize,
    /// The journal position every market is written through (`Store::read_through`).
    through: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Committer {
    /// The changes of one run: the rows the projection needs read from the database first
    /// (tried again while it fails), then applied. `Err` when the writer must stop.
    async fn prepare(
        &self,
        projector: &mut Projector,
        run: Vec<Message>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Result<Changes, Stopped>, HistoryError> {
        let mut wait = Duration::from_millis(100);
        let needs = projector.needs(&run);
        let (orders, candles) = loop {
            let loaded = async {
                let mut orders = Vec::new();
                for (market, oids) in &needs.orders {
                    let oids: Vec<u64> = oids.iter().copied().collect();
                    orders.extend(
                        self.store
                            .orders(market, &oids, projector.progress.get(market))
                            .await?,
                    );
                }
                let keys: Vec<(String, i64)> = needs.candles.iter().cloned().collect();
                let candles = self.store.candles(&keys).await?;
                Ok::<_, StoreError>((orders, candles))
            }
            .await;
            match loaded {
                Ok(l) => break l,
                Err(StoreError::Database { what, reason }) => {
                    if let Some(s) = self.back_off(what, &reason, &mut wait, stop).await {
                        return Ok(Err(s));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        };
        projector.provide(&needs, orders, candles);
        let changes = projector.apply(run);
        if changes.unreadable > 0 {
            metrics::counter!("history_unreadable_total").increment(changes.unreadable);
        }
        Ok(Ok(changes))
    }

    /// Writes the changes of a run ending at journal message `run_end`: split among
    /// `parts` transactions by market, written at once, then (all committed) the journal
    /// position moved to the run's end.
    async fn commit(self, changes: Changes, run_end: u64, stop: watch::Receiver<bool>) -> Commit {
        let parts = changes.split(self.parts);
        let written = futures::future::join_all(
            parts
                .into_iter()
                .map(|part| self.clone().commit_part(part, stop.clone())),
        )
        .await;
        for outcome in written {
            if let Some(stopped) = outcome? {
                return Ok(Some(stopped));
            }
        }
        self.advance(run_end, stop).await
    }

    /// Moves the journal position to `run_end`, again after a back-off while the database
    /// fails.
    async fn advance(self, run_end: u64, mut stop: watch::Receiver<bool>) -> Commit {
        use std::sync::atomic::Ordering;
        let mut wait = Duration::from_millis(100);
        loop {
            let from = self.through.load(Ordering::Acquire);
            if run_end <= from {
                return Ok(None);
            }
            match self.store.advance_read_through(from, run_end).await {
                Ok(()) => {
                    self.through.store(run_end, Ordering::Release);
                    return Ok(None);
                }
                Err(StoreError::Fenced { market, .. }) => {
                    return Ok(Some(Stopped::Lost(format!(
                        "another writer moved {market} past journal message {from}"
                    ))));
                }
                Err(StoreError::Database { what, reason }) => {
                    if let Some(s) = self.back_off(what, &reason, &mut wait, &mut stop).await {
                        return Ok(Some(s));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Writes `changes` in one transaction, again after a back-off while the database fails.
    async fn commit_part(self, changes: Changes, mut stop: watch::Receiver<bool>) -> Commit {
        let mut wait = Duration::from_millis(100);
        loop {
            if !self.lease.valid() {
                return Ok(Some(Stopped::Lost(
                    "the writer lease lapsed before a transaction".into(),
                )));
            }
            match self.store.write(&changes).await {
                Ok(()) => {
                    self.health.database_ok();
                    metrics::counter!("history_transactions_total").increment(1);
                    for (table, n) in [
                        ("orders", changes.orders.len()),
                        ("fills", changes.fills.len()),
                        ("trades", changes.trades.len()),
                        ("candles", changes.candles.len()),
                    ] {
                        metrics::counter!("history_rows_written_total", "table" => table)
                            .increment(n as u64);
                    }
                    return Ok(None);
                }
                Err(StoreError::Fenced { market, expected }) => {
                    return Ok(Some(Stopped::Lost(format!(
                        "another writer wrote {market} past journal message {}",
                        expected.unwrap_or(0)
                    ))));
                }
                Err(StoreError::Database { what, reason }) => {
                    metrics::counter!("history_write_failures_total").increment(1);
                    if let Some(s) = self.back_off(what, &reason, &mut wait, &mut stop).await {
                        return Ok(Some(s));
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Says the database failed and waits; `Some` when the writer must stop.
    async fn back_off(
        &self,
        what: &str,
        reason: &str,
        wait: &mut Duration,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Stopped> {
        let first = self.health.database_down_for().is_none();
        self.health.database_failed(&format!("{what}: {reason}"));
        if first {
            println!(
                "agora history: the database failed ({what}: {reason}); writing again every few seconds until it answers, nothing is lost"
            );
        }
        tracing::warn!(
            "history database {} failed ({what}: {reason}); trying again in {:.1} s",
            self.store.shown,
            wait.as_secs_f64()
        );
        tokio::select! {
            _ = tokio::time::sleep(*wait) => {}
            _ = stop.changed() => return Some(Stopped::Shutdown),
        }
        *wait = (*wait * 2).min(Duration::from_secs(5));
        if !self.lease.valid() {
            return Some(Stopped::Lost(
                "the writer lease lapsed while the database was down".into(),
            ));
        }
        None
    }
}
