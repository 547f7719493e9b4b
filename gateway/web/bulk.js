// Unit actions (start / stop / restart) on one machine or a selection, through the WebSocket
// request protocol: one result per machine as it arrives, then the summary. Rolling options
// (batch, max-fail, hold, order) are sent with the request and run by the gateway with the
// CLI's planner.

import { $, el } from './dom.js';
import { ctx, hostOf } from './ctx.js';

const MAX_RESULTS = 20; // result blocks kept per list
const MAX_LINES = 2000; // result lines per block (one per machine)

/** Sends `op` for `unit` to `machines`; results go to the list element `into`. */
export function unitAction(op, unit, machines, into, rolling = null) {
  const shown = machines.slice(0, 5).map(hostOf).join(', ');
  const more = machines.length > 5 ? ` and ${machines.length - 5} more` : '';
  const how = rolling
    ? ` (batch ${rolling.batch}, max-fail ${rolling.max_fail}${rolling.hold_ms !== undefined ? `, hold ${rolling.hold_ms / 1000}s` : ''}${rolling.order ? `, order ${rolling.order}` : ''})`
    : '';
  const block = el('div', { class: 'result-block', dataset: { op, unit } });
  const list = el('ul', { class: 'result-lines' });
  const summary = el('div', { class: 'muted summary-line', text: `waiting for ${machines.length} machine(s)…` });
  block.append(el('div', { class: 'result-title', text: `${op} ${unit} on ${shown}${more}${how}` }), summary, list);
  into.prepend(block);
  while (into.children.length > MAX_RESULTS) into.lastChild.remove();
  let seen = 0;
  const req = { op, targets: machines, unit };
  if (rolling) Object.assign(req, rolling);
  ctx.gw.request(
    req,
    (r) => {
      seen += 1;
      summary.textContent = `${seen} of ${machines.length} answered…`;
      if (list.children.length >= MAX_LINES) return;
      const host = r.host || r.machine;
      const held = r.value?.held_ms;
      const ok = typeof held === 'number' ? `ok, held ${held / 1000}s` : 'ok';
      const text = r.ok ? ok : `${r.timed_out ? 'timed out' : r.error?.code || 'failed'}: ${r.error?.message || ''}`;
      list.append(el('li', { class: r.ok ? 'ok' : 'failed', dataset: { machine: r.machine } }, el('b', { text: host }), ` ${text}`));
    },
    (d) => {
      if (d.error) {
        summary.textContent = `request failed: ${d.error.message}`;
        summary.className = 'failed summary-line';
        return;
      }
      let text = `done: ${d.ok} ok, ${d.failed} failed, ${d.timed_out} timed out`;
      if (d.not_started !== undefined) text += `, ${d.not_started} not started${d.halted ? ' (halted: max-fail exceeded)' : ''}`;
      summary.textContent = text;
      summary.className = `${d.failed || d.timed_out || d.halted ? 'failed' : 'ok'} summary-line`;
    },
  );
}

/**
 * start / stop / restart buttons. `machines()` gives the targets when clicked; `opts.bulk`
 * asks for confirmation above one machine; `opts.into()` is where results go;
 * `opts.rolling()` the rolling options or null.
 */
export function actionButtons(unit, machines, opts = {}) {
  const wrap = el('span', { class: 'actions' });
  const n = machines().length;
  for (const op of ['start', 'stop', 'restart']) {
    wrap.append(
      el('button', {
        type: 'button',
        class: `small act act-${op}`,
        dataset: { action: op },
        title: opts.bulk ? `${op} ${unit} on the selected machines` : `${op} ${unit}`,
        disabled: n === 0 || !ctx.connected,
        onclick: () => {
          const ms = machines();
          if (opts.bulk && ms.length > 1 && !window.confirm(`${op} ${unit} on ${ms.length} machines?`)) return;
          const into = opts.into ? opts.into() : $('results');
          unitAction(op, unit, ms, into, opts.rolling ? opts.rolling() : null);
        },
        text: opts.bulk ? `${op} sel.` : op,
      }),
    );
  }
  return wrap;
}
