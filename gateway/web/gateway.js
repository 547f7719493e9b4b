// The gateway connection: auth as first message, resubscribe after reconnect, backoff,
// heartbeat watchdog (docs/protocol.md, "WebSocket API").

export class Gateway {
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
