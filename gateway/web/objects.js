// Objects view: the D-Bus object browser (resource `object`) with property editing (request
// `set`, then `get` to read the value back).

import { $, el, relTime, showValue, truncate } from './dom.js';
import { ctx, sortedMachines } from './ctx.js';

let objKey = null;
let objState = null;

function onObject(msg) {
  if (msg.type === 'error') {
    $('obj-status').textContent = `error: ${msg.error?.message}`;
    return;
  }
  if (msg.type === 'snapshot') {
    if (msg.error) {
      objState = null;
      $('obj-status').textContent = `cannot open: ${msg.error.code}: ${msg.error.message}`;
      $('obj-view').replaceChildren();
      $('obj-children').replaceChildren();
      return;
    }
    objState = { schema: msg.schema, props: msg.data || {} };
    $('obj-status').textContent = `${objKey.dest} ${objKey.path} on ${ctx.machines.get(objKey.machine)?.hostname || objKey.machine}${msg.resync ? ' (resynced)' : ''}`;
  } else if (msg.type === 'delta' && objState) {
    const d = msg.data;
    objState.props[d.interface] = { ...(objState.props[d.interface] || {}), ...d.changed };
  }
  renderObject();
}

function openObject(path) {
  if (path) $('obj-path').value = path;
  const machine = $('obj-machine').value;
  if (!machine) {
    $('obj-status').textContent = 'no machine';
    return;
  }
  objKey = { machine, dest: $('obj-dest').value.trim(), path: $('obj-path').value.trim() };
  const iface = $('obj-interface').value.trim();
  const p = { resource: 'object', ...objKey };
  if (iface) p.interface = iface;
  objState = null;
  $('obj-status').textContent = 'loading…';
  ctx.gw.unsubscribe('obj');
  ctx.gw.subscribe('obj', p, onObject);
}

function editProperty(td, iface, prop) {
  if (td.querySelector('input')) return;
  const current = showValue(objState.props[iface]?.[prop.name]);
  const input = el('input', { class: 'edit', value: current, 'aria-label': `new value of ${prop.name}` });
  const status = el('span', { class: 'muted' });
  td.replaceChildren(input, status);
  input.focus();
  input.select();
  input.addEventListener('keydown', (e) => {
    if (e.key === 'Escape') renderObject();
    if (e.key !== 'Enter') return;
    let value;
    try {
      value = JSON.parse(input.value);
    } catch (err) {
      value = input.value;
    }
    status.textContent = ' sending…';
    ctx.gw.request(
      { op: 'set', targets: [objKey.machine], dest: objKey.dest, path: objKey.path, interface: iface, member: prop.name, value },
      (r) => {
        status.textContent = r.ok ? ' set' : ` ${r.error?.code}: ${r.error?.message}`;
        status.className = r.ok ? 'ok' : 'failed';
      },
      (d) => {
        if (d.error) {
          status.textContent = ` ${d.error.message}`;
          return;
        }
        if (!d.ok) return;
        // Not every property announces its changes: read the value back.
        const key = objKey;
        ctx.gw.request(
          { op: 'get', targets: [key.machine], dest: key.dest, path: key.path, interface: iface, member: prop.name },
          (r) => {
            if (r.ok && objState && objKey === key) {
              objState.props[iface] = { ...(objState.props[iface] || {}), [prop.name]: { t: r.signature, v: r.value } };
            }
          },
          () => renderObject(),
        );
      },
    );
  });
}

function renderObject() {
  const view = $('obj-view');
  const kids = $('obj-children');
  if (!objState) {
    view.replaceChildren();
    kids.replaceChildren();
    return;
  }
  const base = objKey.path === '/' ? '' : objKey.path;
  kids.replaceChildren(
    ...(objState.schema.children || []).map((c) =>
      el('button', { type: 'button', class: 'small child', text: `${c}/`, onclick: () => openObject(`${base}/${c}`) }),
    ),
  );
  const parts = [];
  for (const iface of objState.schema.interfaces || []) {
    const section = el('details', { class: 'iface', open: !iface.name.startsWith('org.freedesktop.DBus.') }, el('summary', { text: iface.name }));
    if (iface.properties.length) {
      const tbody = el('tbody');
      for (const p of iface.properties) {
        const writable = p.access === 'write' || p.access === 'readwrite';
        const value = objState.props[iface.name]?.[p.name];
        let text = value === undefined ? '' : truncate(showValue(value), 500);
        let title = writable ? 'double-click to edit' : 'read-only';
        // systemd's *Timestamp properties are microseconds since the epoch.
        const ms = Number(text) / 1000;
        if (p.type === 't' && p.name.endsWith('Timestamp') && /^[1-9][0-9]{6,}$/.test(text) && ms < 8.64e15) {
          title = `${text} µs`;
          text = `${new Date(ms).toISOString()} (${relTime(ms)})`;
        }
        const td = el('td', {
          class: `value mono${writable ? ' writable' : ''}`,
          dataset: { property: p.name },
          title,
          text,
        });
        if (writable) td.addEventListener('dblclick', () => editProperty(td, iface.name, p));
        tbody.append(el('tr', {}, el('td', { text: p.name }), el('td', { class: 'mono', text: p.type }), el('td', { text: p.access }), td));
      }
      section.append(
        el('table', { class: 'props' }, el('thead', {}, el('tr', {}, el('th', { text: 'property' }), el('th', { text: 'type' }), el('th', { text: 'access' }), el('th', { text: 'value' }))), tbody),
      );
    }
    if (iface.methods.length) {
      section.append(
        el('div', { class: 'muted', text: 'methods' }),
        el('ul', { class: 'mono' }, ...iface.methods.map((m) => el('li', { text: `${m.name}(${m.in.map((a) => `${a.type}${a.name ? ` ${a.name}` : ''}`).join(', ')}) → ${m.out.map((a) => a.type).join('') || '()'}` }))),
      );
    }
    if (iface.signals.length) {
      section.append(
        el('div', { class: 'muted', text: 'signals' }),
        el('ul', { class: 'mono' }, ...iface.signals.map((s) => el('li', { text: `${s.name}(${s.args.map((a) => a.type).join(', ')})` }))),
      );
    }
    parts.push(section);
  }
  view.replaceChildren(...parts);
}

function listNames() {
  const machine = $('obj-machine').value;
  if (!machine) return;
  const dl = $('obj-names');
  ctx.gw.request(
    { op: 'list-names', targets: [machine] },
    (r) => {
      if (!r.ok) {
        $('obj-status').textContent = `list-names: ${r.error?.message}`;
        return;
      }
      let names = [];
      const v = r.value;
      if (Array.isArray(v)) names = v.map((x) => (typeof x === 'string' ? x : x.name)).filter(Boolean);
      else if (v && typeof v === 'object') names = Object.keys(v);
      names = names.filter((n) => !n.startsWith(':')).sort();
      dl.replaceChildren(...names.map((n) => el('option', { value: n })));
      $('obj-status').textContent = `${names.length} well-known names`;
    },
    () => {},
  );
}

let selectKey = '';
/** The machine list; rebuilt only when machines or their states change. */
export function refreshMachineSelect() {
  const ms = sortedMachines();
  const key = ms.map((m) => `${m.nkey}:${m.state}`).join(',');
  if (key === selectKey) return;
  selectKey = key;
  const sel = $('obj-machine');
  const cur = sel.value;
  sel.replaceChildren(...ms.map((m) => el('option', { value: m.nkey, text: `${m.hostname} (${m.state})` })));
  if ([...sel.options].some((o) => o.value === cur)) sel.value = cur;
}

/** Opens the browser on one machine's systemd manager (from the Machine view). */
export function openObjects(nkey) {
  refreshMachineSelect();
  $('obj-machine').value = nkey;
  ctx.selectTab('objects');
  $('obj-dest').value = 'org.freedesktop.systemd1';
  $('obj-interface').value = '';
  openObject('/org/freedesktop/systemd1');
}

export function initObjects() {
  ctx.openObjects = openObjects;
  $('object-form').addEventListener('submit', (e) => {
    e.preventDefault();
    openObject();
  });
  $('obj-list-names').addEventListener('click', listNames);
  $('obj-up').addEventListener('click', () => {
    const p = $('obj-path').value.trim();
    const up = p.lastIndexOf('/') > 0 ? p.slice(0, p.lastIndexOf('/')) : '/';
    openObject(up);
  });
}
