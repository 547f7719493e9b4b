// What every dashboard script shares: the step protocol with its Rust test ("STEP <name>" on
// stdout, then the test's line on stdin once it has checked or done its part) and headless
// Chromium launched as all of them need it (Debian's /usr/bin/chromium, a throw-away profile).
import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

const lines = createInterface({ input: process.stdin });
const waiting = [];
lines.on('line', (l) => {
  const w = waiting.shift();
  if (w) w(l);
});

/** Says "STEP name" and resolves when the test answers. */
export const step = (name) =>
  new Promise((resolve) => {
    waiting.push(resolve);
    console.log(`STEP ${name}`);
  });

export const log = (...a) => console.log('LOG', ...a);

const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--no-first-run', '--disable-sync'];

/** Headless Chromium with a fresh profile; `close()` ends it, removes the profile and stops reading stdin. */
export async function launch({ viewport = { width: 1400, height: 900 }, args = [] } = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'cbus-chromium-'));
  const ctx = await chromium.launchPersistentContext(dir, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    viewport,
    args: [...ARGS, ...args],
  });
  const close = async () => {
    await ctx.close();
    rmSync(dir, { recursive: true, force: true });
    lines.close();
  };
  return { ctx, close };
}
