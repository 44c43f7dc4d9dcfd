// Agora web: the page logic. Events only change state; the DOM is updated once per animation
// frame, for the parts that changed.

import { L2Book, Dec } from './book.js';
import { CandleSeries, mergeCandles, tsToMs, compareTrades } from './candles.js';
import { CandleChart } from './chart.js';

const LADDER_LEVELS = 20;
const SNAPSHOT_DEPTH = 50; // the engine's L2 deltas cover the best 50 levels a side
const TAPE_MAX = 100;
const LOG_MAX = 50;
const CANDLE_MAX = 240;
const SEEN_MAX = 5000; // trade ids remembered to drop duplicates
const STALE_MS = 5000; // no event for this long (overview comes every second): connection lost
const BACKOFF_MIN_MS = 250;
const BACKOFF_MAX_MS = 5000;
const CANDLES_EVERY_MS = 30000;
const RESYNC_SHOWN_MS = 700;

const $ = (sel) => document.querySelector(sel);

// ---------------------------------------------------------------------------------------------
// State

const S = {
  servedBy: null,
  streamNode: null,
  overview: null,
  market: null,
  gen: 0, // bumped when another market is selected: late answers for the old one are dropped

  es: null,
  conn: 'connecting', // connecting | live | reconnecting
  lostSince: null,
  lastEventAt: 0,
  reconnectTimer: null,
  reconnectAttempt: 0,

  book: new L2Book({ maxDepth: SNAPSHOT_DEPTH }),
  snap: { inFlight: false, again: false, attempt: 0, timer: null, error: null },
  resyncUntil: 0,
  resyncs: 0,

  tape: [], // newest first
  tapeNew: 0, // trades at the front of `tape` not yet in the DOM
  tapeFull: true, // the DOM must be rebuilt
  seen: new Set(),

  live: new CandleSeries(CANDLE_MAX), // every trade seen (the chart without history)
  overlay: new CandleSeries(CANDLE_MAX), // trades since the history's candles were asked
  pendingOverlay: null,
  history: null, // candles from /api/candles
  historyState: 'loading', // loading | ok | none | error
  historyMessage: '',
  candleTimer: null,

  lastPrice: new Map(), // market -> last trade price seen
  statusLogs: new Map(), // market -> [{ts_ms, text, kind}]
  clusterLog: [], // newest first
  clusterKeys: new Set(),

  overviewAttempt: 0,
  overviewError: null,
  readyMarked: false,
};

let chart = null;

// ---------------------------------------------------------------------------------------------
// Frame scheduling: everything that touches the DOM runs in `render`, once per frame.

const dirty = new Set();
let frameRequested = false;

function invalidate(...parts) {
  for (const p of parts) dirty.add(p);
  if (!frameRequested) {
    frameRequested = true;
    requestAnimationFrame(render);
  }
}

function render() {
  frameRequested = false;
  const parts = new Set(dirty);
  dirty.clear();
  const run = (name, fn) => {
    if (!parts.has(name)) return;
    try {
      fn();
    } catch (e) {
      console.error(`render ${name}`, e);
    }
  };
  run('header', renderHeader);
  run('markets', renderMarkets);
  run('head', renderMarketHead);
  run('ladder', renderLadder);
  run('tape', renderTape);
  run('chart', renderChart);
  run('status', renderStatusLog);
  run('cluster', renderCluster);
}

// ---------------------------------------------------------------------------------------------
// Formatting

const pad = (n, w = 2) => String(n).padStart(w, '0');

function hms(ms) {
  if (!Number.isFinite(ms)) return '--:--:--';
  const d = new Date(ms);
  return `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())}`;
}

function hmsm(ms) {
  if (!Number.isFinite(ms)) return '--:--:--.---';
  return `${hms(ms)}.${pad(new Date(ms).getUTCMilliseconds(), 3)}`;
}

const NUMERIC = /^[+-]?\d*\.?\d*$/;

/** Writes a decimal with its trailing zeros dimmed (the text stays the exact string). */
function setDecimal(el, s) {
  if (el._v === s) return false;
  el._v = s;
  if (s === null || s === undefined || s === '') {
    el.textContent = '—';
    return true;
  }
  const str = String(s);
  const m = str.includes('.') && NUMERIC.test(str) ? /^(.*?)(0+)$/.exec(str) : null;
  if (m && m[1] !== '') {
    el.innerHTML = `${m[1]}<span class="z">${m[2]}</span>`;
  } else {
    el.textContent = str;
  }
  return true;
}

function setText(el, s) {
  const v = s === null || s === undefined || s === '' ? '—' : String(s);
  if (el._t !== v) {
    el._t = v;
    el.textContent = v;
  }
}

function fmtRate(v) {
  if (v === null || v === undefined || !Number.isFinite(Number(v))) return '—';
  const n = Number(v);
  if (n >= 1000) return Math.round(n).toLocaleString('en-US');
  if (n >= 10 || Number.isInteger(n)) return String(Math.round(n));
  return n.toFixed(1);
}

function fmtInt(v) {
  if (v === null || v === undefined || !Number.isFinite(Number(v))) return '—';
  return Number(v).toLocaleString('en-US');
}

function fmtAge(ms) {
  if (ms === null || ms === undefined) return '—';
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.round(ms / 60000)} min`;
}

function sign(s) {
  if (s === null || s === undefined) return 0;
  try {
    return Dec.cmp(String(s), '0');
  } catch {
    return 0;
  }
}

/** -1, 0 or 1 (0 when either is not a decimal). */
function cmpDec(a, b) {
  try {
    return Dec.cmp(String(a), String(b));
  } catch {
    return 0;
  }
}

/** "+1250.00 (+1.96%)" from the ticker (change_24h is last - open_24h). */
function fmtChange(t) {
  if (!t || t.change_24h === null || t.change_24h === undefined) return { text: null, sign: 0 };
  const ch = String(t.change_24h);
  const sg = sign(ch);
  let text = sg > 0 && !ch.startsWith('+') ? `+${ch}` : ch;
  const open = parseFloat(t.open_24h);
  if (Number.isFinite(open) && open !== 0) {
    const pct = (parseFloat(ch) / open) * 100;
    text += ` (${pct >= 0 ? '+' : ''}${pct.toFixed(2)}%)`;
  }
  return { text, sign: sg };
}

const STATE_CLASS = {
  active: 's-active',
  halted: 's-halted',
  moving: 's-moving',
  unplaced: 's-unplaced',
  stopped: 's-moving',
  released: 's-moving',
  failed: 's-failed',
};

function setBadge(el, state) {
  const s = state || '—';
  if (el._badge === s) return;
  el._badge = s;
  el.textContent = s;
  el.className = `badge ${STATE_CLASS[s] || 's-other'}`;
}

function flash(el, up) {
  if (!el.animate) return;
  el.animate(
    [{ color: up ? '#2ebd85' : '#f6465d', backgroundColor: up ? 'rgba(46,189,133,0.10)' : 'rgba(246,70,93,0.10)' }, { color: 'inherit', backgroundColor: 'transparent' }],
    { duration: 400, easing: 'ease-out' },
  );
}

// ---------------------------------------------------------------------------------------------
// Network helpers

class ApiError extends Error {}

async function getJson(url) {
  let res;
  try {
    res = await fetch(url, { cache: 'no-store', headers: { Accept: 'application/json' } });
  } catch (e) {
    throw new ApiError(`cannot reach the node (${e.message})`);
  }
  let body = null;
  try {
    body = await res.json();
  } catch {
    // not JSON
  }
  if (!res.ok) {
    const msg = (body && (body.message || body.error)) || `HTTP ${res.status}`;
    const err = new ApiError(msg);
    err.status = res.status;
    err.code = body && body.error;
    throw err;
  }
  return body;
}

const backoff = (attempt) => Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** attempt);
const marketPath = (m) => encodeURIComponent(m);

// ---------------------------------------------------------------------------------------------
// Market selection (URL hash `#/market/BTC-USDC`)

function marketFromHash() {
  const m = /^#\/market\/([^/?#]+)/.exec(location.hash);
  if (!m) return null;
  try {
    return decodeURIComponent(m[1]);
  } catch {
    return null;
  }
}

function goToMarket(symbol) {
  const h = `#/market/${encodeURIComponent(symbol)}`;
  if (location.hash !== h) location.hash = h;
  else selectMarket(symbol);
}

function selectMarket(symbol) {
  if (!symbol || symbol === S.market) return;
  S.market = symbol;
  S.gen++;
  document.title = `${symbol} · Agora`;
  delete document.body.dataset.ready;
  S.readyMarked = false;
  // The first market's clock starts at navigation; a later one's when it is chosen.
  S.selectedAt = S.selectedAt === undefined ? 0 : performance.now();

  // Everything of the previous market goes.
  closeStream();
  S.book.reset(symbol);
  clearTimeout(S.snap.timer);
  S.snap = { inFlight: false, again: false, attempt: 0, timer: null, error: null };
  S.tape = [];
  S.tapeNew = 0;
  S.tapeFull = true;
  S.seen.clear();
  S.live = new CandleSeries(CANDLE_MAX);
  S.overlay = new CandleSeries(CANDLE_MAX);
  S.pendingOverlay = null;
  S.history = null;
  S.historyState = 'loading';
  S.historyMessage = '';
  S.candlesInFlight = false;
  clearTimeout(S.candleTimer);

  connect();
  loadCandles();
  invalidate('header', 'markets', 'head', 'ladder', 'tape', 'chart', 'status');
}

// ---------------------------------------------------------------------------------------------
// The event stream

function closeStream() {
  clearTimeout(S.reconnectTimer);
  S.reconnectTimer = null;
  if (S.es) {
    S.es.close();
    S.es = null;
  }
}

function connect() {
  closeStream();
  if (!S.market) return;
  const es = new EventSource(`/api/stream?market=${encodeURIComponent(S.market)}`);
  S.es = es;
  S.lastEventAt = Date.now();
  const on = (name, fn) => es.addEventListener(name, (ev) => {
    if (S.es !== es) return;
    S.lastEventAt = Date.now();
    if (S.conn !== 'live') setConn('live');
    let data;
    try {
      data = JSON.parse(ev.data);
    } catch {
      return;
    }
    fn(data);
  });
  es.addEventListener('open', () => {
    if (S.es !== es) return;
    S.lastEventAt = Date.now();
    S.reconnectAttempt = 0;
    setConn('live');
    // Deltas were (or may have been) missed while not connected: resynchronise.
    requestSnapshot('connected');
    loadTrades();
    if (S.historyState !== 'ok' && !S.candlesInFlight) loadCandles();
  });
  es.addEventListener('error', () => {
    if (S.es !== es) return;
    connectionLost();
    if (es.readyState === EventSource.CLOSED) {
      // The browser gave up (an error answer, such as 429): try again ourselves.
      scheduleReconnect();
    }
  });
  on('hello', (d) => {
    S.streamNode = d.node || null;
    invalidate('header');
  });
  on('overview', onOverview);
  on('book', onBook);
  on('trades', onTrades);
  on('status', onStatus);
  on('cluster', onCluster);
}

function scheduleReconnect() {
  clearTimeout(S.reconnectTimer);
  const delay = backoff(S.reconnectAttempt++);
  S.reconnectTimer = setTimeout(connect, delay);
}

function setConn(state) {
  if (state === 'live') S.lostSince = null;
  S.conn = state;
  invalidate('header', 'ladder');
}

function connectionLost() {
  if (S.conn !== 'reconnecting') {
    S.conn = 'reconnecting';
    S.lostSince = Date.now();
    invalidate('header', 'ladder');
  }
}

function watchdog() {
  // A connection can die without an error (a dropped network path): the overview that comes
  // every second stops; reopen the stream.
  if (S.es && S.conn === 'live' && Date.now() - S.lastEventAt > STALE_MS) {
    connectionLost();
    connect();
  }
}

// ---------------------------------------------------------------------------------------------
// The book: snapshot and deltas

function onBook(d) {
  if (d.market !== S.market) return;
  const r = S.book.applyDelta(d);
  if (r === 'gap') requestSnapshot('gap');
  if (r === 'applied' || r === 'gap') invalidate('ladder');
}

function requestSnapshot(reason) {
  S.book.beginResync();
  S.resyncs++;
  S.resyncUntil = Math.max(S.resyncUntil, Date.now() + RESYNC_SHOWN_MS);
  invalidate('header', 'ladder');
  setTimeout(() => invalidate('header', 'ladder'), RESYNC_SHOWN_MS + 20);
  if (S.snap.inFlight) {
    S.snap.again = true; // the answer may predate this: ask once more after it
    return;
  }
  if (S.snap.timer) {
    if (reason === 'gap') return; // a retry is already scheduled (the market is not answering)
    clearTimeout(S.snap.timer);
    S.snap.timer = null;
  }
  fetchSnapshot();
}

async function fetchSnapshot() {
  const gen = S.gen;
  const market = S.market;
  S.snap.inFlight = true;
  S.snap.again = false;
  S.snap.timer = null;
  let snap = null;
  let error = null;
  try {
    snap = await getJson(`/api/book/${marketPath(market)}?depth=${SNAPSHOT_DEPTH}`);
    if (!snap || !Array.isArray(snap.bids) || !Array.isArray(snap.asks)) throw new ApiError('the book answer has no levels');
  } catch (e) {
    error = e;
  }
  if (gen !== S.gen) return; // another market was selected meanwhile
  S.snap.inFlight = false;

  if (!error) {
    const r = S.book.loadSnapshot(snap);
    invalidate('ladder', 'head', 'header');
    if (r.status === 'ok' && !S.snap.again) {
      S.snap.attempt = 0;
      S.snap.error = null;
      return;
    }
    if (r.status === 'ok') S.book.beginResync(); // asked again while this one was on its way
    if (S.snap.again) {
      fetchSnapshot();
      return;
    }
    // The snapshot is older than the deltas already received: ask again shortly.
  } else {
    S.snap.error = error.message;
  }
  const delay = backoff(S.snap.attempt++);
  S.snap.retryAt = Date.now() + delay;
  S.snap.timer = setTimeout(() => {
    S.snap.timer = null;
    if (gen === S.gen) fetchSnapshot();
  }, delay);
  invalidate('header', 'ladder');
}

// ---------------------------------------------------------------------------------------------
// Trades: tape, last price, candles

function tradeKey(t) {
  return t.trade_id !== undefined && t.trade_id !== null ? String(t.trade_id) : `${t.ts}|${t.price}|${t.qty}`;
}

function remember(key) {
  if (S.seen.has(key)) return false;
  S.seen.add(key);
  if (S.seen.size > SEEN_MAX) S.seen.delete(S.seen.values().next().value);
  return true;
}

function onTrades(d) {
  if (d.market !== S.market || !Array.isArray(d.trades)) return;
  let added = 0;
  for (const t of d.trades) {
    // oldest first within a message
    if (!remember(tradeKey(t))) continue;
    S.tape.unshift(t);
    added++;
    S.live.addTrade(t);
    S.overlay.addTrade(t);
    if (S.pendingOverlay) S.pendingOverlay.addTrade(t);
  }
  if (!added) return;
  if (S.tape.length > TAPE_MAX) S.tape.length = TAPE_MAX;
  S.tapeNew += added;
  const last = S.tape[0];
  const prev = S.lastPrice.get(S.market);
  S.lastPrice.set(S.market, last.price);
  S.lastTick = prev ? cmpDec(last.price, prev) : 0;
  invalidate('tape', 'chart', 'head');
}

async function loadTrades() {
  const gen = S.gen;
  let body;
  try {
    body = await getJson(`/api/trades/${marketPath(S.market)}`);
  } catch {
    return; // the tape fills from the stream
  }
  if (gen !== S.gen || !body || !Array.isArray(body.trades)) return;
  let added = 0;
  for (const t of body.trades) {
    if (!remember(tradeKey(t))) continue;
    S.tape.push(t);
    S.live.addTrade(t);
    added++;
  }
  if (!added) return;
  S.tape.sort((a, b) => compareTrades(b, a));
  if (S.tape.length > TAPE_MAX) S.tape.length = TAPE_MAX;
  S.tapeFull = true;
  if (S.tape.length) S.lastPrice.set(S.market, S.tape[0].price);
  invalidate('tape', 'chart', 'head');
}

async function loadCandles() {
  const gen = S.gen;
  clearTimeout(S.candleTimer);
  // Trades from now on go into a fresh overlay: the history answer may not include them yet.
  const overlay = new CandleSeries(CANDLE_MAX);
  S.pendingOverlay = overlay;
  S.candlesInFlight = true;
  let body = null;
  let error = null;
  try {
    body = await getJson(`/api/candles/${marketPath(S.market)}?interval=1m`);
    if (!body || !Array.isArray(body.candles)) throw new ApiError('no candles in the answer');
  } catch (e) {
    error = e;
  }
  if (gen !== S.gen) return;
  S.candlesInFlight = false;
  if (S.pendingOverlay === overlay) S.pendingOverlay = null;
  if (!error) {
    S.history = body.candles.slice(-CANDLE_MAX);
    S.overlay = overlay;
    S.historyState = 'ok';
    S.historyMessage = '';
  } else if (!S.history) {
    S.historyState = error.status === 503 ? 'none' : 'error';
    S.historyMessage = error.message;
  }
  S.candleTimer = setTimeout(loadCandles, CANDLES_EVERY_MS);
  invalidate('chart');
}

// ---------------------------------------------------------------------------------------------
// Overview, status, cluster events

function marketRow(symbol) {
  return S.overview && S.overview.markets ? S.overview.markets.find((m) => m.market === symbol) : undefined;
}

async function fetchOverview() {
  try {
    const ov = await getJson('/api/overview');
    S.overviewError = null;
    S.overviewAttempt = 0;
    onOverview(ov);
  } catch (e) {
    S.overviewError = e.message;
    invalidate('header');
    setTimeout(fetchOverview, backoff(S.overviewAttempt++));
  }
}

function onOverview(ov) {
  if (!ov || !Array.isArray(ov.markets)) return;
  // A status newer than this overview (sent within the last second) wins until the next one.
  S.overview = ov;
  if (!S.servedBy) S.servedBy = ov.node || null;
  for (const m of ov.markets) {
    // The selected market's last price comes from its trades as they arrive.
    if (m.last_price && (m.market !== S.market || !S.lastPrice.has(m.market))) S.lastPrice.set(m.market, m.last_price);
  }
  if (Array.isArray(ov.events)) for (const e of ov.events) addClusterEvent(e, false);
  if (!S.market && ov.markets.length) {
    const first = ov.markets[0].market;
    history.replaceState(null, '', `#/market/${encodeURIComponent(first)}`);
    selectMarket(first);
  }
  invalidate('header', 'markets', 'head', 'cluster');
}

function pushLog(market, entry) {
  let log = S.statusLogs.get(market);
  if (!log) {
    log = [];
    S.statusLogs.set(market, log);
  }
  // Newest first; an older event (from the overview's recent ones) goes to its place.
  let i = 0;
  while (i < log.length && (log[i].ts_ms || 0) > (entry.ts_ms || 0)) i++;
  log.splice(i, 0, entry);
  if (log.length > LOG_MAX) log.length = LOG_MAX;
}

function onStatus(st) {
  if (!st || !st.market) return;
  pushLog(st.market, { ts_ms: st.ts_ms || Date.now(), kind: 'status', state: st.state, node: st.node, epoch: st.epoch });
  // Show it in the markets table at once (the next overview confirms).
  const row = marketRow(st.market);
  if (row && (row.epoch === null || row.epoch === undefined || st.epoch >= row.epoch)) {
    if (st.state === 'active') {
      row.node = st.node;
      row.epoch = st.epoch;
      row.state = 'active';
    } else if (st.state === 'stopped' || st.state === 'released') {
      row.state = 'moving';
    } else if (st.state === 'halted') {
      row.state = 'halted';
    }
  }
  invalidate('markets');
  if (st.market === S.market) invalidate('status', 'head');
}

function clusterKey(e) {
  return `${e.kind}|${e.market}|${e.epoch}|${e.to}`;
}

function addClusterEvent(e, live) {
  if (!e || !e.kind) return false;
  const key = clusterKey(e);
  if (S.clusterKeys.has(key)) return false;
  // Remembered longer than shown, so an event dropped from the log is not taken again.
  S.clusterKeys.add(key);
  if (S.clusterKeys.size > 10 * LOG_MAX) S.clusterKeys.delete(S.clusterKeys.values().next().value);
  S.clusterLog.push(e);
  S.clusterLog.sort((a, b) => (b.ts_ms || 0) - (a.ts_ms || 0));
  if (S.clusterLog.length > LOG_MAX) S.clusterLog.length = LOG_MAX;
  pushLog(e.market, { ts_ms: e.ts_ms || Date.now(), kind: e.kind, from: e.from, to: e.to, epoch: e.epoch, pause_ms: e.pause_ms });
  if (!live && e.market === S.market) invalidate('status');
  return true;
}

function onCluster(e) {
  if (addClusterEvent(e, true)) {
    invalidate('cluster');
    if (e.market === S.market) invalidate('status');
  }
}

// ---------------------------------------------------------------------------------------------
// Rendering

function renderHeader() {
  setText($('#clock'), hms(Date.now()));
  const served = S.servedBy || S.streamNode;
  setText($('#served-by'), served ? (S.streamNode && S.streamNode !== served ? `${served} (stream ${S.streamNode})` : served) : '…');

  const conn = $('#conn');
  const stateEl = $('#conn-state');
  const detail = $('#conn-detail');
  let text;
  let det = '';
  if (S.conn === 'live') {
    text = 'live';
  } else if (S.conn === 'reconnecting') {
    text = `reconnecting since ${hms(S.lostSince)}`;
    det = 'connection to the node lost: what is shown may be out of date';
  } else {
    text = 'connecting';
  }
  setText(stateEl, text);
  conn.className = `conn ${S.conn}`;
  detail.hidden = !det;
  setText(detail, det);

  const sync = $('#sync-state');
  let msg = '';
  let cls = 'sync-state';
  if (S.overviewError && !S.overview) {
    msg = `overview: ${S.overviewError}`;
    cls += ' error';
  } else if (S.market && S.snap.error && S.book.buffering) {
    const wait = Math.max(0, (S.snap.retryAt || 0) - Date.now());
    msg = `book of ${S.market}: ${S.snap.error} (retrying${wait ? ` in ${(wait / 1000).toFixed(1)} s` : ''})`;
    cls += ' error';
  } else if (S.market && (S.book.syncing || (S.book.ready && Date.now() < S.resyncUntil))) {
    msg = 'resynchronising';
  }
  sync.hidden = !msg;
  sync.className = cls;
  setText(sync, msg);
}

// Markets table ------------------------------------------------------------------------------

const MARKET_FIELDS = ['market', 'node', 'epoch', 'state', 'last', 'bid', 'ask', 'spread', 'change', 'volume', 'cps', 'resting', 'lag'];
const LEFT_FIELDS = new Set(['market', 'node', 'state']);
const marketRows = new Map();

function renderMarkets() {
  const tbody = $('#markets tbody');
  const list = S.overview ? S.overview.markets : [];
  const keep = new Set();
  let prevRow = null;
  for (const m of list) {
    keep.add(m.market);
    let tr = marketRows.get(m.market);
    if (!tr) {
      tr = document.createElement('tr');
      tr.dataset.market = m.market;
      tr.tabIndex = 0;
      tr.cells_ = {};
      for (const f of MARKET_FIELDS) {
        const td = document.createElement('td');
        td.dataset.field = f;
        if (LEFT_FIELDS.has(f)) td.className = 'l';
        tr.appendChild(td);
        tr.cells_[f] = td;
      }
      tr.addEventListener('click', () => goToMarket(m.market));
      tr.addEventListener('keydown', (ev) => {
        if (ev.key === 'Enter' || ev.key === ' ') {
          ev.preventDefault();
          goToMarket(m.market);
        }
      });
      marketRows.set(m.market, tr);
    }
    // keep the server's order
    const want = prevRow ? prevRow.nextSibling : tbody.firstChild;
    if (want !== tr) tbody.insertBefore(tr, want);
    prevRow = tr;

    const c = tr.cells_;
    const t = m.ticker || null;
    setText(c.market, m.market);
    setText(c.node, m.node);
    c.node.classList.toggle('dead', m.node_live === false);
    c.node.title = m.node_live === false ? 'no heartbeat from this node' : m.standby ? `standby ${m.standby}` : '';
    setText(c.epoch, m.epoch);
    setBadgeCell(c.state, m.state);
    const last = S.lastPrice.get(m.market) ?? m.last_price ?? (t && t.last) ?? null;
    const lastChanged = c.last._t !== (last ?? '—');
    setText(c.last, last);
    if (lastChanged && c.last._prev !== undefined && last !== null && c.last._prev !== null) {
      const s = cmpDec(last, c.last._prev);
      if (s) {
        c.last.classList.toggle('up', s > 0);
        c.last.classList.toggle('down', s < 0);
      }
    }
    c.last._prev = last;
    setText(c.bid, m.best_bid);
    setText(c.ask, m.best_ask);
    setText(c.spread, m.spread);
    const ch = fmtChange(t);
    setText(c.change, ch.text);
    c.change.classList.toggle('up', ch.sign > 0);
    c.change.classList.toggle('down', ch.sign < 0);
    setDecimal(c.volume, t ? t.volume_24h : null);
    setText(c.cps, fmtRate(m.commands_per_sec));
    setText(c.resting, fmtInt(m.resting_orders));
    setText(c.lag, m.lag === null || m.lag === undefined ? null : fmtInt(m.lag));
    c.lag.classList.toggle('warn', Number(m.lag) > 1000);
    const sel = m.market === S.market;
    if (tr._sel !== sel) {
      tr._sel = sel;
      tr.classList.toggle('selected', sel);
      tr.setAttribute('aria-selected', sel ? 'true' : 'false');
    }
  }
  for (const [sym, tr] of marketRows) {
    if (!keep.has(sym)) {
      tr.remove();
      marketRows.delete(sym);
    }
  }
  setText($('#markets-count'), list.length ? `${list.length} market${list.length > 1 ? 's' : ''}` : 'none yet');
}

function setBadgeCell(td, state) {
  let b = td.firstChild;
  if (!b || b.nodeType !== 1) {
    td.textContent = '';
    b = document.createElement('span');
    td.appendChild(b);
  }
  setBadge(b, state);
}

// Market head --------------------------------------------------------------------------------

function renderMarketHead() {
  const m = marketRow(S.market) || {};
  const t = m.ticker || null;
  setText($('#market-title'), S.market);
  setBadge($('#market-state'), m.state || (S.market ? '…' : '—'));
  setText($('#market-owner'), m.node);
  $('#market-owner').classList.toggle('dead', m.node_live === false);
  setText($('#market-epoch'), m.epoch);
  setText($('#market-standby'), m.standby);
  const last = S.lastPrice.get(S.market) ?? m.last_price ?? (t && t.last) ?? null;
  const lastEl = $('#market-last');
  const lastChanged = lastEl._t !== (last ?? '—');
  setText(lastEl, last);
  if (lastChanged && S.lastTick) {
    lastEl.classList.toggle('up', S.lastTick > 0);
    lastEl.classList.toggle('down', S.lastTick < 0);
  }
  const ch = fmtChange(t);
  const chEl = $('#market-change');
  setText(chEl, ch.text);
  chEl.title = '24 h change';
  chEl.classList.toggle('up', ch.sign > 0);
  chEl.classList.toggle('down', ch.sign < 0);
  const top = S.book.ready ? S.book.top(LADDER_LEVELS) : null;
  setText($('#market-bid'), top ? top.bestBid : m.best_bid);
  setText($('#market-ask'), top ? top.bestAsk : m.best_ask);
  setText($('#market-high'), t ? t.high_24h : null);
  setText($('#market-low'), t ? t.low_24h : null);
  setDecimal($('#market-volume'), t ? t.volume_24h : null);
  if (chart) chart.setLastPrice(last);
}

// Ladder -------------------------------------------------------------------------------------

const askRows = [];
const bidRows = [];

function buildLadder() {
  const mk = (tbody, list) => {
    for (let i = 0; i < LADDER_LEVELS; i++) {
      const tr = document.createElement('tr');
      tr.className = 'empty';
      const cells = {};
      for (const f of ['price', 'qty', 'orders', 'cum']) {
        const td = document.createElement('td');
        td.dataset.field = f;
        if (f === 'price') td.className = 'l';
        tr.appendChild(td);
        cells[f] = td;
      }
      tr.cells_ = cells;
      tr._price = null;
      tbody.appendChild(tr);
      list.push(tr);
    }
  };
  mk($('#ladder-asks'), askRows);
  mk($('#ladder-bids'), bidRows);
}

function setLevel(tr, lvl, cls, best) {
  const c = tr.cells_;
  if (!lvl) {
    if (tr._price !== null) {
      tr._price = null;
      tr.className = 'empty';
      tr.removeAttribute('data-price');
      tr.style.setProperty('--d', '0');
      for (const f of ['price', 'qty', 'orders', 'cum']) {
        c[f].textContent = '';
        c[f]._v = undefined;
        c[f]._t = undefined;
      }
    }
    return;
  }
  let fresh = false;
  if (tr._price !== lvl.price) {
    fresh = true;
    tr._price = lvl.price;
    tr.dataset.price = lvl.price;
    setText(c.price, lvl.price);
  }
  const want = best ? `${cls} best` : cls;
  if (tr.className !== want) tr.className = want;
  const prevQty = c.qty._v;
  if (setDecimal(c.qty, lvl.qty) && !fresh && prevQty !== undefined) {
    flash(c.qty, cmpDec(lvl.qty, prevQty) > 0);
  }
  setText(c.orders, lvl.orders);
  setDecimal(c.cum, lvl.cum);
  const d = lvl.ratio.toFixed(4);
  if (tr._d !== d) {
    tr._d = d;
    tr.style.setProperty('--d', d);
  }
}

function renderLadder() {
  const book = S.book;
  const ladder = $('#ladder');
  const top = book.ready ? book.top(LADDER_LEVELS) : { bids: [], asks: [], spread: null, mid: null, seq: null };
  // Asks above (the best at the bottom, next to the spread), bids below (the best on top).
  const n = LADDER_LEVELS;
  for (let i = 0; i < n; i++) setLevel(askRows[i], top.asks[n - 1 - i], 'ask', n - 1 - i === 0);
  for (let i = 0; i < n; i++) setLevel(bidRows[i], top.bids[i], 'bid', i === 0);
  setText($('#spread'), top.spread);
  setText($('#mid'), top.mid);
  let bps = '';
  if (top.spread !== null && top.mid !== null) {
    const v = (parseFloat(top.spread) / parseFloat(top.mid)) * 10000;
    if (Number.isFinite(v)) bps = `${v < 10 ? v.toFixed(2) : v.toFixed(1)} bps`;
  }
  setText($('#spread-bps'), bps || ' ');
  setText($('#book-seq'), book.ready ? `seq ${book.seq}` : '');

  const syncing = book.ready && (book.syncing || Date.now() < S.resyncUntil);
  const state = !book.ready ? 'loading' : S.conn !== 'live' ? 'stale' : syncing ? 'syncing' : 'live';
  if (ladder.dataset.state !== state) ladder.dataset.state = state;
  ladder.dataset.seq = book.ready ? String(book.seq) : '';
  const stEl = $('#book-state');
  setText(stEl, { syncing: 'resynchronising', loading: 'loading', stale: 'stale: not connected', live: 'live' }[state]);
  stEl.className = `book-state ${state}`;

  const msg = $('#ladder-message');
  let text = '';
  if (!book.ready) {
    text = S.snap.error ? `${S.snap.error}\nretrying…` : S.market ? 'loading the book…' : 'no market';
  } else if (!top.bids.length && !top.asks.length) {
    text = 'empty book';
  }
  msg.hidden = !text;
  setText(msg, text);

  if (book.ready && !S.readyMarked) {
    S.readyMarked = true;
    document.body.dataset.ready = '1';
    // The first paint of this market: ms since the page's navigation began (first market) or
    // since it was selected.
    document.body.dataset.readyMs = String(Math.round(performance.now() - (S.selectedAt || 0)));
  }
}

// Tape ---------------------------------------------------------------------------------------

function tapeRow(t) {
  const tr = document.createElement('tr');
  const side = t.taker_side === 'buy' || t.taker_side === 'sell' ? t.taker_side : 'unknown';
  tr.dataset.side = side;
  tr.className = side;
  const time = document.createElement('td');
  time.className = 'l time';
  time.textContent = hmsm(tsToMs(t.ts));
  const price = document.createElement('td');
  price.dataset.field = 'price';
  price.textContent = t.price;
  const qty = document.createElement('td');
  qty.dataset.field = 'qty';
  setDecimal(qty, t.qty);
  tr.append(time, price, qty);
  return tr;
}

function renderTape() {
  const tbody = $('#tape tbody');
  if (S.tapeFull || S.tapeNew >= TAPE_MAX) {
    const frag = document.createDocumentFragment();
    for (const t of S.tape) frag.appendChild(tapeRow(t));
    tbody.replaceChildren(frag);
  } else if (S.tapeNew > 0) {
    const frag = document.createDocumentFragment();
    for (let i = 0; i < S.tapeNew && i < S.tape.length; i++) frag.appendChild(tapeRow(S.tape[i]));
    tbody.insertBefore(frag, tbody.firstChild);
    while (tbody.rows.length > TAPE_MAX) tbody.lastChild.remove();
    if (S.tapeNew <= 8) for (let i = 0; i < S.tapeNew; i++) tbody.rows[i].classList.add('new');
  }
  S.tapeFull = false;
  S.tapeNew = 0;
  setText($('#tape-count'), S.tape.length ? `${S.tape.length}` : '');
}

// Chart --------------------------------------------------------------------------------------

function renderChart() {
  if (!chart) return;
  let candles;
  let source;
  if (S.history) {
    candles = mergeCandles(S.history, S.overlay.list(), CANDLE_MAX);
    source = '1m · history + live';
  } else {
    candles = S.live.list();
    source = S.historyState === 'loading' ? '1m · loading history…' : '1m · from trades seen since the page opened';
    if (S.historyState === 'none' || S.historyState === 'error') {
      $('#chart-source').title = S.historyMessage;
    }
  }
  setText($('#chart-source'), source);
  chart.setMessage(S.historyState === 'loading' ? 'loading…' : 'no trades yet');
  chart.setCandles(candles);
}

// Logs ---------------------------------------------------------------------------------------

function logItem(e) {
  const li = document.createElement('li');
  li.dataset.kind = e.kind;
  const time = document.createElement('span');
  time.className = 'time';
  time.textContent = hms(e.ts_ms);
  li.appendChild(time);
  const badge = document.createElement('span');
  if (e.kind === 'status') {
    setBadge(badge, e.state);
    li.appendChild(badge);
    li.append(` ${e.node ?? '?'} · epoch ${e.epoch ?? '?'}`);
  } else {
    badge.className = `badge k-${e.kind}`;
    badge.textContent = e.kind;
    li.appendChild(badge);
    li.append(` ${e.from ?? '?'} → ${e.to ?? '?'} · epoch ${e.epoch ?? '?'}`);
    const p = document.createElement('b');
    p.className = 'pause';
    p.textContent = e.pause_ms !== null && e.pause_ms !== undefined ? ` · pause ${e.pause_ms} ms` : ' · pause unknown';
    li.appendChild(p);
  }
  return li;
}

function renderStatusLog() {
  const ul = $('#status-log');
  const log = S.statusLogs.get(S.market) || [];
  const frag = document.createDocumentFragment();
  for (const e of log) frag.appendChild(logItem(e));
  ul.replaceChildren(frag);
  if (!log.length) {
    const li = document.createElement('li');
    li.className = 'placeholder';
    li.textContent = 'no status change seen yet';
    ul.replaceChildren(li);
  }
}

const nodeRows = new Map();

function renderCluster() {
  const ov = S.overview;
  if (!ov) return;
  setText($('#rebalancer'), ov.rebalancer);
  const tbody = $('#cluster-nodes tbody');
  const keep = new Set();
  let prev = null;
  for (const n of ov.nodes || []) {
    keep.add(n.node);
    let r = nodeRows.get(n.node);
    if (!r) {
      const tr = document.createElement('tr');
      tr.dataset.node = n.node;
      const cells = {};
      for (const f of ['node', 'cps', 'cpu', 'run', 'stby', 'age']) {
        const td = document.createElement('td');
        td.dataset.field = f;
        if (f === 'node') td.className = 'l';
        tr.appendChild(td);
        cells[f] = td;
      }
      const sub = document.createElement('tr');
      sub.className = 'node-markets';
      sub.dataset.nodeMarkets = n.node;
      const td = document.createElement('td');
      td.colSpan = 6;
      sub.appendChild(td);
      r = { tr, sub, cells, marketsTd: td };
      nodeRows.set(n.node, r);
    }
    const want = prev ? prev.nextSibling : tbody.firstChild;
    if (want !== r.tr) tbody.insertBefore(r.tr, want);
    if (r.tr.nextSibling !== r.sub) tbody.insertBefore(r.sub, r.tr.nextSibling);
    prev = r.sub;

    const c = r.cells;
    const isReb = ov.rebalancer === n.node;
    const nodeText = `${n.node}${isReb ? ' ★' : ''}`;
    setText(c.node, nodeText);
    c.node.title = `instance ${n.instance ?? '?'}${n.started_unix_ms ? `, started ${new Date(n.started_unix_ms).toISOString()}` : ''}${isReb ? ', holds the rebalancer' : ''}${n.node === S.servedBy ? ', served this page' : ''}`;
    setText(c.cps, fmtRate(n.commands_per_sec));
    setText(c.cpu, n.cpu_pct === null || n.cpu_pct === undefined ? null : `${Number(n.cpu_pct).toFixed(0)}%`);
    c.cpu.classList.toggle('warn', Number(n.cpu_pct) >= 80);
    setText(c.run, (n.markets || []).length);
    setText(c.stby, (n.following || []).length);
    setText(c.age, fmtAge(n.age_ms));
    const stale = n.live === false || Number(n.age_ms) > 5000;
    r.tr.classList.toggle('stale', stale);
    c.age.classList.toggle('warn', stale);

    const key = JSON.stringify([n.markets, n.following, S.market]);
    if (r._mkey !== key) {
      r._mkey = key;
      const frag = document.createDocumentFragment();
      for (const sym of n.markets || []) {
        const s = document.createElement('span');
        s.className = `chip run${sym === S.market ? ' sel' : ''}`;
        s.textContent = sym;
        s.title = `${sym} runs on ${n.node}`;
        frag.appendChild(s);
      }
      for (const sym of n.following || []) {
        const s = document.createElement('span');
        s.className = `chip follow${sym === S.market ? ' sel' : ''}`;
        s.textContent = sym;
        s.title = `${n.node} follows ${sym} as its standby`;
        frag.appendChild(s);
      }
      if (!(n.markets || []).length && !(n.following || []).length) {
        const s = document.createElement('span');
        s.className = 'muted';
        s.textContent = 'no markets';
        frag.appendChild(s);
      }
      r.marketsTd.replaceChildren(frag);
    }
  }
  for (const [id, r] of nodeRows) {
    if (!keep.has(id)) {
      r.tr.remove();
      r.sub.remove();
      nodeRows.delete(id);
    }
  }

  const ul = $('#cluster-log');
  const key = S.clusterLog.map(clusterKey).join(',');
  if (ul._key !== key) {
    ul._key = key;
    const frag = document.createDocumentFragment();
    for (const e of S.clusterLog) {
      const li = logItem(e);
      const m = document.createElement('span');
      m.className = 'mkt';
      m.textContent = e.market;
      li.insertBefore(m, li.children[1]);
      frag.appendChild(li);
    }
    ul.replaceChildren(frag);
    if (!S.clusterLog.length) {
      const li = document.createElement('li');
      li.className = 'placeholder';
      li.textContent = 'none yet';
      ul.replaceChildren(li);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Start

function onKey(ev) {
  if (ev.target && /^(INPUT|TEXTAREA|SELECT)$/.test(ev.target.tagName)) return;
  if (ev.key !== 'ArrowUp' && ev.key !== 'ArrowDown') return;
  const list = S.overview ? S.overview.markets.map((m) => m.market) : [];
  if (!list.length) return;
  const i = list.indexOf(S.market);
  const j = ev.key === 'ArrowDown' ? Math.min(list.length - 1, i + 1) : Math.max(0, i - 1);
  if (list[j] && list[j] !== S.market) {
    ev.preventDefault();
    goToMarket(list[j]);
  }
}

function start() {
  buildLadder();
  chart = new CandleChart($('#chart'));
  window.addEventListener('hashchange', () => {
    const m = marketFromHash();
    if (m) selectMarket(m);
  });
  document.addEventListener('keydown', onKey);
  const fromHash = marketFromHash();
  if (fromHash) selectMarket(fromHash); // no need to wait for the overview
  fetchOverview();
  setInterval(() => {
    watchdog();
    invalidate('header');
  }, 1000);
  invalidate('header', 'markets', 'head', 'ladder', 'tape', 'chart', 'status', 'cluster');
}

// For a browser test or the console.
window.agora = { state: S, selectMarket: goToMarket };

start();
