//! `cbus status UNIT...`: the unit's properties, and `MainPID` for services.

use std::time::Instant;

use cbus_client::systemd::{self, as_u64, get_property, prop, prop_str, unvariant, SERVICE};
use serde_json::json;

use super::{ok_value, since_cells};
use crate::error::{usage, Failure};
use crate::fanout::{verdict, Context};
use crate::output;
use crate::render::{self, Format};
use crate::spinner::Spinner;
use crate::status::Status;

/// `cbus status UNIT...`.
pub async fn status(ctx: &Context, units: Vec<String>) -> Result<(), Failure> {
    let units: Vec<String> = units
        .iter()
        .map(|u| systemd::mangle(u))
        .collect::<Result<_, _>>()
        .map_err(usage)?;
    let targets = ctx.targets().await?;
    let spinner = Spinner::start(targets.len());
    let started = Instant::now();
    let per_unit = futures::future::try_join_all(units.iter().map(|u| {
        let targets = &targets;
        async move {
            let path = systemd::unit_path(u);
            let getall = systemd::unit_properties(&path);
            let pid = get_property(&path, SERVICE, "MainPID");
            let (all, pid) = if u.ends_with(".service") {
                let (a, p) = futures::future::try_join(
                    ctx.ask_quietly(targets, &getall),
                    ctx.ask_quietly(targets, &pid),
                )
                .await?;
                (a, Some(p))
            } else {
                (ctx.ask_quietly(targets, &getall).await?, None)
            };
            Ok::<_, Failure>((u.clone(), all, pid))
        }
    }))
    .await?;
    drop(spinner);
    let elapsed = started.elapsed();

    // Rows by host, then by unit in the order given.
    let mut rows = Vec::new();
    let mut docs = Vec::new();
    let mut all_outcomes = Vec::new();
    for (ti, t) in targets.iter().enumerate() {
        for (u, all, pid) in &per_unit {
            let Some(o) = all.outcomes.get(ti) else {
                continue;
            };
            let host = &t.info.hostname;
            let mut doc = json!({"host": host, "nkey": t.info.nkey, "unit": u, "status": Status::of(&o.outcome)});
            match ok_value(&o.outcome) {
                Some(props) => {
                    let main_pid = pid
                        .as_ref()
                        .and_then(|p| p.outcomes.get(ti))
                        .and_then(|p| ok_value(&p.outcome))
                        .and_then(|v| unvariant(v).as_u64())
                        .filter(|p| *p > 0);
                    let us = prop(props, "StateChangeTimestamp").and_then(as_u64);
                    let (ago, stamp, js) = since_cells(us);
                    doc["ok"] = json!(true);
                    doc["load_state"] = json!(prop_str(props, "LoadState"));
                    doc["active_state"] = json!(prop_str(props, "ActiveState"));
                    doc["sub_state"] = json!(prop_str(props, "SubState"));
                    doc["since"] = js;
                    doc["main_pid"] = json!(main_pid);
                    doc["description"] = json!(prop_str(props, "Description"));
                    rows.push(vec![
                        host.clone(),
                        u.clone(),
                        prop_str(props, "LoadState"),
                        prop_str(props, "ActiveState"),
                        prop_str(props, "SubState"),
                        if ctx.format == Format::Simple {
                            stamp
                        } else {
                            ago
                        },
                        main_pid.map_or_else(|| "-".into(), |p| p.to_string()),
                        prop_str(props, "Description"),
                    ]);
                }
                None => {
                    doc["ok"] = json!(false);
                    doc["error"] = json!(render::outcome_error(&o.outcome, ctx.timeout));
                    let mut row = vec![host.clone(), u.clone()];
                    row.extend(std::iter::repeat_n("-".to_string(), 5));
                    row.push(render::problem(&o.outcome, ctx.timeout).unwrap_or_default());
                    rows.push(row);
                }
            }
            docs.push(doc);
            all_outcomes.push(o.clone());
        }
    }
    match ctx.format {
        Format::Json => output::line(
            &json!({"results": docs, "summary": render::summary(&all_outcomes, elapsed, ctx.timeout)})
                .to_string(),
        )?,
        format => output::print(&render::rows(
            format,
            &["HOST", "UNIT", "LOAD", "ACTIVE", "SUB", "SINCE", "PID", "DESCRIPTION"],
            &rows,
        ))?,
    }
    verdict(&all_outcomes, ctx.timeout)
}
