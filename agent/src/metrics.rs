//! The agent's own metrics, published as Prometheus text on `dbus.metrics.<nkey>` so that the
//! gateway can serve them for every host from one scrape.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Why a signal did not reach NATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The queue held `--signal-queue` signals.
    QueueFull = 0,
    /// The queue held `--signal-queue-bytes` bytes.
    QueueBytes = 1,
    /// Larger than the NATS server's `max_payload`: it could never be published.
    TooLarge = 2,
}

impl DropReason {
    pub const ALL: [DropReason; 3] = [
        DropReason::QueueFull,
        DropReason::QueueBytes,
        DropReason::TooLarge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::QueueBytes => "queue_bytes",
            DropReason::TooLarge => "too_large",
        }
    }
}

/// Counters and gauges the other modules update.
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub call_seconds: HistogramVec,
    pub signals_forwarded: IntCounter,
    /// Every signal dropped, whatever the reason (the sum of `signals_dropped_by_reason`).
    pub signals_dropped: IntCounter,
    pub signals_dropped_by_reason: IntCounterVec,
    pub signals_unencodable: IntCounter,
    pub nats_connected: IntGauge,
    pub bus_connected: IntGauge,
    /// Audit entries published on `dbus.audit.<nkey>` ([`crate::audit`]).
    pub audit_published: IntCounter,
    /// Audit entries dropped: the publishing queue was full, or the publish failed.
    pub audit_dropped: IntCounter,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "cbus_agent_requests_total",
                "Requests served, by op and outcome.",
            ),
            &["op", "outcome"],
        )?;
        let call_seconds = HistogramVec::new(
            HistogramOpts::new(
                "cbus_agent_dbus_call_seconds",
                "Time to answer a request on D-Bus, waiting for a call slot included.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
            ]),
            &["op"],
        )?;
        let signals_forwarded = IntCounter::new(
            "cbus_agent_signals_forwarded_total",
            "Signals published to NATS.",
        )?;
        let signals_dropped = IntCounter::new(
            "cbus_agent_signals_dropped_total",
            "Signals dropped before reaching NATS, for any reason.",
        )?;
        let signals_dropped_by_reason = IntCounterVec::new(
            Opts::new(
                "cbus_agent_signals_dropped_by_reason_total",
                "Signals dropped before reaching NATS: queue_full (count bound), queue_bytes \
                 (byte bound), too_large (can never fit the server's max_payload).",
            ),
            &["reason"],
        )?;
        for r in DropReason::ALL {
            signals_dropped_by_reason.with_label_values(&[r.as_str()]);
        }
        let signals_unencodable = IntCounter::new(
            "cbus_agent_signals_unencodable_total",
            "Signals that could not be encoded (e.g. carrying file descriptors).",
        )?;
        let nats_connected =
            IntGauge::new("cbus_agent_nats_connected", "1 when connected to NATS.")?;
        let bus_connected =
            IntGauge::new("cbus_agent_bus_connected", "1 when connected to D-Bus.")?;
        let audit_published = IntCounter::new(
            "cbus_agent_audit_published_total",
            "Audit entries (remote sets and calls) published on the agent's audit subject.",
        )?;
        let audit_dropped = IntCounter::new(
            "cbus_agent_audit_dropped_total",
            "Audit entries dropped before reaching NATS (queue full or publish failed); the \
             agent's audit log line is written regardless.",
        )?;
        registry.register(Box::new(audit_published.clone()))?;
        registry.register(Box::new(audit_dropped.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(call_seconds.clone()))?;
        registry.register(Box::new(signals_forwarded.clone()))?;
        registry.register(Box::new(signals_dropped.clone()))?;
        registry.register(Box::new(signals_dropped_by_reason.clone()))?;
        registry.register(Box::new(signals_unencodable.clone()))?;
        registry.register(Box::new(nats_connected.clone()))?;
        registry.register(Box::new(bus_connected.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            call_seconds,
            signals_forwarded,
            signals_dropped,
            signals_dropped_by_reason,
            signals_unencodable,
            nats_connected,
            bus_connected,
            audit_published,
            audit_dropped,
        })
    }

    /// Counts one dropped signal; returns how many were dropped for this reason so far.
    pub fn signal_dropped(&self, reason: DropReason) -> u64 {
        self.signals_dropped.inc();
        let c = self
            .signals_dropped_by_reason
            .with_label_values(&[reason.as_str()]);
        c.inc();
        c.get()
    }

    /// Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// One line for logs: what a person checks first.
    pub fn summary(&self) -> String {
        format!(
            "nats={} bus={} signals forwarded={} dropped={}",
            if self.nats_connected.get() == 1 {
                "up"
            } else {
                "down"
            },
            if self.bus_connected.get() == 1 {
                "up"
            } else {
                "down"
            },
            self.signals_forwarded.get(),
            self.signals_dropped.get()
        )
    }
}

/// Serves `/metrics` and `/healthz` locally, for a node-local Prometheus or a health check.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: std::sync::Arc<Metrics>,
) -> std::io::Result<()> {
    use axum::routing::get;
    let m1 = metrics.clone();
    let app = axum::Router::new()
        .route("/metrics", get(move || async move { m1.render() }))
        .route(
            "/healthz",
            get(move || async move { format!("{}\n", metrics.summary()) }),
        );
    axum::serve(listener, app).await
}
