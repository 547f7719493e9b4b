//! Announcing the agent: hello, heartbeats, goodbye, and answers to pings.
//!
//! Each event goes to `dbus.presence.<nkey>` and into the registry bucket, so clients learn the
//! fleet in one read. A server without JetStream still gets the plain messages; the agent says
//! so once and carries on.

use std::sync::Arc;

use async_nats::jetstream;
use async_nats::Client;
use cbus_protocol::presence::{self, AgentInfo, PresenceEvent, PresenceKind};
use cbus_protocol::subject;
use futures::StreamExt;
use tokio::sync::Mutex;

pub struct Presence {
    client: Client,
    pub info: AgentInfo,
    registry: Mutex<Option<jetstream::kv::Store>>,
    warned: std::sync::atomic::AtomicBool,
}

impl Presence {
    pub fn new(client: Client, info: AgentInfo) -> Self {
        Presence {
            client,
            info,
            registry: Mutex::new(None),
            warned: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Publishes one event and records it in the registry.
    pub async fn announce(&self, event: PresenceKind, bus_connected: bool) {
        let mut agent = self.info.clone();
        agent.bus_connected = bus_connected;
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
        if registry.is_none() {
            let js = jetstream::new(self.client.clone());
            match cbus_protocol::fleet::ensure_registry(&js).await {
                Ok(store) => *registry = Some(store),
                Err(e) => {
                    if !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::warn!(error = %e, "no JetStream registry; presence messages only");
                    }
                    return;
                }
            }
        }
        if let Some(store) = registry.as_ref() {
            if let Err(e) = store.put(&self.info.nkey, payload).await {
                tracing::debug!(error = %e, "cannot write registry entry");
                *registry = None;
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
            if let Ok(payload) = serde_json::to_vec(&self.info) {
                let _ = self.client.publish(reply, payload.into()).await;
            }
        }
    }
}
