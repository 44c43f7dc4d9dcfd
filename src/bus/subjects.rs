//! Subject and stream names: `<prefix>.orders.<MARKET>`, `<prefix>.execs.<ACCOUNT>.<MARKET>`, ...
//! The prefix (default `agora`) lets several deployments share one NATS. Stream names are those
//! of `docs/protocol.md` (`ORDERS_<MARKET>`, `EVENTS`, `EXECS`, `TRADES`) for the default prefix, and
//! carry the prefix otherwise (`<PREFIX>_EVENTS`), so deployments never share a stream.
//! This module must never build a subject from an unchecked token.

use super::error::BusError;

pub const DEFAULT_PREFIX: &str = "agora";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
    stream_prefix: String,
}

/// Whether `token` can stand as one subject token (no dot, wildcard, space or control).
fn is_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl Default for Subjects {
    fn default() -> Subjects {
        Subjects {
            prefix: DEFAULT_PREFIX.into(),
            stream_prefix: String::new(),
        }
    }
}

impl Subjects {
    /// Subjects under `prefix`, one or more tokens separated by dots (`agora`, `venue1.agora`).
    pub fn new(prefix: &str) -> Result<Subjects, BusError> {
        if !prefix.split('.').all(is_token) {
            return Err(BusError::Name {
                what: "subject prefix",
                value: prefix.into(),
                rule: "use tokens of letters, digits, '-' and '_' separated by dots, such as \"agora\"",
            });
        }
        let stream_prefix = if prefix == DEFAULT_PREFIX {
            String::new()
        } else {
            format!("{}_", prefix.replace(['.', '-'], "_").to_ascii_uppercase())
        };
        Ok(Subjects {
            prefix: prefix.into(),
            stream_prefix,
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Checks that a market symbol or account can stand as a subject token.
    pub fn check_token(what: &'static str, token: &str) -> Result<(), BusError> {
        if is_token(token) {
            Ok(())
        } else {
            Err(BusError::Name {
                what,
                value: token.into(),
                rule: "use letters, digits, '-' and '_' only",
            })
        }
    }

    /// Where clients send a market's commands.
    pub fn orders(&self, market: &str) -> String {
        format!("{}.orders.{market}", self.prefix)
    }
    /// An account's own order subject in a market: NATS permissions can let a trader publish
    /// only here (`<prefix>.orders.*.<ACCOUNT>`), and the engine then refuses any command in it
    /// for another account.
    pub fn orders_for(&self, market: &str, account: &str) -> String {
        format!("{}.orders.{market}.{account}", self.prefix)
    }
    /// Where operators' commands for a market go (halt, resume): in the market's order stream,
    /// sequenced with the orders, and writable only by operators (NATS permissions).
    pub fn admin(&self, market: &str) -> String {
        format!("{}.admin.{market}", self.prefix)
    }
    /// The market's journal: one message per processed batch.
    pub fn events(&self, market: &str) -> String {
        format!("{}.events.{market}", self.prefix)
    }
    /// An account's execution reports in one market.
    pub fn execs(&self, account: &str, market: &str) -> String {
        format!("{}.execs.{account}.{market}", self.prefix)
    }
    /// Everything an account may read of its reports: `<prefix>.execs.<ACCOUNT>.>`.
    pub fn execs_of(&self, account: &str) -> String {
        format!("{}.execs.{account}.>", self.prefix)
    }
    pub fn trades(&self, market: &str) -> String {
        format!("{}.trades.{market}", self.prefix)
    }
    /// Where the engine publishes what the streams store (`capture_*`): the same subjects with
    /// `capture.` after the prefix. Only the streams listen there; each stores a message under
    /// its public subject and republishes it there once, however often the engine sent it.
    pub fn capture_events(&self, market: &str) -> String {
        format!("{}.capture.events.{market}", self.prefix)
    }
    pub fn capture_execs(&self, account: &str, market: &str) -> String {
        format!("{}.capture.execs.{account}.{market}", self.prefix)
    }
    pub fn capture_trades(&self, market: &str) -> String {
        format!("{}.capture.trades.{market}", self.prefix)
    }
    /// What a view stream listens to and what it republishes onto, for `kind` (`events`,
    /// `execs`, `trades`): `<prefix>.capture.<kind>.>` and `<prefix>.<kind>.>`. The stream's
    /// subject transform maps one onto the other token for token, so every `capture_*`
    /// subject above lands on its public subject.
    pub fn capture_and_public(&self, kind: &str) -> (String, String) {
        (
            format!("{}.capture.{kind}.>", self.prefix),
            format!("{}.{kind}.>", self.prefix),
        )
    }
    pub fn book(&self, market: &str) -> String {
        format!("{}.book.{market}", self.prefix)
    }
    pub fn book_snapshot(&self, market: &str) -> String {
        format!("{}.book.{market}.snapshot", self.prefix)
    }
    /// A market's own query responder, asked by the nodes' query fronts (not by clients).
    pub fn market_orders(&self, market: &str) -> String {
        format!("{}.market.{market}.orders", self.prefix)
    }
    /// A query about an account: `<prefix>.query.<ACCOUNT>.orders` or `.order`.
    pub fn query(&self, account: &str, kind: &str) -> String {
        format!("{}.query.{account}.{kind}", self.prefix)
    }
    pub fn status(&self, market: &str) -> String {
        format!("{}.status.{market}", self.prefix)
    }
    /// Messages that could not even be read far enough to find their account.
    pub fn rejects(&self, market: &str) -> String {
        format!("{}.rejects.{market}", self.prefix)
    }
    /// A request to one node's cluster agent: `<prefix>.node.<NODE>.release`.
    pub fn node(&self, node: &str, verb: &str) -> String {
        format!("{}.node.{node}.{verb}", self.prefix)
    }
    /// A control verb: `<prefix>.ctl.market.add`.
    pub fn ctl(&self, verb: &str) -> String {
        format!("{}.ctl.{verb}", self.prefix)
    }

    pub fn orders_stream(&self, market: &str) -> String {
        format!("{}ORDERS_{market}", self.stream_prefix)
    }
    pub fn events_stream(&self) -> String {
        format!("{}EVENTS", self.stream_prefix)
    }
    pub fn execs_stream(&self) -> String {
        format!("{}EXECS", self.stream_prefix)
    }
    pub fn trades_stream(&self) -> String {
        format!("{}TRADES", self.stream_prefix)
    }
    /// KV bucket names: `agora_markets`, `agora_placement`, `agora_nodes` for the default prefix.
    pub fn bucket(&self, name: &str) -> String {
        format!("{}_{name}", self.prefix.replace(['.', '-'], "_"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_protocol() {
        let s = Subjects::default();
        assert_eq!(s.orders("BTC-USDC"), "agora.orders.BTC-USDC");
        assert_eq!(s.execs("acct-1", "BTC-USDC"), "agora.execs.acct-1.BTC-USDC");
        assert_eq!(s.execs_of("acct-1"), "agora.execs.acct-1.>");
        assert_eq!(s.book_snapshot("ETH-USDC"), "agora.book.ETH-USDC.snapshot");
        assert_eq!(
            s.capture_execs("acct-1", "BTC-USDC"),
            "agora.capture.execs.acct-1.BTC-USDC"
        );
        assert_eq!(
            s.capture_events("BTC-USDC"),
            "agora.capture.events.BTC-USDC"
        );
        assert_eq!(
            s.capture_trades("BTC-USDC"),
            "agora.capture.trades.BTC-USDC"
        );
        assert_eq!(s.ctl("market.add"), "agora.ctl.market.add");
        assert_eq!(s.orders_stream("BTC-USDC"), "ORDERS_BTC-USDC");
        assert_eq!(s.events_stream(), "EVENTS");
        assert_eq!(s.bucket("placement"), "agora_placement");
        let t = Subjects::new("venue-1.agora").unwrap();
        assert_eq!(t.events_stream(), "VENUE_1_AGORA_EVENTS");
        assert_eq!(t.bucket("nodes"), "venue_1_agora_nodes");
        assert!(Subjects::new("agora.>").is_err());
        assert!(Subjects::new("").is_err());
        assert!(Subjects::check_token("market", "BTC.USDC").is_err());
    }

    /// Each capture subject, put through its stream's transform (the wildcard tail kept),
    /// is the public subject of the same view.
    #[test]
    fn capture_subjects_land_on_their_public_subjects() {
        let s = Subjects::new("venue.agora").unwrap();
        let land = |kind: &str, captured: String| {
            let (capture, public) = s.capture_and_public(kind);
            let tail = captured
                .strip_prefix(capture.trim_end_matches('>'))
                .unwrap_or_else(|| panic!("{captured} is not under {capture}"));
            format!("{}{tail}", public.trim_end_matches('>'))
        };
        assert_eq!(
            land("events", s.capture_events("BTC-USDC")),
            s.events("BTC-USDC")
        );
        assert_eq!(
            land("execs", s.capture_execs("alice", "BTC-USDC")),
            s.execs("alice", "BTC-USDC")
        );
        assert_eq!(
            land("trades", s.capture_trades("BTC-USDC")),
            s.trades("BTC-USDC")
        );
    }
}
