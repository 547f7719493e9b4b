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

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cbus_tests::emulator::{Emulator, EmulatorSpec};
use cbus_tests::gateway::{http_get, rss_kib};
use cbus_tests::{free_port, GatewayProcess, KillOnDrop, NatsServer, WsClient};
use serde_json::{json, Value};

use crate::machines::proc_status_kib;
use crate::{ms, summary};

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

/// A Prometheus server scraping `target` every `interval`.
fn prometheus(target: u16, interval: Duration, dir: &std::path::Path) -> (KillOnDrop, u16) {
    let port = free_port();
    let config = dir.join("prometheus.yml");
    let secs = interval.as_secs();
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: {secs}s\n  scrape_timeout: {secs}s\nscrape_configs:\n  - job_name: cbus\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
        ),
    )
    .expect("write prometheus.yml");
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run prometheus (apt-get install prometheus, or ./dev deps)");
    (KillOnDrop(child), port)
}

/// The cbus target's last scrape as Prometheus reports it: (when, duration in s, health, error).
fn last_scrape(prom: u16) -> Option<(String, f64, String, String)> {
    let text = http_get(prom, "/api/v1/targets?state=active")?;
    let doc: Value = serde_json::from_str(&text).ok()?;
    let t = doc["data"]["activeTargets"].as_array()?.first()?.clone();
    Some((
        t["lastScrape"].as_str()?.to_owned(),
        t["lastScrapeDuration"].as_f64()?,
        t["health"].as_str()?.to_owned(),
        t["lastError"].as_str().unwrap_or("").to_owned(),
    ))
}

pub async fn scale_gateway(n: usize) {
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

    // 1. Every unit followed: RSS and the units snapshot of one glob over all machines.
    let gw = GatewayProcess::start(&url, TOKEN, &[]);
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

    // 2. A 20-unit filter, scraped by Prometheus.
    let gw = GatewayProcess::start(&url, TOKEN, &["--unit-include", TWENTY_UNITS]);
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
    let dir = tempfile::tempdir().expect("tempdir");
    let (prom, prom_port) = prometheus(gw.port, Duration::from_secs(10), dir.path());
    let mut scrapes: Vec<(String, f64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut last_error = String::new();
    while scrapes.len() < 6 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some((when, secs, health, error)) = last_scrape(prom_port) {
            if health == "up" && !scrapes.iter().any(|(w, _)| *w == when) {
                scrapes.push((when, secs));
            } else if health == "down" {
                last_error = error;
            }
        }
    }
    let prom_rss = prom.0.id();
    let prom_rss = rss_kib(prom_rss);
    drop(prom);
    assert!(
        !scrapes.is_empty(),
        "Prometheus never scraped the gateway: {last_error}"
    );
    let (pm, pp) = summary(
        scrapes
            .iter()
            .map(|(_, s)| Duration::from_secs_f64(*s))
            .collect(),
    );
    println!("| /metrics, 20-unit filter, {n} machines | bytes | series | median (p95) | load |");
    println!("|---|---|---|---|---|");
    println!(
        "| scraped by Prometheus (its scrape_duration, {} scrapes; Prometheus RSS {:.0} MiB) | {bytes} | {series} | {:.0} ms ({:.0}) | {} |",
        scrapes.len(),
        prom_rss as f64 / 1024.0,
        ms(pm),
        ms(pp),
        crate::loadavg()
    );
    println!(
        "| plain HTTP GET, 5 runs | {bytes} | {series} | {:.0} ms ({:.0}) | {} |",
        ms(dm),
        ms(dp),
        crate::loadavg()
    );
    drop(gw);
    drop(emulator);
}
