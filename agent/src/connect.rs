//! Connecting to NATS with whichever credentials the operator gave.

use std::sync::Arc;
use std::time::Duration;

use async_nats::Event;
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
    #[error(transparent)]
    Credentials(#[from] cbus_protocol::connect::CredentialsError),
    #[error("cannot connect to NATS at {urls}: {message}")]
    Connect { urls: String, message: String },
}

/// Connects; retries forever in the background, so an agent started before NATS still comes up.
pub async fn connect(
    config: &Config,
    seed: &Seed,
    metrics: Arc<Metrics>,
) -> Result<async_nats::Client, ConnectError> {
    let opts = cbus_protocol::connect::Credentials {
        creds: config.creds.clone(),
        nkey_seed: config.nats_nkey_auth.then(|| seed.0.clone()),
        user: config.user.clone(),
        password: config.password.clone(),
        token: config.token.clone(),
        tls_ca: config.tls_ca.clone(),
    }
    .options()
    .await?;
    let m = metrics.clone();
    let opts = opts
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
