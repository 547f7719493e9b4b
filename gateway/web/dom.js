// DOM helpers shared by the dashboard's modules. Everything agents send is data: it goes into
// the page with textContent / attributes only, never parsed as HTML.

export const $ = (id) => document.getElementById(id);

/** Builds an element; strings become text nodes, never markup. */
export function el(tag, props = {}, ...children) {
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

export function relTime(ms) {
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

export function showValue(v) {
  if (v && typeof v === 'object' && 't' in v && 'v' in v) v = v.v;
  if (typeof v === 'string') return v;
  return JSON.stringify(v);
}

export function truncate(s, n) {
  return s.length > n ? `${s.slice(0, n)}…` : s;
}


/** `{active: 3, failed: 1}` -> `active 3, failed 1`. */
export function counts(obj) {
  return Object.entries(obj || {})
    .map(([k, n]) => `${k} ${n}`)
    .join(', ');
}

/** A `key=value` label filter, or null. */
export function parseLabel(text) {
  const t = (text || '').trim();
  const i = t.indexOf('=');
  return i > 0 ? [t.slice(0, i), t.slice(i + 1)] : null;
}

/** A glob for the gateway's `unit` fields: text without `*` or `?` matches as a substring. */
export function unitGlob(text) {
  const t = (text || '').trim();
  if (!t) return null;
  return /[*?]/.test(t) ? t : `*${t}*`;
}

/**
 * A pager over a list: `slice(list)` gives the current page, `controls()` the buttons and the
 * "1–100 of 1000" text. Only a page is ever in the DOM, so 200,000 rows stay responsive.
 */
export class Pager {
  constructor(size, onChange, name) {
    this.size = size;
    this.offset = 0;
    this.total = 0;
    this.onChange = onChange;
    this.name = name;
  }

  slice(list) {
    this.total = list.length;
    if (this.offset >= this.total) this.offset = Math.max(0, Math.floor((this.total - 1) / this.size) * this.size);
    return list.slice(this.offset, this.offset + this.size);
  }

  move(by) {
    const next = this.offset + by * this.size;
    if (next < 0 || next >= this.total) return;
    this.offset = next;
    this.onChange();
  }

  controls() {
    const shown = Math.min(this.size, Math.max(0, this.total - this.offset));
    return el(
      'span',
      { class: 'pager', dataset: { pager: this.name } },
      el('button', { type: 'button', class: 'small', dataset: { page: 'prev' }, disabled: this.offset === 0, onclick: () => this.move(-1), text: 'Previous' }),
      el('button', { type: 'button', class: 'small', dataset: { page: 'next' }, disabled: this.offset + this.size >= this.total, onclick: () => this.move(1), text: 'Next' }),
      el('span', { class: 'muted', text: ` ${this.total ? this.offset + 1 : 0}–${this.offset + shown} of ${this.total}` }),
    );
  }
}
