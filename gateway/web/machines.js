// Machine view: the machines (filtered by name, label or state, 100 per page), and one
// machine: its labels, agent version, last seen, system state, and its units (resource
// `units` for that machine only, 100 per page) with start / stop / restart; from there the
// object browser and the signal log open on that machine.

import { $, el, relTime, counts, parseLabel, Pager } from './dom.js';
import { ctx, scheduleRender, sortedMachines, currentTab } from './ctx.js';
import { actionButtons } from './bulk.js';

const view = { open: null, rows: new Map(), subscribed: null };
const listPager = new Pager(100, scheduleRender, 'machines');
const unitPager = new Pager(100, scheduleRender, 'machine-units');

function stateText(m) {
  if (m.maintenance) return `${m.state}, maintenance`;
  if (m.state === 'running' && !m.bus_connected) return 'running, bus down';
  return m.state;
}

function filtered() {
  const f = $('mach-filter').value.trim().toLowerCase();
  const label = parseLabel(f);
  const st = $('mach-state').value;
  return sortedMachines().filter((m) => {
    if (st === 'degraded' ? m.system_state !== 'degraded' : st && m.state !== st) return false;
    if (label) return String(m.labels?.[label[0]] ?? '').toLowerCase() === label[1];
    return !f || m.hostname.toLowerCase().includes(f) || m.nkey.toLowerCase().includes(f);
  });
}

function labelsText(m) {
  return Object.entries(m.labels || {})
    .map(([k, v]) => `${k}=${v}`)
    .join(' ');
}

function renderList() {
  const page = listPager.slice(filtered());
  $('mach-pager').replaceChildren(listPager.controls());
  $('machines-body').replaceChildren(
    ...page.map((m) =>
      el(
        'tr',
        { class: `m-${m.state}`, dataset: { machine: m.nkey, host: m.hostname } },
        el('td', {}, el('a', { href: '#', text: m.hostname, onclick: (e) => { e.preventDefault(); openMachine(m.nkey); } })),
        el('td', {}, el('span', { class: `badge m-${m.state}`, text: stateText(m) })),
        el('td', { class: m.system_state === 'degraded' ? 'failed' : '', text: m.system_state || '' }),
        el('td', { text: m.units_loaded ? String(m.units) : '…' }),
        el('td', { class: 'mono', text: labelsText(m) }),
        el('td', { text: m.version }),
        el('td', { text: relTime(m.last_seen_ms) }),
      ),
    ),
  );
}

function onUnits(msg) {
  const key = (r) => r[2];
  if (msg.type === 'snapshot') {
    view.rows.clear();
    for (const r of msg.data || []) view.rows.set(key(r), r);
  } else if (msg.type === 'delta') {
    const d = msg.data;
    if (d.replace) view.rows.clear();
    for (const r of d.upsert || []) view.rows.set(key(r), r);
    for (const [, n] of d.remove || []) view.rows.delete(n);
  }
  scheduleRender();
}

/** Follows the open machine's units while the view shows it; nothing otherwise. */
export function follow() {
  const want = currentTab() === 'machines' ? view.open : null;
  if (want === view.subscribed) return;
  ctx.gw.unsubscribe('machine-units');
  view.rows.clear();
  view.subscribed = want;
  if (want) ctx.gw.subscribe('machine-units', { resource: 'units', machines: [want] }, onUnits);
}

export function openMachine(nkey) {
  view.open = nkey;
  unitPager.offset = 0;
  ctx.selectTab('machines');
  follow();
  scheduleRender();
}

function renderDetail(m) {
  $('mach-title').textContent = m.hostname;
  const info = [
    ['state', stateText(m)],
    ['system', m.system_state || 'unknown'],
    ['agent', `${m.version}, bus ${m.bus}${m.bus_connected ? '' : ' (disconnected)'}`],
    ['last seen', `${relTime(m.last_seen_ms)} (${new Date(m.last_seen_ms).toISOString()})`],
    ['agent started', m.started_at_ms ? relTime(m.started_at_ms) : ''],
    ['labels', labelsText(m) || '(none)'],
    ['nkey', m.nkey],
  ];
  if (m.maintenance) info.push(['maintenance', JSON.stringify(m.maintenance)]);
  $('mach-info').replaceChildren(...info.flatMap(([k, v]) => [el('dt', { text: k }), el('dd', { dataset: { field: k }, text: v })]));
  const f = $('mach-unit-filter').value.trim().toLowerCase();
  const st = $('mach-unit-state').value;
  const all = [...view.rows.values()];
  const states = {};
  for (const r of all) states[r[6]] = (states[r[6]] || 0) + 1;
  $('mach-unit-counts').textContent = `${all.length} units: ${counts(states)}`;
  const rows = all.filter((r) => (!f || r[2].toLowerCase().includes(f)) && (!st || r[6] === st)).sort((a, b) => (a[2] < b[2] ? -1 : a[2] > b[2] ? 1 : 0));
  const page = unitPager.slice(rows);
  $('mach-unit-pager').replaceChildren(unitPager.controls());
  $('mach-units-body').replaceChildren(
    ...page.map((r) =>
      el(
        'tr',
        { dataset: { unit: r[2], active: r[6] } },
        el('td', { title: String(r[4] || '') }, el('div', { class: 'unit-name', text: r[2] }), el('div', { class: 'muted desc', text: String(r[4] || '') })),
        el('td', {}, el('span', { class: `state st-${r[6]}`, text: r[6] })),
        el('td', { text: r[7] }),
        el('td', { text: r[8] ? relTime(r[8] / 1000) : '' }),
        el('td', { text: r[9] == null ? '' : String(r[9]) }),
        el('td', {}, actionButtons(r[2], () => [m.nkey], { into: () => $('mach-results') })),
      ),
    ),
  );
}

export function renderMachines() {
  if (currentTab() !== 'machines') return;
  follow();
  const m = view.open && ctx.machines.get(view.open);
  $('machine-list-view').hidden = Boolean(m);
  $('machine-detail').hidden = !m;
  if (m) renderDetail(m);
  else renderList();
}

export function initMachines() {
  ctx.openMachine = openMachine;
  for (const id of ['mach-filter', 'mach-state']) {
    $(id).addEventListener('input', () => {
      listPager.offset = 0;
      scheduleRender();
    });
  }
  for (const id of ['mach-unit-filter', 'mach-unit-state']) {
    $(id).addEventListener('input', () => {
      unitPager.offset = 0;
      scheduleRender();
    });
  }
  $('mach-back').addEventListener('click', () => {
    view.open = null;
    follow();
    scheduleRender();
  });
  $('mach-objects').addEventListener('click', () => ctx.openObjects(view.open));
  $('mach-signals').addEventListener('click', () => ctx.openSignals(view.open));
  ctx.renderers.push(renderMachines);
}

export function resetMachines() {
  view.subscribed = null;
  view.rows.clear();
}
