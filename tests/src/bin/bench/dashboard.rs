//! `dashboard`: the browser page at fleet scale. A real nats-server and `cbus-gateway`
//! following 1,000 machines x 200 units of the **fleet emulator**, which then changes 1,000
//! units a second (each a systemd PropertiesChanged signal); headless Chromium
//! (tests/dashboard/bench.mjs) measures, per view, the frame time (requestAnimationFrame
//! deltas, p50/p99/max), long tasks, the JS heap (CDP `Performance.getMetrics`: peak while
//! measuring and after a GC) and the WebSocket bytes the page received.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cbus_tests::browser::browser_deps;
use cbus_tests::emulator::{Emulator, EmulatorSpec};
use cbus_tests::{GatewayProcess, NatsServer};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const MACHINES: usize = 1_000;
const UNITS: usize = 200;
const UPDATES_PER_SEC: u64 = 1_000;
const SECS: u64 = 10;

/// Changes `UPDATES_PER_SEC` units a second (in 10 ms ticks) until `stop`: a spread of
/// machines and units, mostly active <-> inactive, one in fifty failing (and the next change
/// of that unit starts it again).
async fn churn(emulator: Arc<Emulator>, stop: Arc<AtomicBool>, sent: Arc<AtomicU64>) {
    let per_tick = UPDATES_PER_SEC / 100;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        for _ in 0..per_tick {
            n += 1;
            // A stride prime to both sizes walks every (machine, unit) pair.
            let i = (n * 7919 % MACHINES as u64) as usize;
            let u = 1 + (n * 104_729 % (UNITS as u64 - 1)) as usize;
            let unit = if u % 10 == 9 {
                format!("emu-{u:03}.timer")
            } else {
                format!("emu-{u:03}.service")
            };
            let state = match n % 100 {
                0 | 50 => "failed",
                k if k % 2 == 0 => "inactive",
                _ => "active",
            };
            if emulator.change_unit(i, &unit, state).await {
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

pub(crate) async fn dashboard() {
    println!(
        "\n## dashboard: Chromium page at {MACHINES} emulated machines x {UNITS} units, {UPDATES_PER_SEC} unit updates/s, {SECS} s per view"
    );
    let pw_dir = tokio::task::spawn_blocking(browser_deps)
        .await
        .expect("browser deps");
    let nats = NatsServer::start();
    let token = "bench-dashboard";
    let gw = GatewayProcess::start(&nats.url(), token, &[]);
    let mut spec = EmulatorSpec::new(MACHINES);
    spec.units = UNITS;
    let emulator = Arc::new(Emulator::start(&nats.url(), &spec).await);
    let mut node = tokio::process::Command::new("node")
        .arg(pw_dir.join("bench.mjs"))
        .current_dir(&pw_dir)
        .env("GATEWAY_URL", gw.base_url())
        .env("TOKEN", token)
        .env("MACHINES", MACHINES.to_string())
        .env("SECS", SECS.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run node");
    let mut stdin = node.stdin.take().expect("node stdin");
    let mut out = BufReader::new(node.stdout.take().expect("node stdout")).lines();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut churning: Option<(Instant, tokio::task::JoinHandle<()>)> = None;
    let mut by_sub = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    println!("| view | frames | frame p50 | frame p99 | frame max | long tasks | JS heap peak | JS heap after GC | DOM nodes | WebSocket in |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    loop {
        let line = match tokio::time::timeout_at(deadline, out.next_line()).await {
            Ok(Ok(Some(l))) => l,
            Ok(_) => break,
            Err(_) => {
                println!("(the page did not finish within 10 minutes)");
                break;
            }
        };
        if line == "STEP CHURN" {
            churning = Some((
                Instant::now(),
                tokio::spawn(churn(emulator.clone(), stop.clone(), sent.clone())),
            ));
            stdin.write_all(b"go\n").await.expect("write to node");
            stdin.flush().await.expect("flush");
        } else if let Some(json) = line.strip_prefix("RESULT ") {
            let r: Value = serde_json::from_str(json).expect("result json");
            let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
            let secs = f("secs").max(1.0);
            println!(
                "| {} | {} | {:.1} ms | {:.1} ms | {:.0} ms | {} | {:.1} MiB | {:.1} MiB | {} | {:.1} KiB/s ({:.0} frames/s) |",
                r["view"].as_str().unwrap_or("?"),
                f("frames"),
                f("p50"),
                f("p99"),
                f("max"),
                f("long"),
                f("heap_peak") / 1_048_576.0,
                f("heap_after_gc") / 1_048_576.0,
                f("dom"),
                f("ws_bytes") / 1024.0 / secs,
                f("ws_frames") / secs,
            );
            by_sub.push(format!(
                "{}: {}",
                r["view"].as_str().unwrap_or("?"),
                r["by_sub"]
            ));
        } else if line == "DONE" {
            break;
        } else if line.starts_with("FAIL") {
            println!("(page failed: {line})");
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    if let Some((started, task)) = churning {
        let _ = task.await;
        let n = sent.load(Ordering::Relaxed);
        println!(
            "\nunit updates sent: {n} in {:.1} s ({:.0}/s)",
            started.elapsed().as_secs_f64(),
            n as f64 / started.elapsed().as_secs_f64()
        );
    }
    println!("\nWebSocket bytes by subscription and frame type, per view:");
    for line in by_sub {
        println!("- {line}");
    }
    let _ = node.wait().await;
}
