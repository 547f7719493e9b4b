//! A **fleet emulator**: N emulated agents in one process, for scale work beyond what this
//! machine can run as real `cbus-agent` processes. It is an emulator, never a stand-in for a
//! real part in a correctness test of the agent: everything it is used for is also measured
//! with real agents at the sizes that fit (cbus-bench `scale`, docs/benchmarks.md), and its
//! figures are compared with theirs.
//!
//! What each emulated agent puts on the wire is an agent's: its own nkey, a hello and then a
//! heartbeat every interval on `dbus.presence.<nkey>` and into the registry bucket (key =
//! nkey), a subscription to its own requests and to broadcasts in its own queue group, answers
//! to pings, and replies in the shared envelope built with `cbus-protocol`'s types. It answers
//! get, getall, set, call and introspect on any object with fixed values, and systemd's
//! `ListUnits` / `ListUnitsByPatterns` / `Subscribe` with a unit list of its own
//! ([`EmulatedAgent::units`], the truth a gateway's cache is checked against).
//!
//! Units change like systemd's: [`Emulator::change_unit`] (and a `StartUnit`, `StopUnit` or
//! `RestartUnit` call) changes the truth and emits the `PropertiesChanged` signal systemd's
//! manager would, from the unique name that owns `org.freedesktop.systemd1` (`Sender-Name`),
//! so a gateway follows it as it follows a real machine; [`Emulator::set_unit`] changes it
//! silently (as while NATS is away).
//!
//! One difference, stated: N agents share `connections` NATS connections (real agents have
//! one each), because one process cannot hold 50,000 sockets to a local server comfortably.
//! Subjects, subscriptions, message counts and sizes are the same.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cbus_client::headers;
use cbus_protocol::envelope::{ErrorBody, ErrorCode, Reply, Request, Success};
use cbus_protocol::presence::{
    host_index_key, now_ms, rtt_claim, AgentInfo, PresenceEvent, PresenceKind, REGISTRY_BUCKET,
};
use cbus_protocol::subject::{self, Op, RequestSubject};
use futures::StreamExt;
use serde_json::{json, Value};

/// What to emulate.
#[derive(Debug, Clone)]
pub struct EmulatorSpec {
    pub agents: usize,
    /// Units each machine has (about 200 on a typical server).
    pub units: usize,
    pub heartbeat: Duration,
    /// NATS connections the agents share.
    pub connections: usize,
    /// Hostnames are `{prefix}{index:05}`.
    pub hostname_prefix: String,
}

impl EmulatorSpec {
    pub fn new(agents: usize) -> Self {
        EmulatorSpec {
            agents,
            units: 200,
            heartbeat: Duration::from_secs(5),
            connections: agents.div_ceil(250).max(1),
            hostname_prefix: "emu-".into(),
        }
    }
}

/// One emulated agent.
pub struct EmulatedAgent {
    pub info: AgentInfo,
    frozen: AtomicBool,
    /// (name, active state) of each unit; the emulator's truth.
    units: Mutex<Vec<(String, String)>>,
    /// unit name -> when its state last changed (µs since the epoch); the emulator's start
    /// for units never changed.
    since: Mutex<HashMap<String, u64>>,
    started_us: u64,
}

impl EmulatedAgent {
    /// The unit names and active states this machine reports.
    pub fn units(&self) -> Vec<(String, String)> {
        self.units.lock().expect("units lock").clone()
    }

    /// Sets unit `unit` to `active` in the truth and moves its StateChangeTimestamp to now, as
    /// systemd does for every change, signalled or not (a reader keeping the newest state by it
    /// must see this one as newer). The new timestamp, or `None` for a unit it does not have.
    fn set_state(&self, unit: &str, active: &str) -> Option<u64> {
        let mut units = self.units.lock().expect("units lock");
        let u = units.iter_mut().find(|(n, _)| n == unit)?;
        u.1 = active.to_owned();
        let now_us = now_ms() * 1000;
        self.since
            .lock()
            .expect("since lock")
            .insert(unit.to_owned(), now_us);
        Some(now_us)
    }

    /// Whether it is frozen (silent: no heartbeat, no answers), as a SIGSTOPped agent.
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Relaxed)
    }
}

/// Counters of what the emulator sent, for the bench's bytes-per-second figures.
#[derive(Debug, Default)]
pub struct Sent {
    pub heartbeats: AtomicU64,
    pub heartbeat_bytes: AtomicU64,
    pub replies: AtomicU64,
    pub signals: AtomicU64,
}

/// A running emulated fleet; its tasks end when it is dropped.
pub struct Emulator {
    pub agents: Vec<Arc<EmulatedAgent>>,
    pub sent: Arc<Sent>,
    /// Agent `i` publishes on `clients[i % clients.len()]`.
    clients: Vec<async_nats::Client>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// `name` matched against an fnmatch-style `pattern` (`*`, `?`), as systemd matches unit
/// patterns.
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            glob(&pattern[1..], name) || (!name.is_empty() && glob(pattern, &name[1..]))
        }
        (Some(b'?'), Some(_)) => glob(&pattern[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => glob(&pattern[1..], &name[1..]),
        _ => false,
    }
}

/// The unit names of machine `index`: the same mix on every machine, one unit that differs.
fn unit_names(index: usize, count: usize) -> Vec<(String, String)> {
    (0..count)
        .map(|u| {
            let name = match u {
                0 => format!("emu-own-{index:05}.service"),
                u if u % 10 == 9 => format!("emu-{u:03}.timer"),
                u => format!("emu-{u:03}.service"),
            };
            (name, "active".to_owned())
        })
        .collect()
}

fn list_row(name: &str, active: &str) -> Value {
    json!([
        name,
        format!("emulated unit {name}"),
        "loaded",
        active,
        if active == "active" {
            "running"
        } else {
            "dead"
        },
        "",
        cbus_protocol::names::systemd_unit_path(name),
        0,
        "",
        "/"
    ])
}

impl Emulator {
    /// Starts the agents on `url` (creating the registry bucket if missing) and returns once
    /// each has said hello.
    pub async fn start(url: &str, spec: &EmulatorSpec) -> Emulator {
        let mut clients = Vec::new();
        for _ in 0..spec.connections {
            clients.push(
                async_nats::ConnectOptions::new()
                    .subscription_capacity(65_536)
                    .connect(url)
                    .await
                    .expect("emulator connects to NATS"),
            );
        }
        let js = async_nats::jetstream::new(clients[0].clone());
        cbus_client::fleet::ensure_registry(&js, 1)
            .await
            .expect("registry bucket");
        let agents: Vec<Arc<EmulatedAgent>> = (0..spec.agents)
            .map(|i| {
                let nkey = nkeys::KeyPair::new_user().public_key();
                let mut info =
                    crate::synthetic_agent_info(nkey, format!("{}{i:05}", spec.hostname_prefix));
                info.heartbeat_ms = spec.heartbeat.as_millis() as u64;
                info.labels = BTreeMap::from([(
                    "role".to_owned(),
                    if i % 2 == 0 { "web" } else { "db" }.to_owned(),
                )])
                .into_iter()
                .collect();
                Arc::new(EmulatedAgent {
                    info,
                    frozen: AtomicBool::new(false),
                    units: Mutex::new(unit_names(i, spec.units)),
                    since: Mutex::new(HashMap::new()),
                    started_us: now_ms() * 1000,
                })
            })
            .collect();
        let sent = Arc::new(Sent::default());
        let mut tasks = Vec::new();
        for (c, client) in clients.iter().enumerate() {
            let mine: Vec<Arc<EmulatedAgent>> = agents
                .iter()
                .skip(c)
                .step_by(spec.connections)
                .cloned()
                .collect();
            for agent in &mine {
                tasks.push(tokio::spawn(serve_requests(
                    client.clone(),
                    agent.clone(),
                    sent.clone(),
                )));
            }
            tasks.push(tokio::spawn(answer_pings(client.clone(), mine.clone())));
            tasks.push(tokio::spawn(heartbeats(
                client.clone(),
                mine,
                spec.heartbeat,
                sent.clone(),
            )));
        }
        for client in &clients {
            client.flush().await.expect("flush");
        }
        Emulator {
            agents,
            sent,
            clients,
            tasks,
        }
    }

    /// Freezes agent `i`: no heartbeat and no answer, as a SIGSTOPped agent whose connection
    /// stays open.
    pub fn freeze(&self, i: usize) {
        self.agents[i].frozen.store(true, Ordering::Relaxed);
    }

    pub fn thaw(&self, i: usize) {
        self.agents[i].frozen.store(false, Ordering::Relaxed);
    }

    /// Changes the truth: unit `unit` of agent `i` is now in `active` state, as the next
    /// ListUnits reports it (no signal is sent, as when a change happens while NATS is away).
    pub fn set_unit(&self, i: usize, unit: &str, active: &str) {
        self.agents[i].set_state(unit, active);
    }
}

impl Emulator {
    /// Changes unit `unit` of agent `i` to `active` as systemd would: the truth, then the
    /// unit's `PropertiesChanged` signal (ActiveState, SubState, StateChangeTimestamp). False
    /// when the machine has no such unit or the publish failed.
    pub async fn change_unit(&self, i: usize, unit: &str, active: &str) -> bool {
        let agent = &self.agents[i];
        let client = &self.clients[i % self.clients.len()];
        change_and_signal(client, agent, unit, active, &self.sent).await
    }

    /// Waits until everything published so far reached the server.
    pub async fn flush(&self) {
        for c in &self.clients {
            let _ = c.flush().await;
        }
    }
}

/// The unique name the emulated systemd manager sends from.
const SYSTEMD_UNIQUE: &str = ":1.1";

/// Sets the unit's state and publishes its PropertiesChanged; false when unknown or unsent.
async fn change_and_signal(
    client: &async_nats::Client,
    agent: &EmulatedAgent,
    unit: &str,
    active: &str,
    sent: &Sent,
) -> bool {
    let Some(now_us) = agent.set_state(unit, active) else {
        return false;
    };
    let path = cbus_protocol::names::systemd_unit_path(unit);
    let Ok(subject) = subject::SignalSubject::new(&agent.info.nkey, SYSTEMD_UNIQUE, &path)
        .and_then(|s| s.encode())
    else {
        return false;
    };
    let args = json!([
        "org.freedesktop.systemd1.Unit",
        {
            "ActiveState": {"t": "s", "v": active},
            "SubState": {"t": "s", "v": sub_state(active)},
            "StateChangeTimestamp": {"t": "t", "v": now_us.to_string()},
        },
        []
    ]);
    let mut h = async_nats::HeaderMap::new();
    for (name, value) in [
        (headers::NKEY, agent.info.nkey.as_str()),
        (headers::HOSTNAME, agent.info.hostname.as_str()),
        (headers::SENDER, SYSTEMD_UNIQUE),
        (headers::SENDER_NAME, "org.freedesktop.systemd1"),
        (headers::PATH, path.as_str()),
        (headers::INTERFACE, "org.freedesktop.DBus.Properties"),
        (headers::MEMBER, "PropertiesChanged"),
        (headers::SIGNATURE, "sa{sv}as"),
    ] {
        headers::set(&mut h, name, value);
    }
    let ok = client
        .publish_with_headers(subject, h, args.to_string().into())
        .await
        .is_ok();
    if ok {
        sent.signals.fetch_add(1, Ordering::Relaxed);
    }
    ok
}

fn sub_state(active: &str) -> &'static str {
    match active {
        "active" => "running",
        "failed" => "failed",
        "activating" => "start",
        "deactivating" => "stop",
        _ => "dead",
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn serve_requests(client: async_nats::Client, agent: Arc<EmulatedAgent>, sent: Arc<Sent>) {
    let nkey = agent.info.nkey.clone();
    let Ok(targeted) = client.subscribe(subject::agent_requests(&nkey)).await else {
        return;
    };
    let Ok(broadcast) = client
        .queue_subscribe(subject::BROADCAST_ALL, nkey.clone())
        .await
    else {
        return;
    };
    let mut messages = futures::stream::select(targeted, broadcast);
    while let Some(msg) = messages.next().await {
        if agent.is_frozen() {
            continue;
        }
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
        let result = answer(&agent, &msg.subject, &msg.payload);
        let job = result
            .as_ref()
            .ok()
            .and_then(|_| unit_job(&msg.subject, &msg.payload));
        let reply = Reply {
            nkey: nkey.clone(),
            hostname: agent.info.hostname.clone(),
            result,
        };
        if client.publish(reply_to, reply.to_payload()).await.is_ok() {
            sent.replies.fetch_add(1, Ordering::Relaxed);
        }
        // The job runs after its reply, as systemd's: the unit's new state is signalled.
        if let Some((unit, active)) = job {
            change_and_signal(&client, &agent, &unit, active, &sent).await;
        }
    }
}

/// The unit and the state a StartUnit / RestartUnit / StopUnit call leaves it in.
fn unit_job(subject: &str, payload: &[u8]) -> Option<(String, &'static str)> {
    let s = RequestSubject::parse(subject).ok()?;
    let active = match (s.op, s.member.as_deref()?) {
        (Op::Call, "StartUnit" | "RestartUnit") => "active",
        (Op::Call, "StopUnit") => "inactive",
        _ => return None,
    };
    let args = Request::from_payload(payload).ok()?.args?;
    Some((args.get(0)?.as_str()?.to_owned(), active))
}

fn answer(agent: &EmulatedAgent, subject: &str, payload: &[u8]) -> Result<Success, ErrorBody> {
    let s = RequestSubject::parse(subject)
        .map_err(|e| ErrorBody::new(ErrorCode::InvalidArgument, e.to_string()))?;
    let request = Request::from_payload(payload)
        .map_err(|e| ErrorBody::new(ErrorCode::InvalidArgument, e.to_string()))?;
    let ok = |signature: &str, value: Value| {
        Ok(Success {
            signature: (!signature.is_empty()).then(|| signature.to_owned()),
            value,
        })
    };
    match (s.op, s.member.as_deref()) {
        (Op::Call, Some("ListUnits")) => {
            let rows: Vec<Value> = agent.units().iter().map(|(n, a)| list_row(n, a)).collect();
            ok("a(ssssssouso)", json!([rows]))
        }
        (Op::Call, Some("ListUnitsByPatterns")) => {
            let args = request.args.unwrap_or(Value::Null);
            let strings = |v: &Value| -> Vec<String> {
                v.as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|s| s.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let (states, patterns) = (strings(&args[0]), strings(&args[1]));
            let rows: Vec<Value> = agent
                .units()
                .iter()
                .filter(|(n, a)| {
                    (states.is_empty() || states.contains(a))
                        && (patterns.is_empty()
                            || patterns.iter().any(|p| glob(p.as_bytes(), n.as_bytes())))
                })
                .map(|(n, a)| list_row(n, a))
                .collect();
            ok("a(ssssssouso)", json!([rows]))
        }
        (Op::Call, Some("StartUnit" | "RestartUnit" | "StopUnit")) => {
            ok("o", json!("/org/freedesktop/systemd1/job/1"))
        }
        (Op::Call, _) => ok("", json!([])),
        // What the gateway reads of units and the manager, with values a Debian 12 machine
        // gives (types by signature, 64-bit numbers as strings).
        (Op::Get, Some("NRestarts" | "NAccepted" | "NConnections" | "NRefused")) => {
            ok("u", json!(0))
        }
        (Op::Get, Some(m)) if m.ends_with("Timestamp") || m == "LastTriggerUSec" => {
            let unit = cbus_protocol::token::systemd_unit_of_path(&s.path);
            let since = unit
                .and_then(|u| agent.since.lock().expect("since lock").get(&u).copied())
                .unwrap_or(agent.started_us);
            ok("t", json!(since.to_string()))
        }
        (Op::Get, Some("TasksCurrent")) => ok("t", json!("2")),
        (Op::Get, Some("TasksMax")) => ok("t", json!("4915")),
        (Op::Get, Some("Type")) => ok("s", json!("simple")),
        (Op::Get, Some("UnitFileState")) => ok("s", json!("enabled")),
        (Op::Get, Some("SystemState")) => {
            let failed = agent.units().iter().any(|(_, a)| a == "failed");
            ok("s", json!(if failed { "degraded" } else { "running" }))
        }
        (Op::Get, Some("Version")) => ok("s", json!("252.39-1~deb12u2")),
        (Op::Get, _) => ok("s", json!("emulated")),
        (Op::GetAll, _) => {
            let failed = agent.units().iter().any(|(_, a)| a == "failed");
            let props = json!({
                "Version": {"t": "s", "v": "252.39-1~deb12u2"},
                "SystemState": {"t": "s", "v": if failed { "degraded" } else { "running" }},
                "LogLevel": {"t": "s", "v": "info"},
            });
            // Without an interface, every interface's properties, by interface.
            match request.interface {
                Some(_) => ok("a{sv}", props),
                None => ok(
                    "a{sa{sv}}",
                    json!({"org.freedesktop.systemd1.Manager": props}),
                ),
            }
        }
        (Op::Set, _) => ok("", Value::Null),
        (Op::Introspect, _) => ok("", introspection()),
        (Op::ListNames, _) => ok("a{ss}", json!({"org.freedesktop.systemd1": ":1.1"})),
    }
}

/// What introspecting any object gives: a few of systemd's Manager members (an
/// `ObjectSchema`, as an agent sends it).
fn introspection() -> Value {
    let arg = |name: &str, ty: &str| json!({"name": name, "type": ty});
    let prop = |name: &str, access: &str| json!({"name": name, "type": "s", "access": access});
    json!({
        "xml": "",
        "interfaces": [{
            "name": "org.freedesktop.systemd1.Manager",
            "methods": [{
                "name": "RestartUnit",
                "in": [arg("name", "s"), arg("mode", "s")],
                "out": [arg("job", "o")],
            }],
            "properties": [prop("Version", "read"), prop("SystemState", "read"), prop("LogLevel", "readwrite")],
            "signals": [{"name": "UnitNew", "args": [arg("id", "s"), arg("unit", "o")]}],
        }],
        "children": ["unit"],
    })
}

/// Answers each ping as an agent does: a heartbeat on each agent's own presence subject; a
/// probe (`dbus.ping.<nkey>`) is answered by that agent alone, unless it is frozen.
async fn answer_pings(client: async_nats::Client, agents: Vec<Arc<EmulatedAgent>>) {
    let (Ok(pings), Ok(probes)) = (
        client.subscribe(subject::PING).await,
        client.subscribe(subject::PING_ONE_ALL).await,
    ) else {
        return;
    };
    let by_nkey: HashMap<&str, &Arc<EmulatedAgent>> =
        agents.iter().map(|a| (a.info.nkey.as_str(), a)).collect();
    let mut pings = futures::stream::select(pings, probes);
    while let Some(ping) = pings.next().await {
        // Every connection hears every probe; each answers for its own agents only.
        let asked: Vec<&Arc<EmulatedAgent>> = match subject::nkey_of(&ping.subject) {
            Some(nkey) => by_nkey.get(nkey).copied().into_iter().collect(),
            None => agents.iter().collect(),
        };
        for agent in asked.into_iter().filter(|a| !a.is_frozen()) {
            let ev = PresenceEvent {
                event: PresenceKind::Heartbeat,
                sent_at_ms: now_ms(),
                agent: agent.info.clone(),
            };
            if let Ok(body) = serde_json::to_vec(&ev) {
                let presence = subject::presence(&agent.info.nkey);
                let _ = client.publish(presence, body.into()).await;
            }
        }
    }
}

/// Hello from every agent, then heartbeats spread evenly over the interval, each a presence
/// message and a registry write (acknowledged, as an agent's are). The first write of each round
/// is awaited at once and timed: the round trip every agent of this connection claims
/// (`rtt_ms`, as an agent claims its own writes'; the others' acks are awaited after the round).
async fn heartbeats(
    client: async_nats::Client,
    agents: Vec<Arc<EmulatedAgent>>,
    period: Duration,
    sent: Arc<Sent>,
) {
    let js = async_nats::jetstream::new(client.clone());
    let mut kind = PresenceKind::Hello;
    let step = period / agents.len().max(1) as u32;
    let mut rtt_ms = None;
    loop {
        let round = tokio::time::Instant::now();
        let mut acks = Vec::with_capacity(agents.len());
        let mut timed = false;
        for (i, agent) in agents.iter().enumerate() {
            if agent.is_frozen() {
                continue;
            }
            let mut info = agent.info.clone();
            info.rtt_ms = rtt_ms;
            let ev = PresenceEvent {
                event: kind,
                sent_at_ms: now_ms(),
                agent: info,
            };
            let Ok(body) = serde_json::to_vec(&ev) else {
                continue;
            };
            let presence = subject::presence(&agent.info.nkey);
            let key = format!("$KV.{REGISTRY_BUCKET}.{}", agent.info.nkey);
            sent.heartbeats.fetch_add(1, Ordering::Relaxed);
            sent.heartbeat_bytes.fetch_add(
                (2 * body.len() + presence.len() + key.len()) as u64,
                Ordering::Relaxed,
            );
            let _ = client.publish(presence, body.clone().into()).await;
            let written = tokio::time::Instant::now();
            if let Ok(ack) = js.publish(key, body.into()).await {
                if timed {
                    acks.push(ack);
                } else if let Ok(Ok(_)) =
                    tokio::time::timeout(period, std::future::IntoFuture::into_future(ack)).await
                {
                    timed = true;
                    rtt_ms = Some(rtt_claim(rtt_ms, written.elapsed()));
                }
            }
            // The host index key, as an agent writes it beside its entry at hello (and every
            // ten minutes, longer than an emulated fleet lives).
            if kind == PresenceKind::Hello {
                if let Some(index) = host_index_key(&agent.info.hostname, &agent.info.nkey) {
                    if let Ok(ack) = js
                        .publish(format!("$KV.{REGISTRY_BUCKET}.{index}"), "".into())
                        .await
                    {
                        acks.push(ack);
                    }
                }
            }
            if kind == PresenceKind::Heartbeat && !step.is_zero() {
                tokio::time::sleep_until(round + step * (i as u32 + 1)).await;
            }
        }
        for ack in acks {
            let _ = tokio::time::timeout(period, std::future::IntoFuture::into_future(ack)).await;
        }
        kind = PresenceKind::Heartbeat;
        tokio::time::sleep_until(round + period).await;
    }
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn globs_match_as_fnmatch() {
        assert!(glob(b"emu-*.service", b"emu-001.service"));
        assert!(!glob(b"emu-*.service", b"emu-009.timer"));
        assert!(glob(b"emu-00?.timer", b"emu-009.timer"));
        assert!(glob(b"*", b""));
        assert!(!glob(b"a", b"ab"));
    }
}
