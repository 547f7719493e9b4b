// cbus dashboard: a client of the gateway's WebSocket API (docs/protocol.md, "WebSocket API").
// Plain ES modules, no build step, no third-party code. Everything agents send is data: it is
// put in the page with textContent / attributes only, never parsed as HTML.
//
// This module wires the views together: login, tabs, the `machines` subscription every view
// shares, and the banner of machines that need attention. Each view subscribes only while it
// is shown, and to unit rows only for what it shows (a unit, a machine, a page of machines).

import { $ } from './dom.js';
import { Gateway } from './gateway.js';
import { ctx, scheduleRender, redrawAll, sortedMachines, putMachines } from './ctx.js';
import { initFleet, followWhileShown as followFleet, resetFleet } from './fleet.js';
import { initUnits, follow as followUnits, resetUnits } from './units.js';
import { initMachines, follow as followMachine, resetMachines } from './machines.js';
import { initSignals, refreshMachineSelect as refreshSignalMachines, resumeSignals } from './signals.js';
import { initObjects, refreshMachineSelect as refreshObjectMachines } from './objects.js';

const TOKEN_KEY = 'cbus-gateway-token';
const BANNER_MACHINES = 10;

ctx.gw = new Gateway((kind, text) => {
  const c = $('conn');
  c.textContent = text;
  c.className = `conn conn-${kind}`;
  ctx.connected = kind === 'up';
  document.body.classList.toggle('stale', kind !== 'up');
  redrawAll(); // action buttons follow the connection state
  if (kind === 'unauthorized') {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(`The gateway refused the token: ${text}`);
  }
});

function onMachines(msg) {
  if (msg.type === 'snapshot') putMachines(msg.data || [], true);
  else if (msg.type === 'delta') putMachines(msg.data.upsert || [], false);
  refreshSignalMachines();
  refreshObjectMachines();
  scheduleRender();
}

// Machines that are not running, or running without their bus, by name (the first few).
function renderBanner() {
  // Machines under maintenance are expected away: not a reason for attention.
  const bad = sortedMachines().filter((m) => !m.maintenance && (m.state !== 'running' || !m.bus_connected));
  const b = $('banner');
  b.hidden = bad.length === 0;
  const named = bad.slice(0, BANNER_MACHINES).map((m) => `${m.hostname} is ${m.state === 'running' ? 'running without its bus' : m.state}`);
  if (bad.length > BANNER_MACHINES) named.push(`and ${bad.length - BANNER_MACHINES} more`);
  b.textContent = bad.length ? `Attention: ${named.join('; ')}` : '';
  const counts = {};
  for (const m of ctx.machines.values()) {
    const k = m.maintenance ? 'maintenance' : m.state;
    counts[k] = (counts[k] || 0) + 1;
  }
  $('fleet-summary').textContent = `${ctx.machines.size} machines${Object.entries(counts)
    .map(([k, v]) => `, ${v} ${k}`)
    .join('')}`;
}

function selectTab(name) {
  for (const x of document.querySelectorAll('#tabs .tab')) x.classList.toggle('active', x.dataset.tab === name);
  for (const p of document.querySelectorAll('.panel')) p.hidden = p.id !== `tab-${name}`;
  followFleet();
  followUnits();
  followMachine();
  redrawAll();
}

function showLogin(error = '') {
  ctx.gw.stop();
  $('login').hidden = false;
  $('app').hidden = true;
  $('logout').hidden = true;
  $('login-error').textContent = error;
  $('token').focus();
}

function startApp(token) {
  $('login').hidden = true;
  $('app').hidden = false;
  $('logout').hidden = false;
  ctx.gw.subs.clear();
  resetFleet();
  resetUnits();
  resetMachines();
  followFleet(); // first: the overview's aggregate is small and is what the page opens on
  ctx.gw.subscribe('machines', { resource: 'machines' }, onMachines);
  resumeSignals();
  followUnits();
  followMachine();
  ctx.gw.start(token);
}

function init() {
  ctx.selectTab = selectTab;
  ctx.renderers.push(renderBanner);
  initFleet();
  initUnits();
  initMachines();
  initSignals();
  initObjects();
  $('login-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const token = $('token').value;
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    $('token').value = '';
    startApp(token);
  });
  $('logout').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin();
  });
  for (const b of document.querySelectorAll('#tabs .tab')) b.addEventListener('click', () => selectTab(b.dataset.tab));
  // Relative times ("since 3m ago") move on without deltas.
  setInterval(() => {
    if (!$('app').hidden) redrawAll();
  }, 5000);

  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) startApp(token);
  else showLogin();
}

// For tests and the benchmark: the page's own view of its state, read-only.
window.cbusDashboard = { machines: () => ctx.machines.size };

init();
