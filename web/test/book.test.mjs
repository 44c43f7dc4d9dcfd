// node --test web/test/
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { L2Book, Dec } from '../book.js';

const M = 'BTC-USDC';

function snap(seq, bids, asks) {
  const lv = ([price, qty, orders = 1]) => ({ price, qty, orders });
  return { market: M, seq, bids: bids.map(lv), asks: asks.map(lv) };
}

function delta(prev_seq, seq, changes) {
  return {
    market: M,
    seq,
    prev_seq,
    changes: changes.map(([side, price, qty, orders = 1]) => ({ side, price, qty, orders })),
  };
}

const prices = (levels) => levels.map((l) => l.price);

// ---------------------------------------------------------------------------------------------
// Decimal helper

test('Dec.cmp orders decimal strings exactly, whatever their digit counts', () => {
  assert.equal(Dec.cmp('9.50', '10.00'), -1);
  assert.equal(Dec.cmp('10.00', '9.50'), 1);
  assert.equal(Dec.cmp('1.5', '1.50'), 0);
  assert.equal(Dec.cmp('0.00000001', '0.0000001'), -1);
  assert.equal(Dec.cmp('100', '99.999999999999999999'), 1);
  assert.equal(Dec.cmp('-1.5', '-1.25'), -1);
  assert.equal(Dec.cmp('-0', '0.000'), 0);
  assert.equal(Dec.cmp('0065000.00', '65000'), 0);
  // Beyond float precision: two values a float cannot tell apart.
  assert.equal(Dec.cmp('9007199254740993.1', '9007199254740993.2'), -1);
});

test('Dec.add / sub / sum are exact and keep the largest scale', () => {
  assert.equal(Dec.add('0.1', '0.2'), '0.3');
  assert.equal(Dec.add('0.10000000', '0.20000000'), '0.30000000');
  assert.equal(Dec.sum(['0.1', '0.2', '0.3']), '0.6');
  assert.equal(Dec.sum([]), '0');
  assert.equal(Dec.sub('65001.00', '65000.50'), '0.50');
  assert.equal(Dec.sub('1', '1.25'), '-0.25');
  assert.equal(Dec.add('99999999999999999999.99', '0.01'), '100000000000000000000.00');
  assert.equal(Dec.mid('65000.00', '65001.00'), '65000.50');
  assert.equal(Dec.mid('1.01', '1.02'), '1.015');
});

test('Dec.isZero knows every way of writing zero', () => {
  for (const z of ['0', '0.000', '0.', '.0', '000', '-0.00']) assert.equal(Dec.isZero(z), true, z);
  for (const nz of ['0.001', '1', '10', '0.10']) assert.equal(Dec.isZero(nz), false, nz);
});

// ---------------------------------------------------------------------------------------------
// Book

test('a snapshot sorts both sides best first, with exact cumulative depth', () => {
  const b = new L2Book({ market: M });
  const r = b.loadSnapshot(snap(10,
    [['9.50', '0.1', 2], ['10.00', '0.2', 1], ['9.75', '0.30', 4]],
    [['10.50', '1', 1], ['100.00', '2', 1], ['10.25', '0.5', 3]]));
  assert.equal(r.status, 'ok');
  assert.equal(b.seq, 10);
  const t = b.top(20);
  assert.deepEqual(prices(t.bids), ['10.00', '9.75', '9.50']);
  assert.deepEqual(prices(t.asks), ['10.25', '10.50', '100.00']);
  assert.deepEqual(t.bids.map((l) => l.cum), ['0.20', '0.50', '0.60']);
  assert.deepEqual(t.asks.map((l) => l.cum), ['0.50', '1.50', '3.50']);
  assert.deepEqual(t.bids.map((l) => l.orders), [1, 4, 2]);
  assert.equal(t.bestBid, '10.00');
  assert.equal(t.bestAsk, '10.25');
  assert.equal(t.spread, '0.25');
  assert.equal(t.mid, '10.125');
  assert.equal(t.maxCum, '3.50');
  assert.equal(t.asks[2].ratio, 1);
  assert.ok(Math.abs(t.bids[2].ratio - 0.6 / 3.5) < 1e-6);
});

test('cumulative depth is exact: 0.1 + 0.2 = 0.3', () => {
  const b = new L2Book({ market: M });
  b.loadSnapshot(snap(1, [['100', '0.1'], ['99', '0.2']], []));
  assert.equal(b.top(5).bids[1].cum, '0.3');
  assert.notEqual(String(0.1 + 0.2), '0.3'); // what a float would have said
});

test('deltas set, add and remove levels; qty "0" or "0.000" removes', () => {
  const b = new L2Book({ market: M });
  b.loadSnapshot(snap(5, [['100.00', '1.0'], ['99.00', '2.0']], [['101.00', '1.5']]));
  assert.equal(b.applyDelta(delta(5, 6, [
    ['buy', '100.00', '0.7', 3], // change
    ['buy', '99.50', '4.0', 2], // new level between
    ['sell', '101.00', '0'], // removed
    ['sell', '102.00', '0.25', 1], // new
  ])), 'applied');
  assert.equal(b.seq, 6);
  let t = b.top(10);
  assert.deepEqual(t.bids.map((l) => [l.price, l.qty, l.orders]),
    [['100.00', '0.7', 3], ['99.50', '4.0', 2], ['99.00', '2.0', 1]]);
  assert.deepEqual(prices(t.asks), ['102.00']);
  assert.equal(t.spread, '2.00');

  assert.equal(b.applyDelta(delta(6, 7, [['buy', '99.50', '0.000'], ['buy', '98.00', '0.00']])), 'applied');
  t = b.top(10);
  assert.deepEqual(prices(t.bids), ['100.00', '99.00']);
  assert.equal(b.depth.bids, 2);
});

test('removing a level written differently ("100.0" for "100.00") removes it', () => {
  const b = new L2Book({ market: M });
  b.loadSnapshot(snap(1, [['100.00', '1']], []));
  b.applyDelta(delta(1, 2, [['buy', '100.0', '0']]));
  assert.deepEqual(b.top(5).bids, []);
  assert.equal(b.top(5).spread, null);
});

test('a delta already included (seq <= book seq) is skipped', () => {
  const b = new L2Book({ market: M });
  b.loadSnapshot(snap(10, [['100', '1']], []));
  assert.equal(b.applyDelta(delta(8, 9, [['buy', '100', '5']])), 'skipped');
  assert.equal(b.applyDelta(delta(9, 10, [['buy', '100', '5']])), 'skipped');
  assert.equal(b.top(1).bids[0].qty, '1');
  assert.equal(b.seq, 10);
  // A delta overlapping the snapshot (prev_seq < seq < its seq) applies.
  assert.equal(b.applyDelta(delta(9, 12, [['buy', '100', '3']])), 'applied');
  assert.equal(b.top(1).bids[0].qty, '3');
  assert.equal(b.seq, 12);
});

test('a gap (prev_seq > book seq) is reported, then deltas are buffered until a snapshot', () => {
  const b = new L2Book({ market: M });
  b.loadSnapshot(snap(10, [['100', '1']], [['101', '1']]));
  assert.equal(b.applyDelta(delta(10, 11, [['buy', '100', '2']])), 'applied');
  assert.equal(b.applyDelta(delta(12, 13, [['buy', '100', '9']])), 'gap');
  assert.equal(b.seq, 11); // nothing of the gapped delta applied
  assert.equal(b.top(1).bids[0].qty, '2');
  assert.equal(b.applyDelta(delta(13, 14, [['sell', '101', '4']])), 'buffered');
  assert.equal(b.applyDelta(delta(14, 15, [['sell', '102', '1']])), 'buffered');
  assert.equal(b.top(1).asks[0].qty, '1');

  // The snapshot taken at 13 includes the gapped delta: 13 is skipped, 14 and 15 replayed.
  const r = b.loadSnapshot(snap(13, [['100', '9']], [['101', '1']]));
  assert.deepEqual(r, { status: 'ok', applied: 2, skipped: 1 });
  assert.equal(b.seq, 15);
  assert.equal(b.buffering, false);
  const t = b.top(5);
  assert.deepEqual(t.asks.map((l) => [l.price, l.qty]), [['101', '4'], ['102', '1']]);
  assert.equal(t.bids[0].qty, '9');
  assert.equal(b.applyDelta(delta(15, 16, [['buy', '100', '0']])), 'applied');
});

test('deltas before the first snapshot are buffered and the ones after it replayed', () => {
  const b = new L2Book({ market: M });
  assert.equal(b.applyDelta(delta(3, 4, [['buy', '50', '1']])), 'buffered');
  assert.equal(b.applyDelta(delta(4, 5, [['buy', '51', '1']])), 'buffered');
  assert.equal(b.applyDelta(delta(5, 6, [['buy', '52', '1']])), 'buffered');
  assert.deepEqual(b.top(5).bids, []);
  assert.equal(b.ready, false);
  const r = b.loadSnapshot(snap(5, [['50', '1'], ['51', '1']], []));
  assert.deepEqual(r, { status: 'ok', applied: 1, skipped: 2 });
  assert.deepEqual(prices(b.top(5).bids), ['52', '51', '50']);
  assert.equal(b.seq, 6);
});

test('buffering while a snapshot is fetched again (beginResync), replay after it', () => {
  const b = new L2Book({ market: M });
  b.loadSnapshot(snap(20, [['10', '1']], []));
  b.beginResync(); // e.g. the stream reconnected
  assert.equal(b.applyDelta(delta(24, 25, [['buy', '11', '1']])), 'buffered');
  assert.equal(b.applyDelta(delta(25, 26, [['buy', '12', '1']])), 'buffered');
  // The page still shows the book it had meanwhile.
  assert.deepEqual(prices(b.top(5).bids), ['10']);
  const r = b.loadSnapshot(snap(25, [['10', '1'], ['11', '1']], []));
  assert.equal(r.status, 'ok');
  assert.deepEqual(prices(b.top(5).bids), ['12', '11', '10']);
  assert.equal(b.seq, 26);
});

test('a snapshot older than the buffered deltas is a gap again; buffering goes on', () => {
  const b = new L2Book({ market: M });
  b.applyDelta(delta(30, 31, [['sell', '5', '1']]));
  b.applyDelta(delta(31, 32, [['sell', '6', '1']]));
  const r = b.loadSnapshot(snap(20, [], [['4', '1']]));
  assert.equal(r.status, 'gap');
  assert.equal(b.buffering, true);
  assert.equal(b.buffer.length, 2);
  assert.equal(b.applyDelta(delta(32, 33, [['sell', '7', '1']])), 'buffered');
  const r2 = b.loadSnapshot(snap(31, [], [['4', '1'], ['5', '1']]));
  assert.deepEqual(r2, { status: 'ok', applied: 2, skipped: 1 });
  assert.deepEqual(prices(b.top(5).asks), ['4', '5', '6', '7']);
});

test('a hole inside the buffered deltas is found when they are replayed', () => {
  const b = new L2Book({ market: M });
  b.applyDelta(delta(10, 11, [['buy', '1', '1']]));
  b.applyDelta(delta(13, 14, [['buy', '2', '1']])); // 12..13 lost while reconnecting
  const r = b.loadSnapshot(snap(10, [], []));
  assert.deepEqual(r, { status: 'gap', applied: 1, skipped: 0 });
  assert.equal(b.seq, 11);
  assert.equal(b.buffer.length, 1);
});

test('deltas of another market are ignored', () => {
  const b = new L2Book({ market: M });
  b.loadSnapshot(snap(1, [], []));
  assert.equal(b.applyDelta({ market: 'ETH-USDC', seq: 2, prev_seq: 1, changes: [] }), 'ignored');
  assert.equal(b.seq, 1);
});

test('top(n) limits the levels and recomputes only after a change', () => {
  const b = new L2Book({ market: M });
  const bids = [];
  for (let i = 0; i < 30; i++) bids.push([`${100 - i}.00`, '1.00']);
  b.loadSnapshot(snap(1, bids, []));
  const t1 = b.top(20);
  assert.equal(t1.bids.length, 20);
  assert.equal(t1.bids[19].price, '81.00');
  assert.equal(t1.bids[19].cum, '20.00');
  assert.equal(b.top(20), t1); // cached
  b.applyDelta(delta(1, 2, [['buy', '100.00', '0']]));
  const t2 = b.top(20);
  assert.notEqual(t2, t1);
  assert.equal(t2.bids[0].price, '99.00');
});

test('maxDepth keeps the best levels only', () => {
  const b = new L2Book({ market: M, maxDepth: 3 });
  b.loadSnapshot(snap(1, [['1', '1'], ['2', '1'], ['3', '1'], ['4', '1']], []));
  assert.deepEqual(prices(b.top(10).bids), ['4', '3', '2']);
  b.applyDelta(delta(1, 2, [['buy', '5', '1']]));
  assert.deepEqual(prices(b.top(10).bids), ['5', '4', '3']);
  assert.equal(b.level('buy', '2'), undefined);
});

// ---------------------------------------------------------------------------------------------
// Property test: random deltas against a naive model

function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// The naive model: objects keyed by integer cents, sorted with integer arithmetic.
function modelTop(model, n) {
  const side = (obj, desc) => Object.keys(obj).map(Number)
    .sort((a, b) => (desc ? b - a : a - b))
    .slice(0, n)
    .map((cents) => obj[cents]);
  const cum = (levels) => {
    let acc = 0n; // in 1e-8 units
    return levels.map((l) => {
      acc += BigInt(l.qty.replace('.', ''));
      const s = acc.toString().padStart(9, '0');
      return { ...l, cum: `${s.slice(0, -8)}.${s.slice(-8)}` };
    });
  };
  return { bids: cum(side(model.buy, true)), asks: cum(side(model.sell, false)) };
}

const centsToPrice = (c) => `${Math.floor(c / 100)}.${String(c % 100).padStart(2, '0')}`;

for (const seed of [1, 7, 42, 2024, 99991]) {
  test(`random deltas agree with a naive model (seed ${seed})`, () => {
    const rnd = mulberry32(seed);
    const int = (n) => Math.floor(rnd() * n);
    const b = new L2Book({ market: M });
    const model = { buy: {}, sell: {} };
    b.loadSnapshot(snap(0, [], []));
    let seq = 0;
    for (let step = 0; step < 3000; step++) {
      const changes = [];
      const k = 1 + int(6);
      for (let j = 0; j < k; j++) {
        const side = rnd() < 0.5 ? 'buy' : 'sell';
        // Prices around 10.00, across the 9.xx / 10.xx digit-count boundary; bids below asks
        // is not needed for the bookkeeping.
        const cents = side === 'buy' ? 850 + int(160) : 990 + int(160);
        const price = centsToPrice(cents);
        const zero = rnd() < 0.3;
        const qty = zero ? (rnd() < 0.5 ? '0' : '0.00000000') : `${int(5)}.${String(1 + int(99999999)).padStart(8, '0')}`;
        const orders = 1 + int(9);
        changes.push([side, price, qty, orders]);
        if (zero) delete model[side][cents];
        else model[side][cents] = { price, qty, orders };
      }
      const next = seq + 1 + int(3);
      const r = b.applyDelta(delta(seq, next, changes));
      assert.equal(r, 'applied');
      seq = next;
      // Old and duplicated deltas change nothing.
      if (rnd() < 0.1) assert.equal(b.applyDelta(delta(seq - 1, seq, [['buy', '9.99', '123']])), 'skipped');

      if (step % 50 === 0 || step === 2999) {
        const n = 1 + int(25);
        const want = modelTop(model, n);
        const got = b.top(n);
        assert.deepEqual(got.bids.map(({ price, qty, orders, cum }) => ({ price, qty, orders, cum })), want.bids);
        assert.deepEqual(got.asks.map(({ price, qty, orders, cum }) => ({ price, qty, orders, cum })), want.asks);
        assert.equal(b.depth.bids, Object.keys(model.buy).length);
        assert.equal(b.depth.asks, Object.keys(model.sell).length);
        if (want.bids.length && want.asks.length) {
          const spreadCents = Math.round(Number(want.asks[0].price) * 100) - Math.round(Number(want.bids[0].price) * 100);
          const sign = spreadCents < 0 ? '-' : '';
          assert.equal(got.spread, sign + centsToPrice(Math.abs(spreadCents)));
        }
      }
    }
    assert.equal(b.seq, seq);
  });
}

test('keeps up: 10,000 deltas of 4 changes each apply well under a second', () => {
  const rnd = mulberry32(5);
  const b = new L2Book({ market: M, maxDepth: 50 });
  const bids = [];
  const asks = [];
  for (let i = 0; i < 50; i++) {
    bids.push([`${65000 - i}.00`, '1.00000000']);
    asks.push([`${65001 + i}.00`, '1.00000000']);
  }
  b.loadSnapshot(snap(0, bids, asks));
  const ds = [];
  for (let s = 0; s < 10000; s++) {
    const ch = [];
    for (let j = 0; j < 4; j++) {
      const buy = rnd() < 0.5;
      const p = buy ? 65000 - Math.floor(rnd() * 60) : 65001 + Math.floor(rnd() * 60);
      ch.push([buy ? 'buy' : 'sell', `${p}.00`, rnd() < 0.2 ? '0' : `0.${String(Math.floor(rnd() * 1e8)).padStart(8, '0')}`, 2]);
    }
    ds.push(delta(s, s + 1, ch));
  }
  const t0 = performance.now();
  for (let i = 0; i < ds.length; i++) {
    b.applyDelta(ds[i]);
    if (i % 166 === 0) b.top(20); // one render per frame at 60 fps
  }
  const ms = performance.now() - t0;
  assert.equal(b.seq, 10000);
  assert.ok(ms < 1000, `took ${ms.toFixed(0)} ms`);
});
