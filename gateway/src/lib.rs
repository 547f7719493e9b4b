//! `cbus-gateway`: one process that follows the fleet over NATS and serves browsers and
//! Prometheus from what it learned, never from a round trip made on their behalf.
//!
//! # Modules, by concern
//!
//! - fleet state: `model` (a machine and its units, no locking, no I/O), `store` (the
//!   shared machines, changed only through typed updates) and `intern` (the bounded table of
//!   words units share: names, descriptions, states);
//! - the change hub: `changes` (what changed, routed to the sessions that follow it, with
//!   bounded queues);
//! - ingestion: `follow` (presence, the registry, agents' metrics, the tick) and `systemd`
//!   (unit signals, ListUnits, unit checks); `objects` follows the D-Bus objects clients
//!   look at;
//! - serving: `metrics` renders `/metrics` from the store alone, memoised by each machine's
//!   units generation; `ws` is the WebSocket API; `dashboard` the embedded browser UI;
//!   `server` the accept loops and connection limits; `tls` the optional rustls listener;
//!   `auth` the token, Origin and Host checks;
//! - plumbing: `requests` (asking one machine), `nats` (subscribing, and the trust rules
//!   for signals), `stats` (the gateway's own counters), `config` (flags).
//!
//! # Which module may use which
//!
//! A module uses only modules of lower layers, so there is no import cycle
//! (`gateway/tests/module_graph.rs` checks that, and that no module has more than 500 lines of
//! code):
//!
//! 1. leaves, using no other module of the crate: `auth`, `stats`, `intern`, `requests`,
//!    `dashboard`; then `model` (uses `intern`);
//! 2. `aggregate` (uses `model`); `config` and `changes` (use `model`); `metrics` (`model`, `stats`); `nats` and `server`
//!    (`stats`);
//! 3. `tls` (`server`); `store` (`model`, `intern`, `changes`);
//! 4. `systemd` (`store`, `model`, `intern`, `requests`, `nats`, `stats`); `objects` (`store`, `changes`,
//!    `requests`, `nats`);
//! 5. `follow` (`store`, `systemd`, `nats`); `ws` (`store`, `changes`, `objects`, `requests`, `aggregate`,
//!    `nats`, `auth`, `model`, `stats`);
//! 6. the crate root, which wires them together.
//!
//! So the fleet state never names metrics or WebSocket types, and nothing below `ws`
//! knows the wire format of the WebSocket API.
//!
//! The public surface is [`run`], [`start`] and [`Config`] for the binary, plus what the bench
//! needs to measure `/metrics` without a fleet: [`Machine`], [`Unit`], [`Text`] and [`Metrics`].

mod aggregate;
mod auth;
mod changes;
mod config;
mod dashboard;
mod follow;
mod intern;
mod metrics;
mod model;
mod nats;
mod objects;
mod requests;
mod server;
mod stats;
mod store;
mod systemd;
mod tls;
mod ws;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{RawQuery, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use cbus_client::connect::Reconnect;
use cbus_client::fleet::Fleet;
use cbus_protocol::presence;

pub use auth::AuthError;
pub use config::Config;
pub use intern::Text;
pub use metrics::Metrics;
pub use model::{Machine, Unit};
pub use nats::SubscribeError;
pub use tls::TlsError;

use auth::{HostPolicy, OriginPolicy, Token};
use changes::Router;
use model::UnitFilter;
use store::Store;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid --unit-include/--unit-exclude: {0}")]
    UnitFilter(#[from] regex::Error),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("NATS settings: {0}")]
    Settings(#[from] cbus_client::connect::NatsArgsError),
    #[error("cannot connect to NATS at {url}: {source}")]
    Nats {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error(transparent)]
    Subscribe(#[from] SubscribeError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("server error: {0}")]
    Serve(std::io::Error),
}

/// A started gateway.
pub struct Gateway {
    pub local_addr: SocketAddr,
    pub tls: bool,
    server: tokio::task::JoinHandle<Result<(), std::io::Error>>,
}

impl Gateway {
    /// Waits until the server stops (after the shutdown future given to [`start`] resolved).
    pub async fn wait(self) -> Result<(), StartError> {
        match self.server.await {
            Ok(r) => r.map_err(StartError::Serve),
            Err(e) => Err(StartError::Serve(std::io::Error::other(e.to_string()))),
        }
    }
}

/// Runs until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), StartError> {
    let gateway = start(config, shutdown_signal()).await?;
    gateway.wait().await
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Connects, starts following the fleet, and serves until `shutdown` resolves.
pub async fn start(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Gateway, StartError> {
    let filter = UnitFilter::new(&config.unit_include, &config.unit_exclude)?;
    match server::raise_nofile_limit() {
        Ok(n) => tracing::debug!(
            open_files = n,
            "soft RLIMIT_NOFILE raised to the hard limit"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
    }
    let token = match (&config.token, &config.token_file) {
        (Some(t), _) if !t.is_empty() => Token::new(t),
        (_, Some(path)) => Token::from_file(path)?,
        _ => {
            // Never into the log: journald keeps it, and whoever reads the journal would
            // drive the fleet.
            let (token, text) = Token::generate()?;
            let path = config
                .generated_token_file
                .clone()
                .unwrap_or_else(|| default_token_path(config.listen.port()));
            auth::write_token_file(&path, &text)?;
            tracing::warn!(
                file = %path.display(),
                "no --token or --token-file given: generated a client token for this run"
            );
            if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                eprintln!("cbus-gateway: client token for this run: {text}");
            }
            token
        }
    };
    // Local configuration errors first, before waiting on the network.
    let tls_config = if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        Some(tls::from_files(cert, key)?)
    } else if config.self_signed {
        let (cfg, pem) = tls::self_signed(&[host()])?;
        tracing::info!(certificate = %pem, "generated a self-signed certificate; clients may pin it");
        Some(cfg)
    } else {
        None
    };
    let changes = Router::default();
    let store = Store::new(filter, changes.clone());
    let (reconnected_tx, reconnected) = tokio::sync::mpsc::unbounded_channel();
    let client = connect(&config, reconnected_tx).await?;
    let fleet = Fleet::new(client, format!("cbus-gateway@{}", host()));
    follow::start(
        fleet.clone(),
        store.clone(),
        config.request_timeout,
        config.systemd_refresh,
        reconnected,
    )
    .await?;
    let objects = objects::Objects::new(
        fleet.clone(),
        store.clone(),
        changes.clone(),
        config.request_timeout,
    );
    let ctx = Arc::new(ws::WsContext {
        store: store.clone(),
        changes,
        objects,
        fleet,
        token,
        origins: OriginPolicy::new(&config.allow_origins),
        allow_token_in_url: config.allow_token_in_url,
        heartbeat: config.ws_heartbeat,
        queue: config.ws_queue,
        queue_bytes: config.ws_queue_bytes,
        request_timeout: config.request_timeout,
        auth_timeout: config.auth_timeout,
        unauthenticated: Arc::new(tokio::sync::Semaphore::new(
            config.max_unauthenticated.max(1),
        )),
    });
    let hosts = Arc::new(HostPolicy::new(
        &config.allow_hosts,
        &config.allow_origins,
        &[host()],
    ));
    let app = axum::Router::new()
        .route("/ws", get(ws::handler))
        .with_state(ctx)
        .merge(
            axum::Router::new()
                .route("/metrics", get(serve_metrics))
                .with_state((store, Arc::new(Metrics::default()))),
        )
        .merge(dashboard::routes())
        .layer(axum::middleware::from_fn_with_state(hosts, check_host))
        // Health checks by IP or any name: nothing to read there.
        .route("/healthz", get(|| async { "ok\n" }));

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(StartError::Serve)?;
    let is_tls = tls_config.is_some();
    tracing::info!(
        listen = %local_addr,
        tls = is_tls,
        "serving the dashboard at /, the WebSocket API at /ws and Prometheus at /metrics"
    );
    let limit = server::ConnLimit::new(config.max_connections);
    let header_timeout = config.header_timeout;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let server = match tls_config {
        Some(cfg) => tokio::spawn(async move {
            tls::serve(listener, cfg, limit, app, header_timeout, stop_rx).await;
            Ok(())
        }),
        None => tokio::spawn(async move {
            let conn_stop = stop_rx.clone();
            server::accept_loop(listener, limit, stop_rx, move |io| {
                server::spawn_connection(io, app.clone(), header_timeout, conn_stop.clone())
            })
            .await;
            Ok(())
        }),
    };
    Ok(Gateway {
        local_addr,
        tls: is_tls,
        server,
    })
}

/// Refuses requests whose Host header is not a name of this gateway (DNS rebinding).
async fn check_host(State(hosts): State<Arc<HostPolicy>>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .map(|v| v.to_str().unwrap_or("\u{fffd}"));
    if !hosts.allows(host) {
        tracing::info!(host = ?host.map(|h| h.chars().take(80).collect::<String>()), "request for a foreign Host refused");
        return (
            StatusCode::MISDIRECTED_REQUEST,
            "unknown Host (start the gateway with --allow-host NAME)\n",
        )
            .into_response();
    }
    next.run(req).await
}

/// Where a generated token goes without --generated-token-file.
fn default_token_path(port: u16) -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY") {
        // systemd may list several directories, separated by colons: the first one.
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_owned();
        if !first.is_empty() {
            return std::path::Path::new(&first).join("client-token");
        }
    }
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    dir.join(format!("cbus-gateway-{port}.token"))
}

async fn serve_metrics(
    State((store, metrics)): State<(Store, Arc<Metrics>)>,
    RawQuery(query): RawQuery,
) -> Response {
    // collect[] / exclude[] / shards: a bad one is a 400, so a scrape config's typo shows as a
    // failing target, not as series that quietly went missing.
    let sel = match metrics::Selection::parse(query.as_deref()) {
        Ok(sel) => sel,
        Err(e) => {
            tracing::debug!(error = %e, "a /metrics query refused");
            return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response();
        }
    };
    // Rendering the machines whose units changed since the last scrape takes milliseconds on a
    // big fleet: off the async workers, and one machine per hold of the store, so WebSocket
    // sessions and store updates keep moving meanwhile.
    let render = tokio::task::spawn_blocking(move || {
        store.each_machine(|m| metrics.prepare(m, &sel));
        store.with_machines(|m| {
            let machines: Vec<&Machine> = m.values().collect();
            metrics.render_selected(&machines, presence::now_ms(), &sel)
        })
    });
    match render.await {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering /metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "rendering /metrics failed\n",
            )
                .into_response()
        }
    }
}

/// Connects (retrying in the background); `reconnected` hears of every reconnection after the
/// first connection.
async fn connect(
    config: &Config,
    reconnected: tokio::sync::mpsc::UnboundedSender<()>,
) -> Result<async_nats::Client, StartError> {
    let urls = config.nats.urls()?;
    let opts = config.nats.options().await?;
    let was_down = Arc::new(AtomicBool::new(false));
    // A service: it comes up before NATS does and outlives NATS restarts.
    Reconnect::Forever
        .apply(opts.name("cbus-gateway"))
        .event_callback(move |e| {
            let reconnected = reconnected.clone();
            let was_down = was_down.clone();
            async move {
                tracing::info!(event = %e, "NATS event");
                match e {
                    async_nats::Event::Disconnected => was_down.store(true, Ordering::SeqCst),
                    async_nats::Event::Connected if was_down.swap(false, Ordering::SeqCst) => {
                        let _ = reconnected.send(());
                    }
                    _ => {}
                }
            }
        })
        .connect(urls.clone())
        .await
        .map_err(|source| StartError::Nats {
            url: urls.join(","),
            source,
        })
}

fn host() -> String {
    hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}
