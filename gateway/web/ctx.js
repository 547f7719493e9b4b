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

/** Machines sorted by hostname, then nkey. */
export function sortedMachines(list = ctx.machines.values()) {
  return [...list].sort((a, b) => a.hostname.localeCompare(b.hostname) || a.nkey.localeCompare(b.nkey));
}

/** The panel shown now ('fleet', 'units', 'machines', 'signals', 'objects'). */
export function currentTab() {
  return document.querySelector('#tabs .tab.active')?.dataset.tab;
}
