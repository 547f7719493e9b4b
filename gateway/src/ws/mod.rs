//! The WebSocket API at `/ws`: authentication, subscriptions with snapshots and deltas,
//! requests with one result per machine, heartbeats. docs/protocol.md ("WebSocket API")
//! describes the messages; [`frames`] parses them.
//!
//! Each connection has a reader task, a session task and a writer task joined by bounded queues.
//! The session turns cache changes (routed to it by machine, [`crate::changes`]), signals and
//! request results into frames. When the frame queue is full the session does not wait and does
//! not grow: it drops that subscription's queued deltas (the writer skips frames of an outdated
//! generation) and sends a fresh snapshot marked `"resync": true` once there is room. A session
//! whose change queue overflowed resyncs every subscription the same way. The frame queue is
//! bounded in bytes as well as in frames ([`Outbox`], `--ws-queue-bytes`): one units snapshot of
//! a big fleet is one frame of megabytes, and 256 of them queued for a client that does not read
//! were gigabytes. Memory per client is therefore bounded, whatever the client's speed.
//!
//! Before a client authenticates it costs a slot of `--max-unauthenticated` and has
//! `--auth-timeout` to do so: connections that never authenticate cannot pile up.
//!
//! The reader is a task of its own so that a session woken for a change does not poll its socket
//! too (with 1,000 clients, that polling was a tenth of the gateway's CPU).

pub mod frames;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query as UrlQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use cbus_client::fleet::{Fleet, Query};
use cbus_client::headers as nats_headers;
use cbus_protocol::presence::now_ms;
use cbus_protocol::subject::{RequestSubject, SignalFilter, Target};
use cbus_protocol::{names, ErrorBody, ErrorCode, Op, Request};
use futures::stream::{self, SelectAll, StreamExt};
use futures::SinkExt;
use regex::Regex;
use serde_json::{json, Value};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::auth::{bearer, OriginPolicy, Token};
use crate::cache::{Cache, Change, UNIT_COLUMNS};
use crate::changes::{ChangeReceiver, Interest, InterestHandle, Lagged};
use crate::objects::{ObjectChangeKind, ObjectKey, Objects};
use crate::requests::{self, MachineResult};
use crate::stats::{self, Dropped};
use frames::{
    close_reason, ClientMsg, RequestMsg, RequestOp, Resource, Targets, CLOSE_GOING_AWAY,
    CLOSE_PROTOCOL_ERROR, CLOSE_UNAUTHORIZED, VERSION,
};

/// Largest frame a client may send.
const MAX_FRAME: usize = 1 << 20;
/// Read buffer per connection. tungstenite's default (128 KiB) is zero-filled on every read
/// attempt, and a session polls its socket each time it wakes for a cache change: with 1,000
/// clients that memset took 37% of the CPU and 128 MiB of RSS (docs/benchmarks.md). Clients send
/// small frames; larger ones are still read, in several steps.
const READ_BUFFER: usize = 4096;
/// Subscriptions per client.
const MAX_SUBSCRIPTIONS: usize = 64;
/// Requests in flight per client.
const MAX_INFLIGHT: usize = 16;
/// Longest timeout a request may ask for.
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// A write that takes longer means the client is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Signals buffered between the NATS subscriptions and the session.
const SIGNAL_QUEUE: usize = 256;
/// Cache changes queued for a session before it must resync.
const CHANGE_QUEUE: usize = 4096;
/// Client frames read ahead of the session.
const INCOMING_QUEUE: usize = 8;
/// How long a signals subscription waits for NATS to confirm it before its snapshot goes out.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Changes handled in one wake before the session looks at its other inputs.
const CHANGE_BATCH: usize = 256;

/// Everything a session needs; shared by all sessions.
pub struct WsContext {
    pub cache: Cache,
    pub objects: Objects,
    pub fleet: Fleet,
    pub token: Token,
    pub origins: OriginPolicy,
    pub allow_token_in_url: bool,
    pub heartbeat: Duration,
    /// Frames queued per client.
    pub queue: usize,
    /// Bytes queued per client.
    pub queue_bytes: usize,
    pub request_timeout: Duration,
    /// Time a client has to authenticate.
    pub auth_timeout: Duration,
    /// Slots of clients that have not authenticated yet.
    pub unauthenticated: Arc<Semaphore>,
}

/// Authentication decided before the upgrade.
enum PreAuth {
    Valid,
    Invalid,
    Pending,
}

/// `GET /ws`.
pub async fn handler(
    State(ctx): State<Arc<WsContext>>,
    headers: HeaderMap,
    UrlQuery(query): UrlQuery<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if !ctx.origins.allows(origin, host) {
        tracing::warn!(?origin, ?host, "WebSocket from a foreign origin refused");
        return (
            StatusCode::FORBIDDEN,
            "origin not allowed (start the gateway with --allow-origin)\n",
        )
            .into_response();
    }
    let header_token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer);
    let url_token = ctx
        .allow_token_in_url
        .then(|| query.get("token").map(String::as_str))
        .flatten();
    let pre = match header_token.or(url_token) {
        Some(t) if ctx.token.matches(t) => PreAuth::Valid,
        Some(_) => PreAuth::Invalid,
        None => PreAuth::Pending,
    };
    // A slot while the client has yet to authenticate, refused before the upgrade when all
    // are taken: idle unauthenticated sockets must not crowd out operators.
    let slot = match pre {
        PreAuth::Pending => match ctx.unauthenticated.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                stats::dropped(Dropped::UnauthenticatedLimit);
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many WebSockets waiting to authenticate; try again\n",
                )
                    .into_response();
            }
        },
        _ => None,
    };
    ws.max_message_size(MAX_FRAME)
        .max_frame_size(MAX_FRAME)
        .read_buffer_size(READ_BUFFER)
        .on_upgrade(move |socket| session(ctx, socket, pre, slot))
}

/// What the writer sends.
enum Frame {
    /// A text message; tagged ones are skipped when their subscription's generation moved on.
    Text {
        text: String,
        tag: Option<(u64, u64)>,
    },
    Ping,
    Close(u16, String),
}

type Generations = Arc<Mutex<HashMap<u64, u64>>>;

/// A frame in the queue, holding its bytes of the client's budget until it is written.
struct Queued {
    frame: Frame,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// The session's end of the frame queue: bounded in frames by the channel and in bytes by a
/// semaphore with one permit per byte (`--ws-queue-bytes`). A frame larger than the whole
/// budget takes all of it, so it goes out alone.
#[derive(Clone)]
struct Outbox {
    tx: mpsc::Sender<Queued>,
    bytes: Arc<Semaphore>,
    budget: usize,
}

impl Outbox {
    fn new(frames: usize, budget: usize) -> (Outbox, mpsc::Receiver<Queued>) {
        let budget = budget.clamp(1, u32::MAX as usize);
        let (tx, rx) = mpsc::channel(frames.max(4));
        let bytes = Arc::new(Semaphore::new(budget));
        (Outbox { tx, bytes, budget }, rx)
    }

    fn cost(&self, frame: &Frame) -> u32 {
        let n = match frame {
            Frame::Text { text, .. } => text.len(),
            Frame::Close(_, reason) => reason.len(),
            Frame::Ping => 0,
        };
        n.min(self.budget) as u32
    }

    /// Queues without waiting; `Full` when either bound is reached.
    fn try_send(&self, frame: Frame) -> Result<(), mpsc::error::TrySendError<()>> {
        let cost = self.cost(&frame);
        let permit = if cost == 0 {
            None
        } else {
            match self.bytes.clone().try_acquire_many_owned(cost) {
                Ok(p) => Some(p),
                Err(_) => {
                    if self.tx.is_closed() {
                        return Err(mpsc::error::TrySendError::Closed(()));
                    }
                    return Err(mpsc::error::TrySendError::Full(()));
                }
            }
        };
        self.tx
            .try_send(Queued {
                frame,
                _bytes: permit,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => mpsc::error::TrySendError::Full(()),
                mpsc::error::TrySendError::Closed(_) => mpsc::error::TrySendError::Closed(()),
            })
    }

    /// Queues, waiting for room (control frames and request results: the client asked).
    async fn send(&self, frame: Frame) -> Result<(), ()> {
        let cost = self.cost(&frame);
        let permit = if cost == 0 {
            None
        } else {
            tokio::select! {
                p = self.bytes.clone().acquire_many_owned(cost) => Some(p.map_err(|_| ())?),
                _ = self.tx.closed() => return Err(()),
            }
        };
        self.tx
            .send(Queued {
                frame,
                _bytes: permit,
            })
            .await
            .map_err(|_| ())
    }

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

async fn writer(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Queued>,
    gens: Generations,
) {
    // Each frame's bytes are given back once it is written (the permit drops with `_queued`).
    while let Some(Queued {
        frame,
        _bytes: _queued,
    }) = rx.recv().await
    {
        let msg = match frame {
            Frame::Text { text, tag } => {
                if let Some((sub, gen)) = tag {
                    let current = gens
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&sub)
                        .copied();
                    if current != Some(gen) {
                        continue;
                    }
                }
                Message::Text(text.into())
            }
            Frame::Ping => Message::Ping(Bytes::new()),
            Frame::Close(code, reason) => {
                let _ = tokio::time::timeout(
                    WRITE_TIMEOUT,
                    sink.send(Message::Close(Some(CloseFrame {
                        code,
                        reason: close_reason(&reason).into(),
                    }))),
                )
                .await;
                break;
            }
        };
        // Frames already queued go out in one flush (one write for many small deltas).
        let flush = rx.is_empty();
        let sent = if flush {
            tokio::time::timeout(WRITE_TIMEOUT, sink.send(msg)).await
        } else {
            tokio::time::timeout(WRITE_TIMEOUT, sink.feed(msg)).await
        };
        if !matches!(sent, Ok(Ok(()))) {
            break;
        }
    }
    let _ = sink.close().await;
}

async fn close_now(
    sink: &mut futures::stream::SplitSink<WebSocket, Message>,
    code: u16,
    reason: &str,
) {
    let _ = tokio::time::timeout(
        WRITE_TIMEOUT,
        sink.send(Message::Close(Some(CloseFrame {
            code,
            reason: close_reason(reason).into(),
        }))),
    )
    .await;
}

async fn session(
    ctx: Arc<WsContext>,
    socket: WebSocket,
    pre: PreAuth,
    unauthenticated: Option<OwnedSemaphorePermit>,
) {
    let (mut sink, mut stream) = socket.split();
    match pre {
        PreAuth::Valid => {}
        PreAuth::Invalid => {
            close_now(&mut sink, CLOSE_UNAUTHORIZED, "invalid token").await;
            return;
        }
        PreAuth::Pending => {
            let first = tokio::time::timeout(ctx.auth_timeout, stream.next()).await;
            let (code, reason) = match first {
                Err(_) => (CLOSE_UNAUTHORIZED, "authentication timed out".to_owned()),
                Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return,
                Ok(Some(Ok(Message::Text(text)))) => match frames::parse(text.as_str()) {
                    Ok(ClientMsg::Auth { token }) if ctx.token.matches(&token) => {
                        (0, String::new())
                    }
                    Ok(ClientMsg::Auth { .. }) => (CLOSE_UNAUTHORIZED, "invalid token".to_owned()),
                    Ok(_) => (
                        CLOSE_UNAUTHORIZED,
                        "authenticate first: {\"type\":\"auth\",\"token\":...}".to_owned(),
                    ),
                    Err(e) => (CLOSE_PROTOCOL_ERROR, e.to_string()),
                },
                Ok(Some(Ok(_))) => (
                    CLOSE_PROTOCOL_ERROR,
                    "expected a text frame {\"type\":\"auth\",...}".to_owned(),
                ),
            };
            if code != 0 {
                tracing::info!(code, %reason, "WebSocket refused");
                close_now(&mut sink, code, &reason).await;
                return;
            }
        }
    }
    drop(unauthenticated);
    let (out, out_rx) = Outbox::new(ctx.queue, ctx.queue_bytes);
    let gens: Generations = Arc::default();
    let writer = tokio::spawn(writer(sink, out_rx, gens.clone()));
    let hello = json!({
        "type": "hello",
        "v": VERSION,
        "server": "cbus-gateway",
        "version": cbus_protocol::VERSION,
        "heartbeat_ms": ctx.heartbeat.as_millis() as u64,
        "resources": ["machines", "units", "object", "signals"],
        "ops": ["get", "set", "call", "start", "stop", "restart", "introspect", "list-names"],
    });
    if out
        .send(Frame::Text {
            text: hello.to_string(),
            tag: None,
        })
        .await
        .is_err()
    {
        return;
    }
    let (sig_tx, sig_rx) = mpsc::channel(SIGNAL_QUEUE);
    // Follows nothing until a subscription says what; a subscription's interest is set before
    // its snapshot is taken, so no change between the two is missed.
    let changes = ctx.cache.subscribe(Interest::default(), CHANGE_QUEUE);
    let (in_tx, incoming) = mpsc::channel(INCOMING_QUEUE);
    let reader = tokio::spawn(async move {
        while let Some(msg) = stream.next().await {
            let end = !matches!(
                msg,
                Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))
            );
            if in_tx.send(msg).await.is_err() || end {
                break;
            }
        }
    });
    let mut s = Session {
        interest: changes.interest_handle(),
        ctx: ctx.clone(),
        out,
        gens,
        subs: HashMap::new(),
        ids: HashMap::new(),
        next_internal: 1,
        pending: BTreeSet::new(),
        sig_tx,
        inflight: Arc::new(AtomicUsize::new(0)),
        closing: None,
    };
    s.run(incoming, changes, sig_rx).await;
    reader.abort();
    s.cleanup();
    if let Some((code, reason)) = s.closing.take() {
        let _ = s.out.send(Frame::Close(code, reason)).await;
    }
    drop(s);
    let _ = writer.await;
}

/// A subscription, compiled.
enum Kind {
    Machines,
    Units {
        machines: Option<HashSet<String>>,
        unit: Option<Regex>,
    },
    Object {
        key: ObjectKey,
        /// Whether a snapshot went out (deltas only make sense after one).
        loaded: bool,
    },
    Signals {
        task: tokio::task::AbortHandle,
    },
}

struct Sub {
    id: String,
    kind: Kind,
    seq: u64,
    gen: u64,
}

/// A signal for one subscription; `dropped` counts signals lost before it.
struct SignalEvent {
    sub: u64,
    data: Value,
    dropped: u64,
    /// Its bytes of the client's budget while it waits for the session.
    _bytes: Option<OwnedSemaphorePermit>,
}

struct Session {
    ctx: Arc<WsContext>,
    interest: InterestHandle,
    out: Outbox,
    gens: Generations,
    /// internal id -> subscription
    subs: HashMap<u64, Sub>,
    /// client id -> internal id
    ids: HashMap<String, u64>,
    next_internal: u64,
    /// Subscriptions owed a snapshot.
    pending: BTreeSet<u64>,
    sig_tx: mpsc::Sender<SignalEvent>,
    inflight: Arc<AtomicUsize>,
    /// Set to close the connection with this code and reason.
    closing: Option<(u16, String)>,
}

impl Session {
    async fn run(
        &mut self,
        mut incoming: mpsc::Receiver<Result<Message, axum::Error>>,
        mut changes: ChangeReceiver,
        mut signals: mpsc::Receiver<SignalEvent>,
    ) {
        let mut heartbeat = tokio::time::interval(self.ctx.heartbeat);
        heartbeat.tick().await;
        let mut retry = tokio::time::interval(Duration::from_millis(50));
        let mut last_heard = Instant::now();
        while self.closing.is_none() {
            tokio::select! {
                msg = incoming.recv() => {
                    last_heard = Instant::now();
                    match msg {
                        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                        Some(Ok(Message::Text(text))) => match frames::parse(text.as_str()) {
                            Ok(m) => self.handle(m).await,
                            Err(e) => {
                                tracing::info!(error = %e, "malformed WebSocket frame");
                                self.closing = Some((CLOSE_PROTOCOL_ERROR, e.to_string()));
                            }
                        },
                        Some(Ok(Message::Binary(_))) => {
                            self.closing = Some((CLOSE_PROTOCOL_ERROR, "binary frames are not part of the protocol".into()));
                        }
                        Some(Ok(_)) => {} // ping/pong: only liveness
                    }
                }
                change = changes.recv() => {
                    let mut next = Some(change);
                    let mut handled = 0;
                    while let Some(change) = next.take() {
                        match change {
                            Ok(change) => self.dispatch(&change),
                            Err(Lagged) => self.lagged(),
                        }
                        handled += 1;
                        if handled < CHANGE_BATCH {
                            next = changes.try_recv();
                        }
                    }
                }
                Some(ev) = signals.recv() => self.signal(ev),
                _ = retry.tick(), if !self.pending.is_empty() => self.flush_pending(),
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > self.ctx.heartbeat * 3 {
                        self.closing = Some((CLOSE_GOING_AWAY, "no frames from the client for three heartbeats".into()));
                        break;
                    }
                    let ping = json!({"type": "ping", "t": now_ms()}).to_string();
                    let _ = self.out.try_send(Frame::Text { text: ping, tag: None });
                    let _ = self.out.try_send(Frame::Ping);
                }
            }
            if self.out.is_closed() {
                break;
            }
        }
    }

    /// Changes were dropped for this session: every cache-fed subscription gets a new snapshot.
    fn lagged(&mut self) {
        tracing::info!("client fell behind the change stream; resyncing");
        let ids: Vec<u64> = self
            .subs
            .iter()
            .filter(|(_, s)| !matches!(s.kind, Kind::Signals { .. }))
            .map(|(i, _)| *i)
            .collect();
        for i in ids {
            self.mark_pending(i);
        }
    }

    /// Tells the router which machines' changes the subscriptions need.
    fn update_interest(&self) {
        let mut interest = Interest::default();
        for sub in self.subs.values() {
            match &sub.kind {
                Kind::Machines => interest.machine_rows = true,
                Kind::Units { machines: None, .. } => interest.all_machines = true,
                Kind::Units {
                    machines: Some(set),
                    ..
                } => interest.machines.extend(set.iter().cloned()),
                Kind::Object { key, .. } => {
                    interest.machines.insert(key.machine.clone());
                }
                Kind::Signals { .. } => {}
            }
        }
        self.interest.set(interest);
    }

    /// Stops what the subscriptions hold.
    fn cleanup(&mut self) {
        for (_, sub) in self.subs.drain() {
            release(&self.ctx, sub);
        }
    }

    async fn send_control(&mut self, value: Value) {
        if self
            .out
            .send(Frame::Text {
                text: value.to_string(),
                tag: None,
            })
            .await
            .is_err()
        {
            self.closing = Some((CLOSE_GOING_AWAY, String::new()));
        }
    }

    async fn error(
        &mut self,
        id: Option<Value>,
        sub: Option<&str>,
        code: ErrorCode,
        message: String,
    ) {
        let mut v = json!({"type": "error", "error": ErrorBody::new(code, message)});
        if let Some(id) = id {
            v["id"] = id;
        }
        if let Some(sub) = sub {
            v["sub"] = sub.into();
        }
        self.send_control(v).await;
    }

    async fn handle(&mut self, msg: ClientMsg) {
        match msg {
            ClientMsg::Auth { token } => {
                if !self.ctx.token.matches(&token) {
                    self.closing = Some((CLOSE_UNAUTHORIZED, "invalid token".into()));
                }
            }
            ClientMsg::Ping => {
                self.send_control(json!({"type": "pong", "t": now_ms()}))
                    .await;
            }
            ClientMsg::Pong => {}
            ClientMsg::Subscribe { id, resource } => self.subscribe(id, resource).await,
            ClientMsg::Unsubscribe { id } => match self.ids.remove(&id) {
                Some(internal) => {
                    self.pending.remove(&internal);
                    self.gens
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&internal);
                    if let Some(sub) = self.subs.remove(&internal) {
                        release(&self.ctx, sub);
                    }
                    self.update_interest();
                    self.send_control(json!({"type": "unsubscribed", "sub": id}))
                        .await;
                }
                None => {
                    self.error(
                        None,
                        Some(&id),
                        ErrorCode::NotFound,
                        format!("no subscription {id:?}"),
                    )
                    .await;
                }
            },
            ClientMsg::Request(r) => self.request(r).await,
        }
    }

    async fn subscribe(&mut self, id: String, resource: Resource) {
        if self.ids.contains_key(&id) {
            return self
                .error(
                    None,
                    Some(&id),
                    ErrorCode::InvalidArgument,
                    format!("subscription {id:?} exists; unsubscribe first"),
                )
                .await;
        }
        if self.subs.len() >= MAX_SUBSCRIPTIONS {
            return self
                .error(
                    None,
                    Some(&id),
                    ErrorCode::InvalidArgument,
                    format!("at most {MAX_SUBSCRIPTIONS} subscriptions per connection"),
                )
                .await;
        }
        let internal = self.next_internal;
        let mut ready = None;
        let kind = match self.compile(internal, &resource, &mut ready) {
            Ok(k) => k,
            Err(message) => {
                return self
                    .error(None, Some(&id), ErrorCode::InvalidArgument, message)
                    .await;
            }
        };
        self.next_internal += 1;
        self.ids.insert(id.clone(), internal);
        self.gens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(internal, 0);
        self.subs.insert(
            internal,
            Sub {
                id,
                kind,
                seq: 0,
                gen: 0,
            },
        );
        self.update_interest();
        if let Some(ready) = ready {
            let _ = tokio::time::timeout(SUBSCRIBE_TIMEOUT, ready).await;
        }
        self.send_snapshot(internal, false);
    }

    /// `ready` is set for a signals subscription: it resolves once the NATS subscription is in
    /// place on the server, so no signal sent after the snapshot is missed.
    fn compile(
        &self,
        internal: u64,
        resource: &Resource,
        ready: &mut Option<tokio::sync::oneshot::Receiver<()>>,
    ) -> Result<Kind, String> {
        Ok(match resource {
            Resource::Machines {} => Kind::Machines,
            Resource::Units { machines, unit } => Kind::Units {
                machines: machines.as_ref().map(|m| m.iter().cloned().collect()),
                unit: match unit {
                    Some(g) => Some(
                        frames::glob_regex(g).map_err(|e| format!("invalid unit pattern: {e}"))?,
                    ),
                    None => None,
                },
            },
            Resource::Object {
                machine,
                dest,
                path,
                interface,
            } => {
                cbus_protocol::subject::validate_nkey(machine).map_err(|e| e.to_string())?;
                names::validate_bus_name(dest).map_err(|e| e.to_string())?;
                names::validate_object_path(path).map_err(|e| e.to_string())?;
                if let Some(i) = interface {
                    names::validate_interface(i).map_err(|e| e.to_string())?;
                }
                let key = ObjectKey {
                    machine: machine.clone(),
                    dest: dest.clone(),
                    path: path.clone(),
                    interface: interface.clone(),
                };
                self.ctx.objects.acquire(&key);
                Kind::Object { key, loaded: false }
            }
            Resource::Signals {
                machine,
                sender,
                interface,
                member,
                path_prefix,
            } => {
                if let Some(s) = sender {
                    names::validate_bus_name(s).map_err(|e| e.to_string())?;
                }
                if let Some(i) = interface {
                    names::validate_interface(i).map_err(|e| e.to_string())?;
                }
                if let Some(m) = member {
                    names::validate_member(m).map_err(|e| e.to_string())?;
                }
                let filter = SignalFilter {
                    nkey: machine.clone(),
                    sender: None,
                    path_prefix: path_prefix.clone(),
                };
                let subjects = filter.subjects().map_err(|e| e.to_string())?;
                let m = SignalMatch {
                    sender: sender.clone(),
                    interface: interface.clone(),
                    member: member.clone(),
                };
                let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
                *ready = Some(ready_rx);
                let task = tokio::spawn(forward_signals(
                    self.ctx.fleet.client().clone(),
                    self.ctx.cache.clone(),
                    subjects,
                    m,
                    SignalSink {
                        sub: internal,
                        tx: self.sig_tx.clone(),
                        bytes: self.out.bytes.clone(),
                    },
                    ready_tx,
                ));
                Kind::Signals {
                    task: task.abort_handle(),
                }
            }
        })
    }

    fn mark_pending(&mut self, internal: u64) {
        if let Some(sub) = self.subs.get_mut(&internal) {
            sub.gen += 1;
            self.gens
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(internal, sub.gen);
            self.pending.insert(internal);
        }
    }

    fn flush_pending(&mut self) {
        let ids: Vec<u64> = self.pending.iter().copied().collect();
        for id in ids {
            if self.send_snapshot(id, true) {
                self.pending.remove(&id);
            } else {
                break;
            }
        }
    }

    /// Queues a snapshot; false when the queue is full (the subscription stays owed one).
    fn send_snapshot(&mut self, internal: u64, resync: bool) -> bool {
        let Some(sub) = self.subs.get_mut(&internal) else {
            return true;
        };
        let (resource, schema, data, error): (&str, Value, Value, Option<ErrorBody>) =
            match &mut sub.kind {
                Kind::Machines => (
                    "machines",
                    json!({"key": "nkey", "states": ["running", "unresponsive", "stopped", "gone"]}),
                    json!(self.ctx.cache.machine_rows(now_ms())),
                    None,
                ),
                Kind::Units { machines, unit } => {
                    let rows = self.ctx.cache.unit_rows(
                        |m| machines.as_ref().is_none_or(|set| set.contains(m)),
                        |n| unit.as_ref().is_none_or(|re| re.is_match(n)),
                    );
                    (
                        "units",
                        json!({
                            "key": ["machine", "name"],
                            "columns": UNIT_COLUMNS.iter().map(|(n, t)| json!({"name": n, "type": t})).collect::<Vec<_>>(),
                            "states": crate::metrics::STATES,
                        }),
                        Value::Array(rows.iter().map(|r| r.to_json()).collect()),
                        None,
                    )
                }
                Kind::Object { key, loaded } => match self.ctx.objects.state(key) {
                    None => {
                        // Still loading: the Reset change brings the snapshot.
                        return true;
                    }
                    Some(Ok(state)) => {
                        *loaded = true;
                        ("object", json!(state.schema), json!(state.properties), None)
                    }
                    Some(Err(e)) => {
                        *loaded = true;
                        ("object", Value::Null, Value::Null, Some(e))
                    }
                },
                Kind::Signals { .. } => (
                    "signals",
                    json!({"fields": ["machine", "host", "sender", "sender_name", "path", "interface", "member", "signature", "args"]}),
                    json!([]),
                    None,
                ),
            };
        let mut v = json!({
            "type": "snapshot",
            "sub": sub.id,
            "resource": resource,
            "seq": sub.seq,
            "schema": schema,
            "data": data,
        });
        if resync {
            v["resync"] = true.into();
        }
        if let Some(e) = error {
            v["error"] = json!(e);
        }
        let frame = Frame::Text {
            text: v.to_string(),
            tag: Some((internal, sub.gen)),
        };
        match self.out.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.pending.contains(&internal) {
                    self.mark_pending(internal);
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.closing = Some((CLOSE_GOING_AWAY, String::new()));
                false
            }
        }
    }

    fn send_delta(&mut self, internal: u64, data: Value) {
        if self.pending.contains(&internal) {
            return; // the owed snapshot will carry it
        }
        let Some(sub) = self.subs.get_mut(&internal) else {
            return;
        };
        sub.seq += 1;
        let text =
            json!({"type": "delta", "sub": sub.id, "seq": sub.seq, "data": data}).to_string();
        match self.out.try_send(Frame::Text {
            text,
            tag: Some((internal, sub.gen)),
        }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                stats::dropped(Dropped::ClientQueueFull);
                self.mark_pending(internal)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.closing = Some((CLOSE_GOING_AWAY, String::new()))
            }
        }
    }

    fn dispatch(&mut self, change: &Change) {
        let mut deltas: Vec<(u64, Value)> = Vec::new();
        let mut snapshots: Vec<u64> = Vec::new();
        for (internal, sub) in &self.subs {
            match (&sub.kind, change) {
                (Kind::Machines, Change::Machine(row)) => {
                    deltas.push((*internal, json!({"upsert": [row]})))
                }
                (
                    Kind::Units { machines, unit },
                    Change::Units {
                        machine,
                        rows,
                        removed,
                        replace,
                    },
                ) => {
                    if machines.as_ref().is_some_and(|set| !set.contains(machine)) {
                        continue;
                    }
                    let keep = |n: &str| unit.as_ref().is_none_or(|re| re.is_match(n));
                    let upsert: Vec<Value> = rows
                        .iter()
                        .filter(|r| keep(&r.name))
                        .map(|r| r.to_json())
                        .collect();
                    let remove: Vec<Value> = removed
                        .iter()
                        .filter(|n| keep(n))
                        .map(|n| json!([machine, n]))
                        .collect();
                    if *replace {
                        deltas.push((*internal, json!({"replace": machine, "upsert": upsert})));
                    } else if !upsert.is_empty() || !remove.is_empty() {
                        let mut d = json!({});
                        if !upsert.is_empty() {
                            d["upsert"] = upsert.into();
                        }
                        if !remove.is_empty() {
                            d["remove"] = remove.into();
                        }
                        deltas.push((*internal, d));
                    }
                }
                (Kind::Object { key, loaded }, Change::Object(ch)) if *key == ch.key => {
                    match &ch.kind {
                        ObjectChangeKind::Reset => snapshots.push(*internal),
                        ObjectChangeKind::Props { interface, changed } if *loaded => deltas.push((
                            *internal,
                            json!({"interface": interface, "changed": changed}),
                        )),
                        ObjectChangeKind::Props { .. } => {}
                    }
                }
                _ => {}
            }
        }
        for id in snapshots {
            let resync = matches!(
                self.subs.get(&id).map(|s| &s.kind),
                Some(Kind::Object { loaded: true, .. })
            );
            if !self.send_snapshot(id, resync) {
                // stays pending
            }
        }
        for (id, d) in deltas {
            self.send_delta(id, d);
        }
    }

    fn signal(&mut self, ev: SignalEvent) {
        if !self.subs.contains_key(&ev.sub) {
            return;
        }
        if ev.dropped > 0 {
            // The client missed signals: say so with a resync snapshot.
            self.mark_pending(ev.sub);
            return;
        }
        self.send_delta(ev.sub, ev.data);
    }

    async fn request(&mut self, r: RequestMsg) {
        let id = r.id.clone();
        let prepared = match prepare(&r, self.ctx.request_timeout) {
            Ok(p) => p,
            Err(message) => {
                return self
                    .error(Some(id), None, ErrorCode::InvalidArgument, message)
                    .await
            }
        };
        if self.inflight.load(Ordering::SeqCst) >= MAX_INFLIGHT {
            return self
                .error(
                    Some(id),
                    None,
                    ErrorCode::InvalidArgument,
                    format!("at most {MAX_INFLIGHT} requests in flight per connection"),
                )
                .await;
        }
        let (targets, unknown) = match &r.targets {
            Targets::All => self.ctx.cache.targets(None),
            Targets::Some(list) => self.ctx.cache.targets(Some(list)),
        };
        self.inflight.fetch_add(1, Ordering::SeqCst);
        let inflight = self.inflight.clone();
        let out = self.out.clone();
        let fleet = self.ctx.fleet.clone();
        tokio::spawn(async move {
            run_request(fleet, id, prepared, targets, unknown, out).await;
            inflight.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

fn release(ctx: &WsContext, sub: Sub) {
    match sub.kind {
        Kind::Object { key, .. } => ctx.objects.release(&key),
        Kind::Signals { task } => task.abort(),
        _ => {}
    }
}

/// A request ready to send.
#[derive(Debug)]
struct Prepared {
    query: Query,
    timeout: Duration,
}

/// Builds the query of a request, or says what is wrong with it.
fn prepare(r: &RequestMsg, default_timeout: Duration) -> Result<Prepared, String> {
    let need = |v: &Option<String>, what: &str| {
        v.clone()
            .ok_or_else(|| format!("{} needs \"{what}\"", op_name(r.op)))
    };
    let timeout = r
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(default_timeout)
        .min(MAX_REQUEST_TIMEOUT);
    // Every field the client gave goes in, so check_for refuses those the op does not take.
    let request = |default_args: Option<Value>| Request {
        interface: r.interface.clone(),
        args: r.args.clone().or(default_args),
        signature: r.signature.clone(),
        value: r.value.clone(),
        timeout_ms: r.timeout_ms,
    };
    let query = match r.op {
        RequestOp::Start | RequestOp::Stop | RequestOp::Restart => {
            let unit = need(&r.unit, "unit")?;
            if unit.is_empty() || unit.len() > 256 || unit.contains(['/', '\0']) {
                return Err(format!("invalid unit name {unit:?}"));
            }
            let method = match r.op {
                RequestOp::Start => "StartUnit",
                RequestOp::Stop => "StopUnit",
                _ => "RestartUnit",
            };
            let mut q = requests::unit_job(method, &unit);
            q.request.timeout_ms = r.timeout_ms;
            q
        }
        RequestOp::Get => Query {
            destination: need(&r.dest, "dest")?,
            path: need(&r.path, "path")?,
            op: Op::Get,
            member: Some(need(&r.member, "member")?),
            request: request(None),
        },
        RequestOp::Set => Query {
            destination: need(&r.dest, "dest")?,
            path: need(&r.path, "path")?,
            op: Op::Set,
            member: Some(need(&r.member, "member")?),
            request: {
                if r.value.is_none() {
                    return Err("set needs \"value\"".into());
                }
                request(None)
            },
        },
        RequestOp::Call => Query {
            destination: need(&r.dest, "dest")?,
            path: need(&r.path, "path")?,
            op: Op::Call,
            member: Some(need(&r.member, "member")?),
            request: request(Some(json!([]))),
        },
        RequestOp::Introspect => Query {
            destination: need(&r.dest, "dest")?,
            path: r.path.clone().unwrap_or_else(|| "/".into()),
            op: Op::Introspect,
            member: None,
            request: Request {
                timeout_ms: r.timeout_ms,
                ..Default::default()
            },
        },
        RequestOp::ListNames => Query {
            destination: "org.freedesktop.DBus".into(),
            path: "/".into(),
            op: Op::ListNames,
            member: None,
            request: Request {
                timeout_ms: r.timeout_ms,
                ..Default::default()
            },
        },
    };
    // Fails early, with the protocol's message, on names a subject cannot carry.
    RequestSubject::new(
        Target::Broadcast,
        query.destination.clone(),
        query.path.clone(),
        query.op,
        query.member.clone(),
    )
    .map_err(|e| e.to_string())?;
    query.request.check_for(query.op)?;
    Ok(Prepared { query, timeout })
}

fn op_name(op: RequestOp) -> &'static str {
    match op {
        RequestOp::Get => "get",
        RequestOp::Set => "set",
        RequestOp::Call => "call",
        RequestOp::Start => "start",
        RequestOp::Stop => "stop",
        RequestOp::Restart => "restart",
        RequestOp::Introspect => "introspect",
        RequestOp::ListNames => "list-names",
    }
}

async fn run_request(
    fleet: Fleet,
    id: Value,
    p: Prepared,
    targets: Vec<cbus_client::fleet::AgentStatus>,
    unknown: Vec<String>,
    out: Outbox,
) {
    let send = |v: Value| {
        let out = out.clone();
        async move {
            let _ = out
                .send(Frame::Text {
                    text: v.to_string(),
                    tag: None,
                })
                .await;
        }
    };
    let (mut ok, mut failed, mut timed_out) = (0usize, 0usize, 0usize);
    for nkey in unknown {
        failed += 1;
        send(json!({
            "type": "result", "id": id, "machine": nkey, "host": Value::Null, "ok": false,
            "error": ErrorBody::new(ErrorCode::NotFound, "no such machine"),
        }))
        .await;
    }
    let (fleet_ref, query, timeout) = (&fleet, &p.query, p.timeout);
    let mut results = stream::iter(targets)
        .map(|t| async move {
            let r = requests::ask(fleet_ref, &t, query, timeout).await;
            (t, r)
        })
        .buffer_unordered(64);
    while let Some((t, r)) = results.next().await {
        let mut v =
            json!({"type": "result", "id": id, "machine": t.info.nkey, "host": t.info.hostname});
        match r {
            MachineResult::Ok(s) => {
                ok += 1;
                v["ok"] = true.into();
                if let Some(sig) = s.signature {
                    v["signature"] = sig.into();
                }
                v["value"] = s.value;
            }
            MachineResult::Failed(e) => {
                failed += 1;
                v["ok"] = false.into();
                v["error"] = json!(e);
            }
            MachineResult::TimedOut => {
                timed_out += 1;
                v["ok"] = false.into();
                v["timed_out"] = true.into();
                v["error"] = json!(ErrorBody::new(
                    ErrorCode::Timeout,
                    format!("no reply within {:.1}s", timeout.as_secs_f64())
                ));
            }
        }
        send(v).await;
    }
    send(json!({"type": "done", "id": id, "ok": ok, "failed": failed, "timed_out": timed_out}))
        .await;
}

/// Where a signal subscription's events go: the session's queue, under the client's byte budget.
struct SignalSink {
    sub: u64,
    tx: mpsc::Sender<SignalEvent>,
    bytes: Arc<Semaphore>,
}

/// Header filters a signal subscription applies after the subject's.
struct SignalMatch {
    sender: Option<String>,
    interface: Option<String>,
    member: Option<String>,
}

async fn forward_signals(
    client: async_nats::Client,
    cache: Cache,
    subjects: Vec<String>,
    m: SignalMatch,
    sink: SignalSink,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let SignalSink {
        sub: internal,
        tx,
        bytes,
    } = sink;
    let mut all: SelectAll<async_nats::Subscriber> = SelectAll::new();
    for s in subjects {
        match client.subscribe(s.clone()).await {
            Ok(sub) => all.push(sub),
            Err(e) => tracing::warn!(subject = %s, error = %e, "cannot subscribe to signals"),
        }
    }
    // A flush is a round trip: the server has the subscriptions when it returns.
    let _ = tokio::time::timeout(SUBSCRIBE_TIMEOUT, client.flush()).await;
    let _ = ready.send(());
    let mut dropped = 0u64;
    while let Some(msg) = all.next().await {
        let h = msg.headers.as_ref();
        let get = |name| nats_headers::get(h, name);
        // The machine is the subject's, never the NKey header's (see follow::signal_machine).
        let Some(machine) = crate::follow::signal_machine(&msg.subject, h) else {
            continue;
        };
        if let Some(sender) = &m.sender {
            if get(nats_headers::SENDER) != Some(sender) && !nats_headers::sender_owns(h, sender) {
                continue;
            }
        }
        if m.interface
            .as_deref()
            .is_some_and(|i| get(nats_headers::INTERFACE) != Some(i))
        {
            continue;
        }
        if m.member
            .as_deref()
            .is_some_and(|i| get(nats_headers::MEMBER) != Some(i))
        {
            continue;
        }
        let args: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
        let data = json!({
            "machine": machine,
            // The name the machine's presence gave, not one a signal claims.
            "host": cache.hostname(machine),
            "sender": get(nats_headers::SENDER),
            "sender_name": get(nats_headers::SENDER_NAME),
            "path": get(nats_headers::PATH),
            "interface": get(nats_headers::INTERFACE),
            "member": get(nats_headers::MEMBER),
            "signature": get(nats_headers::SIGNATURE),
            "args": args,
            "received_ms": now_ms(),
        });
        // Signals queued for the session count against the client's byte budget too: a
        // signal may be a megabyte.
        let cost = (msg.payload.len() + 256).min(u32::MAX as usize) as u32;
        let Ok(permit) = bytes.clone().try_acquire_many_owned(cost) else {
            stats::dropped(Dropped::ClientSignal);
            dropped += 1;
            continue;
        };
        match tx.try_send(SignalEvent {
            sub: internal,
            data,
            dropped,
            _bytes: Some(permit),
        }) {
            Ok(()) => dropped = 0,
            Err(mpsc::error::TrySendError::Full(_)) => {
                stats::dropped(Dropped::ClientSignal);
                dropped += 1
            }
            Err(mpsc::error::TrySendError::Closed(_)) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> RequestMsg {
        match frames::parse(text).unwrap() {
            ClientMsg::Request(r) => r,
            other => panic!("{other:?}"),
        }
    }

    fn text(n: usize) -> Frame {
        Frame::Text {
            text: "x".repeat(n),
            tag: None,
        }
    }

    #[tokio::test]
    async fn the_outbox_is_bounded_in_bytes() {
        let (out, mut rx) = Outbox::new(100, 100);
        assert!(out.try_send(text(60)).is_ok());
        assert!(matches!(
            out.try_send(text(60)),
            Err(mpsc::error::TrySendError::Full(()))
        ));
        assert!(out.try_send(text(40)).is_ok(), "what still fits goes in");
        assert!(out.try_send(Frame::Ping).is_ok(), "pings cost nothing");
        drop(rx.recv().await); // the writer wrote the first frame: its bytes are back
        assert!(out.try_send(text(60)).is_ok());
        // A frame larger than the budget takes all of it: it goes out alone.
        while rx.try_recv().is_ok() {}
        assert!(out.try_send(text(500)).is_ok());
        assert!(out.try_send(text(1)).is_err());
        drop(rx);
        assert!(matches!(
            out.try_send(text(1)),
            Err(mpsc::error::TrySendError::Closed(()))
        ));
        assert!(out.send(text(1)).await.is_err());
    }

    #[test]
    fn requests_become_queries() {
        let d = Duration::from_secs(10);
        let p = prepare(
            &req(r#"{"type":"request","id":1,"op":"stop","targets":"all","unit":"a.service"}"#),
            d,
        )
        .unwrap();
        assert_eq!(p.query.member.as_deref(), Some("StopUnit"));
        assert_eq!(p.query.request.args, Some(json!(["a.service", "replace"])));
        let p = prepare(&req(r#"{"type":"request","id":1,"op":"set","targets":"all","dest":"org.x.Y","path":"/o","member":"Count","value":3,"timeout_ms":999999}"#), d).unwrap();
        assert_eq!(p.query.op, Op::Set);
        assert_eq!(p.timeout, MAX_REQUEST_TIMEOUT);
        assert!(prepare(
            &req(r#"{"type":"request","id":1,"op":"stop","targets":"all"}"#),
            d
        )
        .unwrap_err()
        .contains("needs \"unit\""));
        assert!(prepare(&req(r#"{"type":"request","id":1,"op":"get","targets":"all","dest":"bad","path":"/","member":"X"}"#), d).is_err());
        assert!(prepare(&req(r#"{"type":"request","id":1,"op":"get","targets":"all","dest":"a.b","path":"/","member":"X","args":[]}"#), d)
            .unwrap_err()
            .contains("does not take"));
        let p = prepare(
            &req(r#"{"type":"request","id":1,"op":"list-names","targets":"all"}"#),
            d,
        )
        .unwrap();
        assert_eq!(p.query.op, Op::ListNames);
    }
}
