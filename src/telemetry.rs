//! Telemetry the runtime shares: the Prometheus recorder and the description of every metric
//! family (`install_metrics`), the histogram buckets, what Linux says about the process
//! (`process`), and traces (`traces`: OTLP export, `traceparent` in NATS headers, the spans of
//! a command). A leaf: it knows nothing of the actors, the cluster or the node that serve
//! these (the node's HTTP port is `node::http`).

pub mod http;
pub mod process;
pub mod traces;

/// Buckets of the microsecond histograms (`matching_latency_us`,
/// `matching_snapshot_duration_us`, the handoff and takeover times).
pub const LATENCY_BUCKETS_US: &[f64] = &[
    50.0,
    100.0,
    250.0,
    500.0,
    1_000.0,
    2_500.0,
    5_000.0,
    10_000.0,
    25_000.0,
    50_000.0,
    100_000.0,
    250_000.0,
    1_000_000.0,
    5_000_000.0,
];

/// Every metric family the node exports, with its `# HELP` text.
const FAMILIES: &[(&str, &str)] = &[
    (
        "matching_orders_processed_total",
        "Commands applied by this node's markets.",
    ),
    (
        "matching_trades_generated_total",
        "Trades made by this node's markets.",
    ),
    (
        "matching_latency_us",
        "Microseconds from a batch's first command taken from its stream to its journal, reports and tape acknowledged.",
    ),
    (
        "matching_orderbook_depth",
        "Resting orders in this node's books.",
    ),
    (
        "matching_market_orders_total",
        "Commands applied, per market.",
    ),
    ("matching_market_trades_total", "Trades made, per market."),
    (
        "matching_market_batches_total",
        "Batches processed (one journal message each), per market.",
    ),
    (
        "matching_market_report_messages_total",
        "Execution-report messages published, per market.",
    ),
    (
        "matching_market_bid_levels",
        "Price levels on the bid side, per market.",
    ),
    (
        "matching_market_ask_levels",
        "Price levels on the ask side, per market.",
    ),
    (
        "matching_market_resting_orders",
        "Resting orders, per market.",
    ),
    (
        "matching_market_consumer_lag",
        "Commands waiting in the market's order stream.",
    ),
    (
        "matching_market_running",
        "1 while the market runs on this node.",
    ),
    (
        "matching_rejects_total",
        "Rejected commands, per market and reason.",
    ),
    (
        "matching_publish_errors_total",
        "Publishes to NATS that failed, per market.",
    ),
    (
        "matching_snapshots_total",
        "Book snapshots written, per market.",
    ),
    (
        "matching_snapshot_duration_us",
        "Microseconds to write a book snapshot, per market.",
    ),
    (
        "matching_snapshot_bytes_total",
        "Bytes of book snapshots written, per market ([snapshots] max_bytes_per_sec bounds the node's).",
    ),
    (
        "matching_snapshots_deferred_total",
        "Due book snapshots that waited for the node's snapshot budget, per market.",
    ),
    (
        "matching_handoffs_total",
        "Planned moves of a market to another node.",
    ),
    (
        "matching_handoff_pause_us",
        "Microseconds matching paused during a planned move.",
    ),
    (
        "matching_failovers_total",
        "Markets taken over from a node that died.",
    ),
    (
        "matching_takeover_us",
        "Microseconds from the claim of a failed-over market to it running.",
    ),
    (
        "matching_node_heartbeat_ok",
        "1 while this node's heartbeat is renewed; 0 while it fails (the node then runs no markets).",
    ),
    (
        "matching_node_heartbeat_failures_total",
        "Heartbeat renewals that failed.",
    ),
    (
        "agora_build_info",
        "The version and commit of the running agora binary (always 1).",
    ),
];

/// Gives every family its help text and sets the build gauge.
fn describe() {
    for (name, help) in FAMILIES {
        // The kind does not matter to the exporter's HELP line; a gauge description serves all.
        metrics::describe_gauge!(*name, *help);
    }
    metrics::gauge!("agora_build_info", "version" => env!("CARGO_PKG_VERSION"), "commit" => crate::COMMIT).set(1.0);
}

/// Installs the process-wide Prometheus recorder (once; later calls get `None`).
pub fn install_metrics() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let builder = PrometheusBuilder::new();
    let builder = [
        "matching_latency_us",
        "matching_snapshot_duration_us",
        "matching_handoff_pause_us",
        "matching_takeover_us",
    ]
    .into_iter()
    .try_fold(builder, |b, name| {
        b.set_buckets_for_metric(Matcher::Full(name.into()), LATENCY_BUCKETS_US)
    })
    .ok()?;
    match builder.install_recorder() {
        Ok(handle) => {
            describe();
            // The cluster's counters exist from the start, so a dashboard shows 0, not nothing.
            metrics::counter!("matching_handoffs_total").increment(0);
            metrics::counter!("matching_failovers_total").increment(0);
            Some(handle)
        }
        Err(e) => {
            tracing::warn!("metrics are off: {e}");
            None
        }
    }
}
