//! `compare --baseline DIR`: this build against another (DIR holds its `cbus` and
//! `cbus-gateway`, e.g. the previous main built with `cargo build --release`), side by side in
//! one run on the same agents, runs interleaved: `cbus get` whole process, and a gateway's
//! `/metrics` scrape, units snapshot and RSS with 100 synthetic machines x 200 units.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cbus_client::fleet::Fleet;
use cbus_tests::gateway::{http_get, rss_kib};
use cbus_tests::{
    bin_path, GatewayProcess, GatewayStart, NatsServer, PrivateBus, TestService, WsClient,
};

use crate::{ms, summary};

const RUNS: usize = 30;
const MACHINES: usize = 100;
const UNITS: usize = 200;
const TOKEN: &str = "compare-token";

struct Build {
    name: &'static str,
    cbus: PathBuf,
    gateway: PathBuf,
}

fn builds(baseline: &Path) -> [Build; 2] {
    let old = |name: &str| {
        let p = baseline.join(name);
        assert!(
            p.exists(),
            "{} not found (--baseline DIR holds the other build's binaries)",
            p.display()
        );
        p
    };
    [
        Build {
            name: "baseline",
            cbus: old("cbus"),
            gateway: old("cbus-gateway"),
        },
        Build {
            name: "this build",
            cbus: bin_path("cbus"),
            gateway: bin_path("cbus-gateway"),
        },
    ]
}

fn row(what: &str, builds: &[Build; 2], samples: &[Vec<Duration>; 2]) {
    let (m0, p0) = summary(samples[0].clone());
    let (m1, p1) = summary(samples[1].clone());
    println!(
        "| {what} | {:.1} ms (p95 {:.1}) | {:.1} ms (p95 {:.1}) | {:.2} |",
        ms(m0),
        ms(p0),
        ms(m1),
        ms(p1),
        m1.as_secs_f64() / m0.as_secs_f64()
    );
    let _ = builds;
}

/// A units snapshot for every machine's units over WebSocket: connect, subscribe, first frame.
async fn snapshot(port: u16) -> Duration {
    let t = Instant::now();
    let mut ws = WsClient::connect(&format!("ws://127.0.0.1:{port}/ws"), Some(TOKEN))
        .await
        .expect("ws connect");
    ws.send(serde_json::json!({"type": "subscribe", "id": "u", "resource": "units", "unit": "bench-00*.service"}))
        .await;
    let snap = ws
        .until(Duration::from_secs(10), |v| {
            v["type"] == "snapshot" && v["sub"] == "u"
        })
        .await
        .expect("units snapshot");
    let took = t.elapsed();
    assert_eq!(snap["data"].as_array().map(Vec::len), Some(MACHINES * 10));
    took
}

pub async fn compare(baseline: &Path) {
    let builds = builds(baseline);
    println!(
        "\n## compare: baseline {} vs this build, interleaved, {RUNS} runs each",
        baseline.display()
    );
    println!(
        "| what | {} | {} | ratio (this / baseline) |\n|---|---|---|---|",
        builds[0].name, builds[1].name
    );

    // Fan-out: the same agents answer both CLIs.
    let nats = NatsServer::start();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let fleet = Fleet::new(nats.connect().await, "bench");
    let mut agents = Vec::new();
    for n in [10usize, 50] {
        crate::grow_agents(&nats.url(), bus.address(), &fleet, &mut agents, n).await;
        let mut samples = [Vec::new(), Vec::new()];
        for _ in 0..RUNS {
            for (i, b) in builds.iter().enumerate() {
                samples[i].push(crate::timed_get(&b.cbus, &nats.url(), n));
            }
        }
        row(&format!("`cbus get`, {n} agents"), &builds, &samples);
    }
    drop(agents);

    // Gateways: both follow the same synthetic machines.
    let nats = NatsServer::start();
    let gateways: Vec<GatewayProcess> = builds
        .iter()
        .map(|b| {
            GatewayProcess::start_with(GatewayStart {
                nats_url: &nats.url(),
                token: Some(TOKEN),
                bin: Some(b.gateway.clone()),
                ..Default::default()
            })
        })
        .collect();
    let agents_client = nats.connect().await;
    for i in 0..MACHINES {
        let nkey = nkeys::KeyPair::new_user().public_key();
        let info = cbus_tests::synthetic_agent_info(nkey, format!("synth-{i:03}"));
        tokio::spawn(crate::gateway::synthetic_agent(agents_client.clone(), info));
    }
    for gw in &gateways {
        crate::gateway::wait_loaded(gw.port, MACHINES, UNITS).await;
    }
    // Idle cost after loading: CPU each gateway spends in 3 s with no scrape and no client.
    let cpu = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let rest = s.rsplit_once(')')?.1.to_owned();
                let f: Vec<&str> = rest.split_whitespace().collect();
                Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
            })
            .unwrap_or(0)
    };
    let before: Vec<u64> = gateways
        .iter()
        .map(|g| cpu(g.pid().expect("pid")))
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle: Vec<u64> = gateways
        .iter()
        .zip(&before)
        .map(|(g, b)| cpu(g.pid().expect("pid")) - b)
        .collect();
    println!(
        "| gateway CPU while idle, 3 s (clock ticks) | {} | {} | |",
        idle[0], idle[1]
    );
    let mut scrapes = [Vec::new(), Vec::new()];
    let mut snaps = [Vec::new(), Vec::new()];
    // Scrapes first, then snapshots: each kind interleaved between the builds.
    // Which build goes first alternates, so neither always follows the other's 16 MB reply.
    let order = |run: usize| {
        if run.is_multiple_of(2) {
            [0, 1]
        } else {
            [1, 0]
        }
    };
    for run in 0..RUNS {
        for i in order(run) {
            let t = Instant::now();
            http_get(gateways[i].port, "/metrics").expect("scrape");
            scrapes[i].push(t.elapsed());
        }
    }
    for run in 0..RUNS {
        for i in order(run) {
            snaps[i].push(snapshot(gateways[i].port).await);
        }
    }
    // The same scrapes by curl, so the bench's own HTTP client is out of the figure.
    let mut curls = [Vec::new(), Vec::new()];
    for run in 0..RUNS {
        for i in order(run) {
            let out = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{time_total}"])
                .arg(format!("http://127.0.0.1:{}/metrics", gateways[i].port))
                .output()
                .expect("run curl");
            let secs: f64 = String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or(0.0);
            curls[i].push(Duration::from_secs_f64(secs));
        }
    }
    row(
        &format!("gateway /metrics by curl, {MACHINES} x {UNITS} units"),
        &builds,
        &curls,
    );
    row(
        &format!("gateway /metrics over HTTP, {MACHINES} x {UNITS} units"),
        &builds,
        &scrapes,
    );
    row(
        &format!(
            "gateway units snapshot over WebSocket, {} rows",
            MACHINES * 10
        ),
        &builds,
        &snaps,
    );
    let rss: Vec<u64> = gateways
        .iter()
        .map(|g| rss_kib(g.pid().expect("pid")))
        .collect();
    println!(
        "| gateway RSS after the runs | {:.1} MiB | {:.1} MiB | {:.2} |",
        rss[0] as f64 / 1024.0,
        rss[1] as f64 / 1024.0,
        rss[1] as f64 / rss[0] as f64
    );
}
