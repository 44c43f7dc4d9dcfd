// Measures the web page in headless Chromium while something drives its market (such as
// flood.py): every second, the frames drawn, the book sequence the ladder shows, the JS heap and
// DOM node count, as JSON lines; at the end a summary. Numbers for BENCHMARKS.md, never asserts.
//
//   node web/browser/measure.mjs URL [SECONDS]      (URL with #/market/<MARKET>)
import { chromium } from 'playwright-core';

const [url, secsArg] = process.argv.slice(2);
const secs = Number(secsArg || 60);
const browser = await chromium.launch({
  executablePath: process.env.AGORA_CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const page = await browser.newPage({ viewport: { width: 1440, height: 900 } });
const cdp = await page.context().newCDPSession(page);
await cdp.send('Performance.enable');
const t0 = Date.now();
await page.goto(url);
await page.waitForFunction("document.body.dataset.ready === '1'", null, { timeout: 30000 });
const firstPaint = await page.evaluate('Number(document.body.dataset.readyMs)');
await page.evaluate(`window.__frames = 0; (function tick() { window.__frames++; requestAnimationFrame(tick); })()`);
const samples = [];
let lastFrames = 0;
for (let i = 0; i < secs; i++) {
  await new Promise((r) => setTimeout(r, 1000));
  const m = Object.fromEntries((await cdp.send('Performance.getMetrics')).metrics.map((x) => [x.name, x.value]));
  const [frames, seq] = await page.evaluate(`[window.__frames, Number(document.querySelector('#ladder').dataset.seq || 0)]`);
  const s = { t: i + 1, fps: frames - lastFrames, seq, heap_mb: +(m.JSHeapUsedSize / 1e6).toFixed(2), nodes: m.Nodes };
  lastFrames = frames;
  samples.push(s);
  console.log(JSON.stringify(s));
}
const median = (xs) => { const v = [...xs].sort((a, b) => a - b); return v[Math.floor(v.length / 2)]; };
const rates = samples.slice(1).map((s, i) => s.seq - samples[i].seq);
console.log(JSON.stringify({
  summary: true, first_paint_ms: firstPaint, wall_ms: Date.now() - t0,
  fps_median: median(samples.map((s) => s.fps)), fps_min: Math.min(...samples.map((s) => s.fps)),
  deltas_per_sec_median: median(rates),
  heap_mb_first: samples[0].heap_mb, heap_mb_last: samples.at(-1).heap_mb,
  heap_mb_max: Math.max(...samples.map((s) => s.heap_mb)),
  nodes_first: samples[0].nodes, nodes_last: samples.at(-1).nodes,
}));
await browser.close();
