//! Sections that boot real systemd machines (nspawn): fan-out against parallel ssh, the gateway's
//! /metrics against node_exporter's systemd collector, and the agent's idle footprint.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cbus_client::fleet::Fleet as CbusFleet;
use cbus_tests::gateway::http_get;
use cbus_tests::{bin_path, free_port, Agent, Fleet, GatewayProcess, MachineSpec, NatsServer};

use crate::{ms, summary};

/// The unit whose ActiveState every side reads: present on every machine.
const UNIT: &str = "dbus.service";
/// Machines booted per `Fleet::boot`: 2 cores boot five at a time while other work runs.
const BATCH: usize = 5;

/// Boots machines in batches until `fleets` hold `n`; `spec` makes the i-th spec.
async fn grow(fleets: &mut Vec<Fleet>, n: usize, spec: &(dyn Fn(usize) -> MachineSpec + Sync)) {
    let have: usize = fleets.iter().map(|f| f.machines.len()).sum();
    let mut next = have;
    while next < n {
        let end = (next + BATCH).min(n);
        let specs: Vec<MachineSpec> = (next..end).map(spec).collect();
        let t = Instant::now();
        // On a loaded host a machine now and then comes up degraded (a unit that failed to
        // start in time); the batch is torn down and booted once more.
        let mut attempt = 0;
        let fleet = loop {
            let specs = specs.clone();
            match tokio::task::spawn_blocking(move || Fleet::try_boot(&specs))
                .await
                .expect("boot task")
            {
                Ok(f) => break f,
                Err(e) if attempt < 2 => {
                    attempt += 1;
                    eprintln!("booting machines {next}..{end} failed, retrying: {e}");
                }
                Err(e) => panic!("booting machines {next}..{end} failed: {e}"),
            }
        };
        eprintln!(
            "booted machines {next}..{end} in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        fleets.push(fleet);
        next = end;
    }
}

async fn wait_registered(fleet: &CbusFleet, n: usize) {
    let ok = cbus_tests::ask::wait_running(fleet, Duration::from_secs(60), |c| c >= n).await;
    assert!(ok, "{n} agents did not register");
}

/// ssh ControlMaster processes, ended on drop (also when the bench panics).
struct Masters(Vec<Child>);

impl Drop for Masters {
    fn drop(&mut self) {
        for m in &mut self.0 {
            cbus_tests::util::terminate(m, Duration::from_secs(2));
        }
    }
}

struct SshTarget {
    port: u16,
    name: String,
}

fn ssh_command(key: &Path, known_hosts: &Path, t: &SshTarget, mux: Option<&Path>) -> Command {
    let mut c = Command::new("ssh");
    c.args([
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
    ])
    .arg("-o")
    .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
    .args(["-o", "StrictHostKeyChecking=yes", "-i"])
    .arg(key)
    .args(["-p", &t.port.to_string()]);
    if let Some(path) = mux {
        c.arg("-o")
            .arg(format!("ControlPath={}", path.display()))
            .args(["-o", "ControlMaster=no"]);
    }
    c.arg("root@127.0.0.1");
    c
}

/// One run of the ssh baseline: `ssh root@m busctl get-property ...` to every target at once,
/// waiting for all. Returns the wall time.
fn ssh_round(
    key: &Path,
    known_hosts: &Path,
    targets: &[SshTarget],
    mux: Option<&[PathBuf]>,
) -> Duration {
    let path = cbus_protocol::names::systemd_unit_path(UNIT);
    let t = Instant::now();
    let children: Vec<Child> = targets
        .iter()
        .enumerate()
        .map(|(i, m)| {
            ssh_command(key, known_hosts, m, mux.map(|p| p[i].as_path()))
                .args([
                    "busctl",
                    "get-property",
                    "org.freedesktop.systemd1",
                    &path,
                    "org.freedesktop.systemd1.Unit",
                    "ActiveState",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run ssh")
        })
        .collect();
    for (child, m) in children.into_iter().zip(targets) {
        let out = child.wait_with_output().expect("wait for ssh");
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"active\""),
            "ssh to {} failed: {}{}",
            m.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    t.elapsed()
}

/// One `cbus get` over the fleet; the wall time, or why it did not answer for all `n`.
fn cbus_get_round(url: &str, n: usize) -> Result<Duration, String> {
    let path = cbus_protocol::names::systemd_unit_path(UNIT);
    let t = Instant::now();
    let out = Command::new(bin_path("cbus"))
        .args([
            "--server",
            url,
            "-s",
            "get",
            "org.freedesktop.systemd1",
            &path,
            "org.freedesktop.systemd1.Unit.ActiveState",
        ])
        .output()
        .expect("run cbus");
    let took = t.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    let answered = text.lines().filter(|l| l.ends_with("\tactive")).count();
    if out.status.success() && answered == n {
        Ok(took)
    } else {
        Err(format!(
            "{answered} of {n} answered: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The original CBus's broadcast: one request to every agent, replies collected until a fixed 1 s
/// passed, however early the last one came. Run from an already connected client, so it is
/// timed without the process start and connect that `cbus get` pays for.
async fn fixed_wait_round(client: &async_nats::Client, n: usize) -> Result<Duration, String> {
    use cbus_protocol::envelope::{Reply, Request};
    use cbus_protocol::subject::{Op, RequestSubject, Target};
    use futures::StreamExt;
    const WAIT: Duration = Duration::from_secs(1);
    let subject = RequestSubject::new(
        Target::Broadcast,
        "org.freedesktop.systemd1",
        cbus_protocol::names::systemd_unit_path(UNIT),
        Op::Get,
        Some("ActiveState".into()),
    )
    .and_then(|s| s.encode())
    .map_err(|e| e.to_string())?;
    let request = Request {
        interface: Some("org.freedesktop.systemd1.Unit".into()),
        ..Default::default()
    };
    let payload = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let inbox = client.new_inbox();
    let mut sub = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| e.to_string())?;
    client
        .publish_with_reply(subject, inbox, payload.into())
        .await
        .map_err(|e| e.to_string())?;
    let mut active = 0;
    while let Ok(Some(msg)) = tokio::time::timeout_at((t + WAIT).into(), sub.next()).await {
        if Reply::from_payload(&msg.payload).is_ok_and(|r| {
            r.result
                .is_ok_and(|v| v.value == serde_json::json!("active"))
        }) {
            active += 1;
        }
    }
    let took = t.elapsed();
    if active == n {
        Ok(took)
    } else {
        Err(format!("{active} of {n} answered active"))
    }
}

/// 1. `cbus get` of a unit's ActiveState over 1/3/10/50 real systemd machines, next to parallel
///    `ssh machine busctl get-property` (fresh connections, and persistent ControlMaster ones)
///    over the same machines in the same run, and the original's fixed 1 s wait.
pub async fn fan_out_machines(sizes: &[usize]) {
    const RUNS: usize = 30;
    const SSH_RUNS: usize = 15;
    const FIXED_RUNS: usize = 5;
    println!(
        "\n## fan-out over nspawn machines: `cbus get {UNIT} ActiveState` vs parallel ssh busctl"
    );
    println!(
        "cbus: {RUNS} runs; ssh: {SSH_RUNS} runs of N parallel `ssh root@m busctl get-property` (fresh \
         connections), and the same over persistent ControlMaster connections; fixed 1 s: \
         {FIXED_RUNS} runs of the original's broadcast that collects replies for 1 s"
    );
    println!("| machines | cbus median | cbus p95 | ssh median | ssh p95 | ssh / cbus | ssh-mux median | ssh-mux p95 | ssh-mux / cbus | fixed 1 s median | fixed 1 s / cbus |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    // Every machine's systemd, journald, logind... takes inotify instances, counted per user on
    // the host (root for all machines): the default 128 stalls the 15th machine in
    // "initializing" with failed .path units.
    let most = sizes.iter().copied().max().unwrap_or(1);
    let instances: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        instances >= 16 * most + 128,
        "{most} machines need more inotify instances than fs.inotify.max_user_instances={instances}: \
         sysctl -w fs.inotify.max_user_instances=8192"
    );
    let dir = tempfile::tempdir().expect("tempdir for the ssh client key");
    let key = dir.path().join("id_ed25519");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen");
    assert!(st.success());
    let client_pub = std::fs::read_to_string(key.with_extension("pub")).expect("client pub key");
    let known_hosts = dir.path().join("known_hosts");
    // sshd ports below the kernel's ephemeral range (32768..), so that no client socket or
    // other fixture's free_port() takes one between now and the machine's boot.
    let ports: Vec<u16> = (22000u16..32000)
        .filter(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .take(most)
        .collect();
    let spec = |i: usize| {
        let mut s = MachineSpec::new(format!("cbench-{i:02}"));
        s.ssh = true;
        s.files.push((
            "/etc/ssh/sshd_config.d/cbus-bench.conf".into(),
            format!(
                "Port {}\nListenAddress 127.0.0.1\nPasswordAuthentication no\nPermitRootLogin prohibit-password\n",
                ports[i]
            ),
            0o644,
        ));
        s.files.push((
            "/root/.ssh/authorized_keys".into(),
            client_pub.clone(),
            0o600,
        ));
        s
    };
    let nats = NatsServer::start();
    let url = nats.url();
    let cfleet = CbusFleet::new(nats.connect().await, "bench");
    let mut fleets: Vec<Fleet> = Vec::new();
    let mut agents: Vec<Agent> = Vec::new();
    let mut masters = Masters(Vec::new());
    let mut mux_paths: Vec<PathBuf> = Vec::new();
    let mut targets: Vec<SshTarget> = Vec::new();
    for &n in sizes {
        grow(&mut fleets, n, &spec).await;
        let machines: Vec<&cbus_tests::Machine> =
            fleets.iter().flat_map(|f| f.machines.iter()).collect();
        while agents.len() < n {
            let m = machines[agents.len()];
            let mut kh = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&known_hosts)
                .expect("known_hosts");
            use std::io::Write;
            writeln!(
                kh,
                "[127.0.0.1]:{} {}",
                ports[agents.len()],
                m.host_key_public().trim()
            )
            .expect("write known_hosts");
            targets.push(SshTarget {
                port: ports[agents.len()],
                name: m.name.clone(),
            });
            agents.push(Agent::on_machine(
                &url,
                m,
                &["--no-signals", "--hostname", &m.name],
            ));
        }
        wait_registered(&cfleet, n).await;
        let targets = &targets[..n];
        // Warm-up: sshd up and logins work, agents answer.
        let _ = ssh_round(&key, &known_hosts, targets, None);
        let ok = cbus_tests::wait_for(Duration::from_secs(30), || async {
            cbus_get_round(&url, n).is_ok()
        })
        .await;
        assert!(ok, "cbus get did not reach all {n} machines");
        let mut cb = Vec::new();
        let mut failed = Vec::new();
        let mut ssh = Vec::new();
        let mut fixed = Vec::new();
        // Interleave so both sides see the same background load.
        for i in 0..RUNS {
            match cbus_get_round(&url, n) {
                Ok(d) => cb.push(d),
                Err(e) => failed.push(e),
            }
            if i < SSH_RUNS {
                ssh.push(ssh_round(&key, &known_hosts, targets, None));
            }
            if i < FIXED_RUNS {
                match fixed_wait_round(cfleet.client(), n).await {
                    Ok(d) => fixed.push(d),
                    Err(e) => failed.push(format!("fixed 1 s: {e}")),
                }
            }
        }
        // Persistent connections: one ControlMaster per machine, kept for the later sizes.
        while masters.0.len() < n {
            let i = masters.0.len();
            let path = dir.path().join(format!("mux-{i}"));
            let child = ssh_command(&key, &known_hosts, &targets[i], None)
                .arg("-N")
                .arg("-o")
                .arg(format!("ControlPath={}", path.display()))
                .args(["-o", "ControlMaster=yes"])
                .stdin(Stdio::null())
                .spawn()
                .expect("ssh master");
            masters.0.push(child);
            mux_paths.push(path);
        }
        let ok = cbus_tests::wait_for(Duration::from_secs(60), || async {
            mux_paths[..n].iter().all(|p| p.exists())
        })
        .await;
        assert!(ok, "ssh control masters did not come up");
        let _ = ssh_round(&key, &known_hosts, targets, Some(&mux_paths[..n]));
        let mut mux = Vec::new();
        for _ in 0..SSH_RUNS {
            mux.push(ssh_round(
                &key,
                &known_hosts,
                targets,
                Some(&mux_paths[..n]),
            ));
        }
        if !failed.is_empty() {
            println!(
                "{} runs at {n} machines did not answer for all: {failed:?}",
                failed.len()
            );
        }
        let (cm, cp) = summary(cb);
        let (sm, sp) = summary(ssh);
        let (mm, mp) = summary(mux);
        let (fm, _) = summary(fixed);
        println!(
            "| {n} | {:.1} ms | {:.1} ms | {:.0} ms | {:.0} ms | {:.0}x | {:.0} ms | {:.0} ms | {:.1}x | {:.0} ms | {:.0}x |",
            ms(cm),
            ms(cp),
            ms(sm),
            ms(sp),
            sm.as_secs_f64() / cm.as_secs_f64(),
            ms(mm),
            ms(mp),
            mm.as_secs_f64() / cm.as_secs_f64(),
            ms(fm),
            fm.as_secs_f64() / cm.as_secs_f64(),
        );
    }
    drop(masters);
    drop(agents);
    drop(fleets);
}

/// 4b. The gateway's /metrics, filled by a real agent on one machine, next to node_exporter's
///     systemd collector running inside the same machine, scraped alternately.
pub async fn node_exporter() {
    const RUNS: usize = 30;
    println!("\n## /metrics scrape: gateway (cache) vs node_exporter --collector.systemd, one nspawn machine");
    let port = free_port();
    let unit = format!(
        "[Unit]\nDescription=node_exporter for cbus-bench\n[Service]\nExecStart=/usr/bin/prometheus-node-exporter \
         --web.listen-address=127.0.0.1:{port} --collector.disable-defaults --collector.systemd\n"
    );
    let mut spec =
        MachineSpec::new("cbench-ne").with_unit("cbus-bench-node-exporter.service", &unit);
    spec.enable.push("cbus-bench-node-exporter.service".into());
    let fleet = tokio::task::spawn_blocking(move || Fleet::boot(&[spec]))
        .await
        .expect("boot machine");
    let m = &fleet.machines[0];
    let nats = NatsServer::start();
    let _agent = Agent::on_machine(&nats.url(), m, &["--no-signals", "--hostname", &m.name]);
    let gw = GatewayProcess::start(&nats.url(), "bench-token", &[]);
    let gw_port = gw.port;
    let ok = cbus_tests::wait_for(Duration::from_secs(60), || async {
        http_get(gw_port, "/metrics").is_some_and(|t| {
            t.contains("cbus_systemd_unit_state{host=\"cbench-ne\"")
                && t.contains("cbus_systemd_unit_start_time_seconds")
        }) && http_get(port, "/metrics").is_some()
    })
    .await;
    assert!(
        ok,
        "gateway or node_exporter did not serve the machine's units"
    );
    let series = |t: &str| t.lines().filter(|l| !l.starts_with('#')).count();
    let unit_series = |t: &str, name: &str| {
        t.lines()
            .filter(|l| l.starts_with(name) && l.contains("state=\"active\""))
            .count()
    };
    let mut gw_t = Vec::new();
    let mut ne_t = Vec::new();
    let (mut gw_text, mut ne_text) = (String::new(), String::new());
    for _ in 0..RUNS {
        let t = Instant::now();
        ne_text = http_get(port, "/metrics").expect("scrape node_exporter");
        ne_t.push(t.elapsed());
        let t = Instant::now();
        gw_text = http_get(gw_port, "/metrics").expect("scrape gateway");
        gw_t.push(t.elapsed());
    }
    let (gm, gp) = summary(gw_t);
    let (nm, np) = summary(ne_t);
    println!("{RUNS} scrapes each, alternating; HTTP/1.1 GET with a new connection each time");
    println!("| scraper | units | series | bytes | median | p95 |\n|---|---|---|---|---|---|");
    println!(
        "| node_exporter 1.5.0 --collector.systemd (in the machine) | {} | {} | {} | {:.1} ms | {:.1} ms |",
        unit_series(&ne_text, "node_systemd_unit_state"),
        series(&ne_text),
        ne_text.len(),
        ms(nm),
        ms(np)
    );
    println!(
        "| cbus-gateway /metrics (agent on the machine's bus) | {} | {} | {} | {:.1} ms | {:.1} ms |",
        unit_series(&gw_text, "cbus_systemd_unit_state"),
        series(&gw_text),
        gw_text.len(),
        ms(gm),
        ms(gp)
    );
    println!(
        "ratio node_exporter / gateway (median): {:.1}x",
        nm.as_secs_f64() / gm.as_secs_f64()
    );
    drop(gw);
    drop(fleet);
}

/// CPU time the process has used, from /proc/PID/schedstat (nanoseconds, all threads), so that
/// an idle process is not rounded to 0 clock ticks.
fn proc_cpu_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("read /proc/PID/task")
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// A `VmRSS`-style field of /proc/PID/status, in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// 5. A cbus-agent with its defaults (5 s heartbeat, 15 s metrics, signals on) bridging an idle
///    machine's system bus: CPU time and RSS over `secs`.
pub async fn idle(secs: u64) {
    println!("\n## agent footprint: idle machine bus, agent defaults, {secs} s");
    let fleet = tokio::task::spawn_blocking(|| Fleet::boot(&[MachineSpec::new("cbench-idle")]))
        .await
        .expect("boot machine");
    let m = &fleet.machines[0];
    let nats = NatsServer::start();
    let mut child = Command::new(bin_path("cbus-agent"))
        .args(["--nats-url", &nats.url(), "--bus", &m.bus_address()])
        .arg("--host-key")
        .arg(m.host_key_path())
        .args(["--hostname", &m.name])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("start cbus-agent");
    let pid = child.id();
    let cfleet = CbusFleet::new(nats.connect().await, "bench");
    wait_registered(&cfleet, 1).await;
    // Let start-up work (registry write, first metrics) settle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let t0 = Instant::now();
    let c0 = proc_cpu_ns(pid);
    let mut rss_max = 0;
    let mut rss_sum = 0;
    let mut samples = 0;
    while t0.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let r = proc_status_kib(pid, "VmRSS:");
        rss_max = rss_max.max(r);
        rss_sum += r;
        samples += 1;
    }
    let cpu_s = (proc_cpu_ns(pid) - c0) as f64 / 1e9;
    let wall = t0.elapsed().as_secs_f64();
    println!(
        "| CPU | RSS mean | RSS max | VmHWM (peak since start) | threads |\n|---|---|---|---|---|"
    );
    println!(
        "| {:.4} % ({:.1} ms CPU in {:.0} s) | {:.1} MiB | {:.1} MiB | {:.1} MiB | {} |",
        cpu_s / wall * 100.0,
        cpu_s * 1e3,
        wall,
        rss_sum as f64 / samples.max(1) as f64 / 1024.0,
        rss_max as f64 / 1024.0,
        proc_status_kib(pid, "VmHWM:") as f64 / 1024.0,
        proc_status_kib(pid, "Threads:")
    );
    cbus_tests::util::terminate(&mut child, Duration::from_secs(5));
    drop(fleet);
}
