//! The rebalancer's decisions, as a pure function of what it sees and of the time: which
//! markets to place and where, whose markets to fail over, which standbys to name, and which
//! one market to move (off a drained node, back to a node that prefers it, or off an
//! overloaded one), with the hysteresis and the moves-per-minute cap that keep moves from
//! storming. A node's preferences (`cluster.prefer`, carried in its record) come first when a
//! market is placed or failed over. The rebalancer (`rebalancer.rs`)
//! feeds it the buckets as watched and carries out what it answers, each write a
//! compare-and-set; the tests here run it on seeded random clusters with a fake clock.
//!
//! This module must never do I/O, read a clock, or decide from anything but its arguments.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::ClusterSettings;
use super::membership::{NodeRecord, NodeView};
use super::placement::{self, Placement, PlacementState};

/// A market moved by load stays where it went at least this long.
pub const MOVED_STAYS: Duration = Duration::from_secs(300);
/// Checks in a row a node must be overloaded before a load move.
pub const OVERLOADED_CHECKS: u32 = 3;

/// What the rebalancer sees: the buckets as watched.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub nodes: NodeView,
    /// Each market's placement and the revision it was read at.
    pub placement: BTreeMap<String, (Placement, u64)>,
    pub drained: BTreeSet<String>,
    /// Markets with a spec.
    pub specs: BTreeSet<String>,
}

/// Why a market moves.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MoveReason {
    /// Its node is drained.
    Drain,
    /// Its node has been overloaded for `OVERLOADED_CHECKS` checks.
    Load { rate: f64 },
    /// A node that prefers it has been live for `failback_after`: back to it.
    Preferred,
}

/// A write the rebalancer should make (each by compare-and-set: a lost race changes nothing).
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// A market with a spec and no placement, seen so twice in a row: on `node` at epoch 1.
    Place { market: String, node: String },
    /// Its owner is dead: to `to` at `epoch` (the owner's plus one), over record `revision`.
    FailOver {
        market: String,
        from: String,
        to: String,
        epoch: u64,
        revision: u64,
    },
    /// A running market's standby (the first choice at its failover).
    NameStandby {
        market: String,
        standby: Option<String>,
        revision: u64,
    },
    /// A planned handoff.
    Move {
        market: String,
        from: String,
        to: String,
        reason: MoveReason,
    },
}

/// What the rebalancer remembers from one heartbeat to the next.
#[derive(Debug)]
pub struct Planner {
    /// Markets seen unplaced at the last heartbeat.
    unplaced_before: BTreeSet<String>,
    /// The node overloaded at the last checks, and how many checks in a row.
    overloaded: (Option<String>, u32),
    /// When the load moves of the last minute started.
    moves: VecDeque<Instant>,
    /// When each market last finished a move.
    moved_at: HashMap<String, Instant>,
    last_load_check: Instant,
    /// Since when each live node (this process of it: its instance) has been seen live.
    live_since: HashMap<String, (u64, Instant)>,
}

impl Planner {
    /// A planner that last checked load at `now`.
    pub fn new(now: Instant) -> Planner {
        Planner {
            unplaced_before: BTreeSet::new(),
            overloaded: (None, 0),
            moves: VecDeque::new(),
            moved_at: HashMap::new(),
            last_load_check: now,
            live_since: HashMap::new(),
        }
    }

    /// A move of `market` finished at `now`: it stays where it went for `MOVED_STAYS`.
    pub fn moved(&mut self, market: &str, now: Instant) {
        self.moved_at.insert(market.to_string(), now);
    }

    /// One heartbeat of the active rebalancer at `now`. `moving`: a move is in flight (then no
    /// other starts). At most one `Move` is answered.
    /// Only the failovers `tick` would start now: what the rebalancer does when a node's lease
    /// runs out between heartbeats.
    pub fn fail_overs(seen: &Seen, settings: &ClusterSettings, now: Instant) -> Vec<Action> {
        let targets = targets(seen, settings, now);
        let mut actions = Vec::new();
        fail_over(seen, settings, now, &targets, &mut actions);
        actions
    }

    pub fn tick(
        &mut self,
        seen: &Seen,
        settings: &ClusterSettings,
        now: Instant,
        moving: bool,
    ) -> Vec<Action> {
        let targets = targets(seen, settings, now);
        self.live_since.retain(|node, (instance, _)| {
            seen.nodes.is_live_at(now, node, settings.lease)
                && seen
                    .nodes
                    .records
                    .get(node)
                    .is_some_and(|(r, _)| r.instance == *instance)
        });
        for record in seen.nodes.live_at(now, settings.lease) {
            self.live_since
                .entry(record.node.clone())
                .or_insert((record.instance, now));
        }
        let mut actions = Vec::new();
        self.place(seen, &targets, &mut actions);
        fail_over(seen, settings, now, &targets, &mut actions);
        if settings.standbys > 0 {
            keep_standbys(seen, settings, now, &targets, &mut actions);
        }
        if moving {
            return actions;
        }
        if let Some(m) = drain(seen, settings, now, &targets) {
            actions.push(m);
            return actions;
        }
        while self
            .moves
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= Duration::from_secs(60))
        {
            self.moves.pop_front();
        }
        if (self.moves.len() as u32) < settings.max_moves_per_minute
            && let Some(m) = self.fail_back(seen, settings, now, &targets)
        {
            self.moves.push_back(now);
            actions.push(m);
            return actions;
        }
        let every = settings.rebalance_every;
        if !every.is_zero() && now.saturating_duration_since(self.last_load_check) >= every {
            self.last_load_check = now;
            if (self.moves.len() as u32) < settings.max_moves_per_minute
                && let Some(m) = self.balance(seen, settings, now)
            {
                self.moves.push_back(now);
                actions.push(m);
            }
        }
        actions
    }

    /// Markets with a spec and no placement on two heartbeats in a row (the first is left to
    /// `market.add`), by rendezvous hashing over the targets.
    fn place(&mut self, seen: &Seen, targets: &[&str], actions: &mut Vec<Action>) {
        let unplaced: BTreeSet<String> = seen
            .specs
            .iter()
            .filter(|m| !seen.placement.contains_key(*m))
            .cloned()
            .collect();
        for market in unplaced.intersection(&self.unplaced_before) {
            let preferring = preferring(seen, market, targets);
            let Some(node) = placement::rendezvous(market, preferring.iter().copied())
                .or_else(|| placement::rendezvous(market, targets.iter().copied()))
            else {
                break;
            };
            actions.push(Action::Place {
                market: market.clone(),
                node: node.to_string(),
            });
        }
        self.unplaced_before = unplaced;
    }

    /// A market running away from the nodes that prefer it, back to one of them that has been
    /// live for `failback_after` (and not one that finished a move within that time). One at
    /// a time.
    fn fail_back(
        &self,
        seen: &Seen,
        settings: &ClusterSettings,
        now: Instant,
        targets: &[&str],
    ) -> Option<Action> {
        for (market, (p, _)) in &seen.placement {
            if p.state != PlacementState::Active
                || !seen.nodes.is_live_at(now, &p.node, settings.lease)
                || prefers(seen, &p.node, market)
                || self
                    .moved_at
                    .get(market)
                    .is_some_and(|t| now.saturating_duration_since(*t) < settings.failback_after)
            {
                continue;
            }
            let settled: Vec<&str> = preferring(seen, market, targets)
                .into_iter()
                .filter(|n| {
                    self.live_since.get(*n).is_some_and(|(_, since)| {
                        now.saturating_duration_since(*since) >= settings.failback_after
                    })
                })
                .collect();
            if let Some(to) = placement::rendezvous(market, settled.iter().copied()) {
                return Some(Action::Move {
                    market: market.clone(),
                    from: p.node.clone(),
                    to: to.to_string(),
                    reason: MoveReason::Preferred,
                });
            }
        }
        None
    }

    /// A load move when one node has been overloaded long enough: its hottest market whose
    /// move narrows the gap, to the least busy node.
    fn balance(&mut self, seen: &Seen, settings: &ClusterSettings, now: Instant) -> Option<Action> {
        let live: Vec<&NodeRecord> = seen
            .nodes
            .live_at(now, settings.lease)
            .filter(|r| !seen.drained.contains(&r.node))
            .collect();
        if live.len() < 2 {
            self.overloaded = (None, 0);
            return None;
        }
        let mean = live.iter().map(|r| r.commands_per_sec).sum::<f64>() / live.len() as f64;
        let by_load =
            |a: &&&NodeRecord, b: &&&NodeRecord| a.commands_per_sec.total_cmp(&b.commands_per_sec);
        let hot = live.iter().max_by(by_load)?;
        let cool = live.iter().min_by(by_load)?;
        let gap = hot.commands_per_sec - cool.commands_per_sec;
        if hot.commands_per_sec < mean * settings.imbalance_ratio || gap < settings.min_rate_gap {
            self.overloaded = (None, 0);
            return None;
        }
        if self.overloaded.0.as_deref() == Some(hot.node.as_str()) {
            self.overloaded.1 += 1;
        } else {
            self.overloaded = (Some(hot.node.clone()), 1);
        }
        if self.overloaded.1 < OVERLOADED_CHECKS {
            return None;
        }
        // It must not simply swap the roles: only a market below the gap narrows it.
        // A market the hot node prefers stays (it would only come back).
        let market = hot
            .markets
            .iter()
            .filter(|m| m.commands_per_sec > 0.0 && m.commands_per_sec < gap)
            .filter(|m| !hot.prefers.contains(&m.symbol))
            .filter(|m| {
                self.moved_at
                    .get(&m.symbol)
                    .is_none_or(|t| now.saturating_duration_since(*t) > MOVED_STAYS)
            })
            .max_by(|a, b| a.commands_per_sec.total_cmp(&b.commands_per_sec))?;
        self.overloaded = (None, 0);
        Some(Action::Move {
            market: market.symbol.clone(),
            from: hot.node.clone(),
            to: cool.node.clone(),
            reason: MoveReason::Load {
                rate: market.commands_per_sec,
            },
        })
    }
}

/// Whether `node`'s record says it prefers `market`.
fn prefers(seen: &Seen, node: &str, market: &str) -> bool {
    seen.nodes
        .records
        .get(node)
        .is_some_and(|(r, _)| r.prefers.iter().any(|m| m == market))
}

/// The targets that prefer `market`.
fn preferring<'a>(seen: &Seen, market: &str, targets: &[&'a str]) -> Vec<&'a str> {
    targets
        .iter()
        .copied()
        .filter(|n| prefers(seen, n, market))
        .collect()
}

/// Live nodes that may take markets (not drained).
fn targets<'a>(seen: &'a Seen, settings: &ClusterSettings, now: Instant) -> Vec<&'a str> {
    seen.nodes
        .live_at(now, settings.lease)
        .map(|r| r.node.as_str())
        .filter(|n| !seen.drained.contains(*n))
        .collect()
}

/// Every market of a dead node (not heard from for a lease) to a target at the next epoch:
/// its standby first (a warm copy takes over without a snapshot or a replay).
fn fail_over(
    seen: &Seen,
    settings: &ClusterSettings,
    now: Instant,
    targets: &[&str],
    actions: &mut Vec<Action>,
) {
    for (market, (p, revision)) in &seen.placement {
        if seen.nodes.is_live_at(now, &p.node, settings.lease) {
            continue;
        }
        // A warm standby first (the fastest takeover), then a node that prefers the market.
        let standby = p.standby.as_deref().filter(|s| targets.contains(s));
        let preferring = preferring(seen, market, targets);
        let Some(node) = standby
            .or_else(|| placement::rendezvous(market, preferring.iter().copied()))
            .or_else(|| placement::rendezvous(market, targets.iter().copied()))
        else {
            return;
        };
        actions.push(Action::FailOver {
            market: market.clone(),
            from: p.node.clone(),
            to: node.to_string(),
            epoch: p.epoch + 1,
            revision: *revision,
        });
    }
}

/// A standby for every running market that lacks a live one: rendezvous over the targets
/// other than the owner.
fn keep_standbys(
    seen: &Seen,
    settings: &ClusterSettings,
    now: Instant,
    targets: &[&str],
    actions: &mut Vec<Action>,
) {
    for (market, (p, revision)) in &seen.placement {
        if p.state != PlacementState::Active || !seen.nodes.is_live_at(now, &p.node, settings.lease)
        {
            continue;
        }
        let current = p
            .standby
            .as_deref()
            .filter(|s| *s != p.node && targets.contains(s));
        if current.is_some() {
            continue;
        }
        let others = targets.iter().copied().filter(|n| *n != p.node);
        let standby = placement::rendezvous(market, others);
        if standby == p.standby.as_deref() {
            continue;
        }
        actions.push(Action::NameStandby {
            market: market.clone(),
            standby: standby.map(str::to_string),
            revision: *revision,
        });
    }
}

/// The next market of a drained (live) node to move, if any, in market order.
fn drain(
    seen: &Seen,
    settings: &ClusterSettings,
    now: Instant,
    targets: &[&str],
) -> Option<Action> {
    for (market, (p, _)) in &seen.placement {
        if seen.drained.contains(&p.node)
            && p.state == PlacementState::Active
            && seen.nodes.is_live_at(now, &p.node, settings.lease)
        {
            let to = placement::rendezvous(market, targets.iter().copied())?;
            return Some(Action::Move {
                market: market.clone(),
                from: p.node.clone(),
                to: to.to_string(),
                reason: MoveReason::Drain,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::membership::MarketLoad;
    use proptest::prelude::*;

    fn settings() -> ClusterSettings {
        ClusterSettings {
            heartbeat: Duration::from_millis(100),
            lease: Duration::from_millis(500),
            rebalance_every: Duration::from_secs(1),
            imbalance_ratio: 1.5,
            min_rate_gap: 100.0,
            max_moves_per_minute: 2,
            standbys: 1,
            prefer: Vec::new(),
            failback_after: Duration::from_secs(5),
            load_every: Duration::ZERO,
        }
    }

    fn record(node: &str, markets: &[(String, f64)]) -> NodeRecord {
        NodeRecord {
            node: node.to_string(),
            instance: 1,
            started_unix_ms: 0,
            commands_per_sec: markets.iter().map(|(_, r)| r).sum(),
            cpu_pct: 0.0,
            markets: markets
                .iter()
                .map(|(symbol, rate)| MarketLoad {
                    symbol: symbol.clone(),
                    epoch: 1,
                    last_seq: 0,
                    commands_per_sec: *rate,
                    resting_orders: 0,
                    halted: false,
                })
                .collect(),
            following: Vec::new(),
            prefers: Vec::new(),
        }
    }

    /// A random cluster: `nodes` nodes (some dead: last seen a lease ago), markets placed on
    /// them (some unplaced), some drained nodes, random loads. `now` is after every sighting.
    #[derive(Clone, Debug)]
    struct Case {
        nodes: Vec<(bool, bool)>,                               // (alive, drained)
        markets: Vec<(Option<usize>, u64, f64, Option<usize>)>, // (owner, epoch, rate, standby)
    }

    fn case() -> impl Strategy<Value = Case> {
        (1usize..6).prop_flat_map(|n| {
            (
                proptest::collection::vec((any::<bool>(), proptest::bool::weighted(0.2)), n),
                proptest::collection::vec(
                    (
                        proptest::option::weighted(0.85, 0..n),
                        1u64..20,
                        0.0f64..5000.0,
                        proptest::option::weighted(0.5, 0..n),
                    ),
                    0..24,
                ),
            )
                .prop_map(|(nodes, markets)| Case { nodes, markets })
        })
    }

    fn name(i: usize) -> String {
        format!("n{i}")
    }

    fn symbol(i: usize) -> String {
        format!("M{i:02}-USD")
    }

    fn seen_of(case: &Case, now: Instant) -> Seen {
        let lease = settings().lease;
        let mut seen = Seen::default();
        for (i, (alive, drained)) in case.nodes.iter().enumerate() {
            let owned: Vec<(String, f64)> = case
                .markets
                .iter()
                .enumerate()
                .filter(|(_, m)| m.0 == Some(i))
                .map(|(j, m)| (symbol(j), m.2))
                .collect();
            let at = if *alive { now } else { now - lease * 2 };
            seen.nodes
                .records
                .insert(name(i), (record(&name(i), &owned), at));
            if *drained {
                seen.drained.insert(name(i));
            }
        }
        for (j, (owner, epoch, _, standby)) in case.markets.iter().enumerate() {
            seen.specs.insert(symbol(j));
            if let Some(owner) = owner {
                let p = Placement::active(&name(*owner), *epoch)
                    .with_standby(standby.map(name).as_deref());
                seen.placement.insert(symbol(j), (p, j as u64 + 1));
            }
        }
        seen
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Every market of a dead node goes to a live target, at its epoch plus one, over the
        /// record it was read at; no market gets two owners in one heartbeat; a live owner's
        /// market is never failed over.
        #[test]
        fn dead_nodes_markets_all_go_to_live_targets_once(case in case()) {
            let base = Instant::now();
            let now = base + Duration::from_secs(10);
            let seen = seen_of(&case, now);
            let settings = settings();
            let mut planner = Planner::new(now);
            let actions = planner.tick(&seen, &settings, now, false);
            let targets = targets(&seen, &settings, now);
            let mut owned_by: BTreeMap<&str, usize> = BTreeMap::new();
            for a in &actions {
                match a {
                    Action::FailOver { market, from, to, epoch, revision } => {
                        let (p, r) = &seen.placement[market];
                        prop_assert_eq!(&p.node, from);
                        prop_assert!(!seen.nodes.is_live_at(now, from, settings.lease));
                        prop_assert!(targets.contains(&to.as_str()), "{} is not a target", to);
                        prop_assert_eq!(*epoch, p.epoch + 1);
                        prop_assert_eq!(revision, r);
                        *owned_by.entry(market).or_default() += 1;
                    }
                    Action::Move { market, to, .. } => {
                        prop_assert!(targets.contains(&to.as_str()));
                        *owned_by.entry(market).or_default() += 1;
                    }
                    Action::Place { market, node } => {
                        prop_assert!(targets.contains(&node.as_str()));
                        *owned_by.entry(market).or_default() += 1;
                    }
                    Action::NameStandby { market, standby, .. } => {
                        let (p, _) = &seen.placement[market];
                        prop_assert!(standby.as_deref() != Some(p.node.as_str()));
                    }
                }
            }
            prop_assert!(owned_by.values().all(|n| *n == 1), "two owners: {:?}", actions);
            if !targets.is_empty() {
                for (market, (p, _)) in &seen.placement {
                    if !seen.nodes.is_live_at(now, &p.node, settings.lease) {
                        prop_assert!(
                            actions.iter().any(|a| matches!(a, Action::FailOver { market: m, .. } if m == market)),
                            "{} on dead {} not failed over", market, p.node
                        );
                    }
                }
            }
            // A failover prefers a live standby.
            for a in &actions {
                if let Action::FailOver { market, to, .. } = a {
                    let (p, _) = &seen.placement[market];
                    if let Some(s) = p.standby.as_deref().filter(|s| targets.contains(s)) {
                        prop_assert_eq!(to.as_str(), s);
                    }
                }
            }
        }

        /// Over ten simulated minutes of random, shifting loads: at most
        /// `max_moves_per_minute` load moves in any minute, none while a move is in flight,
        /// a market moved stays `MOVED_STAYS`, and a move goes from the busiest node to the
        /// least busy with a market below their gap.
        #[test]
        fn load_moves_never_storm(seed in any::<u64>(), nodes in 2usize..5) {
            let settings = settings();
            let base = Instant::now();
            let mut planner = Planner::new(base);
            let mut rng = seed | 1;
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let markets = 12;
            let mut owner: Vec<usize> = (0..markets).map(|m| m % nodes).collect();
            let mut moves_at: Vec<Instant> = Vec::new();
            let mut last_move: HashMap<String, Instant> = HashMap::new();
            let mut in_flight: Option<(String, usize, Instant)> = None;
            for step in 0..6000u64 {
                let now = base + settings.heartbeat * step as u32;
                // Loads drift: one market in three changes its rate each second.
                let rates: Vec<f64> = (0..markets)
                    .map(|m| ((next() % 4000) as f64) * f64::from(u8::from(m % 3 == (step / 10 % 3) as usize)) + 10.0)
                    .collect();
                let mut seen = Seen::default();
                for n in 0..nodes {
                    let owned: Vec<(String, f64)> = (0..markets)
                        .filter(|m| owner[*m] == n)
                        .map(|m| (symbol(m), rates[m]))
                        .collect();
                    seen.nodes.records.insert(name(n), (record(&name(n), &owned), now));
                }
                for (m, node) in owner.iter().enumerate() {
                    seen.specs.insert(symbol(m));
                    seen.placement.insert(symbol(m), (Placement::active(&name(*node), 1), 1));
                }
                // A move takes two seconds.
                if let Some((market, to, started)) = in_flight.take() {
                    if now.duration_since(started) >= Duration::from_secs(2) {
                        let m: usize = market[1..3].parse().unwrap_or(0);
                        owner[m] = to;
                        planner.moved(&market, now);
                        last_move.insert(market, now);
                    } else {
                        in_flight = Some((market, to, started));
                    }
                }
                let actions = planner.tick(&seen, &settings, now, in_flight.is_some());
                let load_moves: Vec<_> = actions.iter().filter(|a| matches!(a, Action::Move { .. })).collect();
                prop_assert!(load_moves.len() <= 1);
                if let Some(Action::Move { market, from, to, reason }) = load_moves.first() {
                    prop_assert!(in_flight.is_none(), "a move started while one is in flight");
                    let MoveReason::Load { rate } = reason else {
                        return Err(TestCaseError::fail("only load moves here"));
                    };
                    let hot = &seen.nodes.records[from].0;
                    let cool = &seen.nodes.records[to].0;
                    prop_assert!(hot.commands_per_sec >= cool.commands_per_sec);
                    prop_assert!(*rate < hot.commands_per_sec - cool.commands_per_sec);
                    if let Some(t) = last_move.get(market) {
                        prop_assert!(now.duration_since(*t) > MOVED_STAYS, "{} moved again after {:?}", market, now.duration_since(*t));
                    }
                    moves_at.push(now);
                    let to_index: usize = to[1..].parse().unwrap_or(0);
                    in_flight = Some((market.clone(), to_index, now));
                }
                let minute_ago = now.checked_sub(Duration::from_secs(60)).unwrap_or(base);
                let recent = moves_at.iter().filter(|t| **t > minute_ago).count();
                prop_assert!(recent as u32 <= settings.max_moves_per_minute, "{} moves in a minute", recent);
            }
        }
    }

    #[test]
    fn an_unplaced_market_is_placed_on_the_second_heartbeat_only() {
        let settings = settings();
        let now = Instant::now();
        let mut seen = Seen::default();
        seen.nodes
            .records
            .insert("n1".into(), (record("n1", &[]), now));
        seen.specs.insert("BTC-USDC".into());
        let mut planner = Planner::new(now);
        assert!(planner.tick(&seen, &settings, now, false).is_empty());
        let actions = planner.tick(&seen, &settings, now, false);
        assert_eq!(
            actions,
            [Action::Place {
                market: "BTC-USDC".into(),
                node: "n1".into()
            }]
        );
    }

    #[test]
    fn a_drained_node_is_emptied_one_market_at_a_time() {
        let settings = ClusterSettings {
            standbys: 0,
            ..settings()
        };
        let now = Instant::now();
        let mut seen = Seen::default();
        for n in ["n1", "n2"] {
            seen.nodes.records.insert(n.into(), (record(n, &[]), now));
        }
        for m in ["A-USD", "B-USD"] {
            seen.specs.insert(m.into());
            seen.placement
                .insert(m.into(), (Placement::active("n1", 1), 1));
        }
        seen.drained.insert("n1".into());
        let mut planner = Planner::new(now);
        let first = planner.tick(&seen, &settings, now, false);
        assert_eq!(
            first,
            [Action::Move {
                market: "A-USD".into(),
                from: "n1".into(),
                to: "n2".into(),
                reason: MoveReason::Drain
            }]
        );
        // While it moves, nothing else starts.
        assert!(planner.tick(&seen, &settings, now, true).is_empty());
    }

    #[test]
    fn a_node_counts_as_dead_once_a_whole_lease_passed() {
        let settings = settings();
        let seen_at = Instant::now();
        let mut view = NodeView::default();
        view.records
            .insert("n1".into(), (record("n1", &[]), seen_at));
        assert!(view.is_live_at(seen_at + settings.lease / 2, "n1", settings.lease));
        assert!(!view.is_live_at(seen_at + settings.lease, "n1", settings.lease));
        assert!(!view.is_live_at(seen_at, "n2", settings.lease));
    }

    /// The rebalancer wakes when the first live node's lease runs out, and the failovers it
    /// then starts are exactly `tick`'s, with nothing else (no placement, no move).
    #[test]
    fn a_lapsed_lease_is_seen_at_its_expiry_and_fails_over_only() {
        let settings = ClusterSettings {
            standbys: 0,
            ..settings()
        };
        let t0 = Instant::now();
        let mut seen = Seen::default();
        seen.nodes
            .records
            .insert("n1".into(), (record("n1", &[]), t0));
        let n2_seen = t0 + settings.heartbeat;
        seen.nodes
            .records
            .insert("n2".into(), (record("n2", &[]), n2_seen));
        assert_eq!(
            seen.nodes.next_expiry(t0, settings.lease),
            Some(t0 + settings.lease)
        );
        // Once n1 lapsed, the next to lapse is n2; once both did, nothing is left to wake for.
        let lapsed = t0 + settings.lease;
        assert_eq!(
            seen.nodes.next_expiry(lapsed, settings.lease),
            Some(n2_seen + settings.lease)
        );
        assert_eq!(
            seen.nodes
                .next_expiry(n2_seen + settings.lease, settings.lease),
            None
        );

        seen.specs.insert("A-USD".into());
        seen.specs.insert("NEW-USD".into());
        seen.placement
            .insert("A-USD".into(), (Placement::active("n1", 3), 7));
        // Just before the expiry n1 is live: nothing to do.
        let before = lapsed - Duration::from_millis(1);
        assert!(Planner::fail_overs(&seen, &settings, before).is_empty());
        let after = lapsed + Duration::from_millis(1);
        let failovers = Planner::fail_overs(&seen, &settings, after);
        assert_eq!(
            failovers,
            [Action::FailOver {
                market: "A-USD".into(),
                from: "n1".into(),
                to: "n2".into(),
                epoch: 4,
                revision: 7,
            }]
        );
        // The heartbeat's tick would also place NEW-USD (on its second look); the failover pass
        // leaves that to it.
        let mut planner = Planner::new(t0);
        planner.tick(&seen, &settings, after, false);
        let ticked = planner.tick(&seen, &settings, after, false);
        assert!(ticked.contains(&failovers[0]), "{ticked:?}");
        assert!(ticked.len() > failovers.len(), "{ticked:?}");
    }

    /// n1 live at `now`, and n2 (as process `instance`, preferring A-USD) when given.
    fn two_nodes(seen: &mut Seen, now: Instant, n2: Option<u64>) {
        seen.nodes
            .records
            .insert("n1".into(), (record("n1", &[]), now));
        if let Some(instance) = n2 {
            let mut r = record("n2", &[]);
            r.instance = instance;
            r.prefers = vec!["A-USD".into()];
            seen.nodes.records.insert("n2".into(), (r, now));
        }
    }

    #[test]
    fn a_preferred_market_is_placed_there_fails_over_and_comes_back_after_the_hysteresis() {
        let settings = ClusterSettings {
            standbys: 0,
            rebalance_every: Duration::ZERO,
            ..settings()
        };
        let t0 = Instant::now();
        let mut planner = Planner::new(t0);
        let mut seen = Seen::default();
        seen.specs.insert("A-USD".into());
        two_nodes(&mut seen, t0, Some(1));
        assert!(planner.tick(&seen, &settings, t0, false).is_empty());
        let t = t0 + Duration::from_millis(100);
        two_nodes(&mut seen, t, Some(1));
        assert_eq!(
            planner.tick(&seen, &settings, t, false),
            vec![Action::Place {
                market: "A-USD".into(),
                node: "n2".into()
            }],
            "placed on the node that prefers it"
        );
        seen.placement
            .insert("A-USD".into(), (Placement::active("n2", 1), 1));
        // n2 dies: its record stops being renewed.
        let t = t0 + Duration::from_secs(1);
        seen.nodes
            .records
            .insert("n1".into(), (record("n1", &[]), t));
        assert_eq!(
            planner.tick(&seen, &settings, t, false),
            vec![Action::FailOver {
                market: "A-USD".into(),
                from: "n2".into(),
                to: "n1".into(),
                epoch: 2,
                revision: 1
            }]
        );
        seen.placement
            .insert("A-USD".into(), (Placement::active("n1", 2), 2));
        // n2 comes back (a new process): nothing moves before it has been live for
        // failback_after (5 s here), even when it flaps in between.
        let back = t0 + Duration::from_secs(2);
        let mut now = back;
        while now < back + Duration::from_secs(3) {
            two_nodes(&mut seen, now, Some(2));
            assert!(planner.tick(&seen, &settings, now, false).is_empty());
            now += Duration::from_millis(100);
        }
        // It dies again for a second, and comes back as another process: the clock restarts.
        now += Duration::from_secs(1);
        two_nodes(&mut seen, now, None);
        seen.nodes.records.remove("n2");
        assert!(planner.tick(&seen, &settings, now, false).is_empty());
        let again = now + Duration::from_millis(100);
        now = again;
        while now < again + Duration::from_millis(4900) {
            two_nodes(&mut seen, now, Some(3));
            assert!(
                planner.tick(&seen, &settings, now, false).is_empty(),
                "no failback {:?} after it came back",
                now - again
            );
            now += Duration::from_millis(100);
        }
        now = again + Duration::from_secs(5);
        two_nodes(&mut seen, now, Some(3));
        assert_eq!(
            planner.tick(&seen, &settings, now, false),
            vec![Action::Move {
                market: "A-USD".into(),
                from: "n1".into(),
                to: "n2".into(),
                reason: MoveReason::Preferred
            }]
        );
        // Moved back: it stays, and nothing else moves.
        seen.placement
            .insert("A-USD".into(), (Placement::active("n2", 3), 3));
        planner.moved("A-USD", now);
        now += Duration::from_millis(100);
        two_nodes(&mut seen, now, Some(3));
        assert!(planner.tick(&seen, &settings, now, false).is_empty());
    }

    #[test]
    fn a_market_its_hot_node_prefers_is_not_moved_for_load() {
        let settings = ClusterSettings {
            standbys: 0,
            ..settings()
        };
        let t0 = Instant::now();
        let mut planner = Planner::new(t0);
        let mut seen = Seen::default();
        for m in ["A-USD", "B-USD"] {
            seen.specs.insert(m.into());
            seen.placement
                .insert(m.into(), (Placement::active("n1", 1), 1));
        }
        let mut moves = Vec::new();
        for i in 1..=10u32 {
            let now = t0 + Duration::from_secs(u64::from(i));
            let mut hot = record("n1", &[("A-USD".into(), 900.0), ("B-USD".into(), 300.0)]);
            hot.prefers = vec!["B-USD".into()];
            seen.nodes.records.insert("n1".into(), (hot, now));
            let cool = record("n2", &[("C-USD".into(), 400.0)]);
            seen.nodes.records.insert("n2".into(), (cool, now));
            moves.extend(planner.tick(&seen, &settings, now, false));
        }
        // The gap is 800: A-USD (900) does not fit; B-USD fits but n1 prefers it.
        assert!(moves.is_empty(), "{moves:?}");
    }
}
