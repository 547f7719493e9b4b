//! The agent's own metrics, published as Prometheus text on `dbus.metrics.<nkey>` so that the
//! gateway can serve them for every host from one scrape.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Counters and gauges the other modules update.
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub call_seconds: HistogramVec,
    pub signals_forwarded: IntCounter,
    pub signals_dropped: IntCounter,
    pub signals_unencodable: IntCounter,
    pub nats_connected: IntGauge,
    pub bus_connected: IntGauge,
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
            "Signals dropped because the queue to NATS was full.",
        )?;
        let signals_unencodable = IntCounter::new(
            "cbus_agent_signals_unencodable_total",
            "Signals that could not be encoded (e.g. carrying file descriptors).",
        )?;
        let nats_connected =
            IntGauge::new("cbus_agent_nats_connected", "1 when connected to NATS.")?;
        let bus_connected =
            IntGauge::new("cbus_agent_bus_connected", "1 when connected to D-Bus.")?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(call_seconds.clone()))?;
        registry.register(Box::new(signals_forwarded.clone()))?;
        registry.register(Box::new(signals_dropped.clone()))?;
        registry.register(Box::new(signals_unencodable.clone()))?;
        registry.register(Box::new(nats_connected.clone()))?;
        registry.register(Box::new(bus_connected.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            call_seconds,
            signals_forwarded,
            signals_dropped,
            signals_unencodable,
            nats_connected,
            bus_connected,
        })
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
