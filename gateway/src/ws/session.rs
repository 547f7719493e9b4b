//! One authenticated connection: a reader task, the session loop and a writer task joined by
//! bounded queues.
//!
//! The session turns changes (routed to it by machine, [`crate::changes`]), signals and
//! request results into frames. When the frame queue is full the session does not wait and does
//! not grow: it drops that subscription's queued deltas (the writer skips frames of an outdated
//! generation) and sends a fresh snapshot marked `"resync": true` once there is room. A session
//! whose change queue overflowed resyncs every subscription the same way. Memory per client is
//! therefore bounded, whatever the client's speed.
//!
//! The reader is a task of its own so that a session woken for a change does not poll its socket
//! too (with 1,000 clients, that polling was a tenth of the gateway's CPU).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use cbus_protocol::presence::now_ms;
use cbus_protocol::{ErrorBody, ErrorCode};
use futures::stream::{SplitSink, SplitStream};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;

use super::context::WsContext;
use super::frames::{
    self, ClientMsg, RequestMsg, Resource, CLOSE_GOING_AWAY, CLOSE_PROTOCOL_ERROR,
    CLOSE_UNAUTHORIZED,
};
use super::outgoing::{Delta, ServerFrame};
use super::request;
use super::signals::{EventData, SignalEvent, SignalSink, SIGNAL_QUEUE, SUBSCRIBE_TIMEOUT};
use super::subscription::{self, Sub, Update};
use super::writer::{writer, Frame, Generations, Outbox};
use crate::changes::{Change, ChangeReceiver, Interest, InterestHandle, Lagged};
use crate::stats::{self, Dropped};

/// Subscriptions per client.
const MAX_SUBSCRIPTIONS: usize = 64;
/// Requests in flight per client.
const MAX_INFLIGHT: usize = 16;
/// Changes queued for a session before it must resync.
const CHANGE_QUEUE: usize = 4096;
/// Client frames read ahead of the session.
const INCOMING_QUEUE: usize = 8;
/// Fleet aggregates go out at most this often per subscription, and only when the store
/// changed: a browser following 1,000 machines x 1,000 updates/s gets 2 small frames a second.
const FLEET_INTERVAL: Duration = Duration::from_millis(500);
const FLEET_POLL: Duration = Duration::from_millis(100); // how often the version is compared
/// Changes handled in one wake before the session looks at its other inputs.
const CHANGE_BATCH: usize = 256;

/// Serves an authenticated client until it leaves, falls silent or breaks the protocol.
pub(super) async fn serve(
    ctx: Arc<WsContext>,
    sink: SplitSink<WebSocket, Message>,
    mut stream: SplitStream<WebSocket>,
) {
    let (out, out_rx) = Outbox::new(ctx.queue, ctx.queue_bytes);
    let gens: Generations = Arc::default();
    let writer = tokio::spawn(writer(sink, out_rx, gens.clone()));
    let hello = ServerFrame::hello(ctx.heartbeat.as_millis() as u64);
    if out.send(Frame::control(hello.to_text())).await.is_err() {
        return;
    }
    let (sig_tx, sig_rx) = mpsc::channel(SIGNAL_QUEUE);
    // Follows nothing until a subscription says what; a subscription's interest is set before
    // its snapshot is taken, so no change between the two is missed.
    let changes = ctx.changes.subscribe(Interest::default(), CHANGE_QUEUE);
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
        // A change after a quiet spell goes out at once; a storm is throttled.
        let mut fleet = tokio::time::interval(FLEET_POLL);
        fleet.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut fleet_version = self.ctx.store.version();
        let mut fleet_sent = Instant::now();
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
                _ = fleet.tick() => {
                    let v = self.ctx.store.version();
                    if v != fleet_version && fleet_sent.elapsed() >= FLEET_INTERVAL {
                        fleet_version = v;
                        fleet_sent = Instant::now();
                        self.send_fleet();
                    }
                }
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > self.ctx.heartbeat * 3 {
                        self.closing = Some((CLOSE_GOING_AWAY, "no frames from the client for three heartbeats".into()));
                        break;
                    }
                    let ping = ServerFrame::Ping { t: now_ms() }.to_text();
                    let _ = self.out.try_send(Frame::control(ping));
                    let _ = self.out.try_send(Frame::Ping);
                }
            }
            if self.out.is_closed() {
                break;
            }
        }
    }

    /// Changes were dropped for this session: every change-fed subscription gets a new snapshot.
    fn lagged(&mut self) {
        tracing::info!("client fell behind the change stream; resyncing");
        for i in self.sub_ids(|k| k.follows_changes()) {
            self.mark_pending(i);
        }
    }

    /// The internal ids of the subscriptions whose kind `keep` accepts.
    fn sub_ids(&self, keep: impl Fn(&subscription::Kind) -> bool) -> Vec<u64> {
        self.subs
            .iter()
            .filter(|(_, s)| keep(&s.kind))
            .map(|(i, _)| *i)
            .collect()
    }

    /// Tells the router which machines' changes the subscriptions need.
    fn update_interest(&self) {
        self.interest
            .set(subscription::interest(self.subs.values()));
    }

    /// Stops what the subscriptions hold.
    fn cleanup(&mut self) {
        for (_, sub) in self.subs.drain() {
            subscription::release(&self.ctx, sub);
        }
    }

    async fn send_control(&mut self, frame: ServerFrame<'_>) {
        if self
            .out
            .send(Frame::control(frame.to_text()))
            .await
            .is_err()
        {
            self.closing = Some((CLOSE_GOING_AWAY, String::new()));
        }
    }

    async fn error(
        &mut self,
        id: Option<&Value>,
        sub: Option<&str>,
        code: ErrorCode,
        message: String,
    ) {
        let frame = ServerFrame::Error {
            id,
            sub,
            error: ErrorBody::new(code, message),
        };
        self.send_control(frame).await;
    }

    async fn handle(&mut self, msg: ClientMsg) {
        match msg {
            ClientMsg::Auth { token } => {
                if !self.ctx.token.matches(&token) {
                    self.closing = Some((CLOSE_UNAUTHORIZED, "invalid token".into()));
                }
            }
            ClientMsg::Ping => {
                self.send_control(ServerFrame::Pong { t: now_ms() }).await;
            }
            ClientMsg::Pong => {}
            ClientMsg::Subscribe { id, resource } => self.subscribe(id, resource).await,
            ClientMsg::Unsubscribe { id } => self.unsubscribe(id).await,
            ClientMsg::Request(r) => self.request(r).await,
        }
    }

    async fn unsubscribe(&mut self, id: String) {
        let Some(internal) = self.ids.remove(&id) else {
            let message = format!("no subscription {id:?}");
            return self
                .error(None, Some(&id), ErrorCode::NotFound, message)
                .await;
        };
        self.pending.remove(&internal);
        self.gens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&internal);
        if let Some(sub) = self.subs.remove(&internal) {
            subscription::release(&self.ctx, sub);
        }
        self.update_interest();
        self.send_control(ServerFrame::Unsubscribed { sub: &id })
            .await;
    }

    async fn subscribe(&mut self, id: String, resource: Resource) {
        if self.ids.contains_key(&id) {
            let message = format!("subscription {id:?} exists; unsubscribe first");
            return self
                .error(None, Some(&id), ErrorCode::InvalidArgument, message)
                .await;
        }
        if self.subs.len() >= MAX_SUBSCRIPTIONS {
            let message = format!("at most {MAX_SUBSCRIPTIONS} subscriptions per connection");
            return self
                .error(None, Some(&id), ErrorCode::InvalidArgument, message)
                .await;
        }
        let internal = self.next_internal;
        let sink = || SignalSink {
            sub: internal,
            tx: self.sig_tx.clone(),
            bytes: self.out.bytes(),
            budget: self.ctx.queue_bytes.min(u32::MAX as usize) as u32,
        };
        let compiled = match subscription::compile(&self.ctx, &resource, sink) {
            Ok(c) => c,
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
                kind: compiled.kind,
                seq: 0,
                gen: 0,
            },
        );
        self.update_interest();
        if let Some(ready) = compiled.ready {
            if let Ok(Ok(r)) = tokio::time::timeout(SUBSCRIBE_TIMEOUT, ready).await {
                if let Some(sub) = self.subs.get_mut(&internal) {
                    sub.kind.ready(r);
                }
            }
        }
        self.send_snapshot(internal, false);
    }

    /// Every fleet subscription gets its aggregate again, whole (a full queue leaves it owed).
    fn send_fleet(&mut self) {
        for id in self.sub_ids(|k| k.is_fleet()) {
            if !self.pending.contains(&id) {
                self.send_snapshot(id, false);
            }
        }
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
        let Some(snapshot) = sub.kind.snapshot(&self.ctx) else {
            return true; // an object still loading: its Reset change brings the snapshot
        };
        let text = ServerFrame::Snapshot {
            sub: &sub.id,
            resource: snapshot.resource,
            seq: sub.seq,
            schema: snapshot.schema,
            data: snapshot.data,
            resync,
            error: snapshot.error,
        }
        .to_text();
        let frame = Frame::Text {
            text,
            tag: Some((internal, sub.gen)),
        };
        match self.out.try_send(frame) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                if !self.pending.contains(&internal) {
                    self.mark_pending(internal);
                }
                false
            }
            Err(TrySendError::Closed(_)) => {
                self.closing = Some((CLOSE_GOING_AWAY, String::new()));
                false
            }
        }
    }

    fn send_delta(&mut self, internal: u64, data: &Delta<'_>) {
        if self.pending.contains(&internal) {
            return; // the owed snapshot will carry it
        }
        let Some(sub) = self.subs.get_mut(&internal) else {
            return;
        };
        sub.seq += 1;
        let text = ServerFrame::Delta {
            sub: &sub.id,
            seq: sub.seq,
            data,
        }
        .to_text();
        match self.out.try_send(Frame::Text {
            text,
            tag: Some((internal, sub.gen)),
        }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                stats::dropped(Dropped::ClientQueueFull);
                self.mark_pending(internal)
            }
            Err(TrySendError::Closed(_)) => self.closing = Some((CLOSE_GOING_AWAY, String::new())),
        }
    }

    fn dispatch(&mut self, change: &Change) {
        let mut deltas = Vec::new();
        let mut snapshots = Vec::new();
        for (internal, sub) in &self.subs {
            match sub.kind.update(change) {
                Some(Update::Delta(d)) => deltas.push((*internal, d)),
                Some(Update::Snapshot) => snapshots.push(*internal),
                None => {}
            }
        }
        for id in snapshots {
            let resync = self.subs.get(&id).is_some_and(|s| s.kind.loaded());
            // When the queue is full it stays pending.
            self.send_snapshot(id, resync);
        }
        for (id, d) in deltas {
            self.send_delta(id, &d);
        }
    }

    fn signal(&mut self, ev: SignalEvent) {
        let Some(sub) = self.subs.get_mut(&ev.sub) else {
            return;
        };
        if let EventData::Audit(row) = &ev.data {
            sub.kind.keep(row);
        }
        if ev.dropped > 0 {
            // The client missed signals or entries: say so with a resync snapshot.
            self.mark_pending(ev.sub);
            return;
        }
        match &ev.data {
            EventData::Signal(data) => self.send_delta(ev.sub, &Delta::Signal(data)),
            EventData::Audit(row) => self.send_delta(ev.sub, &Delta::Audit(row)),
        }
    }

    async fn request(&mut self, r: RequestMsg) {
        let out = self.out.clone();
        if let Err((id, message)) = request::start(&self.ctx, r, &self.inflight, MAX_INFLIGHT, out)
        {
            self.error(Some(&id), None, ErrorCode::InvalidArgument, message)
                .await
        }
    }
}
