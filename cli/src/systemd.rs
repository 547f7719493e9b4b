//! systemd shortcuts: the same fan-out, with systemd's objects and methods filled in.

use std::time::{Duration, Instant};

use cbus_protocol::fleet::{AgentStatus, Outcome, Query, TargetOutcome};
use cbus_protocol::names;
use cbus_protocol::{Op, Request};
use serde_json::{json, Value};

use crate::args::UnitAction;
use crate::query::{verdict, Context};
use crate::render::{self, Format};
use crate::Failure;

const SYSTEMD: &str = "org.freedesktop.systemd1";
const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";
const UNIT: &str = "org.freedesktop.systemd1.Unit";
const TRANSITIONAL: &[&str] = &["activating", "deactivating", "reloading", "refreshing"];

fn manager_call(method: &str, args: Value) -> Query {
    Query {
        destination: SYSTEMD.into(),
        path: MANAGER_PATH.into(),
        op: Op::Call,
        member: Some(method.into()),
        request: Request {
            interface: Some(MANAGER.into()),
            args: Some(args),
            ..Default::default()
        },
    }
}

fn unit_property(unit: &str, property: &str) -> Query {
    Query {
        destination: SYSTEMD.into(),
        path: names::systemd_unit_path(unit),
        op: Op::Get,
        member: Some(property.into()),
        request: Request {
            interface: Some(UNIT.into()),
            ..Default::default()
        },
    }
}

/// `cbus units [PATTERN]`: machines x units.
pub async fn units(ctx: &Context, pattern: Option<String>) -> Result<(), Failure> {
    let targets = ctx.targets().await?;
    let q = match &pattern {
        Some(p) => manager_call("ListUnitsByPatterns", json!([[], [p]])),
        None => manager_call("ListUnits", json!([])),
    };
    let outcomes = ctx.ask(&targets, &q).await?;
    let mut rows = Vec::new();
    let mut docs = Vec::new();
    for o in &outcomes {
        let host = o.agent.info.hostname.clone();
        match &o.outcome {
            Outcome::Replied(r) if r.result.is_ok() => {
                let Ok(s) = &r.result else { continue };
                let list = s
                    .value
                    .get(0)
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let mut list: Vec<Vec<String>> = list
                    .iter()
                    .map(|u| {
                        (0..5)
                            .map(|i| u.get(i).and_then(Value::as_str).unwrap_or("").to_owned())
                            .collect()
                    })
                    .collect();
                list.sort();
                for u in list {
                    docs.push(json!({"host": host, "unit": u[0], "load": u[2], "active": u[3], "sub": u[4], "description": u[1]}));
                    rows.push(vec![
                        host.clone(),
                        u[0].clone(),
                        u[2].clone(),
                        u[3].clone(),
                        u[4].clone(),
                        u[1].clone(),
                    ]);
                }
            }
            other => {
                docs.push(json!({"host": host, "status": render::status(other), "error": render::problem(other)}));
                rows.push(vec![
                    host,
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    render::problem(other).unwrap_or_default(),
                ]);
            }
        }
    }
    match ctx.format {
        Format::Json => println!(
            "{}",
            json!({"units": docs, "summary": cbus_protocol::fleet::summarize(&outcomes)})
        ),
        Format::Simple => rows.iter().for_each(|r| println!("{}", r[..5].join("\t"))),
        Format::Table => print!(
            "{}",
            render::table(
                &["HOST", "UNIT", "LOAD", "ACTIVE", "SUB", "DESCRIPTION"],
                &rows
            )
        ),
    }
    verdict(&outcomes)
}

/// `cbus status UNIT`: the unit's state on each machine.
pub async fn status(ctx: &Context, unit: &str) -> Result<(), Failure> {
    let targets = ctx.targets().await?;
    let q = Query {
        destination: SYSTEMD.into(),
        path: names::systemd_unit_path(unit),
        op: Op::GetAll,
        member: None,
        request: Request {
            interface: Some(UNIT.into()),
            ..Default::default()
        },
    };
    let outcomes = ctx.ask(&targets, &q).await?;
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
                let p = |name: &str| render::human(&s.value[name], None);
                let since_us: u64 = p("StateChangeTimestamp").parse().unwrap_or(0);
                let since = if since_us == 0 {
                    "-".into()
                } else {
                    render::ago(since_us / 1000)
                };
                rows.push(vec![
                    host,
                    unit.to_owned(),
                    p("LoadState"),
                    p("ActiveState"),
                    p("SubState"),
                    since,
                    p("Description"),
                ]);
            }
            other => rows.push(vec![
                host,
                unit.to_owned(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                render::problem(other).unwrap_or_default(),
            ]),
        }
    }
    if ctx.format == Format::Simple {
        rows.iter().for_each(|r| println!("{}", r.join("\t")));
    } else {
        print!(
            "{}",
            render::table(
                &[
                    "HOST",
                    "UNIT",
                    "LOAD",
                    "ACTIVE",
                    "SUB",
                    "SINCE",
                    "DESCRIPTION"
                ],
                &rows
            )
        );
    }
    verdict(&outcomes)
}

/// `cbus start|stop|restart|reload UNIT...`: queue the jobs, then (unless --no-block) wait until
/// each unit settles, and report the final state per machine.
pub async fn action(ctx: &Context, method: &str, action: UnitAction) -> Result<(), Failure> {
    let targets = ctx.targets().await?;
    let mut rows = Vec::new();
    let mut docs = Vec::new();
    let mut all = Vec::new();
    for unit in &action.units {
        let outcomes = ctx
            .ask(&targets, &manager_call(method, json!([unit, "replace"])))
            .await?;
        let queued: Vec<AgentStatus> = outcomes
            .iter()
            .filter(|o| matches!(&o.outcome, Outcome::Replied(r) if r.result.is_ok()))
            .map(|o| o.agent.clone())
            .collect();
        let finals = if action.no_block || queued.is_empty() {
            Vec::new()
        } else {
            wait_settled(ctx, &queued, unit).await?
        };
        for o in &outcomes {
            let host = o.agent.info.hostname.clone();
            let (result, state) = match &o.outcome {
                Outcome::Replied(r) => match &r.result {
                    Ok(s) => {
                        let job = render::human(&s.value, s.signature.as_deref());
                        let state = finals
                            .iter()
                            .find(|f: &&TargetOutcome| f.agent.info.nkey == o.agent.info.nkey)
                            .map(|f| match &f.outcome {
                                Outcome::Replied(r) => r
                                    .result
                                    .as_ref()
                                    .map(|s| render::human(&s.value, None))
                                    .unwrap_or_else(|e| e.to_string()),
                                other => render::status(other).to_owned(),
                            })
                            .unwrap_or_else(|| "queued".into());
                        (format!("ok {job}"), state)
                    }
                    Err(_) => (
                        render::problem(&o.outcome).unwrap_or_default(),
                        String::new(),
                    ),
                },
                other => (render::problem(other).unwrap_or_default(), String::new()),
            };
            docs.push(json!({"host": host, "nkey": o.agent.info.nkey, "unit": unit, "status": render::status(&o.outcome), "result": result, "active_state": state}));
            rows.push(vec![host, unit.clone(), result, state]);
        }
        all.extend(outcomes);
    }
    match ctx.format {
        Format::Json => println!(
            "{}",
            json!({"results": docs, "summary": cbus_protocol::fleet::summarize(&all)})
        ),
        Format::Simple => rows.iter().for_each(|r| println!("{}", r.join("\t"))),
        Format::Table => print!(
            "{}",
            render::table(&["HOST", "UNIT", "RESULT", "ACTIVE"], &rows)
        ),
    }
    verdict(&all)
}

/// Polls ActiveState until it leaves the transitional states on every machine or the timeout.
async fn wait_settled(
    ctx: &Context,
    targets: &[AgentStatus],
    unit: &str,
) -> Result<Vec<TargetOutcome>, Failure> {
    let deadline = Instant::now() + ctx.timeout;
    loop {
        let states = ctx
            .ask(targets, &unit_property(unit, "ActiveState"))
            .await?;
        let settled = states.iter().all(|s| match &s.outcome {
            Outcome::Replied(r) => r
                .result
                .as_ref()
                .map(|v| !TRANSITIONAL.contains(&v.value.as_str().unwrap_or("")))
                .unwrap_or(true),
            _ => true,
        });
        if settled || Instant::now() >= deadline {
            return Ok(states);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
