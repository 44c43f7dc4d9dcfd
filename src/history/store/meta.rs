//! `history_meta`: the database's schema version (and the conversion from version 1), its id,
//! and `read_through`, the journal position every market is written through.

use sqlx::{QueryBuilder, Row};

use super::{
    Dialect, Pool, READ_THROUGH, SCHEMA_VERSION, Store, StoreError, TABLES, db_err, getrandom,
};

impl Store {
    /// Schema 1 left text columns in the database's default collation, which on MySQL and
    /// MariaDB ignores case (a query for `alice` found `Alice`'s orders too; a lookup by cid
    /// `k-1` found `K-1`). Converts every text column to the byte-for-byte collation of
    /// schema 2, in place: no row is lost or merged, since a binary collation tells apart
    /// everything the old one did. Rewrites the tables (MySQL) or their indexes (PostgreSQL),
    /// so a big database takes a while once; two processes opening it together may both
    /// convert it, and converting twice changes nothing more.
    pub(super) async fn migrate_from_1(&self) -> Result<(), StoreError> {
        let statements: Vec<String> = match &self.pool {
            Pool::Sqlite(_) => Vec::new(),
            Pool::MySql(_) => TABLES
                .iter()
                .map(|t| {
                    format!("ALTER TABLE {t} CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
                })
                .collect(),
            Pool::Postgres(p) => {
                let columns: Vec<(String, String)> = sqlx::query_as(
                    "SELECT table_name::text, column_name::text FROM information_schema.columns WHERE table_schema = current_schema() AND data_type = 'text' AND table_name = ANY($1) AND collation_name IS DISTINCT FROM 'C' ORDER BY table_name, ordinal_position",
                )
                .bind(TABLES.map(String::from).to_vec())
                .fetch_all(p)
                .await
                .map_err(db_err("cannot read the history tables' columns"))?;
                let mut by_table: Vec<(String, Vec<String>)> = Vec::new();
                for (table, column) in columns {
                    let change = format!("ALTER COLUMN \"{column}\" TYPE TEXT COLLATE \"C\"");
                    match by_table.last_mut() {
                        Some((t, changes)) if *t == table => changes.push(change),
                        _ => by_table.push((table, vec![change])),
                    }
                }
                by_table
                    .into_iter()
                    .map(|(table, changes)| format!("ALTER TABLE {table} {}", changes.join(", ")))
                    .collect()
            }
        };
        // A warning, so that it shows at `agora history`'s default level: on a big MySQL
        // database the start waits for this.
        tracing::warn!(
            database = %self.shown,
            tables = statements.len(),
            "converting the history database from schema 1 to 2 (text compared byte for byte); a big database takes a while"
        );
        for sql in &statements {
            on_pool!(&self.pool, p => sqlx::query(sql).execute(p).await.map(|_| ()))
                .map_err(db_err("cannot convert the history tables to schema 2"))?;
        }
        let sql = "UPDATE history_meta SET value = ";
        on_pool!(&self.pool, p => {
            let mut b = QueryBuilder::new(sql);
            b.push_bind(SCHEMA_VERSION.to_string())
                .push(" WHERE name = ")
                .push_bind("schema_version")
                .push(" AND value = ")
                .push_bind("1");
            b.build().execute(p).await.map(|_| ())
        })
        .map_err(db_err("cannot write history_meta"))
    }

    pub(super) async fn meta(&self, name: &str) -> Result<Option<String>, StoreError> {
        let sql = "SELECT value FROM history_meta WHERE name = ";
        on_pool!(&self.pool, p => {
            let mut b = QueryBuilder::new(sql);
            b.push_bind(name.to_string());
            b.build().fetch_optional(p).await.and_then(|r| r.map(|r| r.try_get_unchecked::<String, _>("value")).transpose())
        })
        .map_err(db_err("cannot read history_meta"))
    }

    /// Sets `name` unless it is set already (two processes starting together agree).
    pub(super) async fn set_meta(&self, name: &str, value: &str) -> Result<(), StoreError> {
        let sql = match self.dialect {
            Dialect::MySql => "INSERT IGNORE INTO history_meta (name, value) VALUES (",
            _ => "INSERT INTO history_meta (name, value) VALUES (",
        };
        let tail = match self.dialect {
            Dialect::MySql => ")",
            _ => ") ON CONFLICT (name) DO NOTHING",
        };
        on_pool!(&self.pool, p => {
            let mut b = QueryBuilder::new(sql);
            b.push_bind(name.to_string()).push(", ").push_bind(value.to_string()).push(tail);
            b.build().execute(p).await.map(|_| ())
        })
        .map_err(db_err("cannot write history_meta"))
    }

    /// This database's id, made once: the writer's lease and consumer are named after it, so
    /// two processes on one database share them and two databases never do.
    pub async fn store_id(&self) -> Result<String, StoreError> {
        if let Some(id) = self.meta("store_id").await? {
            return Ok(id);
        }
        let mut bytes = [0u8; 8];
        getrandom(&mut bytes);
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        self.set_meta("store_id", &id).await?;
        self.meta("store_id")
            .await?
            .ok_or_else(|| StoreError::Schema("history_meta lost its store_id".into()))
    }

    /// The journal position every market is written through (`history_meta`
    /// `read_through`): the writer reads on from the message after it. Set to `fallback`
    /// (the highest `events_seq` written: what a database written one transaction a run
    /// implies) when the database has none yet.
    pub async fn read_through(&self, fallback: u64) -> Result<u64, StoreError> {
        if self.meta(READ_THROUGH).await?.is_none() {
            self.set_meta(READ_THROUGH, &fallback.to_string()).await?;
        }
        let value = self.meta(READ_THROUGH).await?.unwrap_or_default();
        value.parse().map_err(|_| {
            StoreError::Schema(format!(
                "history_meta {READ_THROUGH} is {value:?}, not a journal sequence: --rebuild into a new database"
            ))
        })
    }

    /// Moves `read_through` from `from` to `to`, once every market's rows up to `to` are
    /// committed. Fenced like the progress rows: `Fenced` when another writer (or a rebuild)
    /// moved it meanwhile.
    pub async fn advance_read_through(&self, from: u64, to: u64) -> Result<(), StoreError> {
        let sql = "UPDATE history_meta SET value = ";
        let done = on_pool!(&self.pool, p => {
            let mut b = QueryBuilder::new(sql);
            b.push_bind(to.to_string())
                .push(" WHERE name = ")
                .push_bind(READ_THROUGH)
                .push(" AND value = ")
                .push_bind(from.to_string());
            b.build().execute(p).await.map(|r| r.rows_affected())
        })
        .map_err(db_err("cannot write history_meta"))?;
        if done == 1 {
            Ok(())
        } else {
            Err(StoreError::Fenced {
                market: format!("history_meta {READ_THROUGH}"),
                expected: Some(from),
            })
        }
    }
}
