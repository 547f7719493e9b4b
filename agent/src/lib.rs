//! `cbus-agent`: one per host, bridging its D-Bus to NATS.
//!
//! Modules by concept: [`config`] (flags), [`connect`] (NATS), [`bus`] (D-Bus connections and
//! name owners), [`requests`] (the six ops), [`signals`] (monitor → bounded queue → NATS),
//! [`presence`] (hello, heartbeat, goodbye, ping), [`policy`] (what may be set or called),
//! [`metrics`] (the agent's own Prometheus metrics). Every subject, header and value comes from
//! `cbus-protocol`.

pub mod bus;
pub mod config;
pub mod connect;
pub mod metrics;
pub mod policy;
pub mod presence;
pub mod requests;
pub mod signals;

use std::sync::Arc;

use anyhow::Context as _;
use cbus_protocol::presence::{AgentInfo, PresenceKind};
use cbus_protocol::subject;

pub use config::Config;

/// Runs the agent until SIGTERM or SIGINT; then says goodbye and returns.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let keypair = match &config.nkey_seed_file {
        Some(path) => cbus_protocol::nkey::from_seed_file(path)?,
        None => cbus_protocol::nkey::from_ssh_host_key(&config.host_key)?,
    };
    let nkey = keypair.public_key();
    let seed = connect::nkeys_seed::Seed(keypair.seed().context("cannot export the nkey seed")?);
    let hostname = match &config.hostname {
        Some(h) => h.clone(),
        None => hostname::get()
            .context("cannot read the hostname; pass --hostname")?
            .to_string_lossy()
            .into_owned(),
    };
    let metrics = Arc::new(metrics::Metrics::new().context("metrics registry")?);
    let policy = match (&config.policy, config.allow_all) {
        (_, true) => policy::Policy::allow_all(),
        (Some(path), false) => policy::Policy::load(path)?,
        (None, false) => policy::Policy::read_only(),
    };
    let bus = bus::BusKind::parse(&config.bus);
    tracing::info!(%nkey, %hostname, bus = %config.bus, "starting cbus-agent {}", cbus_protocol::VERSION);

    if let Some(addr) = config.metrics_listen {
        // Bind now, so a taken port is a clear start-up error rather than a silent task failure.
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("cannot listen on {addr} (--metrics-listen)"))?;
        drop(listener);
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, m).await {
                tracing::error!(error = %e, %addr, "metrics endpoint stopped");
            }
        });
    }
    let client = connect::connect(&config, &seed, metrics.clone()).await?;

    let requests = Arc::new(requests::RequestServer::new(
        nkey.clone(),
        hostname.clone(),
        client.clone(),
        bus.clone(),
        policy,
        metrics.clone(),
        config.call_timeout,
        config.max_request_bytes,
        config.max_concurrent_calls,
    ));
    let serving = tokio::spawn({
        let r = requests.clone();
        async move {
            if let Err(e) = r.serve().await {
                tracing::error!(error = %e, "cannot subscribe to request subjects");
            }
        }
    });

    // Name owners: for the Sender-Name header, and to drop cached introspection.
    let owners = bus::NameOwners::default();
    tokio::spawn({
        let owners = owners.clone();
        let bus = bus.clone();
        let requests = requests.clone();
        let metrics = metrics.clone();
        async move {
            loop {
                let conn = bus.connect_with_backoff(false).await;
                metrics.bus_connected.set(1);
                if let Err(e) = owners.track(&conn, |name| requests.forget(name)).await {
                    tracing::warn!(error = %e, "name owner tracking failed");
                }
                metrics.bus_connected.set(0);
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    });

    if !config.no_signals {
        let (tx, rx) = tokio::sync::mpsc::channel(config.signal_queue.max(1));
        tokio::spawn(signals::read_loop(
            bus.clone(),
            config.signal_queue,
            tx,
            metrics.clone(),
        ));
        let filter = signals::Filter {
            include_sender: config.include_sender.clone(),
            exclude_sender: config.exclude_sender.clone(),
            include_interface: config.include_interface.clone(),
            exclude_interface: config.exclude_interface.clone(),
            include_path_prefix: config.include_path_prefix.clone(),
            exclude_path_prefix: config.exclude_path_prefix.clone(),
        };
        tokio::spawn(signals::publish_loop(
            rx,
            client.clone(),
            nkey.clone(),
            hostname.clone(),
            owners.clone(),
            filter,
            metrics.clone(),
        ));
    }

    let info = AgentInfo {
        nkey: nkey.clone(),
        hostname: hostname.clone(),
        version: cbus_protocol::VERSION.to_owned(),
        bus: config.bus.clone(),
        started_at_ms: cbus_protocol::presence::now_ms(),
        heartbeat_ms: config.heartbeat.as_millis() as u64,
        bus_connected: false,
        labels: config.labels.iter().cloned().collect(),
    };
    let presence = Arc::new(presence::Presence::new(client.clone(), info));
    tokio::spawn(presence.clone().answer_pings());
    presence
        .announce(PresenceKind::Hello, metrics.bus_connected.get() == 1)
        .await;

    let mut heartbeat = tokio::time::interval(config.heartbeat);
    heartbeat.tick().await;
    let mut metrics_tick = tokio::time::interval(config.metrics_interval);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch SIGTERM")?;
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                presence.announce(PresenceKind::Heartbeat, metrics.bus_connected.get() == 1).await;
            }
            _ = metrics_tick.tick() => {
                tracing::debug!(summary = %metrics.summary(), "health");
                if let Err(e) = client.publish(subject::metrics(&nkey), metrics.render().into()).await {
                    tracing::debug!(error = %e, "cannot publish metrics");
                }
            }
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!("shutting down; saying goodbye");
    serving.abort();
    presence
        .announce(PresenceKind::Goodbye, metrics.bus_connected.get() == 1)
        .await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), client.flush()).await;
    Ok(())
}
