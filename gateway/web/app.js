// cbus dashboard: a client of the gateway's WebSocket API (docs/protocol.md, "WebSocket API").
// Plain ES module, no build step, no third-party code. Everything agents send is data: it is
// put in the page with textContent / attributes only, never parsed as HTML.

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = 'cbus-gateway-token';
const MAX_SIGNALS = 500;
const MAX_UNIT_ROWS = 600;
const MAX_RESULTS = 20;

/** Builds an element; strings become text nodes, never markup. */
function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = String(v);
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(typeof c === 'string' ? document.createTextNode(c) : c);
  }
  return e;
}

function relTime(ms) {
  if (!ms) return '';
  let s = Math.round((Date.now() - ms) / 1000);
  const future = s < 0;
  s = Math.abs(s);
  let t;
  if (s < 60) t = `${s}s`;
  else if (s < 3600) t = `${Math.floor(s / 60)}m ${s % 60}s`;
  else if (s < 86400) t = `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  else t = `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  return future ? `in ${t}` : `${t} ago`;
}

function showValue(v) {
  if (v && typeof v === 'object' && 't' in v && 'v' in v) v = v.v;
  if (typeof v === 'string') return v;
  return JSON.stringify(v);
}

function truncate(s, n) {
  return s.length > n ? `${s.slice(0, n)}…` : s;
}

// ---------------------------------------------------------------------------------------------
// Connection: auth as first message, resubscribe after reconnect, backoff, heartbeat watchdog.

class Gateway {
  constructor(onStatus) {
    this.onStatus = onStatus;
    this.ws = null;
    this.ready = false;
    this.subs = new Map(); // id -> {params, handler}
    this.requests = new Map(); // id -> {onResult, onDone}
    this.backoff = 500;
    this.timer = null;
    this.nextId = 1;
    this.lastHeard = 0;
    this.heartbeatMs = 15000;
    this.stopped = true;
    setInterval(() => this.watchdog(), 1000);
  }

  start(token) {
    this.token = token;
    this.stopped = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(1000, 'logout');
    this.ws = null;
    this.ready = false;
  }

  connect() {
    clearTimeout(this.timer);
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    this.onStatus('connecting', 'connecting…');
    let ws;
    try {
      ws = new WebSocket(`${scheme}://${location.host}/ws`);
    } catch (e) {
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    ws.onopen = () => ws.send(JSON.stringify({ type: 'auth', token: this.token }));
    ws.onmessage = (ev) => {
      this.lastHeard = Date.now();
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch (e) {
        return;
      }
      this.dispatch(msg);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.ready = false;
      this.failRequests('connection lost');
      if (ev.code === 4401) {
        this.stopped = true;
        this.onStatus('unauthorized', ev.reason || 'invalid token');
        return;
      }
      if (!this.stopped) this.scheduleReconnect(ev.code === 1002 ? ev.reason : '');
    };
  }

  scheduleReconnect(why = '') {
    const delay = Math.round(this.backoff * (0.8 + Math.random() * 0.4));
    this.backoff = Math.min(this.backoff * 2, 30000);
    const until = Date.now() + delay;
    const tick = () => {
      const left = Math.max(0, Math.ceil((until - Date.now()) / 1000));
      this.onStatus('down', `disconnected${why ? ` (${why})` : ''}; reconnecting in ${left}s`);
    };
    tick();
    const iv = setInterval(tick, 1000);
    this.timer = setTimeout(() => {
      clearInterval(iv);
      this.connect();
    }, delay);
  }

  watchdog() {
    if (this.ready && Date.now() - this.lastHeard > 3 * this.heartbeatMs && this.ws) {
      // The server heartbeats; silence means a dead connection the browser has not noticed.
      this.ws.close(4000, 'heartbeat timeout');
      this.ws = null;
      this.ready = false;
      this.scheduleReconnect('no heartbeat');
    }
  }

  send(obj) {
    if (this.ws && this.ready) {
      this.ws.send(JSON.stringify(obj));
      return true;
    }
    return false;
  }

  dispatch(msg) {
    switch (msg.type) {
      case 'hello':
        this.ready = true;
        this.backoff = 500;
        this.heartbeatMs = msg.heartbeat_ms || 15000;
        this.onStatus('up', `connected (protocol v${msg.v})`);
        for (const [id, s] of this.subs) this.send({ type: 'subscribe', id, ...s.params });
        break;
      case 'ping':
        this.send({ type: 'pong' });
        break;
      case 'snapshot':
      case 'delta': {
        const s = this.subs.get(msg.sub);
        if (s) s.handler(msg);
        break;
      }
      case 'result': {
        const r = this.requests.get(String(msg.id));
        if (r) r.onResult(msg);
        break;
      }
      case 'done': {
        const r = this.requests.get(String(msg.id));
        if (r) {
          this.requests.delete(String(msg.id));
          r.onDone(msg);
        }
        break;
      }
      case 'error': {
        if (msg.id !== undefined) {
          const r = this.requests.get(String(msg.id));
          if (r) {
            this.requests.delete(String(msg.id));
            r.onDone({ error: msg.error });
          }
        } else if (msg.sub !== undefined) {
          const s = this.subs.get(msg.sub);
          if (s) s.handler(msg);
        }
        break;
      }
      default:
        break;
    }
  }

  subscribe(id, params, handler) {
    this.subs.set(id, { params, handler });
    this.send({ type: 'subscribe', id, ...params });
  }

  unsubscribe(id) {
    if (this.subs.delete(id)) this.send({ type: 'unsubscribe', id });
  }

  request(params, onResult, onDone) {
    const id = `r${this.nextId++}`;
    this.requests.set(id, { onResult, onDone });
    if (!this.send({ type: 'request', id, ...params })) {
      this.requests.delete(id);
      onDone({ error: { code: 'disconnected', message: 'not connected to the gateway' } });
    }
    return id;
  }

  failRequests(message) {
    for (const [, r] of this.requests) r.onDone({ error: { code: 'disconnected', message } });
    this.requests.clear();
  }
}

// ---------------------------------------------------------------------------------------------
// State

const state = {
  machines: new Map(), // nkey -> row
  units: new Map(), // machine \0 name -> row (array)
  cols: {}, // column name -> index
  selected: new Set(), // nkeys selected for bulk actions
  connected: false,
};

let renderQueued = false;
function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    renderAll();
  });
}

const gw = new Gateway((kind, text) => {
  const c = $('conn');
  c.textContent = text;
  c.className = `conn conn-${kind}`;
  state.connected = kind === 'up';
  document.body.classList.toggle('stale', kind !== 'up');
  scheduleRender(); // action buttons follow the connection state
  if (kind === 'unauthorized') {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(`The gateway refused the token: ${text}`);
  }
});

function onMachines(msg) {
  if (msg.type === 'snapshot') {
    state.machines.clear();
    for (const m of msg.data || []) state.machines.set(m.nkey, m);
  } else if (msg.type === 'delta') {
    for (const m of msg.data.upsert || []) state.machines.set(m.nkey, m);
  }
  refreshMachineSelects();
  scheduleRender();
}

function unitKey(machine, name) {
  return `${machine}\u0000${name}`;
}

function onUnits(msg) {
  if (msg.type === 'snapshot') {
    state.cols = {};
    (msg.schema.columns || []).forEach((c, i) => {
      state.cols[c.name] = i;
    });
    state.units.clear();
    for (const r of msg.data || []) state.units.set(unitKey(r[state.cols.machine], r[state.cols.name]), r);
  } else if (msg.type === 'delta') {
    const d = msg.data;
    if (d.replace) {
      for (const k of [...state.units.keys()]) if (k.startsWith(`${d.replace}\u0000`)) state.units.delete(k);
    }
    for (const r of d.upsert || []) state.units.set(unitKey(r[state.cols.machine], r[state.cols.name]), r);
    for (const [m, n] of d.remove || []) state.units.delete(unitKey(m, n));
  }
  scheduleRender();
}

// ---------------------------------------------------------------------------------------------
// Units table: machines x units

function visibleMachines() {
  const f = $('machine-filter').value.trim().toLowerCase();
  return [...state.machines.values()]
    .filter((m) => !f || m.hostname.toLowerCase().includes(f) || m.nkey.toLowerCase().includes(f))
    .sort((a, b) => a.hostname.localeCompare(b.hostname) || a.nkey.localeCompare(b.nkey));
}

function col(row, name) {
  return row[state.cols[name]];
}

function unitAction(op, unit, machines) {
  const hosts = machines.map((n) => state.machines.get(n)?.hostname || n);
  const block = el('div', { class: 'result-block' });
  const title = el('div', { class: 'result-title', text: `${op} ${unit} on ${hosts.join(', ')}` });
  const list = el('ul');
  const summary = el('div', { class: 'muted', text: 'waiting for machines…' });
  block.append(title, list, summary);
  const results = $('tab-fleet').hidden ? $('results') : $('fleet-results');
  results.prepend(block);
  while (results.children.length > MAX_RESULTS) results.lastChild.remove();
  gw.request(
    { op, targets: machines, unit },
    (r) => {
      const host = r.host || r.machine;
      const text = r.ok ? 'ok' : `${r.timed_out ? 'timed out' : r.error?.code || 'failed'}: ${r.error?.message || ''}`;
      list.append(el('li', { class: r.ok ? 'ok' : 'failed', dataset: { machine: r.machine } }, el('b', { text: host }), ` ${text}`));
    },
    (d) => {
      if (d.error) {
        summary.textContent = `request failed: ${d.error.message}`;
        summary.className = 'failed';
      } else {
        summary.textContent = `done: ${d.ok} ok, ${d.failed} failed, ${d.timed_out} timed out`;
        summary.className = d.failed || d.timed_out ? 'failed' : 'ok';
      }
    },
  );
}

function actionButtons(unit, machines, bulk) {
  const wrap = el('span', { class: 'actions' });
  for (const op of ['start', 'stop', 'restart']) {
    wrap.append(
      el('button', {
        type: 'button',
        class: `small act act-${op}`,
        dataset: { action: op },
        title: bulk ? `${op} ${unit} on the selected machines` : `${op} ${unit}`,
        disabled: machines().length === 0 || !state.connected,
        onclick: () => {
          const ms = machines();
          if (bulk && ms.length > 1 && !window.confirm(`${op} ${unit} on ${ms.length} machines?`)) return;
          unitAction(op, unit, ms);
        },
        text: bulk ? `${op} sel.` : op,
      }),
    );
  }
  return wrap;
}

function renderUnits() {
  const machines = visibleMachines();
  const unitF = $('unit-filter').value.trim().toLowerCase();
  const hideInactive = $('hide-inactive').checked;
  const byUnit = new Map();
  for (const row of state.units.values()) {
    const name = col(row, 'name');
    if (unitF && !name.toLowerCase().includes(unitF) && !String(col(row, 'description')).toLowerCase().includes(unitF)) continue;
    if (!byUnit.has(name)) byUnit.set(name, new Map());
    byUnit.get(name).set(col(row, 'machine'), row);
  }
  let names = [...byUnit.keys()].sort();
  const visible = new Set(machines.map((m) => m.nkey));
  names = names.filter((n) => {
    const rows = [...byUnit.get(n).entries()].filter(([m]) => visible.has(m));
    if (rows.length === 0) return false;
    return !hideInactive || rows.some(([, r]) => col(r, 'active') !== 'inactive');
  });

  const head = $('units-head');
  head.replaceChildren(el('th', { class: 'unit-col', text: `unit (${names.length})` }));
  for (const m of machines) {
    const cb = el('input', {
      type: 'checkbox',
      title: 'select for bulk actions',
      dataset: { select: m.nkey },
      onchange: (e) => {
        if (e.target.checked) state.selected.add(m.nkey);
        else state.selected.delete(m.nkey);
        scheduleRender();
      },
    });
    cb.checked = state.selected.has(m.nkey);
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

  const body = $('units-body');
  const rows = [];
  for (const name of names.slice(0, MAX_UNIT_ROWS)) {
    const per = byUnit.get(name);
    const anyRow = per.values().next().value;
    const th = el(
      'th',
      { class: 'unit-col', scope: 'row', title: String(col(anyRow, 'description') || '') },
      el('div', { class: 'unit-name', text: name }),
      el('div', { class: 'muted desc', text: String(col(anyRow, 'description') || '') }),
    );
    if (machines.length > 1) {
      th.append(actionButtons(name, () => [...state.selected].filter((n) => visible.has(n)), true));
    }
    const tr = el('tr', { dataset: { unit: name } }, th);
    for (const m of machines) {
      const r = per.get(m.nkey);
      if (!r) {
        tr.append(el('td', { class: `cell missing m-${m.state}`, dataset: { machine: m.nkey, host: m.hostname, unit: name }, text: '—' }));
        continue;
      }
      const active = String(col(r, 'active') || '');
      const sinceUs = col(r, 'since_us');
      const sinceMs = typeof sinceUs === 'number' ? sinceUs / 1000 : 0;
      const restarts = col(r, 'restarts');
      const td = el(
        'td',
        { class: `cell m-${m.state}`, dataset: { machine: m.nkey, host: m.hostname, unit: name, active } },
        el('span', { class: `state st-${active}`, text: active || '?' }),
        el('span', { class: 'sub', text: String(col(r, 'sub') || '') }),
        sinceMs ? el('div', { class: 'since muted', title: new Date(sinceMs).toISOString(), text: `since ${relTime(sinceMs)}` }) : null,
        typeof restarts === 'number' && restarts > 0 ? el('div', { class: 'muted', text: `${restarts} restarts` }) : null,
        actionButtons(name, () => [m.nkey], false),
      );
      tr.append(td);
    }
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  $('units-empty').hidden = names.length > 0;
  const sel = [...state.selected].filter((n) => state.machines.has(n));
  $('selection-info').textContent = sel.length ? `${sel.length} machine(s) selected` : '';
}

function renderBanner() {
  // Machines under maintenance are expected away: not a reason for attention.
  const bad = [...state.machines.values()].filter((m) => !m.maintenance && (m.state !== 'running' || !m.bus_connected));
  const b = $('banner');
  b.hidden = bad.length === 0;
  b.textContent = bad.length
    ? `Attention: ${bad.map((m) => `${m.hostname} is ${m.state === 'running' ? 'running without its bus' : m.state}`).join('; ')}`
    : '';
  const counts = {};
  for (const m of state.machines.values()) counts[m.maintenance ? 'maintenance' : m.state] = (counts[m.maintenance ? 'maintenance' : m.state] || 0) + 1;
  $('fleet-summary').textContent = `${state.machines.size} machines${Object.entries(counts)
    .map(([k, v]) => `, ${v} ${k}`)
    .join('')}`;
}

function renderAll() {
  renderBanner();
  renderUnits();
  if (!$('tab-fleet').hidden) renderFleet();
}

// ---------------------------------------------------------------------------------------------
// Signals

let sigPaused = false;
let sigParams = null;
function onSignals(msg) {
  if (msg.type === 'error') {
    $('sig-info').textContent = `error: ${msg.error?.message}`;
    return;
  }
  if (msg.type === 'snapshot') {
    const h = msg.schema?.history; // the recent past, from the signal stream (audit.js has the Audit view)
    if (h && !msg.resync) $('signals-body').replaceChildren();
    $('sig-info').textContent = msg.resync ? 'some signals were dropped (client too slow)' : !h ? 'following' : h.available ? `up to ${h.replayed} signal(s) of the last ${Math.round(h.since_ms / 60000)} min from ${h.stream}, then following` : `no signal history (${h.error}); following`;
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

function followSignals() {
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
  gw.unsubscribe('sig');
  gw.subscribe('sig', p, onSignals);
  sigPaused = false;
  $('sig-pause').textContent = 'Pause';
}

// ---------------------------------------------------------------------------------------------
// Object browser

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
    $('obj-status').textContent = `${objKey.dest} ${objKey.path} on ${state.machines.get(objKey.machine)?.hostname || objKey.machine}${msg.resync ? ' (resynced)' : ''}`;
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
  gw.unsubscribe('obj');
  gw.subscribe('obj', p, onObject);
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
    gw.request(
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
        gw.request(
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
  gw.request(
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

function refreshMachineSelects() {
  const ms = [...state.machines.values()].sort((a, b) => a.hostname.localeCompare(b.hostname));
  for (const [id, withAll] of [
    ['sig-machine', true],
    ['obj-machine', false],
  ]) {
    const sel = $(id);
    const cur = sel.value;
    const opts = withAll ? [el('option', { value: '', text: 'all' })] : [];
    for (const m of ms) opts.push(el('option', { value: m.nkey, text: `${m.hostname} (${m.state})` }));
    sel.replaceChildren(...opts);
    if ([...sel.options].some((o) => o.value === cur)) sel.value = cur;
  }
}

// ---------------------------------------------------------------------------------------------
// Login, tabs, wiring

function showLogin(error = '') {
  gw.stop();
  $('login').hidden = false;
  $('app').hidden = true;
  $('logout').hidden = true;
  $('login-error').textContent = error;
  $('token').focus();
}


// ---------------------------------------------------------------------------------------------
// Fleet view: gateway-side aggregates (resource "fleet"), a page of unit names at a time, so a
// fleet of 1,000 machines x 200 units is a few kilobytes per update, not 200,000 rows.

const FLEET_PAGE = 100;
const fleet = { summary: null, offset: 0, detail: null, detailRows: new Map() };

function fleetParams() {
  const p = { resource: 'fleet', offset: fleet.offset, limit: FLEET_PAGE };
  const unit = $('fleet-unit').value.trim();
  const label = $('fleet-label').value.trim();
  if (unit) p.unit = unit;
  if (label.includes('=')) p.label = label;
  return p;
}

function followFleet() {
  gw.unsubscribe('fleet');
  gw.subscribe('fleet', fleetParams(), (msg) => {
    if (msg.type === 'snapshot') {
      fleet.summary = msg.data;
      scheduleRender();
    }
  });
}

function counts(obj) {
  return Object.entries(obj || {})
    .map(([k, n]) => `${k} ${n}`)
    .join(', ');
}

function renderFleet() {
  const s = fleet.summary;
  if (!s) return;
  $('fleet-counts').replaceChildren(
    el('span', { id: 'fleet-machines', text: `machines ${s.machines_total}: ${counts(s.machines)}` }),
    el('span', { id: 'fleet-system', text: `system: ${counts(s.system)}` }),
    el('span', { id: 'fleet-units', text: `units: ${counts(s.units)}` }),
  );
  const failed = $('fleet-failed');
  failed.replaceChildren(
    ...s.failed.map((f) => {
      const hosts = f.machines.map((m) => m.host).join(', ');
      const more = f.count > f.machines.length ? ` and ${f.count - f.machines.length} more` : '';
      const since = f.since_us ? ` since ${relTime(f.since_us / 1000)}` : '';
      const li = el('li', { class: 'failed', dataset: { unit: f.unit } }, el('b', { text: f.unit }), ` failed on ${f.count}: ${hosts}${more}${since} `);
      li.append(actionButtons(f.unit, () => f.machines.map((m) => m.machine), true));
      return li;
    }),
  );
  if (!s.failed.length) failed.append(el('li', { class: 'ok', text: 'no failed units' }));
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
  renderUnitDetail();
}

// One unit on every machine: the units resource filtered to that exact name.
function openUnit(name) {
  fleet.detail = name;
  fleet.detailRows.clear();
  $('fleet-unit-detail').hidden = false;
  gw.unsubscribe('fleet-unit');
  const glob = name.replace(/[*?]/g, '?');
  gw.subscribe('fleet-unit', { resource: 'units', unit: glob }, (msg) => {
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
    scheduleRender();
  });
}

function renderUnitDetail() {
  const name = fleet.detail;
  if (!name) return;
  $('fleet-detail-title').textContent = name;
  const rows = [...fleet.detailRows.values()].sort((a, b) => a[1].localeCompare(b[1]));
  const label = $('fleet-label').value.trim();
  const [lk, lv] = label.includes('=') ? [label.slice(0, label.indexOf('=')), label.slice(label.indexOf('=') + 1)] : [null, null];
  const chosen = rows.filter((r) => !lk || state.machines.get(r[0])?.labels?.[lk] === lv).map((r) => r[0]);
  $('fleet-detail-actions').replaceChildren(el('span', { text: `${chosen.length} machine(s)${lk ? ` with ${label}` : ''}: ` }), actionButtons(name, () => chosen, true));
  $('fleet-detail-body').replaceChildren(
    ...rows.map((r) =>
      el('tr', { dataset: { machine: r[0] } }, el('td', { text: r[1] }), el('td', { class: `st-${r[6]}`, text: r[6] }), el('td', { text: r[7] }), el('td', { text: r[8] ? relTime(r[8] / 1000) : '' }), el('td', { text: r[9] == null ? '' : String(r[9]) })),
    ),
  );
}

function startApp(token) {
  $('login').hidden = true;
  $('app').hidden = false;
  $('logout').hidden = false;
  gw.subs.clear();
  gw.subscribe('machines', { resource: 'machines' }, onMachines);
  gw.subscribe('units', { resource: 'units' }, onUnits);
  gw.subscribe('fleet', fleetParams(), (msg) => {
    if (msg.type === 'snapshot') {
      fleet.summary = msg.data;
      scheduleRender();
    }
  });
  if (sigParams && !sigPaused) gw.subscribe('sig', sigParams, onSignals);
  gw.start(token);
}

function init() {
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
  for (const b of document.querySelectorAll('#tabs .tab')) {
    b.addEventListener('click', () => {
      for (const x of document.querySelectorAll('#tabs .tab')) x.classList.toggle('active', x === b);
      for (const p of document.querySelectorAll('.panel')) p.hidden = p.id !== `tab-${b.dataset.tab}`;
      scheduleRender();
    });
  }
  for (const id of ['fleet-unit', 'fleet-label']) {
    $(id).addEventListener('input', () => {
      fleet.offset = 0;
      followFleet();
    });
  }
  $('fleet-prev').addEventListener('click', () => {
    fleet.offset = Math.max(0, fleet.offset - FLEET_PAGE);
    followFleet();
  });
  $('fleet-next').addEventListener('click', () => {
    if (fleet.summary && fleet.offset + FLEET_PAGE < fleet.summary.rows_total) fleet.offset += FLEET_PAGE;
    followFleet();
  });
  for (const id of ['unit-filter', 'machine-filter', 'hide-inactive']) $(id).addEventListener('input', scheduleRender);
  $('select-all').addEventListener('click', () => {
    for (const m of visibleMachines()) state.selected.add(m.nkey);
    scheduleRender();
  });
  $('select-none').addEventListener('click', () => {
    state.selected.clear();
    scheduleRender();
  });
  $('signal-form').addEventListener('submit', (e) => {
    e.preventDefault();
    followSignals();
  });
  $('sig-pause').addEventListener('click', () => {
    if (!sigPaused) {
      gw.unsubscribe('sig');
      sigPaused = true;
      $('sig-pause').textContent = 'Resume';
      $('sig-info').textContent = 'paused';
    } else if (sigParams) {
      gw.subscribe('sig', sigParams, onSignals);
      sigPaused = false;
      $('sig-pause').textContent = 'Pause';
    }
  });
  $('sig-clear').addEventListener('click', () => $('signals-body').replaceChildren());
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
  // Relative times ("since 3m ago") move on without deltas.
  setInterval(() => {
    if (!$('app').hidden) scheduleRender();
  }, 5000);

  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) startApp(token);
  else showLogin();
}

init();

// For the views in their own modules (audit.js).
export { gw, el, state };
