//! `Store`: the history database, SQLite, PostgreSQL or MySQL/MariaDB through sqlx. The
//! tables of DESIGN section 12, created if missing; one transaction per write, fenced by each
//! market's progress row (an `UPDATE ... WHERE events_seq = <what this writer last wrote>`
//! that must change exactly one row), so two writers can never both write a message; the
//! rows the projection needs; and the reads the queries make (`query.rs`).
//!
//! Decimals are exact: `NUMERIC` in PostgreSQL, `DECIMAL(65,30)` in MySQL, and in SQLite the
//! decimal string as the engine wrote it plus the value in the market's integer units
//! (`price_units`, ...) for sorting and sums. Never a float. Text compares byte for byte on
//! every database (`Dialect::key_type`), and text columns are read with `try_get_unchecked`:
//! MySQL and MariaDB report a `VARCHAR` with a binary collation as `VARBINARY`, which sqlx will
//! not decode as a string (its issue 3387) though the bytes are the text's UTF-8; the columns
//! read so are the schema's own text columns, and the decode still refuses bytes that are not
//! UTF-8. This module must never decide what a row holds (the projection does) or print a
//! database password.

use std::str::FromStr;
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{QueryBuilder, Row};

use super::decimal::{Dec, with_scale};
use super::project::{CandleRow, Changes, FillRow, OrderRow, Progress, Status, TradeRow};

/// The schema this build writes (`history_meta.schema_version`). Version 2: every text column
/// compares byte for byte (`Dialect::key_type`); a version-1 database is converted in place
/// when a store opens it (`Store::migrate_from_1`, `store/meta.rs`).
pub const SCHEMA_VERSION: i64 = 2;

/// The tables of the schema, in creation order.
const TABLES: [&str; 6] = [
    "history_meta",
    "history_progress",
    "orders",
    "fills",
    "trades",
    "candles",
];

/// Most rows one multi-row statement carries (24 columns × 500 stays under every database's
/// limit on bound values).
const ROWS_PER_STATEMENT: usize = 500;

/// Rows one PostgreSQL statement carries (arrays, a bind a column).
const PG_ROWS_PER_STATEMENT: usize = 5000;

/// The `history_meta` row holding the journal position every market is written through.
const READ_THROUGH: &str = "read_through";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
    MySql,
}

#[derive(Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
    MySql(MySqlPool),
}

/// Runs `$body` with `$p` bound to the concrete pool: one text, compiled for each database.
macro_rules! on_pool {
    ($pool:expr, $p:ident => $body:expr) => {
        match $pool {
            Pool::Sqlite($p) => $body,
            Pool::Postgres($p) => $body,
            Pool::MySql($p) => $body,
        }
    };
}

/// What a write or a read can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer wrote this market's journal past where this one stands.
    #[error(
        "another writer has written {market}'s history past journal message {expected:?}: this process is no longer the writer"
    )]
    Fenced {
        market: String,
        expected: Option<u64>,
    },
    /// The database refused or could not be reached; the same write can be tried again.
    #[error("database {what}: {reason}")]
    Database { what: &'static str, reason: String },
    /// The database holds something this build cannot use.
    #[error("{0}")]
    Schema(String),
}

fn db_err(what: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
    move |e| StoreError::Database {
        what,
        reason: e.to_string(),
    }
}

/// A value bound into a statement.
enum Val {
    Int(Option<i64>),
    Text(Option<String>),
    /// An exact decimal, as text (cast to NUMERIC in PostgreSQL).
    Dec(Option<String>),
}

fn int(v: u64) -> Val {
    Val::Int(i64::try_from(v).ok())
}

fn text(v: impl Into<String>) -> Val {
    Val::Text(Some(v.into()))
}

fn opt_text(v: Option<&str>) -> Val {
    Val::Text(v.map(str::to_string))
}

fn dec(v: Option<Dec>) -> Val {
    Val::Dec(v.map(|d| d.to_string()))
}

/// A table's columns and one row's values, with SQLite's integer-unit twins of its decimals.
struct Table {
    name: &'static str,
    keys: &'static [&'static str],
    /// Whether a row with the same key is replaced (else it cannot exist: insert only).
    upsert: bool,
    columns: Vec<&'static str>,
}

impl Dialect {
    pub fn of_url(url: &str) -> Result<Dialect, String> {
        let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
        match scheme {
            "sqlite" => Ok(Dialect::Sqlite),
            "postgres" | "postgresql" => Ok(Dialect::Postgres),
            "mysql" | "mariadb" => Ok(Dialect::MySql),
            _ => Err(format!(
                "database {} is not a URL this build reads: use sqlite://PATH, postgres://USER@HOST:PORT/DB or mysql://USER:PASSWORD@HOST:PORT/DB",
                crate::bus::redact(url)
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgres",
            Dialect::MySql => "mysql",
        }
    }

    fn dec_type(self) -> &'static str {
        match self {
            Dialect::Sqlite => "TEXT",
            Dialect::Postgres => "NUMERIC",
            Dialect::MySql => "DECIMAL(65,30)",
        }
    }

    /// A text column: ids (markets, accounts, cids, trade ids) and short words. Compared byte
    /// for byte on every database, whatever its default: accounts and cids are case-sensitive
    /// (`alice` and `Alice` are two accounts), and MySQL's and MariaDB's default collations
    /// ignore case, so a query for one account would find the other's orders. On PostgreSQL
    /// the default collation only orders differently, but a locale's comparisons cost: with
    /// an `en_US.UTF-8` database, index inserts into `fills` took twice as long (BENCHMARKS,
    /// "The history store"). SQLite compares text byte for byte unless told otherwise.
    fn key_type(self, len: usize) -> String {
        match self {
            Dialect::Sqlite => "TEXT".into(),
            Dialect::Postgres => "TEXT COLLATE \"C\"".into(),
            Dialect::MySql => format!("VARCHAR({len}) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"),
        }
    }

    fn int_type(self) -> &'static str {
        match self {
            Dialect::Sqlite => "INTEGER",
            _ => "BIGINT",
        }
    }

    /// `interval` is a reserved word in PostgreSQL and MySQL.
    pub fn interval_col(self) -> &'static str {
        match self {
            Dialect::MySql => "`interval`",
            _ => "\"interval\"",
        }
    }

    /// A decimal column read back as text.
    pub fn dec_text(self, col: &str) -> String {
        match self {
            Dialect::Sqlite => col.to_string(),
            Dialect::Postgres => format!("CAST({col} AS TEXT) AS {col}"),
            Dialect::MySql => format!("CAST({col} AS CHAR) AS {col}"),
        }
    }

    fn upsert_clause(self, t: &Table) -> String {
        let rest: Vec<String> = t
            .columns
            .iter()
            .filter(|c| !t.keys.contains(c))
            .map(|c| self.column_name(c))
            .collect();
        let keys: Vec<String> = t.keys.iter().map(|c| self.column_name(c)).collect();
        match self {
            Dialect::MySql => format!(
                " ON DUPLICATE KEY UPDATE {}",
                rest.iter()
                    .map(|c| format!("{c} = VALUES({c})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => format!(
                " ON CONFLICT ({}) DO UPDATE SET {}",
                keys.join(", "),
                rest.iter()
                    .map(|c| format!("{c} = excluded.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// The DDL of every table, in creation order.
    fn schema(self) -> Vec<String> {
        let (i, d) = (self.int_type(), self.dec_type());
        let (m, a, tid) = (self.key_type(32), self.key_type(36), self.key_type(40));
        let short = self.key_type(16);
        let units = |cols: &[&str]| -> String {
            if self == Dialect::Sqlite {
                cols.iter()
                    .map(|c| format!(", {c}_units INTEGER"))
                    .collect::<String>()
            } else {
                String::new()
            }
        };
        let iv = self.interval_col();
        let mut out = vec![
            format!(
                "CREATE TABLE IF NOT EXISTS history_meta (name {short} NOT NULL PRIMARY KEY, value {tid} NOT NULL)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS history_progress (market {m} NOT NULL PRIMARY KEY, last_seq {i} NOT NULL, events_seq {i} NOT NULL, price_decimals {i}, size_decimals {i})"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS orders (market {m} NOT NULL, oid {i} NOT NULL, account {a} NOT NULL, cid {a}, side {short}, order_type {short}, tif {short}, price {d}, stop_price {d}, qty {d}, filled {d} NOT NULL, leaves {d} NOT NULL, notional {d} NOT NULL, avg_price {d}, status {short} NOT NULL, reason {tid}, created_seq {i} NOT NULL, updated_seq {i} NOT NULL, created_ts {i} NOT NULL, updated_ts {i} NOT NULL{}, PRIMARY KEY (market, oid))",
                units(&["price", "qty", "filled", "leaves"])
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS fills (market {m} NOT NULL, trade_id {tid} NOT NULL, account {a} NOT NULL, liquidity {short} NOT NULL, oid {i} NOT NULL, cid {a}, side {short} NOT NULL, price {d} NOT NULL, qty {d} NOT NULL, ts {i} NOT NULL, seq {i} NOT NULL{}, PRIMARY KEY (market, trade_id, account, liquidity))",
                units(&["price", "qty"])
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS trades (market {m} NOT NULL, trade_id {tid} NOT NULL, n {i} NOT NULL, price {d} NOT NULL, qty {d} NOT NULL, taker_side {short} NOT NULL, ts {i} NOT NULL, seq {i} NOT NULL{}, PRIMARY KEY (market, trade_id))",
                units(&["price", "qty"])
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS candles (market {m} NOT NULL, {iv} {short} NOT NULL, t {i} NOT NULL, open {d} NOT NULL, high {d} NOT NULL, low {d} NOT NULL, close {d} NOT NULL, volume {d} NOT NULL, trades {i} NOT NULL{}, PRIMARY KEY (market, {iv}, t))",
                units(&["open", "high", "low", "close", "volume"])
            ),
        ];
        // MySQL has no CREATE INDEX IF NOT EXISTS: its indexes go inside CREATE TABLE.
        let indexes = [
            (
                "orders_account",
                "orders",
                "account, created_ts, market, oid",
            ),
            ("orders_cid", "orders", "account, market, cid"),
            ("fills_account", "fills", "account, ts, market"),
            ("trades_time", "trades", "market, ts"),
        ];
        for (name, table, cols) in indexes {
            if self == Dialect::MySql {
                let at = format!("CREATE TABLE IF NOT EXISTS {table} (");
                if let Some(ddl) = out.iter_mut().find(|d| d.starts_with(&at)) {
                    ddl.pop();
                    ddl.push_str(&format!(", INDEX {name} ({cols}))"));
                }
            } else {
                out.push(format!(
                    "CREATE INDEX IF NOT EXISTS {name} ON {table} ({cols})"
                ));
            }
        }
        out
    }

    fn orders_table(self) -> Table {
        let mut columns = vec![
            "market",
            "oid",
            "account",
            "cid",
            "side",
            "order_type",
            "tif",
            "price",
            "stop_price",
            "qty",
            "filled",
            "leaves",
            "notional",
            "avg_price",
            "status",
            "reason",
            "created_seq",
            "updated_seq",
            "created_ts",
            "updated_ts",
        ];
        if self == Dialect::Sqlite {
            columns.extend(["price_units", "qty_units", "filled_units", "leaves_units"]);
        }
        Table {
            name: "orders",
            keys: &["market", "oid"],
            upsert: true,
            columns,
        }
    }

    /// An order's values, each decimal at its market's scale (prices, quantities, and
    /// their sum for the notional) whatever scale it was read back with, so that one journal
    /// always writes the same text.
    fn order_values(self, o: &OrderRow, decimals: (Option<u8>, Option<u8>)) -> Vec<Val> {
        let (pd, sd) = decimals;
        let at = |d: Dec, scale: Option<u8>| scale.and_then(|s| d.rescale(s)).unwrap_or(d);
        let price_decimals = pd.unwrap_or(0);
        let o = &OrderRow {
            price: o.price.map(|d| at(d, pd)),
            stop_price: o.stop_price.map(|d| at(d, pd)),
            qty: o.qty.map(|d| at(d, sd)),
            filled: at(o.filled, sd),
            leaves: at(o.leaves, sd),
            notional: at(o.notional, pd.zip(sd).map(|(p, s)| p + s)),
            ..o.clone()
        };
        let mut v = vec![
            text(&o.market),
            int(o.oid),
            text(&o.account),
            opt_text(o.cid.as_deref()),
            opt_text(o.side.as_deref()),
            opt_text(o.order_type.as_deref()),
            opt_text(o.tif.as_deref()),
            dec(o.price),
            dec(o.stop_price),
            dec(o.qty),
            dec(Some(o.filled)),
            dec(Some(o.leaves)),
            dec(Some(o.notional)),
            dec(o.avg_price(price_decimals)),
            text(o.status.as_str()),
            opt_text(o.reason.as_deref()),
            int(o.created_seq),
            int(o.updated_seq),
            int(o.created_ts),
            int(o.updated_ts),
        ];
        if self == Dialect::Sqlite {
            let u = |d: Option<Dec>| Val::Int(d.and_then(Dec::units_i64));
            v.extend([u(o.price), u(o.qty), u(Some(o.filled)), u(Some(o.leaves))]);
        }
        v
    }

    fn fills_table(self) -> Table {
        let mut columns = vec![
            "market",
            "trade_id",
            "account",
            "liquidity",
            "oid",
            "cid",
            "side",
            "price",
            "qty",
            "ts",
            "seq",
        ];
        if self == Dialect::Sqlite {
            columns.extend(["price_units", "qty_units"]);
        }
        Table {
            name: "fills",
            keys: &["market", "trade_id", "account", "liquidity"],
            upsert: false,
            columns,
        }
    }

    fn fill_values(self, f: &FillRow) -> Vec<Val> {
        let mut v = vec![
            text(&f.market),
            text(&f.trade_id),
            text(&f.account),
            text(f.liquidity),
            int(f.oid),
            opt_text(f.cid.as_deref()),
            text(&f.side),
            dec(Some(f.price)),
            dec(Some(f.qty)),
            int(f.ts),
            int(f.seq),
        ];
        if self == Dialect::Sqlite {
            v.extend([Val::Int(f.price.units_i64()), Val::Int(f.qty.units_i64())]);
        }
        v
    }

    fn trades_table(self) -> Table {
        let mut columns = vec![
            "market",
            "trade_id",
            "n",
            "price",
            "qty",
            "taker_side",
            "ts",
            "seq",
        ];
        if self == Dialect::Sqlite {
            columns.extend(["price_units", "qty_units"]);
        }
        Table {
            name: "trades",
            keys: &["market", "trade_id"],
            upsert: false,
            columns,
        }
    }

    fn trade_values(self, t: &TradeRow) -> Vec<Val> {
        let mut v = vec![
            text(&t.market),
            text(&t.trade_id),
            int(u64::from(t.n)),
            dec(Some(t.price)),
            dec(Some(t.qty)),
            text(&t.taker_side),
            int(t.ts),
            int(t.seq),
        ];
        if self == Dialect::Sqlite {
            v.extend([Val::Int(t.price.units_i64()), Val::Int(t.qty.units_i64())]);
        }
        v
    }

    fn candles_table(self) -> Table {
        let mut columns = vec![
            "market", "interval", "t", "open", "high", "low", "close", "volume", "trades",
        ];
        if self == Dialect::Sqlite {
            columns.extend([
                "open_units",
                "high_units",
                "low_units",
                "close_units",
                "volume_units",
            ]);
        }
        Table {
            name: "candles",
            keys: &["market", "interval", "t"],
            upsert: true,
            columns,
        }
    }

    fn candle_values(self, c: &CandleRow) -> Vec<Val> {
        let mut v = vec![
            text(&c.market),
            text("1m"),
            Val::Int(Some(c.t)),
            dec(Some(c.open)),
            dec(Some(c.high)),
            dec(Some(c.low)),
            dec(Some(c.close)),
            dec(Some(c.volume)),
            int(c.trades),
        ];
        if self == Dialect::Sqlite {
            for d in [c.open, c.high, c.low, c.close, c.volume] {
                v.push(Val::Int(d.units_i64()));
            }
        }
        v
    }

    fn column_name(self, c: &str) -> String {
        if c == "interval" {
            self.interval_col().to_string()
        } else {
            c.to_string()
        }
    }
}

/// Moves each market's progress row from the `events_seq` this writer expects to the new
/// one, in transaction `$tx`, or fails `Fenced`: the first statements of every write.
macro_rules! fence {
    ($tx:ident, $changes:ident) => {
            for (market, (progress, expected)) in &$changes.progress {
                let pd = progress.price_decimals.map(i64::from);
                let sd = progress.size_decimals.map(i64::from);
                let last = i64::try_from(progress.last_seq).unwrap_or(i64::MAX);
                let events = i64::try_from(progress.events_seq).unwrap_or(i64::MAX);
                let fenced = || StoreError::Fenced { market: market.clone(), expected: *expected };
                match expected {
                    Some(e) => {
                        let mut b = QueryBuilder::new("UPDATE history_progress SET last_seq = ");
                        b.push_bind(last)
                            .push(", events_seq = ").push_bind(events)
                            .push(", price_decimals = ").push_bind(pd)
                            .push(", size_decimals = ").push_bind(sd)
                            .push(" WHERE market = ").push_bind(market.clone())
                            .push(" AND events_seq = ").push_bind(i64::try_from(*e).unwrap_or(i64::MAX));
                        let done = b.build().execute(&mut *$tx).await.map_err(db_err("cannot write history_progress"))?;
                        if done.rows_affected() != 1 {
                            return Err(fenced())
                        }
                    }
                    None => {
                        let mut b = QueryBuilder::new("INSERT INTO history_progress (market, last_seq, events_seq, price_decimals, size_decimals) VALUES (");
                        b.push_bind(market.clone()).push(", ")
                            .push_bind(last).push(", ")
                            .push_bind(events).push(", ")
                            .push_bind(pd).push(", ")
                            .push_bind(sd).push(")");
                        match b.build().execute(&mut *$tx).await {
                            Ok(_) => {}
                            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => return Err(fenced()),
                            Err(e) => return Err(db_err("cannot write history_progress")(e)),
                        }
                    }
                }
            }
    };
}

/// The history database.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    pub dialect: Dialect,
    /// The URL with its password hidden, fit to print.
    pub shown: String,
}

/// `url` with any password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    crate::bus::redact(url)
}

mod meta;

impl Store {
    /// Connects (creating a SQLite file and its directory if missing) and creates the tables
    /// that are missing. Fails at once if the database cannot be reached.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        Store::open_with(url, 1).await
    }

    /// `open`, with room in the pool for `writers` transactions at once besides the
    /// projection's reads, the lag and the queries (PostgreSQL; the others write one at a
    /// time whatever `writers` is).
    pub async fn open_with(url: &str, writers: usize) -> Result<Store, StoreError> {
        let connections = u32::try_from(writers).unwrap_or(64).clamp(1, 64) + 3;
        let dialect = Dialect::of_url(url).map_err(StoreError::Schema)?;
        let shown = redact_url(url);
        let bad_url = |e: sqlx::Error| {
            StoreError::Schema(format!("database URL {shown} cannot be read: {e}"))
        };
        let pool = match dialect {
            Dialect::Sqlite => {
                let path = url.trim_start_matches("sqlite://");
                let path = path.split('?').next().unwrap_or(path);
                if let Some(dir) = std::path::Path::new(path).parent()
                    && !dir.as_os_str().is_empty()
                {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        StoreError::Schema(format!(
                            "cannot create the directory {} for the history database: {e}",
                            dir.display()
                        ))
                    })?;
                }
                // WAL with synchronous = NORMAL: a power cut may lose the last transactions,
                // progress rows with them, so they are written again from the journal.
                let options = SqliteConnectOptions::from_str(url)
                    .map_err(bad_url)?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
                    // An upsert's statement journal in memory, not a temporary file; 64 MiB of
                    // page cache for the indexes a run touches.
                    .pragma("temp_store", "memory")
                    .pragma("cache_size", "-65536")
                    .busy_timeout(Duration::from_millis(500));
                Pool::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(4)
                        .acquire_timeout(Duration::from_secs(5))
                        .connect_with(options)
                        .await
                        .map_err(db_err("refused the connection"))?,
                )
            }
            Dialect::Postgres => Pool::Postgres(
                PgPoolOptions::new()
                    .max_connections(connections)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_with(PgConnectOptions::from_str(url).map_err(bad_url)?)
                    .await
                    .map_err(db_err("refused the connection"))?,
            ),
            Dialect::MySql => Pool::MySql(
                MySqlPoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_with(MySqlConnectOptions::from_str(url).map_err(bad_url)?)
                    .await
                    .map_err(db_err("refused the connection"))?,
            ),
        };
        let store = Store {
            pool,
            dialect,
            shown,
        };
        store.create_tables().await?;
        Ok(store)
    }

    async fn create_tables(&self) -> Result<(), StoreError> {
        for ddl in self.dialect.schema() {
            on_pool!(&self.pool, p => sqlx::query(&ddl).execute(p).await.map(|_| ()))
                .map_err(db_err("cannot create the history tables"))?;
        }
        let version = self.meta("schema_version").await?;
        match version.as_deref().map(str::parse::<i64>) {
            None => {
                self.set_meta("schema_version", &SCHEMA_VERSION.to_string())
                    .await
            }
            Some(Ok(v)) if v == SCHEMA_VERSION => Ok(()),
            Some(Ok(1)) => self.migrate_from_1().await,
            Some(v) => Err(StoreError::Schema(format!(
                "the history database has schema version {v:?}; this build writes {SCHEMA_VERSION}: use the build that wrote it, or --rebuild into a new database"
            ))),
        }
    }

    /// Every market's progress.
    pub async fn progress(
        &self,
    ) -> Result<std::collections::HashMap<String, Progress>, StoreError> {
        let sql = "SELECT market, last_seq, events_seq, price_decimals, size_decimals FROM history_progress";
        let rows: Vec<ProgressCells> = on_pool!(&self.pool, p => {
            sqlx::query(sql).fetch_all(p).await.and_then(|rows| {
                rows.iter()
                    .map(|r| {
                        Ok((
                            r.try_get_unchecked("market")?,
                            r.try_get("last_seq")?,
                            r.try_get("events_seq")?,
                            r.try_get("price_decimals")?,
                            r.try_get("size_decimals")?,
                        ))
                    })
                    .collect()
            })
        })
        .map_err(db_err("cannot read history_progress"))?;
        Ok(rows
            .into_iter()
            .map(|(m, last, events, pd, sd)| {
                (
                    m,
                    Progress {
                        last_seq: u64::try_from(last).unwrap_or(0),
                        events_seq: u64::try_from(events).unwrap_or(0),
                        price_decimals: pd.and_then(|d| u8::try_from(d).ok()),
                        size_decimals: sd.and_then(|d| u8::try_from(d).ok()),
                    },
                )
            })
            .collect())
    }

    /// The rows of these orders of `market` that the database has.
    pub async fn orders(
        &self,
        market: &str,
        oids: &[u64],
        progress: Option<&Progress>,
    ) -> Result<Vec<OrderRow>, StoreError> {
        let mut out = Vec::new();
        for chunk in oids.chunks(ROWS_PER_STATEMENT) {
            let select = self.order_select();
            let rows: Vec<RawOrder> = on_pool!(&self.pool, p => {
                let mut b = QueryBuilder::new(format!("{select} WHERE market = "));
                b.push_bind(market.to_string()).push(" AND oid IN (");
                let mut sep = b.separated(", ");
                for oid in chunk {
                    sep.push_bind(i64::try_from(*oid).unwrap_or(i64::MAX));
                }
                b.push(")");
                b.build().fetch_all(p).await.and_then(|rows| rows.iter().map(RawOrder::read).collect())
            })
            .map_err(db_err("cannot read orders"))?;
            for raw in rows {
                out.push(raw.into_row(progress)?);
            }
        }
        Ok(out)
    }

    /// The column list of an order read back (decimals as text).
    pub fn order_select(&self) -> String {
        let d = |c: &str| self.dialect.dec_text(c);
        format!(
            "SELECT market, oid, account, cid, side, order_type, tif, {}, {}, {}, {}, {}, {}, {}, status, reason, created_seq, updated_seq, created_ts, updated_ts FROM orders",
            d("price"),
            d("stop_price"),
            d("qty"),
            d("filled"),
            d("leaves"),
            d("notional"),
            d("avg_price"),
        )
    }

    /// These candles (`1m`) if the database has them.
    pub async fn candles(&self, keys: &[(String, i64)]) -> Result<Vec<CandleRow>, StoreError> {
        let mut out = Vec::new();
        let iv = self.dialect.interval_col();
        let d = |c: &str| self.dialect.dec_text(c);
        let select = format!(
            "SELECT market, t, {}, {}, {}, {}, {}, trades FROM candles WHERE {iv} = '1m' AND ",
            d("open"),
            d("high"),
            d("low"),
            d("close"),
            d("volume")
        );
        for (market, t) in keys {
            let row: Option<CandleCells> = on_pool!(&self.pool, p => {
                let mut b = QueryBuilder::new(select.as_str());
                b.push("market = ").push_bind(market.clone()).push(" AND t = ").push_bind(*t);
                b.build().fetch_optional(p).await.and_then(|r| r.map(|r| Ok::<_, sqlx::Error>((
                    r.try_get_unchecked("market")?,
                    r.try_get("t")?,
                    [r.try_get("open")?, r.try_get("high")?, r.try_get("low")?, r.try_get("close")?, r.try_get("volume")?],
                    r.try_get("trades")?,
                ))).transpose())
            })
            .map_err(db_err("cannot read candles"))?;
            if let Some((market, t, [o, h, l, c, v], trades)) = row {
                let p = |s: &str| {
                    Dec::parse(s.trim()).ok_or_else(|| {
                        StoreError::Schema(format!("candle value {s:?} is not a decimal"))
                    })
                };
                out.push(CandleRow {
                    market,
                    t,
                    open: p(&o)?,
                    high: p(&h)?,
                    low: p(&l)?,
                    close: p(&c)?,
                    volume: p(&v)?,
                    trades: u64::try_from(trades).unwrap_or(0),
                });
            }
        }
        Ok(out)
    }

    /// Writes `changes` in one transaction: progress first (the fence), then the rows.
    pub async fn write(&self, changes: &Changes) -> Result<(), StoreError> {
        let dialect = self.dialect;
        let decimals = |market: &str| {
            changes
                .progress
                .get(market)
                .map_or((None, None), |(p, _)| (p.price_decimals, p.size_decimals))
        };
        // Values are made a statement at a time: a run's rows are never all held as values.
        let orders: Vec<&OrderRow> = changes.orders.values().collect();
        let candles: Vec<&CandleRow> = changes.candles.values().collect();
        let counts = [
            orders.len(),
            changes.fills.len(),
            changes.trades.len(),
            candles.len(),
        ];
        let values = |table: usize, range: std::ops::Range<usize>| -> Vec<Vec<Val>> {
            match table {
                0 => orders[range]
                    .iter()
                    .map(|o| dialect.order_values(o, decimals(&o.market)))
                    .collect(),
                1 => changes.fills[range]
                    .iter()
                    .map(|f| dialect.fill_values(f))
                    .collect(),
                2 => changes.trades[range]
                    .iter()
                    .map(|t| dialect.trade_values(t))
                    .collect(),
                _ => candles[range]
                    .iter()
                    .map(|c| dialect.candle_values(c))
                    .collect(),
            }
        };
        let tables = [
            dialect.orders_table(),
            dialect.fills_table(),
            dialect.trades_table(),
            dialect.candles_table(),
        ];
        let pg = dialect == Dialect::Postgres;
        if let Pool::Postgres(p) = &self.pool {
            // PostgreSQL: each table's rows as one array a column, unnested (a few binds a
            // statement instead of one a value: the fast path short of COPY, and it upserts).
            let mut tx = p
                .begin()
                .await
                .map_err(db_err("cannot begin a transaction"))?;
            // The commit need not wait for the server's disk: a transaction a crash of the
            // server loses takes its progress rows with it, so the journal writes it again.
            sqlx::query("SET LOCAL synchronous_commit = off")
                .execute(&mut *tx)
                .await
                .map_err(db_err("cannot begin a transaction"))?;
            fence!(tx, changes);
            for (t, table) in tables.iter().enumerate() {
                if counts[t] == 0 {
                    continue;
                }
                let columns: Vec<String> = table
                    .columns
                    .iter()
                    .map(|c| dialect.column_name(c))
                    .collect();
                let tail = if table.upsert {
                    dialect.upsert_clause(table)
                } else {
                    String::new()
                };
                for start in (0..counts[t]).step_by(PG_ROWS_PER_STATEMENT) {
                    let rows = values(t, start..(start + PG_ROWS_PER_STATEMENT).min(counts[t]));
                    let width = rows.first().map_or(0, Vec::len);
                    let mut ints: Vec<Option<Vec<Option<i64>>>> = vec![None; width];
                    let mut texts: Vec<Option<Vec<Option<String>>>> = vec![None; width];
                    let mut kinds = vec![""; width];
                    for row in rows {
                        for (i, v) in row.into_iter().enumerate() {
                            match v {
                                Val::Int(x) => {
                                    kinds[i] = "bigint";
                                    ints[i].get_or_insert_with(Vec::new).push(x);
                                }
                                Val::Text(x) => {
                                    kinds[i] = "text";
                                    texts[i].get_or_insert_with(Vec::new).push(x);
                                }
                                Val::Dec(x) => {
                                    kinds[i] = "numeric";
                                    texts[i].get_or_insert_with(Vec::new).push(x);
                                }
                            }
                        }
                    }
                    let mut b = QueryBuilder::<sqlx::Postgres>::new(format!(
                        "INSERT INTO {} ({}) SELECT * FROM UNNEST(",
                        table.name,
                        columns.join(", ")
                    ));
                    for i in 0..width {
                        if i > 0 {
                            b.push(", ");
                        }
                        match kinds[i] {
                            "bigint" => {
                                b.push_bind(ints[i].take().unwrap_or_default())
                                    .push("::bigint[]");
                            }
                            "numeric" => {
                                b.push_bind(texts[i].take().unwrap_or_default())
                                    .push("::text[]::numeric[]");
                            }
                            _ => {
                                b.push_bind(texts[i].take().unwrap_or_default())
                                    .push("::text[]");
                            }
                        }
                    }
                    b.push(")");
                    b.push(tail.as_str());
                    b.build().execute(&mut *tx).await.map_err(|e| match e {
                        sqlx::Error::Database(e) if e.is_unique_violation() => StoreError::Fenced {
                            market: "?".into(),
                            expected: None,
                        },
                        e => db_err("cannot write rows")(e),
                    })?;
                }
            }
            return tx.commit().await.map_err(db_err("cannot commit"));
        }
        on_pool!(&self.pool, p => {
            let mut tx = p.begin().await.map_err(db_err("cannot begin a transaction"))?;
            fence!(tx, changes);
            for (t, table) in tables.iter().enumerate() {
                let columns: Vec<String> = table.columns.iter().map(|c| dialect.column_name(c)).collect();
                let head = format!("INSERT INTO {} ({}) ", table.name, columns.join(", "));
                let tail = if table.upsert { dialect.upsert_clause(table) } else { String::new() };
                for start in (0..counts[t]).step_by(ROWS_PER_STATEMENT) {
                    let chunk = values(t, start..(start + ROWS_PER_STATEMENT).min(counts[t]));
                    let mut b = QueryBuilder::new(head.as_str());
                    b.push_values(chunk, |mut sep, row| {
                        for v in row {
                            match v {
                                Val::Int(i) => { sep.push_bind(i); }
                                Val::Text(s) => { sep.push_bind(s); }
                                Val::Dec(s) if pg => {
                                    sep.push("CAST(").push_bind_unseparated(s).push_unseparated(" AS NUMERIC)");
                                }
                                Val::Dec(s) => { sep.push_bind(s); }
                            }
                        }
                    });
                    b.push(tail.as_str());
                    b.build().execute(&mut *tx).await.map_err(|e| match e {
                        sqlx::Error::Database(e) if e.is_unique_violation() => StoreError::Fenced { market: "?".into(), expected: None },
                        e => db_err("cannot write rows")(e),
                    })?;
                }
            }
            tx.commit().await.map_err(db_err("cannot commit"))
        })
    }

    /// Empties every table but `history_meta` (for `--rebuild`).
    pub async fn clear(&self) -> Result<(), StoreError> {
        on_pool!(&self.pool, p => {
            let mut tx = p.begin().await.map_err(db_err("cannot begin a transaction"))?;
            for t in ["orders", "fills", "trades", "candles", "history_progress"] {
                sqlx::query(&format!("DELETE FROM {t}")).execute(&mut *tx).await.map_err(db_err("cannot empty the tables"))?;
            }
            sqlx::query(&format!("DELETE FROM history_meta WHERE name = '{READ_THROUGH}'")).execute(&mut *tx).await.map_err(db_err("cannot empty the tables"))?;
            tx.commit().await.map_err(db_err("cannot commit"))
        })
    }

    /// Whether the database answers now.
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_pool!(&self.pool, p => sqlx::query("SELECT 1").execute(p).await.map(|_| ()))
            .map_err(db_err("unreachable"))
    }

    /// Runs `sql` with `binds` and returns the rows as strings and integers, column by
    /// column, for the queries (`query.rs`), which build their SQL from this module's dialect.
    pub async fn select(&self, sql: &str, binds: &[Bind]) -> Result<Vec<Vec<Cell>>, StoreError> {
        on_pool!(&self.pool, p => {
            let mut b = QueryBuilder::new("");
            let mut parts = sql.split('?');
            if let Some(first) = parts.next() {
                b.push(first);
            }
            for (i, part) in parts.enumerate() {
                match binds.get(i) {
                    Some(Bind::Int(v)) => { b.push_bind(*v); }
                    Some(Bind::Text(v)) => { b.push_bind(v.clone()); }
                    None => { b.push_bind(None::<i64>); }
                }
                b.push(part);
            }
            b.build().fetch_all(p).await.and_then(|rows| {
                rows.iter().map(|r| {
                    (0..r.len()).map(|i| {
                        if let Ok(v) = r.try_get::<Option<i64>, _>(i) {
                            return Ok(v.map_or(Cell::Null, Cell::Int));
                        }
                        // Decimals are selected as text (`dec_text`), so what is not an integer
                        // is text (read unchecked: the module doc).
                        r.try_get_unchecked::<Option<String>, _>(i).map(|v| v.map_or(Cell::Null, Cell::Text))
                    }).collect::<Result<Vec<_>, sqlx::Error>>()
                }).collect::<Result<Vec<_>, sqlx::Error>>()
            })
        })
        .map_err(db_err("query failed"))
    }
}

/// A progress row as read.
type ProgressCells = (String, i64, i64, Option<i64>, Option<i64>);

/// A candle as read: market, t, open/high/low/close/volume as text, trades.
type CandleCells = (String, i64, [String; 5], i64);

/// A value bound into a query (`Store::select`).
#[derive(Clone, Debug)]
pub enum Bind {
    Int(i64),
    Text(String),
}

/// A value read by `Store::select`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cell {
    Null,
    Int(i64),
    Text(String),
}

impl Cell {
    pub fn text(&self) -> Option<&str> {
        match self {
            Cell::Text(s) => Some(s),
            _ => None,
        }
    }

    pub fn int(&self) -> Option<i64> {
        match self {
            Cell::Int(i) => Some(*i),
            Cell::Text(s) => s.parse().ok(),
            Cell::Null => None,
        }
    }
}

/// An order row as read, before its decimals are checked.
struct RawOrder {
    market: String,
    oid: i64,
    account: String,
    cid: Option<String>,
    side: Option<String>,
    order_type: Option<String>,
    tif: Option<String>,
    decs: [Option<String>; 7],
    status: String,
    reason: Option<String>,
    seqs: [i64; 4],
}

impl RawOrder {
    fn read<R: Row>(r: &R) -> Result<RawOrder, sqlx::Error>
    where
        for<'a> &'a str: sqlx::ColumnIndex<R>,
        for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
        for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
        for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    {
        Ok(RawOrder {
            market: r.try_get_unchecked("market")?,
            oid: r.try_get("oid")?,
            account: r.try_get_unchecked("account")?,
            cid: r.try_get_unchecked("cid")?,
            side: r.try_get_unchecked("side")?,
            order_type: r.try_get_unchecked("order_type")?,
            tif: r.try_get_unchecked("tif")?,
            decs: [
                r.try_get("price")?,
                r.try_get("stop_price")?,
                r.try_get("qty")?,
                r.try_get("filled")?,
                r.try_get("leaves")?,
                r.try_get("notional")?,
                r.try_get("avg_price")?,
            ],
            status: r.try_get_unchecked("status")?,
            reason: r.try_get_unchecked("reason")?,
            seqs: [
                r.try_get("created_seq")?,
                r.try_get("updated_seq")?,
                r.try_get("created_ts")?,
                r.try_get("updated_ts")?,
            ],
        })
    }

    fn into_row(self, progress: Option<&Progress>) -> Result<OrderRow, StoreError> {
        let pd = progress.and_then(|p| p.price_decimals);
        let sd = progress.and_then(|p| p.size_decimals);
        let read = |s: &Option<String>, scale: Option<u8>| -> Result<Option<Dec>, StoreError> {
            s.as_deref()
                .map(|s| {
                    let s = match scale {
                        Some(scale) => with_scale(s, scale),
                        None => s.trim().to_string(),
                    };
                    Dec::parse(&s).ok_or_else(|| {
                        StoreError::Schema(format!("orders holds {s:?} where a decimal belongs"))
                    })
                })
                .transpose()
        };
        let notional_scale = pd.zip(sd).map(|(p, s)| p + s);
        let [price, stop, qty, filled, leaves, notional, _avg] = &self.decs;
        let u = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(OrderRow {
            market: self.market,
            oid: u(self.oid),
            account: self.account,
            cid: self.cid,
            side: self.side,
            order_type: self.order_type,
            tif: self.tif,
            price: read(price, pd)?,
            stop_price: read(stop, pd)?,
            qty: read(qty, sd)?,
            filled: read(filled, sd)?.unwrap_or(Dec::zero(0)),
            leaves: read(leaves, sd)?.unwrap_or(Dec::zero(0)),
            notional: read(notional, notional_scale)?.unwrap_or(Dec::zero(0)),
            status: Status::parse(&self.status).ok_or_else(|| {
                StoreError::Schema(format!("orders holds status {:?}", self.status))
            })?,
            reason: self.reason,
            created_seq: u(self.seqs[0]),
            updated_seq: u(self.seqs[1]),
            created_ts: u(self.seqs[2]),
            updated_ts: u(self.seqs[3]),
        })
    }
}

/// Random bytes from the kernel (the store's id), without a crate for it.
fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    let filled = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(buf));
    if filled.is_err() {
        // No /dev/urandom: the time is unique enough for a database's id.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (nanos >> (8 * (i % 16))) as u8;
        }
    }
}
