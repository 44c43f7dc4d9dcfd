//! `<prefix>_placement`: market → `{node, epoch, state}`, written only by compare-and-set.
//!
//! - `assigned`: the rebalancer (or a releasing owner) named a node; nothing runs yet.
//! - `active`: that node claimed it (a CAS from `assigned`) and runs it at `epoch`.
//!
//! Every change of owner raises the epoch, so a stale owner's claim can never be mistaken for a
//! current one. Keys `drain.<node>` in the same bucket mark nodes being drained.

use serde::{Deserialize, Serialize};

use crate::actors::takeover::StopPoint;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlacementState {
    Assigned,
    Active,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub node: String,
    pub epoch: u64,
    pub state: PlacementState,
    /// The node keeping a warm copy (`[cluster] standbys = 1`), the first choice at failover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<String>,
    /// The `traceparent` of the handoff or failover that wrote the record, so the new owner's
    /// recovery joins that trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    /// Written by an owner that released the market with every output up to the journal's
    /// last batch acknowledged: the next owner need not republish the last batches.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub released: bool,
    /// With `released`: where that owner stopped (its last applied sequence and the journal's
    /// last message), so the next owner need not read the journal's head inside the move's
    /// pause. Absent in records written before it existed and at failover: the journal is read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_at: Option<StopPoint>,
}

impl Placement {
    pub fn assigned(node: &str, epoch: u64) -> Placement {
        Placement {
            node: node.to_string(),
            epoch,
            state: PlacementState::Assigned,
            standby: None,
            trace: None,
            released: false,
            stopped_at: None,
        }
    }

    pub fn active(node: &str, epoch: u64) -> Placement {
        Placement {
            node: node.to_string(),
            epoch,
            state: PlacementState::Active,
            standby: None,
            trace: None,
            released: false,
            stopped_at: None,
        }
    }

    /// The same record carrying a trace context.
    pub fn with_trace(mut self, trace: Option<String>) -> Placement {
        self.trace = trace;
        self
    }

    /// The same record with `standby` kept unless it is the owner itself.
    pub fn with_standby(mut self, standby: Option<&str>) -> Placement {
        self.standby = standby.filter(|s| *s != self.node).map(str::to_string);
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Option<Placement> {
        serde_json::from_slice(bytes).ok()
    }
}

/// The key marking `node` as drained.
pub fn drain_key(node: &str) -> String {
    format!("drain.{node}")
}

/// The node a drain key names.
pub fn drained_node(key: &str) -> Option<&str> {
    key.strip_prefix("drain.")
}

/// Rendezvous (highest random weight) hashing: the node of `candidates` with the highest
/// weight for `market`. Every node computes the same answer, and when a node joins or leaves
/// only the markets it wins or held move.
pub fn rendezvous<'a>(
    market: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .max_by_key(|node| (weight(market, node), *node))
}

/// FNV-1a over `market`, a separator and `node`, then a 64-bit finalizer (stable everywhere).
fn weight(market: &str, node: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in market.bytes().chain([0u8]).chain(node.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_is_stable_and_moves_only_what_it_must() {
        let nodes = ["n1", "n2", "n3"];
        let markets: Vec<String> = (0..300).map(|i| format!("M{i}-USD")).collect();
        let before: Vec<&str> = markets
            .iter()
            .map(|m| rendezvous(m, nodes).expect("a node"))
            .collect();
        for n in nodes {
            let share = before.iter().filter(|x| **x == n).count();
            assert!((60..=140).contains(&share), "{n} got {share} of 300");
        }
        // n2 leaves: only its markets move.
        for (m, was) in markets.iter().zip(&before) {
            let now = rendezvous(m, ["n1", "n3"]).expect("a node");
            if *was != "n2" {
                assert_eq!(now, *was, "{m} moved without reason");
            }
        }
        assert_eq!(rendezvous("X", std::iter::empty::<&str>()), None);
    }

    #[test]
    fn records_round_trip_as_json() {
        let p = Placement::active("n1", 7);
        assert_eq!(Placement::decode(&p.encode()), Some(p.clone()));
        assert_eq!(
            String::from_utf8(p.encode()).expect("utf8"),
            r#"{"node":"n1","epoch":7,"state":"active"}"#
        );
        assert_eq!(Placement::decode(b"junk"), None);
        // A release carries where its owner stopped; a record written before that field
        // existed still reads, without it.
        let mut released = Placement::assigned("n2", 8);
        released.released = true;
        released.stopped_at = Some(StopPoint {
            seq: 120,
            journal_seq: Some(45),
        });
        assert_eq!(
            String::from_utf8(released.encode()).expect("utf8"),
            r#"{"node":"n2","epoch":8,"state":"assigned","released":true,"stopped_at":{"seq":120,"journal_seq":45}}"#
        );
        assert_eq!(Placement::decode(&released.encode()), Some(released));
        let old =
            Placement::decode(br#"{"node":"n2","epoch":8,"state":"assigned","released":true}"#)
                .expect("an older release record reads");
        assert!(old.released);
        assert_eq!(old.stopped_at, None);
        assert_eq!(drained_node(&drain_key("n2")), Some("n2"));
    }
}
