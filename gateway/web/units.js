// Units view: the machine-by-unit matrix, for a page of machines at a time (12 columns) and
// a page of unit names (100 rows). It subscribes to the `units` resource of those machines
// only (and of the unit glob typed), and only while it is shown: the browser never holds the
// fleet's 200,000 unit rows.

import { $, el, relTime, unitGlob, Pager } from './dom.js';
import { ctx, scheduleRender, sortedMachines, currentTab } from './ctx.js';
import { actionButtons } from './bulk.js';

const COLUMNS = 12;
// `cells` maps machine\0unit to its <td> while the table's shape (`shape`) stays: a delta then
// replaces only the cells it changed, not the 1,200 cells of the page.
const units = { rows: new Map(), cols: {}, subKey: '', selected: new Set(), cells: new Map(), changed: new Set(), shape: '' };
const machinePager = new Pager(COLUMNS, () => { follow(); scheduleRender(); }, 'units-machines');
const unitPager = new Pager(100, scheduleRender, 'units-rows');

function col(row, name) {
  return row[units.cols[name]];
}

function unitKey(machine, name) {
  return `${machine}\u0000${name}`;
}

function onUnits(msg) {
  if (msg.type === 'snapshot') {
    units.cols = {};
    (msg.schema.columns || []).forEach((c, i) => {
      units.cols[c.name] = i;
    });
    units.rows.clear();
    for (const r of msg.data || []) units.rows.set(unitKey(col(r, 'machine'), col(r, 'name')), r);
    units.shape = '';
  } else if (msg.type === 'delta') {
    const d = msg.data;
    if (d.replace) {
      for (const k of [...units.rows.keys()]) if (k.startsWith(`${d.replace}\u0000`)) units.rows.delete(k);
      units.shape = '';
    }
    for (const r of d.upsert || []) {
      const k = unitKey(col(r, 'machine'), col(r, 'name'));
      units.rows.set(k, r);
      units.changed.add(k);
    }
    for (const [m, n] of d.remove || []) {
      units.rows.delete(unitKey(m, n));
      units.changed.add(unitKey(m, n));
    }
  }
  scheduleRender();
}

/** Machines matching the machine filter (hostname, nkey or a `key=value` label). */
function filteredMachines() {
  const f = $('machine-filter').value.trim().toLowerCase();
  const [lk, lv] = f.includes('=') ? [f.slice(0, f.indexOf('=')), f.slice(f.indexOf('=') + 1)] : [null, null];
  return sortedMachines().filter((m) => {
    if (!f) return true;
    if (lk !== null) return String(m.labels?.[lk] ?? '').toLowerCase() === lv;
    return m.hostname.toLowerCase().includes(f) || m.nkey.toLowerCase().includes(f);
  });
}

function pageMachines() {
  return machinePager.slice(filteredMachines());
}

/** (Re)subscribes when the page's machines or the unit glob changed; unsubscribes when hidden. */
export function follow() {
  if (currentTab() !== 'units' || !ctx.gw) {
    if (units.subKey) {
      ctx.gw.unsubscribe('units');
      // The hidden matrix's thousands of nodes go too.
      $('units-body').replaceChildren();
      units.cells.clear();
      units.shape = '';
    }
    units.subKey = '';
    units.rows.clear();
    return;
  }
  const machines = pageMachines().map((m) => m.nkey);
  const glob = unitGlob($('unit-filter').value);
  const key = JSON.stringify([machines, glob]);
  if (key === units.subKey) return;
  units.subKey = key;
  ctx.gw.unsubscribe('units');
  units.rows.clear();
  if (!machines.length) return;
  const p = { resource: 'units', machines };
  if (glob) p.unit = glob;
  ctx.gw.subscribe('units', p, onUnits);
}

/** One machine's state of one unit, with its actions. */
function cell(m, name, r) {
  if (!r) return el('td', { class: `cell missing m-${m.state}`, dataset: { machine: m.nkey, host: m.hostname, unit: name }, text: '—' });
  const active = String(col(r, 'active') || '');
  const sinceUs = col(r, 'since_us');
  const sinceMs = typeof sinceUs === 'number' ? sinceUs / 1000 : 0;
  const restarts = col(r, 'restarts');
  return el(
    'td',
    { class: `cell m-${m.state}`, dataset: { machine: m.nkey, host: m.hostname, unit: name, active } },
    el('span', { class: `state st-${active}`, text: active || '?' }),
    el('span', { class: 'sub', text: String(col(r, 'sub') || '') }),
    sinceMs ? el('div', { class: 'since muted', title: new Date(sinceMs).toISOString(), text: `since ${relTime(sinceMs)}` }) : null,
    typeof restarts === 'number' && restarts > 0 ? el('div', { class: 'muted', text: `${restarts} restarts` }) : null,
    actionButtons(name, () => [m.nkey]),
  );
}

/** Replaces the cells deltas changed; false when the table's shape moved (a full draw). */
function patchCells(shape) {
  if (shape !== units.shape) return false;
  for (const k of units.changed) {
    const td = units.cells.get(k);
    if (!td) continue; // not on this page
    const [nkey, name] = k.split('\u0000');
    const m = ctx.machines.get(nkey);
    if (!m) return false;
    const fresh = cell(m, name, units.rows.get(k));
    td.replaceWith(fresh);
    units.cells.set(k, fresh);
  }
  units.changed.clear();
  return true;
}

export function renderUnits() {
  if (currentTab() !== 'units') return;
  follow();
  const machines = pageMachines();
  const hideInactive = $('hide-inactive').checked;
  const byUnit = new Map();
  for (const row of units.rows.values()) {
    const name = col(row, 'name');
    if (!byUnit.has(name)) byUnit.set(name, new Map());
    byUnit.get(name).set(col(row, 'machine'), row);
  }
  const visible = new Set(machines.map((m) => m.nkey));
  const names = [...byUnit.keys()].sort().filter((n) => {
    const rows = [...byUnit.get(n).entries()].filter(([m]) => visible.has(m));
    if (rows.length === 0) return false;
    return !hideInactive || rows.some(([, r]) => col(r, 'active') !== 'inactive');
  });
  const shown = unitPager.slice(names);
  const shape = JSON.stringify([machines.map((m) => [m.nkey, m.state, m.bus_connected, Boolean(m.maintenance)]), shown, [...units.selected], ctx.epoch, ctx.connected, units.subKey]);
  if (patchCells(shape)) return;
  units.shape = shape;
  $('units-pagers').replaceChildren(el('span', { class: 'muted', text: 'machines' }), machinePager.controls(), el('span', { class: 'muted', text: 'units' }), unitPager.controls());

  const head = $('units-head');
  head.replaceChildren(el('th', { class: 'unit-col', text: `unit (${names.length})` }));
  for (const m of machines) {
    const cb = el('input', {
      type: 'checkbox',
      title: 'select for bulk actions',
      dataset: { select: m.nkey },
      onchange: (e) => {
        if (e.target.checked) units.selected.add(m.nkey);
        else units.selected.delete(m.nkey);
        scheduleRender();
      },
    });
    cb.checked = units.selected.has(m.nkey);
    head.append(
      el(
        'th',
        { class: `machine m-${m.state}`, dataset: { machine: m.nkey, host: m.hostname }, title: `${m.nkey}\nagent ${m.version}, bus ${m.bus}${m.bus_connected ? '' : ' (disconnected)'}\nlast seen ${relTime(m.last_seen_ms)}` },
        el('label', {}, cb, ` ${m.hostname}`),
        el('span', { class: `badge m-${m.state}`, text: m.bus_connected || m.state !== 'running' ? m.state : 'bus down' }),
        m.maintenance ? el('span', { class: 'badge m-maintenance', title: `${m.maintenance.reason || ''} (by ${m.maintenance.by || '?'}, a claim)`, text: 'maintenance' }) : null,
      ),
    );
  }

  const rows = [];
  units.cells.clear();
  units.changed.clear();
  for (const name of shown) {
    const per = byUnit.get(name);
    const anyRow = per.values().next().value;
    const th = el(
      'th',
      { class: 'unit-col', scope: 'row', title: String(col(anyRow, 'description') || '') },
      el('div', { class: 'unit-name', text: name }),
      el('div', { class: 'muted desc', text: String(col(anyRow, 'description') || '') }),
    );
    if (machines.length > 1) {
      th.append(actionButtons(name, () => [...units.selected].filter((n) => ctx.machines.has(n)), { bulk: true }));
    }
    const tr = el('tr', { dataset: { unit: name } }, th);
    for (const m of machines) {
      const td = cell(m, name, per.get(m.nkey));
      units.cells.set(unitKey(m.nkey, name), td);
      tr.append(td);
    }
    rows.push(tr);
  }
  $('units-body').replaceChildren(...rows);
  $('units-empty').hidden = names.length > 0;
  const sel = [...units.selected].filter((n) => ctx.machines.has(n));
  $('selection-info').textContent = sel.length ? `${sel.length} machine(s) selected` : '';
}

export function initUnits() {
  $('unit-filter').addEventListener('input', () => {
    unitPager.offset = 0;
    scheduleRender();
  });
  $('machine-filter').addEventListener('input', () => {
    machinePager.offset = 0;
    scheduleRender();
  });
  $('hide-inactive').addEventListener('input', scheduleRender);
  $('select-all').addEventListener('click', () => {
    for (const m of pageMachines()) units.selected.add(m.nkey);
    scheduleRender();
  });
  $('select-none').addEventListener('click', () => {
    units.selected.clear();
    scheduleRender();
  });
  ctx.renderers.push(renderUnits);
}

/** Forgets the subscription (after a login: the gateway connection's subscriptions are new). */
export function resetUnits() {
  units.subKey = '';
  units.rows.clear();
}
