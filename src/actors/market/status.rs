//! What a market says about itself: its state on `<prefix>.status.<MARKET>`, and the full L2
//! book on request (`<prefix>.book.<MARKET>.snapshot`). Best effort, off the matching path:
//! never a reason to stop the market.

use futures::StreamExt;
use tokio::sync::watch;

use super::driver::Driver;
use super::{L2Book, MarketError, SpecOf, nats_err};
use crate::book::{Seq, StateHash};

/// A market's announcement on `<prefix>.status.<MARKET>`: who runs it, at which epoch, in
/// which state. The one type both the market (publishing) and its watchers (handoff, the
/// cluster agent, the control plane) use.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MarketStatus {
    pub market: String,
    pub node: String,
    pub epoch: u64,
    /// `active`, `halted`, `stopped`, ...
    pub state: String,
    /// With `active`: the last command recovery applied; a second `active` adds the book's
    /// state hash then (computed off the market's thread), so a new owner's book can be checked
    /// against the old owner's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<Seq>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_hash: Option<String>,
}

impl MarketStatus {
    /// Reads an announcement; `None` for anything else on the subject.
    pub fn decode(payload: &[u8]) -> Option<MarketStatus> {
        rmp_serde::from_slice(payload).ok()
    }

    pub fn is_active(&self) -> bool {
        self.state == "active"
    }

    /// Whether this says `node` runs the market at `epoch` or later.
    pub fn runs_on(&self, node: &str, epoch: u64) -> bool {
        self.is_active() && self.node == node && self.epoch >= epoch
    }
}

/// Publishes a market's status; usable from a task of its own.
pub(super) struct Announcer {
    client: async_nats::Client,
    subject: String,
    pub(super) market: String,
    node: String,
    epoch: u64,
}

impl Announcer {
    pub(super) async fn announce(
        &self,
        state: &'static str,
        seq: Option<Seq>,
        hash: Option<StateHash>,
    ) {
        let status = MarketStatus {
            market: self.market.clone(),
            node: self.node.clone(),
            epoch: self.epoch,
            state: state.to_string(),
            seq,
            state_hash: hash.map(|h| h.to_string()),
        };
        if let Ok(bytes) = rmp_serde::to_vec_named(&status) {
            let _ = self
                .client
                .publish(self.subject.clone(), bytes.into())
                .await;
            let _ = self.client.flush().await;
        }
    }
}

/// The answer to `<prefix>.book.<MARKET>.snapshot`.
#[derive(serde::Serialize)]
struct BookSnapshotReply<'a> {
    market: &'a str,
    /// The stream sequence the book reflects: apply deltas whose `seq` is above it.
    seq: Seq,
    bids: Vec<crate::wire::WireLevel>,
    asks: Vec<crate::wire::WireLevel>,
}

/// Answers full-book requests on `<prefix>.book.<MARKET>.snapshot` until `stop`.
pub(super) async fn serve_book_snapshots(
    driver: &Driver,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, MarketError> {
    let mut requests = driver
        .client
        .subscribe(driver.subjects.book_snapshot(&driver.market))
        .await
        .map_err(|e| nats_err(&driver.market, "subscribing to book snapshot requests", e))?;
    let (client, addr, market) = (
        driver.client.clone(),
        driver.addr.clone(),
        driver.market.clone(),
    );
    Ok(actix_rt::spawn(async move {
        loop {
            let request = tokio::select! {
                _ = stop.changed() => break,
                r = requests.next() => r,
            };
            let Some(request) = request else { break };
            let Some(reply) = request.reply else { continue };
            let Ok((seq, top)) = addr.send(L2Book).await else {
                break;
            };
            let spec = match addr.send(SpecOf).await {
                Ok(spec) => spec,
                Err(_) => break,
            };
            let level = |l: &crate::book::L2Level| crate::wire::WireLevel {
                price: spec.fmt_price(l.price),
                qty: spec.fmt_qty(l.qty),
                orders: l.orders,
            };
            let body = BookSnapshotReply {
                market: &market,
                seq,
                bids: top.bids.iter().map(level).collect(),
                asks: top.asks.iter().map(level).collect(),
            };
            if let Ok(bytes) = rmp_serde::to_vec_named(&body) {
                let _ = client.publish(reply, bytes.into()).await;
            }
        }
        let _ = requests.unsubscribe().await;
    }))
}

impl Driver {
    /// Publishes the market's state on `<prefix>.status.<MARKET>` (best effort).
    pub(super) async fn announce(&self, state: &'static str) {
        self.announce_at(state, None, None).await;
    }

    pub(super) async fn announce_at(
        &self,
        state: &'static str,
        seq: Option<Seq>,
        hash: Option<StateHash>,
    ) {
        self.announcer().announce(state, seq, hash).await;
    }

    pub(super) fn announcer(&self) -> Announcer {
        Announcer {
            client: self.client.clone(),
            subject: self.subjects.status(&self.market),
            market: self.market.clone(),
            node: self.settings.node_id.clone(),
            epoch: self.settings.takeover.epoch,
        }
    }
}
