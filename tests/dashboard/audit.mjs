// Drives the dashboard's Audit view and the signal log's recent past in real headless Chromium
// (playwright-core), for tests/tests/gateway_history.rs. Talks to the Rust test over
// stdout/stdin lines: "STEP <name>" when the test must act, then waits for a line on stdin.
// Environment: GATEWAY_URL, TOKEN, HOST (the agent's hostname), HOSTILE (a requester claim
// that is markup), SHOT (screenshot path).

import { step, log, launch } from './driver.mjs';

const { GATEWAY_URL, TOKEN, HOST, HOSTILE, SHOT } = process.env;
const T = 20000;

const { ctx, close } = await launch({ viewport: { width: 1680, height: 640 } });
let failed = false;
const consoleErrors = [];
try {
  const page = ctx.pages()[0] || (await ctx.newPage());
  page.on('console', (m) => {
    if (m.type() === 'error') consoleErrors.push(m.text());
  });
  page.on('pageerror', (e) => consoleErrors.push(String(e)));
  await page.goto(GATEWAY_URL);
  await page.fill('#token', TOKEN);
  await page.click('#login-form button[type=submit]');
  await page.waitForSelector('#conn.conn-up', { timeout: T });

  // The Audit view: the page of entries the stream held before the page opened.
  await page.click('button[data-tab=audit]');
  const denied = `#audit-body tr[data-policy="denied"][data-result="access-denied"][data-op="call"]`;
  await page.waitForSelector(`${denied}:has-text("EmitSignals")`, { timeout: T });
  const row = await page.$eval(denied, (tr) => ({
    host: tr.querySelector('.audit-host').textContent,
    dest: tr.querySelector('.audit-dest').textContent,
    path: tr.querySelector('.audit-path').textContent,
    member: tr.querySelector('.audit-member').textContent,
    args: tr.querySelector('.audit-args').textContent,
    requester: tr.querySelector('.audit-requester-name').textContent,
    claimed: tr.querySelector('.audit-requester').classList.contains('claimed'),
    note: tr.querySelector('.claim-note').textContent,
  }));
  log('denied row', JSON.stringify(row));
  const want = { host: HOST, dest: 'org.cbus.Test', path: '/org/cbus/Test', member: 'org.cbus.Test1.EmitSignals' };
  for (const [k, v] of Object.entries(want)) if (row[k] !== v) throw new Error(`denied row ${k}: ${row[k]} != ${v}`);
  if (!/^3 B sha256:[0-9a-f]{12}$/.test(row.args)) throw new Error(`denied row args: ${row.args}`);
  if (!row.requester.includes('@') || !row.claimed || !row.note.includes('claimed by requester')) {
    throw new Error(`requester not shown as a claim: ${JSON.stringify(row)}`);
  }
  const allowed = `#audit-body tr[data-policy="allowed"][data-result="ok"][data-op="call"]`;
  await page.waitForSelector(`${allowed}:has-text("EmitOne")`, { timeout: T });
  // A requester claim that is markup stays text.
  const hostile = await page.$$eval('#audit-body .audit-requester-name', (els, h) => els.filter((e) => e.textContent === h).length, HOSTILE);
  if (hostile !== 1) throw new Error(`hostile requester shown ${hostile} times as text`);
  const injected = await page.evaluate(() => document.querySelectorAll('#audit-body img, #audit-body b#pwned').length + (window.pwned ? 1 : 0));
  if (injected) throw new Error('a requester claim was parsed as markup');
  if (!(await page.textContent('#audit-legend')).includes('Claimed by requester')) throw new Error('no legend');
  log('audit page: denied and allowed calls, requester shown as a claim');

  // A live entry arrives without reloading.
  const before = await page.$$eval(allowed, (trs) => trs.length);
  await step('CALL');
  await page.waitForFunction(([sel, n]) => document.querySelectorAll(sel).length === n + 1, [allowed, before], { timeout: T });
  await page.screenshot({ path: SHOT, fullPage: true });
  log('live audit entry shown');

  // The signal log's recent past: a signal emitted before the page opened, then live ones.
  await page.click('button[data-tab=signals]');
  await page.fill('#sig-member', 'Message');
  await page.selectOption('#sig-since', '900000');
  await page.click('#signal-form button[type=submit]');
  await page.waitForSelector('#sig-info:has-text("cbus-signals, then following")', { timeout: T });
  await page.waitForSelector('#signals-body tr.replayed:has-text("before-page")', { timeout: T });
  await step('EMIT');
  await page.waitForSelector('#signals-body tr:not(.replayed):has-text("page-live")', { timeout: T });
  const counts = await page.$$eval('#signals-body tr', (trs) => ({
    before: trs.filter((t) => t.textContent.includes('before-page')).length,
    after: trs.filter((t) => t.textContent.includes('page-live')).length,
  }));
  if (counts.before !== 1 || counts.after !== 1) throw new Error(`seam: ${JSON.stringify(counts)}`);
  log('signal log: replay then live, no duplicate');

  // A machine marked for maintenance is shown as such, and is no reason for attention.
  await step('MAINTENANCE');
  await page.click('button[data-tab=units]');
  await page.waitForSelector(`#units-head th[data-host="${HOST}"] .badge.m-maintenance`, { timeout: T });
  await page.waitForSelector('#fleet-summary:has-text("1 maintenance")', { timeout: T });
  await page.click('button[data-tab=fleet]');
  await page.waitForSelector('#fleet-machines:has-text("maintenance 1")', { timeout: T });
  if (!(await page.isHidden('#banner'))) throw new Error(`banner: ${await page.textContent('#banner')}`);
  log('maintenance shown in the units table, the summary and the fleet counts');
  if (consoleErrors.length) throw new Error(`console errors: ${JSON.stringify(consoleErrors)}`);
  console.log('DONE');
} catch (e) {
  failed = true;
  console.log(`FAIL ${e && e.stack ? e.stack.split('\n').slice(0, 3).join(' | ') : e} | page errors: ${JSON.stringify(consoleErrors)}`);
  try {
    await ctx.pages()[0].screenshot({ path: `${SHOT}.fail.png`, fullPage: true });
  } catch (_) {
    // no page
  }
} finally {
  await close();
}
process.exit(failed ? 1 : 0);
