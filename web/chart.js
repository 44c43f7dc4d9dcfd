// Agora web: one-minute candles on a <canvas>: candles, volume bars, price and time axes, the
// last price line. Device-pixel-ratio aware; draws at most once per animation frame.
//
// Prices are decimal strings; they become floats here only to be placed in pixels.

const COLORS = {
  bg: '#0d1117',
  grid: 'rgba(139, 148, 158, 0.10)',
  axis: '#6e7781',
  text: '#8b949e',
  up: '#2ebd85',
  down: '#f6465d',
  upVol: 'rgba(46, 189, 133, 0.35)',
  downVol: 'rgba(246, 70, 93, 0.35)',
  last: '#e3b341',
  empty: '#484f58',
};

const FONT = '10px ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", "Liberation Mono", monospace';
const MINUTE_NS = 60000000000;

function niceStep(range, target) {
  const raw = range / Math.max(1, target);
  const pow = 10 ** Math.floor(Math.log10(raw));
  const f = raw / pow;
  const m = f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10;
  return m * pow;
}

function decimalsOf(step) {
  if (step >= 1) return 0;
  return Math.min(10, Math.ceil(-Math.log10(step) - 1e-9));
}

function pad2(n) {
  return String(n).padStart(2, '0');
}

export class CandleChart {
  /** `canvas`: the element; `opts.utc` (default true) labels times in UTC. */
  constructor(canvas, opts = {}) {
    this.canvas = canvas;
    this.ctx = canvas.getContext('2d');
    this.utc = opts.utc !== false;
    this.candles = [];
    this.last = null; // last price (decimal string)
    this.message = 'waiting for trades…';
    this.pending = false;
    this.width = 0;
    this.height = 0;
    this.dpr = 1;
    if (typeof ResizeObserver !== 'undefined') {
      this.ro = new ResizeObserver(() => this.requestDraw());
      this.ro.observe(canvas);
    }
    if (typeof window !== 'undefined' && window.matchMedia) {
      // Redraw when the page moves to a screen of another pixel ratio.
      const watch = () => {
        const mq = window.matchMedia(`(resolution: ${window.devicePixelRatio}dppx)`);
        mq.addEventListener?.('change', () => { this.requestDraw(); watch(); }, { once: true });
      };
      watch();
    }
  }

  /** Candles oldest first `{t (ns), open, high, low, close, volume, trades}`. */
  setCandles(candles) {
    this.candles = candles || [];
    this.requestDraw();
  }

  setLastPrice(price) {
    if (price === this.last) return;
    this.last = price;
    this.requestDraw();
  }

  /** Text shown when there is no candle. */
  setMessage(text) {
    if (text === this.message) return;
    this.message = text;
    this.requestDraw();
  }

  requestDraw() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  _resize() {
    const dpr = window.devicePixelRatio || 1;
    const rect = this.canvas.getBoundingClientRect();
    const w = Math.max(1, Math.round(rect.width));
    const h = Math.max(1, Math.round(rect.height));
    if (w !== this.width || h !== this.height || dpr !== this.dpr) {
      this.width = w;
      this.height = h;
      this.dpr = dpr;
      this.canvas.width = Math.round(w * dpr);
      this.canvas.height = Math.round(h * dpr);
    }
  }

  _timeLabel(ns) {
    const d = new Date(ns / 1e6);
    return this.utc ? `${pad2(d.getUTCHours())}:${pad2(d.getUTCMinutes())}` : `${pad2(d.getHours())}:${pad2(d.getMinutes())}`;
  }

  draw() {
    this._resize();
    const { ctx, width: W, height: H, dpr } = this;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = COLORS.bg;
    ctx.fillRect(0, 0, W, H);
    ctx.font = FONT;
    ctx.textBaseline = 'middle';

    const axisW = 68;
    const timeH = 16;
    const plotW = W - axisW;
    const plotH = H - timeH;
    if (plotW < 40 || plotH < 40) return;
    const priceH = Math.round(plotH * 0.78);
    const volTop = priceH + 4;
    const volH = plotH - volTop;

    const all = this.candles;
    if (!all.length) {
      ctx.fillStyle = COLORS.empty;
      ctx.textAlign = 'center';
      ctx.fillText(this.message, plotW / 2, plotH / 2);
      return;
    }

    // Time runs right to left from the newest minute; a minute without trades is a blank slot.
    const slot = Math.max(4, Math.min(12, Math.floor(plotW / 60)));
    const slots = Math.floor((plotW - 6) / slot);
    const lastMinute = Math.round(Number(all[all.length - 1].t) / MINUTE_NS);
    const firstMinute = lastMinute - slots + 1;
    const vis = [];
    for (let i = all.length - 1; i >= 0; i--) {
      const m = Math.round(Number(all[i].t) / MINUTE_NS);
      if (m < firstMinute) break;
      const c = all[i];
      vis.push({
        m,
        o: parseFloat(c.open),
        h: parseFloat(c.high),
        l: parseFloat(c.low),
        c: parseFloat(c.close),
        v: parseFloat(c.volume),
      });
    }
    const xOf = (m) => plotW - 6 - (lastMinute - m) * slot - slot / 2;

    let lo = Infinity;
    let hi = -Infinity;
    let vmax = 0;
    for (const c of vis) {
      lo = Math.min(lo, c.l);
      hi = Math.max(hi, c.h);
      vmax = Math.max(vmax, c.v);
    }
    const lastPx = this.last !== null && this.last !== undefined ? parseFloat(this.last) : vis[0].c;
    if (Number.isFinite(lastPx)) {
      lo = Math.min(lo, lastPx);
      hi = Math.max(hi, lastPx);
    }
    if (hi - lo < Math.abs(hi) * 1e-6 || hi === lo) {
      const d = Math.max(Math.abs(hi) * 0.001, 1e-8);
      lo -= d;
      hi += d;
    }
    const padP = (hi - lo) * 0.08;
    lo -= padP;
    hi += padP;
    const yOf = (p) => 6 + (hi - p) / (hi - lo) * (priceH - 12);

    // Grid and price axis: no finer than the market's price increment as written.
    const scale = decimalsOfString(all[all.length - 1].close);
    const step = Math.max(niceStep(hi - lo, Math.max(3, Math.floor(priceH / 42))), 10 ** -scale);
    const dec = Math.min(decimalsOf(step), scale);
    ctx.strokeStyle = COLORS.grid;
    ctx.lineWidth = 1;
    ctx.fillStyle = COLORS.text;
    ctx.textAlign = 'left';
    for (let p = Math.ceil(lo / step) * step; p <= hi; p += step) {
      const y = Math.round(yOf(p)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(0, y);
      ctx.lineTo(plotW, y);
      ctx.stroke();
      ctx.fillText(p.toFixed(dec), plotW + 6, y);
    }
    // Time axis: a label every so many minutes.
    const every = [1, 2, 5, 10, 15, 30, 60, 120, 240].find((e) => e * slot >= 64) || 240;
    ctx.textAlign = 'center';
    for (let m = lastMinute - (lastMinute % every); m >= firstMinute; m -= every) {
      const x = Math.round(xOf(m)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(x, 0);
      ctx.lineTo(x, plotH);
      ctx.stroke();
      ctx.fillStyle = COLORS.text;
      ctx.fillText(this._timeLabel(m * MINUTE_NS), x, plotH + timeH / 2);
    }
    // Separators.
    ctx.strokeStyle = COLORS.axis;
    ctx.globalAlpha = 0.35;
    ctx.beginPath();
    ctx.moveTo(plotW + 0.5, 0);
    ctx.lineTo(plotW + 0.5, plotH);
    ctx.moveTo(0, plotH + 0.5);
    ctx.lineTo(W, plotH + 0.5);
    ctx.moveTo(0, volTop - 2.5);
    ctx.lineTo(plotW, volTop - 2.5);
    ctx.stroke();
    ctx.globalAlpha = 1;

    // Volume bars, then candles.
    const bodyW = Math.max(1, slot - Math.max(1, Math.round(slot * 0.3)));
    for (const c of vis) {
      const up = c.c >= c.o;
      const x = xOf(c.m);
      if (vmax > 0) {
        const vh = Math.max(1, (c.v / vmax) * (volH - 2));
        ctx.fillStyle = up ? COLORS.upVol : COLORS.downVol;
        ctx.fillRect(Math.round(x - bodyW / 2), volTop + volH - vh, bodyW, vh);
      }
      const color = up ? COLORS.up : COLORS.down;
      ctx.strokeStyle = color;
      ctx.fillStyle = color;
      const xm = Math.round(x) + 0.5;
      ctx.beginPath();
      ctx.moveTo(xm, Math.round(yOf(c.h)));
      ctx.lineTo(xm, Math.round(yOf(c.l)) + 1);
      ctx.stroke();
      const y1 = yOf(Math.max(c.o, c.c));
      const y2 = yOf(Math.min(c.o, c.c));
      ctx.fillRect(Math.round(x - bodyW / 2), Math.round(y1), bodyW, Math.max(1, Math.round(y2 - y1)));
    }
    if (vmax > 0) {
      ctx.fillStyle = COLORS.text;
      ctx.textAlign = 'left';
      ctx.fillText(`vol ${formatCompact(vmax)}`, plotW + 6, volTop + 6);
    }

    // Last price line and its label on the axis.
    if (Number.isFinite(lastPx)) {
      const y = Math.round(yOf(lastPx)) + 0.5;
      ctx.strokeStyle = COLORS.last;
      ctx.setLineDash([3, 3]);
      ctx.beginPath();
      ctx.moveTo(0, y);
      ctx.lineTo(plotW, y);
      ctx.stroke();
      ctx.setLineDash([]);
      const label = this.last ?? String(lastPx);
      ctx.fillStyle = COLORS.last;
      ctx.fillRect(plotW + 1, y - 8, axisW - 1, 16);
      ctx.fillStyle = '#0d1117';
      ctx.textAlign = 'left';
      ctx.fillText(label, plotW + 4, y);
    }
  }
}

function decimalsOfString(s) {
  const str = String(s ?? '');
  const i = str.indexOf('.');
  return i < 0 ? 0 : str.length - i - 1;
}

function formatCompact(v) {
  if (v >= 1e6) return `${(v / 1e6).toFixed(2)}M`;
  if (v >= 1e3) return `${(v / 1e3).toFixed(2)}k`;
  if (v >= 1) return v.toFixed(2);
  return v.toPrecision(3);
}
