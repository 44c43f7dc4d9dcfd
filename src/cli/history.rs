//! `agora history`: runs the history process (the journal projected into a database), or,
//! with a subcommand, asks its queries and prints JSON lines.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};

use agora::client::Client;
use agora::config::{Config, Overrides};
use agora::telemetry::traces;

use crate::{ConnectArgs, print_json, shutdown_signal};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct HistoryArgs {
    #[command(subcommand)]
    query: Option<HistoryCmd>,
    /// Configuration file (TOML), over the built-in defaults ([history] and the NATS keys).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// sqlite://PATH, postgres://USER:PASSWORD@HOST:PORT/DB or mysql://USER:PASSWORD@HOST:PORT/DB
    /// [default: sqlite://<data_dir>/history.db]. AGORA_HISTORY__DATABASE keeps a password out
    /// of the process list.
    #[arg(long, value_name = "URL")]
    database: Option<String>,
    /// NATS URL(s), comma-separated [default: the embedded server of a node in the same data
    /// dir, else nats://127.0.0.1:4222].
    #[arg(long, value_name = "URL")]
    nats_url: Option<String>,
    /// The data directory (the default database lives there).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Serve /metrics, /health and /ready on this HTTP port (0: off).
    #[arg(long, value_name = "PORT")]
    http_port: Option<u16>,
    /// Empty the tables and write them again from the start of the journal (also: fill a new
    /// database, such as PostgreSQL after SQLite).
    #[arg(long)]
    rebuild: bool,
    /// Log format on standard error: text or json.
    #[arg(long, env = "AGORA_LOG_FORMAT", value_name = "FORMAT", default_value = "text",
          value_parser = ["text", "json"])]
    log_format: String,
}

/// A time for --from/--to: nanoseconds since the epoch, or RFC 3339.
#[derive(Clone, Copy, Debug)]
struct Nanos(u64);

impl std::str::FromStr for Nanos {
    type Err = String;
    fn from_str(s: &str) -> Result<Nanos, String> {
        if let Ok(n) = s.parse::<u64>() {
            return Ok(Nanos(n));
        }
        async_nats::datetime::parse_rfc3339(s)
            .ok()
            .and_then(|t| u64::try_from(t.unix_timestamp_nanos()).ok())
            .map(Nanos)
            .ok_or_else(|| {
                format!("{s:?} is neither nanoseconds since the epoch nor an RFC 3339 time (such as 2026-12-05T09:30:00Z)")
            })
    }
}

#[derive(Args)]
struct RangeArgs {
    /// From this time on (nanoseconds since the epoch, or RFC 3339).
    #[arg(long, value_name = "TIME")]
    from: Option<Nanos>,
    /// Up to this time (nanoseconds since the epoch, or RFC 3339).
    #[arg(long, value_name = "TIME")]
    to: Option<Nanos>,
}

/// What `agora history orders` and `agora history fills` ask: one account's history.
#[derive(Args)]
struct AccountRange {
    #[arg(long, env = "AGORA_ACCOUNT")]
    account: String,
    #[arg(long)]
    market: Option<String>,
    #[command(flatten)]
    range: RangeArgs,
    /// Most items to print.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Subcommand)]
enum HistoryCmd {
    /// An account's orders, open and closed, newest first.
    Orders(AccountRange),
    /// An account's fills (one per side it traded), newest first.
    Fills(AccountRange),
    /// A market's public trades, newest first.
    Trades {
        #[arg(long)]
        market: String,
        #[command(flatten)]
        range: RangeArgs,
        /// Most trades to print.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// A market's candles (open, high, low, close, volume), oldest first.
    Candles {
        #[arg(long)]
        market: String,
        /// 1m, 5m, 1h or 1d.
        #[arg(long, default_value = "1m")]
        interval: String,
        #[command(flatten)]
        range: RangeArgs,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// A market's last price, last 24 hours and best bid and ask.
    Ticker {
        #[arg(long)]
        market: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

/// `agora history`'s default log filter.
const HISTORY_LOG_DEFAULT: &str = "warn,async_nats=error,sqlx=warn";

pub fn history_cmd(args: HistoryArgs) -> Result<()> {
    if let Some(query) = args.query {
        return history_query_cmd(query);
    }
    let overrides = Overrides {
        nats_url: args.nats_url,
        data_dir: args.data_dir,
        ..Overrides::default()
    };
    let mut config = Config::load(args.config.as_deref(), &overrides)?;
    if let Some(db) = args.database {
        config.history.database = db;
    }
    if let Some(port) = args.http_port {
        config.history.http_port = port;
    }
    config.history.check().map_err(anyhow::Error::msg)?;
    actix_rt::System::new().block_on(async move {
        let format = traces::LogFormat::parse(&args.log_format).unwrap_or_default();
        let mut tracing_config = config.tracing.clone();
        tracing_config.service_name = "agora-history".into();
        let tracing = traces::init_with(&tracing_config, Some(HISTORY_LOG_DEFAULT), format)
            .map_err(anyhow::Error::msg)?;
        let result = agora::history::run(config, args.rebuild, shutdown_signal()).await;
        tracing.shutdown().await;
        Ok::<_, anyhow::Error>(result?)
    })
}

/// How long a history query may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks a history query (`<prefix>.query.<what>`) and prints the items of `list`, page after
/// page until `limit` are printed or there is no `next`.
async fn history_pages(
    client: &Client,
    what: &str,
    mut body: serde_json::Value,
    list: &str,
    limit: usize,
) -> Result<()> {
    let mut printed = 0;
    loop {
        let page = (limit - printed).min(agora::history::query::LIMIT_MAX);
        body["limit"] = page.into();
        let reply = client.ask_history(what, &body, ASK_TIMEOUT).await?;
        let items = reply[list].as_array().cloned().unwrap_or_default();
        for item in items.iter().take(limit - printed) {
            print_json(item)?;
        }
        printed += items.len().min(limit - printed);
        match reply.get("next") {
            Some(next) if !next.is_null() && printed < limit && !items.is_empty() => {
                body["before"] = next.clone();
            }
            _ => return Ok(()),
        }
    }
}

/// Prints an account's `list` ("orders" or "fills") from its history query.
async fn account_history(asked: AccountRange, list: &str) -> Result<()> {
    let client = asked.connect.client().await?;
    let mut body = range_body(&asked.range);
    if let Some(m) = asked.market {
        body["market"] = m.into();
    }
    let what = format!("{}.history", asked.account);
    history_pages(&client, &what, body, list, asked.limit).await
}

/// The `from`/`to` of a query body.
fn range_body(r: &RangeArgs) -> serde_json::Value {
    let mut v = serde_json::json!({});
    if let Some(f) = r.from {
        v["from"] = f.0.into();
    }
    if let Some(t) = r.to {
        v["to"] = t.0.into();
    }
    v
}

fn history_query_cmd(cmd: HistoryCmd) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cmd {
            HistoryCmd::Orders(asked) => account_history(asked, "orders").await,
            HistoryCmd::Fills(asked) => account_history(asked, "fills").await,
            HistoryCmd::Trades {
                market,
                range: r,
                limit,
                connect,
            } => {
                let client = connect.client().await?;
                let what = format!("trades.{market}");
                history_pages(&client, &what, range_body(&r), "trades", limit).await
            }
            HistoryCmd::Candles {
                market,
                interval,
                range: r,
                connect,
            } => {
                let client = connect.client().await?;
                let mut body = range_body(&r);
                body["interval"] = interval.into();
                let what = format!("candles.{market}");
                let reply = client.ask_history(&what, &body, ASK_TIMEOUT).await?;
                for c in reply["candles"].as_array().into_iter().flatten() {
                    print_json(c)?;
                }
                Ok(())
            }
            HistoryCmd::Ticker { market, connect } => {
                let client = connect.client().await?;
                let what = format!("ticker.{market}");
                let reply = client
                    .ask_history(&what, &serde_json::json!({}), ASK_TIMEOUT)
                    .await?;
                print_json(&reply)
            }
        }
    })
}
