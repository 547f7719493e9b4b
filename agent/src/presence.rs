//! Announcing the agent: hello, heartbeats, goodbye, and answers to pings.
//!
//! Each event goes to `dbus.presence.<nkey>` and into the registry bucket, so clients learn the
//! fleet in one read. A server without JetStream still gets the plain messages; the agent says
//! so once, carries on, and tries the registry again now and then (JetStream may be enabled
//! later) rather than on every heartbeat.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::Client;
use cbus_protocol::presence::{self, AgentInfo, PresenceEvent, PresenceKind};
use cbus_protocol::subject;
use futures::{FutureExt, StreamExt};
use tokio::sync::Mutex;

use crate::bus::BusLink;

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
    bus: BusLink,
    /// Where the registry is, when not in this server's JetStream (`--js-domain`).
    js_domain: Option<String>,
    registry: Mutex<Registry>,
    /// When the host index key was last written ([`presence::host_index_key`]); `None` until
    /// it was, and again whenever the registry had to be reopened.
    indexed: Mutex<Option<Instant>>,
    warned: AtomicBool,
    /// The round trip claimed in the next event ([`presence::rtt_claim`]); 0 until a registry
    /// write was acknowledged.
    rtt_ms: AtomicU32,
}

impl Presence {
    pub fn new(client: Client, info: AgentInfo, bus: BusLink, js_domain: Option<String>) -> Self {
        Presence {
            client,
            info,
            bus,
            js_domain,
            registry: Mutex::new(Registry::Unknown),
            indexed: Mutex::new(None),
            warned: AtomicBool::new(false),
            rtt_ms: AtomicU32::new(0),
        }
    }

    /// The agent's info as of now.
    pub fn current(&self) -> AgentInfo {
        let mut agent = self.info.clone();
        agent.bus_connected = self.bus.is_up();
        agent.rtt_ms = self.rtt_ms();
        agent
    }

    /// The round trip the next event claims, once a registry write was acknowledged.
    pub fn rtt_ms(&self) -> Option<u32> {
        Some(self.rtt_ms.load(Ordering::Relaxed)).filter(|&ms| ms > 0)
    }

    /// Publishes one event on the agent's own presence subject, and returns its payload.
    async fn publish(&self, event: PresenceKind) -> Option<bytes::Bytes> {
        let ev = PresenceEvent {
            event,
            sent_at_ms: presence::now_ms(),
            agent: self.current(),
        };
        let payload = match serde_json::to_vec(&ev) {
            Ok(p) => bytes::Bytes::from(p),
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode presence");
                return None;
            }
        };
        if let Err(e) = self
            .client
            .publish(subject::presence(&self.info.nkey), payload.clone())
            .await
        {
            tracing::debug!(error = %e, "cannot publish presence");
        }
        Some(payload)
    }

    /// Publishes one event and records it in the registry.
    pub async fn announce(&self, event: PresenceKind) {
        let Some(payload) = self.publish(event).await else {
            return;
        };
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
            let js = match &self.js_domain {
                Some(domain) => jetstream::with_domain(self.client.clone(), domain),
                None => jetstream::new(self.client.clone()),
            };
            match cbus_client::fleet::ensure_registry(&js, 1).await {
                Ok(store) => {
                    if self.warned.swap(false, Ordering::Relaxed) {
                        tracing::info!("JetStream registry available again");
                    }
                    *registry = Registry::Open(Box::new(store));
                    // A bucket that was gone may have been created afresh, without the index.
                    *self.indexed.lock().await = None;
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
            // A failed write keeps the bucket open and is tried again at the next heartbeat: on
            // a cluster the bucket's stream is leaderless for a few seconds after its leader's
            // node died, and reopening it (or backing off) only adds to that. Bounded by the
            // heartbeat, so a write that waits for a leader does not hold the next heartbeat.
            let patience =
                Duration::from_millis(self.info.heartbeat_ms).max(Duration::from_millis(500));
            let sent = Instant::now();
            match tokio::time::timeout(patience, store.put(&self.info.nkey, payload)).await {
                Ok(Ok(_)) => {
                    let claim = presence::rtt_claim(self.rtt_ms(), sent.elapsed());
                    self.rtt_ms.store(claim, Ordering::Relaxed);
                    self.write_index(store, patience).await
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "cannot write registry entry"),
                Err(_) => tracing::debug!(?patience, "registry write not acknowledged in time"),
            }
        }
    }

    /// Writes the host index key when it was never written or is due again
    /// ([`presence::HOST_INDEX_REFRESH`]): rarely, since heartbeats rewrite only the entry.
    async fn write_index(&self, store: &jetstream::kv::Store, patience: Duration) {
        let mut indexed = self.indexed.lock().await;
        if indexed.is_some_and(|at| at.elapsed() < presence::HOST_INDEX_REFRESH) {
            return;
        }
        let Some(key) = presence::host_index_key(&self.info.hostname, &self.info.nkey) else {
            // Readers find a machine without an index key by a full read.
            *indexed = Some(Instant::now());
            return;
        };
        match tokio::time::timeout(patience, store.put(&key, bytes::Bytes::new())).await {
            Ok(Ok(_)) => *indexed = Some(Instant::now()),
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot write the host index key"),
            Err(_) => tracing::debug!(?patience, "host index write not acknowledged in time"),
        }
    }

    /// Answers `dbus.ping` until the client closes, with a heartbeat on the agent's own
    /// presence subject rather than on the ping's reply subject: only this agent may publish
    /// there, so the pinger can trust the nkey, while a reply inbox is shared by every agent and
    /// its body would be a claim (docs/security.md). A ping that arrives within the gap of the
    /// last answer is answered once at its end, so every ping is followed by an answer sent
    /// after it. The gap is [`PING_ANSWER_GAP`] for the fleet-wide `dbus.ping` (one message
    /// makes every agent answer, so a flood costs at most 10 answers a second per agent) and
    /// [`PROBE_ANSWER_GAP`] for this agent's own `dbus.ping.<nkey>` (a fan-out's liveness probe
    /// waits tens of milliseconds, and one such ping buys one answer).
    /// `pings` are the subscriptions to `dbus.ping` and to this agent's own `dbus.ping.<nkey>`,
    /// made before the hello: whoever saw the hello can ping this agent.
    pub async fn answer_pings(
        self: Arc<Self>,
        mut pings: impl futures::Stream<Item = async_nats::Message> + Unpin,
    ) {
        // The latest answer, and the latest that also answered a fleet-wide ping.
        let mut last: Option<Instant> = None;
        let mut last_all: Option<Instant> = None;
        while let Some(ping) = pings.next().await {
            let mut all = ping.subject.as_str() == subject::PING;
            let next = [
                last.map(|at| at + PROBE_ANSWER_GAP),
                last_all.filter(|_| all).map(|at| at + PING_ANSWER_GAP),
            ]
            .into_iter()
            .flatten()
            .max();
            if let Some(next) = next {
                tokio::time::sleep_until(next.into()).await;
                // Pings that came while waiting are answered by the answer below.
                while let Some(Some(p)) = pings.next().now_or_never() {
                    all |= p.subject.as_str() == subject::PING;
                }
            }
            self.publish(PresenceKind::Heartbeat).await;
            last = Some(Instant::now());
            if all {
                last_all = last;
            }
        }
    }
}

/// The least time between two answers to fleet-wide pings ([`Presence::answer_pings`]).
pub const PING_ANSWER_GAP: Duration = Duration::from_millis(100);
/// The least time between two answers to pings of this agent alone.
pub const PROBE_ANSWER_GAP: Duration = Duration::from_millis(10);
