// Agora web: the L2 book kept from a snapshot and the deltas that follow it.
//
// Pure (no DOM). Prices and quantities stay decimal strings; comparisons and sums are exact
// (strings and BigInt scaled integers, never floats).

// ---------------------------------------------------------------------------------------------
// Decimal helper
// ---------------------------------------------------------------------------------------------

const DEC_RE = /^([+-]?)(\d*)(?:\.(\d*))?$/;

function split(s) {
  const m = DEC_RE.exec(String(s).trim());
  if (!m || (m[2] === '' && (m[3] === undefined || m[3] === ''))) {
    throw new TypeError(`not a decimal: ${JSON.stringify(s)}`);
  }
  let int = m[2].replace(/^0+/, '');
  let frac = (m[3] || '').replace(/0+$/, '');
  const zero = int === '' && frac === '';
  return { neg: m[1] === '-' && !zero, int, frac };
}

// Compares the magnitudes of two split decimals.
function cmpAbs(a, b) {
  if (a.int.length !== b.int.length) return a.int.length < b.int.length ? -1 : 1;
  if (a.int !== b.int) return a.int < b.int ? -1 : 1;
  const n = Math.max(a.frac.length, b.frac.length);
  const fa = a.frac.padEnd(n, '0');
  const fb = b.frac.padEnd(n, '0');
  if (fa === fb) return 0;
  return fa < fb ? -1 : 1;
}

const PLAIN_RE = /^\d+(\.\d+)?$/;

export const Dec = {
  /** Whether `s` is a zero ("0", "0.000", "-0.0", ".0"). */
  isZero(s) {
    return /^[+-]?0*(\.0*)?$/.test(String(s).trim()) && /\d/.test(String(s));
  },

  /** -1, 0 or 1: the order of two decimal strings, exactly ("9.50" < "10.00", "1.5" == "1.50"). */
  cmp(a, b) {
    // Fast path: the usual case of one market (same digit counts, no sign).
    if (a.length === b.length && a.indexOf('.') === b.indexOf('.') && PLAIN_RE.test(a) && PLAIN_RE.test(b)
        && a[0] !== '0' && b[0] !== '0') {
      return a === b ? 0 : a < b ? -1 : 1;
    }
    const x = split(a);
    const y = split(b);
    if (x.neg !== y.neg) return x.neg ? -1 : 1;
    const c = cmpAbs(x, y);
    return x.neg ? -c : c;
  },

  /** The canonical form of a decimal: "065000.500" -> "65000.5", "0.000" -> "0". */
  canon(s) {
    const x = split(s);
    const body = (x.int || '0') + (x.frac ? '.' + x.frac : '');
    return (x.neg ? '-' : '') + body;
  },

  /** Number of decimals as written ("0.50000000" -> 8). */
  scale(s) {
    const i = String(s).indexOf('.');
    return i < 0 ? 0 : String(s).length - i - 1;
  },

  /** `s` as a BigInt counted in units of 10^-scale (`scale` >= the decimals of `s`). */
  toBig(s, scale) {
    const m = DEC_RE.exec(String(s).trim());
    if (!m || (m[2] === '' && !m[3])) throw new TypeError(`not a decimal: ${JSON.stringify(s)}`);
    const frac = m[3] || '';
    if (frac.length > scale) {
      const cut = frac.slice(scale);
      if (/[^0]/.test(cut)) throw new RangeError(`${s} has more than ${scale} decimals`);
    }
    const digits = (m[2] || '0') + frac.slice(0, scale).padEnd(scale, '0');
    const v = BigInt(digits);
    return m[1] === '-' ? -v : v;
  },

  /** A BigInt counted in units of 10^-scale, written with exactly `scale` decimals. */
  fromBig(v, scale) {
    const neg = v < 0n;
    let s = (neg ? -v : v).toString();
    if (scale > 0) {
      s = s.padStart(scale + 1, '0');
      s = s.slice(0, s.length - scale) + '.' + s.slice(s.length - scale);
    }
    return (neg ? '-' : '') + s;
  },

  /** a + b, with the larger of their scales ("0.1" + "0.2" = "0.3"). */
  add(a, b) {
    const sc = Math.max(Dec.scale(a), Dec.scale(b));
    return Dec.fromBig(Dec.toBig(a, sc) + Dec.toBig(b, sc), sc);
  },

  /** a - b, with the larger of their scales. */
  sub(a, b) {
    const sc = Math.max(Dec.scale(a), Dec.scale(b));
    return Dec.fromBig(Dec.toBig(a, sc) - Dec.toBig(b, sc), sc);
  },

  /** The sum of decimal strings, with the largest of their scales ("0" for none). */
  sum(list) {
    let sc = 0;
    for (const s of list) sc = Math.max(sc, Dec.scale(s));
    let v = 0n;
    for (const s of list) v += Dec.toBig(s, sc);
    return Dec.fromBig(v, sc);
  },

  /** (a + b) / 2 exactly: the scale of the inputs, one more decimal when needed. */
  mid(a, b) {
    const sc = Math.max(Dec.scale(a), Dec.scale(b));
    const v = Dec.toBig(a, sc) + Dec.toBig(b, sc);
    if (v % 2n === 0n) return Dec.fromBig(v / 2n, sc);
    return Dec.fromBig(v * 5n, sc + 1);
  },

  max(a, b) {
    return Dec.cmp(a, b) >= 0 ? a : b;
  },

  min(a, b) {
    return Dec.cmp(a, b) <= 0 ? a : b;
  },
};

// ---------------------------------------------------------------------------------------------
// L2 book
// ---------------------------------------------------------------------------------------------

/** Results of `L2Book.applyDelta`. */
export const APPLIED = 'applied';
export const SKIPPED = 'skipped';
export const GAP = 'gap';
export const BUFFERED = 'buffered';
export const IGNORED = 'ignored';

function seqOf(v) {
  // Sequences are integers well under 2^53; accept numbers and numeric strings.
  return typeof v === 'number' ? v : Number(v);
}

/** One side of the book: a Map by canonical price and an array kept sorted best first. */
class Side {
  constructor(desc) {
    this.desc = desc; // bids: highest first
    this.map = new Map();
    this.sorted = [];
  }

  clear() {
    this.map.clear();
    this.sorted.length = 0;
  }

  // Index of the first level not better than `price` (binary search).
  indexOf(price) {
    const arr = this.sorted;
    let lo = 0;
    let hi = arr.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      let c = Dec.cmp(arr[mid].price, price);
      if (this.desc) c = -c;
      if (c < 0) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  set(price, qty, orders) {
    const key = Dec.canon(price);
    const lvl = this.map.get(key);
    if (Dec.isZero(qty)) {
      if (lvl) {
        this.map.delete(key);
        const i = this.indexOf(lvl.price);
        this.sorted.splice(i, 1);
      }
      return;
    }
    if (lvl) {
      lvl.qty = qty;
      lvl.orders = orders;
      return;
    }
    const fresh = { price, qty, orders };
    this.map.set(key, fresh);
    this.sorted.splice(this.indexOf(price), 0, fresh);
  }

  // Keeps the best `n` levels.
  truncate(n) {
    if (this.sorted.length <= n) return;
    for (const lvl of this.sorted.splice(n)) this.map.delete(Dec.canon(lvl.price));
  }
}

/**
 * An L2 book of one market, kept from a snapshot and the deltas after it.
 *
 *   const b = new L2Book({ market: 'BTC-USDC', maxDepth: 50 });
 *   b.applyDelta(d);        // 'buffered' until the first snapshot
 *   b.loadSnapshot(snap);   // replays the buffered deltas that follow it
 *   b.applyDelta(d);        // 'applied' | 'skipped' | 'gap' (then fetch the snapshot again)
 *   b.top(20);
 *
 * After a gap (or `beginResync()`), deltas are buffered until `loadSnapshot`.
 */
export class L2Book {
  constructor({ market = null, maxDepth = Infinity, maxBuffer = 20000 } = {}) {
    this.market = market;
    this.maxDepth = maxDepth;
    this.maxBuffer = maxBuffer;
    this.bids = new Side(true);
    this.asks = new Side(false);
    this.seq = -1;
    this.ready = false; // a snapshot was loaded
    this.syncing = false; // waiting for a snapshot (deltas are buffered)
    this.buffer = [];
    this.dropped = 0; // buffered deltas dropped because the buffer was full
    this.version = 0; // bumped on every change of the levels
    this._top = null;
    this._topN = -1;
    this._topVersion = -1;
  }

  /** Forgets everything (e.g. when another market is selected). */
  reset(market = this.market) {
    this.market = market;
    this.bids.clear();
    this.asks.clear();
    this.seq = -1;
    this.ready = false;
    this.syncing = false;
    this.buffer = [];
    this.dropped = 0;
    this.version++;
  }

  /** Whether deltas are being buffered (no snapshot yet, or one is being fetched again). */
  get buffering() {
    return !this.ready || this.syncing;
  }

  /** From now on, buffer deltas until the next snapshot (keeps what is already buffered). */
  beginResync() {
    this.syncing = true;
  }

  /**
   * Loads a snapshot `{market, seq, bids, asks}` (best first or in any order), then replays
   * the buffered deltas that follow it. Returns `{status: 'ok' | 'gap', applied, skipped}`;
   * on 'gap' the snapshot is older than the buffered deltas: fetch another (buffering goes on
   * with the deltas from the missing one).
   */
  loadSnapshot(snap) {
    if (this.market && snap.market && snap.market !== this.market) {
      throw new Error(`snapshot of ${snap.market}, book of ${this.market}`);
    }
    if (!this.market && snap.market) this.market = snap.market;
    this.bids.clear();
    this.asks.clear();
    for (const l of snap.bids || []) this.bids.set(l.price, l.qty, l.orders);
    for (const l of snap.asks || []) this.asks.set(l.price, l.qty, l.orders);
    this.bids.truncate(this.maxDepth);
    this.asks.truncate(this.maxDepth);
    this.seq = seqOf(snap.seq);
    this.ready = true;
    this.syncing = false;
    this.version++;

    const pending = this.buffer;
    this.buffer = [];
    let applied = 0;
    let skipped = 0;
    for (let i = 0; i < pending.length; i++) {
      const r = this._apply(pending[i]);
      if (r === APPLIED) applied++;
      else if (r === SKIPPED) skipped++;
      else {
        // The snapshot is older than the buffered deltas' start: keep them for the next one.
        this.syncing = true;
        this.buffer = pending.slice(i);
        return { status: GAP, applied, skipped };
      }
    }
    return { status: 'ok', applied, skipped };
  }

  /**
   * Applies an L2 delta `{market, seq, prev_seq, changes}`. Returns 'applied', 'skipped'
   * (seq <= book seq: already included), 'gap' (prev_seq > book seq: deltas were missed; the
   * book buffers from this one on until `loadSnapshot`), 'buffered' (no snapshot yet, or
   * one is awaited) or 'ignored' (another market).
   */
  applyDelta(d) {
    if (this.market && d.market && d.market !== this.market) return IGNORED;
    if (this.buffering) {
      this._buffer(d);
      return BUFFERED;
    }
    const r = this._apply(d);
    if (r === GAP) {
      this.syncing = true;
      this._buffer(d);
    }
    return r;
  }

  _buffer(d) {
    this.buffer.push(d);
    if (this.buffer.length > this.maxBuffer) {
      // Dropping the oldest is safe: a snapshot older than what is left shows up as a gap.
      const n = this.buffer.length - this.maxBuffer;
      this.buffer.splice(0, n);
      this.dropped += n;
    }
  }

  _apply(d) {
    const seq = seqOf(d.seq);
    if (seq <= this.seq) return SKIPPED;
    if (seqOf(d.prev_seq) > this.seq) return GAP;
    for (const c of d.changes || []) {
      const side = c.side === 'buy' ? this.bids : this.asks;
      side.set(c.price, c.qty, c.orders);
    }
    if (this.bids.sorted.length > this.maxDepth) this.bids.truncate(this.maxDepth);
    if (this.asks.sorted.length > this.maxDepth) this.asks.truncate(this.maxDepth);
    this.seq = seq;
    this.version++;
    return APPLIED;
  }

  /** Number of levels a side. */
  get depth() {
    return { bids: this.bids.sorted.length, asks: this.asks.sorted.length };
  }

  /** The level at `price` on `side` ('buy' | 'sell'), or undefined. */
  level(side, price) {
    return (side === 'buy' ? this.bids : this.asks).map.get(Dec.canon(price));
  }

  get bestBid() {
    return this.bids.sorted.length ? this.bids.sorted[0].price : null;
  }

  get bestAsk() {
    return this.asks.sorted.length ? this.asks.sorted[0].price : null;
  }

  /**
   * The best `n` levels a side, best first, each `{price, qty, orders, cum, ratio}` (`cum`
   * the exact cumulative quantity from the best level, `ratio` cum / the largest cum of both
   * sides, for depth bars), with `bestBid`, `bestAsk`, `spread`, `mid` (decimal strings or
   * null), `maxCum` and `seq`. Cached until the book changes.
   */
  top(n = 20) {
    if (this._top && this._topN === n && this._topVersion === this.version) return this._top;
    const bidLv = this.bids.sorted.slice(0, n);
    const askLv = this.asks.sorted.slice(0, n);
    let sc = 0;
    for (const l of bidLv) sc = Math.max(sc, Dec.scale(l.qty));
    for (const l of askLv) sc = Math.max(sc, Dec.scale(l.qty));
    const cumulate = (levels) => {
      let acc = 0n;
      return levels.map((l) => {
        acc += Dec.toBig(l.qty, sc);
        return { price: l.price, qty: l.qty, orders: l.orders, cumBig: acc };
      });
    };
    const bids = cumulate(bidLv);
    const asks = cumulate(askLv);
    const lastB = bids.length ? bids[bids.length - 1].cumBig : 0n;
    const lastA = asks.length ? asks[asks.length - 1].cumBig : 0n;
    const maxBig = lastB > lastA ? lastB : lastA;
    const finish = (levels) => levels.map((l) => ({
      price: l.price,
      qty: l.qty,
      orders: l.orders,
      cum: Dec.fromBig(l.cumBig, sc),
      ratio: maxBig > 0n ? Number((l.cumBig * 1000000n) / maxBig) / 1000000 : 0,
    }));
    const bestBid = this.bestBid;
    const bestAsk = this.bestAsk;
    const out = {
      seq: this.seq,
      bids: finish(bids),
      asks: finish(asks),
      bestBid,
      bestAsk,
      spread: bestBid !== null && bestAsk !== null ? Dec.sub(bestAsk, bestBid) : null,
      mid: bestBid !== null && bestAsk !== null ? Dec.mid(bestBid, bestAsk) : null,
      maxCum: Dec.fromBig(maxBig, sc),
    };
    this._top = out;
    this._topN = n;
    this._topVersion = this.version;
    return out;
  }
}
