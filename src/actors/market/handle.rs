//! A running market as its supervisor holds it: the actor's address, the driver's task, and
//! the switches that stop it (at a batch boundary, with or without a final snapshot).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use actix::prelude::*;
use tokio::sync::watch;

use super::{MarketActor, MarketError, StopPoint};

/// A running market: its actor, and the driver to stop or await.
pub struct RunningMarket {
    pub market: String,
    pub addr: Addr<MarketActor>,
    pub(super) stop: watch::Sender<bool>,
    pub(super) handoff: Arc<AtomicBool>,
    pub(super) stopped_at: Arc<std::sync::OnceLock<StopPoint>>,
    pub(super) driver: tokio::task::JoinHandle<Result<(), MarketError>>,
}

/// Stops a market (the part of `RunningMarket` a supervisor keeps).
#[derive(Clone)]
pub struct MarketControl {
    pub market: String,
    pub addr: Addr<MarketActor>,
    stop: watch::Sender<bool>,
    handoff: Arc<AtomicBool>,
    stopped_at: Arc<std::sync::OnceLock<StopPoint>>,
}

impl MarketControl {
    /// Asks the driver to stop at the next batch boundary, its outputs published.
    pub fn request_stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Stops like `request_stop`, without the final snapshot: the market is handed to a node
    /// that already holds its state (or this node lost it), so stopping fast matters more.
    pub fn request_handoff(&self) {
        self.handoff.store(true, Ordering::Release);
        let _ = self.stop.send(true);
    }

    /// Where the driver stopped, once it ended cleanly (`None` before, or after a failure).
    pub fn stopped_at(&self) -> Option<StopPoint> {
        self.stopped_at.get().copied()
    }
}

impl RunningMarket {
    /// The control half, and the driver to await.
    pub fn split(
        self,
    ) -> (
        MarketControl,
        tokio::task::JoinHandle<Result<(), MarketError>>,
    ) {
        (
            MarketControl {
                market: self.market,
                addr: self.addr,
                stop: self.stop,
                handoff: self.handoff,
                stopped_at: self.stopped_at,
            },
            self.driver,
        )
    }

    /// Asks the driver to stop like `MarketControl::request_handoff` (no final snapshot) and
    /// waits; answers where it stopped.
    pub async fn hand_off(self) -> Result<Option<StopPoint>, MarketError> {
        self.handoff.store(true, Ordering::Release);
        let _ = self.stop.send(true);
        let stopped_at = self.stopped_at.clone();
        self.join().await?;
        Ok(stopped_at.get().copied())
    }

    /// Asks the driver to stop at the next batch boundary (its outputs published) and waits.
    pub async fn stop(self) -> Result<(), MarketError> {
        let _ = self.stop.send(true);
        self.join().await
    }

    /// Waits for the driver to end (it ends by itself when fenced or on an error).
    pub async fn join(self) -> Result<(), MarketError> {
        match self.driver.await {
            Ok(result) => result,
            Err(e) => Err(MarketError::Nats {
                market: self.market,
                what: "driver task",
                reason: e.to_string(),
            }),
        }
    }
}
