// Drives the cbus dashboard in real headless Chromium (playwright-core), for
// tests/tests/gateway_dashboard.rs. Talks to the Rust test over stdout/stdin lines:
// it prints "STEP <name>" when it needs the test to act and waits for a line on stdin.
// Environment: GATEWAY_URL, TOKEN, UNIT, HOST_A, HOST_B, SHOTS (screenshot path prefix).

import { step, log, launch } from './driver.mjs';

const { GATEWAY_URL, TOKEN, UNIT, HOST_A, HOST_B, SHOTS } = process.env;

const cell = (host) => `#units-body td[data-host="${host}"][data-unit="${UNIT}"]`;
const T = 30000;

const { ctx, close } = await launch({ viewport: { width: 1400, height: 900 } });
let failed = false;
const consoleErrors = [];
try {
  const page = ctx.pages()[0] || (await ctx.newPage());
  page.on('console', (m) => {
    if (m.type() === 'error') consoleErrors.push(m.text());
  });
  page.on('pageerror', (e) => consoleErrors.push(String(e)));

  await page.goto(GATEWAY_URL);
  // A wrong token: the login form says so.
  await page.fill('#token', 'wrong-token');
  await page.click('#login-form button[type=submit]');
  await page.waitForSelector('#login-error:has-text("refused")', { timeout: T });
  log('wrong token refused');

  await page.fill('#token', TOKEN);
  await page.click('#login-form button[type=submit]');
  await page.waitForSelector('#conn.conn-up', { timeout: T });
  await page.waitForSelector('#login', { state: 'hidden', timeout: T });
  // The Fleet view opens first; the machines x units matrix is the Units tab.
  await page.click('button[data-tab=units]');
  for (const host of [HOST_A, HOST_B]) {
    await page.waitForSelector(`${cell(host)}[data-active="active"]`, { timeout: T });
  }
  await page.waitForSelector(`${cell(HOST_A)} .since`, { timeout: T });
  log('table shows the unit active on both machines');
  const token = await page.evaluate(() => sessionStorage.getItem('cbus-gateway-token'));
  if (token !== TOKEN) throw new Error('token not kept in sessionStorage');

  // Filter by unit text: only our unit's row stays.
  await page.fill('#unit-filter', 'gw-sleeper');
  await page.waitForFunction(() => document.querySelectorAll('#units-body tr').length === 1, null, { timeout: T });
  await page.screenshot({ path: `${SHOTS}-1-table.png`, fullPage: true });

  // Follow signals of machine A before acting.
  await page.click('button[data-tab=signals]');
  await page.selectOption('#sig-machine', { label: `${HOST_A} (running)` });
  await page.fill('#sig-member', 'PropertiesChanged');
  await page.click('#signal-form button[type=submit]');
  await page.waitForSelector('#sig-info:has-text("following")', { timeout: T });
  await page.click('button[data-tab=units]');

  // Stop on machine A only.
  await page.click(`${cell(HOST_A)} button[data-action=stop]`);
  await page.waitForSelector(`${cell(HOST_A)}[data-active="inactive"]`, { timeout: T });
  await page.waitForSelector(`#results li.ok[data-machine]:has-text("${HOST_A}")`, { timeout: T });
  await page.waitForSelector('#results .ok:has-text("done: 1 ok")', { timeout: T });
  const bState = await page.getAttribute(cell(HOST_B), 'data-active');
  if (bState !== 'active') throw new Error(`machine B changed too: ${bState}`);
  log('stop on A reflected in the table');
  await step('STOPPED'); // the test checks machine A's bus

  // Fleet view: gateway aggregates, then one unit across machines and a restart on them.
  await page.click('button[data-tab=fleet]');
  await page.waitForSelector('#fleet-machines:has-text("machines 2: running 2")', { timeout: T });
  await page.fill('#fleet-unit', UNIT);
  const frow = `#fleet-body tr[data-unit="${UNIT}"]`;
  await page.waitForSelector(`${frow}:has-text("active 1, inactive 1")`, { timeout: T });
  await page.click(`${frow} a`);
  for (const host of [HOST_A, HOST_B]) {
    await page.waitForSelector(`#fleet-detail-body tr:has-text("${host}")`, { timeout: T });
  }
  page.once('dialog', (d) => d.accept());
  await page.click('#fleet-detail-actions button[data-action=restart]');
  await page.waitForSelector('#fleet-results .ok:has-text("done: 2 ok")', { timeout: T });
  await page.waitForSelector(`${frow}:has-text("active 2")`, { timeout: T });
  await page.screenshot({ path: `${SHOTS}-0-fleet.png`, fullPage: true });
  log('fleet view: counts, unit detail, restart on both');
  await page.click('button[data-tab=units]');

  // The signal log saw it.
  await page.click('button[data-tab=signals]');
  await page.waitForSelector(`#signals-body tr:has-text("${HOST_A}")`, { timeout: T });
  await page.screenshot({ path: `${SHOTS}-2-signals.png`, fullPage: true });
  await page.click('button[data-tab=units]');

  // Bulk start on a selection of both machines, with per-machine results.
  await page.click('#select-all');
  page.once('dialog', (d) => d.accept());
  await page.click(`#units-body tr[data-unit="${UNIT}"] th button[data-action=start]`);
  await page.waitForSelector('#results .ok:has-text("done: 2 ok")', { timeout: T });
  for (const host of [HOST_A, HOST_B]) {
    await page.waitForSelector(`${cell(host)}[data-active="active"]`, { timeout: T });
  }
  log('bulk start on both machines');

  // Object browser: the unit's object on A, then edit a writable property of the test target.
  await page.click('button[data-tab=objects]');
  await page.selectOption('#obj-machine', { label: `${HOST_A} (running)` });
  await page.fill('#obj-dest', 'org.freedesktop.systemd1');
  await page.fill('#obj-path', `/org/freedesktop/systemd1/unit/${UNIT.replace(/-/g, '_2d').replace(/\./g, '_2e')}`);
  await page.fill('#obj-interface', 'org.freedesktop.systemd1.Unit');
  await page.click('#object-form button[type=submit]');
  await page.waitForSelector('td.value[data-property="ActiveState"]:has-text("active")', { timeout: T });
  await page.screenshot({ path: `${SHOTS}-3-object.png`, fullPage: true });
  // Editing: the Manager's LogLevel is writable.
  await page.fill('#obj-path', '/org/freedesktop/systemd1');
  await page.fill('#obj-interface', 'org.freedesktop.systemd1.Manager');
  await page.click('#object-form button[type=submit]');
  const level = 'td.value.writable[data-property="LogLevel"]';
  await page.waitForSelector(level, { timeout: T });
  await page.dblclick(level);
  await page.fill(`${level} input.edit`, 'debug');
  await page.press(`${level} input.edit`, 'Enter');
  await page.waitForSelector(`${level}:has-text("debug")`, { timeout: T });
  log('LogLevel edited');
  await step('EDITED'); // the test checks and resets LogLevel on machine A
  await page.click('button[data-tab=units]');

  // A machine that goes silent is shown as unresponsive.
  await step('KILL_B');
  await page.waitForSelector(`#units-head th[data-host="${HOST_B}"].m-unresponsive`, { timeout: T });
  await page.waitForSelector(`#banner:has-text("${HOST_B} is unresponsive")`, { timeout: T });
  await page.screenshot({ path: `${SHOTS}-4-unresponsive.png`, fullPage: true });
  log('unresponsive machine shown');

  // The gateway goes away: the page says so, then reconnects by itself and resubscribes.
  await step('STOP_GATEWAY');
  await page.waitForSelector('#conn.conn-down', { timeout: T });
  await page.screenshot({ path: `${SHOTS}-5-disconnected.png`, fullPage: true });
  await step('START_GATEWAY');
  await page.waitForSelector('#conn.conn-up', { timeout: 60000 });
  await page.waitForSelector(`${cell(HOST_A)}[data-active="active"]`, { timeout: T });
  log('reconnected and resubscribed');

  if (consoleErrors.length) log('console errors:', JSON.stringify(consoleErrors));
  console.log('DONE');
} catch (e) {
  failed = true;
  console.log(`FAIL ${e && e.stack ? e.stack.split('\n').slice(0, 3).join(' | ') : e} | page errors: ${JSON.stringify(consoleErrors)}`);
  try {
    const page = ctx.pages()[0];
    await page.screenshot({ path: `${SHOTS}-fail.png`, fullPage: true });
  } catch (_) {
    // no page
  }
} finally {
  await close();
}
process.exit(failed ? 1 : 0);
