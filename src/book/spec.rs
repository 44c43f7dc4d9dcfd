//! The market spec: what a market trades and the rules its orders must meet.
//!
//! `MarketSpecInput` is the form people write (config files, `market.add`, `agora replay
//! --market`): decimal strings, optional fields with defaults. `MarketSpec` is the validated,
//! integer form the book runs on. Validation names every field it refuses; this module must
//! never accept a spec under which some order could not be checked exactly.

use serde::{Deserialize, Serialize};

use super::num::{DECIMALS_MAX, DecimalError, Price, Qty, format_decimal, parse_decimal, pow10};
use super::types::StpMode;

/// Default cap on open orders (resting and stop) in one market.
pub const ORDERS_MAX_DEFAULT: u32 = 1_000_000;

/// The cid window of a market created by this build when its spec names none: long enough
/// for any client's retry (JetStream's own default duplicate window is as long).
pub const CID_WINDOW_SECS_DEFAULT: u32 = 120;

/// Default cap on the cid window's entries: ~90 bytes each, so ~18 MB for a market that
/// receives more than 1,600 orders with a cid a second for the whole window.
pub const CID_WINDOW_ORDERS_DEFAULT: u32 = 200_000;

/// Limits on the cid window (a day; ten million entries).
pub const CID_WINDOW_SECS_MAX: u32 = 86_400;
pub const CID_WINDOW_ORDERS_MAX: u32 = 10_000_000;

/// Limits on the per-account limits: a billion commands a second (one a nanosecond), a
/// burst of a million, a million open orders.
pub const ACCOUNT_RATE_MAX: u32 = 1_000_000_000;
pub const ACCOUNT_BURST_MAX: u32 = 1_000_000;
pub const ACCOUNT_OPEN_ORDERS_MAX: u32 = 1_000_000;

/// The most symbols characters; a symbol names a NATS subject token and a stream.
pub const SYMBOL_LEN_MAX: usize = 32;

/// A market spec as written by people: decimal strings, defaults filled in by `validate`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarketSpecInput {
    pub symbol: String,
    #[serde(default)]
    pub base_token: Option<String>,
    #[serde(default)]
    pub quote_token: Option<String>,
    pub price_decimals: u8,
    pub size_decimals: u8,
    /// Smallest price step; default one unit of the last price decimal.
    #[serde(default)]
    pub tick_size: Option<String>,
    /// Smallest quantity step; default one unit of the last size decimal.
    #[serde(default)]
    pub lot_size: Option<String>,
    /// Smallest order quantity; default one lot.
    #[serde(default)]
    pub min_qty: Option<String>,
    /// Largest order quantity; default none.
    #[serde(default)]
    pub max_qty: Option<String>,
    /// Price protection band in percent (up to 2 decimals), e.g. `"5"` or `"2.5"`.
    #[serde(default)]
    pub price_band_pct: Option<String>,
    /// Self-trade prevention applied when an order names none; default `none`.
    #[serde(default)]
    pub stp_default: Option<StpMode>,
    /// Cap on open orders in the market; default 1,000,000.
    #[serde(default)]
    pub orders_max: Option<u32>,
    /// How long (seconds of stream time) a `new` is remembered by (account, cid), so that a
    /// retry is rejected `duplicate_cid` even after the first order closed; 0 turns it off.
    /// Absent: off here; a market created by `market.add` or a node's configuration gets
    /// `CID_WINDOW_SECS_DEFAULT` (see `for_new_market`), and `update_spec` keeps the current.
    #[serde(default)]
    pub cid_window_secs: Option<u32>,
    /// The most `new`s the window remembers (the oldest are forgotten first); default 200,000.
    #[serde(default)]
    pub cid_window_orders: Option<u32>,
    /// Commands (`new` and `amend`; cancels never count) one account may send per second,
    /// measured in stream time; 0 or absent: no limit. A market created now takes the node's
    /// `[market_defaults]` when its spec leaves it out.
    #[serde(default)]
    pub account_rate_per_sec: Option<u32>,
    /// How many such commands an account may send at once above that rate; default: one
    /// second's worth (`account_rate_per_sec`).
    #[serde(default)]
    pub account_burst: Option<u32>,
    /// Open orders (resting and waiting stops) one account may hold in the market; 0 or
    /// absent: no limit beyond `orders_max`.
    #[serde(default)]
    pub account_open_orders_max: Option<u32>,
}

/// What a market created now gets for the fields its spec leaves out (`for_new_market`):
/// the node's `[market_defaults]`, or these built-in ones (a cid window of 120 s, no
/// per-account limits).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MarketDefaults {
    pub cid_window_secs: u32,
    pub account_rate_per_sec: u32,
    pub account_burst: u32,
    pub account_open_orders_max: u32,
}

impl Default for MarketDefaults {
    fn default() -> MarketDefaults {
        MarketDefaults {
            cid_window_secs: CID_WINDOW_SECS_DEFAULT,
            account_rate_per_sec: 0,
            account_burst: 0,
            account_open_orders_max: 0,
        }
    }
}

/// A validated market spec, in integer units.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketSpec {
    pub symbol: String,
    pub base_token: String,
    pub quote_token: String,
    pub price_decimals: u8,
    pub size_decimals: u8,
    pub tick: Price,
    pub lot: Qty,
    pub min_qty: Qty,
    pub max_qty: Option<Qty>,
    /// Price band in basis points of the reference price (`price_band_pct` × 100).
    pub price_band_bps: Option<u32>,
    pub stp_default: StpMode,
    pub orders_max: u32,
    /// The cid window in seconds, 0 when off (specs and snapshots of older builds).
    #[serde(default)]
    pub cid_window_secs: u32,
    /// The most entries of the cid window.
    #[serde(default = "cid_window_orders_default")]
    pub cid_window_orders: u32,
    /// Per-account limits (0: none): `new`s and `amend`s per second of stream time and the
    /// burst above it, and open orders. Absent from specs of older builds: none.
    #[serde(default)]
    pub account_rate: u32,
    #[serde(default)]
    pub account_burst: u32,
    #[serde(default)]
    pub account_orders_max: u32,
}

fn cid_window_orders_default() -> u32 {
    CID_WINDOW_ORDERS_DEFAULT
}

/// The part of a spec that `market.update` may change, in integer units: everything but the
/// symbol, the tokens and the decimals (prices and quantities are counted in units of those,
/// in the book and on the wire, so changing them would change what every number means).
/// Small and on the stack, so a command can carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecRules {
    pub tick: Price,
    pub lot: Qty,
    pub min_qty: Qty,
    pub max_qty: Option<Qty>,
    pub price_band_bps: Option<u32>,
    pub stp_default: StpMode,
    pub orders_max: u32,
    pub cid_window_secs: u32,
    pub cid_window_orders: u32,
    pub account_rate: u32,
    pub account_burst: u32,
    pub account_orders_max: u32,
}

/// A spec field that broke a rule: which field, the value, and what is allowed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SpecError {
    pub field: &'static str,
    pub message: String,
}

fn err(field: &'static str, message: String) -> SpecError {
    SpecError { field, message }
}

impl MarketSpecInput {
    /// The seed style spec with every optional field left to its default.
    pub fn new(symbol: &str, price_decimals: u8, size_decimals: u8) -> MarketSpecInput {
        MarketSpecInput {
            symbol: symbol.to_string(),
            base_token: None,
            quote_token: None,
            price_decimals,
            size_decimals,
            tick_size: None,
            lot_size: None,
            min_qty: None,
            max_qty: None,
            price_band_pct: None,
            stp_default: None,
            orders_max: None,
            cid_window_secs: None,
            cid_window_orders: None,
            account_rate_per_sec: None,
            account_burst: None,
            account_open_orders_max: None,
        }
    }

    /// This spec for a market being created now, with the built-in defaults: a cid window
    /// left unset gets 120 s (an unset window means off only for specs stored by builds that
    /// had none).
    pub fn for_new_market(self) -> MarketSpecInput {
        self.with_defaults(&MarketDefaults::default())
    }

    /// This spec for a market being created now: what it leaves unset of the cid window and
    /// the per-account limits comes from `defaults` (a node's `[market_defaults]`).
    pub fn with_defaults(mut self, defaults: &MarketDefaults) -> MarketSpecInput {
        self.cid_window_secs.get_or_insert(defaults.cid_window_secs);
        if self.account_rate_per_sec.is_none() && defaults.account_rate_per_sec > 0 {
            self.account_rate_per_sec = Some(defaults.account_rate_per_sec);
            if self.account_burst.is_none() && defaults.account_burst > 0 {
                self.account_burst = Some(defaults.account_burst);
            }
        }
        if self.account_open_orders_max.is_none() && defaults.account_open_orders_max > 0 {
            self.account_open_orders_max = Some(defaults.account_open_orders_max);
        }
        self
    }

    pub fn validate(&self) -> Result<MarketSpec, SpecError> {
        let symbol = self.symbol.as_str();
        validate_symbol(symbol)?;
        for (field, value) in [
            ("price_decimals", self.price_decimals),
            ("size_decimals", self.size_decimals),
        ] {
            if value > DECIMALS_MAX {
                return Err(err(
                    field,
                    format!("{field} = {value} in {symbol}; at most {DECIMALS_MAX} are allowed"),
                ));
            }
        }
        let (base, quote) = tokens_of(symbol);
        let base_token = self.base_token.clone().unwrap_or(base);
        let quote_token = self.quote_token.clone().unwrap_or(quote);
        for (field, token) in [("base_token", &base_token), ("quote_token", &quote_token)] {
            if token.is_empty()
                || token.len() > SYMBOL_LEN_MAX
                || token.chars().any(|c| c.is_whitespace())
            {
                return Err(err(
                    field,
                    format!(
                        "{field} {token:?} in {symbol} must be 1 to {SYMBOL_LEN_MAX} characters without spaces"
                    ),
                ));
            }
        }
        let pd = self.price_decimals;
        let sd = self.size_decimals;
        let amount = |field: &'static str,
                      value: &Option<String>,
                      decimals: u8|
         -> Result<Option<u64>, SpecError> {
            let Some(text) = value else { return Ok(None) };
            let units = parse_decimal(text, decimals)
                .map_err(|e: DecimalError| err(field, e.describe(field, text, symbol)))?;
            if units == 0 {
                return Err(err(
                    field,
                    format!("{field} {text} in {symbol} must be above zero"),
                ));
            }
            Ok(Some(units))
        };
        let tick = amount("tick_size", &self.tick_size, pd)?.unwrap_or(1);
        let lot = amount("lot_size", &self.lot_size, sd)?.unwrap_or(1);
        let min_qty = amount("min_qty", &self.min_qty, sd)?.unwrap_or(lot);
        let max_qty = amount("max_qty", &self.max_qty, sd)?;
        if min_qty % lot != 0 {
            return Err(err(
                "min_qty",
                format!(
                    "min_qty {} in {symbol} is not a multiple of lot_size {}",
                    format_decimal(min_qty, sd),
                    format_decimal(lot, sd)
                ),
            ));
        }
        if let Some(max) = max_qty
            && (max % lot != 0 || max < min_qty)
        {
            return Err(err(
                "max_qty",
                format!(
                    "max_qty {} in {symbol} must be a multiple of lot_size {} and at least min_qty {}",
                    format_decimal(max, sd),
                    format_decimal(lot, sd),
                    format_decimal(min_qty, sd)
                ),
            ));
        }
        let price_band_bps = match &self.price_band_pct {
            None => None,
            Some(text) => {
                let bps = parse_decimal(text, 2).map_err(|e| {
                    err("price_band_pct", e.describe("price_band_pct", text, symbol))
                })?;
                if bps == 0 || bps >= 10_000 {
                    return Err(err(
                        "price_band_pct",
                        format!("price_band_pct {text} in {symbol} must be above 0 and below 100"),
                    ));
                }
                Some(bps as u32)
            }
        };
        let orders_max = self.orders_max.unwrap_or(ORDERS_MAX_DEFAULT);
        if orders_max == 0 || orders_max >= u32::MAX - 1 {
            return Err(err(
                "orders_max",
                format!(
                    "orders_max {orders_max} in {symbol} must be between 1 and {}",
                    u32::MAX - 2
                ),
            ));
        }
        let cid_window_secs = self.cid_window_secs.unwrap_or(0);
        if cid_window_secs > CID_WINDOW_SECS_MAX {
            return Err(err(
                "cid_window_secs",
                format!(
                    "cid_window_secs {cid_window_secs} in {symbol} must be at most {CID_WINDOW_SECS_MAX} (a day); 0 turns the window off"
                ),
            ));
        }
        let cid_window_orders = self.cid_window_orders.unwrap_or(CID_WINDOW_ORDERS_DEFAULT);
        if cid_window_orders == 0 || cid_window_orders > CID_WINDOW_ORDERS_MAX {
            return Err(err(
                "cid_window_orders",
                format!(
                    "cid_window_orders {cid_window_orders} in {symbol} must be between 1 and {CID_WINDOW_ORDERS_MAX}; turn the window off with cid_window_secs = 0"
                ),
            ));
        }
        let account_rate = self.account_rate_per_sec.unwrap_or(0);
        if account_rate > ACCOUNT_RATE_MAX {
            return Err(err(
                "account_rate_per_sec",
                format!(
                    "account_rate_per_sec {account_rate} in {symbol} must be at most {ACCOUNT_RATE_MAX}; 0 turns the limit off"
                ),
            ));
        }
        let account_burst = match (account_rate, self.account_burst) {
            (0, None) => 0,
            (0, Some(burst)) => {
                return Err(err(
                    "account_burst",
                    format!(
                        "account_burst {burst} in {symbol} needs account_rate_per_sec above 0; set the rate too, or leave the burst out"
                    ),
                ));
            }
            (rate, None) => rate.min(ACCOUNT_BURST_MAX),
            (_, Some(burst)) => {
                if burst == 0 || burst > ACCOUNT_BURST_MAX {
                    return Err(err(
                        "account_burst",
                        format!(
                            "account_burst {burst} in {symbol} must be between 1 and {ACCOUNT_BURST_MAX}"
                        ),
                    ));
                }
                burst
            }
        };
        let account_orders_max = self.account_open_orders_max.unwrap_or(0);
        if account_orders_max > ACCOUNT_OPEN_ORDERS_MAX {
            return Err(err(
                "account_open_orders_max",
                format!(
                    "account_open_orders_max {account_orders_max} in {symbol} must be at most {ACCOUNT_OPEN_ORDERS_MAX}; 0 turns the limit off"
                ),
            ));
        }
        Ok(MarketSpec {
            symbol: symbol.to_string(),
            base_token,
            quote_token,
            price_decimals: pd,
            size_decimals: sd,
            tick: Price(tick),
            lot: Qty(lot),
            min_qty: Qty(min_qty),
            max_qty: max_qty.map(Qty),
            price_band_bps,
            stp_default: self.stp_default.unwrap_or_default(),
            orders_max,
            cid_window_secs,
            cid_window_orders,
            account_rate,
            account_burst,
            account_orders_max,
        })
    }
}

impl MarketSpec {
    /// The rules `market.update` may change.
    pub fn rules(&self) -> SpecRules {
        SpecRules {
            tick: self.tick,
            lot: self.lot,
            min_qty: self.min_qty,
            max_qty: self.max_qty,
            price_band_bps: self.price_band_bps,
            stp_default: self.stp_default,
            orders_max: self.orders_max,
            cid_window_secs: self.cid_window_secs,
            cid_window_orders: self.cid_window_orders,
            account_rate: self.account_rate,
            account_burst: self.account_burst,
            account_orders_max: self.account_orders_max,
        }
    }

    /// `update` with the fields an update may leave out taken from this spec: the cid window
    /// and the per-account limits (absent from updates written before they existed, which
    /// must not change them). A burst is kept only with the rate it was set with.
    pub fn complete_update(&self, update: &MarketSpecInput) -> MarketSpecInput {
        let mut update = update.clone();
        update.cid_window_secs.get_or_insert(self.cid_window_secs);
        update
            .cid_window_orders
            .get_or_insert(self.cid_window_orders);
        if update.account_rate_per_sec.is_none() {
            update.account_rate_per_sec = Some(self.account_rate);
            if update.account_burst.is_none() && self.account_rate > 0 {
                update.account_burst = Some(self.account_burst);
            }
        }
        update
            .account_open_orders_max
            .get_or_insert(self.account_orders_max);
        update
    }

    /// This spec under `rules`.
    pub fn with_rules(&self, rules: SpecRules) -> MarketSpec {
        MarketSpec {
            tick: rules.tick,
            lot: rules.lot,
            min_qty: rules.min_qty,
            max_qty: rules.max_qty,
            price_band_bps: rules.price_band_bps,
            stp_default: rules.stp_default,
            orders_max: rules.orders_max,
            cid_window_secs: rules.cid_window_secs,
            cid_window_orders: rules.cid_window_orders,
            account_rate: rules.account_rate,
            account_burst: rules.account_burst,
            account_orders_max: rules.account_orders_max,
            ..self.clone()
        }
    }

    /// The rules of `update`, a whole new spec for this market: refused when it is not valid
    /// or changes what an update may not (symbol, tokens, decimals).
    /// Fields the update leaves out that an update may omit keep their value
    /// (`complete_update`).
    pub fn update_rules(&self, update: &MarketSpecInput) -> Result<SpecRules, SpecError> {
        let new = self.complete_update(update).validate()?;
        let symbol = &self.symbol;
        if new.symbol != self.symbol {
            return Err(err(
                "symbol",
                format!("the update is for {}, not {symbol}", new.symbol),
            ));
        }
        for (field, old, changed) in [
            ("price_decimals", self.price_decimals, new.price_decimals),
            ("size_decimals", self.size_decimals, new.size_decimals),
        ] {
            if old != changed {
                return Err(err(
                    field,
                    format!(
                        "{field} of {symbol} is {old} and cannot change (prices and quantities are counted in its units); add a market under a new symbol instead"
                    ),
                ));
            }
        }
        for (field, old, changed) in [
            ("base_token", &self.base_token, &new.base_token),
            ("quote_token", &self.quote_token, &new.quote_token),
        ] {
            if old != changed {
                return Err(err(
                    field,
                    format!(
                        "{field} of {symbol} is {old} and cannot change; add a market under a new symbol instead"
                    ),
                ));
            }
        }
        Ok(new.rules())
    }

    /// The written form of this spec, every field explicit (what `market.add` would take).
    pub fn to_input(&self) -> MarketSpecInput {
        MarketSpecInput {
            symbol: self.symbol.clone(),
            base_token: Some(self.base_token.clone()),
            quote_token: Some(self.quote_token.clone()),
            price_decimals: self.price_decimals,
            size_decimals: self.size_decimals,
            tick_size: Some(self.fmt_price(self.tick)),
            lot_size: Some(self.fmt_qty(self.lot)),
            min_qty: Some(self.fmt_qty(self.min_qty)),
            max_qty: self.max_qty.map(|q| self.fmt_qty(q)),
            price_band_pct: self.price_band_bps.map(|b| format_decimal(u64::from(b), 2)),
            stp_default: Some(self.stp_default),
            orders_max: Some(self.orders_max),
            cid_window_secs: Some(self.cid_window_secs),
            cid_window_orders: Some(self.cid_window_orders),
            account_rate_per_sec: Some(self.account_rate),
            account_burst: (self.account_rate > 0).then_some(self.account_burst),
            account_open_orders_max: Some(self.account_orders_max),
        }
    }

    /// The gap between two commands of one account at its rate, in nanoseconds, and the
    /// debt its burst tolerates (`(burst − 1) ×` that); `None` without a rate limit.
    pub fn account_rate_ns(&self) -> Option<(u64, u64)> {
        if self.account_rate == 0 {
            return None;
        }
        let interval = 1_000_000_000 / u64::from(self.account_rate);
        let tolerance = u64::from(self.account_burst.max(1) - 1) * interval;
        Some((interval, tolerance))
    }

    pub fn fmt_price(&self, p: Price) -> String {
        format_decimal(p.0, self.price_decimals)
    }

    pub fn fmt_qty(&self, q: Qty) -> String {
        format_decimal(q.0, self.size_decimals)
    }

    /// Units of one whole quote token per price unit (for display only).
    pub fn price_scale(&self) -> u64 {
        pow10(self.price_decimals)
    }
}

/// A symbol must be a single NATS subject token and fit a JetStream stream name:
/// 1-32 of `A-Z 0-9 - _`, starting and ending with a letter or digit, with no two separators
/// in a row (so `-`, `-A`, `A-`, `--` and `_` are refused: a base or quote would be empty).
pub fn validate_symbol(symbol: &str) -> Result<(), SpecError> {
    if symbol.is_empty() || symbol.len() > SYMBOL_LEN_MAX {
        return Err(err(
            "symbol",
            format!("symbol {symbol:?} must be 1 to {SYMBOL_LEN_MAX} characters long"),
        ));
    }
    if let Some(c) = symbol
        .chars()
        .find(|c| !(c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
    {
        return Err(err(
            "symbol",
            format!(
                "symbol {symbol:?} contains {c:?}; use upper-case letters, digits, '-' and '_' (e.g. BTC-USDC)"
            ),
        ));
    }
    let separator = |c: char| c == '-' || c == '_';
    if symbol.starts_with(separator)
        || symbol.ends_with(separator)
        || symbol
            .as_bytes()
            .windows(2)
            .any(|w| separator(w[0] as char) && separator(w[1] as char))
    {
        return Err(err(
            "symbol",
            format!(
                "symbol {symbol:?} has an empty part: start and end it with a letter or digit and put one '-' or '_' between parts (e.g. BTC-USDC)"
            ),
        ));
    }
    Ok(())
}

/// `BTC-USDC` → (`BTC`, `USDC`); a symbol without a dash is its own base and has quote `?`.
fn tokens_of(symbol: &str) -> (String, String) {
    match symbol.split_once('-') {
        Some((b, q)) if !b.is_empty() && !q.is_empty() => (b.to_string(), q.to_string()),
        _ => (symbol.to_string(), "QUOTE".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_changes_rules_only() {
        let spec = MarketSpecInput::new("BTC-USDC", 2, 8).validate().unwrap();
        let mut update = MarketSpecInput::new("BTC-USDC", 2, 8);
        update.tick_size = Some("0.50".into());
        update.price_band_pct = Some("5".into());
        let rules = spec.update_rules(&update).expect("rules");
        let new = spec.with_rules(rules);
        assert_eq!(new.tick, Price(50));
        assert_eq!(new.price_band_bps, Some(500));
        assert_eq!(new.rules(), rules);
        let decimals = MarketSpecInput::new("BTC-USDC", 3, 8);
        assert_eq!(
            spec.update_rules(&decimals).unwrap_err().field,
            "price_decimals"
        );
        let other = MarketSpecInput::new("ETH-USDC", 2, 8);
        assert_eq!(spec.update_rules(&other).unwrap_err().field, "symbol");
        let mut tokens = MarketSpecInput::new("BTC-USDC", 2, 8);
        tokens.quote_token = Some("USDT".into());
        assert_eq!(spec.update_rules(&tokens).unwrap_err().field, "quote_token");
    }

    /// A spec without a cid window (stored by an older build) runs without one; a market
    /// created now gets the default; an update that leaves the window out keeps it; every
    /// written spec names it, so reading it back never depends on which build wrote it.
    #[test]
    fn the_cid_window_is_off_for_older_specs_and_on_for_new_markets() {
        let older = MarketSpecInput::new("BTC-USDC", 2, 8);
        assert_eq!(older.validate().unwrap().cid_window_secs, 0);
        let created = older.clone().for_new_market().validate().unwrap();
        assert_eq!(created.cid_window_secs, CID_WINDOW_SECS_DEFAULT);
        assert_eq!(created.cid_window_orders, CID_WINDOW_ORDERS_DEFAULT);
        let written = serde_json::to_value(created.to_input()).unwrap();
        assert_eq!(written["cid_window_secs"], CID_WINDOW_SECS_DEFAULT);
        let read: MarketSpecInput = serde_json::from_value(written).unwrap();
        assert_eq!(read.validate().unwrap(), created);

        let mut tick = MarketSpecInput::new("BTC-USDC", 2, 8);
        tick.tick_size = Some("0.05".into());
        let rules = created.update_rules(&tick).unwrap();
        assert_eq!(rules.cid_window_secs, CID_WINDOW_SECS_DEFAULT);
        let mut off = tick.clone();
        off.cid_window_secs = Some(0);
        assert_eq!(created.update_rules(&off).unwrap().cid_window_secs, 0);

        let mut bad = MarketSpecInput::new("BTC-USDC", 2, 8);
        bad.cid_window_secs = Some(CID_WINDOW_SECS_MAX + 1);
        assert_eq!(bad.validate().unwrap_err().field, "cid_window_secs");
        bad.cid_window_secs = Some(60);
        bad.cid_window_orders = Some(0);
        assert_eq!(bad.validate().unwrap_err().field, "cid_window_orders");

        // A snapshot of an older build has neither field: off, default cap.
        let mut old_snapshot = serde_json::to_value(older.validate().unwrap()).unwrap();
        let fields = old_snapshot.as_object_mut().unwrap();
        fields.remove("cid_window_secs");
        fields.remove("cid_window_orders");
        let spec: MarketSpec = serde_json::from_value(old_snapshot).unwrap();
        assert_eq!(spec.cid_window_secs, 0);
        assert_eq!(spec.cid_window_orders, CID_WINDOW_ORDERS_DEFAULT);
    }

    #[test]
    fn symbols_with_an_empty_part_are_refused() {
        for bad in ["-", "-A", "A-", "--", "_", "A--B", "A-_B", "_A"] {
            let e = validate_symbol(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.message.contains("empty part"), "{bad}: {}", e.message);
        }
        for good in ["BTC-USDC", "A-B", "X", "ES_Z26", "BTC-PERP-USD"] {
            assert!(validate_symbol(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn seed_spec_defaults() {
        let spec = MarketSpecInput::new("BTC-USDC", 2, 8).validate().unwrap();
        assert_eq!(spec.base_token, "BTC");
        assert_eq!(spec.quote_token, "USDC");
        assert_eq!(spec.tick, Price(1));
        assert_eq!(spec.lot, Qty(1));
        assert_eq!(spec.min_qty, Qty(1));
        assert_eq!(spec.max_qty, None);
        assert_eq!(spec.stp_default, StpMode::None);
        assert_eq!(spec.to_input().validate().unwrap(), spec);
    }

    #[test]
    fn refuses_bad_fields_by_name() {
        let mut input = MarketSpecInput::new("btc-usdc", 2, 8);
        assert_eq!(input.validate().unwrap_err().field, "symbol");
        input.symbol = "BTC-USDC".into();
        input.tick_size = Some("0.001".into());
        let e = input.validate().unwrap_err();
        assert_eq!(e.field, "tick_size");
        assert_eq!(
            e.message,
            "tick_size 0.001 has 3 decimals; BTC-USDC allows 2"
        );
        input.tick_size = Some("0".into());
        assert_eq!(input.validate().unwrap_err().field, "tick_size");
        input.tick_size = Some("0.50".into());
        input.lot_size = Some("0.001".into());
        input.min_qty = Some("0.0015".into());
        assert_eq!(input.validate().unwrap_err().field, "min_qty");
        input.min_qty = Some("0.002".into());
        input.max_qty = Some("0.001".into());
        assert_eq!(input.validate().unwrap_err().field, "max_qty");
        input.max_qty = None;
        input.price_band_pct = Some("100".into());
        assert_eq!(input.validate().unwrap_err().field, "price_band_pct");
        input.price_band_pct = Some("2.5".into());
        let spec = input.validate().unwrap();
        assert_eq!(spec.price_band_bps, Some(250));
        assert_eq!(spec.tick, Price(50));
        input.price_decimals = 19;
        assert_eq!(input.validate().unwrap_err().field, "price_decimals");
    }
}
