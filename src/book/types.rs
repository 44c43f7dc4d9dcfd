//! The small typed values every command and event is made of: sides, order types, times in
//! force, self-trade modes, and the identities (`OrderId`, `Account`, `Cid`, `Seq`).
//!
//! Identities that come from clients (`Account`, `Cid`) are short strings stored inline, so a
//! command or an event never allocates. This module must never accept a value that could not
//! travel as a NATS subject token (accounts) or that holds control characters (cids).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The input sequence: the JetStream stream sequence of the message that carried a command
/// (in `agora replay`, the line number).
pub type Seq = u64;

/// Nanoseconds since the Unix epoch, assigned by the stream (never read from a clock here).
pub type Timestamp = u64;

/// How many commands one batch message may carry at most; positions are `0..BATCH_COMMANDS_MAX`.
pub const BATCH_COMMANDS_MAX: u16 = 1000;

/// The engine's order id: `seq * 1000 + position inside the batch message` (0 for a single
/// command). Unique per market, the same on every replay, and computable by a client from the
/// publish acknowledgement.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct OrderId(pub u64);

impl OrderId {
    pub fn from_input(seq: Seq, pos: u16) -> OrderId {
        OrderId(
            seq.saturating_mul(u64::from(BATCH_COMMANDS_MAX))
                .saturating_add(u64::from(pos)),
        )
    }

    /// The input sequence of the `new` that created the order.
    pub fn seq(self) -> Seq {
        self.0 / u64::from(BATCH_COMMANDS_MAX)
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Buy,
    Sell,
}

impl Side {
    pub fn opposite(self) -> Side {
        match self {
            Side::Buy => Side::Sell,
            Side::Sell => Side::Buy,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Buy => "buy",
            Side::Sell => "sell",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderType {
    Limit,
    Market,
    StopLimit,
    StopMarket,
}

impl OrderType {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderType::Limit => "limit",
            OrderType::Market => "market",
            OrderType::StopLimit => "stop_limit",
            OrderType::StopMarket => "stop_market",
        }
    }
    pub fn is_stop(self) -> bool {
        matches!(self, OrderType::StopLimit | OrderType::StopMarket)
    }
    pub fn has_limit_price(self) -> bool {
        matches!(self, OrderType::Limit | OrderType::StopLimit)
    }
}

/// Time in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tif {
    /// Good till cancelled: the remainder rests.
    Gtc,
    /// Immediate or cancel: the remainder is cancelled (`ioc_remainder`).
    Ioc,
    /// Fill or kill: fills completely at once or is cancelled whole (`fok_unfilled`).
    Fok,
    /// Good till date: rests until the first command whose timestamp reaches `expire_at`.
    Gtd,
    /// Rests without taking; cancelled (`post_only_would_cross`) if it would trade on entry.
    PostOnly,
}

impl Tif {
    pub fn as_str(self) -> &'static str {
        match self {
            Tif::Gtc => "gtc",
            Tif::Ioc => "ioc",
            Tif::Fok => "fok",
            Tif::Gtd => "gtd",
            Tif::PostOnly => "post_only",
        }
    }
    /// Whether an order with this time in force may rest on the book.
    pub fn rests(self) -> bool {
        matches!(self, Tif::Gtc | Tif::Gtd | Tif::PostOnly)
    }
}

/// Self-trade prevention: what happens when a taker meets a resting order of its own account.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StpMode {
    /// The two orders trade with each other.
    #[default]
    None,
    /// The taker's remainder is cancelled; the resting order stays.
    CancelNewest,
    /// The resting order is cancelled; the taker goes on matching.
    CancelOldest,
    /// Both are cancelled.
    CancelBoth,
    /// Both are reduced by the smaller of the two; whichever reaches zero is cancelled.
    DecrementAndCancel,
}

impl StpMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StpMode::None => "none",
            StpMode::CancelNewest => "cancel_newest",
            StpMode::CancelOldest => "cancel_oldest",
            StpMode::CancelBoth => "cancel_both",
            StpMode::DecrementAndCancel => "decrement_and_cancel",
        }
    }
}

/// Longest account name or client order id, in bytes.
pub const SHORT_STR_MAX: usize = 36;

/// A string of at most `SHORT_STR_MAX` bytes stored inline (no heap). Bytes past `len` are
/// always zero, so equality may compare the whole array.
#[derive(Clone, Copy, PartialOrd, Ord)]
pub struct ShortStr {
    len: u8,
    bytes: [u8; SHORT_STR_MAX],
}

impl PartialEq for ShortStr {
    /// Word by word, inline: ids are compared on every lookup, and a call to `memcmp` for 36
    /// bytes costs more than the comparison.
    #[inline]
    fn eq(&self, other: &ShortStr) -> bool {
        self.len == other.len
            && self.word(0) == other.word(0)
            && self.word(8) == other.word(8)
            && self.word(16) == other.word(16)
            && self.word(24) == other.word(24)
            && self.bytes[32..] == other.bytes[32..]
    }
}

impl Eq for ShortStr {}

impl std::hash::Hash for ShortStr {
    /// The blocks of `blocks`, one multiplication of the hasher each: most ids take one, where
    /// a byte-string hash of the used bytes costs several.
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.blocks(|block| state.write_u128(block));
    }
}

impl ShortStr {
    /// The 8 bytes from `i` (at most 28), little-endian: byte `i` is the lowest.
    #[inline(always)]
    fn word(&self, i: usize) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&self.bytes[i..i + 8]);
        u64::from_le_bytes(w)
    }

    /// Gives the id as 16-byte blocks, only as many as its length needs: the first holds
    /// bytes 0..15 and the length, the second bytes 15..31, the third the rest. The bytes past
    /// `len` are zero and the first block says how many follow, so equal blocks mean equal
    /// ids, and the blocks of an (account, cid) pair name both exactly.
    #[inline(always)]
    fn blocks(&self, mut f: impl FnMut(u128)) {
        let high = self.word(8) & (u64::MAX >> 8) | u64::from(self.len) << 56;
        f(u128::from(self.word(0)) | u128::from(high) << 64);
        if self.len > 15 {
            f(u128::from(self.word(15)) | u128::from(self.word(23)) << 64);
            if self.len > 31 {
                f(u128::from(self.word(28) >> 24));
            }
        }
    }

    fn new_unchecked(s: &str) -> ShortStr {
        let mut bytes = [0u8; SHORT_STR_MAX];
        bytes[..s.len()].copy_from_slice(s.as_bytes());
        ShortStr {
            len: s.len() as u8,
            bytes,
        }
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
    pub fn as_str(&self) -> &str {
        // Only ever built from a validated ASCII `&str`, so this cannot fail; fall back to ""
        // rather than panic.
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("")
    }
}

/// Why an account name or client order id was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdError {
    Empty,
    TooLong { len: usize },
    BadChar { ch: char },
}

impl IdError {
    pub fn describe(&self, field: &str, input: &str) -> String {
        let shown: String = input.chars().take(SHORT_STR_MAX + 8).collect();
        match self {
            IdError::Empty => format!("{field} is empty; send 1 to {SHORT_STR_MAX} characters"),
            IdError::TooLong { len } => {
                format!("{field} {shown:?}... is {len} bytes long; the limit is {SHORT_STR_MAX}")
            }
            IdError::BadChar { ch } => match field {
                "account" => format!(
                    "account {shown:?} contains {ch:?}; use only letters, digits, '-' and '_'"
                ),
                _ => {
                    format!("{field} {shown:?} contains {ch:?}; use printable ASCII without spaces")
                }
            },
        }
    }
}

fn check_short(s: &str, allowed: impl Fn(u8) -> bool) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    // Byte by byte: every allowed byte is ASCII, so the first refused byte starts the first
    // refused character (a char boundary), and ids are checked on every order and restore.
    if let Some(at) = s.bytes().position(|b| !b.is_ascii() || !allowed(b)) {
        let ch = s[at..].chars().next().unwrap_or('\u{fffd}');
        return Err(IdError::BadChar { ch });
    }
    if s.len() > SHORT_STR_MAX {
        return Err(IdError::TooLong { len: s.len() });
    }
    Ok(())
}

macro_rules! short_id {
    ($name:ident, $doc:literal, $allowed:expr) => {
        #[doc = $doc]
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(ShortStr);

        impl $name {
            pub fn new(s: &str) -> Result<$name, IdError> {
                check_short(s, $allowed)?;
                Ok($name(ShortStr::new_unchecked(s)))
            }
            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
            /// The same bytes, unchecked (what a hash reads).
            pub fn as_bytes(&self) -> &[u8] {
                self.0.as_bytes()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.as_str())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<$name, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                $name::new(&s)
                    .map_err(|e| serde::de::Error::custom(e.describe(stringify!($name), &s)))
            }
        }
    };
}

short_id!(
    Account,
    "An account name: 1-36 of `A-Z a-z 0-9 - _`, so it can stand as a NATS subject token.",
    |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
);

short_id!(
    Cid,
    "A client order id: 1-36 bytes of printable ASCII without spaces.",
    |b: u8| b.is_ascii_graphic()
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_validate() {
        assert!(Account::new("acct-1_A").is_ok());
        assert_eq!(Account::new(""), Err(IdError::Empty));
        assert_eq!(Account::new("a.b"), Err(IdError::BadChar { ch: '.' }));
        assert_eq!(Account::new("a>b"), Err(IdError::BadChar { ch: '>' }));
        assert_eq!(Account::new("a b"), Err(IdError::BadChar { ch: ' ' }));
        assert_eq!(Account::new("ab€c"), Err(IdError::BadChar { ch: '€' }));
        assert_eq!(
            Account::new(&"a".repeat(37)),
            Err(IdError::TooLong { len: 37 })
        );
        assert!(Cid::new("5f1c2a9e-0b7d-4c1e-9f3a-2d6b8e4c7a10").is_ok());
        assert!(Cid::new("x.y:z/1").is_ok());
        assert_eq!(Cid::new("a b"), Err(IdError::BadChar { ch: ' ' }));
        assert_eq!(Cid::new("é"), Err(IdError::BadChar { ch: 'é' }));
        assert_eq!(Cid::new("a\u{0}"), Err(IdError::BadChar { ch: '\u{0}' }));
        assert_eq!(
            Cid::new("c1").map(|c| c.as_str().to_string()),
            Ok("c1".to_string())
        );
    }

    /// Every id, and every (account, cid) pair, has its own hash input: ids of every length
    /// across the block edges, sharing prefixes, never write the same blocks.
    #[test]
    fn hash_blocks_name_ids_and_pairs_exactly() {
        let written = |ids: &[&ShortStr]| -> Vec<u128> {
            let mut blocks = Vec::new();
            for id in ids {
                id.blocks(|b| blocks.push(b));
            }
            blocks
        };
        let full = "abcdefghijklmnopqrstuvwxyz0123456789";
        let mut ids: Vec<ShortStr> = (1..=SHORT_STR_MAX)
            .map(|n| ShortStr::new_unchecked(&full[..n]))
            .collect();
        // Same lengths, one byte apart, at each block edge.
        for n in [8, 14, 15, 16, 30, 31, 32, 36] {
            let mut s = full[..n].to_string();
            s.replace_range(n - 1..n, "~");
            ids.push(ShortStr::new_unchecked(&s));
        }
        let mut seen = std::collections::HashMap::new();
        for a in &ids {
            assert_eq!(written(&[a]), written(&[&a.clone()]));
            if let Some(b) = seen.insert(written(&[a]), a) {
                panic!(
                    "{:?} and {:?} write the same blocks",
                    a.as_str(),
                    b.as_str()
                );
            }
        }
        let mut pairs = std::collections::HashMap::new();
        for a in &ids {
            for c in &ids {
                if let Some((a2, c2)) = pairs.insert(written(&[a, c]), (a, c)) {
                    panic!(
                        "({:?}, {:?}) and ({:?}, {:?}) write the same blocks",
                        a.as_str(),
                        c.as_str(),
                        a2.as_str(),
                        c2.as_str()
                    );
                }
            }
        }
    }

    #[test]
    fn order_ids_follow_the_input() {
        assert_eq!(OrderId::from_input(42, 0), OrderId(42_000));
        assert_eq!(OrderId::from_input(42, 7), OrderId(42_007));
    }
}
