//! `cbus-bench`: figures for docs/benchmarks.md, each side by side with its baseline in the same
//! run. Run with release binaries:
//!
//! ```sh
//! cargo build --release --workspace --bins && target/release/cbus-bench
//! ```

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use cbus_gateway::cache::{Machine, Unit};
use cbus_protocol::fleet::Fleet;
use cbus_protocol::presence::{AgentInfo, PresenceKind};
use cbus_tests::{bin_path, Agent, NatsServer, PrivateBus, TestService};
use futures::StreamExt;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn summary(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    (percentile(&samples, 0.5), percentile(&samples, 0.95))
}

#[tokio::main]
async fn main() {
    println!(
        "cbus-bench {} on {} ({} cores), {}",
        cbus_protocol::VERSION,
        hostname(),
        num_cpus(),
        date()
    );
    fan_out().await;
    signals().await;
    metrics_render();
}

/// 1. `cbus get` (whole process) over N agents; baseline: the original's fixed 1 s broadcast wait.
async fn fan_out() {
    println!("\n## fan-out: `cbus get` whole process, 30 runs each");
    println!("| agents | median | p95 | original (fixed 1 s wait) | ratio |");
    println!("|---|---|---|---|---|");
    let nats = NatsServer::start();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let fleet = Fleet::new(nats.connect().await, "bench");
    let mut agents = Vec::new();
    for n in [1usize, 3, 10, 50] {
        while agents.len() < n {
            agents.push(Agent::start(&nats.url(), bus.address(), &["--no-signals"]));
        }
        let ok = cbus_tests::wait_for(Duration::from_secs(60), || async {
            fleet
                .registry()
                .await
                .map(|a| a.len() >= n)
                .unwrap_or(false)
        })
        .await;
        assert!(ok, "{n} agents did not register");
        let mut samples = Vec::new();
        for _ in 0..30 {
            let t = Instant::now();
            let out = Command::new(bin_path("cbus"))
                .args([
                    "--server",
                    &nats.url(),
                    "-s",
                    "get",
                    "org.cbus.Test",
                    "/org/cbus/Test",
                    "org.cbus.Test1.String",
                ])
                .output()
                .expect("run cbus");
            samples.push(t.elapsed());
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), n);
        }
        let (median, p95) = summary(samples);
        let original = Duration::from_secs(1) + median;
        println!(
            "| {n} | {:.1} ms | {:.1} ms | ≥ {:.0} ms | {:.0}x |",
            median.as_secs_f64() * 1e3,
            p95.as_secs_f64() * 1e3,
            original.as_secs_f64() * 1e3,
            original.as_secs_f64() / median.as_secs_f64()
        );
    }
}

/// 2. Signals through the agent to a NATS subscriber, next to what a plain D-Bus subscriber on
///    the same bus receives in the same run.
async fn signals() {
    println!("\n## signal throughput: EmitSignals(200000) on a private bus");
    let nats = NatsServer::start();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
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
    assert!(ok);
    let mut sub = client
        .subscribe(format!("dbus.signals.{}.>", agent.nkey))
        .await
        .unwrap();
    client.flush().await.unwrap();
    // The plain D-Bus side: a match rule on its own connection, as `busctl monitor` would.
    let conn = bus.connect().await;
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .member("Tick")
        .unwrap()
        .build();
    let mut direct = zbus::MessageStream::for_match_rule(rule, &conn, Some(1 << 20))
        .await
        .unwrap();
    let total = 200_000u32;
    let caller = bus.connect().await;
    let start = Instant::now();
    let emit = tokio::spawn(async move {
        caller
            .call_method(
                Some("org.cbus.Test"),
                "/org/cbus/Test",
                Some("org.cbus.Test1"),
                "EmitSignals",
                &(total,),
            )
            .await
            .map(|_| ())
    });
    let nats_count = tokio::spawn(async move {
        let mut n = 0u32;
        let mut last = Instant::now();
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
            n += 1;
            last = Instant::now();
        }
        (n, last)
    });
    let mut d = 0u32;
    let mut d_last = Instant::now();
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(2), direct.next()).await {
        d += 1;
        d_last = Instant::now();
    }
    let _ = emit.await;
    let (n, n_last) = nats_count.await.unwrap();
    let nats_rate = f64::from(n) / (n_last - start).as_secs_f64();
    let direct_rate = f64::from(d) / (d_last - start).as_secs_f64();
    println!("| path | received | rate |\n|---|---|---|");
    println!("| D-Bus match rule (baseline) | {d} | {direct_rate:.0}/s |");
    println!("| agent -> NATS subscriber | {n} | {nats_rate:.0}/s |");
    println!(
        "ratio received {:.2}, rate {:.2} (drops are counted in cbus_agent_signals_dropped_total)",
        f64::from(n) / f64::from(d.max(1)),
        nats_rate / direct_rate
    );
}

/// 4. /metrics rendering from the cache: 100 machines x 200 units.
fn metrics_render() {
    println!("\n## /metrics render from cache: 100 machines x 200 units");
    let machines: Vec<Machine> = (0..100)
        .map(|i| {
            let units: BTreeMap<String, Unit> = (0..200)
                .map(|u| {
                    (
                        format!("unit-{u}.service"),
                        Unit {
                            description: format!("unit {u}"),
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
                AgentInfo {
                    nkey: format!("U{i:055}"),
                    hostname: format!("host-{i}"),
                    version: "0.1.0".into(),
                    bus: "system".into(),
                    started_at_ms: 0,
                    heartbeat_ms: 5000,
                    bus_connected: true,
                    labels: BTreeMap::new(),
                },
                PresenceKind::Heartbeat,
                cbus_protocol::presence::now_ms(),
            );
            m.units = units;
            m
        })
        .collect();
    let mut samples = Vec::new();
    let mut bytes = 0;
    for _ in 0..30 {
        let t = Instant::now();
        bytes = cbus_gateway::metrics::render(&machines, cbus_protocol::presence::now_ms()).len();
        samples.push(t.elapsed());
    }
    let (median, p95) = summary(samples);
    println!("| series | bytes | median | p95 |\n|---|---|---|---|");
    println!(
        "| {} | {bytes} | {:.1} ms | {:.1} ms |",
        100 * 200 * 8 + 200,
        median.as_secs_f64() * 1e3,
        p95.as_secs_f64() * 1e3
    );
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
