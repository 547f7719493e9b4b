//! `cbus units [PATTERN]`: one `ListUnits` (or `ListUnitsByPatterns`) per machine, and SINCE
//! for a few units.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use cbus_client::fleet::{AgentStatus, TargetOutcome};
use cbus_client::systemd::{self, as_u64, get_property, Unit, UNIT};
use cbus_protocol::names;
use futures::{StreamExt, TryStreamExt};
use serde_json::json;

use super::{ok_value, since_cells, CONCURRENCY, MAX_SINCE_UNITS};
use crate::error::{usage, Failure};
use crate::fanout::{verdict, Context};
use crate::output;
use crate::render::{self, Format};
use crate::spinner::Spinner;
use crate::status::Status;

pub async fn units(ctx: &Context, pattern: Option<String>) -> Result<(), Failure> {
    let pattern = pattern
        .map(|p| systemd::pattern(&p))
        .transpose()
        .map_err(usage)?;
    let targets = ctx.targets().await?;
    let spinner = Spinner::start(targets.len());
    let started = Instant::now();
    let q = match &pattern {
        Some(p) => systemd::list_units_by_patterns(&[], &[p]),
        None => systemd::list_units(),
    };
    let asked = ctx.ask_quietly(targets, &q).await?;
    let listed: Vec<(&TargetOutcome, Vec<Unit>)> = asked
        .outcomes
        .iter()
        .map(|o| {
            (
                o,
                ok_value(&o.outcome)
                    .map(systemd::units_of_reply)
                    .unwrap_or_default(),
            )
        })
        .collect();

    // SINCE: one Get per distinct unit, to the machines that have it.
    let mut since: HashMap<(String, String), u64> = HashMap::new();
    if pattern.is_some() {
        let mut by_unit: BTreeMap<&str, (&str, Vec<AgentStatus>)> = BTreeMap::new();
        for (o, units) in &listed {
            for u in units {
                by_unit
                    .entry(u.name.as_str())
                    .or_insert_with(|| (u.path.as_str(), Vec::new()))
                    .1
                    .push(o.agent.clone());
            }
        }
        if by_unit.len() <= MAX_SINCE_UNITS {
            let results: Vec<(String, Vec<TargetOutcome>)> = futures::stream::iter(by_unit)
                .filter(|(_, (path, _))| {
                    futures::future::ready(names::validate_object_path(path).is_ok())
                })
                .map(|(name, (path, hosts))| async move {
                    let q = get_property(path, UNIT, "StateChangeTimestamp");
                    ctx.ask_quietly(&hosts, &q)
                        .await
                        .map(|a| (name.to_owned(), a.outcomes))
                })
                .buffer_unordered(CONCURRENCY)
                .try_collect()
                .await?;
            for (name, outcomes) in results {
                for o in outcomes {
                    if let Some(us) = ok_value(&o.outcome).and_then(as_u64) {
                        since.insert((o.agent.info.nkey.clone(), name.clone()), us);
                    }
                }
            }
        }
    }
    drop(spinner);
    let elapsed = started.elapsed();

    let mut rows = Vec::new();
    let mut docs = Vec::new();
    let mut results = Vec::new();
    for (o, units) in &listed {
        let host = &o.agent.info.hostname;
        let mut r =
            json!({"host": host, "nkey": o.agent.info.nkey, "status": Status::of(&o.outcome)});
        match render::outcome_error(&o.outcome, ctx.timeout) {
            Some(e) => {
                r["ok"] = json!(false);
                r["error"] = json!(e);
                rows.push(vec![
                    host.clone(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    render::problem(&o.outcome, ctx.timeout).unwrap_or_default(),
                ]);
            }
            None => {
                r["ok"] = json!(true);
                r["units"] = json!(units.len());
                for u in units {
                    let us = since
                        .get(&(o.agent.info.nkey.clone(), u.name.clone()))
                        .copied();
                    let (ago, stamp, js) = since_cells(us);
                    docs.push(json!({"host": host, "nkey": o.agent.info.nkey, "unit": u.name, "load": u.load, "active": u.active, "sub": u.sub, "since": js, "description": u.description}));
                    let since_cell = if ctx.format == Format::Simple {
                        stamp
                    } else {
                        ago
                    };
                    rows.push(vec![
                        host.clone(),
                        u.name.clone(),
                        u.load.clone(),
                        u.active.clone(),
                        u.sub.clone(),
                        since_cell,
                        u.description.clone(),
                    ]);
                }
            }
        }
        results.push(r);
    }
    match ctx.format {
        Format::Json => output::line(
            &json!({"units": docs, "results": results, "summary": render::summary(&asked.outcomes, elapsed, ctx.timeout)})
                .to_string(),
        )?,
        format => output::print(&render::rows(
            format,
            &["HOST", "UNIT", "LOAD", "ACTIVE", "SUB", "SINCE", "DESCRIPTION"],
            &rows,
        ))?,
    }
    verdict(&asked.outcomes, ctx.timeout)
}
