//! The runtime's actors (actix on tokio): one `MarketActor` per market, each a thin shell around
//! a pure `MarketCore`, fed by a driver from the market's JetStream order stream.
//!
//! Actors decode, stamp, call the pure core and hand the results to the bus; they never match
//! orders themselves and never hold state the streams cannot rebuild.

pub mod core;
pub mod market;

pub use self::core::{Incoming, MarketCore};
pub use market::{MarketActor, MarketError, MarketSettings, RunningMarket};
