//! `cbus agents`: the fleet as the registry sees it.
//!
//! Read from the registry (or a ping without JetStream), never by asking every agent: a stopped
//! or unresponsive machine is exactly what this command must show, and those cannot answer.

use serde_json::json;

use crate::error::Failure;
use crate::fanout::Context;
use crate::output;
use crate::render::{self, Format};

pub async fn run(ctx: &Context) -> Result<(), Failure> {
    let (agents, known) = ctx.selected().await?;
    match ctx.format {
        Format::Json => output::line(&json!({ "agents": agents }).to_string())?,
        format => {
            let now = cbus_protocol::presence::now_ms();
            let rows: Vec<Vec<String>> = agents
                .iter()
                .map(|a| {
                    let labels: Vec<String> = a
                        .info
                        .labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    let bus = if a.info.bus_connected {
                        a.info.bus.clone()
                    } else {
                        format!("{} (disconnected)", a.info.bus)
                    };
                    let seen = match format {
                        Format::Simple => a.last_seen_ms.to_string(),
                        _ => render::ago(a.last_seen_ms),
                    };
                    // Under maintenance, the mark is the state an operator acts on; the
                    // presence state follows in brackets (`maintenance (unresponsive)`).
                    let state = match &a.maintenance {
                        Some(_) => format!("maintenance ({})", a.state),
                        None => a.state.to_string(),
                    };
                    let note = a
                        .maintenance
                        .as_ref()
                        .map(|m| render::maintenance(m, now))
                        .unwrap_or_default();
                    vec![
                        a.info.hostname.clone(),
                        a.info.nkey.clone(),
                        state,
                        seen,
                        a.info.version.clone(),
                        bus,
                        labels.join(","),
                        note,
                    ]
                })
                .collect();
            let mut header = vec![
                "HOST",
                "NKEY",
                "STATE",
                "LAST SEEN",
                "VERSION",
                "BUS",
                "LABELS",
            ];
            // The note column only when a machine has one, so the usual table stays as it was.
            let mut rows = rows;
            if agents.iter().any(|a| a.maintenance.is_some()) {
                header.push("NOTE");
            } else {
                rows.iter_mut().for_each(|r| {
                    r.pop();
                });
            }
            output::print(&render::rows(format, &header, &rows))?;
        }
    }
    if agents.is_empty() {
        return Err(Failure::Partial(if known == 0 {
            "no agents are registered on this NATS server (is cbus-agent running?)".into()
        } else {
            format!("no machines match the selection ({known} agent(s) known)")
        }));
    }
    Ok(())
}
