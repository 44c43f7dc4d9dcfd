// Agora web: one-minute candles folded from trades, merged with the history's candles.
//
// Pure (no DOM). Prices and volumes stay decimal strings (exact sums and comparisons).
// Timestamps are nanoseconds since the epoch: as JSON numbers they exceed 2^53 and lose
// precision, so they are only used to the millisecond; as strings they are exact.

import { Dec } from './book.js';

export const MINUTE_MS = 60000;
const MINUTE_NS = 60000000000;

/** Milliseconds since the epoch of a nanosecond timestamp (number, numeric string or BigInt). */
export function tsToMs(ts) {
  if (ts === null || ts === undefined || ts === '') return NaN;
  if (typeof ts === 'bigint') return Number(ts / 1000000n);
  if (typeof ts === 'string') {
    const s = ts.trim();
    if (/^-?\d+$/.test(s)) {
      if (s.replace('-', '').length > 15) return Number(BigInt(s) / 1000000n);
      return scaleToMs(Number(s));
    }
    return scaleToMs(Number(s));
  }
  return scaleToMs(ts);
}

// Nanoseconds as a Number; smaller magnitudes are taken as micro-, milli- or seconds.
function scaleToMs(n) {
  if (!Number.isFinite(n)) return NaN;
  const a = Math.abs(n);
  if (a >= 1e17) return Math.floor(n / 1e6); // ns
  if (a >= 1e14) return Math.floor(n / 1e3); // us
  if (a >= 1e11) return Math.floor(n); // ms
  return Math.floor(n * 1000); // s
}

/** The minute (minutes since the epoch) a timestamp falls in. */
export function minuteOf(ts) {
  return Math.floor(tsToMs(ts) / MINUTE_MS);
}

/** Nanoseconds at the start of a minute (exact as a Number: a multiple of 2^11). */
export function minuteToNs(minute) {
  return minute * MINUTE_NS;
}

// An ordering key for trades: the timestamp as exactly as it came, then the trade id.
function tsKey(ts) {
  if (typeof ts === 'string' && /^-?\d+$/.test(ts.trim())) return BigInt(ts.trim());
  if (typeof ts === 'bigint') return ts;
  const n = Number(ts);
  // A Number above 2^53 is an integer already; BigInt() of it is exact for what it holds.
  return Number.isFinite(n) ? BigInt(Math.trunc(n)) : 0n;
}

// Trade ids as the engine writes them ("<seq>-<n>") or plain integers: a list of integers
// compared in order; null when the id is something else.
function idKey(id) {
  if (typeof id === 'number' && Number.isFinite(id)) return [BigInt(Math.trunc(id))];
  if (typeof id === 'string' && /^\d+([-:.]\d+)*$/.test(id)) return id.split(/[-:.]/).map((x) => BigInt(x));
  return null;
}

function cmpIds(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return a[i] < b[i] ? -1 : 1;
  return a.length === b.length ? 0 : a.length < b.length ? -1 : 1;
}

/**
 * Orders two trades by time, then by trade id when both are numeric: negative when `a` is
 * older. Equal when neither tells.
 */
export function compareTrades(a, b) {
  const ta = tsKey(a.ts);
  const tb = tsKey(b.ts);
  if (ta !== tb) return ta < tb ? -1 : 1;
  const ia = idKey(a.trade_id);
  const ib = idKey(b.trade_id);
  return ia !== null && ib !== null ? cmpIds(ia, ib) : 0;
}

/**
 * Candles of one market, built from trades; keeps the newest `limit` minutes.
 * A trade older than the first trade of its minute becomes the open; one newer than (or as
 * new as) the last becomes the close.
 */
export class CandleSeries {
  constructor(limit = 240) {
    this.limit = limit;
    this.byMinute = new Map(); // minute -> {c, first, last}  (first/last: the trades' order keys)
    this.version = 0;
    this._list = null;
    this._listVersion = -1;
  }

  get size() {
    return this.byMinute.size;
  }

  clear() {
    this.byMinute.clear();
    this.version++;
  }

  /** Folds one trade `{ts, price, qty, trade_id?}`. Returns false when it is unusable. */
  addTrade(tr) {
    const minute = minuteOf(tr.ts);
    if (!Number.isFinite(minute) || tr.price == null || tr.qty == null) return false;
    let e = this.byMinute.get(minute);
    if (!e) {
      if (this.byMinute.size >= this.limit) {
        const oldest = Math.min(...this.byMinute.keys());
        if (minute < oldest) return false; // older than everything kept
        this.byMinute.delete(oldest);
      }
      e = {
        c: {
          t: minuteToNs(minute),
          open: tr.price,
          high: tr.price,
          low: tr.price,
          close: tr.price,
          volume: tr.qty,
          trades: 1,
        },
        first: tr,
        last: tr,
      };
      this.byMinute.set(minute, e);
    } else {
      const c = e.c;
      if (Dec.cmp(tr.price, c.high) > 0) c.high = tr.price;
      if (Dec.cmp(tr.price, c.low) < 0) c.low = tr.price;
      c.volume = Dec.add(c.volume, tr.qty);
      c.trades += 1;
      if (compareTrades(tr, e.first) < 0) {
        e.first = tr;
        c.open = tr.price;
      }
      if (compareTrades(tr, e.last) >= 0) {
        e.last = tr;
        c.close = tr.price;
      }
    }
    this.version++;
    return true;
  }

  addTrades(trades) {
    for (const t of trades) this.addTrade(t);
  }

  /** The candles, oldest first (the same array until the next change: do not mutate). */
  list() {
    if (this._list && this._listVersion === this.version) return this._list;
    const keys = [...this.byMinute.keys()].sort((a, b) => a - b);
    this._list = keys.map((k) => ({ ...this.byMinute.get(k).c }));
    this._listVersion = this.version;
    return this._list;
  }
}

/** Folds trades (any order) into one-minute candles, oldest first. */
export function foldTrades(trades, limit = 240) {
  const s = new CandleSeries(limit);
  s.addTrades(trades);
  return s.list();
}

/** A candle with `t` as a number of ns at the start of its minute, and its minute. */
function normalise(c) {
  const minute = minuteOf(c.t);
  return {
    minute,
    c: {
      t: minuteToNs(minute),
      open: c.open,
      high: c.high,
      low: c.low,
      close: c.close,
      volume: c.volume ?? '0',
      trades: Number(c.trades ?? 0),
    },
  };
}

/**
 * Joins two candles of the same minute: `a` holds the earlier trades, `b` the later ones
 * (open of a, close of b, the extremes of both, volumes and counts added).
 */
export function combineCandles(a, b) {
  return {
    t: a.t,
    open: a.open,
    high: Dec.max(a.high, b.high),
    low: Dec.min(a.low, b.low),
    close: b.close,
    volume: Dec.add(a.volume, b.volume),
    trades: Number(a.trades) + Number(b.trades),
  };
}

/**
 * Merges the history's candles (oldest first, as `/api/candles` gives them) with candles of
 * the trades seen live since that history was asked for: per minute, a minute in both is
 * combined (history first), the others are taken as they are. Keeps the newest `limit`.
 */
export function mergeCandles(history, live, limit = 240) {
  const out = new Map();
  for (const h of history || []) {
    const { minute, c } = normalise(h);
    if (Number.isFinite(minute)) out.set(minute, c);
  }
  for (const l of live || []) {
    const { minute, c } = normalise(l);
    if (!Number.isFinite(minute)) continue;
    const h = out.get(minute);
    out.set(minute, h ? combineCandles(h, c) : c);
  }
  const keys = [...out.keys()].sort((a, b) => a - b);
  return keys.slice(Math.max(0, keys.length - limit)).map((k) => out.get(k));
}
