//! Warm copies: a market followed on a node that does not own it, kept current from the order
//! stream so that taking it over needs no snapshot load and almost no replay.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tracing::Instrument;

use super::driver::Driver;
use super::handle::RunningMarket;
use super::{LastSeq, MarketBus, MarketError, MarketSettings, Restore, Takeover};
use crate::book::MarketSpec;
use crate::bus::{Feed, Pull};
use crate::telemetry::traces;

/// How often a warm copy looks at the journal to catch up.
const FOLLOW_POLL: Duration = Duration::from_millis(20);

/// A warm copy of a market on a node that does not own it: its actor holds the book as of the
/// journal's last two batches, kept current by applying the order stream silently, so taking
/// the market over needs no snapshot load and almost no replay. It publishes nothing.
///
/// A copy told that a planned move is coming (`go_ahead`) applies the journal's last two
/// batches too and keeps up with its head, so the move's pause replays only what the owner did
/// since the copy's last look (nothing, when idle). Such a copy can no longer rebuild those
/// batches' outputs, so a failover does not promote it (recovery refuses, and the market
/// starts from its snapshot and the stream instead).
pub struct Follower {
    pub market: String,
    /// Commands the owner has applied that this copy has not (`u64::MAX` before the first
    /// look at the journal, and after `go_ahead` until the copy has looked ahead once).
    lag: Arc<AtomicU64>,
    /// `BEHIND`, `AHEAD_ASKED` or `AHEAD`.
    ahead: Arc<AtomicU8>,
    /// Wakes the copy for a look at the journal now rather than at its next poll.
    wake: Arc<tokio::sync::Notify>,
    promote: Option<tokio::sync::oneshot::Sender<Promotion>>,
    stop: watch::Sender<bool>,
}

struct Promotion {
    takeover: Takeover,
    reply: tokio::sync::oneshot::Sender<Result<RunningMarket, MarketError>>,
}

/// The copy holds back the journal's last two batches (it can serve a failover).
const BEHIND: u8 = 0;
/// Asked to go ahead; its lag is not known until it has looked at the journal again.
const AHEAD_ASKED: u8 = 1;
/// Applied up to the journal's head at its last look.
const AHEAD: u8 = 2;

impl Follower {
    pub fn lag(&self) -> u64 {
        if self.ahead.load(Ordering::Acquire) == AHEAD_ASKED {
            return u64::MAX;
        }
        self.lag.load(Ordering::Acquire)
    }

    /// A planned move to this node is coming: apply up to the journal's head from now on (see
    /// the type's notes), looking at once. `lag` says `u64::MAX` until the copy has.
    pub fn go_ahead(&self) {
        if self
            .ahead
            .compare_exchange(BEHIND, AHEAD_ASKED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.wake.notify_one();
        }
    }

    /// Turns the copy into the running market as `takeover` says: it applies what the journal
    /// says was done, rebuilds the journal's last two batches and republishes their views
    /// (JetStream drops those that had landed), then consumes from the next command. Answers
    /// once it consumes. After a handoff (released by its owner, every output acknowledged)
    /// nothing is rebuilt, and with a stop point the journal's head is not read either (see
    /// `StopPoint`).
    pub async fn promote(mut self, takeover: Takeover) -> Result<RunningMarket, MarketError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let gone = || MarketError::ActorGone {
            market: self.market.clone(),
        };
        let promote = self.promote.take().ok_or_else(gone)?;
        promote
            .send(Promotion { takeover, reply })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Drops the copy.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if self.promote.is_some() {
            let _ = self.stop.send(true);
        }
    }
}

/// Starts a warm copy of the market on the current arbiter: restores the latest snapshot, then
/// follows the journal in the background.
pub async fn follow(
    bus: MarketBus,
    spec: MarketSpec,
    settings: MarketSettings,
) -> Result<Follower, MarketError> {
    let mut driver = Driver::open(bus, spec, settings).await?;
    if let Some(loaded) = driver.load_snapshot().await {
        let seq = loaded.snapshot.last_seq;
        driver
            .send(Restore(Box::new(loaded.snapshot)))
            .await?
            .map_err(|e| MarketError::Recovery {
                market: driver.market.clone(),
                reason: format!("restoring the snapshot at {seq}: {e}"),
            })?;
    }
    let applied = driver.send(LastSeq).await?;
    driver.feed = Some(
        Feed::open(
            &driver.orders,
            &driver.client,
            &driver.market,
            applied + 1,
            Pull::Consume(driver.settings.fetch_max),
            &driver.pull_cap,
        )
        .await?,
    );
    let lag = Arc::new(AtomicU64::new(u64::MAX));
    let ahead = Arc::new(AtomicU8::new(BEHIND));
    let wake = Arc::new(tokio::sync::Notify::new());
    let (promote, mut promoted) = tokio::sync::oneshot::channel::<Promotion>();
    let (stop, mut stopped) = watch::channel(false);
    let market = driver.market.clone();
    let (following, going_ahead, woken) = (lag.clone(), ahead.clone(), wake.clone());
    actix_rt::spawn(async move {
        let mut timer = tokio::time::interval(FOLLOW_POLL);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                p = &mut promoted => {
                    if let Ok(p) = p {
                        let _ = p
                            .reply
                            .send(driver.promote(p.takeover).await);
                    }
                    return;
                }
                _ = stopped.changed() => return,
                _ = async {
                    tokio::select! {
                        _ = timer.tick() => {}
                        _ = woken.notified() => {}
                    }
                } => {
                    if let Err(e) = driver.follow_step(&following, &going_ahead).await {
                        tracing::warn!(market = %driver.market, "following: {e}");
                    }
                }
                read = async {
                    match driver.feed.as_mut() {
                        Some(feed) => feed.read_ahead().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Err(e) = read {
                        // Opened again from the book's sequence at the next step.
                        tracing::warn!(market = %driver.market, "following: {e}");
                        driver.feed = None;
                    }
                }
            }
        }
    });
    Ok(Follower {
        market,
        lag,
        ahead,
        wake,
        promote: Some(promote),
        stop,
    })
}

impl Driver {
    /// Applies, silently, the commands of every journal batch but the last two (whose outputs
    /// a new owner must rebuild; with `ahead` asked, those too), and records how far behind
    /// the owner this copy is.
    pub(super) async fn follow_step(
        &mut self,
        lag: &AtomicU64,
        ahead: &AtomicU8,
    ) -> Result<(), MarketError> {
        let going_ahead = ahead.load(Ordering::Acquire) != BEHIND;
        let applied = self.send(LastSeq).await?;
        if self.feed.is_none() {
            let feed = Feed::open(
                &self.orders,
                &self.client,
                &self.market,
                applied + 1,
                Pull::Consume(self.settings.fetch_max),
                &self.pull_cap,
            );
            self.feed = Some(feed.await?);
        }
        let seen = self.tail_seen;
        let Some(tail) = self
            .journal
            .tail(
                &self.market,
                seen,
                !self.settings.takeover.kind.handed_over(),
            )
            .await?
        else {
            lag.store(0, Ordering::Release);
            if going_ahead {
                let _ =
                    ahead.compare_exchange(AHEAD_ASKED, AHEAD, Ordering::AcqRel, Ordering::Acquire);
            }
            return Ok(());
        };
        self.tail_seen = Some(tail);
        let mut applied = applied;
        let until = if going_ahead {
            tail.head.last_seq
        } else {
            tail.rebuild_from().saturating_sub(1)
        };
        if until > applied {
            // Marked before the replay: one that fails part way may still have applied some
            // of those batches.
            if until >= tail.rebuild_from() {
                self.ahead = true;
            }
            applied += self.replay_range(applied + 1, until).await?;
        }
        lag.store(
            tail.head.last_seq.saturating_sub(applied),
            Ordering::Release,
        );
        if going_ahead {
            let _ = ahead.compare_exchange(AHEAD_ASKED, AHEAD, Ordering::AcqRel, Ordering::Acquire);
        }
        Ok(())
    }

    pub(super) async fn promote(
        mut self,
        takeover: Takeover,
    ) -> Result<RunningMarket, MarketError> {
        self.settings.takeover = takeover;
        let span = traces::recover_span(
            &self.market,
            &self.settings.node_id,
            self.settings.takeover.trace.as_deref(),
        );
        self.recover(true).instrument(span).await?;
        self.launch().await
    }
}
