//! The planned move of one market from its owner A to a node B (`docs/operations.md`, "Placement, moves and drains"):
//!
//! 1. B keeps a warm copy: it restores the latest snapshot and applies the stream silently
//!    behind the journal (`follow`), until it is close behind A.
//! 2. A stops at a batch boundary with every output acknowledged, and names B at epoch + 1 by
//!    compare-and-set (`release`).
//! 3. B's agent claims the market (compare-and-set to `active`), promotes its copy (applies
//!    what the journal says A did, rebuilds A's last two batches, republishes their views, which
//!    JetStream drops as duplicates) and consumes from the next command.
//!
//! The pause is measured from the release request to B's `active` announcement on
//! `<prefix>.status.<MARKET>`: no command is matched in between; they wait in the stream.

use std::time::{Duration, Instant};

use crate::actors::market::MarketStatus;
use async_nats::jetstream::kv;
use futures::StreamExt;
use serde_json::Value;

use super::placement::{Placement, PlacementState};
use crate::bus::Subjects;
use crate::control::protocol::node::{self, MarketRequest, ReleaseRequest};
use crate::control::protocol::read_reply;
use crate::telemetry::traces;
use tracing::Instrument;

/// What a finished move did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Moved {
    pub market: String,
    pub from: String,
    pub to: String,
    pub epoch: u64,
    /// The last stream sequence A applied.
    pub seq: Option<u64>,
    /// From the release request to B's announcement, microseconds.
    pub pause_us: u64,
    /// How far behind B's copy was when the release started.
    pub lag: u64,
    /// A's book's state hash when it stopped, and B's when it took over at the same sequence:
    /// equal unless something is badly wrong (the move still happened; the log says so).
    pub state_hash: Option<String>,
    pub state_hash_equal: bool,
}

/// How long a move waits, after the target runs the market, for its book's state hash.
const HASH_WAIT: Duration = Duration::from_secs(10);

/// How long a node request that nobody hears is asked again before the node counts as
/// unreachable.
const NO_RESPONDERS_FOR: Duration = Duration::from_secs(2);

/// Why a move did not happen: an error code and what to do.
#[derive(Debug)]
pub struct MoveError {
    pub error: &'static str,
    pub message: String,
}

fn fail(error: &'static str, message: impl Into<String>) -> MoveError {
    MoveError {
        error,
        message: message.into(),
    }
}

/// Asks a node (`<prefix>.node.<ID>.<verb>`) and reads its answer as `T`.
async fn request<T: serde::de::DeserializeOwned>(
    client: &async_nats::Client,
    subject: String,
    body: &impl serde::Serialize,
    timeout: Duration,
) -> Result<T, MoveError> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    // The handoff's trace context rides along, so each node's part joins its trace.
    let mut headers = async_nats::HeaderMap::new();
    traces::inject(&tracing::Span::current(), &mut headers);
    // "No responders" means nobody got the request, so asking again is safe. A node that has
    // just joined may not be heard yet through the server the asker is connected to: in a
    // NATS cluster a subscription reaches the other servers a moment after its own.
    let asking = Instant::now();
    let answer = loop {
        let answer = tokio::time::timeout(
            timeout,
            client.request_with_headers(subject.clone(), headers.clone(), bytes.clone().into()),
        )
        .await
        .map_err(|_| {
            fail(
                "timeout",
                format!("{subject} did not answer within {timeout:?}"),
            )
        })?;
        match answer {
            Err(e)
                if e.kind() == async_nats::RequestErrorKind::NoResponders
                    && asking.elapsed() < NO_RESPONDERS_FOR =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(fail(
                    "node_unreachable",
                    format!("{subject}: {e} (asked for {:?})", asking.elapsed()),
                ));
            }
            Ok(answer) => break answer,
        }
    };
    let value: Value = serde_json::from_slice(&answer.payload).map_err(|e| {
        fail(
            "bad_answer",
            format!("{subject} answered something unreadable: {e}"),
        )
    })?;
    match read_reply::<T>(&value) {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(refusal)) => Err(fail(
            "refused",
            format!("{subject}: {} ({})", refusal.message, refusal.error),
        )),
        Err(e) => Err(fail(
            "bad_answer",
            format!("{subject} answered something unreadable: {e}"),
        )),
    }
}

/// Moves `market` to node `to` by planned handoff. `catch_up` bounds how long B may take to
/// come close behind A.
pub async fn move_market(
    client: &async_nats::Client,
    subjects: &Subjects,
    placement: &kv::Store,
    market: &str,
    to: &str,
    catch_up: Duration,
) -> Result<Moved, MoveError> {
    let span = traces::handoff_span(market, to);
    let moved = handoff(client, subjects, placement, market, to, catch_up)
        .instrument(span.clone())
        .await;
    match &moved {
        Ok(m) => {
            span.record("from", m.from.as_str());
            span.record("epoch", traces::int(m.epoch));
            span.record("lag", traces::int(m.lag));
            span.record("pause_us", traces::int(m.pause_us));
        }
        Err(e) => traces::fail(&span, &e.message),
    }
    moved
}

async fn handoff(
    client: &async_nats::Client,
    subjects: &Subjects,
    placement: &kv::Store,
    market: &str,
    to: &str,
    catch_up: Duration,
) -> Result<Moved, MoveError> {
    let entry = placement
        .entry(market)
        .await
        .map_err(|e| fail("kv", format!("cannot read the placement of {market}: {e}")))?
        .filter(|e| e.operation == kv::Operation::Put)
        .ok_or_else(|| {
            fail(
                "unknown_market",
                format!("{market} is not placed on any node"),
            )
        })?;
    let p = Placement::decode(&entry.value)
        .ok_or_else(|| fail("kv", format!("the placement of {market} cannot be read")))?;
    if p.node == to {
        return Err(fail(
            "already_there",
            format!("{market} is already placed on {to}"),
        ));
    }
    if p.state != PlacementState::Active {
        return Err(fail(
            "not_active",
            format!(
                "{market} is being placed on {} (epoch {}); try again once it runs",
                p.node, p.epoch
            ),
        ));
    }
    // 1. The warm copy on the target.
    let followed: node::Followed = request(
        client,
        subjects.node(to, "follow"),
        &MarketRequest {
            market: market.to_string(),
            timeout_ms: Some(catch_up.as_millis() as u64),
        },
        catch_up + Duration::from_secs(5),
    )
    .await
    .map_err(|e| MoveError {
        error: e.error,
        message: format!("{to} could not keep a copy of {market}: {}", e.message),
    })?;
    let lag = followed.lag;
    // 2. The announcement of the new owner is awaited from before the release.
    let mut status = client
        .subscribe(subjects.status(market))
        .await
        .map_err(|e| {
            fail(
                "nats",
                format!("cannot watch {}: {e}", subjects.status(market)),
            )
        })?;
    let started = Instant::now();
    let epoch = p.epoch + 1;
    // The release's answer (after the source hashed its stopped book) and the target's
    // announcement race: the pause ends when the announcement arrives, whichever comes first.
    let release_request = ReleaseRequest {
        market: market.to_string(),
        to: to.to_string(),
        epoch: p.epoch,
    };
    let release = request::<node::Released>(
        client,
        subjects.node(&p.node, "release"),
        &release_request,
        Duration::from_secs(10),
    );
    let deadline = Duration::from_secs(30);
    // The target announces `active` as it starts consuming (the pause ends there), then again
    // with its book's state hash, computed off the market's thread.
    let announced = async {
        let mut running: Option<(MarketStatus, Duration)> = None;
        loop {
            let until = match &running {
                Some((_, pause)) => *pause + HASH_WAIT,
                None => deadline,
            };
            let left = until.saturating_sub(started.elapsed());
            let message = tokio::time::timeout(left, status.next()).await;
            let Ok(Some(message)) = message else {
                // Without the hash, the books count as different (and the log says so).
                return running;
            };
            let Some(s) = MarketStatus::decode(&message.payload) else {
                continue;
            };
            if s.runs_on(to, epoch) {
                let pause = running.as_ref().map_or_else(|| started.elapsed(), |r| r.1);
                if s.state_hash.is_some() {
                    return Some((s, pause));
                }
                running = Some((s, pause));
            }
        }
    };
    tokio::pin!(release, announced);
    let (mut released, mut taken) = (None, None);
    while released.is_none() || taken.is_none() {
        tokio::select! {
            r = &mut release, if released.is_none() => match r {
                Ok(r) => released = Some(r),
                Err(e) => {
                    let _ = request::<node::Unfollowed>(
                        client,
                        subjects.node(to, "unfollow"),
                        &MarketRequest {
                            market: market.to_string(),
                            timeout_ms: None,
                        },
                        Duration::from_secs(2),
                    )
                    .await;
                    return Err(MoveError {
                        error: e.error,
                        message: format!("{} did not release {market}: {}", p.node, e.message),
                    });
                }
            },
            t = &mut announced, if taken.is_none() => match t {
                Some(t) => taken = Some(t),
                None => {
                    return Err(fail(
                        "timeout",
                        format!(
                            "{} released {market} to {to} at epoch {epoch}, but {to} did not announce it running within {deadline:?}; the cluster places it again if {to} is dead",
                            p.node
                        ),
                    ));
                }
            },
        }
    }
    let (Some(released), Some((taken, pause))) = (released, taken) else {
        return Err(fail("internal", "the move ended without its answers"));
    };
    metrics::counter!("matching_handoffs_total").increment(1);
    metrics::histogram!("matching_handoff_pause_us").record(pause.as_micros() as f64);
    let (seq, state_hash) = (released.seq, released.state_hash);
    let state_hash_equal = seq.is_some() && taken.seq == seq && taken.state_hash == state_hash;
    if !state_hash_equal {
        tracing::error!(
            market,
            from = %p.node,
            to,
            source = ?(seq, &state_hash),
            target = ?(taken.seq, &taken.state_hash),
            "the new owner's book differs from the old owner's at the handoff"
        );
    }
    Ok(Moved {
        market: market.to_string(),
        from: p.node,
        to: to.to_string(),
        epoch,
        seq,
        pause_us: u64::try_from(pause.as_micros()).unwrap_or(u64::MAX),
        lag,
        state_hash,
        state_hash_equal,
    })
}
