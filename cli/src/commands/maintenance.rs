//! `cbus maintenance on|off|list`: mark machines expected to be away, so that fan-outs neither
//! wait for them nor fail on them (`cbus_protocol::maintenance`).
//!
//! Marks name machines by nkey, resolved from the registry at the time of marking: a machine
//! that later claims another hostname stays marked, and a new machine that claims a marked
//! machine's hostname is not. A selection is required: marking the whole fleet by accident
//! would hide every machine from every command.

use cbus_client::fleet::{AgentStatus, Maintenance, Selector};
use cbus_protocol::presence::now_ms;
use serde_json::json;

use crate::args::MaintenanceCommand;
use crate::error::{usage, Failure};
use crate::fanout::{parse_duration, Context};
use crate::output;
use crate::render::{self, Format};

/// Copies of the bucket made when `maintenance on` creates it; `cbus registry init --replicas`
/// creates it with the registry's.
const DEFAULT_REPLICAS: usize = 1;

pub async fn run(ctx: &Context, command: MaintenanceCommand) -> Result<(), Failure> {
    match command {
        MaintenanceCommand::On {
            hosts,
            reason,
            duration,
        } => {
            let duration = duration
                .as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(|e| usage(format!("--for: {e}")))?;
            // Checked before connecting: a bad reason is a usage error, not a half-done mark.
            Maintenance::new("", reason.clone(), 0, duration, "").map_err(usage)?;
            mark(ctx, &hosts, reason, duration).await
        }
        MaintenanceCommand::Off { hosts } => clear(ctx, &hosts).await,
        MaintenanceCommand::List => list(ctx).await,
    }
}

/// The selection of `on`/`off`: the positional globs and the global --hosts/--nkeys/--labels,
/// at least one of them.
fn selector(ctx: &Context, hosts: &[String]) -> Result<Selector, Failure> {
    let mut selector = ctx.selector.clone();
    selector.hosts.extend(hosts.iter().cloned());
    if hosts.is_empty() && !ctx.selecting() {
        return Err(usage(
            "name the machines: HOST globs, or --hosts, --nkeys or --labels",
        ));
    }
    selector.select(&[]).map_err(usage)?;
    Ok(selector)
}

async fn chosen(ctx: &Context, hosts: &[String]) -> Result<Vec<AgentStatus>, Failure> {
    let (chosen, known) = ctx.selected_with(&selector(ctx, hosts)?).await?;
    if chosen.is_empty() {
        return Err(Failure::Partial(format!(
            "no machines match the selection ({known} agent(s) known; see cbus agents)"
        )));
    }
    Ok(chosen)
}

async fn mark(
    ctx: &Context,
    hosts: &[String],
    reason: Option<String>,
    duration: Option<std::time::Duration>,
) -> Result<(), Failure> {
    let targets = chosen(ctx, hosts).await?;
    let fleet = ctx.fleet().await?;
    let by = crate::connect::requester();
    let now = now_ms();
    let mut rows = Vec::new();
    for agent in &targets {
        let mark = Maintenance::new(&agent.info.hostname, reason.clone(), now, duration, &by)
            .map_err(usage)?;
        ctx.bounded(
            "writing the maintenance mark",
            fleet.set_maintenance(&agent.info.nkey, &mark, DEFAULT_REPLICAS),
        )
        .await?
        .map_err(|e| Failure::Connection(e.to_string()))?;
        rows.push((
            agent.info.hostname.clone(),
            agent.info.nkey.clone(),
            Some(mark),
        ));
    }
    print(ctx.format, &rows, now)
}

async fn clear(ctx: &Context, hosts: &[String]) -> Result<(), Failure> {
    let targets = chosen(ctx, hosts).await?;
    let fleet = ctx.fleet().await?;
    let mut rows = Vec::new();
    for agent in &targets {
        ctx.bounded(
            "clearing the maintenance mark",
            fleet.clear_maintenance(&agent.info.nkey),
        )
        .await?
        .map_err(|e| Failure::Connection(e.to_string()))?;
        rows.push((agent.info.hostname.clone(), agent.info.nkey.clone(), None));
    }
    print(ctx.format, &rows, now_ms())
}

/// Every mark in force, with the machine's hostname as it was when marked.
async fn list(ctx: &Context) -> Result<(), Failure> {
    let fleet = ctx.fleet().await?;
    let marks = ctx
        .bounded(
            "reading the maintenance marks",
            fleet.maintenance_within(ctx.remaining()),
        )
        .await?
        .map_err(|e| Failure::Connection(e.to_string()))?;
    let mut rows: Vec<_> = marks
        .into_iter()
        .map(|(nkey, mark)| (mark.hostname.clone(), nkey, Some(mark)))
        .collect();
    rows.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    print(ctx.format, &rows, now_ms())
}

type Row = (String, String, Option<Maintenance>);

fn print(format: Format, rows: &[Row], now: u64) -> Result<(), Failure> {
    if format == Format::Json {
        let machines: Vec<_> = rows
            .iter()
            .map(|(host, nkey, mark)| json!({"host": host, "nkey": nkey, "maintenance": mark}))
            .collect();
        return output::line(&json!({ "machines": machines }).to_string());
    }
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|(host, nkey, mark)| {
            vec![
                host.clone(),
                nkey.clone(),
                mark.as_ref()
                    .map_or_else(|| "cleared".to_owned(), |m| render::maintenance(m, now)),
            ]
        })
        .collect();
    output::print(&render::rows(
        format,
        &["HOST", "NKEY", "MAINTENANCE"],
        &table,
    ))
}
