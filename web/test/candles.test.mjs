// node --test web/test/
import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  CandleSeries, foldTrades, mergeCandles, combineCandles, compareTrades, tsToMs, minuteOf,
} from '../candles.js';

// 2024-05-01T12:00:00Z in ms and ns (as a string: exact).
const T0_MS = Date.UTC(2024, 4, 1, 12, 0, 0);
const ns = (ms, extraNs = 0) => (BigInt(ms) * 1000000n + BigInt(extraNs)).toString();
const MIN = 60000;

test('tsToMs reads nanoseconds given as strings (exact) or lossy numbers', () => {
  assert.equal(tsToMs(ns(T0_MS + 1234, 567890)), T0_MS + 1234);
  assert.equal(tsToMs(Number(ns(T0_MS + 1234, 567890))), T0_MS + 1234);
  assert.equal(tsToMs(1714564800123456789), 1714564800123);
  // One nanosecond before a minute: still the previous minute (exact with a string).
  assert.equal(minuteOf(ns(T0_MS, -1)), T0_MS / MIN - 1);
  assert.equal(minuteOf(ns(T0_MS)), T0_MS / MIN);
});

test('trades fold into one-minute candles across minute boundaries', () => {
  const trades = [
    { trade_id: '1-0', ts: ns(T0_MS + 1000), price: '100.00', qty: '0.1' },
    { trade_id: '2-0', ts: ns(T0_MS + 20000), price: '101.50', qty: '0.2' },
    { trade_id: '3-0', ts: ns(T0_MS + 59999, 999999), price: '99.00', qty: '0.3' },
    { trade_id: '4-0', ts: ns(T0_MS + MIN), price: '99.50', qty: '1' }, // next minute exactly
    { trade_id: '5-0', ts: ns(T0_MS + 3 * MIN + 5), price: '98.00', qty: '0.25' }, // a minute skipped
  ];
  const c = foldTrades(trades);
  assert.equal(c.length, 3);
  assert.deepEqual(c[0], {
    t: T0_MS * 1e6, open: '100.00', high: '101.50', low: '99.00', close: '99.00', volume: '0.6', trades: 3,
  });
  assert.deepEqual(c[1], {
    t: (T0_MS + MIN) * 1e6, open: '99.50', high: '99.50', low: '99.50', close: '99.50', volume: '1', trades: 1,
  });
  assert.equal(c[2].t, (T0_MS + 3 * MIN) * 1e6);
  assert.equal(c[2].volume, '0.25');
});

test('open and close follow time, not arrival order; extremes compare as decimals', () => {
  const s = new CandleSeries();
  s.addTrade({ trade_id: '7-0', ts: ns(T0_MS + 30000), price: '9.50', qty: '1' });
  s.addTrade({ trade_id: '5-0', ts: ns(T0_MS + 10000), price: '10.00', qty: '1' }); // older, later
  s.addTrade({ trade_id: '9-0', ts: ns(T0_MS + 50000), price: '9.75', qty: '1' });
  const [c] = s.list();
  assert.equal(c.open, '10.00');
  assert.equal(c.close, '9.75');
  assert.equal(c.high, '10.00'); // not "9.75" as a string comparison would say
  assert.equal(c.low, '9.50');
  assert.equal(c.volume, '3');
});

test('same timestamp: the trade id decides ("<seq>-<n>")', () => {
  const ts = ns(T0_MS + 5000);
  assert.equal(compareTrades({ ts, trade_id: '10-1' }, { ts, trade_id: '10-0' }), 1);
  assert.equal(compareTrades({ ts, trade_id: '9-5' }, { ts, trade_id: '10-0' }), -1);
  const s = new CandleSeries();
  s.addTrade({ trade_id: '10-1', ts, price: '2', qty: '1' });
  s.addTrade({ trade_id: '10-0', ts, price: '1', qty: '1' });
  assert.equal(s.list()[0].open, '1');
  assert.equal(s.list()[0].close, '2');
});

test('volume is summed exactly', () => {
  const trades = [];
  for (let i = 0; i < 10; i++) trades.push({ ts: ns(T0_MS + i), price: '1', qty: '0.1' });
  assert.equal(foldTrades(trades)[0].volume, '1.0');
});

test('the series keeps the newest `limit` minutes', () => {
  const s = new CandleSeries(240);
  for (let m = 0; m < 300; m++) s.addTrade({ ts: ns(T0_MS + m * MIN), price: String(m + 1), qty: '1' });
  const l = s.list();
  assert.equal(l.length, 240);
  assert.equal(l[0].open, '61');
  assert.equal(l[239].open, '300');
  // A trade older than everything kept is dropped rather than evicting a newer minute.
  assert.equal(s.addTrade({ ts: ns(T0_MS), price: '1', qty: '1' }), false);
  assert.equal(s.list()[0].open, '61');
});

test('history candles merge with live ones: a minute in both is combined', () => {
  const history = [
    { t: Number(ns(T0_MS)), open: '100', high: '105', low: '99', close: '104', volume: '2.5', trades: 4 },
    { t: ns(T0_MS + MIN), open: '104', high: '104', low: '101', close: '102', volume: '1.5', trades: 2 },
  ];
  const live = foldTrades([
    { ts: ns(T0_MS + MIN + 40000), price: '106', qty: '0.5' },
    { ts: ns(T0_MS + MIN + 50000), price: '103', qty: '0.5' },
    { ts: ns(T0_MS + 2 * MIN + 1), price: '103.5', qty: '2' },
  ]);
  const m = mergeCandles(history, live);
  assert.equal(m.length, 3);
  assert.deepEqual(m[0], {
    t: T0_MS * 1e6, open: '100', high: '105', low: '99', close: '104', volume: '2.5', trades: 4,
  });
  assert.deepEqual(m[1], {
    t: (T0_MS + MIN) * 1e6, open: '104', high: '106', low: '101', close: '103', volume: '2.5', trades: 4,
  });
  assert.equal(m[2].open, '103.5');
  assert.equal(m[2].volume, '2');
  assert.equal(mergeCandles(history, live, 2)[0].t, (T0_MS + MIN) * 1e6);
});

test('combineCandles keeps the first open, the last close and both extremes', () => {
  const a = { t: 0, open: '10', high: '12', low: '9', close: '11', volume: '1', trades: 1 };
  const b = { t: 0, open: '11', high: '11.5', low: '8.75', close: '10.5', volume: '0.25', trades: 2 };
  assert.deepEqual(combineCandles(a, b), {
    t: 0, open: '10', high: '12', low: '8.75', close: '10.5', volume: '1.25', trades: 3,
  });
});
