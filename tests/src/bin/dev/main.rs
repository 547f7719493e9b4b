//! `cbus-dev`: the local dev fleet behind `./dev up|down|status|env|shell|logs|add`. A NATS
//! server with the users and permission sets `cbus permissions` renders, real systemd machines
//! (booted by the same code as the tests' machines, `cbus_tests::machines`) running cbus-agent as
//! a systemd unit, cbus-gateway, and a first fan-out. The fleet outlives this process: what it
//! started is in `$CBUS_DEV_DIR/state.json`, and `down` finds everything else by its directory.
//!
//! ```text
//! ./dev up [N] [--cluster C] [--sites S]
//!                         start everything with N machines (default 3); says so if already up;
//!                         C routed hub nats-servers, S leaf sites with machines of their own
//! ./dev status [--json]   nats-server, gateway, and each machine with its agent's unit state
//! ./dev env               the NATS_URL / NATS_USER / NATS_PASSWORD exports for the CLI
//! ./dev shell NAME [CMD]  a login shell (or CMD) inside a machine
//! ./dev logs NAME [ARGS]  the agent's journal inside a machine (ARGS go to journalctl, e.g. -f)
//! ./dev add N             N more machines; their NATS users are added and nats-server reloaded
//! ./dev down              everything stopped and unmounted; safe to run twice
//! ```
//!
//! Environment (all optional; a test runs a second fleet beside a developer's with these):
//! `CBUS_DEV_DIR` (state, default `.dev`), `CBUS_DEV_MACHINES` (machine overlays, default
//! `$CBUS_DEV_DIR/machines`, or `/var/tmp/cbus-dev-<hash>` when that is on overlayfs),
//! `CBUS_DEV_NATS_PORT` (4222), `CBUS_DEV_GATEWAY_PORT` (9850), `CBUS_DEV_PREFIX` (machine and demo
//! unit name prefix, `cbus`), `CBUS_DEV_BOOT_TIMEOUT` (seconds to `running`, 60). `./dev` picks
//! the build (`CBUS_DEV_PROFILE`, release or debug); cbus-dev uses the binaries next to itself.

mod machine;
mod servers;
mod settings;
mod status;
mod streams;

use std::os::unix::process::CommandExt as _;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cbus_tests::devfleet::{DevMachine, DevState};
use cbus_tests::machines::{self, BootError, Fleet};
use cbus_tests::procs;

use settings::{Layout, Settings};
use status::{report_violations, status};

const USAGE: &str = "  ./dev up [N] [--cluster C] [--sites S]
                          start everything with N machines (default 3); says so if already up.
                          --cluster C: C nats-servers routed on loopback with clustered JetStream
                          (registry at C replicas); --sites S: S leaf nats-servers dialling the
                          hub, the machines going round the hub and the sites in turn
  ./dev status [--json]   nats-server, gateway, and each machine with its agent's unit state
  ./dev env               the NATS_URL / NATS_USER / NATS_PASSWORD exports for the CLI
  ./dev shell NAME [CMD]  a login shell (or CMD) inside a machine
  ./dev logs NAME [ARGS]  the agent's journal inside a machine (ARGS go to journalctl, e.g. -f)
  ./dev add N             N more machines; their NATS users are added and nats-server reloaded
  ./dev down              everything stopped and unmounted; safe to run twice";

pub fn log(msg: &str) {
    eprintln!("\x1b[1m==> {msg}\x1b[0m");
}

pub fn warn(msg: &str) {
    eprintln!("warning: {msg}");
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = match args.split_first() {
        Some((c, r)) => (c.as_str(), r),
        None => ("", &[][..]),
    };
    let run = || -> Result<()> {
        let s = Settings::from_env()?;
        match cmd {
            "up" => up(&s, rest),
            "down" => down(&s),
            "status" => status(&s, rest.iter().any(|a| a == "--json")),
            "env" => env(&s),
            "shell" => shell(&s, rest),
            "logs" => logs(&s, rest),
            "add" => add(&s, rest.first().map(String::as_str)),
            "help" | "-h" | "--help" => {
                println!("{USAGE}");
                Ok(())
            }
            _ => {
                eprintln!("{USAGE}");
                std::process::exit(2);
            }
        }
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn need_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the dev fleet mounts overlays and boots systemd machines: run it as root");
    }
    Ok(())
}

fn need_bins(s: &Settings) -> Result<()> {
    if !s.have_bins() {
        bail!(
            "cbus, cbus-agent and cbus-gateway are not in {} (./dev builds them)",
            s.bin.display()
        );
    }
    Ok(())
}

fn load(s: &Settings) -> Result<DevState> {
    Ok(DevState::load(&s.dir)?)
}

/// The fleet's layout, from what its state file says was started.
pub fn layout_of(state: &DevState) -> Layout {
    Layout {
        cluster: 1 + u32::try_from(state.cluster.len()).unwrap_or(0),
        sites: u32::try_from(state.sites.len()).unwrap_or(0),
    }
}

/// Every hub node's URL, comma-separated (the first node's before the state file has more).
pub fn hub_urls(s: &Settings) -> String {
    load(s)
        .ok()
        .and_then(|state| layout_of(&state).hub_urls(s).ok())
        .map(|urls| urls.join(","))
        .unwrap_or_else(|| s.nats_url())
}

/// `cbus` as the admin user of this fleet.
pub fn cli(s: &Settings) -> Result<Command> {
    let mut c = Command::new(s.bin.join("cbus"));
    c.env("NATS_URL", hub_urls(s))
        .env("NATS_USER", "admin")
        .env("NATS_PASSWORD", s.secret("admin.password")?)
        .stdin(Stdio::null());
    Ok(c)
}

fn positive(n: Option<&str>, default: u32, usage: &str) -> Result<u32> {
    let v = n.unwrap_or("");
    match n.map(str::parse::<u32>) {
        None => Ok(default),
        Some(Ok(n)) if n > 0 => Ok(n),
        _ => bail!("{}", usage.replace("{}", v)),
    }
}

/// Whether every nats-server and every machine of this state dir are alive.
fn healthy(state: &DevState) -> bool {
    state.nats.is_some()
        && state.nats_servers().all(|n| n.alive())
        && !state.machines.is_empty()
        && state.machines.iter().all(|m| m.machine().is_some())
}

/// Anything left of a previous run: state, mounts or processes.
fn leftovers(s: &Settings, state: &DevState) -> bool {
    *state != DevState::default()
        || !machines::leftover_mounts(&s.machines).is_empty()
        || !machines::rooted_in(&s.machines).is_empty()
        || !procs::pids_with(&format!("systemd-nspawn -D {}/", s.machines.display())).is_empty()
}

const UP_USAGE: &str =
    "usage: ./dev up [N] [--cluster C] [--sites S]  (N machines, default 3; C hub nodes; S sites)";

/// `up`'s arguments: the machine count and the layout.
fn up_args(args: &[String]) -> Result<(u32, Layout)> {
    let mut n = None;
    let mut layout = Layout::ONE;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--cluster" => {
                layout.cluster = positive(it.next().map(String::as_str).or(Some("")), 1, UP_USAGE)?
            }
            "--sites" => {
                layout.sites = match it.next().map(|v| v.parse::<u32>()) {
                    Some(Ok(v)) => v,
                    _ => bail!("{UP_USAGE}"),
                }
            }
            v if n.is_none() => n = Some(positive(Some(v), 3, UP_USAGE)?),
            _ => bail!("{UP_USAGE}"),
        }
    }
    if layout.cluster > 9 || layout.sites > 9 {
        bail!("at most 9 cluster nodes and 9 sites");
    }
    Ok((n.unwrap_or(3), layout))
}

fn up(s: &Settings, args: &[String]) -> Result<()> {
    need_root()?;
    let (n, layout) = up_args(args)?;
    std::fs::create_dir_all(&s.dir).with_context(|| format!("create {}", s.dir.display()))?;
    let state = load(s)?;
    if healthy(&state) {
        log(&format!(
            "the dev fleet is already up ({} machines; ./dev add N for more, ./dev down to stop)",
            state.machines.len()
        ));
        status(s, false)?;
        if s.have_bins() {
            print_access(s)?;
        }
        return Ok(());
    }
    if leftovers(s, &state) {
        log("cleaning up a previous run that is not running any more");
        teardown(s, &state)?;
    }
    s.check_machines_dir()?;
    servers::port_free_or_die(s.nats_port, "CBUS_DEV_NATS_PORT")?;
    servers::port_free_or_die(s.gateway_port, "CBUS_DEV_GATEWAY_PORT")?;
    need_bins(s)?;
    let mut state = DevState::default();
    add_machines(s, layout, &mut state, n)?;
    state.gateway = Some(servers::start_gateway(s, layout, state.gateway)?);
    state.save(&s.dir)?;
    wait_registered(s, state.machines.len())?;
    print_access(s)?;
    println!("\n$ cbus agents");
    let _ = cli(s)?.arg("agents").status();
    println!("\n$ cbus units '{}-demo*'", s.prefix);
    let _ = cli(s)?
        .args(["units", &format!("{}-demo*", s.prefix)])
        .status();
    report_violations(s);
    Ok(())
}

fn add(s: &Settings, n: Option<&str>) -> Result<()> {
    need_root()?;
    let n = positive(
        n,
        1,
        "the number of machines must be a positive integer, not '{}'",
    )?;
    let mut state = load(s)?;
    if !state.nats.is_some_and(|n| n.alive()) {
        bail!("the dev fleet is not up; start it with ./dev up");
    }
    need_bins(s)?;
    add_machines(s, layout_of(&state), &mut state, n)?;
    wait_registered(s, state.machines.len())?;
    let _ = cli(s)?.arg("agents").status();
    Ok(())
}

/// Boots `count` more machines, numbered after the highest one so far; their NATS users are in
/// the server's config (started or reloaded) before their agents connect.
fn add_machines(s: &Settings, layout: Layout, state: &mut DevState, count: u32) -> Result<()> {
    s.check_machines_dir()?;
    let last = state.machines.iter().map(|m| m.index).max().unwrap_or(0);
    let mut taken: Vec<u16> = state.machines.iter().map(|m| m.web_port).collect();
    let mut specs = Vec::new();
    let mut new = Vec::new();
    for index in last + 1..=last + count {
        let name = format!("{}-{index}", s.prefix);
        let dir = s.machines.join(&name);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        // The host key is made first, so the machine's NATS user exists before its agent starts.
        let key = dir.join("ssh_host_ed25519_key");
        let _ = std::fs::remove_file(&key);
        let _ = std::fs::remove_file(key.with_extension("pub"));
        machines::generate_host_key(&key, &format!("root@{name}"))?;
        let public = std::fs::read_to_string(key.with_extension("pub")).context("read host key")?;
        let nkey = cbus_protocol::nkey::from_ssh_public_key(&public)
            .with_context(|| format!("cbus nkey failed for {name}'s host key"))?;
        let web_port = web_port(&taken)?;
        taken.push(web_port);
        let site = layout.site_of(index);
        let urls = layout.machine_urls(s, index, site)?;
        specs.push(machine::spec(s, &name, index, web_port, &key, &urls, site));
        new.push((index, nkey, web_port, site));
    }
    let mut users: Vec<servers::AgentUser> = state
        .machines
        .iter()
        .map(|m| servers::AgentUser {
            name: m.record.name.clone(),
            nkey: m.nkey.clone(),
            site: m.site,
        })
        .collect();
    users.extend(
        specs
            .iter()
            .zip(&new)
            .map(|(sp, (_, nkey, _, site))| servers::AgentUser {
                name: sp.name.clone(),
                nkey: nkey.clone(),
                site: *site,
            }),
    );
    servers::start_nats(s, layout, state, &users)?;
    state.save(&s.dir)?;
    let names: Vec<&str> = specs.iter().map(|sp| sp.name.as_str()).collect();
    log(&format!("booting {}", names.join(" ")));
    let fleet = Fleet::boot_detached(&s.machines, &specs, s.boot_timeout).map_err(boot_error)?;
    for (m, (index, nkey, web_port, site)) in fleet.machines.iter().zip(new) {
        state.machines.push(DevMachine {
            record: m.record(),
            index,
            nkey,
            web_port,
            site,
        });
    }
    state.save(&s.dir)?;
    Ok(())
}

/// A boot error with what to do next.
fn boot_error(e: BootError) -> anyhow::Error {
    match &e {
        BootError::UnitFailed { name, .. } => {
            anyhow::anyhow!(
                "{e}\ncbus-agent failed in machine {name} (./dev logs {name}; ./dev down to stop)"
            )
        }
        _ => anyhow::anyhow!("{e}\n(./dev down to stop)"),
    }
}

/// A port on 127.0.0.1 nothing listens on, from 18001 up, not given to another machine of ours.
fn web_port(taken: &[u16]) -> Result<u16> {
    (18001..=18999)
        .find(|p| !taken.contains(p) && !servers::port_open(*p))
        .context("no free port in 18001-18999 for a demo web server")
}

/// Waits until the fleet reports every machine as running.
fn wait_registered(s: &Settings, want: usize) -> Result<()> {
    log(&format!("waiting for {want} agent(s) to register"));
    let mut running = 0;
    for _ in 0..100 {
        // `cbus agents` exits 1 while no agent is known yet.
        let out = cli(s)?
            .args(["agents", "-s"])
            .stderr(Stdio::null())
            .output();
        running = out
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| l.split('\t').nth(2) == Some("running"))
                    .count()
            })
            .unwrap_or(0);
        if running >= want {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    warn(&format!(
        "only {running} of {want} agents are running after 20 s; ./dev logs NAME shows an agent's journal"
    ));
    Ok(())
}

fn print_access(s: &Settings) -> Result<()> {
    let pw = s.secret("admin.password")?;
    let url = format!("http://127.0.0.1:{}", s.gateway_port);
    let p = &s.prefix;
    let nats = hub_urls(s);
    println!();
    println!("NATS:       {nats}   user admin, password {pw}");
    let state = load(s)?;
    if !state.sites.is_empty() {
        println!(
            "            sites: {} (leaf nats-servers; their machines' agents connect there)",
            state
                .sites
                .iter()
                .map(|srv| format!("nats://127.0.0.1:{}", srv.port))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    println!(
        "            (the gateway connects as user 'gateway'; each agent as its own nkey user, see {})",
        s.nats_conf().display()
    );
    if let Ok(token) = cbus_tests::devfleet::secret(&s.dir, "gateway.token") {
        println!("Dashboard:  {url}/   token {token}");
    }
    println!("Metrics:    {url}/metrics");
    println!("CLI:        export NATS_URL={nats} NATS_USER=admin NATS_PASSWORD={pw}   # or: eval \"$(./dev env)\"");
    println!("            {}/cbus agents", s.bin.display());
    println!(
        "            {}/cbus --hosts {p}-1 restart {p}-demo-web.service",
        s.bin.display()
    );
    println!("Machines:   ./dev status | shell {p}-1 | logs {p}-1 | add 1 | down");
    Ok(())
}

fn down(s: &Settings) -> Result<()> {
    need_root()?;
    let state = load(s)?;
    teardown(s, &state)?;
    log(&format!(
        "dev fleet down: no machine, overlay, nats-server or gateway of {} left",
        s.dir.display()
    ));
    Ok(())
}

/// Stops everything this state dir started, also after a crash: the machines by the same code
/// as the tests' (found by their directory), then the servers (by pid and by command line).
fn teardown(s: &Settings, state: &DevState) -> Result<()> {
    let up = state
        .machines
        .iter()
        .filter(|m| procs::alive(m.record.nspawn_pid))
        .count();
    if up > 0 {
        log(&format!("powering off {up} machine(s)"));
    }
    machines::teardown(&s.machines)?;
    let mut pids: Vec<u32> = state
        .gateway
        .into_iter()
        .chain(state.nats_servers())
        .filter(|srv| srv.alive())
        .map(|srv| srv.pid)
        .collect();
    pids.extend(procs::pids_with(&format!(
        "--token-file {}",
        s.token_file().display()
    )));
    // Every node's config is in the nats dir (nats.conf, hub-I.conf, site-J.conf).
    pids.extend(procs::pids_with(&format!(
        "nats-server -c {}/",
        s.dir.join("nats").display()
    )));
    pids.sort_unstable();
    pids.dedup();
    if !pids.is_empty() {
        log("stopping the nats-servers and cbus-gateway");
        procs::stop_pids(libc::SIGTERM, Duration::from_secs(5), &pids);
    }
    // Nothing is mounted any more (teardown said so): remove the state.
    for sub in ["nats", "gateway"] {
        let _ = std::fs::remove_dir_all(s.dir.join(sub));
    }
    machines::remove_machine_dirs(&s.machines);
    DevState::remove(&s.dir)?;
    Ok(())
}

fn env(s: &Settings) -> Result<()> {
    let pw = cbus_tests::devfleet::secret(&s.dir, "admin.password")
        .ok()
        .filter(|p| !p.is_empty())
        .context("the dev fleet was never started here; run ./dev up")?;
    println!(
        "export NATS_URL={} NATS_USER=admin NATS_PASSWORD={pw}",
        hub_urls(s)
    );
    Ok(())
}

/// The running machine `name`, or why there is none.
fn machine_or_die(s: &Settings, name: Option<&String>, cmd: &str) -> Result<machines::Machine> {
    let state = load(s)?;
    let names: Vec<&str> = state
        .machines
        .iter()
        .map(|m| m.record.name.as_str())
        .collect();
    let names = names.join(" ");
    let Some(name) = name else {
        bail!("usage: ./dev {cmd} NAME (machines: {names})");
    };
    state
        .machine(name)
        .and_then(DevMachine::machine)
        .with_context(|| format!("no running machine '{name}' (machines: {names})"))
}

/// `nsenter` into all namespaces of a machine's init.
fn nsenter(m: &machines::Machine) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.args(["-t", &m.leader_pid().to_string(), "-a"]);
    cmd
}

fn shell(s: &Settings, args: &[String]) -> Result<()> {
    let m = machine_or_die(s, args.first(), "shell")?;
    let mut cmd = nsenter(&m);
    cmd.args(["env", "-i"])
        .arg(format!(
            "TERM={}",
            std::env::var("TERM").unwrap_or_else(|_| "xterm".into())
        ))
        .args([
            "HOME=/root",
            "LANG=C.UTF-8",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ]);
    match args.get(1..).filter(|a| !a.is_empty()) {
        Some(command) => cmd.args(command),
        None => cmd.args(["/bin/bash", "-l"]),
    };
    Err(cmd.exec()).context("exec nsenter")
}

fn logs(s: &Settings, args: &[String]) -> Result<()> {
    let m = machine_or_die(s, args.first(), "logs")?;
    let mut cmd = nsenter(&m);
    cmd.args(["journalctl", "-u", "cbus-agent", "--no-pager"]);
    match args.get(1..).filter(|a| !a.is_empty()) {
        Some(journalctl) => cmd.args(journalctl),
        None => cmd.args(["-n", "100"]),
    };
    Err(cmd.exec()).context("exec nsenter")
}
