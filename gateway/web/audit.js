// cbus dashboard, Audit view: the audit trail (WebSocket resource "audit", docs/protocol.md),
// a page of the newest entries from the cbus-audit stream, then each new one as it is stored.
//
// What an entry is worth is docs/security.md's table, and the view shows it: the machine and the
// stored time are vouched for by the NATS server, the operation, its target, the arguments' size
// and digest, the verdict and the result by that machine's agent, and the requester (and where
// the answer went) is only the requester's claim. Everything here is agent-sent data: rendered
// with textContent and attributes only (el() below), never parsed as markup.

import { ctx } from './ctx.js';
import { $, el } from './dom.js';
const SUB = 'audit';
const MAX_ROWS = 500;
const SINCE = [
  ['3600000', 'last hour'],
  ['86400000', 'last 24 h'],
  ['604800000', 'last 7 days'],
  ['2678400000', 'last 31 days'],
];

const audit = { rows: [], history: null, params: null };

function fmtTime(ms) {
  if (!ms) return '';
  const d = new Date(ms);
  return `${d.toLocaleDateString([], { month: 'short', day: 'numeric' })} ${d.toLocaleTimeString([], { hour12: false })}`;
}

function build() {
  const panel = $('tab-audit');
  if (!panel || panel.dataset.built) return;
  panel.dataset.built = '1';
  const since = el('select', { id: 'audit-since' }, ...SINCE.map(([v, t]) => el('option', { value: v, text: t })));
  since.value = '86400000';
  panel.append(
    el(
      'form',
      { id: 'audit-form', class: 'toolbar' },
      el('label', {}, 'Machine ', el('select', { id: 'audit-machine' }, el('option', { value: '', text: 'all' }))),
      el('label', {}, 'Since ', since),
      el('label', {}, 'Entries ', el('input', { id: 'audit-limit', type: 'number', min: '1', max: String(MAX_ROWS), value: '200' })),
      el('button', { type: 'submit', text: 'Load' }),
      el('span', { id: 'audit-info', class: 'muted' }),
    ),
    el(
      'p',
      { class: 'hint', id: 'audit-legend' },
      'Each machine\u2019s agent publishes one entry per remote set or call it received, on its own subject. ',
      el('b', { text: 'Vouched for' }),
      ': the machine and the stored time by the NATS server; time, operation, target, argument size and digest, verdict and result by that machine\u2019s agent. ',
      el('span', { class: 'claimed', text: 'Claimed by requester' }),
      ': who asked and where the answer went; nobody vouches for them.',
    ),
    el(
      'div',
      { class: 'table-wrap' },
      el(
        'table',
        { id: 'audit-table' },
        el(
          'thead',
          {},
          el(
            'tr',
            {},
            ...['time', 'host', 'requester (claimed)', 'op', 'destination', 'path', 'member', 'args', 'policy', 'result', 'stored'].map((h) =>
              el('th', { text: h }),
            ),
          ),
        ),
        el('tbody', { id: 'audit-body' }),
      ),
    ),
  );
  $('audit-form').addEventListener('submit', (e) => {
    e.preventDefault();
    follow();
  });
}

function refreshMachines() {
  const sel = $('audit-machine');
  if (!sel) return;
  const cur = sel.value;
  const ms = [...ctx.machines.values()].sort((a, b) => a.hostname.localeCompare(b.hostname));
  sel.replaceChildren(el('option', { value: '', text: 'all' }), ...ms.map((m) => el('option', { value: m.nkey, text: m.hostname })));
  if ([...sel.options].some((o) => o.value === cur)) sel.value = cur;
}

function row(e) {
  const member = e.interface ? `${e.interface}.${e.member}` : e.member;
  const args = e.args_bytes == null ? '—' : `${e.args_bytes} B sha256:${String(e.args_sha256 || '').slice(0, 12)}`;
  const requester = el(
    'td',
    { class: 'audit-requester claimed', title: `claimed by the requester; reply subject (claimed): ${e.reply_to || '—'}` },
    el('span', { class: 'audit-requester-name', text: e.requester || '(none given)' }),
    el('span', { class: 'claim-note', text: ' claimed by requester' }),
  );
  return el(
    'tr',
    { dataset: { seq: String(e.seq), machine: e.machine, policy: e.policy, result: e.result, op: e.op } },
    el('td', { class: 'nowrap', title: 'the agent\u2019s clock', text: fmtTime(e.time_ms) }),
    el('td', { class: 'nowrap audit-host', title: `${e.machine} (agent says: ${e.hostname})`, text: e.host || e.hostname || e.machine }),
    requester,
    el('td', { class: 'audit-op', text: `${e.op}${e.broadcast ? ' (broadcast)' : ''}` }),
    el('td', { class: 'mono audit-dest', text: e.destination }),
    el('td', { class: 'mono audit-path', text: e.path }),
    el('td', { class: 'mono audit-member', text: member }),
    el('td', { class: 'mono audit-args', title: e.args_sha256 || '', text: args }),
    el('td', { class: `audit-policy policy-${e.policy}`, text: e.policy }),
    el('td', { class: `audit-result ${e.result === 'ok' ? 'ok' : 'failed'}`, text: e.result }),
    el('td', { class: 'nowrap muted', title: 'stored by the NATS server', text: fmtTime(e.stored_ms) }),
  );
}

function render() {
  const body = $('audit-body');
  if (!body) return;
  // Newest first.
  body.replaceChildren(...audit.rows.slice().reverse().map(row));
  const h = audit.history;
  let text;
  if (!h) text = 'loading…';
  else if (!h.available) text = `${h.error || 'no audit stream'}; new entries appear as they arrive`;
  else {
    text = `${audit.rows.length} entries from ${h.stream}, following`;
    if (h.older) text += `; ${h.older} older not shown`;
    if (h.truncated) text += '; only the stream\u2019s most recent entries were read';
    if (h.dropped) text += `; ${h.dropped} refused (not from the machine they name)`;
  }
  $('audit-info').textContent = text;
}

function onAudit(msg) {
  if (msg.type === 'error') {
    $('audit-info').textContent = `error: ${msg.error?.message}`;
    return;
  }
  if (msg.type === 'snapshot') {
    audit.history = msg.schema?.history || null;
    audit.rows = Array.isArray(msg.data) ? msg.data.slice(-MAX_ROWS) : [];
  } else if (msg.type === 'delta' && msg.data) {
    audit.rows.push(msg.data);
    if (audit.rows.length > MAX_ROWS) audit.rows.splice(0, audit.rows.length - MAX_ROWS);
  }
  render();
}

function follow() {
  build();
  refreshMachines();
  const p = { resource: 'audit', since_ms: Number($('audit-since').value) };
  const m = $('audit-machine').value;
  if (m) p.machine = m;
  const limit = Math.min(MAX_ROWS, Math.max(1, Number($('audit-limit').value) || 200));
  p.limit = limit;
  audit.params = p;
  audit.history = null;
  audit.rows = [];
  render();
  ctx.gw.unsubscribe(SUB);
  ctx.gw.subscribe(SUB, p, onAudit);
}

function init() {
  const tab = document.querySelector('#tabs .tab[data-tab="audit"]');
  if (!tab) return;
  tab.addEventListener('click', () => {
    build();
    refreshMachines();
    if (!ctx.gw.subs.has(SUB)) follow();
  });
}

init();
