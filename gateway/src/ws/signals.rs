//! Signal subscriptions: one task per subscription forwards the NATS signals that match its
//! filter to the session, under the client's byte budget.

use std::sync::Arc;
use std::time::Duration;

use cbus_client::headers;
use cbus_protocol::presence::now_ms;
use futures::stream::{SelectAll, StreamExt};
use serde_json::Value;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::outgoing::SignalData;
use crate::nats::{sent_by, signal_machine};
use crate::stats::{self, Dropped};
use crate::store::Store;

/// Signals buffered between the NATS subscriptions and the session.
pub(super) const SIGNAL_QUEUE: usize = 256;
/// How long a signals subscription waits for NATS to confirm it before its snapshot goes out.
pub(super) const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A signal for one subscription; `dropped` counts signals lost before it.
pub(super) struct SignalEvent {
    pub sub: u64,
    pub data: SignalData,
    pub dropped: u64,
    /// Its bytes of the client's budget while it waits for the session.
    _bytes: Option<OwnedSemaphorePermit>,
}

/// Where a signal subscription's events go: the session's queue, under the client's byte budget.
pub(super) struct SignalSink {
    pub sub: u64,
    pub tx: mpsc::Sender<SignalEvent>,
    pub bytes: Arc<Semaphore>,
}

/// Header filters a signal subscription applies after the subject's.
pub(super) struct SignalMatch {
    pub sender: Option<String>,
    pub interface: Option<String>,
    pub member: Option<String>,
}

/// Subscribes to `subjects`, says `ready` once NATS has the subscriptions, then forwards what
/// matches until aborted or the session is gone.
pub(super) async fn forward_signals(
    client: async_nats::Client,
    store: Store,
    subjects: Vec<String>,
    m: SignalMatch,
    sink: SignalSink,
    ready: oneshot::Sender<()>,
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
        let get = |name| headers::get(h, name).map(str::to_owned);
        // The machine is the subject's, never the NKey header's.
        let Some(machine) = signal_machine(&msg.subject, h) else {
            continue;
        };
        if m.sender.as_deref().is_some_and(|s| !sent_by(h, s)) {
            continue;
        }
        if m.interface
            .as_deref()
            .is_some_and(|i| headers::get(h, headers::INTERFACE) != Some(i))
        {
            continue;
        }
        if m.member
            .as_deref()
            .is_some_and(|i| headers::get(h, headers::MEMBER) != Some(i))
        {
            continue;
        }
        let data = SignalData {
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
        };
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
            Err(TrySendError::Full(_)) => {
                stats::dropped(Dropped::ClientSignal);
                dropped += 1
            }
            Err(TrySendError::Closed(_)) => break,
        }
    }
}
