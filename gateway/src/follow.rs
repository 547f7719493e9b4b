//! The NATS side: the tasks that keep the [`Cache`] current.
//!
//! - presence (`dbus.presence.*`), after one read of the `cbus-agents` registry at start;
//! - unit PropertiesChanged (`dbus.signals.*.*.org.freedesktop.systemd1.unit.>`), applied from
//!   the payload, with a targeted `get` for followed properties that were only invalidated;
//! - systemd Manager `UnitNew`/`UnitRemoved` (`dbus.signals.*.*.org.freedesktop.systemd1`);
//! - agents' own metrics (`dbus.metrics.*`);
//! - a one-second tick that turns silent machines unresponsive;
//! - the loader: when a machine joins, restarts or its bus comes back, it asks systemd to emit
//!   signals (`Subscribe`; systemd only sends unit signals on the system bus while a client is
//!   subscribed), runs one `ListUnits`, and reads the timestamps and restart counts ListUnits
//!   does not carry with targeted `get`s at bounded concurrency. Never per scrape or per client.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use cbus_protocol::fleet::{AgentStatus, Fleet, Query};
use cbus_protocol::presence::{self, AgentState, PresenceEvent, PresenceKind};
use cbus_protocol::{headers, subject, Op, Request};
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};

use crate::cache::{Cache, Fetch, Join, SERVICE_IFACE, UNIT_IFACE};
use crate::requests::{ask, get_query, manager_call, MachineResult};

/// Machines loaded at once.
const MACHINE_CONCURRENCY: usize = 8;
/// Property reads in flight at once, over all machines.
const GET_CONCURRENCY: usize = 32;

/// Why following could not start.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("cannot subscribe to {subject}: {message}")]
    Subscribe { subject: String, message: String },
}

/// Handles of the follower, for the gateway's lifetime.
#[derive(Clone)]
pub struct Follower {
    pub fleet: Fleet,
    pub cache: Cache,
    joins: mpsc::UnboundedSender<String>,
    gets: Arc<Semaphore>,
    timeout: Duration,
}

async fn subscribe(
    client: &async_nats::Client,
    subject: &str,
) -> Result<async_nats::Subscriber, FollowError> {
    client
        .subscribe(subject.to_owned())
        .await
        .map_err(|e| FollowError::Subscribe {
            subject: subject.to_owned(),
            message: e.to_string(),
        })
}

/// Creates the registry bucket, or closes an old one to rollups and purges, retrying until it
/// worked once: under the generated permissions agents may not create or change the bucket
/// (`cbus_protocol::permissions`), so the gateway does, also when NATS comes up after it.
async fn close_registry(client: async_nats::Client) {
    let js = async_nats::jetstream::new(client);
    let mut pause = Duration::from_secs(1);
    loop {
        match cbus_protocol::fleet::close_registry(&js).await {
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
pub async fn start(
    fleet: Fleet,
    cache: Cache,
    timeout: Duration,
    mut reconnected: mpsc::UnboundedReceiver<()>,
) -> Result<Follower, FollowError> {
    let client = fleet.client().clone();
    let (joins, join_rx) = mpsc::unbounded_channel::<String>();
    let follower = Follower {
        fleet,
        cache,
        joins,
        gets: Arc::new(Semaphore::new(GET_CONCURRENCY)),
        timeout,
    };

    tokio::spawn(close_registry(client.clone()));

    // Subscribe first, then read the registry, so no event falls in between.
    let presence_sub = subscribe(&client, subject::PRESENCE_ALL).await?;
    let unit_signals =
        subscribe(&client, "dbus.signals.*.*.org.freedesktop.systemd1.unit.>").await?;
    let manager_signals = subscribe(&client, "dbus.signals.*.*.org.freedesktop.systemd1").await?;
    let agent_metrics = subscribe(&client, subject::METRICS_ALL).await?;
    match follower.fleet.registry().await {
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
                if follower.cache.presence(ev, a.last_seen_ms) == Join::New && alive {
                    let _ = follower.joins.send(nkey);
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "no registry; learning agents from heartbeats"),
    }

    tokio::spawn(follower.clone().load_loop(join_rx));
    tokio::spawn({
        let f = follower.clone();
        async move {
            while reconnected.recv().await.is_some() {
                let nkeys = f.cache.running_nkeys();
                tracing::info!(
                    machines = nkeys.len(),
                    "NATS reconnected; reloading machines"
                );
                for n in nkeys {
                    let _ = f.joins.send(n);
                }
            }
        }
    });
    tokio::spawn(follower.clone().presence_loop(presence_sub));
    tokio::spawn(follower.clone().unit_signal_loop(unit_signals));
    tokio::spawn(follower.clone().manager_signal_loop(manager_signals));
    tokio::spawn(follower.clone().metrics_loop(agent_metrics));
    tokio::spawn({
        let cache = follower.cache.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                cache.tick(presence::now_ms());
            }
        }
    });
    Ok(follower)
}

impl Follower {
    async fn presence_loop(self, mut sub: async_nats::Subscriber) {
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
            let join = self.cache.presence(ev, presence::now_ms());
            if !goodbye && matches!(join, Join::New | Join::Restarted) {
                let _ = self.joins.send(nkey);
            }
        }
    }

    async fn unit_signal_loop(self, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
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
            let Ok(args) = serde_json::from_slice::<Value>(&msg.payload) else {
                continue;
            };
            let fetch = self.cache.properties_changed(nkey, path, &args);
            if !fetch.is_empty() {
                tokio::spawn(self.clone().fetch(fetch));
            }
        }
    }

    async fn manager_signal_loop(self, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            let h = msg.headers.as_ref();
            let Some(nkey) = headers::get(h, headers::NKEY) else {
                continue;
            };
            let member = headers::get(h, headers::MEMBER);
            let Ok(args) = serde_json::from_slice::<Value>(&msg.payload) else {
                continue;
            };
            let (Some(name), Some(path)) = (
                args.get(0).and_then(Value::as_str),
                args.get(1).and_then(Value::as_str),
            ) else {
                continue;
            };
            match member {
                Some("UnitNew") if self.cache.unit_new(nkey, name, path) => {
                    tokio::spawn(self.clone().load_new_unit(
                        nkey.to_owned(),
                        name.to_owned(),
                        path.to_owned(),
                    ));
                }
                Some("UnitRemoved") => self.cache.unit_removed(nkey, name),
                _ => {}
            }
        }
    }

    async fn metrics_loop(self, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            if let Some(nkey) = subject::nkey_of(&msg.subject) {
                self.cache
                    .set_agent_metrics(nkey, String::from_utf8_lossy(&msg.payload).into_owned());
            }
        }
    }

    fn target(&self, nkey: &str) -> Option<AgentStatus> {
        let (mut t, _) = self.cache.targets(Some(&[nkey.to_owned()]));
        t.pop()
    }

    /// Reads one property under the global bound.
    async fn get(&self, target: &AgentStatus, query: Query) -> Option<(String, Value)> {
        let _permit = self.gets.acquire().await.ok()?;
        let name = query.member.clone()?;
        match ask(&self.fleet, target, &query, self.timeout).await {
            MachineResult::Ok(s) => Some((name, s.value)),
            other => {
                tracing::debug!(host = %target.info.hostname, property = %name, outcome = ?other, "property read failed");
                None
            }
        }
    }

    async fn fetch(self, fetch: Vec<Fetch>) {
        let Some(first) = fetch.first() else {
            return;
        };
        let Some(target) = self.target(&first.machine) else {
            return;
        };
        let mut patches = Vec::new();
        for f in &fetch {
            let q = get_query(
                crate::requests::SYSTEMD,
                &f.path,
                Some(f.interface),
                f.property,
            );
            if let Some((k, v)) = self.get(&target, q).await {
                patches.push((f.unit.clone(), BTreeMap::from([(k, v)])));
            }
        }
        self.cache.patch_units(&first.machine, &patches);
    }

    async fn load_new_unit(self, nkey: String, name: String, path: String) {
        let Some(target) = self.target(&nkey) else {
            return;
        };
        let _permit = self.gets.acquire().await;
        let getall = Query {
            destination: crate::requests::SYSTEMD.into(),
            path: path.clone(),
            op: Op::GetAll,
            member: None,
            request: Request {
                interface: Some(UNIT_IFACE.into()),
                ..Default::default()
            },
        };
        let mut props = BTreeMap::new();
        if let MachineResult::Ok(s) = ask(&self.fleet, &target, &getall, self.timeout).await {
            for (k, v) in s.value.as_object().into_iter().flatten() {
                props.insert(k.clone(), v.clone());
            }
        }
        drop(_permit);
        if name.ends_with(".service") {
            let q = get_query(
                crate::requests::SYSTEMD,
                &path,
                Some(SERVICE_IFACE),
                "NRestarts",
            );
            if let Some((k, v)) = self.get(&target, q).await {
                props.insert(k, v);
            }
        }
        self.cache.patch_units(&nkey, &[(name, props)]);
    }

    /// Loads machines that joined or restarted; coalesces bursts and bounds concurrency.
    async fn load_loop(self, mut joins: mpsc::UnboundedReceiver<String>) {
        let machines = Arc::new(Semaphore::new(MACHINE_CONCURRENCY));
        while let Some(first) = joins.recv().await {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut nkeys: HashSet<String> = HashSet::from([first]);
            while let Ok(n) = joins.try_recv() {
                nkeys.insert(n);
            }
            for nkey in nkeys {
                let Ok(permit) = machines.clone().acquire_owned().await else {
                    return;
                };
                let this = self.clone();
                tokio::spawn(async move {
                    this.load_machine(&nkey).await;
                    drop(permit);
                });
            }
        }
    }

    /// Subscribe + one ListUnits + targeted gets for one machine.
    pub async fn load_machine(&self, nkey: &str) {
        let Some(target) = self.target(nkey) else {
            return;
        };
        let host = target.info.hostname.clone();
        // Without a subscriber systemd sends no unit signals on the system bus. The agent's
        // policy must allow this call (it only makes systemd emit signals).
        match ask(
            &self.fleet,
            &target,
            &manager_call("Subscribe", json!([]), ""),
            self.timeout,
        )
        .await
        {
            MachineResult::Ok(_) => {}
            // Subscriptions belong to the agent's bus connection, which outlives our requests.
            MachineResult::Failed(e)
                if e.dbus_name.as_deref() == Some("org.freedesktop.systemd1.AlreadySubscribed") => {
            }
            other => {
                tracing::warn!(%host, outcome = ?other, "systemd Subscribe failed: unit changes made outside systemctl may arrive late (allow Manager.Subscribe in the agent policy)")
            }
        }
        let list = match ask(
            &self.fleet,
            &target,
            &manager_call("ListUnits", json!([]), ""),
            self.timeout,
        )
        .await
        {
            MachineResult::Ok(s) => s.value,
            other => {
                tracing::info!(%host, outcome = ?other, "could not list units");
                return;
            }
        };
        let Some(units) = list.get(0) else {
            return;
        };
        self.cache.load_units(nkey, units);
        let active: HashSet<String> = units
            .as_array()
            .into_iter()
            .flatten()
            .filter(|u| u.get(3).and_then(Value::as_str) == Some("active"))
            .filter_map(|u| u.get(0).and_then(Value::as_str).map(str::to_owned))
            .collect();
        let mut queries = Vec::new();
        for (name, path) in self.cache.unit_names(nkey) {
            let q = |iface, prop| {
                (
                    name.clone(),
                    get_query(crate::requests::SYSTEMD, &path, Some(iface), prop),
                )
            };
            queries.push(q(UNIT_IFACE, "StateChangeTimestamp"));
            if active.contains(&name) {
                queries.push(q(UNIT_IFACE, "ActiveEnterTimestamp"));
            }
            if name.ends_with(".service") {
                queries.push(q(SERVICE_IFACE, "NRestarts"));
            }
        }
        let mut by_unit: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
        let target = &target;
        let mut results = stream::iter(queries)
            .map(|(unit, q)| async move { (unit, self.get(target, q).await) })
            .buffer_unordered(GET_CONCURRENCY);
        while let Some((unit, r)) = results.next().await {
            if let Some((k, v)) = r {
                by_unit.entry(unit).or_default().insert(k, v);
            }
        }
        let patches: Vec<_> = by_unit.into_iter().collect();
        self.cache.patch_units(nkey, &patches);
        tracing::info!(%host, units = patches.len(), "units loaded");
    }
}
