//! What a market records for Prometheus, under the names `docs/observability.md` lists. Handles are made
//! once per market (labels allocated once), and recorded once per batch, never per command,
//! so the hot path pays a few atomic adds per batch. Without an installed recorder (tests,
//! tools) every call is a no-op.
//!
//! Node-wide: `matching_orders_processed_total`, `matching_trades_generated_total`,
//! `matching_latency_us` (histogram: a batch's first message received → its outputs
//! acknowledged), `matching_orderbook_depth` (resting orders on this node). Per market:
//! `matching_market_orders_total`, `matching_market_trades_total`,
//! `matching_market_batches_total` and `matching_market_report_messages_total` (what NATS
//! carries for it: commands a batch and report messages a command follow from them),
//! `matching_market_bid_levels`, `matching_market_ask_levels`, `matching_market_resting_orders`,
//! `matching_market_consumer_lag` (commands waiting in its stream), `matching_rejects_total`
//! (by reason), `matching_publish_errors_total`, `matching_snapshots_total`,
//! `matching_snapshot_duration_us`, `matching_snapshot_bytes_total`,
//! `matching_snapshots_deferred_total` (due snapshots that waited for the node's budget),
//! `matching_market_running` (1 while running). This module
//! must never decide anything: it only counts.

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

use super::core::BatchStats;

/// Buckets of `matching_latency_us` and `matching_snapshot_duration_us`, in microseconds
/// (the recorder is set up with them in `telemetry`).
pub use crate::telemetry::LATENCY_BUCKETS_US;

pub struct MarketMetrics {
    market: String,
    orders: Counter,
    trades: Counter,
    latency: Histogram,
    depth: Gauge,
    market_orders: Counter,
    market_trades: Counter,
    batches: Counter,
    report_messages: Counter,
    bid_levels: Gauge,
    ask_levels: Gauge,
    resting: Gauge,
    lag: Gauge,
    publish_errors: Counter,
    snapshots: Counter,
    snapshot_duration: Histogram,
    snapshot_bytes: Counter,
    snapshots_deferred: Counter,
    running: Gauge,
    /// This market's share of `matching_orderbook_depth`, to move the node total by deltas.
    counted_depth: f64,
}

impl MarketMetrics {
    pub fn new(market: &str) -> MarketMetrics {
        let m = market.to_string();
        MarketMetrics {
            orders: counter!("matching_orders_processed_total"),
            trades: counter!("matching_trades_generated_total"),
            latency: histogram!("matching_latency_us"),
            depth: gauge!("matching_orderbook_depth"),
            market_orders: counter!("matching_market_orders_total", "market" => m.clone()),
            market_trades: counter!("matching_market_trades_total", "market" => m.clone()),
            batches: counter!("matching_market_batches_total", "market" => m.clone()),
            report_messages: counter!(
                "matching_market_report_messages_total",
                "market" => m.clone()
            ),
            bid_levels: gauge!("matching_market_bid_levels", "market" => m.clone()),
            ask_levels: gauge!("matching_market_ask_levels", "market" => m.clone()),
            resting: gauge!("matching_market_resting_orders", "market" => m.clone()),
            lag: gauge!("matching_market_consumer_lag", "market" => m.clone()),
            publish_errors: counter!("matching_publish_errors_total", "market" => m.clone()),
            snapshots: counter!("matching_snapshots_total", "market" => m.clone()),
            snapshot_duration: histogram!("matching_snapshot_duration_us", "market" => m.clone()),
            snapshot_bytes: counter!("matching_snapshot_bytes_total", "market" => m.clone()),
            snapshots_deferred: counter!("matching_snapshots_deferred_total", "market" => m.clone()),
            running: gauge!("matching_market_running", "market" => m.clone()),
            market: m,
            counted_depth: 0.0,
        }
    }

    /// A batch processed and its outputs acknowledged, `micros` after its first message came.
    pub fn batch(&mut self, stats: &BatchStats, micros: u64, lag: Option<u64>) {
        self.orders.increment(stats.commands);
        self.market_orders.increment(stats.commands);
        self.trades.increment(stats.trades);
        self.market_trades.increment(stats.trades);
        self.batches.increment(1);
        self.report_messages.increment(stats.report_messages);
        self.latency.record(micros as f64);
        for (reason, n) in &stats.rejects {
            counter!("matching_rejects_total", "market" => self.market.clone(), "reason" => *reason)
                .increment(*n);
        }
        self.book(stats);
        if let Some(lag) = lag {
            self.lag.set(lag as f64);
        }
    }

    /// The book's sizes (also after recovery).
    pub fn book(&mut self, stats: &BatchStats) {
        self.bid_levels.set(stats.bid_levels as f64);
        self.ask_levels.set(stats.ask_levels as f64);
        self.resting.set(stats.resting_orders as f64);
        let depth = stats.resting_orders as f64;
        self.depth.increment(depth - self.counted_depth);
        self.counted_depth = depth;
    }

    pub fn publish_error(&self) {
        self.publish_errors.increment(1);
    }

    /// A snapshot saved: how long it took and its size.
    pub fn snapshot(&self, micros: u64, bytes: u64) {
        self.snapshots.increment(1);
        self.snapshot_duration.record(micros as f64);
        self.snapshot_bytes.increment(bytes);
    }

    /// A due snapshot began to wait for the node's snapshot budget.
    pub fn snapshot_deferred(&self) {
        self.snapshots_deferred.increment(1);
    }

    pub fn running(&self, yes: bool) {
        self.running.set(if yes { 1.0 } else { 0.0 });
    }
}

impl Drop for MarketMetrics {
    /// A stopped market leaves the node's depth.
    fn drop(&mut self) {
        self.depth.decrement(self.counted_depth);
        self.running(false);
    }
}
