//! The audit trail on NATS: every remote set and call, allowed or denied, becomes an
//! [`AuditEntry`] published on the agent's own subject `dbus.audit.<nkey>` (which the server's
//! permissions let no other machine publish on), where the audit stream keeps it
//! (`cbus streams init`, `cbus audit`).
//!
//! Publishing is bounded: entries wait in a queue of [`QUEUE`] entries for one publishing task;
//! when NATS is slow or away and the queue is full, new entries are dropped and counted
//! (`cbus_agent_audit_dropped_total`), so a flood of denied calls costs the agent a bounded
//! amount of memory. The same entries are also logged on the tracing target
//! `cbus_agent::audit` (the requests module), which is never dropped.

use std::sync::Arc;

use cbus_protocol::audit::AuditEntry;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// Entries waiting to be published, at most (each well under 4 KiB: at most ~4 MiB).
pub const QUEUE: usize = 1024;

/// Where the request handlers put audit entries.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<AuditEntry>,
    metrics: Arc<Metrics>,
}

impl AuditLog {
    /// Starts the publishing task for the agent `nkey`.
    pub fn start(client: async_nats::Client, nkey: &str, metrics: Arc<Metrics>) -> AuditLog {
        let (log, rx) = AuditLog::queue(QUEUE, metrics.clone());
        tokio::spawn(publish_loop(
            rx,
            client,
            cbus_protocol::subject::audit(nkey),
            metrics,
        ));
        log
    }

    /// A log whose entries go to the returned receiver (for [`AuditLog::start`] and tests).
    pub fn queue(capacity: usize, metrics: Arc<Metrics>) -> (AuditLog, mpsc::Receiver<AuditEntry>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (AuditLog { tx, metrics }, rx)
    }

    /// Queues an entry for publishing; a full queue drops it and counts the drop.
    pub fn record(&self, entry: AuditEntry) {
        if self.tx.try_send(entry).is_err() {
            let dropped = self.metrics.audit_dropped.get();
            self.metrics.audit_dropped.inc();
            // Once, then every 1000th: a flood must not become a flood of log lines too.
            if dropped.is_multiple_of(1000) {
                tracing::warn!(
                    dropped = dropped + 1,
                    "audit entries dropped: the publishing queue is full (NATS slow or away); \
                     the audit log line is still written"
                );
            }
        }
    }
}

async fn publish_loop(
    mut rx: mpsc::Receiver<AuditEntry>,
    client: async_nats::Client,
    subject: String,
    metrics: Arc<Metrics>,
) {
    while let Some(entry) = rx.recv().await {
        // The client's own buffer is bounded: while NATS is away this waits, and the queue
        // above fills and drops.
        match client
            .publish(subject.clone(), entry.to_payload().into())
            .await
        {
            Ok(()) => metrics.audit_published.inc(),
            Err(e) => {
                metrics.audit_dropped.inc();
                tracing::debug!(error = %e, "cannot publish an audit entry");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u64) -> AuditEntry {
        let mut e = AuditEntry::from_payload(
            br#"{"time_ms":0,"nkey":"U","hostname":"h","broadcast":false,"op":"call",
                "destination":"org.a","path":"/","member":"M","policy":"denied",
                "result":"access-denied"}"#,
        )
        .unwrap();
        e.time_ms = i;
        e
    }

    /// A flood with nobody publishing: the queue holds its bound, the rest is counted.
    #[test]
    fn a_full_queue_drops_and_counts() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let (log, mut rx) = AuditLog::queue(8, metrics.clone());
        for i in 0..100 {
            log.record(entry(i));
        }
        assert_eq!(metrics.audit_dropped.get(), 92);
        let mut kept = Vec::new();
        while let Ok(e) = rx.try_recv() {
            kept.push(e.time_ms);
        }
        // The first eight are kept, in order.
        assert_eq!(kept, (0..8).collect::<Vec<_>>());
        assert!(metrics
            .render()
            .contains("cbus_agent_audit_dropped_total 92"));
    }
}
