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
                    vec![
                        a.info.hostname.clone(),
                        a.info.nkey.clone(),
                        a.state.to_string(),
                        seen,
                        a.info.version.clone(),
                        bus,
                        labels.join(","),
                    ]
                })
                .collect();
            output::print(&render::rows(
                format,
                &[
                    "HOST",
                    "NKEY",
                    "STATE",
                    "LAST SEEN",
                    "VERSION",
                    "BUS",
                    "LABELS",
                ],
                &rows,
            ))?;
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
