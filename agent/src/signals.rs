//! Forwarding D-Bus signals to NATS.
//!
//! One monitor connection sees every signal on the bus (BecomeMonitor, allowed to root on the
//! system bus); without that privilege one broad match rule `type='signal'` is used. Never one
//! rule per object: buses cap match rules. The reader only moves messages into a queue bounded in
//! count and in bytes; when NATS cannot keep up, signals are dropped and counted (by reason)
//! rather than blocking the bus or growing memory.
//!
//! Any local user may emit signals of tens of MiB on the system bus, and a signal larger than the
//! NATS server's `max_payload` can never be published: such a signal is dropped before it is
//! queued or decoded, from its wire size alone (see [`never_fits`]). zbus's own queue on the
//! monitor connection counts messages, so it is kept short ([`crate::bus::MONITOR_QUEUE`]) and
//! the reader drains it without decoding anything.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_nats::{Client, HeaderMap};
use cbus_client::headers;
use cbus_protocol::codec;
use cbus_protocol::subject::SignalSubject;
use futures::StreamExt;
use tokio::sync::mpsc;
use zbus::{MatchRule, Message, MessageStream};

use crate::bus::{BusKind, NameOwners};
use crate::metrics::{DropReason, Metrics};

/// Include/exclude filters; empty include lists match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub include_sender: Vec<String>,
    pub exclude_sender: Vec<String>,
    pub include_interface: Vec<String>,
    pub exclude_interface: Vec<String>,
    pub include_path_prefix: Vec<String>,
    pub exclude_path_prefix: Vec<String>,
}

impl Filter {
    fn allows(&self, sender: &str, well_known: &[String], iface: &str, path: &str) -> bool {
        let sender_is =
            |list: &[String]| list.iter().any(|s| s == sender || well_known.contains(s));
        let prefix = |list: &[String]| list.iter().any(|p| path.starts_with(p.as_str()));
        (self.include_sender.is_empty() || sender_is(&self.include_sender))
            && !sender_is(&self.exclude_sender)
            && (self.include_interface.is_empty()
                || self.include_interface.iter().any(|i| i == iface))
            && !self.exclude_interface.iter().any(|i| i == iface)
            && (self.include_path_prefix.is_empty() || prefix(&self.include_path_prefix))
            && !prefix(&self.exclude_path_prefix)
    }
}

/// NATS's default `max_payload`, used until the server has told its own.
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// The queue between the bus reader and the NATS publisher: bounded in count by the channel and
/// in bytes (of the raw D-Bus messages it holds) by `bytes`.
#[derive(Clone)]
pub struct Queue {
    pub tx: mpsc::Sender<Message>,
    pub bytes: Arc<AtomicUsize>,
    pub max_bytes: usize,
}

impl Queue {
    pub fn new(count: usize, max_bytes: usize) -> (Queue, mpsc::Receiver<Message>) {
        let (tx, rx) = mpsc::channel(count.max(1));
        let q = Queue {
            tx,
            bytes: Arc::new(AtomicUsize::new(0)),
            max_bytes: max_bytes.max(1),
        };
        (q, rx)
    }

    /// Queues `msg`, or says why not.
    fn push(&self, msg: Message) -> Result<(), DropReason> {
        let size = msg.data().len();
        let before = self.bytes.fetch_add(size, Ordering::AcqRel);
        if before + size > self.max_bytes {
            self.bytes.fetch_sub(size, Ordering::AcqRel);
            return Err(DropReason::QueueBytes);
        }
        self.tx.try_send(msg).map_err(|_| {
            self.bytes.fetch_sub(size, Ordering::AcqRel);
            DropReason::QueueFull
        })
    }
}

/// The server's `max_payload` (headers and body of one message), read again every second:
/// `server_info()` clones the whole server info, too much to do per signal, and the value only
/// changes when the client reconnects to another server.
struct PayloadLimit {
    client: Client,
    value: usize,
    read_at: std::time::Instant,
}

impl PayloadLimit {
    fn new(client: Client) -> Self {
        let mut l = PayloadLimit {
            client,
            value: DEFAULT_MAX_PAYLOAD,
            read_at: std::time::Instant::now(),
        };
        l.refresh();
        l
    }

    fn refresh(&mut self) {
        self.value = match self.client.server_info().max_payload {
            0 => DEFAULT_MAX_PAYLOAD,
            n => n,
        };
        self.read_at = std::time::Instant::now();
    }

    fn get(&mut self) -> usize {
        if self.read_at.elapsed() > std::time::Duration::from_secs(1) {
            self.refresh();
        }
        self.value
    }
}

/// Whether a D-Bus message of `wire_len` bytes can never be published within `max_payload`.
///
/// The JSON of a body is never shorter than a quarter of its wire form (the densest case is
/// padding: an empty array inside an array is 8 wire bytes and `[],` 3 bytes of JSON), so a
/// message over 4 × `max_payload` cannot fit, and is dropped without being decoded. What passes
/// is checked again, exactly, once encoded.
pub fn never_fits(wire_len: usize, max_payload: usize) -> bool {
    wire_len / 4 > max_payload
}

/// Reads signals from the bus (reconnecting when it goes away) into `queue`. Filters and the
/// size check apply here, before the queue, so excluded noise and signals that can never be
/// sent can never crowd out wanted ones.
pub async fn read_loop(
    bus: BusKind,
    queue: Queue,
    client: Client,
    owners: NameOwners,
    filter: Filter,
    metrics: Arc<Metrics>,
) {
    let mut logged = [0u64; DropReason::ALL.len()];
    let mut max_payload = PayloadLimit::new(client);
    loop {
        let conn = bus.connect_with_backoff(true).await;
        let mut stream = match monitor_stream(&conn).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch signals; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(item) = stream.next().await {
            let Ok(msg) = item else { continue };
            if msg.message_type() != zbus::message::Type::Signal || !wanted(&msg, &owners, &filter)
            {
                continue;
            }
            let result = if never_fits(msg.data().len(), max_payload.get()) {
                Err(DropReason::TooLarge)
            } else {
                queue.push(msg)
            };
            if let Err(reason) = result {
                let dropped = metrics.signal_dropped(reason);
                let last = &mut logged[reason as usize];
                // Log at powers of two: visible, but never a log flood.
                if dropped == 1 || dropped >= *last * 2 {
                    tracing::warn!(dropped, reason = reason.as_str(), "dropping signals");
                    *last = dropped;
                }
            }
        }
        tracing::warn!("D-Bus signal stream ended; reconnecting");
    }
}

async fn monitor_stream(conn: &zbus::Connection) -> zbus::Result<MessageStream> {
    let rule = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .build();
    let monitor = zbus::fdo::MonitoringProxy::new(conn).await?;
    match monitor.become_monitor(std::slice::from_ref(&rule), 0).await {
        Ok(()) => {
            tracing::info!("watching signals as a bus monitor");
            Ok(MessageStream::from(conn))
        }
        Err(e) => {
            tracing::info!(error = %e, "BecomeMonitor refused; using a match rule");
            MessageStream::for_match_rule(rule, conn, Some(crate::bus::MONITOR_QUEUE)).await
        }
    }
}

/// Publishes queued signals to NATS.
pub async fn publish_loop(
    mut rx: mpsc::Receiver<Message>,
    queued_bytes: Arc<AtomicUsize>,
    client: Client,
    nkey: String,
    hostname: String,
    owners: NameOwners,
    metrics: Arc<Metrics>,
) {
    let mut max_payload = PayloadLimit::new(client.clone());
    while let Some(msg) = rx.recv().await {
        queued_bytes.fetch_sub(msg.data().len(), Ordering::AcqRel);
        match encode(&msg, &nkey, &hostname, &owners) {
            Ok(Some(e)) if e.size > max_payload.get() => {
                metrics.signal_dropped(DropReason::TooLarge);
                tracing::debug!(size = e.size, "signal larger than NATS max_payload dropped");
            }
            Ok(Some(e)) => {
                match client
                    .publish_with_headers(e.subject, e.headers, e.payload.into())
                    .await
                {
                    Ok(()) => metrics.signals_forwarded.inc(),
                    Err(e) => tracing::debug!(error = %e, "cannot publish signal"),
                }
            }
            Ok(None) => {}
            Err(e) => {
                metrics.signals_unencodable.inc();
                tracing::debug!(error = %e, "signal not forwarded");
            }
        }
    }
}

/// Whether a signal is a broadcast that the filters let through.
fn wanted(msg: &Message, owners: &NameOwners, filter: &Filter) -> bool {
    let header = msg.header();
    // A signal addressed to one connection (NameAcquired to our monitor) is not a broadcast.
    if header.destination().is_some() {
        return false;
    }
    let (Some(sender), Some(path)) = (header.sender(), header.path()) else {
        return false;
    };
    let iface = header.interface();
    let well_known = owners.well_known(sender.as_str());
    filter.allows(
        sender.as_str(),
        &well_known,
        iface.as_ref().map(|i| i.as_str()).unwrap_or_default(),
        path.as_str(),
    )
}

/// A signal ready to publish; `size` is what counts against `max_payload` (headers and body).
struct Encoded {
    subject: String,
    headers: HeaderMap,
    payload: Vec<u8>,
    size: usize,
}

fn encode(
    msg: &Message,
    nkey: &str,
    hostname: &str,
    owners: &NameOwners,
) -> Result<Option<Encoded>, String> {
    let header = msg.header();
    let (Some(sender), Some(path)) = (header.sender(), header.path()) else {
        return Ok(None);
    };
    let sender = sender.to_string();
    let iface = header
        .interface()
        .map(|i| i.to_string())
        .unwrap_or_default();
    let member = header.member().map(|m| m.to_string()).unwrap_or_default();
    let well_known = owners.well_known(&sender);
    let subject = SignalSubject::new(nkey, sender.as_str(), path.as_str())
        .and_then(|s| s.encode())
        .map_err(|e| e.to_string())?;
    let (signature, values) = crate::body::arguments(msg).map_err(|e| e.to_string())?;
    let args = codec::args_to_json(&values).map_err(|e| e.to_string())?;
    let names = headers::sender_names_value(well_known.iter().map(String::as_str));
    let mut fields = vec![
        (headers::NKEY, nkey),
        (headers::HOSTNAME, hostname),
        (headers::SENDER, &sender),
        (headers::PATH, path.as_str()),
        (headers::INTERFACE, &iface),
        (headers::MEMBER, &member),
        (headers::SIGNATURE, &signature),
    ];
    if !names.is_empty() {
        fields.push((headers::SENDER_NAME, &names));
    }
    let mut h = HeaderMap::new();
    // "NATS/1.0\r\n" ... "\r\n", and "Name: value\r\n" per header.
    let mut size = 12;
    for (name, value) in fields {
        headers::set(&mut h, name, value);
        size += name.len() + value.len() + 4;
    }
    let payload = serde_json::to_vec(&args).map_err(|e| e.to_string())?;
    size += payload.len();
    Ok(Some(Encoded {
        subject,
        headers: h,
        payload,
        size,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        let f = Filter {
            include_interface: vec!["org.freedesktop.DBus.Properties".into()],
            exclude_path_prefix: vec!["/org/freedesktop/systemd1/unit/dev".into()],
            exclude_sender: vec!["org.noisy".into()],
            ..Default::default()
        };
        let props = "org.freedesktop.DBus.Properties";
        assert!(f.allows(":1.1", &[], props, "/org/freedesktop/systemd1/unit/a"));
        assert!(!f.allows(":1.1", &[], "x.Y", "/a"));
        assert!(!f.allows(
            ":1.1",
            &[],
            props,
            "/org/freedesktop/systemd1/unit/dev_2dsda"
        ));
        let noisy = ["org.a".to_owned(), "org.noisy".to_owned()];
        assert!(!f.allows(":1.9", &noisy, props, "/a"));
        assert!(Filter::default().allows(":1.1", &[], "x.Y", "/"));
    }

    #[test]
    fn queue_is_bounded_in_count_and_bytes() {
        let signal = |len: usize| {
            Message::signal("/a", "a.B", "C")
                .unwrap()
                .build(&("x".repeat(len),))
                .unwrap()
        };
        let one = signal(1000).data().len();
        let (q, mut rx) = Queue::new(3, 2 * one + one / 2);
        assert!(q.push(signal(1000)).is_ok());
        assert!(q.push(signal(1000)).is_ok());
        assert_eq!(q.push(signal(1000)), Err(DropReason::QueueBytes));
        assert!(q.push(signal(10)).is_ok());
        assert_eq!(q.push(signal(10)), Err(DropReason::QueueFull));
        // Refused pushes leave the byte count as it was.
        let small = signal(10).data().len();
        assert_eq!(q.bytes.load(Ordering::Acquire), 2 * one + small);
        drop(rx.try_recv());
    }

    #[test]
    fn what_never_fits() {
        let max = 1024 * 1024;
        assert!(!never_fits(max, max));
        assert!(!never_fits(4 * max, max));
        assert!(never_fits(20 * max, max));
    }
}
