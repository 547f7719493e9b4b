//! Connecting to NATS with whichever credentials the operator gave (the meaning of each is
//! decided once, in `cbus_client::connect`). An agent must come up before its NATS server and
//! outlive server restarts, so it retries the first connection and reconnects forever with a
//! capped backoff; connection events are logged and mirrored in the `nats_connected` gauge.

use std::sync::Arc;

use async_nats::Event;

use crate::config::Config;
use crate::identity::Identity;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Settings(#[from] cbus_client::connect::NatsArgsError),
    #[error("cannot connect to NATS at {urls}: {message}")]
    Connect { urls: String, message: String },
}

/// Connects; retries forever in the background, so an agent started before NATS still comes up.
pub async fn connect(
    config: &Config,
    id: &Identity,
    metrics: Arc<Metrics>,
) -> Result<async_nats::Client, ConnectError> {
    let urls = config.nats.urls()?;
    let opts = config
        .nats
        .options_with_seed(config.nats_nkey_auth.then(|| id.seed.0.clone()))
        .await?;
    let m = metrics.clone();
    let opts = cbus_client::connect::Reconnect::Forever
        .apply(opts)
        .name(format!("cbus-agent {}", cbus_protocol::VERSION))
        // Its own inbox prefix, so its permissions can keep it out of everyone else's replies.
        .custom_inbox_prefix(cbus_protocol::permissions::agent_inbox_prefix(&id.nkey))
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
                    Event::ClientError(_) | Event::ServerError(_) | Event::SlowConsumer(_) => {
                        tracing::warn!(event = %event, "NATS problem")
                    }
                    other => tracing::info!(event = %other, "NATS event"),
                }
            }
        });
    opts.connect(urls.clone())
        .await
        .map_err(|e| ConnectError::Connect {
            urls: urls.join(","),
            message: e.to_string(),
        })
}
