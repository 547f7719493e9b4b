//! `cbus-bench`: figures for docs/benchmarks.md, each side by side with its baseline in the same
//! run. Run with release binaries:
//!
//! ```sh
//! cargo build --release --workspace --bins && target/release/cbus-bench
//! ```

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use cbus_client::fleet::Fleet;
use cbus_gateway::{Machine, Metrics, Text, Unit};
use cbus_protocol::presence::PresenceKind;
use cbus_tests::{bin_path, Agent, NatsServer, PrivateBus, TestService};
use futures::StreamExt;

#[path = "bench/cluster.rs"]
mod cluster;
#[path = "bench/compare.rs"]
mod compare;
#[path = "bench/dashboard.rs"]
mod dashboard;
#[path = "bench/gateway.rs"]
mod gateway;
#[path = "bench/machines.rs"]
mod machines;
#[path = "bench/scale.rs"]
mod scale;
#[path = "bench/scale_gateway.rs"]
mod scale_gateway;
#[path = "bench/scrape.rs"]
mod scrape;

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub fn summary(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    (percentile(&samples, 0.5), percentile(&samples, 0.95))
}

/// Sections, in the order they run; `cbus-bench SECTION...` runs only those.
const SECTIONS: &[(&str, &str)] = &[
    ("fanout", "cbus get over N agents sharing one private bus"),
    (
        "fanout-machines",
        "cbus get vs parallel ssh busctl over 1/3/10/50 nspawn machines",
    ),
    (
        "signals",
        "signal throughput, agent -> NATS vs busctl monitor",
    ),
    (
        "metrics",
        "/metrics render from a 100 x 200 cache, in process",
    ),
    (
        "node-exporter",
        "gateway /metrics vs node_exporter --collector.systemd on one machine",
    ),
    (
        "gateway",
        "WebSocket clients: delivery latency and gateway RSS",
    ),
    ("idle", "agent CPU and RSS over 60 s on an idle machine bus"),
    (
        "scale",
        "fleet emulator: cbus at 1,000 / 10,000 machines (--scale), 200 real vs 200 emulated",
    ),
    (
        "dashboard",
        "Chromium page at 1,000 emulated machines, 1,000 unit updates/s: frame time, JS heap",
    ),
    (
        "scale-gateway",
        "only when named: a real gateway over the fleet emulator at the first --scale size x 200 units: RSS, units snapshot of a glob, /metrics scraped by Prometheus",
    ),
    (
        "scale-metrics",
        "only when named: scale-gateway's /metrics part alone (the 20-unit gateway, Prometheus scraping it each way)",
    ),
    (
        "compare",
        "this build vs --baseline DIR's: cbus get, gateway /metrics, snapshot, RSS",
    ),
    (
        "cluster",
        "cbus get via one server, a 3-node cluster and a leaf; node failover time",
    ),
    (
        "emulate",
        "only when named: a nats-server and the fleet emulator at the first --scale size, held until killed (for profiling by hand)",
    ),
];

#[tokio::main]
async fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("usage: cbus-bench [--machines 1,3,10,50] [--idle-secs 60] [--scale 1000,10000] [--nats-server PATH]... [--baseline DIR] [SECTION...]\nsections (all by default):");
        for (name, what) in SECTIONS {
            println!("  {name:16} {what}");
        }
        return;
    }
    let mut sizes = vec![1usize, 3, 10, 50];
    let mut idle_secs = 60u64;
    let mut baseline: Option<std::path::PathBuf> = None;
    let mut scale_sizes = vec![1_000usize, 10_000];
    // `scale` and `emulate` against each of these nats-server binaries in turn (several: one
    // run compares server versions); none given is `nats-server` from PATH.
    let mut nats_servers: Vec<std::path::PathBuf> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--machines" => {
                let v = args
                    .get(i + 1)
                    .expect("--machines needs a list, e.g. 1,3,10");
                sizes = v
                    .split(',')
                    .map(|n| n.parse().expect("--machines: numbers"))
                    .collect();
                args.drain(i..i + 2);
            }
            "--scale" => {
                let v = args
                    .get(i + 1)
                    .expect("--scale needs a list, e.g. 1000,10000,50000");
                scale_sizes = v
                    .split(',')
                    .map(|n| n.parse().expect("--scale: numbers"))
                    .collect();
                args.drain(i..i + 2);
            }
            "--nats-server" => {
                let v = args
                    .get(i + 1)
                    .expect("--nats-server needs a binary's path");
                nats_servers.push(v.into());
                args.drain(i..i + 2);
            }
            "--baseline" => {
                let v = args.get(i + 1).expect("--baseline needs a directory");
                baseline = Some(v.into());
                args.drain(i..i + 2);
            }
            "--idle-secs" => {
                let v = args.get(i + 1).expect("--idle-secs needs a number");
                idle_secs = v.parse().expect("--idle-secs: a number");
                args.drain(i..i + 2);
            }
            _ => i += 1,
        }
    }
    for a in &args {
        assert!(
            SECTIONS.iter().any(|(n, _)| n == a),
            "unknown section {a:?}; see cbus-bench --help"
        );
    }
    let want = |s: &str| args.is_empty() || args.iter().any(|a| a == s);
    println!(
        "cbus-bench {} on {} ({} cores, {}), {}; load average {}",
        cbus_protocol::VERSION,
        hostname(),
        num_cpus(),
        kernel(),
        date(),
        loadavg()
    );
    if want("fanout") {
        fan_out().await;
    }
    if want("fanout-machines") {
        machines::fan_out_machines(&sizes).await;
    }
    if want("signals") {
        signals().await;
    }
    if want("metrics") {
        metrics_render();
    }
    if want("node-exporter") {
        machines::node_exporter().await;
    }
    if want("gateway") {
        gateway::gateway().await;
    }
    if want("idle") {
        machines::idle(idle_secs).await;
    }
    if want("scale") {
        scale::scale(&scale_sizes, &nats_servers).await;
    }
    if want("dashboard") {
        dashboard::dashboard().await;
    }
    // Only when named: at 10,000 machines it holds 2,000,000 units for several minutes.
    if args.iter().any(|a| a == "scale-gateway") {
        scale_gateway::scale_gateway(scale_sizes[0], false).await;
    } else if args.iter().any(|a| a == "scale-metrics") {
        scale_gateway::scale_gateway(scale_sizes[0], true).await;
    }
    // Only when named: it needs another build.
    if args.iter().any(|a| a == "compare") {
        let dir = baseline
            .as_deref()
            .expect("compare needs --baseline DIR (another build's binaries)");
        compare::compare(dir).await;
    }
    if want("cluster") {
        cluster::cluster().await;
    }
    if args.iter().any(|a| a == "emulate") {
        scale::hold(scale_sizes[0], nats_servers.first()).await;
    }
}

/// 1. `cbus get` (whole process) over N agents sharing one private bus: the cost of the fan-out
///    itself, without machines. The baselines run against real machines in `fanout-machines`.
async fn fan_out() {
    println!("\n## fan-out: `cbus get` whole process, 30 runs each");
    println!("| agents | median | p95 |");
    println!("|---|---|---|");
    let nats = NatsServer::start();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let fleet = Fleet::new(nats.connect().await, "bench");
    let mut agents = Vec::new();
    for n in [1usize, 3, 10, 50] {
        grow_agents(&nats.url(), bus.address(), &fleet, &mut agents, n).await;
        let samples = (0..30)
            .map(|_| timed_get(&bin_path("cbus"), &nats.url(), n))
            .collect();
        let (median, p95) = summary(samples);
        println!(
            "| {n} | {:.1} ms | {:.1} ms |",
            median.as_secs_f64() * 1e3,
            p95.as_secs_f64() * 1e3,
        );
    }
}

/// 2. Signals through the agent to a NATS subscriber, next to what a plain `busctl monitor` on
///    the same bus receives in the same run. The emitter is `cbus-test-service --emit`, several
///    connections sending pre-built `Tick` signals at once.
async fn signals() {
    const TOTAL: u32 = 300_000;
    const CONNECTIONS: u32 = 4;
    println!(
        "\n## signal throughput: {TOTAL} Tick signals from {CONNECTIONS} emitter connections on a private bus"
    );
    let nats = NatsServer::start();
    let bus = PrivateBus::start();
    let client = nats.connect().await;
    let agent = Agent::start(
        &nats.url(),
        bus.address(),
        &["--allow-all", "--metrics-interval", "1s"],
    );
    let fleet = Fleet::new(client.clone(), "bench");
    let ok = cbus_tests::wait_for(Duration::from_secs(20), || async {
        fleet
            .registry()
            .await
            .map(|a| !a.is_empty())
            .unwrap_or(false)
    })
    .await;
    assert!(ok, "agent did not register");
    let mut sub = client
        .subscribe(format!("dbus.signals.{}.>", agent.nkey))
        .await
        .expect("subscribe to signals");
    let mut metrics = client
        .subscribe(cbus_protocol::subject::metrics(&agent.nkey))
        .await
        .expect("subscribe to agent metrics");
    client.flush().await.expect("flush");
    // The plain side: busctl monitor on the same bus, one JSON line per message, counted.
    let mut monitor = Command::new("busctl")
        .arg(format!("--address={}", bus.address()))
        .args([
            "monitor",
            "--json=short",
            "--match=type='signal',member='Tick'",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run busctl monitor");
    let stdout = monitor.stdout.take().expect("busctl stdout");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut r = std::io::BufReader::with_capacity(1 << 20, stdout);
        let mut line = Vec::new();
        while r
            .read_until(b'\n', &mut line)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            if line.windows(6).any(|w| w == b"\"Tick\"") && tx.send(Instant::now()).is_err() {
                break;
            }
            line.clear();
        }
    });
    // busctl needs a moment to become a monitor.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now();
    let address = bus.address().to_owned();
    let emitter = tokio::task::spawn_blocking(move || {
        Command::new(bin_path("cbus-test-service"))
            .args(["--address", &address, "--emit"])
            .arg(TOTAL.to_string())
            .args(["--connections", &CONNECTIONS.to_string()])
            .output()
            .expect("run the emitter")
    });
    let nats_count = tokio::spawn(async move {
        let mut n = 0u32;
        let mut last = Instant::now();
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(3), sub.next()).await {
            if cbus_client::headers::get(m.headers.as_ref(), cbus_client::headers::MEMBER)
                == Some("Tick")
            {
                n += 1;
                last = Instant::now();
            }
        }
        (n, last)
    });
    let mut d = 0u32;
    let mut d_last = Instant::now();
    while let Ok(Some(t)) = tokio::time::timeout(Duration::from_secs(3), rx.recv()).await {
        d += 1;
        d_last = t;
    }
    let out = emitter.await.expect("emitter task");
    assert!(
        out.status.success(),
        "emitter failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let emit_secs: f64 = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .expect("emitter prints EMITTED N SECS");
    let (n, n_last) = nats_count.await.expect("nats counter");
    cbus_tests::util::terminate(&mut monitor, Duration::from_secs(2));
    // The agent's own counters, from its next metrics publication.
    let mut text = String::new();
    // Publications queued since the start come at once; the first one that had to be waited for
    // is fresh, published after the last signal was counted.
    loop {
        let waited = Instant::now();
        match tokio::time::timeout(Duration::from_secs(3), metrics.next()).await {
            Ok(Some(m)) => {
                text = String::from_utf8_lossy(&m.payload).into_owned();
                if waited.elapsed() > Duration::from_millis(100) {
                    break;
                }
            }
            _ => break,
        }
    }
    let counter = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("?")
            .to_owned()
    };
    let nats_rate = f64::from(n) / (n_last - start).as_secs_f64();
    let direct_rate = f64::from(d) / (d_last - start).as_secs_f64();
    println!(
        "emitter sent {TOTAL} in {emit_secs:.2} s ({:.0}/s, {CONNECTIONS} connections)",
        f64::from(TOTAL) / emit_secs
    );
    println!("| path | received | lost | rate |\n|---|---|---|---|");
    println!(
        "| busctl monitor (baseline) | {d} | {} | {direct_rate:.0}/s |",
        TOTAL - d.min(TOTAL)
    );
    println!(
        "| agent -> NATS subscriber | {n} | {} | {nats_rate:.0}/s |",
        TOTAL - n.min(TOTAL)
    );
    println!(
        "ratio received {:.2}, rate {:.2}; agent counters: forwarded {}, dropped {} (cbus_agent_signals_dropped_total)",
        f64::from(n) / f64::from(d.max(1)),
        nats_rate / direct_rate,
        counter("cbus_agent_signals_forwarded_total"),
        counter("cbus_agent_signals_dropped_total"),
    );
}

/// 4. /metrics rendering from the cache: 100 machines x 200 units.
fn metrics_render() {
    println!("\n## /metrics render from cache: 100 machines x 200 units");
    let machines: Vec<Machine> = (0..100)
        .map(|i| {
            let units: BTreeMap<Text, Unit> = (0..200)
                .map(|u| {
                    (
                        format!("unit-{u}.service").into(),
                        Unit {
                            description: format!("unit {u}").into(),
                            load: "loaded".into(),
                            active: if u % 7 == 0 { "failed" } else { "active" }.into(),
                            sub: "running".into(),
                            active_enter_us: Some(1_700_000_000_000_000),
                            restarts: Some(u % 3),
                            ..Default::default()
                        },
                    )
                })
                .collect();
            let mut m = Machine::new(
                cbus_tests::synthetic_agent_info(format!("U{i:055}"), format!("host-{i}")),
                PresenceKind::Heartbeat,
                cbus_protocol::presence::now_ms(),
            );
            *m.units_mut() = units;
            m
        })
        .collect();
    // The gateway keeps each machine's unit series until its units change: a scrape after a
    // quiet interval only concatenates, one after every machine changed renders everything.
    println!("| units changed since the last scrape | series | bytes | median | p95 |\n|---|---|---|---|---|");
    for every_machine_changed in [false, true] {
        let mut machines = machines.clone();
        let metrics = Metrics::default();
        let mut samples = Vec::new();
        let mut bytes = 0;
        for _ in 0..30 {
            if every_machine_changed {
                for m in &mut machines {
                    if let Some(u) = m.units_mut().get_mut("unit-1.service") {
                        u.restarts = u.restarts.map(|r| r + 1);
                    }
                }
            }
            let t = Instant::now();
            bytes = metrics
                .render(&machines, cbus_protocol::presence::now_ms())
                .len();
            samples.push(t.elapsed());
        }
        let (median, p95) = summary(samples);
        println!(
            "| {} | {} | {bytes} | {:.1} ms | {:.1} ms |",
            if every_machine_changed {
                "one unit on every machine"
            } else {
                "none"
            },
            100 * 200 * 8 + 200,
            median.as_secs_f64() * 1e3,
            p95.as_secs_f64() * 1e3
        );
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn date() -> String {
    String::from_utf8_lossy(
        &Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%d %H:%M UTC")
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default(),
    )
    .trim()
    .to_owned()
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| format!("Linux {}", s.trim()))
        .unwrap_or_default()
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Starts agents on `bus` until there are `n`, and waits until the registry has them running.
pub async fn grow_agents(url: &str, bus: &str, fleet: &Fleet, agents: &mut Vec<Agent>, n: usize) {
    while agents.len() < n {
        agents.push(Agent::start(url, bus, &["--no-signals"]));
    }
    let ok = cbus_tests::ask::wait_running(fleet, Duration::from_secs(60), |c| c >= n).await;
    assert!(ok, "{n} agents did not register");
}

/// `CBUS --server URL -s get` of the test service's String property, whole process; checks it
/// succeeded with `expect` lines and returns how long it took.
pub fn timed_get(cbus: &std::path::Path, url: &str, expect: usize) -> Duration {
    let t = Instant::now();
    let out = Command::new(cbus)
        .args(["--server", url, "-s", "get"])
        .args([
            TestService::NAME,
            TestService::PATH,
            "org.cbus.Test1.String",
        ])
        .output()
        .expect("run cbus");
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), expect);
    took
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
