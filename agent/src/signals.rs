//! Forwarding D-Bus signals to NATS.
//!
//! One monitor connection sees every signal on the bus (BecomeMonitor, allowed to root on the
//! system bus); without that privilege one broad match rule `type='signal'` is used. Never one
//! rule per object: buses cap match rules. The reader only moves messages into a bounded queue;
//! when NATS cannot keep up, signals are dropped and counted rather than blocking the bus or
//! growing memory.

use std::sync::Arc;

use async_nats::{Client, HeaderMap};
use cbus_protocol::codec;
use cbus_protocol::headers;
use cbus_protocol::subject::SignalSubject;
use futures::StreamExt;
use tokio::sync::mpsc;
use zbus::{MatchRule, Message, MessageStream};

use crate::bus::{BusKind, NameOwners};
use crate::metrics::Metrics;

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
    fn allows(&self, sender: &str, well_known: Option<&str>, iface: &str, path: &str) -> bool {
        let sender_is = |list: &[String]| {
            list.iter()
                .any(|s| s == sender || Some(s.as_str()) == well_known)
        };
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

/// Reads signals from the bus (reconnecting when it goes away) into a queue of `capacity`.
/// Filters apply here, before the queue, so excluded noise can never crowd out wanted signals.
pub async fn read_loop(
    bus: BusKind,
    capacity: usize,
    queue: mpsc::Sender<Message>,
    owners: NameOwners,
    filter: Filter,
    metrics: Arc<Metrics>,
) {
    let mut dropped_logged = 0u64;
    loop {
        let conn = bus.connect_with_backoff(true).await;
        let mut stream = match monitor_stream(&conn, capacity).await {
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
            if queue.try_send(msg).is_err() {
                metrics.signals_dropped.inc();
                let dropped = metrics.signals_dropped.get();
                // Log at powers of two: visible, but never a log flood.
                if dropped >= dropped_logged * 2 || dropped == 1 {
                    tracing::warn!(dropped, "signal queue full; dropping signals");
                    dropped_logged = dropped;
                }
            }
        }
        tracing::warn!("D-Bus signal stream ended; reconnecting");
    }
}

async fn monitor_stream(conn: &zbus::Connection, capacity: usize) -> zbus::Result<MessageStream> {
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
            MessageStream::for_match_rule(rule, conn, Some(capacity)).await
        }
    }
}

/// Publishes queued signals to NATS.
pub async fn publish_loop(
    mut queue: mpsc::Receiver<Message>,
    client: Client,
    nkey: String,
    hostname: String,
    owners: NameOwners,
    metrics: Arc<Metrics>,
) {
    while let Some(msg) = queue.recv().await {
        match encode(&msg, &nkey, &hostname, &owners) {
            Ok(Some((subject, headers, payload))) => {
                match client
                    .publish_with_headers(subject, headers, payload.into())
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
        well_known.as_deref(),
        iface.as_ref().map(|i| i.as_str()).unwrap_or_default(),
        path.as_str(),
    )
}

type Encoded = (String, HeaderMap, Vec<u8>);

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
    let mut h = HeaderMap::new();
    headers::set(&mut h, headers::NKEY, nkey);
    headers::set(&mut h, headers::HOSTNAME, hostname);
    headers::set(&mut h, headers::SENDER, &sender);
    if let Some(name) = &well_known {
        headers::set(&mut h, headers::SENDER_NAME, name);
    }
    headers::set(&mut h, headers::PATH, path.as_str());
    headers::set(&mut h, headers::INTERFACE, &iface);
    headers::set(&mut h, headers::MEMBER, &member);
    headers::set(&mut h, headers::SIGNATURE, &signature);
    let payload = serde_json::to_vec(&args).map_err(|e| e.to_string())?;
    Ok(Some((subject, h, payload)))
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
        assert!(f.allows(":1.1", None, props, "/org/freedesktop/systemd1/unit/a"));
        assert!(!f.allows(":1.1", None, "x.Y", "/a"));
        assert!(!f.allows(
            ":1.1",
            None,
            props,
            "/org/freedesktop/systemd1/unit/dev_2dsda"
        ));
        assert!(!f.allows(":1.9", Some("org.noisy"), props, "/a"));
        assert!(Filter::default().allows(":1.1", None, "x.Y", "/"));
    }
}
