//! History for the WebSocket API: the audit trail (resource `audit`) and the recent past of a
//! signals subscription (`since_ms`), read from their JetStream streams (`cbus-audit`,
//! `cbus-signals`) with `cbus_client::streams::History`, the reader `cbus audit` and
//! `cbus monitor --since` use, not a second replay.
//!
//! Why one reader for the past and the present: the ordered consumer that replays the past goes
//! on delivering what is stored after it, so there is no seam to get wrong (no gap, no
//! duplicate), and `History` makes it again from the last sequence after a NATS restart. Its
//! reads are pulls, so a slow client slows its own consumer instead of growing the gateway:
//! each entry or signal waits for room in the client's byte budget before it is queued.
//!
//! Everything read is hostile input: an audit entry's machine is its subject's nkey (only that
//! machine's agent may publish there), an entry whose body names another machine, that is not
//! an entry or that is over 16 KiB is dropped and counted (`audit_refused`); signals go through
//! the same checks as live ones ([`super::signals::signal_data`]). Bounds, in count, bytes and
//! time, are the constants below (docs/protocol.md, "Audit and signal history").
//!
//! Without the stream (it is optional: `cbus streams init`), or when it cannot be read, a
//! subscription is live only, from plain NATS subscriptions, and its snapshot says why.

use std::collections::VecDeque;
use std::time::Duration;

use cbus_client::streams::{self, History, Stored};
use cbus_protocol::audit::{AuditEntry, MAX_ENTRY_BYTES};
use cbus_protocol::presence::now_ms;
use cbus_protocol::streams::{AUDIT_STREAM, SIGNAL_STREAM};
use cbus_protocol::subject;
use futures::StreamExt;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::oneshot;

use super::outgoing::{AuditRow, HistoryInfo};
use super::signals::{
    forward_signals, signal_cost, signal_data, EventData, Ready, SignalEvent, SignalMatch,
    SignalSink, SUBSCRIBE_TIMEOUT,
};
use crate::stats::{self, Dropped};
use crate::store::Store;

/// Audit entries in a page, by default and at most.
pub(super) const AUDIT_LIMIT: usize = 200;
pub(super) const MAX_AUDIT_LIMIT: usize = 500;
/// How far back an audit page looks, by default and at most (the stream's own age limit may
/// be shorter).
pub(super) const AUDIT_SINCE: Duration = Duration::from_secs(24 * 3600);
pub(super) const MAX_AUDIT_SINCE: Duration = Duration::from_secs(31 * 24 * 3600);
/// A page is read from at most the stream's last this many entries (of all machines).
pub(super) const AUDIT_SCAN: u64 = 10_000;
/// The bytes of an audit page (and of the entries a session keeps for a resync).
pub(super) const PAGE_BYTES: usize = 1 << 20;
/// Signals replayed, by default and at most, and how far back at most.
pub(super) const SIGNAL_REPLAY: usize = 500;
pub(super) const MAX_SIGNAL_REPLAY: usize = 2_000;
pub(super) const MAX_SIGNAL_SINCE: Duration = Duration::from_secs(24 * 3600);
/// The bytes of a signal replay; past them the rest of the replay is dropped and the client
/// gets a resync (as when it falls behind live signals).
pub(super) const REPLAY_BYTES: usize = 8 << 20;
/// Opening a stream's reader, and reading an audit page: the subscription's snapshot waits for
/// both (under [`SUBSCRIBE_TIMEOUT`]); what the page did not get in time follows as deltas.
const OPEN_TIMEOUT: Duration = Duration::from_millis(1500);
const PAGE_DEADLINE: Duration = Duration::from_millis(3000);

/// The newest audit rows, bounded in count and bytes; the oldest go first.
#[derive(Debug, Default)]
pub(super) struct AuditRing {
    rows: VecDeque<AuditRow>,
    bytes: usize,
    limit: usize,
    /// Rows pushed out.
    pub older: u64,
}

impl AuditRing {
    pub(super) fn new(limit: usize) -> AuditRing {
        AuditRing {
            limit: limit.max(1),
            ..Default::default()
        }
    }

    pub(super) fn push(&mut self, row: AuditRow) {
        while !self.rows.is_empty()
            && (self.rows.len() >= self.limit || self.bytes + row.bytes > PAGE_BYTES)
        {
            if let Some(old) = self.rows.pop_front() {
                self.bytes -= old.bytes;
                self.older += 1;
            }
        }
        self.bytes += row.bytes;
        self.rows.push_back(row);
    }

    pub(super) fn len(&self) -> usize {
        self.rows.len()
    }

    pub(super) fn rows(&self) -> Vec<AuditRow> {
        self.rows.iter().cloned().collect()
    }
}

/// An audit entry as read: `None` when it is not one, or names another machine than the
/// subject it came on.
pub(super) fn audit_row(
    store: &Store,
    subject: &str,
    payload: &[u8],
    seq: u64,
    stored_ms: u64,
) -> Option<AuditRow> {
    let machine = subject::audit_nkey(subject)?;
    let entry = AuditEntry::from_payload(payload).ok()?;
    if entry.nkey != machine {
        return None;
    }
    Some(AuditRow {
        machine: machine.to_owned(),
        host: store.hostname(machine),
        seq,
        stored_ms,
        entry,
        bytes: payload.len() + 128,
    })
}

/// What an audit subscription asks for, after the bounds.
pub(super) struct AuditQuery {
    pub machine: Option<String>,
    pub since: Duration,
    pub limit: usize,
}

/// A stream's reader from `since` ago, starting at its last `scan` messages at most: `None`
/// when the stream does not exist; the flag says whether older ones in the window were left
/// out.
async fn open(
    js: &async_nats::jetstream::Context,
    stream: &str,
    filter: &str,
    since: Duration,
    scan: u64,
) -> Result<Option<(History, u64, bool)>, String> {
    let open = async {
        let Some(tail) = streams::tail(js, stream).await? else {
            return Ok(None);
        };
        let after = tail.after(scan);
        let h = streams::history_after(js, stream, filter, since, after).await?;
        Ok(Some((h, tail.last_sequence, after > 0)))
    };
    match tokio::time::timeout(OPEN_TIMEOUT, open).await {
        Ok(r) => r.map_err(|e: streams::StreamError| e.to_string()),
        Err(_) => Err(format!("no answer from JetStream within {OPEN_TIMEOUT:?}")),
    }
}

fn info(stream: &'static str, since: Duration, limit: usize) -> HistoryInfo {
    HistoryInfo {
        stream,
        since_ms: since.as_millis() as u64,
        limit,
        ..Default::default()
    }
}

fn unavailable(mut info: HistoryInfo, error: Option<String>) -> HistoryInfo {
    info.error = Some(error.unwrap_or_else(|| {
        format!(
            "stream {} not found (cbus streams init{}): live only",
            info.stream,
            if info.stream == SIGNAL_STREAM {
                " --signals"
            } else {
                ""
            }
        )
    }));
    info
}

/// Queues an event once the client's byte budget has room for it; false when the session is
/// gone.
async fn send(sink: &SignalSink, data: EventData, dropped: u64, cost: u32) -> bool {
    let cost = cost.min(sink.budget);
    let Ok(permit) = sink.bytes.clone().acquire_many_owned(cost).await else {
        return false;
    };
    sink.tx
        .send(SignalEvent::new(sink.sub, data, dropped, permit))
        .await
        .is_ok()
}

/// One audit subscription: a page of the newest entries, then each new one as it is stored.
pub(super) async fn forward_audit(
    client: async_nats::Client,
    store: Store,
    q: AuditQuery,
    sink: SignalSink,
    ready: oneshot::Sender<Ready>,
) {
    let filter = match &q.machine {
        Some(n) => subject::audit(n),
        None => subject::AUDIT_ALL.to_owned(),
    };
    let mut about = info(AUDIT_STREAM, q.since, q.limit);
    let js = streams::context(client.clone(), None);
    let (mut h, truncated) = match open(&js, AUDIT_STREAM, &filter, q.since, AUDIT_SCAN).await {
        Ok(Some((h, _, truncated))) => (h, truncated),
        Ok(None) => {
            return audit_live(client, store, filter, sink, ready, unavailable(about, None)).await
        }
        Err(e) => {
            return audit_live(
                client,
                store,
                filter,
                sink,
                ready,
                unavailable(about, Some(e)),
            )
            .await
        }
    };
    about.available = true;
    about.truncated = truncated;
    let mut page = AuditRing::new(q.limit);
    let deadline = tokio::time::Instant::now() + PAGE_DEADLINE;
    let mut read = 0u64;
    while read < h.pending_at_start {
        let stored = match tokio::time::timeout_at(deadline, h.next()).await {
            Ok(Some(Ok(s))) => s,
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e, "reading the audit stream");
                continue;
            }
            Ok(None) | Err(_) => break,
        };
        read += 1;
        match stored_row(&store, &stored) {
            Some(row) => page.push(row),
            None => about.dropped += 1,
        }
    }
    about.older = page.older;
    about.replayed = page.len() as u64;
    let _ = ready.send(Ready {
        history: Some(about),
        page: page.rows(),
    });
    drop(page);
    // Then whatever is stored next (and what the page had no time for), in order.
    while let Some(next) = h.next().await {
        let stored = match next {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "reading the audit stream");
                continue;
            }
        };
        let Some(row) = stored_row(&store, &stored) else {
            continue;
        };
        let cost = row.bytes as u32;
        if !send(&sink, EventData::Audit(Box::new(row)), 0, cost).await {
            break;
        }
    }
}

fn stored_row(store: &Store, s: &Stored) -> Option<AuditRow> {
    let row = audit_row(
        store,
        &s.message.subject,
        &s.message.payload,
        s.sequence,
        s.published_ms,
    );
    if row.is_none() {
        stats::dropped(Dropped::AuditRefused);
    }
    row
}

/// An audit subscription without the stream: entries as agents publish them, from now on.
async fn audit_live(
    client: async_nats::Client,
    store: Store,
    filter: String,
    sink: SignalSink,
    ready: oneshot::Sender<Ready>,
    about: HistoryInfo,
) {
    let mut sub = match client.subscribe(filter).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot subscribe to audit entries");
            None
        }
    };
    let _ = tokio::time::timeout(SUBSCRIBE_TIMEOUT, client.flush()).await;
    let _ = ready.send(Ready {
        history: Some(about),
        page: Vec::new(),
    });
    let Some(sub) = sub.as_mut() else { return };
    let mut dropped = 0u64;
    while let Some(msg) = sub.next().await {
        if msg.payload.len() > MAX_ENTRY_BYTES {
            stats::dropped(Dropped::AuditRefused);
            continue;
        }
        let Some(row) = audit_row(&store, &msg.subject, &msg.payload, 0, now_ms()) else {
            stats::dropped(Dropped::AuditRefused);
            continue;
        };
        // Live messages cannot wait: what does not fit is dropped and the client resyncs.
        let Ok(permit) = sink.bytes.clone().try_acquire_many_owned(row.bytes as u32) else {
            stats::dropped(Dropped::ClientSignal);
            dropped += 1;
            continue;
        };
        let event = SignalEvent::new(sink.sub, EventData::Audit(Box::new(row)), dropped, permit);
        match sink.tx.try_send(event) {
            Ok(()) => dropped = 0,
            Err(TrySendError::Full(_)) => {
                stats::dropped(Dropped::ClientSignal);
                dropped += 1;
            }
            Err(TrySendError::Closed(_)) => break,
        }
    }
}

/// What a signals subscription with `since_ms` asks for, after the bounds.
pub(super) struct SignalHistory {
    /// The one filter subject of the stream's reader (nats-server 2.9 takes one).
    pub filter: String,
    /// The live subjects, when there is no stream.
    pub subjects: Vec<String>,
    pub since: Duration,
    pub limit: usize,
}

/// A signals subscription that starts in the recent past: at most `limit` of the stream's last
/// signals stored within `since`, then live ones from the same reader.
pub(super) async fn forward_signal_history(
    client: async_nats::Client,
    store: Store,
    q: SignalHistory,
    m: SignalMatch,
    sink: SignalSink,
    ready: oneshot::Sender<Ready>,
) {
    let mut about = info(SIGNAL_STREAM, q.since, q.limit);
    let js = streams::context(client.clone(), None);
    let (mut h, seam, truncated) =
        match open(&js, SIGNAL_STREAM, &q.filter, q.since, q.limit as u64).await {
            Ok(Some(opened)) => opened,
            Ok(None) => {
                let say = Ready {
                    history: Some(unavailable(about, None)),
                    page: Vec::new(),
                };
                return forward_signals(client, store, q.subjects, m, sink, ready, say).await;
            }
            Err(e) => {
                let say = Ready {
                    history: Some(unavailable(about, Some(e))),
                    page: Vec::new(),
                };
                return forward_signals(client, store, q.subjects, m, sink, ready, say).await;
            }
        };
    about.available = true;
    about.truncated = truncated;
    about.replayed = h.pending_at_start.min(q.limit as u64);
    let _ = ready.send(Ready {
        history: Some(about),
        page: Vec::new(),
    });
    let mut replay_bytes = 0usize;
    let mut dropped = 0u64;
    while let Some(next) = h.next().await {
        let stored = match next {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "reading the signal stream");
                continue;
            }
        };
        let Some(mut data) = signal_data(&store, &stored.message, &m) else {
            continue;
        };
        // The seam: what the stream held when the reader was made is the replay.
        data.replayed = stored.sequence <= seam;
        data.received_ms = stored.published_ms;
        data.stored_ms = Some(stored.published_ms);
        let cost = signal_cost(stored.message.payload.len());
        if data.replayed {
            replay_bytes += cost as usize;
            if replay_bytes > REPLAY_BYTES {
                stats::dropped(Dropped::ClientSignal);
                dropped += 1;
                continue;
            }
        }
        if !send(&sink, EventData::Signal(Box::new(data)), dropped, cost).await {
            break;
        }
        dropped = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cbus_protocol::audit::PolicyVerdict;
    use cbus_protocol::subject::Op;

    fn row(n: u64, bytes: usize) -> AuditRow {
        AuditRow {
            machine: "U".into(),
            host: None,
            seq: n,
            stored_ms: n,
            entry: AuditEntry {
                time_ms: n,
                nkey: "U".into(),
                hostname: "h".into(),
                requester: None,
                reply_to: None,
                broadcast: false,
                op: Op::Call,
                destination: "org.x".into(),
                path: "/".into(),
                interface: None,
                member: "M".into(),
                args_bytes: None,
                args_sha256: None,
                policy: PolicyVerdict::Denied,
                result: "access-denied".into(),
            },
            bytes,
        }
    }

    #[test]
    fn entries_are_taken_only_from_their_own_machine() {
        let store = Store::new(
            crate::model::UnitFilter::new("", "").unwrap(),
            crate::changes::Router::default(),
        );
        let a = "UBQUIKYGFC7CH5XMF52P2NN4ESI4XTXGAKT3WTG3XGU3352DMHGZQAX7";
        let mut e = row(1, 0).entry;
        e.nkey = a.into();
        let ok = audit_row(&store, &subject::audit(a), &e.to_payload(), 5, 6).unwrap();
        assert_eq!((ok.machine.as_str(), ok.seq, ok.stored_ms), (a, 5, 6));
        // The body names another machine than the subject: refused.
        e.nkey = "U".into();
        assert!(audit_row(&store, &subject::audit(a), &e.to_payload(), 5, 6).is_none());
        // Not an audit subject, not an entry, too big.
        assert!(audit_row(&store, "dbus.audit.x", &row(1, 0).entry.to_payload(), 1, 1).is_none());
        assert!(audit_row(&store, &subject::audit(a), b"{}", 1, 1).is_none());
        let big = vec![b' '; MAX_ENTRY_BYTES + 1];
        assert!(audit_row(&store, &subject::audit(a), &big, 1, 1).is_none());
    }

    #[test]
    fn the_ring_keeps_the_newest_within_count_and_bytes() {
        let mut r = AuditRing::new(3);
        for n in 1..=5 {
            r.push(row(n, 100));
        }
        assert_eq!(
            r.rows().iter().map(|r| r.seq).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        assert_eq!(r.older, 2);
        let mut r = AuditRing::new(100);
        for n in 1..=4 {
            r.push(row(n, PAGE_BYTES / 3));
        }
        assert_eq!(r.len(), 3, "a page stays under PAGE_BYTES");
        assert_eq!(r.rows()[0].seq, 2);
        // One row larger than the page is still kept, alone.
        r.push(row(9, PAGE_BYTES * 2));
        assert_eq!(r.rows().iter().map(|r| r.seq).collect::<Vec<_>>(), [9]);
    }
}
