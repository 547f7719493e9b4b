//! The NATS side: the tasks that keep the [`Store`] current.
//!
//! - presence (`dbus.presence.*`), after one read of the `cbus-agents` registry at start;
//! - systemd's unit signals and the loading of machines' units ([`crate::systemd`]);
//! - agents' own metrics (`dbus.metrics.*`);
//! - the operators' maintenance marks (the `cbus-maintenance` bucket, watched);
//! - a one-second tick that turns silent machines unresponsive.

use std::time::Duration;

use async_nats::jetstream::kv::Operation;
use cbus_client::fleet::{Fleet, Maintenance};
use cbus_protocol::maintenance::MAINTENANCE_BUCKET;
use cbus_protocol::presence::{self, AgentState, PresenceEvent, PresenceKind};
use cbus_protocol::subject;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::nats::{subscribe, SubscribeError};
use crate::store::{Join, Store};
use crate::systemd::Units;

/// Creates the registry bucket, or closes an old one to rollups and purges, retrying until it
/// worked once: under the generated permissions agents may not create or change the bucket
/// (`cbus_protocol::permissions`), so the gateway does, also when NATS comes up after it.
async fn close_registry(client: async_nats::Client) {
    let js = async_nats::jetstream::new(client);
    let mut pause = Duration::from_secs(1);
    loop {
        match cbus_client::fleet::close_registry(&js, 1).await {
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot create or close the registry bucket; retrying")
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

/// Subscribes, reads the registry, and spawns every follower task.
///
/// `reconnected` yields once each time the gateway's NATS connection came back: every running
/// machine is then reloaded, since signals sent during the outage were lost.
pub(crate) async fn start(
    fleet: Fleet,
    store: Store,
    timeout: Duration,
    refresh: Duration,
    mut reconnected: mpsc::UnboundedReceiver<()>,
) -> Result<(), SubscribeError> {
    let client = fleet.client().clone();

    // The first attempt before the registry read below, so a new fleet's read finds the bucket;
    // later ones in the background (NATS may come up after the gateway).
    let mut closing = tokio::spawn(close_registry(client.clone()));
    let _ = tokio::time::timeout(Duration::from_secs(2), &mut closing).await;

    // Subscribe first, then read the registry, so no event falls in between.
    let presence_sub = subscribe(&client, subject::PRESENCE_ALL).await?;
    let units = Units::start(fleet.clone(), store.clone(), timeout, refresh).await?;
    let agent_metrics = subscribe(&client, subject::METRICS_ALL).await?;
    match fleet.registry().await {
        Ok(agents) => {
            for a in agents {
                let ev = PresenceEvent {
                    event: match a.state {
                        AgentState::Stopped => PresenceKind::Goodbye,
                        _ => PresenceKind::Heartbeat,
                    },
                    sent_at_ms: a.last_seen_ms,
                    agent: a.info,
                };
                let nkey = ev.agent.nkey.clone();
                let alive = a.state == AgentState::Running;
                if store.presence(ev, a.last_seen_ms) == Join::New && alive {
                    units.reload(nkey);
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "no registry; learning agents from heartbeats"),
    }

    tokio::spawn({
        let (store, units) = (store.clone(), units.clone());
        async move {
            while reconnected.recv().await.is_some() {
                let nkeys = store.running_nkeys();
                tracing::info!(
                    machines = nkeys.len(),
                    "NATS reconnected; reloading machines"
                );
                for n in nkeys {
                    units.reload(n);
                }
            }
        }
    });
    tokio::spawn(presence_loop(store.clone(), units, presence_sub));
    tokio::spawn(metrics_loop(store.clone(), agent_metrics));
    tokio::spawn(maintenance_loop(client.clone(), store.clone()));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            store.tick(presence::now_ms());
        }
    });
    Ok(())
}

async fn presence_loop(store: Store, units: Units, mut sub: async_nats::Subscriber) {
    while let Some(msg) = sub.next().await {
        let Ok(ev) = serde_json::from_slice::<PresenceEvent>(&msg.payload) else {
            tracing::debug!(subject = %msg.subject, "malformed presence ignored");
            continue;
        };
        let nkey = ev.agent.nkey.clone();
        if subject::nkey_of(&msg.subject) != Some(nkey.as_str()) {
            tracing::debug!(subject = %msg.subject, "presence for another nkey ignored");
            continue;
        }
        let goodbye = ev.event == PresenceKind::Goodbye;
        let join = store.presence(ev, presence::now_ms());
        if !goodbye && matches!(join, Join::New | Join::Restarted) {
            units.reload(nkey);
        }
    }
}

/// How long the gateway waits before it looks again for a maintenance bucket that is missing
/// (none is made until an operator first marks a machine) or a watch that ended.
const MAINTENANCE_RETRY: Duration = Duration::from_secs(5);

/// Follows the maintenance marks: a watch of the bucket delivers each machine's latest mark (or
/// its deletion), then every change. The gateway may only read the bucket; it waits for an
/// operator to create it.
async fn maintenance_loop(client: async_nats::Client, store: Store) {
    let js = async_nats::jetstream::new(client);
    loop {
        let watch = match js.get_key_value(MAINTENANCE_BUCKET).await {
            Ok(kv) => kv.watch_with_history(">").await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match watch {
            Ok(mut entries) => {
                while let Some(entry) = entries.next().await {
                    let entry = match entry {
                        Ok(entry) => entry,
                        Err(e) => {
                            tracing::warn!(error = %e, "maintenance watch failed; restarting");
                            break;
                        }
                    };
                    let mark = match entry.operation {
                        Operation::Put => match Maintenance::decode(&entry.value) {
                            Ok(mark) => Some(mark),
                            Err(e) => {
                                tracing::warn!(key = %entry.key, error = %e, "malformed maintenance mark ignored");
                                None
                            }
                        },
                        Operation::Delete | Operation::Purge => None,
                    };
                    store.set_maintenance(&entry.key, mark);
                }
            }
            Err(e) => tracing::debug!(error = %e, "no maintenance bucket yet"),
        }
        tokio::time::sleep(MAINTENANCE_RETRY).await;
    }
}

async fn metrics_loop(store: Store, mut sub: async_nats::Subscriber) {
    while let Some(msg) = sub.next().await {
        if let Some(nkey) = subject::nkey_of(&msg.subject) {
            store.set_agent_metrics(nkey, String::from_utf8_lossy(&msg.payload).into_owned());
        }
    }
}
