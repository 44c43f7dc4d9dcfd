//! `agora history`: the journal (`EVENTS`) projected into a database, exactly once, and the
//! queries answered from it.
//!
//! - `project`: journal messages → the rows they change (pure). `decimal`: exact decimals.
//! - `store`: the database (SQLite, PostgreSQL, MySQL/MariaDB through sqlx): tables, the
//!   fenced transaction, reads.
//! - `writer`: the one writer of a database (a lease in NATS KV; the others wait as
//!   standbys): the journal from the database's own position on, a run of messages a
//!   transaction, written again after a failure until the database takes it.
//! - `query`: `<prefix>.query.<ACCOUNT>.history`, closed orders for the node's
//!   `<prefix>.query.<ACCOUNT>.order`, `<prefix>.query.trades|candles|ticker.<MARKET>`.
//!
//! The database is a projection: each journal message is written in the transaction that
//! moves its market's `history_progress` row from the message before to it, so a crash, a
//! second writer or a database outage can delay rows but never lose or repeat one, and
//! `--rebuild` makes the same tables again from the journal. This module must never write to
//! NATS but its lease, nor decide anything about an order that the journal does not say.

pub mod decimal;
pub mod project;
pub mod query;
pub mod store;
pub mod writer;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::bus::{self, BusError};
use crate::config::Config;
use crate::telemetry::http::Endpoints;

pub use store::{Dialect, Store, StoreError};

pub use crate::config::HistoryConfig;

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Other(String),
}

/// What the probes and metrics show, shared by the writer, the lease and the HTTP port.
#[derive(Clone, Default)]
pub struct Health(Arc<Mutex<HealthInner>>);

#[derive(Default)]
struct HealthInner {
    role: &'static str,
    /// Since when, and why, the database has refused the last attempts.
    database_down: Option<(Instant, String)>,
    nats: Option<async_nats::Client>,
    /// Per market: commands in the journal not yet written.
    lag: Vec<(String, u64)>,
    lag_error: Option<String>,
}

/// A writer further behind its journal than this (in commands, any market) is not ready.
pub const READY_LAG_MAX: u64 = 100_000;

impl Health {
    fn with<R>(&self, f: impl FnOnce(&mut HealthInner) -> R) -> R {
        match self.0.lock() {
            Ok(mut g) => f(&mut g),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    pub fn set_role(&self, role: &'static str) {
        metrics::gauge!("history_writer").set(if role == "writer" { 1.0 } else { 0.0 });
        self.with(|h| h.role = role);
    }

    pub fn database_failed(&self, why: &str) {
        metrics::gauge!("history_database_up").set(0.0);
        self.with(|h| {
            let since = h.database_down.as_ref().map_or_else(Instant::now, |d| d.0);
            h.database_down = Some((since, why.to_string()));
        });
    }

    pub fn database_ok(&self) {
        metrics::gauge!("history_database_up").set(1.0);
        self.with(|h| h.database_down = None);
    }

    /// Seconds the database has been failing, if it is.
    pub fn database_down_for(&self) -> Option<(f64, String)> {
        self.with(|h| {
            h.database_down
                .as_ref()
                .map(|(since, why)| (since.elapsed().as_secs_f64(), why.clone()))
        })
    }

    fn set_lag(&self, lag: Vec<(String, u64)>, error: Option<String>) {
        for (market, l) in &lag {
            metrics::gauge!("history_lag_commands", "market" => market.clone()).set(*l as f64);
        }
        self.with(|h| {
            h.lag = lag;
            h.lag_error = error;
        });
    }
}

/// The history process's probes.
#[derive(Clone)]
struct Probes {
    health: Health,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

impl Endpoints for Probes {
    async fn health(&self) -> (bool, Value) {
        (true, json!({"status": "ok"}))
    }

    async fn ready(&self) -> (bool, Value) {
        self.health.with(|h| {
            let nats_ok = h.nats.as_ref().is_some_and(|c| {
                c.connection_state() == async_nats::connection::State::Connected
            });
            let behind: Vec<&(String, u64)> =
                h.lag.iter().filter(|(_, l)| *l > READY_LAG_MAX).collect();
            let reason = if !nats_ok {
                Some("the NATS connection is down".to_string())
            } else if let Some((since, why)) = &h.database_down {
                Some(format!(
                    "the database has failed for {:.0} s ({why}); retrying, nothing is lost: the journal keeps every message until it is written",
                    since.elapsed().as_secs_f64()
                ))
            } else if h.role == "writer" && !behind.is_empty() {
                Some(format!(
                    "{} market(s) more than {READY_LAG_MAX} commands behind their journal",
                    behind.len()
                ))
            } else if h.role.is_empty() || h.role == "starting" {
                Some("starting".to_string())
            } else {
                None
            };
            let lag: serde_json::Map<String, Value> =
                h.lag.iter().map(|(m, l)| (m.clone(), json!(l))).collect();
            (
                reason.is_none(),
                json!({"ready": reason.is_none(), "role": h.role, "reason": reason, "lag": lag, "lag_error": h.lag_error}),
            )
        })
    }

    fn metrics(&self) -> Option<&metrics_exporter_prometheus::PrometheusHandle> {
        self.metrics.as_ref()
    }
}

/// The NATS URL: the configured one, else that of the node's embedded server in the same
/// data directory (`<data_dir>/nats/port`), else NATS's default.
pub fn nats_url(config: &Config) -> String {
    if !config.nats_url.is_empty() {
        return config.nats_url.clone();
    }
    let port = std::fs::read_to_string(config.data_dir.join("nats").join("port"))
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok())
        .unwrap_or(bus::server::EMBEDDED_PORT_DEFAULT);
    format!("nats://127.0.0.1:{port}")
}

/// Opens the database, waiting (with back-off, saying so) while it cannot be reached; a
/// URL or schema it cannot use fails at once.
async fn open_waiting(
    url: &str,
    writers: usize,
    health: &Health,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<Option<Store>, HistoryError> {
    let mut wait = Duration::from_millis(250);
    loop {
        match Store::open_with(url, writers).await {
            Ok(store) => {
                health.database_ok();
                return Ok(Some(store));
            }
            Err(StoreError::Database { what, reason }) => {
                let why = format!("{what}: {reason}");
                health.database_failed(&why);
                tracing::warn!(
                    "history database {} cannot be opened ({why}); trying again in {:.1} s",
                    store::redact_url(url),
                    wait.as_secs_f64()
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return Ok(None),
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Runs `agora history` until `shutdown`: with `rebuild`, empties the tables (once this
/// process is the writer) and writes them again from the start of the journal.
pub async fn run(
    config: Config,
    rebuild: bool,
    shutdown: impl Future<Output = ()>,
) -> Result<(), HistoryError> {
    let settings = config.history.clone();
    let subjects = config.subjects();
    let url = settings.database_url(&config.data_dir);
    let health = Health::default();
    health.set_role("starting");
    let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
    let listener = if settings.http_port == 0 {
        None
    } else {
        Some(
            crate::telemetry::http::bind(&config.http_addr, settings.http_port)
                .await
                .map_err(HistoryError::Other)?,
        )
    };
    let metrics = listener
        .as_ref()
        .and_then(|_| crate::telemetry::install_metrics());
    describe_metrics();
    if let Some(listener) = listener {
        actix_rt::spawn(crate::telemetry::http::serve(
            listener,
            Probes {
                health: health.clone(),
                metrics,
            },
            stop.clone(),
        ));
    }
    // The lease bucket at the streams' replicas: losing one NATS server of three must not
    // leave the history without a writer.
    let replicas = config.streams.replicas;
    let main = async move {
        let nats_url = nats_url(&config);
        let client = loop {
            match bus::connect_with(&nats_url, "agora-history", &config.nats).await {
                Ok(c) => break c,
                Err(BusError::Connect {
                    url: shown,
                    reason,
                    retry: true,
                }) => {
                    tracing::warn!("waiting for NATS at {shown} ({reason})");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => return Ok(()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        };
        health.with(|h| h.nats = Some(client.clone()));
        let Some(store) =
            open_waiting(&url, settings.parallel_transactions, &health, &mut stop).await?
        else {
            return Ok(());
        };
        println!(
            "agora history: {} database {}, NATS {}",
            store.dialect.name(),
            store.shown,
            bus::redact(&nats_url)
        );
        if settings.queries {
            query::HistoryQueries::new(client.clone(), subjects.clone(), store.clone())
                .listen(stop.clone())
                .await?;
        }
        writer::Writer {
            client,
            subjects,
            replicas,
            store,
            settings,
            health,
            rebuild,
        }
        .run(stop)
        .await
    };
    let mut main = std::pin::pin!(main);
    let shutdown = std::pin::pin!(shutdown);
    tokio::select! {
        r = &mut main => r,
        () = shutdown => {
            // The writer finishes its transaction and gives up its lease.
            let _ = stop_tx.send(true);
            tokio::time::timeout(Duration::from_secs(10), main)
                .await
                .unwrap_or(Ok(()))
        }
    }
}

fn describe_metrics() {
    metrics::describe_counter!(
        "history_rows_written_total",
        "Rows written to the history database, by table"
    );
    metrics::describe_counter!(
        "history_journal_messages_total",
        "Journal messages written to the history database"
    );
    metrics::describe_counter!(
        "history_transactions_total",
        "Transactions committed by the history writer"
    );
    metrics::describe_counter!(
        "history_write_failures_total",
        "Transactions the database refused (written again after a back-off)"
    );
    metrics::describe_counter!(
        "history_unreadable_total",
        "Journal messages or events the history writer could not read (skipped, logged)"
    );
    metrics::describe_gauge!(
        "history_lag_commands",
        "Commands in a market's journal not yet written to the history database"
    );
    metrics::describe_gauge!(
        "history_database_up",
        "1 while the history database takes writes, 0 while it fails"
    );
    metrics::describe_gauge!(
        "history_writer",
        "1 while this process is its database's writer, 0 as a standby"
    );
    metrics::describe_histogram!(
        "history_query_duration_us",
        "Time to answer a history query, microseconds"
    );
}
