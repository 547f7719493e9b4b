//! The NATS side: the tasks that keep the [`Cache`] current.
//!
//! - presence (`dbus.presence.*`), after one read of the `cbus-agents` registry at start;
//! - unit PropertiesChanged (`dbus.signals.*.*.org.freedesktop.systemd1.unit.>`), applied from
//!   the payload, with a targeted `get` for followed properties that were only invalidated;
//! - systemd Manager `UnitNew`/`UnitRemoved`/`Reloading` (`dbus.signals.*.*.org.freedesktop.systemd1`);
//! - agents' own metrics (`dbus.metrics.*`);
//! - a one-second tick that turns silent machines unresponsive;
//! - the loader: when a machine joins, restarts or its bus comes back, it asks systemd to emit
//!   signals (`Subscribe`; systemd only sends unit signals on the system bus while a client is
//!   subscribed), runs one `ListUnits`, and reads the timestamps and restart counts ListUnits
//!   does not carry with targeted `get`s at bounded concurrency. Never per scrape or per client.
//!
//! Signals are claims, not facts: any local user on a host can emit any signal on its system bus
//! (`busctl emit`), and an agent can put anything in its headers. So unit state is taken only
//! from signals whose sender owns `org.freedesktop.systemd1` (`headers::sender_owns`), and a
//! signal's machine is the `<nkey>` token of its subject, which the server's permissions tie to
//! the publishing agent; a `NKey` header that disagrees drops the message. Both are counted
//! (`cbus_gateway_dropped_total`).
//!
//! Reading a unit's object loads it (systemd loads units on access). A gateway that answered
//! UnitNew by reading the unit loaded it again after systemd unloaded it, for ever: one
//! `systemctl status nosuch.service` on a host made 3,000-5,000 signals/s (Cockpit #22393 is the
//! same loop). So a UnitNew only queues a check with `ListUnitsByPatterns`, which lists loaded
//! units and loads nothing; not-found units are remembered (bounded, for a while) and never
//! followed, one check per machine and unit is in flight at most, and all follow-up work goes
//! through one bounded queue served by one worker: a full queue drops and counts, it never
//! spawns a task per signal.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cbus_client::fleet::{AgentStatus, Fleet, Query};
use cbus_client::headers;
use cbus_protocol::presence::{self, AgentState, PresenceEvent, PresenceKind};
use cbus_protocol::subject;
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};

use crate::cache::{Cache, Fetch, Join, SERVICE_IFACE, UNIT_IFACE};
use crate::requests::{ask, get_query, manager_call, MachineResult, SYSTEMD};
use crate::stats::{self, Dropped};

/// Machines loaded at once.
const MACHINE_CONCURRENCY: usize = 8;
/// Property reads in flight at once, over all machines.
const GET_CONCURRENCY: usize = 32;
/// Follow-up work (unit checks, reads of invalidated properties) queued at most. A busy fleet
/// makes a few per second; 1,024 is minutes of that, and a few hundred KB at most.
const WORK_QUEUE: usize = 1024;
/// Work items the worker runs at once (each one round trip to one machine).
const WORK_CONCURRENCY: usize = 8;
/// Unit names systemd said it does not have, remembered at most, over all machines.
const NOT_FOUND_MAX: usize = 4096;
/// How long such a name is not asked about again (a daemon-reload forgets them at once).
const NOT_FOUND_TTL: Duration = Duration::from_secs(60);
/// Active states in which systemd never unloads a unit, so reading its object loads nothing.
const PINNED_STATES: [&str; 4] = ["active", "reloading", "activating", "deactivating"];

/// Machines to (re)load. A set, not a queue: an agent that claims to restart a thousand times a
/// second (a hello with a new start time each) costs one pending entry, and one load of it at a
/// time; a reload asked for while it loads runs once after.
#[derive(Default)]
struct Joins {
    state: Mutex<JoinState>,
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct JoinState {
    pending: HashSet<String>,
    loading: HashSet<String>,
}

impl Joins {
    fn lock(&self) -> MutexGuard<'_, JoinState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn request(&self, nkey: String) {
        let mut s = self.lock();
        let wake = !s.loading.contains(&nkey);
        s.pending.insert(nkey);
        drop(s);
        if wake {
            self.wake.notify_one();
        }
    }

    /// The pending machines that are not loading now; they are loading from here on.
    fn take_ready(&self) -> Vec<String> {
        let mut s = self.lock();
        let JoinState { pending, loading } = &mut *s;
        let ready: Vec<String> = pending
            .iter()
            .filter(|n| !loading.contains(*n))
            .cloned()
            .collect();
        for n in &ready {
            pending.remove(n);
            loading.insert(n.clone());
        }
        ready
    }

    fn done(&self, nkey: &str) {
        let mut s = self.lock();
        s.loading.remove(nkey);
        let again = s.pending.contains(nkey);
        drop(s);
        if again {
            self.wake.notify_one();
        }
    }
}

/// What the worker does.
enum Work {
    /// A UnitNew: ask systemd, without loading the unit, whether it is loaded and found.
    CheckUnit { nkey: String, name: String },
    /// Properties a systemd signal only invalidated.
    Fetch(Vec<Fetch>),
}

/// What happened to a unit since its check was queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Queued,
    /// UnitRemoved came: the answer may be stale; drop it.
    Removed,
    /// UnitNew came again after a UnitRemoved: check once more when this one is done.
    Renewed,
}

#[derive(Default)]
struct Pending {
    /// (nkey, unit) -> state, for checks queued or in flight: at most one per unit.
    checks: HashMap<(String, String), Check>,
    /// (nkey, unit) -> when systemd said it has no such unit.
    not_found: HashMap<(String, String), Instant>,
}

impl Pending {
    fn remember_not_found(&mut self, key: (String, String)) {
        if self.not_found.len() >= NOT_FOUND_MAX {
            self.not_found.retain(|_, t| t.elapsed() < NOT_FOUND_TTL);
        }
        if self.not_found.len() >= NOT_FOUND_MAX {
            // Still full of fresh names (someone reads made-up units fast): forget one; the
            // worst case is one more check for it, never a load.
            if let Some(k) = self.not_found.keys().next().cloned() {
                self.not_found.remove(&k);
            }
        }
        self.not_found.insert(key, Instant::now());
    }

    fn known_not_found(&self, key: &(String, String)) -> bool {
        self.not_found
            .get(key)
            .is_some_and(|t| t.elapsed() < NOT_FOUND_TTL)
    }

    fn forget_machine(&mut self, nkey: &str) {
        self.not_found.retain(|(n, _), _| n != nkey);
    }
}

/// The machine a signal is from: the `<nkey>` token of its subject
/// (`dbus.signals.<nkey>.<sender>.<path>`), which NATS permissions tie to the agent that
/// published it. A `NKey` header naming another machine is a forgery: the message is dropped
/// and counted (`None`).
pub fn signal_machine<'a>(subject: &'a str, h: Option<&async_nats::HeaderMap>) -> Option<&'a str> {
    let nkey = subject.split('.').nth(2)?;
    subject::validate_nkey(nkey).ok()?;
    match headers::get(h, headers::NKEY) {
        Some(claimed) if claimed != nkey => {
            stats::dropped(Dropped::NkeyMismatch);
            tracing::debug!(%subject, claimed, "signal whose NKey header disagrees with its subject dropped");
            None
        }
        _ => Some(nkey),
    }
}

/// Whether a signal that would change unit state comes from systemd; counts those that don't.
fn from_systemd(h: Option<&async_nats::HeaderMap>) -> bool {
    let ok = headers::sender_owns(h, SYSTEMD);
    if !ok {
        stats::dropped(Dropped::NotFromSystemd);
    }
    ok
}

/// A glob matching exactly `name` (ListUnitsByPatterns takes fnmatch patterns).
fn glob_literal(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if matches!(c, '*' | '?' | '[' | ']') {
            out.push('[');
            out.push(c);
            out.push(']');
        } else {
            out.push(c);
        }
    }
    out
}

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
    joins: Arc<Joins>,
    gets: Arc<Semaphore>,
    timeout: Duration,
    work: mpsc::Sender<Work>,
    pending: Arc<Mutex<Pending>>,
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
pub async fn start(
    fleet: Fleet,
    cache: Cache,
    timeout: Duration,
    mut reconnected: mpsc::UnboundedReceiver<()>,
) -> Result<Follower, FollowError> {
    let client = fleet.client().clone();
    let (work, work_rx) = mpsc::channel::<Work>(WORK_QUEUE);
    let follower = Follower {
        fleet,
        cache,
        joins: Arc::default(),
        gets: Arc::new(Semaphore::new(GET_CONCURRENCY)),
        timeout,
        work,
        pending: Arc::default(),
    };

    // The first attempt before the registry read below, so a new fleet's read finds the bucket;
    // later ones in the background (NATS may come up after the gateway).
    let mut closing = tokio::spawn(close_registry(client.clone()));
    let _ = tokio::time::timeout(Duration::from_secs(2), &mut closing).await;

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
                    follower.joins.request(nkey);
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "no registry; learning agents from heartbeats"),
    }

    tokio::spawn(follower.clone().load_loop());
    tokio::spawn(follower.clone().work_loop(work_rx));
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
                    f.joins.request(n);
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
                self.joins.request(nkey);
            }
        }
    }

    async fn unit_signal_loop(self, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            let h = msg.headers.as_ref();
            if headers::get(h, headers::MEMBER) != Some("PropertiesChanged") {
                continue;
            }
            let Some(nkey) = signal_machine(&msg.subject, h) else {
                continue;
            };
            if !from_systemd(h) {
                continue;
            }
            let Some(path) = headers::get(h, headers::PATH) else {
                continue;
            };
            let Ok(args) = serde_json::from_slice::<Value>(&msg.payload) else {
                continue;
            };
            let fetch = match self.cache.properties_changed(nkey, path, &args) {
                Some(fetch) => fetch,
                None => {
                    // systemd reports a change of a unit the cache does not follow: it is
                    // loaded now (e.g. found since it was last checked). Checking loads nothing.
                    if let Some(name) = cbus_protocol::token::systemd_unit_of_path(path) {
                        if self.cache.wants_unit(nkey, &name) {
                            let key = (nkey.to_owned(), name);
                            let mut p = self.pending();
                            p.not_found.remove(&key);
                            if !p.checks.contains_key(&key) {
                                self.enqueue_check(&mut p, key);
                            }
                        }
                    }
                    continue;
                }
            };
            if !fetch.is_empty() && self.work.try_send(Work::Fetch(fetch)).is_err() {
                stats::dropped(Dropped::WorkQueueFull);
            }
        }
    }

    async fn manager_signal_loop(self, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            let h = msg.headers.as_ref();
            let Some(nkey) = signal_machine(&msg.subject, h) else {
                continue;
            };
            let member = headers::get(h, headers::MEMBER);
            if !matches!(member, Some("UnitNew" | "UnitRemoved" | "Reloading")) {
                continue;
            }
            if !from_systemd(h) {
                continue;
            }
            if member == Some("Reloading") {
                // Unit files may have appeared: names systemd had not found may exist now.
                self.pending().forget_machine(nkey);
                continue;
            }
            let Ok(args) = serde_json::from_slice::<Value>(&msg.payload) else {
                continue;
            };
            let Some(name) = args.get(0).and_then(Value::as_str) else {
                continue;
            };
            match member {
                Some("UnitNew") => self.unit_new(nkey, name),
                Some("UnitRemoved") => {
                    let key = (nkey.to_owned(), name.to_owned());
                    if let Some(c) = self.pending().checks.get_mut(&key) {
                        *c = Check::Removed;
                    }
                    self.cache.unit_removed(nkey, name);
                }
                _ => {}
            }
        }
    }

    fn pending(&self) -> MutexGuard<'_, Pending> {
        // Every update leaves the maps consistent, so a poisoned lock is still usable.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a check of a unit systemd just loaded, unless one is queued already or systemd
    /// recently said it has no such unit.
    fn unit_new(&self, nkey: &str, name: &str) {
        if !self.cache.wants_unit(nkey, name) {
            return;
        }
        let key = (nkey.to_owned(), name.to_owned());
        let mut p = self.pending();
        if p.known_not_found(&key) {
            return;
        }
        if let Some(c) = p.checks.get_mut(&key) {
            if *c == Check::Removed {
                *c = Check::Renewed;
            }
            return;
        }
        self.enqueue_check(&mut p, key);
    }

    fn enqueue_check(&self, p: &mut Pending, key: (String, String)) {
        let work = Work::CheckUnit {
            nkey: key.0.clone(),
            name: key.1.clone(),
        };
        match self.work.try_send(work) {
            Ok(()) => {
                p.checks.insert(key, Check::Queued);
            }
            Err(_) => stats::dropped(Dropped::WorkQueueFull),
        }
    }

    /// Runs queued work, [`WORK_CONCURRENCY`] items at a time; the queue stays bounded because
    /// nothing is taken from it while that many are running.
    async fn work_loop(self, rx: mpsc::Receiver<Work>) {
        let items = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|w| (w, rx)) });
        items
            .for_each_concurrent(WORK_CONCURRENCY, |w| {
                let this = self.clone();
                async move {
                    match w {
                        Work::CheckUnit { nkey, name } => this.check_unit(nkey, name).await,
                        Work::Fetch(f) => this.fetch(f).await,
                    }
                }
            })
            .await;
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
            let q = get_query(SYSTEMD, &f.path, Some(f.interface), f.property);
            if let Some((k, v)) = self.get(&target, q).await {
                patches.push((f.unit.clone(), BTreeMap::from([(k, v)])));
            }
        }
        self.cache.patch_units(&first.machine, &patches);
    }

    /// Asks systemd about a unit it announced, without loading it (ListUnitsByPatterns lists
    /// loaded units only), and follows it if it is loaded and found.
    async fn check_unit(self, nkey: String, name: String) {
        stats::unit_checked();
        let key = (nkey, name);
        let row = match self.target(&key.0) {
            None => None,
            Some(target) => {
                let q = manager_call(
                    "ListUnitsByPatterns",
                    json!([[], [glob_literal(&key.1)]]),
                    "asas",
                );
                let _permit = self.gets.acquire().await;
                match ask(&self.fleet, &target, &q, self.timeout).await {
                    MachineResult::Ok(s) => Some(
                        s.value
                            .get(0)
                            .and_then(Value::as_array)
                            .and_then(|rows| {
                                rows.iter().find(|r| {
                                    r.get(0).and_then(Value::as_str) == Some(key.1.as_str())
                                })
                            })
                            .cloned(),
                    ),
                    other => {
                        tracing::debug!(unit = %key.1, outcome = ?other, "unit check failed");
                        None
                    }
                }
                .map(|row| (target, row))
            }
        };
        let state = self.pending().checks.remove(&key);
        let Some((target, row)) = row else {
            return; // the check failed: the next UnitNew or reload tries again
        };
        let not_found = row
            .as_ref()
            .is_some_and(|r| r.get(2).and_then(Value::as_str) == Some("not-found"));
        if not_found {
            // Whatever happened since, systemd had no such unit when asked.
            self.pending().remember_not_found(key);
            return;
        }
        match state {
            Some(Check::Queued) => {}
            Some(Check::Renewed) => {
                // Loaded again after it was removed: this answer may predate that.
                let mut p = self.pending();
                self.enqueue_check(&mut p, key);
                return;
            }
            Some(Check::Removed) | None => return,
        }
        // Not loaded (any more): nothing to follow until systemd loads it again (UnitNew).
        let Some(row) = row else {
            return;
        };
        let (nkey, name) = key;
        if !self.cache.add_unit(&nkey, &row) {
            return;
        }
        // Reading an object loads its unit: only units systemd cannot unload meanwhile are read.
        let active = row.get(3).and_then(Value::as_str).unwrap_or("");
        if !PINNED_STATES.contains(&active) {
            return;
        }
        let path = row.get(6).and_then(Value::as_str).unwrap_or("").to_owned();
        let mut queries = vec![
            get_query(SYSTEMD, &path, Some(UNIT_IFACE), "StateChangeTimestamp"),
            get_query(SYSTEMD, &path, Some(UNIT_IFACE), "ActiveEnterTimestamp"),
        ];
        if name.ends_with(".service") {
            queries.push(get_query(SYSTEMD, &path, Some(SERVICE_IFACE), "NRestarts"));
        }
        let mut props = BTreeMap::new();
        for q in queries {
            if let Some((k, v)) = self.get(&target, q).await {
                props.insert(k, v);
            }
        }
        self.cache.patch_units(&nkey, &[(name, props)]);
    }

    /// Loads machines that joined or restarted; coalesces bursts and bounds concurrency.
    async fn load_loop(self) {
        let machines = Arc::new(Semaphore::new(MACHINE_CONCURRENCY));
        loop {
            self.joins.wake.notified().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            for nkey in self.joins.take_ready() {
                let Ok(permit) = machines.clone().acquire_owned().await else {
                    return;
                };
                let this = self.clone();
                tokio::spawn(async move {
                    this.load_machine(&nkey).await;
                    drop(permit);
                    this.joins.done(&nkey);
                });
            }
        }
    }

    /// Subscribe + one ListUnits + targeted gets for one machine.
    pub async fn load_machine(&self, nkey: &str) {
        let Some(target) = self.target(nkey) else {
            return;
        };
        self.pending().forget_machine(nkey);
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
            let q = |iface, prop| (name.clone(), get_query(SYSTEMD, &path, Some(iface), prop));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert_eq!(glob_literal("a*b?[c]"), "a[*]b[?][[]c[]]");
    }

    #[test]
    fn not_found_names_are_bounded() {
        let mut p = Pending::default();
        for i in 0..NOT_FOUND_MAX + 10 {
            p.remember_not_found(("U".into(), format!("u{i}.service")));
        }
        assert_eq!(p.not_found.len(), NOT_FOUND_MAX);
        assert!(p.known_not_found(&("U".into(), format!("u{}.service", NOT_FOUND_MAX + 9))));
        p.forget_machine("U");
        assert!(p.not_found.is_empty());
    }
}

#[cfg(test)]
mod join_tests {
    use super::*;

    #[test]
    fn a_machine_loads_once_at_a_time_however_often_it_is_asked() {
        let j = Joins::default();
        for _ in 0..1000 {
            j.request("A".into());
        }
        j.request("B".into());
        let mut first = j.take_ready();
        first.sort();
        assert_eq!(first, ["A", "B"]);
        j.request("A".into());
        assert!(j.take_ready().is_empty(), "A is loading");
        j.done("A");
        assert_eq!(
            j.take_ready(),
            ["A"],
            "asked again while loading: once more"
        );
        j.done("A");
        j.done("B");
        assert!(j.take_ready().is_empty());
    }
}
