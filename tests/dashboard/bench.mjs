// cbus-bench `dashboard`: the page's JS heap and frame times while the gateway follows the
// fleet emulator and the emulator changes units at a given rate. Protocol with cbus-bench as
// fleet.mjs: "STEP <name>" waits for a line on stdin; prints one "RESULT <json>" per view.
// Environment: GATEWAY_URL, TOKEN, MACHINES, SECS (measuring time per view).

import { step, launch } from './driver.mjs';

const { GATEWAY_URL, TOKEN, MACHINES, SECS } = process.env;

const { ctx, close } = await launch({ viewport: { width: 1400, height: 900 }, args: ['--enable-precise-memory-info'] });
let failed = false;
try {
  const page = ctx.pages()[0] || (await ctx.newPage());
  const cdp = await ctx.newCDPSession(page);
  await cdp.send('Performance.enable');
  await cdp.send('Network.enable');
  let wsBytes = 0;
  let wsFrames = 0;
  let bySub = {};
  cdp.on('Network.webSocketFrameReceived', (e) => {
    const data = e.response.payloadData;
    wsBytes += data.length;
    wsFrames += 1;
    let key = 'other';
    try {
      const m = JSON.parse(data);
      key = m.sub ? `${m.sub}:${m.type}` : m.type;
    } catch (_) {
      // not JSON
    }
    bySub[key] = (bySub[key] || 0) + data.length;
  });
  await page.goto(GATEWAY_URL);
  await page.fill('#token', TOKEN);
  await page.click('#login-form button[type=submit]');
  await page.waitForSelector(`#fleet-machines:has-text("machines ${MACHINES}: running ${MACHINES}")`, { timeout: 120000 });
  await page.waitForSelector(`#fleet-system:has-text("running ${MACHINES}")`, { timeout: 120000 });
  await step('CHURN'); // the bench starts changing units

  // Each view in turn: rAF deltas, long tasks, heap, WebSocket bytes over SECS seconds.
  const views = [
    ['fleet', async () => page.click('button[data-tab=fleet]')],
    ['fleet+unit', async () => {
      await page.click('#fleet-body tr:nth-child(6) a');
      await page.waitForSelector(`#sel-count[data-count="${MACHINES}"]`, { timeout: 30000 });
    }],
    ['units', async () => {
      await page.click('button[data-tab=units]');
      await page.waitForSelector('#units-body tr', { timeout: 30000 });
    }],
    ['machine', async () => {
      await page.click('button[data-tab=machines]');
      await page.click('#machines-body tr:first-child a');
      await page.waitForSelector('#mach-units-body tr', { timeout: 30000 });
    }],
  ];
  for (const [name, open] of views) {
    await open();
    await page.evaluate(() => {
      window.__bench = { deltas: [], long: 0, last: 0, stop: false };
      new PerformanceObserver((l) => {
        window.__bench.long += l.getEntries().length;
      }).observe({ type: 'longtask', buffered: false });
      const tick = (t) => {
        const b = window.__bench;
        if (b.last) b.deltas.push(t - b.last);
        b.last = t;
        if (!b.stop) requestAnimationFrame(tick);
      };
      requestAnimationFrame(tick);
    });
    const [bytes0, frames0] = [wsBytes, wsFrames];
    bySub = {};
    let heapPeak = 0;
    for (let s = 0; s < Number(SECS); s += 1) {
      await page.waitForTimeout(1000);
      const m = await cdp.send('Performance.getMetrics');
      const used = m.metrics.find((x) => x.name === 'JSHeapUsedSize')?.value || 0;
      heapPeak = Math.max(heapPeak, used);
    }
    const r = await page.evaluate(() => {
      const b = window.__bench;
      b.stop = true;
      const d = [...b.deltas].sort((x, y) => x - y);
      const p = (q) => (d.length ? d[Math.min(d.length - 1, Math.round((d.length - 1) * q))] : 0);
      return { frames: d.length, p50: p(0.5), p99: p(0.99), max: d.length ? d[d.length - 1] : 0, long: b.long, dom: document.getElementsByTagName('*').length };
    });
    await cdp.send('HeapProfiler.collectGarbage');
    const m = await cdp.send('Performance.getMetrics');
    const heapAfterGc = m.metrics.find((x) => x.name === 'JSHeapUsedSize')?.value || 0;
    console.log(`RESULT ${JSON.stringify({ view: name, secs: Number(SECS), ...r, heap_peak: heapPeak, heap_after_gc: heapAfterGc, ws_bytes: wsBytes - bytes0, ws_frames: wsFrames - frames0, by_sub: bySub })}`);
  }
  console.log('DONE');
} catch (e) {
  failed = true;
  console.log(`FAIL ${e && e.stack ? e.stack.split('\n').slice(0, 3).join(' | ') : e}`);
} finally {
  await close();
}
process.exit(failed ? 1 : 0);
