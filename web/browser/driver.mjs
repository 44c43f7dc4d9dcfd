// Drives a headless Chromium for tests/system/web.rs, one JSON command a line on stdin, one JSON answer
// a line on stdout ({ok: true, value} or {ok: false, error}):
//   {op: "open", url, width?, height?}    a new page at url
//   {op: "wait", expr, timeout_ms?}       evaluates expr in the page until it is truthy: its value
//   {op: "eval", expr}                    evaluates expr in the page once
//   {op: "screenshot", path}              a PNG of the page
//   {op: "close"}                         closes the browser and exits
// The browser is Debian's chromium (AGORA_CHROMIUM overrides /usr/bin/chromium), started with the
// flags this machine's closed network needs; the page's console errors go to stderr.
import { chromium } from 'playwright-core';
import readline from 'node:readline';

const browser = await chromium.launch({
  executablePath: process.env.AGORA_CHROMIUM || '/usr/bin/chromium',
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});
let page = null;

const say = (answer) => process.stdout.write(JSON.stringify(answer) + '\n');

async function run(cmd) {
  switch (cmd.op) {
    case 'open': {
      if (page) await page.close();
      page = await browser.newPage({ viewport: { width: cmd.width || 1440, height: cmd.height || 900 } });
      page.on('console', (m) => { if (m.type() === 'error') process.stderr.write(`page console: ${m.text()}\n`); });
      page.on('pageerror', (e) => process.stderr.write(`page error: ${e.message}\n`));
      await page.goto(cmd.url);
      return null;
    }
    case 'wait': {
      const handle = await page.waitForFunction(cmd.expr, null, { timeout: cmd.timeout_ms || 15000, polling: 50 });
      return await handle.jsonValue();
    }
    case 'eval':
      return await page.evaluate(cmd.expr);
    case 'screenshot':
      await page.screenshot({ path: cmd.path });
      return cmd.path;
    case 'close':
      await browser.close();
      say({ ok: true, value: null });
      process.exit(0);
    default:
      throw new Error(`unknown op ${cmd.op}`);
  }
}

const lines = readline.createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  try {
    say({ ok: true, value: await run(JSON.parse(line)) });
  } catch (e) {
    say({ ok: false, error: String(e && e.message || e) });
  }
}
await browser.close();
