//! `cbus-gateway`: one process that follows the fleet over NATS and serves Prometheus.
//!
//! [`cache`] holds every machine's agent state and systemd units, kept current by presence,
//! one ListUnits per machine when it joins, and PropertiesChanged deltas; [`metrics`] renders
//! `/metrics` from that cache alone.

pub mod cache;
pub mod metrics;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use cbus_protocol::fleet::{status_from, Fleet, Outcome, Query};
use cbus_protocol::presence::{self, PresenceEvent};
use cbus_protocol::{headers, subject, Op, Request};
use clap::Parser;
use futures::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;

use cache::{Cache, Join, UnitFilter};

/// Follows a cbus fleet over NATS and serves Prometheus metrics from a cache.
#[derive(Debug, Clone, Parser)]
#[command(name = "cbus-gateway", version, about)]
pub struct Config {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// NATS credentials file (.creds).
    #[arg(long, env = "NATS_CREDS")]
    pub creds: Option<PathBuf>,
    /// NATS user.
    #[arg(long, env = "NATS_USER")]
    pub user: Option<String>,
    /// NATS password.
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// NATS token.
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate for a NATS server with TLS.
    #[arg(long, env = "NATS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// HTTP listen address.
    #[arg(long, env = "CBUS_GATEWAY_LISTEN", default_value = "127.0.0.1:9850")]
    pub listen: SocketAddr,
    /// Units to export (regex, anchored).
    #[arg(long, default_value = ".+")]
    pub unit_include: String,
    /// Units not to export (regex, anchored); node_exporter's default.
    #[arg(long, default_value = cache::DEFAULT_EXCLUDE)]
    pub unit_exclude: String,
}

/// Runs until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let filter = UnitFilter::new(&config.unit_include, &config.unit_exclude)
        .context("invalid --unit-include/--unit-exclude")?;
    let cache = Cache::new(filter);
    let client = connect(&config).await?;
    let fleet = Fleet::new(client.clone(), format!("cbus-gateway@{}", host()));
    let (join_tx, join_rx) = mpsc::unbounded_channel::<String>();

    // Subscribe first, then read the registry, so no event falls in between.
    let mut presence_sub = client.subscribe(subject::PRESENCE_ALL).await?;
    let mut unit_signals = client
        .subscribe("dbus.signals.*.*.org.freedesktop.systemd1.unit.>")
        .await?;
    let mut manager_signals = client
        .subscribe("dbus.signals.*.*.org.freedesktop.systemd1")
        .await?;
    let mut agent_metrics = client.subscribe(subject::METRICS_ALL).await?;
    match fleet.registry().await {
        Ok(agents) => {
            for a in agents {
                let ev = PresenceEvent {
                    event: match a.state {
                        presence::AgentState::Stopped => presence::PresenceKind::Goodbye,
                        _ => presence::PresenceKind::Heartbeat,
                    },
                    sent_at_ms: a.last_seen_ms,
                    agent: a.info,
                };
                let nkey = ev.agent.nkey.clone();
                if cache.presence(ev, a.last_seen_ms) == Join::New {
                    let _ = join_tx.send(nkey);
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "no registry; learning agents from heartbeats"),
    }

    tokio::spawn(load_units(fleet.clone(), cache.clone(), join_rx));
    tokio::spawn({
        let cache = cache.clone();
        let join_tx = join_tx.clone();
        async move {
            while let Some(msg) = presence_sub.next().await {
                let Ok(ev) = serde_json::from_slice::<PresenceEvent>(&msg.payload) else {
                    tracing::debug!(subject = %msg.subject, "malformed presence ignored");
                    continue;
                };
                let nkey = ev.agent.nkey.clone();
                if subject::nkey_of(&msg.subject) != Some(nkey.as_str()) {
                    tracing::debug!(subject = %msg.subject, "presence for another nkey ignored");
                    continue;
                }
                if matches!(
                    cache.presence(ev, presence::now_ms()),
                    Join::New | Join::Restarted
                ) {
                    let _ = join_tx.send(nkey);
                }
            }
        }
    });
    tokio::spawn({
        let cache = cache.clone();
        async move {
            while let Some(msg) = unit_signals.next().await {
                let h = msg.headers.as_ref();
                if headers::get(h, headers::MEMBER) != Some("PropertiesChanged") {
                    continue;
                }
                let (Some(nkey), Some(path)) = (
                    headers::get(h, headers::NKEY),
                    headers::get(h, headers::PATH),
                ) else {
                    continue;
                };
                if let Ok(args) = serde_json::from_slice(&msg.payload) {
                    cache.properties_changed(nkey, path, &args);
                }
            }
        }
    });
    tokio::spawn({
        let join_tx = join_tx.clone();
        async move {
            while let Some(msg) = manager_signals.next().await {
                let h = msg.headers.as_ref();
                if matches!(
                    headers::get(h, headers::MEMBER),
                    Some("UnitNew" | "UnitRemoved")
                ) {
                    if let Some(nkey) = headers::get(h, headers::NKEY) {
                        let _ = join_tx.send(nkey.to_owned());
                    }
                }
            }
        }
    });
    tokio::spawn({
        let cache = cache.clone();
        async move {
            while let Some(msg) = agent_metrics.next().await {
                if let Some(nkey) = subject::nkey_of(&msg.subject) {
                    cache.set_agent_metrics(
                        nkey,
                        String::from_utf8_lossy(&msg.payload).into_owned(),
                    );
                }
            }
        }
    });

    let app = axum::Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(cache);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    tracing::info!(listen = %config.listen, "serving /metrics");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return std::future::pending().await,
                };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await?;
    Ok(())
}

async fn serve_metrics(State(cache): State<Cache>) -> impl IntoResponse {
    let body = metrics::render(&cache.snapshot(), presence::now_ms());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// Loads units of machines that joined, restarted, or added/removed units; coalesces bursts.
async fn load_units(fleet: Fleet, cache: Cache, mut joins: mpsc::UnboundedReceiver<String>) {
    while let Some(first) = joins.recv().await {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut nkeys = vec![first];
        while let Ok(n) = joins.try_recv() {
            if !nkeys.contains(&n) {
                nkeys.push(n);
            }
        }
        let targets: Vec<_> = cache
            .snapshot()
            .into_iter()
            .filter(|m| nkeys.contains(&m.info.nkey))
            .map(|m| {
                let ev = PresenceEvent {
                    event: m.last_event,
                    sent_at_ms: m.last_seen_ms,
                    agent: m.info.clone(),
                };
                status_from(ev, m.last_seen_ms, presence::now_ms())
            })
            .collect();
        let query = Query {
            destination: "org.freedesktop.systemd1".into(),
            path: "/org/freedesktop/systemd1".into(),
            op: Op::Call,
            member: Some("ListUnits".into()),
            request: Request {
                interface: Some("org.freedesktop.systemd1.Manager".into()),
                args: Some(json!([])),
                signature: Some(String::new()),
                ..Default::default()
            },
        };
        match fleet
            .fan_out(&targets, &query, Duration::from_secs(10))
            .await
        {
            Ok(outcomes) => {
                for o in outcomes {
                    match o.outcome {
                        Outcome::Replied(r) => match r.result {
                            Ok(s) => cache.load_units(&o.agent.info.nkey, &s.value[0]),
                            Err(e) => {
                                tracing::debug!(host = %o.agent.info.hostname, error = %e, "no systemd units")
                            }
                        },
                        other => {
                            tracing::info!(host = %o.agent.info.hostname, outcome = ?other, "could not load units")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot load units"),
        }
    }
}

async fn connect(config: &Config) -> anyhow::Result<async_nats::Client> {
    let opts = cbus_protocol::connect::Credentials {
        creds: config.creds.clone(),
        nkey_seed: None,
        user: config.user.clone(),
        password: config.password.clone(),
        token: config.token.clone(),
        tls_ca: config.tls_ca.clone(),
    }
    .options()
    .await?;
    let urls: Vec<String> = config
        .nats_url
        .split(',')
        .map(|s| s.trim().to_owned())
        .collect();
    opts.name("cbus-gateway")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(|e| async move { tracing::info!(event = %e, "NATS event") })
        .connect(urls)
        .await
        .with_context(|| format!("cannot connect to NATS at {}", config.nats_url))
}

fn host() -> String {
    hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}
