// State every view shares: the gateway connection, the machines (the `machines` resource:
// one small row per machine, no units), the connection state, and one render per frame.

export const ctx = {
  gw: null,
  machines: new Map(), // nkey -> machine row
  connected: false,
  renderers: [], // called once per animation frame when something changed
  epoch: 0, // moves when everything must be drawn again (connection state, relative times)
};

/** Everything is drawn again at the next frame. */
export function redrawAll() {
  ctx.epoch += 1;
  scheduleRender();
}

let queued = false;
export function scheduleRender() {
  if (queued) return;
  queued = true;
  requestAnimationFrame(() => {
    queued = false;
    for (const r of ctx.renderers) r();
  });
}

export function hostOf(nkey) {
  return ctx.machines.get(nkey)?.hostname || nkey;
}

// Sorting 1,000 machines on every frame showed as long tasks: the order (nkeys) is kept and
// sorted again only when a machine appears or its hostname changes.
let order = null;
const byName = (a, b) => (a.hostname < b.hostname ? -1 : a.hostname > b.hostname ? 1 : a.nkey < b.nkey ? -1 : a.nkey > b.nkey ? 1 : 0);

/** Stores machine rows (a snapshot when `all`); the order is redone only when needed. */
export function putMachines(rows, all) {
  if (all) {
    ctx.machines.clear();
    order = null;
  }
  for (const m of rows) {
    const before = ctx.machines.get(m.nkey);
    if (!before || before.hostname !== m.hostname) order = null;
    ctx.machines.set(m.nkey, m);
  }
}

/** The machines sorted by hostname, then nkey (the current rows). */
export function sortedMachines() {
  if (!order) order = [...ctx.machines.values()].sort(byName).map((m) => m.nkey);
  return order.map((k) => ctx.machines.get(k));
}

/** The panel shown now ('fleet', 'units', 'machines', 'signals', 'objects'). */
export function currentTab() {
  return document.querySelector('#tabs .tab.active')?.dataset.tab;
}
