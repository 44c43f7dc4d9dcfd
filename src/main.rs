//! The `agora` command: `node` runs a node of the runtime; `ctl`, `order` and `watch` talk to
//! it; `bench` measures one end to end through NATS; `replay` drives a book offline from a
//! command file; `generate` writes seeded, realistic order flow as such a file. This file parses
//! arguments, reports errors and sets the allocator; it must never hold logic that a library
//! module could own and test; `agora history` has its own file (cli/history.rs).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use figment::Figment;
use figment::providers::{Format, Toml};

use agora::book::reference::ReferenceBook;
use agora::book::{MarketSpec, MarketSpecInput, OrderBook, Side};
use agora::config::{Config, Overrides};
use agora::telemetry::traces;
use agora::wire::WireBook;
use agora::workload::{self, FlowParams};
use agora::{node, replay};

mod cli {
    pub mod history;
}
use cli::history::{HistoryArgs, history_cmd};

/// mimalloc instead of glibc's malloc: the node allocates and frees small buffers per message
/// (decoded commands, events, encoded outputs), where glibc's malloc, free and consolidation
/// took about 15% of its CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "agora",
    version = agora::VERSION,
    about = "A matching runtime for exchanges"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once, at start
enum Cmd {
    /// Run a node: markets consume their order streams on NATS and publish journal, reports,
    /// trades and book updates. Without a NATS URL it starts its own nats-server.
    Node(NodeArgs),
    /// Send a control request (`agora.ctl.<verb>`) to the nodes and print the reply as JSON.
    Ctl(CtlArgs),
    /// Measure a node end to end through NATS (publish to execution report) against the raw
    /// JetStream ceiling of the machine; the node runs as a child process.
    Bench(BenchArgs),
    /// Send an order command (place, cancel, amend, cancel-all) and print its reports.
    #[command(subcommand)]
    Order(OrderCmd),
    /// Print an account's open orders (resting and untriggered stops) in every market, or in
    /// one, as JSON lines, from the books themselves.
    Orders(OrdersArgs),
    /// Print a stream of execution reports, trades or book updates as JSON lines.
    #[command(subcommand)]
    Watch(WatchCmd),
    /// Project the journal into a database (SQLite by default, PostgreSQL, MySQL) and answer
    /// the history queries; with a subcommand, ask those queries and print JSON lines.
    History(HistoryArgs),
    /// Apply a file of JSON-lines commands to one book, offline; print every event as JSON.
    Replay(ReplayArgs),
    /// Write seeded, realistic order flow as a JSON-lines command file.
    Generate(GenerateArgs),
}

#[derive(Args)]
struct MarketArgs {
    /// Market spec file (TOML with the fields of a market spec); overrides the flags below.
    #[arg(long, value_name = "FILE.toml")]
    market: Option<PathBuf>,
    #[arg(long, default_value = "REPLAY")]
    symbol: String,
    #[arg(long, default_value_t = 2)]
    price_decimals: u8,
    #[arg(long, default_value_t = 0)]
    size_decimals: u8,
    #[arg(long, default_value = "0.01")]
    tick_size: String,
    #[arg(long, default_value = "1")]
    lot_size: String,
}

impl MarketArgs {
    fn spec(&self) -> Result<MarketSpec> {
        let input: MarketSpecInput = match &self.market {
            Some(path) => {
                if !path.exists() {
                    bail!("market file {} does not exist", path.display());
                }
                Figment::from(Toml::file(path)).extract().with_context(|| {
                    format!("market file {} is not a valid market spec", path.display())
                })?
            }
            None => MarketSpecInput {
                tick_size: Some(self.tick_size.clone()),
                lot_size: Some(self.lot_size.clone()),
                ..MarketSpecInput::new(&self.symbol, self.price_decimals, self.size_decimals)
            },
        };
        input
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid market spec: {e} (field {})", e.field))
    }
}

#[derive(Args)]
struct NodeArgs {
    /// Configuration file (TOML), over the built-in defaults.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// NATS URL(s), comma-separated; empty: start a local nats-server.
    #[arg(long, value_name = "URL")]
    nats_url: Option<String>,
    /// This node's id (default: generated once and kept in the data dir).
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
    /// Where the node keeps its id and, in embedded mode, the NATS data.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Serve /metrics (Prometheus), /health (liveness) and /ready (readiness) on this HTTP
    /// port (0: off).
    #[arg(long, value_name = "PORT")]
    http_port: Option<u16>,
    /// The address the HTTP port binds [default: 0.0.0.0, every interface].
    #[arg(long, value_name = "IP")]
    http_addr: Option<String>,
    /// How the log on standard error is written: text (coloured only on a terminal, never
    /// with NO_COLOR set) or json (one object a line, for log shippers). AGORA_LOG sets the
    /// filter (default: warnings, and what the node runs and where on standard output).
    #[arg(long, env = "AGORA_LOG_FORMAT", value_name = "FORMAT", default_value = "text",
          value_parser = ["text", "json"])]
    log_format: String,
}

#[derive(Args)]
struct CtlArgs {
    #[command(subcommand)]
    verb: CtlVerb,
    #[command(flatten)]
    connect: ConnectArgs,
    /// How long to wait for the reply. A request not answered in time is never carried out
    /// later (it carries this deadline; nodes drop it once past); read-only verbs are tried
    /// again within it, in case one node was stalled.
    #[arg(long, default_value_t = 60, global = true, value_name = "SECS")]
    timeout_secs: u64,
}

/// The control verbs (`agora.ctl.<VERB>`); `agora ctl <VERB> --help` says what each takes.
#[derive(Subcommand)]
enum CtlVerb {
    /// Add a market: creates its stream, stores its spec, places it on a node, answers once
    /// it takes orders.
    #[command(name = "market.add")]
    MarketAdd {
        /// The market spec (TOML with the fields of a market spec, as in config/markets/).
        #[arg(long, value_name = "FILE.toml")]
        spec: PathBuf,
    },
    /// Change a market's spec (tick, lot, min/max qty, price band, STP default); the change
    /// is sequenced with the orders through the market's stream, so replays agree.
    #[command(name = "market.update")]
    MarketUpdate {
        /// The new spec (TOML, the same symbol and decimals as the market's).
        #[arg(long, value_name = "FILE.toml")]
        spec: PathBuf,
    },
    /// Remove a market: it stops, and publishing to it fails at once; its streams are kept.
    #[command(name = "market.remove")]
    MarketRemove {
        /// The market, e.g. BTC-USDC.
        symbol: String,
    },
    /// Halt matching in a market (orders are refused until market.resume).
    #[command(name = "market.halt")]
    MarketHalt {
        /// The market, e.g. BTC-USDC.
        symbol: String,
        /// Also cancel every open order.
        #[arg(long)]
        cancel_orders: bool,
    },
    /// Resume a halted market.
    #[command(name = "market.resume")]
    MarketResume {
        /// The market, e.g. BTC-USDC.
        symbol: String,
    },
    /// Move a market to another node (a planned handoff; matching pauses for milliseconds).
    #[command(name = "market.move")]
    MarketMove {
        /// The market, e.g. BTC-USDC.
        symbol: String,
        /// The node to move it to (node.list shows them).
        #[arg(long, value_name = "NODE")]
        to: String,
    },
    /// Every market with its owner, epoch, state, resting orders and commands/s.
    #[command(name = "market.list")]
    MarketList,
    /// Every node with its load, markets and whether it holds the rebalancer.
    #[command(name = "node.list")]
    NodeList,
    /// Move every market off a node (for maintenance) and place nothing on it.
    #[command(name = "node.drain")]
    NodeDrain {
        /// The node's id.
        node: String,
    },
    /// Let a drained node take markets again.
    #[command(name = "node.undrain")]
    NodeUndrain {
        /// The node's id.
        node: String,
    },
    /// Another verb, sent as it is with an empty request (for verbs of newer nodes).
    #[command(external_subcommand)]
    Other(Vec<String>),
}

impl CtlVerb {
    /// The verb's name on the subject.
    fn name(&self) -> &str {
        match self {
            CtlVerb::MarketAdd { .. } => "market.add",
            CtlVerb::MarketUpdate { .. } => "market.update",
            CtlVerb::MarketRemove { .. } => "market.remove",
            CtlVerb::MarketHalt { .. } => "market.halt",
            CtlVerb::MarketResume { .. } => "market.resume",
            CtlVerb::MarketMove { .. } => "market.move",
            CtlVerb::MarketList => "market.list",
            CtlVerb::NodeList => "node.list",
            CtlVerb::NodeDrain { .. } => "node.drain",
            CtlVerb::NodeUndrain { .. } => "node.undrain",
            CtlVerb::Other(args) => args.first().map_or("", String::as_str),
        }
    }

    /// Whether asking twice is harmless (read-only verbs are tried again on a timeout).
    fn read_only(&self) -> bool {
        matches!(self, CtlVerb::MarketList | CtlVerb::NodeList)
    }
}

/// Where NATS is and how to log in (the same `AGORA_NATS__*` variables as the node's `[nats]`).
#[derive(Args, Clone)]
struct ConnectArgs {
    /// NATS server URL(s), comma-separated; user:password@ in a URL is used as the login.
    #[arg(
        long,
        env = "AGORA_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true,
        value_name = "URL",
        hide_env_values = true
    )]
    nats_url: String,
    /// First token of the subjects.
    #[arg(long, env = "AGORA_PREFIX", default_value = "agora", global = true)]
    prefix: String,
    /// Credentials file (JWT + nkey seed, as nsc writes it).
    #[arg(
        long,
        env = "AGORA_NATS__CREDS_FILE",
        value_name = "FILE",
        global = true
    )]
    creds: Option<PathBuf>,
    /// File holding an nkey user seed.
    #[arg(
        long,
        env = "AGORA_NATS__NKEY_SEED_FILE",
        value_name = "FILE",
        global = true
    )]
    nkey: Option<PathBuf>,
    /// NATS user (with --password).
    #[arg(long, env = "AGORA_NATS__USER", global = true)]
    user: Option<String>,
    /// NATS password (with --user).
    #[arg(
        long,
        env = "AGORA_NATS__PASSWORD",
        hide_env_values = true,
        global = true
    )]
    password: Option<String>,
    /// NATS token.
    #[arg(long, env = "AGORA_NATS__TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Where replies to this client's requests go (default `_INBOX_<user>` with --user,
    /// else `_INBOX`): NATS permissions give each user its own.
    #[arg(
        long,
        env = "AGORA_NATS__INBOX_PREFIX",
        value_name = "PREFIX",
        global = true
    )]
    inbox_prefix: Option<String>,
    /// CA certificate (PEM) that signed the server's certificate; turns TLS on.
    #[arg(
        long,
        env = "AGORA_NATS__TLS_CA_FILE",
        value_name = "FILE",
        global = true
    )]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for servers that verify clients.
    #[arg(
        long,
        env = "AGORA_NATS__TLS_CERT_FILE",
        value_name = "FILE",
        global = true
    )]
    tls_cert: Option<PathBuf>,
    /// Client key (PEM), with --tls-cert.
    #[arg(
        long,
        env = "AGORA_NATS__TLS_KEY_FILE",
        value_name = "FILE",
        global = true
    )]
    tls_key: Option<PathBuf>,
}

impl ConnectArgs {
    fn options(&self) -> agora::bus::NatsOptions {
        agora::bus::NatsOptions {
            creds_file: self.creds.clone(),
            nkey_seed_file: self.nkey.clone(),
            user: self.user.clone(),
            password: self.password.clone(),
            token: self.token.clone(),
            tls_ca_file: self.tls_ca.clone(),
            tls_cert_file: self.tls_cert.clone(),
            tls_key_file: self.tls_key.clone(),
            inbox_prefix: self.inbox_prefix.clone(),
            ..Default::default()
        }
    }

    async fn client(&self) -> Result<agora::client::Client> {
        Ok(agora::client::Client::connect(&self.nats_url, &self.options(), &self.prefix).await?)
    }
}

/// The order a cancel or amend means.
#[derive(Args)]
#[group(required = true, multiple = false)]
struct TargetArgs {
    /// The order's client id.
    #[arg(long, allow_hyphen_values = true)]
    cid: Option<String>,
    /// The engine's order id.
    #[arg(long)]
    oid: Option<u64>,
}

impl TargetArgs {
    fn target(&self) -> agora::client::Target {
        match (&self.cid, self.oid) {
            (Some(cid), _) => agora::client::Target::Cid(cid.clone()),
            (None, Some(oid)) => agora::client::Target::Oid(oid),
            // clap requires one of the two.
            (None, None) => agora::client::Target::Oid(0),
        }
    }
}

#[derive(Args)]
struct OrderCommon {
    /// The market, e.g. BTC-USDC.
    #[arg(long)]
    market: String,
    /// The account the command is for (a trader's NATS user may send only for its own).
    #[arg(long, env = "AGORA_ACCOUNT")]
    account: String,
    /// Seconds to wait for the command's reports (0: print the stream sequence and return).
    #[arg(long, default_value_t = 5)]
    wait_secs: u64,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Subcommand)]
enum OrderCmd {
    /// Place an order.
    Place {
        #[command(flatten)]
        common: OrderCommon,
        #[command(flatten)]
        order: agora::client::NewOrderRequest,
    },
    /// Cancel an order (by --cid or --oid).
    Cancel {
        #[command(flatten)]
        common: OrderCommon,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Amend an order (by --cid or --oid): --qty is the new total, filled included.
    Amend {
        #[command(flatten)]
        common: OrderCommon,
        #[command(flatten)]
        target: TargetArgs,
        /// The new total quantity, filled quantity included ("0.4"); lowering it keeps time
        /// priority.
        #[arg(long, allow_hyphen_values = true)]
        qty: Option<String>,
        /// The new limit price ("64990.00"); a new price loses time priority.
        #[arg(long, allow_hyphen_values = true)]
        price: Option<String>,
    },
    /// Cancel every open order of the account in the market.
    CancelAll {
        #[command(flatten)]
        common: OrderCommon,
    },
    /// Print one open order's state (by --cid or --oid) as JSON; exits 1 when it is not open.
    Status {
        /// The market, e.g. BTC-USDC.
        #[arg(long)]
        market: String,
        /// The account the order belongs to (a trader's NATS user may ask only for its own).
        #[arg(long, env = "AGORA_ACCOUNT")]
        account: String,
        #[command(flatten)]
        target: TargetArgs,
        /// Seconds the market has to answer.
        #[arg(long, default_value_t = 2)]
        timeout_secs: u64,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

#[derive(Args)]
struct OrdersArgs {
    /// The account whose open orders to print (a trader's NATS user may ask only for its own).
    #[arg(long, env = "AGORA_ACCOUNT")]
    account: String,
    /// Only this market's (default: every market's).
    #[arg(long)]
    market: Option<String>,
    /// Seconds the markets have to answer; those that do not are named on stderr, and the
    /// command exits 1.
    #[arg(long, default_value_t = 2)]
    timeout_secs: u64,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Subcommand)]
enum WatchCmd {
    /// An account's execution reports (all markets unless --market).
    Reports {
        /// The account whose reports to print.
        #[arg(long, env = "AGORA_ACCOUNT")]
        account: String,
        /// Only this market's (default: every market's).
        #[arg(long)]
        market: Option<String>,
        /// Start here instead of now: an EXECS sequence (a printed report's stream_seq + 1
        /// goes on after it) or an RFC 3339 time, such as 2026-12-05T09:30:00Z.
        #[arg(long, value_name = "SEQ|TIME", default_value = "now")]
        since: agora::client::ReportsFrom,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// A market's trade tape.
    Trades {
        /// The market, e.g. BTC-USDC.
        #[arg(long)]
        market: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// A market's L2 book: the snapshot, then each delta, as JSON lines; with --levels, the
    /// top of the book after each change instead.
    Book {
        /// The market, e.g. BTC-USDC.
        #[arg(long)]
        market: String,
        /// Print the top N levels a side after each change instead of the deltas.
        #[arg(long, value_name = "N")]
        levels: Option<usize>,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

#[derive(Args)]
struct BenchArgs {
    /// NATS to measure against; without it the bench starts its own nats-server.
    #[arg(long, value_name = "URL")]
    nats_url: Option<String>,
    /// Markets, each with its own flow (seed + market index).
    #[arg(long, default_value_t = 2)]
    markets: usize,
    /// Commands per phase over all markets [default: 200000; 4000 with --quick].
    #[arg(long, value_name = "N")]
    orders: Option<usize>,
    /// Resting orders each market starts with (published before the timed commands).
    #[arg(long, default_value_t = 1_000)]
    resting: usize,
    /// Commands/s (over all markets) of the paced phase; 0: half the measured maximum.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Commands published and not yet answered, over all markets.
    #[arg(long, default_value_t = 2_000)]
    window: usize,
    /// Memory streams instead of file streams (node and raw alike).
    #[arg(long)]
    memory: bool,
    /// Replicas of every stream, node and raw alike: 3 against a NATS cluster of three
    /// (with --nats-url listing its servers).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=5))]
    replicas: u16,
    /// Also print the result as one JSON object (the last line of standard output).
    #[arg(long)]
    json: bool,
    /// Write every timed command's publish time and latency here (CSV: phase, market,
    /// command, published_us from the phase's start, latency_us), to see when the slow ones
    /// happened
    #[arg(long, value_name = "FILE")]
    latency_log: Option<PathBuf>,
    /// A short run (4,000 commands a phase unless --orders says otherwise), for tests.
    #[arg(long)]
    quick: bool,
}

#[derive(Args)]
struct ReplayArgs {
    /// JSON-lines command file (gzip is read transparently).
    file: PathBuf,
    #[command(flatten)]
    market: MarketArgs,
    /// Write the events here instead of standard output.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Add the final top-N L2 levels of each side as one JSON line at the end.
    #[arg(long, value_name = "N")]
    book: Option<usize>,
    /// Time only the book over K repetitions (fresh book each) and print rates and latencies.
    #[arg(long, value_name = "K")]
    bench: Option<usize>,
    /// With --bench: also time the naive reference book on the same commands, as a baseline.
    #[arg(long, requires = "bench")]
    baseline: bool,
    /// With --bench: apply each command without telling the book of the next ones (a market
    /// tells it of the next three, so that it fetches what they read ahead of time), to see
    /// what that look-ahead gains.
    #[arg(long, requires = "bench")]
    no_lookahead: bool,
}

#[derive(Args)]
/// A flag given twice takes its last value, so a script can put its changes after a base.
#[command(args_override_self = true)]
struct GenerateArgs {
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Orders resting on the book before the flow starts.
    #[arg(long, default_value_t = 1_000)]
    resting: usize,
    /// Ticks over which passive orders spread from the top of the book.
    #[arg(long, default_value_t = 400)]
    spread_ticks: u64,
    /// Commands of flow after the resting orders.
    #[arg(long, default_value_t = 100_000)]
    commands: usize,
    #[arg(long, default_value_t = 200)]
    accounts: u32,
    /// Mix in every order type and rule (stops, icebergs, GTD, amends, STP, halts, bad input).
    #[arg(long)]
    full_mix: bool,
    /// Percent of cancels aimed at one of the 64 most recently placed open orders (0-100).
    #[arg(long, default_value_t = workload::YOUNG_CANCEL_PCT_DEFAULT, value_parser = clap::value_parser!(u8).range(0..=100))]
    young_cancel_pct: u8,
    /// Percent of the flow that is cancels (10-60); above 35, cancels drawn while the book is
    /// short of its resting size target recently closed orders and are rejected.
    #[arg(long, default_value_t = workload::CANCEL_PCT_DEFAULT, value_parser = clap::value_parser!(u8).range(10..=60))]
    cancel_pct: u8,
    /// Percent of cancels that name their order by cid (the rest by oid).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    cancel_by_cid_pct: u8,
    /// Cids as plain numbers ("1234") instead of "c1234".
    #[arg(long)]
    numeric_cids: bool,
    /// Print what the workload is made of (resting orders, levels, shares of the flow) to
    /// standard error.
    #[arg(long)]
    profile: bool,
    /// Write here instead of standard output (`.gz` is gzip-compressed).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

fn writer(path: Option<&Path>) -> Result<Box<dyn Write>> {
    Ok(match path {
        None => Box::new(BufWriter::new(io::stdout().lock())),
        Some(p) => {
            let file = File::create(p).with_context(|| format!("cannot create {}", p.display()))?;
            if p.extension().is_some_and(|e| e == "gz") {
                Box::new(BufWriter::new(flate2::write::GzEncoder::new(
                    file,
                    flate2::Compression::default(),
                )))
            } else {
                Box::new(BufWriter::new(file))
            }
        }
    })
}

fn replay_cmd(args: ReplayArgs) -> Result<()> {
    let spec = args.market.spec()?;
    let reader = replay::open_input(&args.file)?;
    let inputs = replay::read_inputs(reader, &spec)?;
    if let Some(k) = args.bench {
        let commands = replay::commands(&inputs);
        let report = replay::bench::<OrderBook>(&spec, &commands, k, !args.no_lookahead)?;
        let mut stdout = io::stdout().lock();
        report.print(&mut stdout, "")?;
        if args.baseline {
            let baseline = replay::bench::<ReferenceBook>(&spec, &commands, k, !args.no_lookahead)?;
            baseline.print(&mut stdout, "baseline_")?;
            writeln!(
                stdout,
                "speedup_vs_baseline: {:.2}",
                report.commands_per_sec_median / baseline.commands_per_sec_median.max(1e-9)
            )?;
            if baseline.state_hash != report.state_hash {
                bail!(
                    "the reference book ended in another state ({} vs {}): that is a bug",
                    baseline.state_hash,
                    report.state_hash
                );
            }
        }
        return Ok(());
    }
    let mut out = writer(args.out.as_deref())?;
    let mut book = OrderBook::new(spec);
    let summary = replay::run(&mut book, &inputs, &mut out)?;
    if let Some(n) = args.book {
        serde_json::to_writer(&mut out, &WireBook::new(&book, n))?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    let rate = summary.commands as f64 / summary.seconds.max(1e-9);
    eprintln!("commands: {}", summary.commands);
    eprintln!("events: {}", summary.events);
    eprintln!("trades: {}", summary.trades);
    eprintln!("rejected: {}", summary.rejected);
    eprintln!(
        "resting_orders: {} (bid levels {}, ask levels {})",
        book.order_count(),
        book.level_count(Side::Buy),
        book.level_count(Side::Sell)
    );
    eprintln!("commands_per_sec: {rate:.0} (including JSON output)");
    eprintln!("state_hash: {}", book.state_hash());
    Ok(())
}

fn generate_cmd(args: GenerateArgs) -> Result<()> {
    let params = FlowParams {
        seed: args.seed,
        resting: args.resting,
        spread_ticks: args.spread_ticks.max(1),
        commands: args.commands,
        accounts: args.accounts.max(1),
        full_mix: args.full_mix,
        young_cancel_pct: args.young_cancel_pct,
    };
    let shape = workload::FlowShape {
        cancel_pct: args.cancel_pct,
        cancel_by_cid_pct: args.cancel_by_cid_pct,
        numeric_cids: args.numeric_cids,
    };
    let w = workload::generate_shaped(&params, &shape);
    if args.profile {
        let p = w.profile();
        eprintln!(
            "resting {} orders on {} levels ({:.1} a level); flow {} commands: {:.1}% limit, {:.1}% market, {:.1}% cancel ({:.0}% of them by cid)",
            p.resting,
            p.levels,
            p.resting as f64 / p.levels.max(1) as f64,
            p.commands,
            p.limit_pct,
            p.market_pct,
            p.cancel_pct,
            p.cancel_by_cid_pct
        );
    }
    let mut out = writer(args.out.as_deref())?;
    workload::write_jsonl(&w, &mut out)?;
    out.flush()?;
    Ok(())
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
/// Installs the SIGINT and SIGTERM handlers at once, and returns what ends at the first of
/// them. Installed lazily (on the future's first poll), a signal arriving between the ready
/// line and that poll would kill the node with the default action, outputs unflushed.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    let interrupt = signal(SignalKind::interrupt()).ok();
    let terminate = signal(SignalKind::terminate()).ok();
    async fn received(s: Option<Signal>) {
        match s {
            Some(mut s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    }
    async move {
        tokio::select! {
            _ = received(interrupt) => {}
            _ = received(terminate) => {}
        }
    }
}

/// A market spec file, read for `market.add` and `market.update`.
fn spec_file(path: &Path) -> Result<MarketSpecInput> {
    if !path.is_file() {
        bail!("market spec file {} does not exist", path.display());
    }
    Figment::from(Toml::file(path))
        .extract()
        .with_context(|| format!("{} is not a valid market spec", path.display()))
}

/// The options that may follow a verb this binary does not know (clap hands those over raw).
#[derive(Parser)]
#[command(name = "agora ctl VERB")]
struct OtherVerbArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
}

fn ctl_cmd(mut args: CtlArgs) -> Result<()> {
    if let CtlVerb::Other(rest) = &args.verb {
        // A verb of a newer node: sent with an empty request; only the connection options
        // may follow it.
        let other = OtherVerbArgs::try_parse_from(
            std::iter::once("agora ctl VERB".to_string()).chain(rest.iter().skip(1).cloned()),
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "{} is not a verb this agora knows, so it takes no arguments but the connection options ({}); agora ctl --help lists the verbs",
                rest.first().map_or("", String::as_str),
                e.kind()
            )
        })?;
        args.connect = other.connect;
        args.timeout_secs = other.timeout_secs;
    }
    let verb = args.verb.name().to_string();
    if verb.is_empty() {
        bail!("name a verb: agora ctl --help lists them");
    }
    use agora::control::protocol::{MoveRequest, NodeRequest, Request, SymbolRequest};
    let symbol = |symbol: &String, cancel_orders: bool| SymbolRequest {
        symbol: symbol.clone(),
        cancel_orders,
    };
    let node = |node: &String| NodeRequest { node: node.clone() };
    let request = match &args.verb {
        CtlVerb::MarketAdd { spec } => Some(Request::MarketAdd(spec_file(spec)?)),
        CtlVerb::MarketUpdate { spec } => Some(Request::MarketUpdate(spec_file(spec)?)),
        CtlVerb::MarketRemove { symbol: s } => Some(Request::MarketRemove(symbol(s, false))),
        CtlVerb::MarketResume { symbol: s } => Some(Request::MarketResume(symbol(s, false))),
        CtlVerb::MarketHalt {
            symbol: s,
            cancel_orders,
        } => Some(Request::MarketHalt(symbol(s, *cancel_orders))),
        CtlVerb::MarketMove { symbol, to } => Some(Request::MarketMove(MoveRequest {
            symbol: symbol.clone(),
            node: to.clone(),
        })),
        CtlVerb::NodeDrain { node: n } => Some(Request::NodeDrain(node(n))),
        CtlVerb::NodeUndrain { node: n } => Some(Request::NodeUndrain(node(n))),
        CtlVerb::MarketList => Some(Request::MarketList),
        CtlVerb::NodeList => Some(Request::NodeList),
        // A verb this agora does not know: sent as it is, the node answers whether it knows it.
        CtlVerb::Other(_) => None,
    };
    // An unknown verb goes with an empty map.
    let body = request.map_or_else(|| vec![0x80], |r| r.encode());
    let subjects = agora::bus::Subjects::new(&args.connect.prefix)?;
    let subject = subjects.ctl(&verb);
    let timeout = Duration::from_secs(args.timeout_secs.max(1));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reply: serde_json::Value = runtime.block_on(async {
        let client =
            agora::bus::connect_with(&args.connect.nats_url, "agora-ctl", &args.connect.options())
                .await?;
        let payload: bytes::Bytes = body.into();
        let started = std::time::Instant::now();
        // The nodes are told to give up a little before we do: a request a node takes just
        // as we stop waiting must be dropped, not carried out after we reported a timeout.
        let margin = (timeout / 4).min(Duration::from_secs(1));
        let deadline = agora::control::Deadline::after(timeout.saturating_sub(margin));
        // A read-only verb asks again every few seconds (a stalled node in the queue group may
        // have taken the first request); any other verb asks once.
        let attempt_max = if args.verb.read_only() {
            Duration::from_secs(3).min(timeout)
        } else {
            timeout
        };
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                bail!(
                    "no node answered {subject} within {} s; a request not answered in time is not carried out later",
                    args.timeout_secs
                );
            }
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(agora::control::DEADLINE_HEADER, deadline.header().as_str());
            let request = client.send_request(
                subject.clone(),
                async_nats::Request::new()
                    .payload(payload.clone())
                    .headers(headers)
                    .timeout(Some(attempt_max.min(left))),
            );
            match request.await {
                Ok(reply) => break Ok::<_, anyhow::Error>(rmp_serde::from_slice(&reply.payload)?),
                Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => continue,
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => bail!(
                    "no node listens on {subject}; is a node running against {}?",
                    agora::bus::redact(&args.connect.nats_url)
                ),
                Err(e) => bail!(
                    "no node answered {subject}: {e}; is a node running against {}?",
                    agora::bus::redact(&args.connect.nats_url)
                ),
            }
        }
    })?;
    println!("{}", serde_json::to_string_pretty(&reply)?);
    match agora::control::protocol::read_reply::<serde::de::IgnoredAny>(&reply) {
        Ok(Ok(_)) => {}
        Ok(Err(failure)) => bail!("refused: {failure}"),
        Err(e) => bail!("the node's reply cannot be read: {e}"),
    }
    Ok(())
}

fn bench_cmd(args: BenchArgs) -> Result<()> {
    let options = agora::bench::BenchOptions {
        nats_url: args.nats_url,
        markets: args.markets,
        orders: args
            .orders
            .unwrap_or(if args.quick { 4_000 } else { 200_000 }),
        resting: args.resting,
        rate: args.rate,
        seed: args.seed,
        window: args.window,
        memory: args.memory,
        replicas: usize::from(args.replicas),
        latency_log: args.latency_log,
    };
    let report = agora::bench::run(&options)?;
    let mut stdout = io::stdout().lock();
    report.print(&mut stdout)?;
    if args.json {
        writeln!(stdout, "{}", report.to_json())?;
    }
    Ok(())
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

/// `agora orders`: every page of the account's open orders, one JSON line each; markets that
/// did not answer are said on stderr and make the exit status 1.
fn orders_cmd(args: OrdersArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = args.connect.client().await?;
        let open = client
            .open_orders(
                &args.account,
                args.market.as_deref(),
                Duration::from_secs(args.timeout_secs),
            )
            .await?;
        for order in &open.orders {
            print_json(order)?;
        }
        if !open.missing.is_empty() {
            anyhow::bail!(
                "these markets did not answer within {} s, so their orders are not listed: {}",
                args.timeout_secs,
                open.missing.join(", ")
            );
        }
        Ok(())
    })
}

fn order_cmd(cmd: OrderCmd) -> Result<()> {
    let common = match &cmd {
        OrderCmd::Place { common, .. }
        | OrderCmd::Cancel { common, .. }
        | OrderCmd::Amend { common, .. }
        | OrderCmd::CancelAll { common } => common,
        OrderCmd::Status {
            market,
            account,
            target,
            timeout_secs,
            connect,
        } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            return runtime.block_on(async {
                let client = connect.client().await?;
                let status = client
                    .order_status(
                        account,
                        market,
                        &target.target(),
                        Duration::from_secs(*timeout_secs),
                    )
                    .await?;
                match status {
                    Some(status) => print_json(&status),
                    None => anyhow::bail!(
                        "{account} has no open order in {market} with this id: it filled, was cancelled, expired or was rejected, or never existed (its reports say which: agora watch reports --since 1)"
                    ),
                }
            });
        }
    };
    // Traces only when OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) is set.
    let mut tracing_config = agora::config::TracingConfig::client();
    tracing_config
        .apply_otel_env(|name| std::env::var(name).ok())
        .map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let console = tracing_config.active().then_some("warn");
    let tracing = runtime
        .block_on(async { traces::init(&tracing_config, console) })
        .map_err(anyhow::Error::msg)?;
    let result = runtime.block_on(async {
        let client = common.connect.client().await?;
        let (market, account) = (common.market.as_str(), common.account.as_str());
        // Listen before sending, so the reports cannot pass by unseen.
        let mut reports = if common.wait_secs > 0 {
            Some(client.reports(account, Some(market)).await?)
        } else {
            None
        };
        let sent = match &cmd {
            OrderCmd::Place { order, .. } => client.place(market, account, order).await?,
            OrderCmd::Cancel { target, .. } => {
                client.cancel(market, account, &target.target()).await?
            }
            OrderCmd::Amend {
                target, qty, price, ..
            } => {
                client
                    .amend(
                        market,
                        account,
                        &target.target(),
                        qty.as_deref(),
                        price.as_deref(),
                    )
                    .await?
            }
            OrderCmd::CancelAll { .. } => client.cancel_all(market, account).await?,
            OrderCmd::Status { .. } => unreachable!("answered above"),
        };
        print_json(&serde_json::json!({"sent": sent}))?;
        if let Some(reports) = &mut reports {
            let wait = Duration::from_secs(common.wait_secs);
            if let OrderCmd::CancelAll { .. } = cmd {
                // A cancel-all with nothing to cancel has no report: ask the market instead.
                client.wait_applied(market, sent.seq, wait).await?;
                match reports.for_seq(sent.seq, Duration::from_millis(500)).await {
                    Ok(found) => {
                        for report in found {
                            print_json(&report)?;
                        }
                    }
                    Err(agora::client::ClientError::Timeout { .. }) => {
                        eprintln!(
                            "agora: applied at seq {}; {account} had no open orders in {market}",
                            sent.seq
                        );
                    }
                    Err(e) => return Err(e.into()),
                }
            } else {
                let found = reports.for_seq(sent.seq, wait).await?;
                for report in &found {
                    print_json(report)?;
                }
                // A refusal is a failure of the command: say so in the exit status, as
                // `agora ctl` does.
                if let Some(refused) = found.iter().find(|r| r.kind == "rejected") {
                    let field = |name: &str| {
                        refused
                            .fields
                            .get(name)
                            .and_then(|v| v.as_str())
                            .unwrap_or("")
                            .to_string()
                    };
                    anyhow::bail!(
                        "{market}: the command was rejected ({}): {}",
                        field("reason"),
                        field("message")
                    );
                }
            }
        }
        Ok(())
    });
    // Flush the client's span (on a blocking thread; this runtime drives the gRPC channel).
    runtime.block_on(tracing.shutdown());
    result
}

fn watch_cmd(cmd: WatchCmd) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cmd {
            WatchCmd::Reports {
                account,
                market,
                since,
                connect,
            } => {
                let client = connect.client().await?;
                if let Some(market) = &market {
                    client.check_market(market).await?;
                }
                let mut reports = client
                    .reports_from(&account, market.as_deref(), since)
                    .await?;
                eprintln!("agora: watching the reports of {account}");
                while let Some(report) = reports.next().await? {
                    print_json(&report)?;
                }
            }
            WatchCmd::Trades { market, connect } => {
                let client = connect.client().await?;
                client.check_market(&market).await?;
                let mut trades = client.trades(&market).await?;
                eprintln!("agora: watching the trades of {market}");
                while let Some((market, trade)) = trades.next().await? {
                    print_json(&serde_json::json!({"market": market, "trade": trade}))?;
                }
            }
            WatchCmd::Book {
                market,
                levels,
                connect,
            } => {
                use agora::client::BookUpdate;
                let client = connect.client().await?;
                let mut feed = client.book(&market, Duration::from_secs(5)).await?;
                eprintln!("agora: watching the book of {market}");
                let top = |feed: &agora::client::BookFeed<'_>, n: usize| {
                    serde_json::json!({"market": market, "seq": feed.book().seq,
                        "bids": feed.book().bids(n), "asks": feed.book().asks(n)})
                };
                print_json(&top(&feed, levels.unwrap_or(usize::MAX)))?;
                while let Some(update) = feed.next().await? {
                    match (levels, update) {
                        (Some(n), _) => print_json(&top(&feed, n))?,
                        (None, BookUpdate::Delta(delta)) => print_json(&delta)?,
                        (None, BookUpdate::Resynced(seq)) => {
                            eprintln!("agora: a book delta was missed; fetched the book again at seq {seq}");
                            print_json(&top(&feed, usize::MAX))?;
                        }
                    }
                }
            }
        }
        eprintln!("agora: the NATS connection closed");
        Ok(())
    })
}

/// The node's default log filter: warnings and errors. What it runs and where goes to standard
/// output as operator lines; `AGORA_LOG=info` (or `agora=debug`) shows more.
const NODE_LOG_DEFAULT: &str = "warn,async_nats=error,opentelemetry=warn";

fn node_cmd(args: NodeArgs) -> Result<()> {
    let log_format = args.log_format.clone();
    let overrides = Overrides {
        node_id: args.node_id,
        nats_url: args.nats_url,
        data_dir: args.data_dir,
        http_port: args.http_port,
        http_addr: args.http_addr,
    };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    actix_rt::System::new().block_on(async move {
        // Inside the actix system: its runtime drives the gRPC exporter's channel.
        // The exporter's own messages only when something goes wrong.
        let format = traces::LogFormat::parse(&log_format).unwrap_or_default();
        let tracing = traces::init_with(&config.tracing, Some(NODE_LOG_DEFAULT), format)
            .map_err(anyhow::Error::msg)?;
        let result = node::run(config, shutdown_signal()).await;
        tracing.shutdown().await;
        Ok::<_, anyhow::Error>(result?)
    })
}

/// A panic on any thread ends the process, as the release profile's `panic = "abort"` does, in
/// every build (the test suite's profile unwinds, for its harness): a node whose market thread
/// died must not live on half-working, holding its lease while the cluster waits for it. The
/// message is printed first by the default hook.
fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
}

fn main() {
    abort_on_panic();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Node(args) => node_cmd(args),
        Cmd::Ctl(args) => ctl_cmd(args),
        Cmd::Bench(args) => bench_cmd(args),
        Cmd::Order(cmd) => order_cmd(cmd),
        Cmd::Orders(args) => orders_cmd(args),
        Cmd::Watch(cmd) => watch_cmd(cmd),
        Cmd::History(args) => history_cmd(args),
        Cmd::Replay(args) => replay_cmd(args),
        Cmd::Generate(args) => generate_cmd(args),
    };
    if let Err(e) = result {
        eprintln!("agora: {e:#}");
        std::process::exit(1);
    }
}
