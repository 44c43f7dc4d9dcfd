//! What a market says about itself: its state on `<prefix>.status.<MARKET>` (best effort,
//! never a reason to stop the market). Its book on request is `book_requests`.

use super::driver::Driver;
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
