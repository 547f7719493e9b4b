//! Connecting to NATS with whichever credentials the operator gave.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{ConnectOptions, Event};
use nkeys_seed::Seed;

use crate::config::Config;
use crate::metrics::Metrics;

/// The agent's nkey seed, kept for nkey authentication.
pub mod nkeys_seed {
    /// A seed string (`SU...`); not printed by Debug.
    #[derive(Clone)]
    pub struct Seed(pub String);
    impl std::fmt::Debug for Seed {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Seed(..)")
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read NATS credentials {path}: {source}")]
    Creds {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read TLS CA {path}: {source}")]
    Ca {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--password needs --user")]
    PasswordWithoutUser,
    #[error("cannot connect to NATS at {urls}: {message}")]
    Connect { urls: String, message: String },
}

/// Connects; retries forever in the background, so an agent started before NATS still comes up.
pub async fn connect(
    config: &Config,
    seed: &Seed,
    metrics: Arc<Metrics>,
) -> Result<async_nats::Client, ConnectError> {
    let mut opts = ConnectOptions::new();
    if config.nats_nkey_auth {
        opts = ConnectOptions::with_nkey(seed.0.clone());
    }
    if let Some(path) = &config.creds {
        opts = ConnectOptions::with_credentials_file(path.clone())
            .await
            .map_err(|source| ConnectError::Creds {
                path: path.display().to_string(),
                source,
            })?;
    }
    match (&config.user, &config.password) {
        (Some(u), Some(p)) => opts = opts.user_and_password(u.clone(), p.clone()),
        (None, Some(_)) => return Err(ConnectError::PasswordWithoutUser),
        _ => {}
    }
    if let Some(token) = &config.token {
        opts = opts.token(token.clone());
    }
    if let Some(ca) = &config.tls_ca {
        if !ca.exists() {
            return Err(ConnectError::Ca {
                path: ca.display().to_string(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    let m = metrics.clone();
    opts = opts
        .name(format!("cbus-agent {}", cbus_protocol::VERSION))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((100 * 2u64.saturating_pow(attempts.min(8) as u32)).min(10_000))
        })
        .event_callback(move |event| {
            let m = m.clone();
            async move {
                match &event {
                    Event::Connected => {
                        m.nats_connected.set(1);
                        tracing::info!("connected to NATS");
                    }
                    Event::Disconnected => {
                        m.nats_connected.set(0);
                        tracing::warn!("disconnected from NATS; reconnecting");
                    }
                    other => tracing::info!(event = %other, "NATS event"),
                }
            }
        });
    let urls = config.nats_url.join(",");
    opts.connect(config.nats_url.clone())
        .await
        .map_err(|e| ConnectError::Connect {
            urls,
            message: e.to_string(),
        })
}
