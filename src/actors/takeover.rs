//! How a node comes to run a market: the placement epoch it runs at, the trace of the move or
//! failover that brought it, and why (a first placement, a planned handoff with where the old
//! owner stopped, a failover, or a reclaim after a restart). The cluster decides it; the
//! supervisor and the market's recovery act on it. Plain data: it never decides anything.

use serde::{Deserialize, Serialize};

use crate::book::Seq;

/// Where a market's driver stopped cleanly (every output acknowledged): its last applied
/// order-stream sequence, and the `EVENTS` stream sequence of the journal's last message as
/// the driver knew it (its own last, or the one its recovery found; `None`: the journal was
/// empty). A releasing owner writes it into the placement record, so the new owner need not
/// read the journal's head inside the move's pause; the journal fence still decides (a stale
/// figure fails the new owner's first publish and nothing else).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopPoint {
    pub seq: Seq,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_seq: Option<u64>,
}

/// Why a market comes to this node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TakeoverKind {
    /// Its first placement (or a node outside a cluster, at epoch 0).
    #[default]
    Placement,
    /// A planned move: the previous owner released it with every output acknowledged, so
    /// recovery applies the journal's last batch silently instead of rebuilding and
    /// republishing its outputs, which keeps a move's pause short. `stop_point`: where that
    /// owner stopped, from its release record (then the journal's head is not read; `None`:
    /// a record that does not say, and the journal is read).
    Handoff { stop_point: Option<StopPoint> },
    /// Its owner died or lost its lease: recovery rebuilds and republishes the journal's last
    /// two batches.
    Failover,
    /// Placed here and active, but not run by this process (this node restarted).
    Reclaim,
}

impl TakeoverKind {
    /// Its name, as metrics label it (`matching_takeover_us{kind}`).
    pub fn name(self) -> &'static str {
        match self {
            TakeoverKind::Placement => "placement",
            TakeoverKind::Handoff { .. } => "handoff",
            TakeoverKind::Failover => "failover",
            TakeoverKind::Reclaim => "reclaim",
        }
    }

    /// Released by its previous owner with every output acknowledged.
    pub fn handed_over(self) -> bool {
        matches!(self, TakeoverKind::Handoff { .. })
    }

    /// With a handoff: where the previous owner stopped, when its record says.
    pub fn stop_point(self) -> Option<StopPoint> {
        match self {
            TakeoverKind::Handoff { stop_point } => stop_point,
            _ => None,
        }
    }
}

/// A market's start on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Takeover {
    /// The placement epoch it runs at (0 outside a cluster).
    pub epoch: u64,
    /// The `traceparent` of the handoff or failover that gave this node the market: its
    /// recovery is traced as a child.
    pub trace: Option<String>,
    pub kind: TakeoverKind,
}

impl Takeover {
    /// A node outside a cluster: epoch 0, no trace, a first placement.
    pub fn standalone() -> Takeover {
        Takeover::default()
    }

    /// At `epoch`, for `kind`, untraced.
    pub fn at(epoch: u64, kind: TakeoverKind) -> Takeover {
        Takeover {
            epoch,
            trace: None,
            kind,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_handoff_is_handed_over_and_carries_a_stop_point() {
        let at = StopPoint {
            seq: 7,
            journal_seq: Some(3),
        };
        let handoff = TakeoverKind::Handoff {
            stop_point: Some(at),
        };
        assert!(handoff.handed_over());
        assert_eq!(handoff.stop_point(), Some(at));
        for kind in [
            TakeoverKind::Placement,
            TakeoverKind::Failover,
            TakeoverKind::Reclaim,
        ] {
            assert!(!kind.handed_over(), "{kind:?}");
            assert_eq!(kind.stop_point(), None, "{kind:?}");
        }
        let names: Vec<_> = [
            TakeoverKind::Placement,
            handoff,
            TakeoverKind::Failover,
            TakeoverKind::Reclaim,
        ]
        .iter()
        .map(|k| k.name())
        .collect();
        assert_eq!(names, ["placement", "handoff", "failover", "reclaim"]);
    }
}
