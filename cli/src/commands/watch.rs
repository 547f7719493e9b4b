//! `cbus watch UNIT` / `cbus watch DEST PATH [IFACE.]PROP`: one unit's state, or one property,
//! live across the fleet.
//!
//! One fan-out reads the value on every machine; from then on values come from
//! `PropertiesChanged` signals only (one subscription to the object's exact subject), taken only
//! from the owner of DEST (systemd for a unit) on the machine the subject names. A property
//! that was only invalidated is read once for that machine (one read in flight per machine).
//! systemd sends units' signals only while a client is subscribed, so a unit watch calls
//! `Subscribe` on every machine (again when an agent says hello after a restart).
//!
//! Liveness comes from the agents' heartbeats (`dbus.presence.*`): a machine silent for more
//! than three of its intervals is shown `unresponsive (silent 7s)`, one that said goodbye
//! `stopped`, one whose first read got no answer `no answer`. A machine that comes back is read
//! again, since its signals may have been lost meanwhile.
//!
//! On a terminal (stdout), a table redrawn in place: counts by value on top, rows that changed
//! in the last few seconds in reverse video. Otherwise NDJSON: one line per machine for the
//! first read, then one per change (of value or of liveness). Plain ANSI sequences; no terminal
//! library.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use cbus_client::fleet::{AgentStatus, Outcome, Query};
use cbus_client::systemd::{self, PropertiesChanged};
use cbus_protocol::names;
use cbus_protocol::presence::{now_ms, AgentState, PresenceEvent, PresenceKind, MISSED_HEARTBEATS};
use cbus_protocol::subject::{self, SignalFilter};
use cbus_protocol::{Op, Request};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::error::{usage, Failure};
use crate::fanout::Context;
use crate::output;
use crate::render::{self, Format};

/// How long a changed row stays highlighted.
const HIGHLIGHT: Duration = Duration::from_secs(5);
/// The most redraws per second.
const REDRAW_EVERY: Duration = Duration::from_millis(100);
/// How often liveness is checked (and the screen's SINCE column refreshed).
const TICK: Duration = Duration::from_secs(1);
/// Largest presence message read.
const MAX_PRESENCE_BYTES: usize = 64 * 1024;
/// Rows shown on a terminal at most (the rest counted).
const MAX_ROWS: usize = 200;

/// What is watched.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub dest: String,
    pub path: String,
    pub interface: Option<String>,
    pub property: String,
    /// `Some(unit)`: a unit's ActiveState, shown with its SubState.
    pub unit: Option<String>,
}

impl Target {
    /// From the command line: `UNIT` or `DEST PATH [IFACE.]PROP`; checked before connecting.
    pub fn parse(what: &[String]) -> Result<Target, Failure> {
        match what {
            [unit] => {
                let unit = systemd::mangle(unit).map_err(usage)?;
                Ok(Target {
                    dest: systemd::DESTINATION.into(),
                    path: systemd::unit_path(&unit),
                    interface: Some(systemd::UNIT.into()),
                    property: "ActiveState".into(),
                    unit: Some(unit),
                })
            }
            [dest, path, prop] => {
                names::validate_bus_name(dest).map_err(usage)?;
                if dest.starts_with(':') {
                    return Err(Failure::Usage(
                        "watch follows a well-known bus name (signals are believed from its \
                         owner), not a unique name"
                            .into(),
                    ));
                }
                names::validate_object_path(path).map_err(usage)?;
                let (interface, property) = names::split_member(prop).map_err(usage)?;
                Ok(Target {
                    dest: dest.clone(),
                    path: path.clone(),
                    interface,
                    property,
                    unit: None,
                })
            }
            _ => Err(Failure::Usage(
                "watch takes UNIT, or DEST PATH [IFACE.]PROPERTY".into(),
            )),
        }
    }

    fn query(&self, property: &str) -> Query {
        Query {
            destination: self.dest.clone(),
            path: self.path.clone(),
            op: Op::Get,
            member: Some(property.into()),
            request: Request {
                interface: self.interface.clone(),
                ..Default::default()
            },
        }
    }

    fn title(&self) -> String {
        match &self.unit {
            Some(u) => format!("{u} ActiveState"),
            None => format!(
                "{} {} {}{}",
                self.dest,
                self.path,
                self.interface
                    .as_deref()
                    .map(|i| format!("{i}."))
                    .unwrap_or_default(),
                self.property
            ),
        }
    }

    /// The watched properties a change carries: (ActiveState or the property, SubState).
    fn values_in(&self, change: &PropertiesChanged) -> Option<(Change, Change)> {
        if self
            .interface
            .as_deref()
            .is_some_and(|i| i != change.interface)
        {
            return None;
        }
        let main = Change::of(change.value_of(&self.property));
        let sub = match self.unit {
            Some(_) => Change::of(change.value_of("SubState")),
            None => Change::None,
        };
        (!matches!((&main, &sub), (Change::None, Change::None))).then_some((main, sub))
    }
}

/// One property in a `PropertiesChanged`.
#[derive(Debug, Clone, PartialEq)]
enum Change {
    None,
    Value(Value),
    Invalidated,
}

impl Change {
    fn of(v: Option<Result<&Value, ()>>) -> Change {
        match v {
            None => Change::None,
            Some(Ok(v)) => Change::Value(v.clone()),
            Some(Err(())) => Change::Invalidated,
        }
    }
}

/// Whether a machine can be heard.
#[derive(Debug, Clone, PartialEq)]
enum Liveness {
    Live,
    /// Its first read got no answer (or an error): why.
    NoAnswer(String),
    Unresponsive,
    Stopped,
}

impl Liveness {
    fn word(&self) -> &'static str {
        match self {
            Liveness::Live => "live",
            Liveness::NoAnswer(_) => "no-answer",
            Liveness::Unresponsive => "unresponsive",
            Liveness::Stopped => "stopped",
        }
    }
}

/// One machine's row.
#[derive(Debug, Clone)]
struct Row {
    host: String,
    nkey: String,
    value: Option<Value>,
    sub: Option<Value>,
    liveness: Liveness,
    /// When its value or liveness last changed (for the highlight and SINCE).
    changed: Option<Instant>,
    /// Last presence message.
    heard: Instant,
    heartbeat: Duration,
}

impl Row {
    fn new(a: &AgentStatus) -> Row {
        let silent = Duration::from_millis(now_ms().saturating_sub(a.last_seen_ms));
        Row {
            host: a.info.hostname.clone(),
            nkey: a.info.nkey.clone(),
            value: None,
            sub: None,
            liveness: match a.state {
                AgentState::Running => Liveness::Live,
                AgentState::Unresponsive => Liveness::Unresponsive,
                AgentState::Stopped | AgentState::Gone => Liveness::Stopped,
            },
            changed: None,
            heard: Instant::now()
                .checked_sub(silent)
                .unwrap_or_else(Instant::now),
            heartbeat: Duration::from_millis(a.info.heartbeat_ms.max(1)),
        }
    }

    fn silent(&self) -> Duration {
        self.heard.elapsed()
    }

    fn shown(&self) -> String {
        match &self.value {
            Some(v) => text(v),
            None => "-".into(),
        }
    }

    /// The value's count label: the value when live, else the liveness.
    fn bucket(&self) -> String {
        match &self.liveness {
            Liveness::Live => self.shown(),
            other => other.word().to_owned(),
        }
    }

    fn status(&self) -> String {
        match &self.liveness {
            Liveness::Live => String::new(),
            Liveness::NoAnswer(why) => format!("no answer: {why}"),
            Liveness::Unresponsive => render::unresponsive(self.silent()),
            Liveness::Stopped => "stopped".into(),
        }
    }
}

fn text(v: &Value) -> String {
    render::sanitize(&match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// The watch's state: rows by nkey and how they are shown.
struct View {
    target: Target,
    rows: Vec<Row>,
    index: HashMap<String, usize>,
    terminal: bool,
    dirty: bool,
}

impl View {
    fn row(&mut self, nkey: &str) -> Option<&mut Row> {
        let i = *self.index.get(nkey)?;
        self.rows.get_mut(i)
    }

    /// Applies a new value (and SubState) to a machine's row; emits an NDJSON line if it changed.
    fn set(&mut self, nkey: &str, main: Change, sub: Change, initial: bool) -> Result<(), Failure> {
        let terminal = self.terminal;
        let Some(row) = self.index.get(nkey).and_then(|i| self.rows.get_mut(*i)) else {
            return Ok(());
        };
        let previous = row.value.clone();
        let mut changed = false;
        if let Change::Value(v) = main {
            changed |= row.value.as_ref() != Some(&v);
            row.value = Some(v);
        }
        if let Change::Value(v) = sub {
            changed |= row.sub.as_ref() != Some(&v);
            row.sub = Some(v);
        }
        if matches!(row.liveness, Liveness::NoAnswer(_)) && row.value.is_some() {
            row.liveness = Liveness::Live;
            changed = true;
        }
        if !changed && !initial {
            return Ok(());
        }
        if !initial {
            row.changed = Some(Instant::now());
        }
        self.dirty = true;
        if !terminal {
            let row = row.clone();
            self.line(&row, previous, initial)?;
        }
        Ok(())
    }

    fn set_liveness(&mut self, nkey: &str, liveness: Liveness) -> Result<(), Failure> {
        let terminal = self.terminal;
        let Some(row) = self.index.get(nkey).and_then(|i| self.rows.get_mut(*i)) else {
            return Ok(());
        };
        if row.liveness == liveness {
            return Ok(());
        }
        row.liveness = liveness;
        row.changed = Some(Instant::now());
        self.dirty = true;
        if !terminal {
            let row = row.clone();
            let v = row.value.clone();
            self.line(&row, v, false)?;
        }
        Ok(())
    }

    /// One NDJSON line about `row`.
    fn line(&self, row: &Row, previous: Option<Value>, initial: bool) -> Result<(), Failure> {
        let mut d = json!({
            "time_ms": now_ms(),
            "host": row.host,
            "nkey": row.nkey,
            "value": row.value,
            "state": row.liveness.word(),
        });
        if self.target.unit.is_some() {
            d["sub_state"] = json!(row.sub);
        }
        if initial {
            d["initial"] = json!(true);
        } else {
            d["previous"] = json!(previous);
        }
        match &row.liveness {
            Liveness::NoAnswer(why) => d["error"] = json!(why),
            Liveness::Unresponsive => d["silent_ms"] = json!(row.silent().as_millis() as u64),
            _ => {}
        }
        output::line(&d.to_string())
    }

    /// The screen: title, counts by value, then the table.
    fn screen(&self, max_rows: usize) -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for r in &self.rows {
            *counts.entry(r.bucket()).or_default() += 1;
        }
        let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut s = String::new();
        // Home, then each line cleared to its end, then everything below cleared.
        s.push_str("\x1b[H");
        let line = |s: &mut String, text: &str| {
            s.push_str(text);
            s.push_str("\x1b[K\r\n");
        };
        line(
            &mut s,
            &format!(
                "cbus watch {}: {} machine(s), {}  (Ctrl-C stops)",
                render::sanitize(&self.target.title()),
                self.rows.len(),
                render::clock_ms(now_ms())
            ),
        );
        let summary: Vec<String> = counts.iter().map(|(v, n)| format!("{v}: {n}")).collect();
        line(&mut s, &summary.join("   "));
        line(&mut s, "");
        let mut header = vec!["HOST", "VALUE"];
        if self.target.unit.is_some() {
            header = vec!["HOST", "ACTIVE", "SUB"];
        }
        header.extend(["CHANGED", "STATUS"]);
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .take(max_rows)
            .map(|r| {
                let mut cells = vec![render::sanitize(&r.host), r.shown()];
                if self.target.unit.is_some() {
                    cells.push(r.sub.as_ref().map(text).unwrap_or_else(|| "-".into()));
                }
                cells.push(
                    r.changed
                        .map(|c| format!("{} ago", render::silence(c.elapsed())))
                        .unwrap_or_else(|| "-".into()),
                );
                cells.push(r.status());
                cells
            })
            .collect();
        let table = render::table(&header, &rows);
        for (i, l) in table.lines().enumerate() {
            let hot = i
                .checked_sub(1)
                .and_then(|r| self.rows.get(r))
                .and_then(|r| r.changed)
                .is_some_and(|c| c.elapsed() < HIGHLIGHT);
            if hot {
                line(&mut s, &format!("\x1b[7m{l}\x1b[0m"));
            } else {
                line(&mut s, l);
            }
        }
        if self.rows.len() > max_rows {
            line(
                &mut s,
                &format!("... and {} more", self.rows.len() - max_rows),
            );
        }
        s.push_str("\x1b[J");
        s
    }
}

pub async fn run(ctx: &Context, what: &[String]) -> Result<(), Failure> {
    let target = Target::parse(what)?;
    // The setup is bounded by --timeout; the watch runs until stopped.
    let targets = ctx.targets().await?;
    let fleet = ctx.fleet().await?;
    let client = fleet.client().clone();
    let object = SignalFilter {
        nkey: None,
        sender: None,
        path_prefix: Some(target.path.clone()),
    }
    .exact_subject()
    .map_err(usage)?;
    let mut signals = ctx
        .bounded("subscribing", client.subscribe(object.clone()))
        .await?
        .map_err(|e| Failure::Connection(format!("cannot subscribe to {object}: {e}")))?;
    let mut presence = ctx
        .bounded("subscribing", client.subscribe(subject::PRESENCE_ALL))
        .await?
        .map_err(|e| Failure::Connection(format!("cannot subscribe to presence: {e}")))?;
    ctx.bounded("subscribing", client.flush())
        .await?
        .map_err(|e| Failure::Disconnected(e.to_string()))?;
    let terminal =
        std::io::IsTerminal::is_terminal(&std::io::stdout()) && ctx.format != Format::Json;
    let mut view = View {
        target: target.clone(),
        rows: targets.iter().map(Row::new).collect(),
        index: HashMap::new(),
        terminal,
        dirty: true,
    };
    view.rows
        .sort_by(|a, b| (&a.host, &a.nkey).cmp(&(&b.host, &b.nkey)));
    view.index = view
        .rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.nkey.clone(), i))
        .collect();
    let live: Vec<AgentStatus> = targets
        .iter()
        .filter(|a| a.state == AgentState::Running || ctx.options.ask_unresponsive)
        .cloned()
        .collect();
    if target.dest == systemd::DESTINATION && !live.is_empty() {
        ctx.ask_quietly(&live, &systemd::subscribe()).await?;
    }
    // The first read, after subscribing, so no change falls between.
    if !live.is_empty() {
        let (main, sub) = read(ctx, &target, &live).await?;
        for (agent, outcome) in live.iter().zip(main) {
            let nkey = &agent.info.nkey;
            match value_of(&outcome) {
                Some(v) => {
                    let s = sub.get(nkey).cloned().map_or(Change::None, Change::Value);
                    view.set(nkey, Change::Value(v), s, true)?;
                }
                None => {
                    let why = render::problem(&outcome, ctx.timeout).unwrap_or_default();
                    if let Some(r) = view.row(nkey) {
                        r.liveness = Liveness::NoAnswer(why);
                    }
                    if !terminal {
                        let r = view.rows[view.index[nkey.as_str()]].clone();
                        view.line(&r, None, true)?;
                    }
                }
            }
        }
    }
    for r in view.rows.clone() {
        if !terminal && !live.iter().any(|a| a.info.nkey == r.nkey) {
            view.line(&r, None, true)?;
        }
    }
    if terminal {
        output::print("\x1b[?25l\x1b[2J")?;
    }
    let result = watch_loop(ctx, &mut view, &live, &mut signals, &mut presence).await;
    if terminal {
        let _ = output::print("\x1b[?25h");
    }
    result
}

/// The property (and a unit's SubState by nkey) on `agents`.
async fn read(
    ctx: &Context,
    target: &Target,
    agents: &[AgentStatus],
) -> Result<(Vec<Outcome>, HashMap<String, Value>), Failure> {
    let (q_main, q_sub) = (target.query(&target.property), target.query("SubState"));
    let main = ctx.ask_quietly(agents, &q_main);
    let (main, sub) = match target.unit {
        Some(_) => {
            let (m, s) = futures::future::try_join(main, ctx.ask_quietly(agents, &q_sub)).await?;
            (m, Some(s))
        }
        None => (main.await?, None),
    };
    let sub = sub
        .into_iter()
        .flat_map(|s| s.outcomes)
        .filter_map(|o| value_of(&o.outcome).map(|v| (o.agent.info.nkey, v)))
        .collect();
    Ok((main.outcomes.into_iter().map(|o| o.outcome).collect(), sub))
}

fn value_of(o: &Outcome) -> Option<Value> {
    match o {
        Outcome::Replied(r) => r
            .result
            .as_ref()
            .ok()
            .map(|s| systemd::unvariant(&s.value).clone()),
        _ => None,
    }
}

async fn watch_loop(
    ctx: &Context,
    view: &mut View,
    live: &[AgentStatus],
    signals: &mut async_nats::Subscriber,
    presence: &mut async_nats::Subscriber,
) -> Result<(), Failure> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Failure::Connection(format!("cannot watch SIGTERM: {e}")))?;
    let mut tick = tokio::time::interval(TICK);
    let mut redraw = tokio::time::interval(REDRAW_EVERY);
    redraw.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let agents: HashMap<String, AgentStatus> = live
        .iter()
        .map(|a| (a.info.nkey.clone(), a.clone()))
        .collect();
    // Reads in flight (an invalidated property, a machine back): one per machine.
    let mut reading: HashSet<String> = HashSet::new();
    let mut reads = FuturesUnordered::new();
    let max_rows = std::env::var("LINES")
        .ok()
        .and_then(|l| l.parse::<usize>().ok())
        .map_or(MAX_ROWS, |l| l.saturating_sub(5).clamp(1, MAX_ROWS));
    let mut refused = 0u64;
    let gone = || {
        Failure::Disconnected(format!(
            "lost the connection to NATS and gave up after {} reconnect attempts",
            crate::connect::MAX_RECONNECTS
        ))
    };
    let result = loop {
        // Machines to read again: an invalidated value, or one that came back.
        let mut reread: Vec<String> = Vec::new();
        tokio::select! {
            m = signals.next() => {
                let Some(msg) = m else { break Err(gone()) };
                match PropertiesChanged::from_owner(
                    &msg.subject,
                    msg.headers.as_ref(),
                    &msg.payload,
                    &view.target.path,
                    &view.target.dest,
                ) {
                    Some((nkey, change)) => {
                        if let Some((main, sub)) = view.target.values_in(&change) {
                            if main == Change::Invalidated || sub == Change::Invalidated {
                                reread.push(nkey.to_owned());
                            }
                            let nkey = nkey.to_owned();
                            view.set(&nkey, main, sub, false)?;
                        }
                    }
                    None => refused += 1,
                }
            }
            m = presence.next() => {
                let Some(msg) = m else { break Err(gone()) };
                if let Some((nkey, event)) = presence_of(&msg) {
                    let back = view.row(&nkey).is_some_and(|r| r.liveness != Liveness::Live && !matches!(r.liveness, Liveness::NoAnswer(_)));
                    let hello = event.event == PresenceKind::Hello;
                    if let Some(r) = view.row(&nkey) {
                        r.heard = Instant::now();
                        r.heartbeat = Duration::from_millis(event.agent.heartbeat_ms.max(1));
                    }
                    if event.event == PresenceKind::Goodbye {
                        view.set_liveness(&nkey, Liveness::Stopped)?;
                    } else if back || hello {
                        view.set_liveness(&nkey, Liveness::Live)?;
                        reread.push(nkey.clone());
                        // A new agent has a new bus connection: subscribe it to systemd again.
                        if hello && view.target.dest == systemd::DESTINATION {
                            if let Some(a) = agents.get(&nkey) {
                                let _ = ctx.ask_quietly(std::slice::from_ref(a), &systemd::subscribe()).await;
                            }
                        }
                    }
                }
            }
            Some(Reread { nkey, main, sub }) = reads.next() => {
                reading.remove(&nkey);
                view.set(&nkey, main.map_or(Change::None, Change::Value), sub.map_or(Change::None, Change::Value), false)?;
            }
            _ = tick.tick() => {
                let late: Vec<String> = view
                    .rows
                    .iter()
                    .filter(|r| r.liveness == Liveness::Live || matches!(r.liveness, Liveness::NoAnswer(_)))
                    .filter(|r| r.silent() > r.heartbeat * MISSED_HEARTBEATS)
                    .map(|r| r.nkey.clone())
                    .collect();
                for nkey in late {
                    view.set_liveness(&nkey, Liveness::Unresponsive)?;
                }
                // SINCE and silences move on.
                view.dirty = true;
            }
            _ = redraw.tick() => {
                if view.terminal && view.dirty {
                    view.dirty = false;
                    output::print(&view.screen(max_rows))?;
                }
            }
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = term.recv() => break Ok(()),
        }
        for nkey in reread {
            let Some(agent) = agents.get(&nkey).cloned() else {
                continue;
            };
            if !reading.insert(nkey.clone()) {
                continue;
            }
            let target = view.target.clone();
            reads.push(async move {
                let (main, sub) = match read(ctx, &target, std::slice::from_ref(&agent)).await {
                    Ok((m, s)) => (m.first().and_then(value_of), s.get(&nkey).cloned()),
                    Err(_) => (None, None),
                };
                Reread { nkey, main, sub }
            });
        }
    };
    if refused > 0 {
        tracing::debug!(
            refused,
            "signals not from the owner of the watched name ignored"
        );
    }
    result
}

/// What a read of one machine found.
struct Reread {
    nkey: String,
    main: Option<Value>,
    sub: Option<Value>,
}

/// A presence message's machine (its subject's nkey, which the body must agree with) and event.
fn presence_of(msg: &async_nats::Message) -> Option<(String, PresenceEvent)> {
    let nkey = subject::nkey_of(&msg.subject)?;
    if msg.payload.len() > MAX_PRESENCE_BYTES {
        return None;
    }
    let event: PresenceEvent = serde_json::from_slice(&msg.payload).ok()?;
    (event.agent.nkey == nkey).then(|| (nkey.to_owned(), event))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn targets_are_checked_before_connecting() {
        let t = Target::parse(&args(&["nginx"])).unwrap();
        assert_eq!(t.unit.as_deref(), Some("nginx.service"));
        assert_eq!(t.path, "/org/freedesktop/systemd1/unit/nginx_2eservice");
        let p = Target::parse(&args(&["org.x.Y", "/org/x", "org.x.I.Name"])).unwrap();
        assert_eq!(
            (p.interface.as_deref(), p.property.as_str()),
            (Some("org.x.I"), "Name")
        );
        assert!(Target::parse(&args(&["a", "b"])).is_err());
        assert!(Target::parse(&args(&[":1.4", "/x", "P"])).is_err());
        assert!(Target::parse(&args(&["org.x", "nopath", "P"])).is_err());
        assert!(Target::parse(&args(&["bad unit"])).is_err());
    }

    #[test]
    fn changes_of_the_watched_properties_only() {
        let t = Target::parse(&args(&["nginx"])).unwrap();
        let change = |iface: &str, changed: Value, inv: Vec<&str>| PropertiesChanged {
            interface: iface.into(),
            changed: changed.as_object().unwrap().clone(),
            invalidated: inv.into_iter().map(Into::into).collect(),
        };
        let c = change(
            systemd::UNIT,
            json!({"ActiveState": {"t": "s", "v": "failed"}}),
            vec!["SubState"],
        );
        assert_eq!(
            t.values_in(&c),
            Some((Change::Value(json!("failed")), Change::Invalidated))
        );
        assert_eq!(
            t.values_in(&change(
                systemd::SERVICE,
                json!({"ActiveState": {"t":"s","v":"x"}}),
                vec![]
            )),
            None
        );
        assert_eq!(
            t.values_in(&change(
                systemd::UNIT,
                json!({"Id": {"t":"s","v":"x"}}),
                vec![]
            )),
            None
        );
    }
}
