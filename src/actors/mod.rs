//! The runtime's actors (actix on tokio): a `Supervisor` per node, and one `MarketActor` per
//! market, each a thin shell around a pure `MarketCore`, fed by a driver from the market's
//! JetStream order stream.
//!
//! Actors decode, stamp, call the pure core and hand the results to the bus; they never match
//! orders themselves and never hold state the streams cannot rebuild.

pub mod core;
pub mod lease;
pub mod market;
pub mod metrics;
pub mod supervisor;
pub mod takeover;

pub use self::core::{Incoming, MarketCore};
pub use lease::Lease;
pub use market::{
    MarketActor, MarketBus, MarketControl, MarketError, MarketSettings, RunningMarket,
    SnapshotBudget,
};
pub use supervisor::{
    Follow, FollowAhead, FollowerLag, Held, ListMarkets, ListMarketsBrief, MarketInfo, Shutdown,
    StartMarket, StopMarket, Supervisor, Unfollow,
};
pub use takeover::{StopPoint, Takeover, TakeoverKind};
