// Fleet view: gateway-side aggregates (resource "fleet"), a page of unit names at a time, so a
// fleet of 1,000 machines x 200 units is a few kilobytes per update, not 200,000 rows. Opening
// a unit follows that one unit on every machine (resource "units" with its name), to choose
// machines by state and label for a bulk action, rolling or not.

import { $, el, relTime, counts, parseLabel, Pager } from './dom.js';
import { ctx, scheduleRender, currentTab } from './ctx.js';
import { actionButtons } from './bulk.js';

const FLEET_PAGE = 100;
// `drawn` is what the DOM shows: [summary object, epoch] and [detail version, epoch], so a
// frame redraws only the part that changed (unit deltas do not rebuild the aggregate).
const fleet = { summary: null, offset: 0, following: false, detail: null, detailRows: new Map(), detailVersion: 0, drawn: [null, -1, -1, -1] };
function detailChanged() {
  fleet.detailVersion += 1;
  scheduleRender();
}
const detailPager = new Pager(100, detailChanged, 'fleet-detail');

export function fleetParams() {
  // The failed list is the heaviest part of the aggregate: 20 units x 10 machines is what the
  // view shows (counts say how many more).
  const p = { resource: 'fleet', offset: fleet.offset, limit: FLEET_PAGE, failed_limit: 20, failed_machines: 10 };
  const unit = $('fleet-unit').value.trim();
  const label = $('fleet-label').value.trim();
  if (unit) p.unit = unit;
  if (parseLabel(label)) p.label = label;
  return p;
}

export function onFleet(msg) {
  if (msg.type === 'snapshot') {
    fleet.summary = msg.data;
    fleet.at = performance.now();
    scheduleRender();
  } else if (msg.type === 'error') {
    $('fleet-page').textContent = `error: ${msg.error?.message}`;
  }
}

export function followFleet() {
  ctx.gw.unsubscribe('fleet');
  ctx.gw.subscribe('fleet', fleetParams(), onFleet);
}

/**
 * The aggregate and the open unit are followed only while the Fleet view is shown: elsewhere
 * their snapshots (the failed list grows to 100 units x 50 machines) would be parsed for
 * nothing.
 */
export function followWhileShown() {
  const shown = currentTab() === 'fleet';
  if (shown === fleet.following) return;
  fleet.following = shown;
  if (!shown) {
    ctx.gw.unsubscribe('fleet');
    ctx.gw.unsubscribe('fleet-unit');
    return;
  }
  followFleet();
  if (fleet.detail) openUnit(fleet.detail);
}

/** Forgets what was followed (after a login: the connection's subscriptions are new). */
export function resetFleet() {
  fleet.following = false;
}

const intoResults = () => $('fleet-results');

function hostLink(nkey, host) {
  return el('a', { href: '#', dataset: { open: nkey }, text: host, onclick: (e) => { e.preventDefault(); ctx.openMachine(nkey); } });
}

export function renderFleet() {
  if (currentTab() !== 'fleet') return;
  const s = fleet.summary;
  if (!s) return;
  const [summary, epoch] = fleet.drawn;
  if (summary === s && epoch === ctx.epoch) {
    renderUnitDetail();
    return;
  }
  fleet.drawn[0] = s;
  fleet.drawn[1] = ctx.epoch;
  $('fleet-counts').replaceChildren(
    el('span', { id: 'fleet-machines', text: `machines ${s.machines_total}: ${counts(s.machines)}` }),
    el('span', { id: 'fleet-system', text: `system: ${counts(s.system)}` }),
    el('span', { id: 'fleet-units', text: `units: ${counts(s.units)}` }),
  );
  const failed = $('fleet-failed');
  failed.replaceChildren(
    ...s.failed.map((f) => {
      const more = f.count > f.machines.length ? ` and ${f.count - f.machines.length} more` : '';
      const since = f.since_us ? ` since ${relTime(f.since_us / 1000)}` : '';
      const li = el('li', { class: 'failed', dataset: { unit: f.unit, count: f.count } }, el('b', { text: f.unit }), ` failed on ${f.count}: `);
      f.machines.forEach((m, i) => li.append(i ? ', ' : '', hostLink(m.machine, m.host)));
      li.append(`${more}${since} `);
      li.append(actionButtons(f.unit, () => f.machines.map((m) => m.machine), { bulk: true, into: intoResults }));
      return li;
    }),
  );
  if (!s.failed.length) failed.append(el('li', { class: 'ok', text: 'no failed units' }));
  if (s.failed_total > s.failed.length) failed.append(el('li', { class: 'muted', text: `and ${s.failed_total - s.failed.length} more failed units` }));
  $('fleet-page').textContent = `${s.rows_total ? s.offset + 1 : 0}–${s.offset + s.rows.length} of ${s.rows_total} units`;
  $('fleet-body').replaceChildren(
    ...s.rows.map((r) => {
      const tr = el('tr', { dataset: { unit: r.unit } }, el('td', {}, el('a', { href: '#', text: r.unit })), el('td', { text: String(r.machines) }), el('td', { text: counts(r.states) }));
      tr.querySelector('a').addEventListener('click', (e) => {
        e.preventDefault();
        openUnit(r.unit);
      });
      return tr;
    }),
  );
  fleet.drawn[2] = -1; // the label filter may have changed the selection
  renderUnitDetail();
}

// One unit on every machine: the units resource filtered to that exact name.
export function openUnit(name) {
  fleet.detail = name;
  fleet.detailRows.clear();
  detailPager.offset = 0;
  fleet.detailVersion += 1;
  $('fleet-unit-detail').hidden = false;
  ctx.gw.unsubscribe('fleet-unit');
  const glob = name.replace(/[*?]/g, '?');
  ctx.gw.subscribe('fleet-unit', { resource: 'units', unit: glob }, (msg) => {
    const key = (r) => `${r[0]}\0${r[2]}`;
    if (msg.type === 'snapshot') {
      fleet.detailRows.clear();
      for (const r of msg.data) if (r[2] === name) fleet.detailRows.set(key(r), r);
    } else if (msg.type === 'delta') {
      const d = msg.data;
      if (d.replace) for (const k of [...fleet.detailRows.keys()]) if (k.startsWith(`${d.replace}\0`)) fleet.detailRows.delete(k);
      for (const r of d.upsert || []) if (r[2] === name) fleet.detailRows.set(key(r), r);
      for (const [m, n] of d.remove || []) fleet.detailRows.delete(`${m}\0${n}`);
    }
    detailChanged();
  });
}

/** The machines the selection controls choose among the unit's rows. */
function chosenRows(rows) {
  const state = $('sel-state').value;
  const label = parseLabel($('sel-label').value) || parseLabel($('fleet-label').value);
  return rows.filter((r) => (!state || r[6] === state) && (!label || ctx.machines.get(r[0])?.labels?.[label[0]] === label[1]));
}

function rolling() {
  const batch = $('sel-batch').value.trim();
  if (!batch) return null;
  const r = { batch, max_fail: $('sel-maxfail').value.trim() || '0' };
  const hold = $('sel-hold').value.trim();
  if (hold) r.hold_ms = Math.round(Number(hold) * 1000);
  const order = $('sel-order').value.trim();
  if (order) r.order = order;
  return r;
}

function renderUnitDetail() {
  const name = fleet.detail;
  if (!name) return;
  if (fleet.drawn[2] === fleet.detailVersion && fleet.drawn[3] === ctx.epoch) return;
  fleet.drawn[2] = fleet.detailVersion;
  fleet.drawn[3] = ctx.epoch;
  $('fleet-detail-title').textContent = name;
  const cmp = (x, y) => (x < y ? -1 : x > y ? 1 : 0);
  const rows = [...fleet.detailRows.values()].sort((a, b) => cmp(a[1], b[1]) || cmp(a[0], b[0]));
  const chosen = chosenRows(rows).map((r) => r[0]);
  const states = {};
  for (const r of rows) states[r[6]] = (states[r[6]] || 0) + 1;
  $('fleet-detail-actions').replaceChildren(
    el('span', { id: 'sel-count', dataset: { count: chosen.length }, text: `${chosen.length} of ${rows.length} machine(s) chosen (${counts(states)}): ` }),
    actionButtons(name, () => chosen, { bulk: true, into: intoResults, rolling }),
  );
  const page = detailPager.slice(rows);
  $('fleet-detail-pager').replaceChildren(detailPager.controls());
  $('fleet-detail-body').replaceChildren(
    ...page.map((r) =>
      el(
        'tr',
        { dataset: { machine: r[0] } },
        el('td', {}, hostLink(r[0], r[1])),
        el('td', { class: `st-${r[6]}`, text: r[6] }),
        el('td', { text: r[7] }),
        el('td', { text: r[8] ? relTime(r[8] / 1000) : '' }),
        el('td', { text: r[9] == null ? '' : String(r[9]) }),
      ),
    ),
  );
}

export function initFleet() {
  for (const id of ['fleet-unit', 'fleet-label']) {
    $(id).addEventListener('input', () => {
      fleet.offset = 0;
      followFleet();
    });
  }
  for (const id of ['sel-state', 'sel-label']) $(id).addEventListener('input', detailChanged);
  $('fleet-prev').addEventListener('click', () => {
    fleet.offset = Math.max(0, fleet.offset - FLEET_PAGE);
    followFleet();
  });
  $('fleet-next').addEventListener('click', () => {
    if (fleet.summary && fleet.offset + FLEET_PAGE < fleet.summary.rows_total) fleet.offset += FLEET_PAGE;
    followFleet();
  });
  ctx.renderers.push(renderFleet);
}
