//! Connecting to NATS for one command, and knowing when that connection is gone.
//!
//! Unlike the agent, the CLI never retries in the background (no `retry_on_initial_connect`):
//! an unreachable server or refused credentials is one clear line and exit code 2 within a
//! couple of seconds, never a hang. A connection lost later is retried a bounded number of
//! times ([`MAX_RECONNECTS`]), and a frozen server (process stopped, TCP still open) is noticed
//! by unanswered pings ([`PING_INTERVAL`]); [`Health`] lets a command tell "NATS went away"
//! from "machines are silent", so that it never blames machines for a lost connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use cbus_client::connect::Reconnect;
use tokio::time::Instant;

use crate::args::ConnArgs;
use crate::config::FileConfig;
use crate::error::Failure;

/// How long one connection attempt may take (TCP + TLS + handshake).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// An idle connection is pinged this often; async-nats drops it after two unanswered pings, so
/// a frozen server is noticed within about three intervals.
pub const PING_INTERVAL: Duration = Duration::from_secs(1);
/// Reconnect attempts after a connection is lost, before the client gives up (and `monitor`,
/// which has no deadline, exits with `disconnected`). With a frozen server each attempt also
/// waits out [`CONNECT_TIMEOUT`].
pub const MAX_RECONNECTS: usize = 10;

/// The CLI's connection policy: a command must end.
const POLICY: Reconnect = Reconnect::Bounded {
    max: MAX_RECONNECTS,
    connect_timeout: CONNECT_TIMEOUT,
    ping_interval: PING_INTERVAL,
};

/// The state of a command's connection, as the client's background task sees it.
#[derive(Clone)]
pub struct Health {
    client: async_nats::Client,
    gave_up: Arc<AtomicBool>,
}

impl Health {
    /// A mark to compare with later ([`Health::lost_since`]).
    pub fn mark(&self) -> u64 {
        self.client.statistics().connects.load(Ordering::Relaxed)
    }

    /// Whether the connection is down now, or went down and came back since `mark`: either way
    /// replies sent meanwhile may be lost.
    pub fn lost_since(&self, mark: u64) -> bool {
        self.gave_up() || self.client.connection_state() != State::Connected || self.mark() != mark
    }

    /// Whether the client stopped reconnecting: nothing will be sent or received any more.
    pub fn gave_up(&self) -> bool {
        self.gave_up.load(Ordering::Relaxed)
    }
}

/// Connects with flags, environment and config file merged (flags and environment win), giving
/// up at `deadline` at the latest.
pub async fn connect(
    args: &ConnArgs,
    file: &FileConfig,
    deadline: Instant,
) -> Result<(async_nats::Client, Health), Failure> {
    let nats = args.clone().or(file.nats.clone());
    let usage = |e: cbus_client::connect::NatsArgsError| Failure::Usage(e.to_string());
    let urls = nats.urls().map_err(usage)?;
    let opts = nats.options().await.map_err(usage)?;
    let server = urls.join(",");
    let failed =
        |why: String| Failure::Connection(format!("cannot connect to NATS at {server}: {why}"));
    let gave_up = Arc::new(AtomicBool::new(false));
    let flag = gave_up.clone();
    let attempt = POLICY
        .apply(opts.name("cbus"))
        .event_callback(move |event| {
            let flag = flag.clone();
            async move {
                match event {
                    async_nats::Event::Disconnected => {
                        tracing::warn!("lost the connection to NATS; reconnecting")
                    }
                    async_nats::Event::Connected => tracing::info!("reconnected to NATS"),
                    async_nats::Event::ClientError(async_nats::ClientError::MaxReconnects) => {
                        flag.store(true, Ordering::Relaxed);
                        tracing::debug!(attempts = MAX_RECONNECTS, "gave up reconnecting to NATS");
                    }
                    other => tracing::debug!(event = %other, "NATS client event"),
                }
            }
        })
        .connect(urls);
    // The outer bound also covers DNS, which connection_timeout does not.
    let bound = deadline.min(Instant::now() + CONNECT_TIMEOUT * 2);
    match tokio::time::timeout_at(bound, attempt).await {
        Ok(Ok(client)) => {
            let health = Health {
                client: client.clone(),
                gave_up,
            };
            Ok((client, health))
        }
        Ok(Err(e)) => Err(failed(one_line(&e.to_string()))),
        Err(_) => Err(failed("timed out".into())),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Who is asking, for the agents' audit log (`user@host`).
pub fn requester() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    format!("{user}@{host}")
}
