// Signals view: the signal log (resource `signals`), newest first, at most 500 rows.

import { $, el, truncate } from './dom.js';
import { ctx, sortedMachines } from './ctx.js';

const MAX_SIGNALS = 500;
let sigPaused = false;
let sigParams = null;
export function onSignals(msg) {
  if (msg.type === 'error') {
    $('sig-info').textContent = `error: ${msg.error?.message}`;
    return;
  }
  if (msg.type === 'snapshot') {
    const h = msg.schema?.history; // the recent past, from the signal stream
    if (h && !msg.resync) $('signals-body').replaceChildren();
    $('sig-info').textContent = msg.resync
      ? 'some signals were dropped (client too slow)'
      : !h
        ? 'following'
        : h.available
          ? `up to ${h.replayed} signal(s) of the last ${Math.round(h.since_ms / 60000)} min from ${h.stream}, then following`
          : `no signal history (${h.error}); following`;
    return;
  }
  const s = msg.data;
  const body = $('signals-body');
  const time = new Date(s.received_ms || Date.now()).toLocaleTimeString([], { hour12: false });
  body.prepend(
    el(
      'tr',
      { class: s.replayed ? 'replayed' : '', title: s.replayed ? 'from the signal stream (before this page followed)' : '' },
      el('td', { class: 'nowrap', text: time }),
      el('td', { class: 'nowrap', text: s.host || s.machine || '' }),
      el('td', { text: s.sender_name ? `${s.sender_name} (${s.sender})` : s.sender || '' }),
      el('td', { class: 'mono', text: s.path || '' }),
      el('td', { class: 'mono', text: `${s.interface || ''}.${s.member || ''}` }),
      el('td', { class: 'mono args', title: truncate(JSON.stringify(s.args), 4000), text: truncate(JSON.stringify(s.args), 300) }),
    ),
  );
  while (body.children.length > MAX_SIGNALS) body.lastChild.remove();
}

export function followSignals() {
  const p = { resource: 'signals' };
  const m = $('sig-machine').value;
  if (m) p.machine = m;
  for (const [id, key] of [
    ['sig-sender', 'sender'],
    ['sig-interface', 'interface'],
    ['sig-member', 'member'],
    ['sig-path', 'path_prefix'],
  ]) {
    const v = $(id).value.trim();
    if (v) p[key] = v;
  }
  if ($('sig-since').value) p.since_ms = Number($('sig-since').value);
  sigParams = p;
  ctx.gw.unsubscribe('sig');
  ctx.gw.subscribe('sig', p, onSignals);
  sigPaused = false;
  $('sig-pause').textContent = 'Pause';
}

/** Opens the log on one machine (from the Machine view). */
export function openSignals(nkey) {
  refreshMachineSelect();
  $('sig-machine').value = nkey;
  ctx.selectTab('signals');
  followSignals();
}

let selectKey = '';
/** The machine list of the filter; rebuilt only when machines or their states change. */
export function refreshMachineSelect() {
  const ms = sortedMachines();
  const key = ms.map((m) => `${m.nkey}:${m.state}`).join(',');
  if (key === selectKey) return;
  selectKey = key;
  const sel = $('sig-machine');
  const cur = sel.value;
  sel.replaceChildren(el('option', { value: '', text: 'all' }), ...ms.map((m) => el('option', { value: m.nkey, text: `${m.hostname} (${m.state})` })));
  if ([...sel.options].some((o) => o.value === cur)) sel.value = cur;
}

export function initSignals() {
  ctx.openSignals = openSignals;
  $('signal-form').addEventListener('submit', (e) => {
    e.preventDefault();
    followSignals();
  });
  $('sig-pause').addEventListener('click', () => {
    if (!sigPaused) {
      ctx.gw.unsubscribe('sig');
      sigPaused = true;
      $('sig-pause').textContent = 'Resume';
      $('sig-info').textContent = 'paused';
    } else if (sigParams) {
      ctx.gw.subscribe('sig', sigParams, onSignals);
      sigPaused = false;
      $('sig-pause').textContent = 'Pause';
    }
  });
  $('sig-clear').addEventListener('click', () => $('signals-body').replaceChildren());
}

/** Resubscribes after a login, if the log was following. */
export function resumeSignals() {
  if (sigParams && !sigPaused) ctx.gw.subscribe('sig', sigParams, onSignals);
}
