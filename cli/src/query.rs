//! The fan-out commands: learn the fleet, select targets, ask them all, render.

use std::io::IsTerminal;
use std::time::Duration;

use cbus_protocol::codec;
use cbus_protocol::fleet::{AgentStatus, Fleet, Outcome, Query, Selector, TargetOutcome};
use cbus_protocol::introspect::ObjectSchema;
use cbus_protocol::names;
use cbus_protocol::{Op, Request};
use serde_json::{json, Value};

use crate::args::{ConnArgs, TargetArgs};
use crate::render::{self, Format};
use crate::Failure;

/// How long a ping-based discovery (no JetStream) collects answers.
const PING_WINDOW: Duration = Duration::from_millis(500);

/// A connected fleet, the selected targets and how to print.
pub struct Context {
    pub fleet: Fleet,
    pub selector: Selector,
    pub timeout: Duration,
    pub format: Format,
}

impl Context {
    pub async fn new(
        conn: &ConnArgs,
        targets: &TargetArgs,
        format: Format,
    ) -> Result<Self, Failure> {
        let timeout = parse_duration(&targets.timeout)?;
        let labels = targets
            .labels
            .iter()
            .map(|l| {
                l.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .ok_or_else(|| Failure::Usage(format!("--labels wants KEY=VALUE, got {l:?}")))
            })
            .collect::<Result<_, _>>()?;
        for n in &targets.nkeys {
            cbus_protocol::subject::validate_nkey(n).map_err(|e| Failure::Usage(e.to_string()))?;
        }
        let client = crate::connect::connect(conn).await?;
        Ok(Context {
            fleet: Fleet::new(client, crate::connect::requester()),
            selector: Selector {
                nkeys: targets.nkeys.clone(),
                hosts: targets.hosts.clone(),
                labels,
            },
            timeout,
            format,
        })
    }

    /// The agents the selector picks; none is an error.
    pub async fn targets(&self) -> Result<Vec<AgentStatus>, Failure> {
        let all = self
            .fleet
            .agents(PING_WINDOW)
            .await
            .map_err(|e| Failure::Connection(e.to_string()))?;
        let selected = self
            .selector
            .select(&all)
            .map_err(|e| Failure::Usage(e.to_string()))?;
        if selected.is_empty() {
            return Err(Failure::Partial(if all.is_empty() {
                "no agents are registered on this NATS server".into()
            } else {
                format!(
                    "no machines match the selection ({} agents known)",
                    all.len()
                )
            }));
        }
        Ok(selected)
    }

    /// Sends one query to every target, with a progress line on a terminal.
    pub async fn ask(
        &self,
        targets: &[AgentStatus],
        query: &Query,
    ) -> Result<Vec<TargetOutcome>, Failure> {
        let progress = std::io::stderr().is_terminal();
        if progress {
            eprint!("asking {} machine(s)…\r", targets.len());
        }
        let out = self
            .fleet
            .fan_out(targets, query, self.timeout)
            .await
            .map_err(|e| Failure::Connection(e.to_string()));
        if progress {
            eprint!("\x1b[2K");
        }
        out
    }

    /// Selects, asks, and renders values with the default rendering.
    pub async fn run_query(&self, query: Query) -> Result<(), Failure> {
        let targets = self.targets().await?;
        let outcomes = self.ask(&targets, &query).await?;
        print_values(&outcomes, self.format);
        verdict(&outcomes)
    }
}

/// Exit status for a list of outcomes: all ok, or a summary of what was not.
pub fn verdict(outcomes: &[TargetOutcome]) -> Result<(), Failure> {
    let bad: Vec<String> = outcomes
        .iter()
        .filter(|o| render::status(&o.outcome) != "ok")
        .map(|o| format!("{} ({})", o.agent.info.hostname, render::status(&o.outcome)))
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(Failure::Partial(format!(
            "{} of {} machine(s) did not succeed: {}",
            bad.len(),
            outcomes.len(),
            bad.join(", ")
        )))
    }
}

/// HOST VALUE rows (or JSON / simple lines).
pub fn print_values(outcomes: &[TargetOutcome], format: Format) {
    match format {
        Format::Json => println!("{}", render::json_document(outcomes)),
        Format::Simple => {
            for o in outcomes {
                let text = value_text(&o.outcome);
                println!("{}\t{}", o.agent.info.hostname, text);
            }
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = outcomes
                .iter()
                .map(|o| vec![o.agent.info.hostname.clone(), value_text(&o.outcome)])
                .collect();
            print!("{}", render::table(&["HOST", "VALUE"], &rows));
        }
    }
}

fn value_text(o: &Outcome) -> String {
    match o {
        Outcome::Replied(r) => match &r.result {
            Ok(s) => render::human(&s.value, s.signature.as_deref()),
            Err(_) => render::problem(o).unwrap_or_default(),
        },
        other => render::problem(other).unwrap_or_default(),
    }
}

fn usage(e: impl std::fmt::Display) -> Failure {
    Failure::Usage(e.to_string())
}

fn check_object(dest: &str, path: &str) -> Result<(), Failure> {
    names::validate_bus_name(dest).map_err(usage)?;
    names::validate_object_path(path).map_err(usage)
}

fn query(dest: String, path: String, op: Op, member: Option<String>, request: Request) -> Query {
    Query {
        destination: dest,
        path,
        op,
        member,
        request,
    }
}

pub async fn get(ctx: &Context, dest: String, path: String, property: &str) -> Result<(), Failure> {
    check_object(&dest, &path)?;
    let (interface, member) = names::split_member(property).map_err(usage)?;
    let request = Request {
        interface,
        ..Default::default()
    };
    ctx.run_query(query(dest, path, Op::Get, Some(member), request))
        .await
}

/// A VALUE argument: JSON, or a bare word taken as a string.
fn parse_value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

pub async fn set(
    ctx: &Context,
    dest: String,
    path: String,
    property: &str,
    value: &str,
    sig: Option<String>,
) -> Result<(), Failure> {
    check_object(&dest, &path)?;
    let (interface, member) = names::split_member(property).map_err(usage)?;
    let value = parse_value(value);
    if let Some(sig) = &sig {
        let s = codec::parse_single(sig).map_err(usage)?;
        codec::from_json(&value, &s).map_err(|e| Failure::Usage(format!("value: {e}")))?;
    }
    let request = Request {
        interface,
        value: Some(value),
        signature: sig,
        ..Default::default()
    };
    ctx.run_query(query(dest, path, Op::Set, Some(member), request))
        .await
}

pub async fn get_all(
    ctx: &Context,
    dest: String,
    path: String,
    interface: Option<String>,
) -> Result<(), Failure> {
    check_object(&dest, &path)?;
    if let Some(i) = &interface {
        names::validate_interface(i).map_err(usage)?;
    }
    let targets = ctx.targets().await?;
    let request = Request {
        interface: interface.clone(),
        ..Default::default()
    };
    let outcomes = ctx
        .ask(&targets, &query(dest, path, Op::GetAll, None, request))
        .await?;
    if ctx.format == Format::Json {
        println!("{}", render::json_document(&outcomes));
        return verdict(&outcomes);
    }
    let mut rows = Vec::new();
    for o in &outcomes {
        let host = o.agent.info.hostname.clone();
        match &o.outcome {
            Outcome::Replied(r) if r.result.is_ok() => {
                let Ok(s) = &r.result else { continue };
                let mut push = |iface: &str, props: &Value| {
                    if let Some(map) = props.as_object() {
                        for (name, v) in map {
                            let full = if iface.is_empty() {
                                name.clone()
                            } else {
                                format!("{iface}.{name}")
                            };
                            rows.push(vec![host.clone(), full, render::human(v, None)]);
                        }
                    }
                };
                if interface.is_some() {
                    push("", &s.value);
                } else if let Some(ifaces) = s.value.as_object() {
                    for (iface, props) in ifaces {
                        push(iface, props);
                    }
                }
            }
            other => rows.push(vec![
                host,
                String::new(),
                render::problem(other).unwrap_or_default(),
            ]),
        }
    }
    if ctx.format == Format::Simple {
        for r in rows {
            println!("{}", r.join("\t"));
        }
    } else {
        print!("{}", render::table(&["HOST", "PROPERTY", "VALUE"], &rows));
    }
    verdict(&outcomes)
}

pub async fn invoke(
    ctx: &Context,
    dest: String,
    path: String,
    method: &str,
    args: Option<&str>,
    sig: Option<String>,
) -> Result<(), Failure> {
    check_object(&dest, &path)?;
    let (interface, member) = names::split_member(method).map_err(usage)?;
    let args = match args {
        None => None,
        Some(text) => {
            let v: Value = serde_json::from_str(text)
                .map_err(|e| Failure::Usage(format!("arguments must be a JSON array: {e}")))?;
            if !v.is_array() {
                return Err(Failure::Usage(
                    "arguments must be a JSON array, e.g. '[\"nginx.service\",\"replace\"]'".into(),
                ));
            }
            Some(v)
        }
    };
    if let (Some(sig), Some(a)) = (&sig, &args) {
        let sigs = codec::parse_arguments(sig).map_err(usage)?;
        codec::args_from_json(a, &sigs).map_err(usage)?;
    }
    let request = Request {
        interface,
        args,
        signature: sig,
        ..Default::default()
    };
    ctx.run_query(query(dest, path, Op::Call, Some(member), request))
        .await
}

pub async fn introspect(
    ctx: &Context,
    dest: String,
    path: String,
    xml: bool,
) -> Result<(), Failure> {
    check_object(&dest, &path)?;
    let targets = ctx.targets().await?;
    let outcomes = ctx
        .ask(
            &targets,
            &query(dest, path, Op::Introspect, None, Request::default()),
        )
        .await?;
    if ctx.format == Format::Json {
        println!("{}", render::json_document(&outcomes));
        return verdict(&outcomes);
    }
    // Machines usually agree; print each distinct schema once with the hosts that have it.
    let mut groups: Vec<(Value, Vec<String>)> = Vec::new();
    for o in &outcomes {
        match &o.outcome {
            Outcome::Replied(r) if r.result.is_ok() => {
                let Ok(s) = &r.result else { continue };
                match groups.iter_mut().find(|(v, _)| *v == s.value) {
                    Some((_, hosts)) => hosts.push(o.agent.info.hostname.clone()),
                    None => groups.push((s.value.clone(), vec![o.agent.info.hostname.clone()])),
                }
            }
            other => eprintln!(
                "{}: {}",
                o.agent.info.hostname,
                render::problem(other).unwrap_or_default()
            ),
        }
    }
    for (value, hosts) in groups {
        let schema: ObjectSchema = serde_json::from_value(value)
            .map_err(|e| Failure::Partial(format!("malformed schema: {e}")))?;
        println!("# {}", hosts.join(", "));
        if xml {
            println!("{}", schema.xml);
        } else {
            print!("{}", describe(&schema));
        }
    }
    verdict(&outcomes)
}

/// A help page for an object, like busctl introspect but grouped per interface.
pub fn describe(schema: &ObjectSchema) -> String {
    let mut out = String::new();
    let args = |a: &[cbus_protocol::introspect::ArgSchema]| {
        a.iter()
            .map(|a| match &a.name {
                Some(n) => format!("{} {n}", a.ty),
                None => a.ty.clone(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    for i in &schema.interfaces {
        out.push_str(&format!("interface {}\n", i.name));
        for m in &i.methods {
            let outs = if m.outputs.is_empty() {
                String::new()
            } else {
                format!(" -> ({})", args(&m.outputs))
            };
            out.push_str(&format!(
                "  method   {}({}){outs}\n",
                m.name,
                args(&m.inputs)
            ));
        }
        for p in &i.properties {
            let access = match p.access {
                cbus_protocol::introspect::Access::Read => "read",
                cbus_protocol::introspect::Access::Write => "write",
                cbus_protocol::introspect::Access::ReadWrite => "readwrite",
            };
            out.push_str(&format!("  property {} {} ({access})\n", p.name, p.ty));
        }
        for s in &i.signals {
            out.push_str(&format!("  signal   {}({})\n", s.name, args(&s.args)));
        }
    }
    if !schema.children.is_empty() {
        out.push_str(&format!("children: {}\n", schema.children.join(", ")));
    }
    out
}

pub async fn names(ctx: &Context) -> Result<(), Failure> {
    let targets = ctx.targets().await?;
    let q = query(
        "org.freedesktop.DBus".into(),
        "/org/freedesktop/DBus".into(),
        Op::ListNames,
        None,
        Request::default(),
    );
    let outcomes = ctx.ask(&targets, &q).await?;
    if ctx.format == Format::Json {
        println!("{}", render::json_document(&outcomes));
        return verdict(&outcomes);
    }
    let mut rows = Vec::new();
    for o in &outcomes {
        match &o.outcome {
            Outcome::Replied(r) if r.result.is_ok() => {
                if let Ok(s) = &r.result {
                    for (name, owner) in s.value.as_object().into_iter().flatten() {
                        if !name.starts_with(':') {
                            rows.push(vec![
                                o.agent.info.hostname.clone(),
                                name.clone(),
                                render::human(owner, None),
                            ]);
                        }
                    }
                }
            }
            other => rows.push(vec![
                o.agent.info.hostname.clone(),
                String::new(),
                render::problem(other).unwrap_or_default(),
            ]),
        }
    }
    if ctx.format == Format::Simple {
        rows.iter().for_each(|r| println!("{}", r.join("\t")));
    } else {
        print!("{}", render::table(&["HOST", "NAME", "OWNER"], &rows));
    }
    verdict(&outcomes)
}

pub async fn agents(ctx: &Context) -> Result<(), Failure> {
    let all = ctx
        .fleet
        .agents(PING_WINDOW)
        .await
        .map_err(|e| Failure::Connection(e.to_string()))?;
    let agents = ctx.selector.select(&all).map_err(usage)?;
    match ctx.format {
        Format::Json => println!("{}", json!({ "agents": agents })),
        Format::Simple => {
            for a in &agents {
                println!("{}\t{}\t{}", a.info.hostname, a.info.nkey, a.state);
            }
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = agents
                .iter()
                .map(|a| {
                    let labels: Vec<String> = a
                        .info
                        .labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    vec![
                        a.info.hostname.clone(),
                        a.info.nkey.clone(),
                        a.state.to_string(),
                        render::ago(a.last_seen_ms),
                        a.info.version.clone(),
                        a.info.bus.clone(),
                        labels.join(","),
                    ]
                })
                .collect();
            print!(
                "{}",
                render::table(
                    &[
                        "HOST",
                        "NKEY",
                        "STATE",
                        "LAST SEEN",
                        "VERSION",
                        "BUS",
                        "LABELS"
                    ],
                    &rows
                )
            );
        }
    }
    if agents.is_empty() {
        return Err(Failure::Partial("no agents match".into()));
    }
    Ok(())
}

/// `5s`, `500ms`, `2m`, or seconds.
pub fn parse_duration(s: &str) -> Result<Duration, Failure> {
    let bad = || Failure::Usage(format!("invalid duration {s:?} (e.g. 5s, 500ms)"));
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !(v.is_finite() && v > 0.0) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(v * mult))
}
