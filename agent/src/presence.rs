//! Announcing the agent: hello, heartbeats, goodbye, and answers to pings.
//!
//! Each event goes to `dbus.presence.<nkey>` and into the registry bucket, so clients learn the
//! fleet in one read. A server without JetStream still gets the plain messages; the agent says
//! so once, carries on, and tries the registry again now and then (JetStream may be enabled
//! later) rather than on every heartbeat.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::Client;
use cbus_protocol::presence::{self, AgentInfo, PresenceEvent, PresenceKind};
use cbus_protocol::subject;
use futures::StreamExt;
use tokio::sync::Mutex;

/// Pauses between attempts to open the registry after it was unavailable: from the first to
/// the last, doubling. Short at first because under the generated permissions an agent may not
/// create the bucket and waits for the gateway to (crate docs of `cbus_protocol::permissions`).
const REGISTRY_RETRY_FIRST: Duration = Duration::from_secs(1);
const REGISTRY_RETRY_LAST: Duration = Duration::from_secs(30);

enum Registry {
    Unknown,
    Open(Box<jetstream::kv::Store>),
    /// Since when, and the pause before the next attempt.
    Unavailable(Instant, Duration),
}

pub struct Presence {
    client: Client,
    pub info: AgentInfo,
    /// Whether the agent is connected to its bus, as last reported by the bus side.
    bus_connected: Arc<dyn Fn() -> bool + Send + Sync>,
    registry: Mutex<Registry>,
    warned: AtomicBool,
}

impl Presence {
    pub fn new(
        client: Client,
        info: AgentInfo,
        bus_connected: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> Self {
        Presence {
            client,
            info,
            bus_connected,
            registry: Mutex::new(Registry::Unknown),
            warned: AtomicBool::new(false),
        }
    }

    /// The agent's info as of now.
    pub fn current(&self) -> AgentInfo {
        let mut agent = self.info.clone();
        agent.bus_connected = (self.bus_connected)();
        agent
    }

    /// Publishes one event and records it in the registry.
    pub async fn announce(&self, event: PresenceKind) {
        let agent = self.current();
        let ev = PresenceEvent {
            event,
            sent_at_ms: presence::now_ms(),
            agent,
        };
        let payload = match serde_json::to_vec(&ev) {
            Ok(p) => bytes::Bytes::from(p),
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode presence");
                return;
            }
        };
        if let Err(e) = self
            .client
            .publish(subject::presence(&self.info.nkey), payload.clone())
            .await
        {
            tracing::debug!(error = %e, "cannot publish presence");
        }
        let mut registry = self.registry.lock().await;
        let (retry, pause) = match &*registry {
            Registry::Open(_) => (false, REGISTRY_RETRY_FIRST),
            Registry::Unknown => (true, REGISTRY_RETRY_FIRST),
            // A goodbye always tries: it is the last word.
            Registry::Unavailable(since, pause) => (
                since.elapsed() >= *pause || event == PresenceKind::Goodbye,
                (*pause * 2).min(REGISTRY_RETRY_LAST),
            ),
        };
        if retry {
            let js = jetstream::new(self.client.clone());
            match cbus_client::fleet::ensure_registry(&js).await {
                Ok(store) => {
                    if self.warned.swap(false, Ordering::Relaxed) {
                        tracing::info!("JetStream registry available again");
                    }
                    *registry = Registry::Open(Box::new(store));
                }
                Err(e) => {
                    if !self.warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "no JetStream registry; presence messages only");
                    }
                    *registry = Registry::Unavailable(Instant::now(), pause);
                    return;
                }
            }
        }
        if let Registry::Open(store) = &*registry {
            if let Err(e) = store.put(&self.info.nkey, payload).await {
                tracing::debug!(error = %e, "cannot write registry entry");
                *registry = Registry::Unknown;
            }
        }
    }

    /// Answers `dbus.ping` with the agent's info until the client closes.
    pub async fn answer_pings(self: Arc<Self>) {
        let mut sub = match self.client.subscribe(subject::PING).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to pings");
                return;
            }
        };
        while let Some(msg) = sub.next().await {
            let Some(reply) = msg.reply else { continue };
            if let Ok(payload) = serde_json::to_vec(&self.current()) {
                let _ = self.client.publish(reply, payload.into()).await;
            }
        }
    }
}
