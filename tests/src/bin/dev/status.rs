//! `status`: what the state file says was started, checked against what runs, as a table or as
//! JSON; and the NATS permission violations logged so far.

use anyhow::{Context, Result};

use crate::settings::{Layout, Node, Settings};
use crate::{load, warn};

/// What `status --json` prints.
#[derive(serde::Serialize)]
struct StatusJson {
    /// The hub's first (or only) nats-server.
    nats: Option<ServerStatus>,
    /// Every nats-server: the hub's nodes, then the sites' leaves.
    nats_servers: Vec<NodeStatus>,
    gateway: Option<ServerStatus>,
    machines: Vec<MachineStatus>,
}

#[derive(serde::Serialize)]
struct ServerStatus {
    pid: u32,
    url: String,
}

#[derive(serde::Serialize)]
struct NodeStatus {
    /// `hub-I` (cluster node I) or `site-J`.
    name: String,
    running: bool,
    pid: u32,
    url: String,
}

#[derive(serde::Serialize)]
struct MachineStatus {
    name: String,
    /// 0: the hub; J: site J's leaf.
    site: u32,
    /// `systemctl is-system-running`, or `not running`.
    state: String,
    leader: Option<u32>,
    agent: Option<String>,
    nkey: String,
    root: std::path::PathBuf,
}

pub fn status(s: &Settings, json: bool) -> Result<()> {
    let state = load(s)?;
    let nats = state.nats.filter(|n| n.alive()).map(|n| ServerStatus {
        pid: n.pid,
        url: s.nats_url(),
    });
    let layout = crate::layout_of(&state);
    let nats_servers: Vec<NodeStatus> = layout
        .nodes()
        .zip(state.nats_servers())
        .map(|(node, srv)| NodeStatus {
            name: match node {
                Node::Hub(i) => format!("hub-{i}"),
                Node::Site(j) => format!("site-{j}"),
            },
            running: srv.alive(),
            pid: srv.pid,
            url: format!("nats://127.0.0.1:{}", srv.port),
        })
        .collect();
    let gateway = state.gateway.filter(|g| g.alive()).map(|g| ServerStatus {
        pid: g.pid,
        url: format!("http://127.0.0.1:{}/", s.gateway_port),
    });
    let machines: Vec<MachineStatus> = state
        .machines
        .iter()
        .map(|dm| {
            let m = dm.machine();
            let inside = |args: &[&str]| m.as_ref().map(|m| m.exec_stdout(args));
            MachineStatus {
                name: dm.record.name.clone(),
                site: dm.site,
                state: match inside(&["systemctl", "is-system-running"]) {
                    Some(st) if st.is_empty() => "booting".into(),
                    Some(st) => st,
                    None => "not running".into(),
                },
                leader: m.as_ref().map(|m| m.leader_pid()),
                agent: inside(&["systemctl", "is-active", "cbus-agent"]),
                nkey: dm.nkey.clone(),
                root: dm.record.dir.join("root"),
            }
        })
        .collect();
    if json {
        let doc = StatusJson {
            nats,
            nats_servers,
            gateway,
            machines,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).context("status JSON")?
        );
        return Ok(());
    }
    let server = |name: &str, srv: &Option<ServerStatus>| match srv {
        Some(srv) => println!("{name:<14} running (pid {}) {}", srv.pid, srv.url),
        None => println!("{name:<14} not running"),
    };
    if nats_servers.len() > 1 {
        for n in &nats_servers {
            let state = if n.running { "running" } else { "not running" };
            println!(
                "{:<14} {state} (pid {}) {}",
                format!("nats {}", n.name),
                n.pid,
                n.url
            );
        }
    } else {
        server("nats-server", &nats);
    }
    server("cbus-gateway", &gateway);
    for m in &machines {
        match m.leader {
            Some(leader) => println!(
                "{:<14} {} (leader pid {leader}), cbus-agent {}, nkey {}{}",
                m.name,
                m.state,
                m.agent.as_deref().unwrap_or(""),
                m.nkey,
                if m.site > 0 {
                    format!(", site {}", m.site)
                } else {
                    String::new()
                }
            ),
            None => println!("{:<14} not running", m.name),
        }
    }
    if machines.is_empty() {
        println!("no machines (./dev up starts the fleet)");
    }
    report_violations(s);
    Ok(())
}

/// Permission violations in the NATS log: a part that needs a subject its user may not use.
pub fn report_violations(s: &Settings) {
    let layout = load(s)
        .map(|st| crate::layout_of(&st))
        .unwrap_or(Layout::ONE);
    for node in layout.nodes() {
        let path = s.node_log(node);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains("Violation")).collect();
        if lines.is_empty() {
            continue;
        }
        warn(&format!(
            "{} NATS permission violation(s) in {}, the last ones:",
            lines.len(),
            path.display()
        ));
        for l in &lines[lines.len().saturating_sub(3)..] {
            eprintln!("    {l}");
        }
    }
}
