//! `scale-gateway`: a real `cbus-gateway` following the **fleet emulator** (`cbus_tests::emulator`)
//! at the first `--scale` size (issue #14's figures are at 10,000 machines x 200 units).
//!
//! Two gateways, one after the other, on the same emulated fleet:
//! - one following every unit: its RSS once it holds every machine's units, and the time from a
//!   WebSocket `units` subscription with a unit glob over all machines to its snapshot (the
//!   frame received and parsed by this client);
//! - one started with a 20-unit `--unit-include` (the filter is the gateway's, so it follows
//!   and exports those 20 units of every machine), scraped by a real Prometheus server, whose
//!   own `scrape_duration` is the figure; a plain HTTP GET of the same `/metrics` beside it.
//!
//! The gateway knows it holds everything when its `fleet` aggregate counts every unit, so no
//! full `/metrics` of 2,000,000 units is ever rendered to find out.

use std::time::{Duration, Instant};

use cbus_tests::emulator::{Emulator, EmulatorSpec};
use cbus_tests::gateway::{http_get, rss_kib};
use cbus_tests::{GatewayProcess, NatsServer, WsClient};
use serde_json::{json, Value};

use crate::machines::proc_status_kib;
use crate::{ms, scrape, summary};

const TOKEN: &str = "scale-token";
/// Units 1 to 20 of every emulated machine (9 and 19 are timers): `emulator::unit_names`.
const TWENTY_UNITS: &str = r"emu-0(0[1-9]|1[0-9]|20)\.(service|timer)";
const RUNS: usize = 10;

/// Waits until the gateway's `fleet` aggregate counts `units` units; how long that took.
async fn wait_units(gw: &GatewayProcess, units: u64, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut ws = WsClient::connect(&gw.ws_url(), Some(&gw.token))
        .await
        .expect("WebSocket connect");
    ws.send(json!({"type":"subscribe","id":"f","resource":"fleet"}))
        .await;
    let mut seen = 0;
    let done = ws
        .until(limit, |v| {
            if v["type"] != "snapshot" {
                return false;
            }
            seen = v["data"]["units"]
                .as_object()
                .map(|o| o.values().filter_map(Value::as_u64).sum())
                .unwrap_or(0);
            seen >= units
        })
        .await;
    assert!(
        done.is_some(),
        "the gateway held {seen} of {units} units after {limit:?}"
    );
    started.elapsed()
}

/// One `units` subscription with `glob` over all machines: the time to its snapshot, and rows.
async fn units_snapshot(ws: &mut WsClient, id: &str, glob: &str) -> (Duration, usize) {
    let t = Instant::now();
    ws.send(json!({"type":"subscribe","id":id,"resource":"units","unit":glob}))
        .await;
    let snap = ws
        .until(Duration::from_secs(60), |v| {
            v["type"] == "snapshot" && v["sub"] == id
        })
        .await
        .expect("units snapshot");
    let took = t.elapsed();
    let rows = snap["data"].as_array().map_or(0, Vec::len);
    ws.send(json!({"type":"unsubscribe","id":id})).await;
    ws.until(Duration::from_secs(30), |v| {
        v["type"] == "unsubscribed" && v["sub"] == id
    })
    .await
    .expect("unsubscribed");
    (took, rows)
}

/// `scale-gateway`: both gateways; `scale-metrics` (`metrics_only`): the filtered one alone.
pub async fn scale_gateway(n: usize, metrics_only: bool) {
    let spec = EmulatorSpec::new(n);
    let units = spec.units;
    println!("\n## scale-gateway (fleet emulator): a real cbus-gateway over {n} emulated machines x {units} units, heartbeat 5 s");
    let nats = NatsServer::start();
    let url = nats.url();
    let t = Instant::now();
    let emulator = Emulator::start(&url, &spec).await;
    eprintln!(
        "{n} emulated agents said hello in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    if !metrics_only {
        every_unit(&url, n, units).await;
    }
    filtered_metrics(&url, n).await;
    drop(emulator);
}

/// 1. Every unit followed: RSS and the units snapshot of one glob over all machines.
async fn every_unit(url: &str, n: usize, units: usize) {
    let gw = GatewayProcess::start(url, TOKEN, &[]);
    let pid = gw.pid().expect("gateway pid");
    let loaded = wait_units(&gw, (n * units) as u64, Duration::from_secs(900)).await;
    println!(
        "gateway following every unit: held {} units {:.1} s after it started (load {})",
        n * units,
        loaded.as_secs_f64(),
        crate::loadavg()
    );
    // Settle (the first refreshes after the load), then RSS.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rss = rss_kib(pid);
    let mut ws = WsClient::connect(&gw.ws_url(), Some(&gw.token))
        .await
        .expect("WebSocket connect");
    println!(
        "| units glob over all {n} machines | rows | snapshot median (p95), {RUNS} runs | load |"
    );
    println!("|---|---|---|---|");
    // One unit on every machine. (A glob of nine, 90,000 rows, is a frame larger than the test
    // WebSocket client's 16 MiB frame limit: not measured.)
    for glob in ["emu-001.*"] {
        let mut took = Vec::new();
        let mut rows = 0;
        for i in 0..RUNS {
            let (d, r) = units_snapshot(&mut ws, &format!("s{i}"), glob).await;
            took.push(d);
            rows = r;
        }
        let (m, p) = summary(took);
        println!(
            "| `{glob}` | {rows} | {:.0} ms ({:.0}) | {} |",
            ms(m),
            ms(p),
            crate::loadavg()
        );
    }
    let hwm = proc_status_kib(pid, "VmHWM:");
    println!(
        "gateway RSS with {n} x {units} units: {:.0} MiB after the load (peak {:.0} MiB over the run)",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    drop(ws);
    drop(gw);
}

/// The `collect[]` of a Prometheus job that wants each unit's state and each machine's health
/// only (docs/metrics.md, *At scale*).
const COMPACT: &str = "collect[]=cbus_agent_up&collect[]=cbus_agent_maintenance&collect[]=cbus_systemd_system_running&collect[]=cbus_systemd_units&collect[]=cbus_systemd_unit_active_state";

/// Each unit's state and whether its machine's agent is up, nothing else.
const MINIMAL: &str = "collect[]=cbus_agent_up&collect[]=cbus_systemd_unit_active_state";

/// Part 2: a 20-unit filter, scraped by Prometheus: the default `/metrics` (every family, as
/// before the URL parameters) and the ways docs/metrics.md offers a large fleet, in one run.
async fn filtered_metrics(url: &str, n: usize) {
    let gw = GatewayProcess::start(url, TOKEN, &["--unit-include", TWENTY_UNITS]);
    let pid = gw.pid().expect("gateway pid");
    let loaded = wait_units(&gw, (n * 20) as u64, Duration::from_secs(900)).await;
    println!(
        "gateway with --unit-include '{TWENTY_UNITS}': held {} units {:.1} s after it started, RSS {:.0} MiB",
        n * 20,
        loaded.as_secs_f64(),
        rss_kib(pid) as f64 / 1024.0
    );
    let mut direct = Vec::new();
    let mut bytes = 0;
    let mut series = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let text = http_get(gw.port, "/metrics").expect("scrape /metrics");
        direct.push(t.elapsed());
        bytes = text.len();
        series = text.lines().filter(|l| !l.starts_with('#')).count();
        let one_hot = text
            .lines()
            .filter(|l| l.starts_with("cbus_systemd_unit_state{") && l.ends_with(" 1"))
            .count();
        assert_eq!(one_hot, n * 20, "every filtered unit has its state series");
    }
    let (dm, dp) = summary(direct);
    println!(
        "plain HTTP GET of the default /metrics, 5 runs: {bytes} bytes, {series} series, {:.0} ms ({:.0}), load {}",
        ms(dm),
        ms(dp),
        crate::loadavg()
    );
    let one = |label, query: &str, limit| scrape::Config {
        label,
        jobs: vec![("cbus".to_owned(), query.to_owned())],
        limit: Duration::from_secs(limit),
    };
    let sharded = |label, query: &str, shards: usize| scrape::Config {
        label,
        jobs: (0..shards)
            .map(|i| {
                (
                    format!("cbus-{i}"),
                    format!("{query}&shards={shards}&shard={i}"),
                )
            })
            .collect(),
        limit: Duration::from_secs(90),
    };
    let configs = [
        one("default (every family, as before)", "", 200),
        one("compact: unit_active_state + machine health", COMPACT, 90),
        one("minimal: unit_active_state + agent_up", MINIMAL, 90),
        sharded("compact, 4 shards (4 jobs, one server)", COMPACT, 4),
        sharded("minimal, 8 shards (8 jobs, one server)", MINIMAL, 8),
    ];
    println!("\n/metrics, 20-unit filter, {n} machines, scraped by a real Prometheus (10 s interval), each way after the other:");
    scrape::scrape(gw.port, &configs, 6).await;
    drop(gw);
}
