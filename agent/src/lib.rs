//! `cbus-agent`: one per host, bridging its D-Bus to NATS.
//!
//! Modules by concept: [`audit`] (the audit trail published on NATS), [`config`] (flags and environment), [`identity`] (nkey from the host key),
//! [`nats`] (NATS connection), [`bus`] (D-Bus connections and name owners), [`requests`] (the
//! six ops), [`schema_cache`] (introspection kept for typing), [`body`] (message bodies with
//! their exact signature), [`signals`] (monitor → bounded queue → NATS), [`presence`] (hello,
//! heartbeat, goodbye, ping), [`policy`] (what may be set or called), [`metrics`] (the agent's own
//! Prometheus metrics). Every subject, header and value comes from `cbus-protocol`: the agent
//! never spells a subject or encodes a value by hand.
//!
//! The agent runs as root and everything it reads is hostile: any local user may put signals of
//! any size and content on the bus, and any NATS client allowed to send requests may send any
//! bytes. So signals are bounded in count and bytes and what can never be published is dropped
//! unread ([`signals`]); reads never start services or load units and sets and calls pass the
//! policy's allow and deny rules, with an audit line each ([`requests`], [`policy`]); error
//! replies quote bad input by a bounded prefix (`cbus_protocol::codec::quote`).

pub mod audit;
pub mod body;
pub mod bus;
pub mod config;
pub mod identity;
pub mod metrics;
pub mod nats;
pub mod policy;
pub mod presence;
pub mod requests;
pub mod schema_cache;
pub mod signals;

use std::sync::Arc;
use std::time::Duration;

use cbus_protocol::presence::{AgentInfo, PresenceKind};
use cbus_protocol::subject;

pub use config::Config;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot listen on {addr} (--metrics-listen): {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Nats(#[from] nats::ConnectError),
    #[error("cannot watch for SIGTERM: {0}")]
    Signal(std::io::Error),
}

/// Runs the agent until SIGTERM or SIGINT; then says goodbye and returns.
pub async fn run(config: Config) -> Result<(), Error> {
    // Installed first: a SIGTERM during start-up still ends in a goodbye.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(Error::Signal)?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(Error::Signal)?;
    let id = identity::Identity::load(
        &config.host_key,
        config.nkey_seed_file.as_deref(),
        config.hostname.as_deref(),
    )?;
    let me = requests::Identity {
        nkey: id.nkey.clone(),
        hostname: id.hostname.clone(),
    };
    let metrics = Arc::new(metrics::Metrics::new()?);
    let policy = match (&config.policy, config.allow_all) {
        (_, true) => policy::Policy::allow_all(),
        (Some(path), false) => policy::Policy::load(path)?,
        (None, false) => policy::Policy::read_only(),
    };
    let bus = bus::BusKind::parse(&config.bus);
    let link = bus::BusLink::new(metrics.bus_connected.clone());
    tracing::info!(nkey = %me.nkey, hostname = %me.hostname, bus = %config.bus, "starting cbus-agent {}", cbus_protocol::VERSION);

    if let Some(addr) = config.metrics_listen {
        serve_metrics(addr, metrics.clone()).await?;
    }
    let client = nats::connect(&config, &id, metrics.clone()).await?;

    let requests = Arc::new(requests::RequestServer::new(
        me.clone(),
        client.clone(),
        bus.clone(),
        policy,
        metrics.clone(),
        audit::AuditLog::start(client.clone(), &me.nkey, metrics.clone()),
        requests::Limits {
            call_timeout: config.call_timeout,
            max_request_bytes: config.max_request_bytes,
            max_concurrent_calls: config.max_concurrent_calls,
        },
    ));
    // Subscribed before the hello (sent later on this connection): an agent anyone can see in
    // the registry can be asked at once.
    let serving = match requests.subscribe().await {
        Ok(subs) => tokio::spawn(requests.clone().serve(subs)),
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe to request subjects");
            tokio::spawn(async {})
        }
    };

    // Name owners: for the Sender-Name header, and to drop cached introspection.
    let owners = bus::NameOwners::default();
    tokio::spawn(track_owners(
        bus.clone(),
        owners.clone(),
        requests.clone(),
        link.clone(),
    ));
    if !config.no_signals {
        spawn_signals(&config, &me, &bus, &client, &owners, &metrics);
    }

    let info = AgentInfo {
        nkey: me.nkey.clone(),
        hostname: me.hostname.clone(),
        version: cbus_protocol::VERSION.to_owned(),
        bus: config.bus.clone(),
        started_at_ms: cbus_protocol::presence::now_ms(),
        heartbeat_ms: config.heartbeat.as_millis() as u64,
        bus_connected: false,
        labels: config.labels.iter().cloned().collect(),
        rtt_ms: None,
    };
    let presence = Arc::new(presence::Presence::new(
        client.clone(),
        info,
        link.clone(),
        config.js_domain.clone(),
    ));
    // Subscribed before the hello is sent on this connection, so the server has the
    // subscription by the time anyone sees the hello.
    // Pings to every agent, and probes to this one (a fan-out asking whether a silent machine
    // is alive): answered alike.
    match futures::future::try_join(
        client.subscribe(subject::PING),
        client.subscribe(subject::ping_one(&me.nkey)),
    )
    .await
    {
        Ok((pings, probes)) => drop(tokio::spawn(
            presence
                .clone()
                .answer_pings(futures::stream::select(pings, probes)),
        )),
        Err(e) => tracing::warn!(error = %e, "cannot subscribe to pings"),
    }
    // Hello, then heartbeats, on their own task: a slow registry write while NATS is away never
    // delays metrics or the reaction to SIGTERM.
    let beating = tokio::spawn(heartbeats(presence.clone(), link, config.heartbeat));
    let reporting = tokio::spawn(report_metrics(
        client.clone(),
        metrics.clone(),
        subject::metrics(&me.nkey),
        config.metrics_interval,
    ));
    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
    tracing::info!("shutting down; saying goodbye");
    serving.abort();
    beating.abort();
    reporting.abort();
    goodbye(&presence, &client).await;
    Ok(())
}

/// Serves `/metrics` locally. Bound before returning, so a taken port is a clear start-up error
/// rather than a silent task failure.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    metrics: Arc<metrics::Metrics>,
) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = metrics::serve(listener, metrics).await {
            tracing::error!(error = %e, %addr, "metrics endpoint stopped");
        }
    });
    Ok(())
}

/// Follows name owners for as long as the agent runs, reconnecting after a bus restart, and is
/// the one that says whether the bus is connected ([`bus::BusLink`]).
async fn track_owners(
    bus: bus::BusKind,
    owners: bus::NameOwners,
    requests: Arc<requests::RequestServer>,
    link: bus::BusLink,
) {
    // Reconnect at once after a bus restart (signals need the names soon), but back off when
    // tracking keeps failing right away.
    const FIRST: Duration = Duration::from_millis(50);
    const LAST: Duration = Duration::from_secs(10);
    let mut pause = FIRST;
    loop {
        let conn = bus.connect_with_backoff(false).await;
        link.set(true);
        let started = std::time::Instant::now();
        if let Err(e) = owners.track(&conn, |name| requests.forget(name)).await {
            tracing::warn!(error = %e, "name owner tracking stopped; reconnecting");
        }
        link.set(false);
        if started.elapsed() > LAST {
            pause = FIRST;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(LAST);
    }
}

/// The monitor reading signals into the bounded queue, and the publisher draining it to NATS.
fn spawn_signals(
    config: &Config,
    me: &requests::Identity,
    bus: &bus::BusKind,
    client: &async_nats::Client,
    owners: &bus::NameOwners,
    metrics: &Arc<metrics::Metrics>,
) {
    let (queue, rx) = signals::Queue::new(config.signal_queue, config.signal_queue_bytes);
    let filter = signals::Filter {
        include_sender: config.include_sender.clone(),
        exclude_sender: config.exclude_sender.clone(),
        include_interface: config.include_interface.clone(),
        exclude_interface: config.exclude_interface.clone(),
        include_path_prefix: config.include_path_prefix.clone(),
        exclude_path_prefix: config.exclude_path_prefix.clone(),
    };
    let queued_bytes = queue.bytes.clone();
    tokio::spawn(signals::read_loop(
        bus.clone(),
        queue,
        client.clone(),
        owners.clone(),
        filter,
        metrics.clone(),
    ));
    tokio::spawn(signals::publish_loop(
        rx,
        queued_bytes,
        client.clone(),
        me.nkey.clone(),
        me.hostname.clone(),
        owners.clone(),
        metrics.clone(),
    ));
}

/// Hello, then a heartbeat every `period`.
async fn heartbeats(presence: Arc<presence::Presence>, link: bus::BusLink, period: Duration) {
    // Give the bus a moment, so the hello usually says it is connected.
    link.wait_up(Duration::from_secs(1)).await;
    presence.announce(PresenceKind::Hello).await;
    // The hello's own write is what measured the round trip, so the hello could not state it:
    // a heartbeat says it now rather than a period later, so that a fan-out's probe knows how
    // long to wait for this machine from the start (`cbus_client::fleet::probe`).
    if presence.rtt_ms().is_some() {
        presence.announce(PresenceKind::Heartbeat).await;
    }
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        presence.announce(PresenceKind::Heartbeat).await;
    }
}

/// The agent's own metrics on `dbus.metrics.<nkey>` every `period`, for the gateway's /metrics.
async fn report_metrics(
    client: async_nats::Client,
    metrics: Arc<metrics::Metrics>,
    subject: String,
    period: Duration,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        tracing::debug!(summary = %metrics.summary(), "health");
        let text = metrics.render();
        if let Err(e) = client.publish(subject.clone(), text.into()).await {
            tracing::debug!(error = %e, "cannot publish metrics");
        }
    }
}

/// Bounded: with NATS unreachable there is nobody to say goodbye to.
async fn goodbye(presence: &presence::Presence, client: &async_nats::Client) {
    let goodbye = async {
        presence.announce(PresenceKind::Goodbye).await;
        let _ = client.flush().await;
    };
    let connected = client.connection_state() == async_nats::connection::State::Connected;
    let patience = Duration::from_millis(if connected { 3000 } else { 500 });
    if tokio::time::timeout(patience, goodbye).await.is_err() {
        tracing::warn!(?patience, connected, "goodbye not confirmed by NATS");
    }
}
