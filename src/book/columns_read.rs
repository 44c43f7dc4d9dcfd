//! Reading stored columns straight from their MessagePack bytes.
//!
//! rmp_serde decodes a column value by value through serde's visitors: a marker dispatch and
//! a visitor call a value, and for a cid a `String` allocated, checked and dropped. Most of a
//! stored snapshot is such values (sixteen columns an order), and decoding them was the
//! largest step of a market's restart. `Reader` reads the shapes snapshots are written in
//! (maps of named fields, arrays of integers, nils and short strings) directly from the
//! bytes, and hands the few small fields that are not columns (a market's spec, its rate
//! debts) to rmp_serde.
//!
//! It is a fast path only. On anything it does not read (a key it does not know or meets
//! twice, a missing one, a float, a bin, a value out of its type's range, bytes that end
//! early) it gives up with `None`, and the caller decodes the same bytes with rmp_serde, which
//! gives the value or the error it always gave. So what decodes, and every error's words, stay
//! rmp_serde's; the tests check that on real snapshots and on damaged ones the two agree.

use serde::de::DeserializeOwned;

use super::columns::{BookColumns, OrderColumns, WindowColumns};
use super::types::{Account, Cid};

/// A MessagePack reader over a byte slice; every read gives `None` where rmp_serde might
/// decide otherwise.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { rest: bytes }
    }

    #[inline]
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.rest.split_first()?;
        self.rest = rest;
        Some(b)
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    #[inline]
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.rest.len() {
            return None;
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(head)
    }

    #[inline]
    fn be<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn len16(&mut self) -> Option<usize> {
        Some(u16::from_be_bytes(self.be()?) as usize)
    }

    fn len32(&mut self) -> Option<usize> {
        Some(u32::from_be_bytes(self.be()?) as usize)
    }

    /// A length of a map or an array: `fix` the marker's high nibble for up to 15, then the
    /// markers of a 16-bit and a 32-bit length.
    fn len(&mut self, fix: u8, long16: u8, long32: u8) -> Option<usize> {
        match self.byte()? {
            b if b & 0xf0 == fix => Some((b & 0x0f) as usize),
            b if b == long16 => self.len16(),
            b if b == long32 => self.len32(),
            _ => None,
        }
    }

    /// The number of entries of the map that comes next.
    pub(crate) fn map_len(&mut self) -> Option<usize> {
        self.len(0x80, 0xde, 0xdf)
    }

    /// The number of values of the array that comes next.
    pub(crate) fn array_len(&mut self) -> Option<usize> {
        self.len(0x90, 0xdc, 0xdd)
    }

    /// A string (valid UTF-8; rmp_serde would offer invalid bytes to the visitor instead).
    pub(crate) fn str(&mut self) -> Option<&'a str> {
        let len = match self.byte()? {
            b @ 0xa0..=0xbf => (b & 0x1f) as usize,
            0xd9 => self.byte()? as usize,
            0xda => self.len16()?,
            0xdb => self.len32()?,
            _ => return None,
        };
        std::str::from_utf8(self.take(len)?).ok()
    }

    /// An integer in any of MessagePack's widths, as serde's visitors take it for `T`: any
    /// width whose value fits.
    #[inline(always)]
    pub(crate) fn int<T: TryFrom<i128>>(&mut self) -> Option<T> {
        let v: i128 = match self.byte()? {
            b @ 0x00..=0x7f => b as i128,
            b @ 0xe0..=0xff => b as i8 as i128,
            0xcc => self.byte()? as i128,
            0xcd => u16::from_be_bytes(self.be()?) as i128,
            0xce => u32::from_be_bytes(self.be()?) as i128,
            0xcf => u64::from_be_bytes(self.be()?) as i128,
            0xd0 => self.byte()? as i8 as i128,
            0xd1 => i16::from_be_bytes(self.be()?) as i128,
            0xd2 => i32::from_be_bytes(self.be()?) as i128,
            0xd3 => i64::from_be_bytes(self.be()?) as i128,
            _ => return None,
        };
        T::try_from(v).ok()
    }

    /// `None` for a nil, else what `read` reads.
    #[inline]
    pub(crate) fn option<T>(
        &mut self,
        read: impl FnOnce(&mut Reader<'a>) -> Option<T>,
    ) -> Option<Option<T>> {
        if self.peek()? == 0xc0 {
            self.rest = &self.rest[1..];
            return Some(None);
        }
        read(self).map(Some)
    }

    /// An array, each value read by `read`.
    pub(crate) fn array<T>(
        &mut self,
        mut read: impl FnMut(&mut Reader<'a>) -> Option<T>,
    ) -> Option<Vec<T>> {
        let n = self.array_len()?;
        // Every value takes a byte at least: a length past the bytes left is damage, and
        // must not reserve memory it names.
        if n > self.rest.len() {
            return None;
        }
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            values.push(read(self)?);
        }
        Some(values)
    }

    /// The value that comes next, decoded by rmp_serde (for the small fields that are not
    /// columns).
    pub(crate) fn serde<T: DeserializeOwned>(&mut self) -> Option<T> {
        let mut de = rmp_serde::Deserializer::new(&mut self.rest);
        T::deserialize(&mut de).ok()
    }

    /// The entries of a map of named fields: `field` is given each name and reads its value,
    /// answering `None` for a name it does not know (or has seen).
    pub(crate) fn fields(
        &mut self,
        mut field: impl FnMut(&mut Reader<'a>, &'a str) -> Option<()>,
    ) -> Option<()> {
        let n = self.map_len()?;
        for _ in 0..n {
            let name = self.str()?;
            field(self, name)?;
        }
        Some(())
    }
}

/// Sets a field read once; `None` when it was read before (serde refuses a field twice).
pub(crate) fn once<T>(slot: &mut Option<T>, value: Option<T>) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value?);
    Some(())
}

fn cid(r: &mut Reader<'_>) -> Option<Cid> {
    Cid::new(r.str()?).ok()
}

fn account(r: &mut Reader<'_>) -> Option<Account> {
    Account::new(r.str()?).ok()
}

impl OrderColumns {
    fn read(r: &mut Reader<'_>) -> Option<OrderColumns> {
        let mut oid = None;
        let mut acct = None;
        let mut cids = None;
        let mut side = None;
        let mut order_type = None;
        let mut tif = None;
        let mut stp = None;
        let mut price = None;
        let mut stop_price = None;
        let mut qty = None;
        let mut filled = None;
        let mut visible = None;
        let mut display_qty = None;
        let mut expire_at = None;
        let mut ts = None;
        let mut last_seq = None;
        r.fields(|r, name| match name {
            "oid" => once(&mut oid, r.array(Reader::int)),
            "account" => once(&mut acct, r.array(Reader::int)),
            "cid" => once(&mut cids, r.array(|r| r.option(cid))),
            "side" => once(&mut side, r.array(Reader::int)),
            "order_type" => once(&mut order_type, r.array(Reader::int)),
            "tif" => once(&mut tif, r.array(Reader::int)),
            "stp" => once(&mut stp, r.array(Reader::int)),
            "price" => once(&mut price, r.array(|r| r.option(Reader::int))),
            "stop_price" => once(&mut stop_price, r.array(|r| r.option(Reader::int))),
            "qty" => once(&mut qty, r.array(Reader::int)),
            "filled" => once(&mut filled, r.array(Reader::int)),
            "visible" => once(&mut visible, r.array(Reader::int)),
            "display_qty" => once(&mut display_qty, r.array(|r| r.option(Reader::int))),
            "expire_at" => once(&mut expire_at, r.array(|r| r.option(Reader::int))),
            "ts" => once(&mut ts, r.array(Reader::int)),
            "last_seq" => once(&mut last_seq, r.array(Reader::int)),
            _ => None,
        })?;
        Some(OrderColumns {
            oid: oid?,
            account: acct?,
            cid: cids?,
            side: side?,
            order_type: order_type?,
            tif: tif?,
            stp: stp?,
            price: price?,
            stop_price: stop_price?,
            qty: qty?,
            filled: filled?,
            visible: visible?,
            display_qty: display_qty?,
            expire_at: expire_at?,
            ts: ts?,
            last_seq: last_seq?,
        })
    }
}

impl WindowColumns {
    fn read(r: &mut Reader<'_>) -> Option<WindowColumns> {
        let (mut acct, mut cids, mut ts) = (None, None, None);
        r.fields(|r, name| match name {
            "account" => once(&mut acct, r.array(Reader::int)),
            "cid" => once(&mut cids, r.array(cid)),
            "ts" => once(&mut ts, r.array(Reader::int)),
            _ => None,
        })?;
        Some(WindowColumns {
            account: acct?,
            cid: cids?,
            ts: ts?,
        })
    }
}

impl BookColumns {
    /// The columns that come next in `r`, read directly; `None` where rmp_serde must decide
    /// (see the module's words).
    pub(crate) fn read(r: &mut Reader<'_>) -> Option<BookColumns> {
        let mut format_version = None;
        let mut spec = None;
        let mut halted = None;
        let mut last_trade_price = None;
        let mut last_input = None;
        let mut trade_n = None;
        let mut accounts = None;
        let mut bids = None;
        let mut asks = None;
        let mut stops = None;
        let mut cid_window = None;
        let mut rate_clock = None;
        let mut rate_debts = None;
        r.fields(|r, name| match name {
            "format_version" => once(&mut format_version, r.int()),
            "spec" => once(&mut spec, r.serde()),
            "halted" => once(&mut halted, r.serde()),
            "last_trade_price" => once(&mut last_trade_price, r.serde()),
            "last_input" => once(&mut last_input, r.serde()),
            "trade_n" => once(&mut trade_n, r.int()),
            "accounts" => once(&mut accounts, r.array(account)),
            "bids" => once(&mut bids, OrderColumns::read(r)),
            "asks" => once(&mut asks, OrderColumns::read(r)),
            "stops" => once(&mut stops, OrderColumns::read(r)),
            "cid_window" => once(&mut cid_window, WindowColumns::read(r)),
            "rate_clock" => once(&mut rate_clock, r.int()),
            "rate_debts" => once(&mut rate_debts, r.serde()),
            _ => None,
        })?;
        Some(BookColumns {
            format_version: format_version?,
            spec: spec?,
            halted: halted?,
            last_trade_price: last_trade_price?,
            last_input: last_input?,
            trade_n: trade_n?,
            accounts: accounts?,
            bids: bids?,
            asks: asks?,
            stops: stops?,
            cid_window: cid_window?,
            rate_clock: rate_clock?,
            rate_debts: rate_debts?,
        })
    }
}
