//! Signal subscriptions: one task per subscription forwards the NATS signals that match its
//! filter to the session, under the client's byte budget. The events of history readers
//! ([`super::history`]: audit entries, replayed signals) take the same way to the session.

use std::sync::Arc;
use std::time::Duration;

use cbus_client::headers;
use cbus_protocol::presence::now_ms;
use cbus_protocol::subject::SignalSubject;
use futures::stream::{SelectAll, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::outgoing::{AuditRow, HistoryInfo, SignalData};
use crate::nats::{sent_by, signal_machine};
use crate::stats::{self, Dropped};
use crate::store::Store;

/// Signals buffered between the NATS subscriptions and the session.
pub(super) const SIGNAL_QUEUE: usize = 256;
/// How long a signals subscription waits for NATS to confirm it before its snapshot goes out.
pub(super) const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A signal or audit entry for one subscription; `dropped` counts those lost before it.
pub(super) struct SignalEvent {
    pub sub: u64,
    pub data: EventData,
    pub dropped: u64,
    /// Its bytes of the client's budget while it waits for the session.
    _bytes: Option<OwnedSemaphorePermit>,
}

/// What a [`SignalEvent`] carries.
pub(super) enum EventData {
    Signal(Box<SignalData>),
    Audit(Box<AuditRow>),
}

impl SignalEvent {
    pub(super) fn new(
        sub: u64,
        data: EventData,
        dropped: u64,
        bytes: OwnedSemaphorePermit,
    ) -> SignalEvent {
        SignalEvent {
            sub,
            data,
            dropped,
            _bytes: Some(bytes),
        }
    }
}

/// What a subscription's task says once it is in place: what its history reader found, and
/// an audit subscription's first page.
#[derive(Default)]
pub(super) struct Ready {
    pub history: Option<HistoryInfo>,
    pub page: Vec<AuditRow>,
}

/// Where a signal subscription's events go: the session's queue, under the client's byte budget.
pub(super) struct SignalSink {
    pub sub: u64,
    pub tx: mpsc::Sender<SignalEvent>,
    pub bytes: Arc<Semaphore>,
    /// The budget's size: what one event may take of it at most.
    pub budget: u32,
}

/// Header filters a signal subscription applies after the subject's.
pub(super) struct SignalMatch {
    pub sender: Option<String>,
    pub interface: Option<String>,
    pub member: Option<String>,
    /// Checked on the subject too: the signal stream's reader takes one filter subject.
    pub path_prefix: Option<String>,
}

/// A signal's bytes of the client's budget (a signal may be a megabyte; at most the server's
/// `max_payload`, so a permit never exceeds the budget).
pub(super) fn signal_cost(payload: usize) -> u32 {
    (payload.min(8 << 20) + 256) as u32
}

/// The signal as a client sees it, or `None` when it does not pass the filters (or its subject
/// is not a signal's). The machine is the subject's, never the NKey header's.
pub(super) fn signal_data(
    store: &Store,
    msg: &async_nats::Message,
    m: &SignalMatch,
) -> Option<SignalData> {
    let h = msg.headers.as_ref();
    let get = |name| headers::get(h, name).map(str::to_owned);
    let machine = signal_machine(&msg.subject, h)?;
    if m.sender.as_deref().is_some_and(|s| !sent_by(h, s)) {
        return None;
    }
    if m.interface
        .as_deref()
        .is_some_and(|i| headers::get(h, headers::INTERFACE) != Some(i))
    {
        return None;
    }
    if m.member
        .as_deref()
        .is_some_and(|i| headers::get(h, headers::MEMBER) != Some(i))
    {
        return None;
    }
    if let Some(prefix) = m.path_prefix.as_deref().filter(|p| *p != "/") {
        let path = SignalSubject::parse(&msg.subject).ok()?.path;
        let below = path
            .strip_prefix(prefix)
            .is_some_and(|r| r.starts_with('/'));
        if path != prefix && !below {
            return None;
        }
    }
    Some(SignalData {
        machine: machine.to_owned(),
        host: store.hostname(machine),
        sender: get(headers::SENDER),
        sender_name: get(headers::SENDER_NAME),
        path: get(headers::PATH),
        interface: get(headers::INTERFACE),
        member: get(headers::MEMBER),
        signature: get(headers::SIGNATURE),
        args: serde_json::from_slice(&msg.payload).unwrap_or(Value::Null),
        received_ms: now_ms(),
        stored_ms: None,
        replayed: false,
    })
}

/// Subscribes to `subjects`, says `ready` (with `say`) once NATS has the subscriptions, then
/// forwards what matches until aborted or the session is gone.
pub(super) async fn forward_signals(
    client: async_nats::Client,
    store: Store,
    subjects: Vec<String>,
    m: SignalMatch,
    sink: SignalSink,
    ready: oneshot::Sender<Ready>,
    say: Ready,
) {
    let SignalSink {
        sub: internal,
        tx,
        bytes,
        ..
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
    let _ = ready.send(say);
    let mut dropped = 0u64;
    while let Some(msg) = all.next().await {
        let Some(data) = signal_data(&store, &msg, &m) else {
            continue;
        };
        // Signals queued for the session count against the client's byte budget too: a
        // signal may be a megabyte.
        let Ok(permit) = bytes
            .clone()
            .try_acquire_many_owned(signal_cost(msg.payload.len()))
        else {
            stats::dropped(Dropped::ClientSignal);
            dropped += 1;
            continue;
        };
        let event = SignalEvent::new(internal, EventData::Signal(Box::new(data)), dropped, permit);
        match tx.try_send(event) {
            Ok(()) => dropped = 0,
            Err(TrySendError::Full(_)) => {
                stats::dropped(Dropped::ClientSignal);
                dropped += 1
            }
            Err(TrySendError::Closed(_)) => break,
        }
    }
}
