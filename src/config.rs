//! Configuration: `config/default.toml` (compiled in, so `agora node` works from any
//! directory), then `--config FILE`, then `AGORA_*` environment variables, then flags.
//!
//! A bad value is refused before anything starts, with the key, the value and what is allowed.
//! This module must never read configuration after start-up or from anywhere else.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::book::spec::MarketDefaults;
use crate::book::{MarketSpec, MarketSpecInput};
use crate::bus::{NatsOptions, StreamSettings, Subjects};
pub use crate::telemetry::traces::settings::{OtlpProtocol, Sampler, TracingConfig};

/// Top-level keys that `AGORA_*` environment variables may set (`AGORA_MARKET__FETCH_MAX`).
const ENV_KEYS: &[&str] = &[
    "node_id",
    "nats_url",
    "data_dir",
    "prefix",
    "http_port",
    "http_addr",
    "shutdown_timeout_secs",
    "streams",
    "market",
    "snapshots",
    "nats",
    "tracing",
    "cluster",
    "history",
    "market_defaults",
    "embedded_nats",
];

/// The defaults, as shipped.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node_id: String,
    pub nats_url: String,
    pub data_dir: PathBuf,
    pub prefix: String,
    /// `/health` and `/ready` on this port; 0: off.
    pub http_port: u16,
    /// The address the HTTP port binds (`0.0.0.0`: every interface; `127.0.0.1`: this
    /// machine only).
    pub http_addr: String,
    /// How long a stopping node may take to finish its batches, snapshots and publishes
    /// before it exits without them (NATS unreachable, say).
    pub shutdown_timeout_secs: u64,
    pub streams: StreamsConfig,
    pub market: MarketConfig,
    pub snapshots: SnapshotsConfig,
    /// How to authenticate to NATS, TLS, reconnecting (used with `nats_url`).
    #[serde(default)]
    pub nats: NatsOptions,
    /// Traces over OTLP; the standard `OTEL_*` variables override it.
    #[serde(default)]
    pub tracing: TracingConfig,
    /// Heartbeats, leases and the rebalancer.
    pub cluster: ClusterConfig,
    /// The markets this node creates at start if missing; unset: the seed markets
    /// (`SEED_MARKETS`); `markets = []`: none.
    #[serde(default)]
    pub markets: Option<Vec<MarketSpecInput>>,
    /// What a market created now (by `market.add`, or from `markets` at start) gets for the
    /// cid window and per-account limits its spec leaves out.
    #[serde(default)]
    pub market_defaults: MarketDefaults,
    /// `agora history`: the database and the process's own HTTP port.
    #[serde(default)]
    pub history: HistoryConfig,
    /// The nats-server a node starts when `nats_url` is empty.
    #[serde(default)]
    pub embedded_nats: EmbeddedNatsConfig,
}

/// `[embedded_nats]`: the node's own nats-server.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedNatsConfig {
    /// The address it listens on: 127.0.0.1 (this machine only) or 0.0.0.0 (every
    /// interface, as in the container image, whose port is published only when asked).
    pub addr: String,
}

impl Default for EmbeddedNatsConfig {
    fn default() -> EmbeddedNatsConfig {
        EmbeddedNatsConfig {
            addr: "127.0.0.1".into(),
        }
    }
}

/// The seed markets, `config/markets/*.toml` compiled in: what a node creates when its
/// configuration names no markets. These files are the one source of their specs: the same
/// file serves `agora ctl market.add --spec` and `agora replay --market`.
pub const SEED_MARKETS: &[(&str, &str)] = &[
    (
        "config/markets/btc-usdc.toml",
        include_str!("../config/markets/btc-usdc.toml"),
    ),
    (
        "config/markets/eth-usdc.toml",
        include_str!("../config/markets/eth-usdc.toml"),
    ),
    (
        "config/markets/sol-usdc.toml",
        include_str!("../config/markets/sol-usdc.toml"),
    ),
];

/// The seed markets as specs to validate (an error names the file).
pub fn seed_markets() -> Result<Vec<MarketSpecInput>, ConfigError> {
    SEED_MARKETS
        .iter()
        .map(|(path, text)| {
            Figment::from(Toml::string(text))
                .extract()
                .map_err(|e| ConfigError(format!("{path}: {e}")))
        })
        .collect()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub heartbeat_ms: u64,
    pub lease_ms: u64,
    pub rebalance_every_secs: u64,
    pub imbalance_ratio: f64,
    pub min_rate_gap: f64,
    pub max_moves_per_minute: u32,
    pub standbys: u32,
    /// Markets this node prefers to run (static placement).
    #[serde(default)]
    pub prefer: Vec<String>,
    pub failback_after_secs: u64,
    /// How often a node writes its load into its record (0: with every renewal); the
    /// renewals between carry none.
    #[serde(default)]
    pub load_every_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotsConfig {
    pub every_commands: u64,
    pub every_secs: u64,
    /// The node's snapshot bytes a second (0: unbounded): due snapshots wait while it is spent.
    pub max_bytes_per_sec: u64,
    /// The snapshot format written: 2, or 1 (what builds before 2 read and write, with their
    /// state hash) while a rolling upgrade still has such nodes.
    #[serde(default = "snapshot_format_default")]
    pub format: u32,
}

fn snapshot_format_default() -> u32 {
    crate::actors::core::MARKET_SNAPSHOT_VERSION
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamsConfig {
    pub replicas: usize,
    pub memory: bool,
    pub duplicate_window_secs: u64,
    pub max_age_secs: u64,
    pub max_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarketConfig {
    pub fetch_max: usize,
    pub backlog_wait_us: u64,
    pub batch_max: u16,
    pub arbiters: usize,
}

/// Values given on the command line; `None` leaves the configured value.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_addr: Option<String>,
}

/// The database URL schemes `agora history` reads.
pub const DATABASE_SCHEMES: &[&str] = &["sqlite", "postgres", "postgresql", "mysql", "mariadb"];

/// Settings of `agora history` (`[history]`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// `sqlite://PATH`, `postgres://USER:PASSWORD@HOST:PORT/DB` or
    /// `mysql://USER:PASSWORD@HOST:PORT/DB`; empty: `sqlite://<data_dir>/history.db`.
    pub database: String,
    /// `/metrics`, `/health` and `/ready` of the history process (0: off).
    pub http_port: u16,
    /// Most journal messages one run (one transaction a part) writes.
    pub batch_max: usize,
    /// PostgreSQL: transactions written at once, a run's markets split among them (each
    /// market in one). SQLite and MySQL write a run in one transaction.
    pub parallel_transactions: usize,
    /// How long a writer that stops renewing keeps the role before a standby takes it.
    pub lease_ms: u64,
    /// Whether this process answers the history queries (every instance may, writer or not).
    pub queries: bool,
}

impl Default for HistoryConfig {
    fn default() -> HistoryConfig {
        HistoryConfig {
            database: String::new(),
            http_port: 0,
            batch_max: 1000,
            parallel_transactions: 4,
            lease_ms: 2000,
            queries: true,
        }
    }
}

impl HistoryConfig {
    pub fn check(&self) -> Result<(), String> {
        if !self.database.is_empty()
            && !DATABASE_SCHEMES
                .iter()
                .any(|scheme| self.database.starts_with(&format!("{scheme}://")))
        {
            return Err(format!(
                "history.database {} is not a URL agora history reads: use sqlite://PATH, postgres://USER:PASSWORD@HOST:PORT/DB or mysql://USER:PASSWORD@HOST:PORT/DB",
                crate::bus::redact(&self.database)
            ));
        }
        if !(1..=10_000).contains(&self.batch_max) {
            return Err(format!(
                "history.batch_max = {}: use 1 to 10000",
                self.batch_max
            ));
        }
        if !(1..=64).contains(&self.parallel_transactions) {
            return Err(format!(
                "history.parallel_transactions = {}: use 1 to 64",
                self.parallel_transactions
            ));
        }
        if !(1000..=60_000).contains(&self.lease_ms) {
            return Err(format!(
                "history.lease_ms = {}: use 1000 to 60000",
                self.lease_ms
            ));
        }
        Ok(())
    }

    /// The database URL: the configured one, else SQLite in the data directory.
    pub fn database_url(&self, data_dir: &std::path::Path) -> String {
        if self.database.is_empty() {
            format!("sqlite://{}", data_dir.join("history.db").display())
        } else {
            self.database.clone()
        }
    }
}

/// A configuration that cannot run, with what to change.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Loads the layers in order and checks the result.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError(format!(
                    "configuration file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        let mut config: Config = figment
            .merge(
                // Only this configuration's own keys: other AGORA_* variables (test settings,
                // the nats-server path) are not configuration.
                Env::prefixed("AGORA_")
                    .filter(|key| {
                        let first = key.as_str().split("__").next().unwrap_or("");
                        ENV_KEYS.iter().any(|k| first.eq_ignore_ascii_case(k))
                    })
                    .split("__"),
            )
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(|e| ConfigError(format!("invalid configuration: {e}")))?;
        // The standard OpenTelemetry variables over every other layer of [tracing].
        config
            .tracing
            .apply_otel_env(|name| std::env::var(name).ok())
            .map_err(ConfigError)?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        Subjects::new(&self.prefix).map_err(|e| ConfigError(format!("prefix: {e}")))?;
        if !self.node_id.is_empty() && Subjects::check_token("node_id", &self.node_id).is_err() {
            return Err(ConfigError(format!(
                "node_id {:?}: use letters, digits, '-' and '_' only",
                self.node_id
            )));
        }
        if self.http_addr.parse::<std::net::IpAddr>().is_err() {
            return Err(ConfigError(format!(
                "http_addr = {:?}: use an IP address of this machine (0.0.0.0 for every interface, 127.0.0.1 for this machine only, :: for IPv6)",
                self.http_addr
            )));
        }
        if self.embedded_nats.addr.parse::<std::net::IpAddr>().is_err() {
            return Err(ConfigError(format!(
                "embedded_nats.addr = {:?}: use an IP address of this machine (127.0.0.1 for this machine only, 0.0.0.0 for every interface)",
                self.embedded_nats.addr
            )));
        }
        if !(1..=3600).contains(&self.shutdown_timeout_secs) {
            return Err(ConfigError(format!(
                "shutdown_timeout_secs = {}: use 1 to 3600",
                self.shutdown_timeout_secs
            )));
        }
        if self.streams.replicas == 0 || self.streams.replicas > 5 {
            return Err(ConfigError(format!(
                "streams.replicas = {}: JetStream allows 1 to 5",
                self.streams.replicas
            )));
        }
        if self.market.fetch_max == 0 || self.market.fetch_max > 10_000 {
            return Err(ConfigError(format!(
                "market.fetch_max = {}: use 1 to 10000",
                self.market.fetch_max
            )));
        }
        if self.market.backlog_wait_us > 100_000 {
            return Err(ConfigError(format!(
                "market.backlog_wait_us = {}: use 0 (never wait) to 100000 (0.1 s)",
                self.market.backlog_wait_us
            )));
        }
        if self.market.batch_max == 0
            || self.market.batch_max > crate::book::types::BATCH_COMMANDS_MAX
        {
            return Err(ConfigError(format!(
                "market.batch_max = {}: use 1 to {}",
                self.market.batch_max,
                crate::book::types::BATCH_COMMANDS_MAX
            )));
        }
        self.nats.check().map_err(ConfigError)?;
        self.history.check().map_err(ConfigError)?;
        let s = &self.streams;
        if s.max_age_secs != 0 && s.max_age_secs <= s.duplicate_window_secs {
            return Err(ConfigError(format!(
                "streams.max_age_secs = {} must be above streams.duplicate_window_secs = {} (or 0: keep forever)",
                s.max_age_secs, s.duplicate_window_secs
            )));
        }
        self.snapshot_format()?;
        if self.snapshots.every_secs > 86_400 {
            return Err(ConfigError(format!(
                "snapshots.every_secs = {}: use 0 (off) to 86400",
                self.snapshots.every_secs
            )));
        }
        let c = &self.cluster;
        if !(10..=10_000).contains(&c.heartbeat_ms) {
            return Err(ConfigError(format!(
                "cluster.heartbeat_ms = {}: use 10 to 10000",
                c.heartbeat_ms
            )));
        }
        if c.lease_ms < 3 * c.heartbeat_ms || c.lease_ms > 60_000 {
            return Err(ConfigError(format!(
                "cluster.lease_ms = {}: use at least 3 heartbeats ({} ms) and at most 60000",
                c.lease_ms,
                3 * c.heartbeat_ms
            )));
        }
        let ttl_ms = (4 * c.lease_ms).max(3000);
        if c.load_every_ms != 0 && !(c.heartbeat_ms..=ttl_ms / 2).contains(&c.load_every_ms) {
            return Err(ConfigError(format!(
                "cluster.load_every_ms = {}: use 0 (the load with every renewal) or {} to {} (a heartbeat to half the records' lifetime, max(4 x lease_ms, 3000) ms)",
                c.load_every_ms,
                c.heartbeat_ms,
                ttl_ms / 2
            )));
        }
        if c.imbalance_ratio.is_nan() || c.imbalance_ratio < 1.0 {
            return Err(ConfigError(format!(
                "cluster.imbalance_ratio = {}: use 1.0 or more (1.5: a node 50% above the mean)",
                c.imbalance_ratio
            )));
        }
        if c.min_rate_gap.is_nan() || c.min_rate_gap < 0.0 {
            return Err(ConfigError(format!(
                "cluster.min_rate_gap = {}: use 0 or more commands per second",
                c.min_rate_gap
            )));
        }
        for market in &c.prefer {
            if let Err(e) = crate::book::spec::validate_symbol(market) {
                return Err(ConfigError(format!("cluster.prefer: {market:?}: {e}")));
            }
        }
        if c.standbys > 1 {
            return Err(ConfigError(format!(
                "cluster.standbys = {}: use 0 (none) or 1 (a warm copy of each market on another node)",
                c.standbys
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for input in &self.market_inputs()? {
            input
                .validate()
                .map_err(|e| ConfigError(format!("markets: {e} (field {})", e.field)))?;
            if !seen.insert(input.symbol.clone()) {
                return Err(ConfigError(format!(
                    "markets: {} is listed twice",
                    input.symbol
                )));
            }
        }
        Ok(())
    }

    /// The markets to create at start: the configured ones, or the seed markets, with the
    /// defaults of a market created now (`MarketSpecInput::for_new_market`).
    pub fn market_inputs(&self) -> Result<Vec<MarketSpecInput>, ConfigError> {
        let inputs = match &self.markets {
            Some(markets) => markets.clone(),
            None => seed_markets()?,
        };
        Ok(inputs
            .into_iter()
            .map(|m| m.with_defaults(&self.market_defaults))
            .collect())
    }

    /// The validated market specs (checked at load, so none is dropped here).
    pub fn market_specs(&self) -> Vec<MarketSpec> {
        self.market_inputs()
            .unwrap_or_default()
            .iter()
            .filter_map(|m| m.validate().ok())
            .collect()
    }

    pub fn subjects(&self) -> Subjects {
        Subjects::new(&self.prefix).unwrap_or_default()
    }

    pub fn stream_settings(&self) -> StreamSettings {
        StreamSettings {
            memory: self.streams.memory,
            replicas: self.streams.replicas,
            duplicate_window: std::time::Duration::from_secs(self.streams.duplicate_window_secs),
            max_age: std::time::Duration::from_secs(self.streams.max_age_secs),
            max_bytes: self.streams.max_bytes,
            heartbeat_ttl: self.cluster_settings().record_ttl(),
        }
    }

    pub fn cluster_settings(&self) -> crate::cluster::ClusterSettings {
        let c = &self.cluster;
        crate::cluster::ClusterSettings {
            heartbeat: std::time::Duration::from_millis(c.heartbeat_ms),
            lease: std::time::Duration::from_millis(c.lease_ms),
            rebalance_every: std::time::Duration::from_secs(c.rebalance_every_secs),
            imbalance_ratio: c.imbalance_ratio,
            min_rate_gap: c.min_rate_gap,
            max_moves_per_minute: c.max_moves_per_minute,
            standbys: c.standbys,
            prefer: c.prefer.clone(),
            failback_after: std::time::Duration::from_secs(c.failback_after_secs),
            load_every: std::time::Duration::from_millis(c.load_every_ms),
        }
    }

    /// The snapshot format the node writes (`[snapshots] format`), refused when this build
    /// does not read it.
    pub fn snapshot_format(&self) -> Result<crate::actors::core::SnapshotFormat, ConfigError> {
        crate::actors::core::SnapshotFormat::of(self.snapshots.format).ok_or_else(|| {
            ConfigError(format!(
                "snapshots.format = {}: use {} (1 only while nodes of builds before format 2 still run)",
                self.snapshots.format,
                crate::actors::core::MARKET_SNAPSHOT_VERSION
            ))
        })
    }

    /// This node's id: configured, or generated once and kept in `<data_dir>/node-id`.
    pub fn node_id(&self) -> Result<String, ConfigError> {
        if !self.node_id.is_empty() {
            return Ok(self.node_id.clone());
        }
        let path = self.data_dir.join("node-id");
        if let Ok(id) = std::fs::read_to_string(&path) {
            let id = id.trim().to_string();
            if !id.is_empty() {
                return Ok(id);
            }
        }
        std::fs::create_dir_all(&self.data_dir).map_err(|e| {
            ConfigError(format!(
                "cannot create data_dir {}: {e}",
                self.data_dir.display()
            ))
        })?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let id = format!(
            "node-{:08x}",
            (nanos as u64 ^ u64::from(std::process::id())) & 0xffff_ffff
        );
        std::fs::write(&path, &id)
            .map_err(|e| ConfigError(format!("cannot write {}: {e}", path.display())))?;
        Ok(id)
    }
}

#[cfg(test)]
// figment::Jail's closures must return figment's own (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    // Every test that reads the environment runs in a figment Jail: serialized, and with the
    // process environment restored afterwards.

    #[test]
    fn the_defaults_load_and_hold_the_seed_markets() {
        figment::Jail::expect_with(|_| {
            let config = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            let specs = config.market_specs();
            let symbols: Vec<&str> = specs.iter().map(|m| m.symbol.as_str()).collect();
            assert_eq!(symbols, ["BTC-USDC", "ETH-USDC", "SOL-USDC"]);
            // The shipped files are what runs: BTC-USDC's band, limits and STP default, and
            // the cid window of a market created now.
            let btc = figment::Figment::from(Toml::string(include_str!(
                "../config/markets/btc-usdc.toml"
            )))
            .extract::<MarketSpecInput>()
            .map_err(|e| e.to_string())?
            .for_new_market()
            .validate()
            .map_err(|e| e.to_string())?;
            assert_eq!(specs[0], btc);
            assert_eq!(
                btc.cid_window_secs,
                crate::book::spec::CID_WINDOW_SECS_DEFAULT
            );
            assert!(btc.price_band_bps.is_some() && btc.max_qty.is_some());
            // markets = [] means none.
            let none = Config::load(
                Some(&{
                    let path = std::path::PathBuf::from("none.toml");
                    std::fs::write(&path, "markets = []\n").map_err(|e| e.to_string())?;
                    path
                }),
                &Overrides::default(),
            )
            .map_err(|e| e.to_string())?;
            assert!(none.market_specs().is_empty());
            assert_eq!(config.prefix, "agora");
            assert!(config.nats_url.is_empty());
            Ok(())
        });
    }

    #[test]
    fn files_and_flags_override_and_bad_values_name_their_key() {
        figment::Jail::expect_with(|jail| {
            let file = jail.directory().join("node.toml");
            let write = |text: &str| std::fs::write(&file, text).map_err(|e| e.to_string());
            write("nats_url = \"nats://10.0.0.1:4222\"\n[market]\nfetch_max = 64\n")?;
            let overrides = Overrides {
                nats_url: Some("nats://127.0.0.1:4333".into()),
                ..Overrides::default()
            };
            let config = Config::load(Some(&file), &overrides).map_err(|e| e.to_string())?;
            assert_eq!(config.nats_url, "nats://127.0.0.1:4333");
            assert_eq!(config.market.fetch_max, 64);
            let refused = |text: &str, needle: &str| -> Result<(), String> {
                write(text)?;
                let err = match Config::load(Some(&file), &Overrides::default()) {
                    Ok(_) => return Err(format!("{text:?} was accepted")),
                    Err(e) => e.to_string(),
                };
                assert!(err.contains(needle), "{err}");
                Ok(())
            };
            refused("[market]\nfetch_max = \"lots\"\n", "fetch_max")?;
            refused("[market]\nfetch_max = 0\n", "market.fetch_max = 0")?;
            // The load at most every load_every_ms: a heartbeat at least, and half the
            // records' lifetime (max(4 x lease, 3 s)) at most, so a record never expires.
            refused(
                "[cluster]\nload_every_ms = 50\n",
                "cluster.load_every_ms = 50: use 0 (the load with every renewal) or 100 to 1500",
            )?;
            refused(
                "[cluster]\nheartbeat_ms = 500\nlease_ms = 2000\nload_every_ms = 5000\n",
                "or 500 to 4000",
            )?;
            write("[cluster]\nheartbeat_ms = 25\nlease_ms = 150\nload_every_ms = 1000\n")?;
            let light = Config::load(Some(&file), &Overrides::default())
                .map_err(|e| e.to_string())?
                .cluster_settings();
            assert_eq!(light.load_every, std::time::Duration::from_secs(1));
            refused(
                "[market]\nbacklog_wait_us = 500000\n",
                "market.backlog_wait_us = 500000: use 0 (never wait) to 100000",
            )?;
            refused(
                "[[markets]]\nsymbol = \"btc\"\nprice_decimals = 2\nsize_decimals = 8\n",
                "symbol",
            )?;
            refused("fetch_maxx = 3\n", "fetch_maxx")?;
            refused(
                "[streams]\nmax_age_secs = 60\n",
                "streams.max_age_secs = 60",
            )?;
            refused(
                "[nats]\ntoken = \"t\"\nuser = \"u\"\npassword = \"p\"\n",
                "one way to authenticate",
            )?;
            refused(
                "[nats]\ncreds_file = \"/nowhere.creds\"\n",
                "nats.creds_file",
            )?;
            refused("[snapshots]\nevery_secs = 100000\n", "snapshots.every_secs")?;
            refused("[snapshots]\nformat = 3\n", "snapshots.format = 3")?;
            refused("http_port = 70000\n", "http_port")?;
            refused("http_addr = \"localhost:80\"\n", "http_addr")?;
            refused("[embedded_nats]\naddr = \"any\"\n", "embedded_nats.addr")?;
            let missing = jail.directory().join("missing.toml");
            let err = Config::load(Some(&missing), &Overrides::default())
                .err()
                .map(|e| e.to_string());
            assert!(err.is_some_and(|e| e.contains("does not exist")));
            Ok(())
        });
    }

    #[test]
    fn environment_variables_set_their_keys_and_others_are_ignored() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("AGORA_NATS_URL", "nats://127.0.0.1:4999");
            jail.set_env("AGORA_MARKET__FETCH_MAX", "32");
            jail.set_env("AGORA_NATS_SERVER", "/opt/nats-server");
            jail.set_env("AGORA_ORACLE_SEED", "7");
            jail.set_env("AGORA_NATS__TOKEN", "s3cret");
            jail.set_env("AGORA_SNAPSHOTS__EVERY_COMMANDS", "500");
            let config = Config::load(None, &Overrides::default()).map_err(|e| e.to_string())?;
            assert_eq!(config.nats_url, "nats://127.0.0.1:4999");
            assert_eq!(config.nats.token.as_deref(), Some("s3cret"));
            assert_eq!(config.snapshots.every_commands, 500);
            assert_eq!(config.market.fetch_max, 32);
            Ok(())
        });
    }

    #[test]
    fn tracing_is_off_until_an_endpoint_and_the_otel_variables_override_the_file() {
        figment::Jail::expect_with(|jail| {
            for name in [
                "OTEL_SDK_DISABLED",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                "OTEL_SERVICE_NAME",
                "OTEL_TRACES_SAMPLER",
                "OTEL_TRACES_SAMPLER_ARG",
            ] {
                // Empty counts as unset.
                jail.set_env(name, "");
            }
            let load = || Config::load(None, &Overrides::default()).map_err(|e| e.to_string());
            let tracing = load()?.tracing;
            assert!(!tracing.active());
            assert_eq!(tracing.protocol, OtlpProtocol::Grpc);
            assert_eq!(tracing.service_name, "agora-node");

            jail.set_env("AGORA_TRACING__ENDPOINT", "http://from-agora:4317");
            assert_eq!(load()?.tracing.endpoint, "http://from-agora:4317");
            jail.set_env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
            jail.set_env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf");
            jail.set_env("OTEL_SERVICE_NAME", "matcher-1");
            jail.set_env("OTEL_TRACES_SAMPLER", "traceidratio");
            jail.set_env("OTEL_TRACES_SAMPLER_ARG", "0.25");
            let tracing = load()?.tracing;
            assert!(tracing.active());
            assert_eq!(tracing.endpoint, "http://collector:4318");
            assert_eq!(tracing.protocol, OtlpProtocol::Http);
            assert_eq!(tracing.service_name, "matcher-1");
            assert_eq!(tracing.sampler, Sampler::Traceidratio);
            assert_eq!(tracing.sampling_ratio, 0.25);
            jail.set_env(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://traces:4318/v1/traces",
            );
            assert_eq!(load()?.tracing.endpoint, "http://traces:4318/v1/traces");
            jail.set_env("OTEL_SDK_DISABLED", "TRUE");
            assert!(!load()?.tracing.active());
            jail.set_env("OTEL_SDK_DISABLED", "false");
            assert!(load()?.tracing.active());

            let mut refused = |name: &str, value: &str, needle: &str| -> Result<(), String> {
                jail.set_env(name, value);
                match load() {
                    Ok(_) => return Err(format!("{name}={value} was accepted")),
                    Err(e) => assert!(e.contains(needle), "{e}"),
                }
                jail.set_env(name, "");
                Ok(())
            };
            refused(
                "OTEL_TRACES_SAMPLER",
                "jaeger_remote",
                "parentbased_traceidratio",
            )?;
            refused("OTEL_TRACES_SAMPLER_ARG", "half", "OTEL_TRACES_SAMPLER_ARG")?;
            refused("OTEL_TRACES_SAMPLER_ARG", "1.5", "sampling_ratio")?;
            refused(
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                "http/json",
                "grpc or http/protobuf",
            )?;
            refused(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "https://c:4317",
                "no TLS",
            )?;
            refused(
                "AGORA_TRACING__SAMPLER",
                "sometimes",
                "parentbased_traceidratio",
            )?;
            Ok(())
        });
    }

    #[test]
    fn a_generated_node_id_is_kept() {
        figment::Jail::expect_with(|jail| {
            let overrides = Overrides {
                data_dir: Some(jail.directory().to_path_buf()),
                ..Overrides::default()
            };
            let config = Config::load(None, &overrides).map_err(|e| e.to_string())?;
            let first = config.node_id().map_err(|e| e.to_string())?;
            assert!(first.starts_with("node-"));
            assert_eq!(config.node_id().map_err(|e| e.to_string())?, first);
            Ok(())
        });
    }
}
