//! Section 3, the gateway under load: synthetic agents (NATS only: presence, answers to the
//! gateway's Subscribe / ListUnits / get, and unit PropertiesChanged signals at a given rate), a
//! real `cbus-gateway`, and N WebSocket clients subscribed to unit states. Also scrapes the real
//! gateway's /metrics over HTTP with that cache (section 4).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cbus_client::headers;
use cbus_protocol::envelope::{Reply, Success};
use cbus_protocol::presence::{now_ms, AgentInfo, PresenceEvent, PresenceKind};
use cbus_protocol::subject::{RequestSubject, SignalSubject};
use cbus_protocol::Op;
use cbus_tests::gateway::http_get;
use cbus_tests::{GatewayProcess, NatsServer};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::machines::proc_status_kib;
use crate::{ms, summary};

const MACHINES: usize = 100;
const UNITS: usize = 200;
const SECS: u64 = 5;

fn unit_name(u: usize) -> String {
    format!("bench-{u:03}.service")
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// One synthetic agent: answers the gateway's requests from NATS and heartbeats.
pub(crate) async fn synthetic_agent(client: async_nats::Client, info: AgentInfo) {
    let mut reqs = client
        .subscribe(cbus_protocol::subject::agent_requests(&info.nkey))
        .await
        .expect("subscribe to agent requests");
    let presence = {
        let client = client.clone();
        let info = info.clone();
        async move {
            let mut kind = PresenceKind::Hello;
            loop {
                let ev = PresenceEvent {
                    event: kind,
                    sent_at_ms: now_ms(),
                    agent: info.clone(),
                };
                let _ = client
                    .publish(
                        cbus_protocol::subject::presence(&info.nkey),
                        serde_json::to_vec(&ev).expect("presence json").into(),
                    )
                    .await;
                kind = PresenceKind::Heartbeat;
                tokio::time::sleep(Duration::from_millis(info.heartbeat_ms)).await;
            }
        }
    };
    tokio::spawn(presence);
    let list: Vec<Value> = (0..UNITS)
        .map(|u| {
            let name = unit_name(u);
            json!([
                name,
                format!("bench unit {u}"),
                "loaded",
                "active",
                "running",
                "",
                cbus_protocol::names::systemd_unit_path(&name),
                0,
                "",
                "/"
            ])
        })
        .collect();
    let list = json!([list]);
    while let Some(msg) = reqs.next().await {
        let Some(reply_to) = msg.reply else { continue };
        let Ok(subject) = RequestSubject::parse(&msg.subject) else {
            continue;
        };
        let (signature, value) = match (subject.op, subject.member.as_deref()) {
            (Op::Call, Some("ListUnits")) => ("a(ssssssouso)", list.clone()),
            (Op::Call, _) => ("", json!([])),
            (Op::Get, Some("NRestarts")) => ("u", json!(0)),
            (Op::Get, _) => ("t", json!("1700000000000000")),
            _ => ("", Value::Null),
        };
        let reply = Reply {
            nkey: info.nkey.clone(),
            hostname: info.hostname.clone(),
            result: Ok(Success {
                signature: Some(signature.into()),
                value,
            }),
        };
        let _ = client.publish(reply_to, reply.to_payload()).await;
    }
}

/// A unit's PropertiesChanged, as an agent forwards it; StateChangeTimestamp carries the send
/// time, so a client's delivery latency is its clock minus the row's since_us.
async fn publish_change(client: &async_nats::Client, nkey: &str, unit: usize, active: bool) {
    let path = cbus_protocol::names::systemd_unit_path(&unit_name(unit));
    let subject = SignalSubject::new(nkey, ":1.1", path.as_str())
        .and_then(|s| s.encode())
        .expect("signal subject");
    let mut h = async_nats::HeaderMap::new();
    headers::set(&mut h, headers::NKEY, nkey);
    headers::set(&mut h, headers::SENDER, ":1.1");
    headers::set(&mut h, headers::PATH, &path);
    headers::set(
        &mut h,
        headers::INTERFACE,
        "org.freedesktop.DBus.Properties",
    );
    headers::set(&mut h, headers::MEMBER, "PropertiesChanged");
    headers::set(&mut h, headers::SIGNATURE, "sa{sv}as");
    let state = if active { "active" } else { "inactive" };
    let body = json!([
        "org.freedesktop.systemd1.Unit",
        {
            "ActiveState": {"t": "s", "v": state},
            "StateChangeTimestamp": {"t": "t", "v": now_us().to_string()}
        },
        []
    ]);
    let _ = client
        .publish_with_headers(subject, h, serde_json::to_vec(&body).expect("json").into())
        .await;
}

#[derive(Default)]
struct Stats {
    latencies_us: Mutex<Vec<u64>>,
    rows: AtomicU64,
    resyncs: AtomicU64,
}

/// One WebSocket client subscribed to the units of one machine; records latencies while
/// `measuring` is set.
async fn ws_client(
    url: String,
    token: String,
    machine: String,
    ready: tokio::sync::mpsc::Sender<()>,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
) {
    let mut req = url.into_client_request().expect("ws url");
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    // tungstenite zero-fills its read buffer (128 KiB by default) on every read: with 1,000
    // clients in this process that memset was a quarter of both cores and the clients' own
    // delay showed up as the gateway's latency. A browser has no such cost.
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(config), false)
        .await
        .expect("WebSocket connect");
    let sub = json!({"type":"subscribe","id":"u","resource":"units","machines":[machine]});
    ws.send(Message::text(sub.to_string()))
        .await
        .expect("send subscribe");
    let mut readied = false;
    while !stop.load(Ordering::Relaxed) {
        let frame = match tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
            Ok(Some(Ok(f))) => f,
            Ok(_) => break,
            Err(_) => continue,
        };
        let Message::Text(text) = frame else { continue };
        let now = now_us();
        let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
            continue;
        };
        match v["type"].as_str() {
            Some("snapshot") => {
                if v["resync"] == true {
                    stats.resyncs.fetch_add(1, Ordering::Relaxed);
                }
                if !readied {
                    readied = true;
                    let _ = ready.send(()).await;
                }
            }
            Some("delta") if measuring.load(Ordering::Relaxed) => {
                let mut local = Vec::new();
                for row in v["data"]["upsert"].as_array().into_iter().flatten() {
                    let since = match &row[8] {
                        Value::Number(n) => n.as_u64(),
                        Value::String(s) => s.parse().ok(),
                        _ => None,
                    };
                    if let Some(since) = since {
                        local.push(now.saturating_sub(since));
                    }
                }
                stats.rows.fetch_add(local.len() as u64, Ordering::Relaxed);
                stats.latencies_us.lock().expect("stats lock").extend(local);
            }
            Some("ping") => {
                let _ = ws.send(Message::text(r#"{"type":"pong"}"#)).await;
            }
            _ => {}
        }
    }
}

/// Waits until the gateway at `port` exports every unit of `machines` synthetic machines.
pub(crate) async fn wait_loaded(port: u16, machines: usize, units: usize) {
    let loaded = cbus_tests::wait_for(Duration::from_secs(180), || async {
        http_get(port, "/metrics").is_some_and(|t| {
            t.lines()
                .filter(|l| l.starts_with("cbus_systemd_unit_start_time_seconds{host=\"synth-"))
                .count()
                >= machines * units
        })
    })
    .await;
    assert!(loaded, "the gateway did not load the synthetic machines");
}

pub async fn gateway() {
    println!(
        "\n## gateway: {MACHINES} synthetic machines x {UNITS} units; WebSocket clients each subscribed to one machine's units"
    );
    let nats = NatsServer::start();
    let gw = GatewayProcess::start(&nats.url(), "bench-token", &[]);
    let gw_pid = gw.pid().expect("gateway pid");
    let agents_client = nats.connect().await;
    let mut nkeys = Vec::new();
    for i in 0..MACHINES {
        let nkey = nkeys::KeyPair::new_user().public_key();
        nkeys.push(nkey.clone());
        let info = cbus_tests::synthetic_agent_info(nkey, format!("synth-{i:03}"));
        tokio::spawn(synthetic_agent(agents_client.clone(), info));
    }
    let t = Instant::now();
    let port = gw.port;
    wait_loaded(port, MACHINES, UNITS).await;
    eprintln!(
        "gateway loaded {MACHINES} x {UNITS} units in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // /metrics over HTTP from the real gateway, with that cache.
    let mut scrape = Vec::new();
    let mut bytes = 0;
    for _ in 0..30 {
        let t = Instant::now();
        bytes = http_get(port, "/metrics").expect("scrape").len();
        scrape.push(t.elapsed());
    }
    let (sm, sp) = summary(scrape);
    println!(
        "/metrics over HTTP, {MACHINES} x {UNITS} units in cache: {bytes} bytes, median {:.1} ms, p95 {:.1} ms (30 scrapes)",
        ms(sm),
        ms(sp)
    );

    println!("| clients | updates/s sent | deliveries expected | delivered | resyncs | p50 | p99 | gateway RSS before / max | /metrics scrapes meanwhile: count, median |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let publisher = nats.connect().await;
    for clients in [100usize, 1000] {
        let measuring = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Stats::default());
        let (tx, mut rx) = tokio::sync::mpsc::channel(clients);
        let mut tasks = Vec::new();
        for c in 0..clients {
            tasks.push(tokio::spawn(ws_client(
                gw.ws_url(),
                gw.token.clone(),
                nkeys[c % MACHINES].clone(),
                tx.clone(),
                measuring.clone(),
                stop.clone(),
                stats.clone(),
            )));
            if c % 50 == 49 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        for _ in 0..clients {
            tokio::time::timeout(Duration::from_secs(120), rx.recv())
                .await
                .expect("clients got their snapshots");
        }
        for rate in [1000u64, 10_000] {
            for s in [&stats.rows, &stats.resyncs] {
                s.store(0, Ordering::Relaxed);
            }
            stats.latencies_us.lock().expect("lock").clear();
            let rss_before = proc_status_kib(gw_pid, "VmRSS:");
            let rss_max = Arc::new(AtomicU64::new(rss_before));
            let sampling = Arc::new(AtomicBool::new(true));
            let sampler = tokio::spawn({
                let (rss_max, sampling) = (rss_max.clone(), sampling.clone());
                async move {
                    while sampling.load(Ordering::Relaxed) {
                        rss_max.fetch_max(proc_status_kib(gw_pid, "VmRSS:"), Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            });
            // Prometheus scraping once a second meanwhile: every machine changed between two
            // scrapes, so each renders the whole cache again.
            let scraper = tokio::task::spawn_blocking({
                let sampling = sampling.clone();
                move || {
                    let mut took = Vec::new();
                    while sampling.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        if http_get(port, "/metrics").is_some() {
                            took.push(t.elapsed());
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    took
                }
            });
            measuring.store(true, Ordering::Relaxed);
            // Paced in 10 ms slices.
            let per_slice = (rate / 100).max(1);
            let total = rate * SECS;
            let start = Instant::now();
            let mut k = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            while k < total {
                tick.tick().await;
                for _ in 0..per_slice {
                    let m = (k as usize) % MACHINES;
                    let u = (k as usize / MACHINES) % UNITS;
                    let active = (k as usize / (MACHINES * UNITS)) % 2 == 1;
                    publish_change(&publisher, &nkeys[m], u, active).await;
                    k += 1;
                }
            }
            let sent_secs = start.elapsed().as_secs_f64();
            publisher.flush().await.expect("flush");
            tokio::time::sleep(Duration::from_secs(2)).await;
            measuring.store(false, Ordering::Relaxed);
            sampling.store(false, Ordering::Relaxed);
            let _ = sampler.await;
            let scrapes = scraper.await.unwrap_or_default();
            let scrape_count = scrapes.len();
            let (scrape_median, _) = if scrapes.is_empty() {
                (Duration::ZERO, Duration::ZERO)
            } else {
                summary(scrapes)
            };
            let expected = total * (clients / MACHINES) as u64;
            let lat = std::mem::take(&mut *stats.latencies_us.lock().expect("lock"));
            let delivered = lat.len();
            let (p50, p99) = if lat.is_empty() {
                (Duration::ZERO, Duration::ZERO)
            } else {
                let mut l = lat;
                l.sort_unstable();
                let p = |q: f64| Duration::from_micros(l[((l.len() - 1) as f64 * q) as usize]);
                (p(0.5), p(0.99))
            };
            println!(
                "| {clients} | {:.0} | {expected} | {delivered} | {} | {:.1} ms | {:.1} ms | {:.0} / {:.0} MiB | {scrape_count}, {:.1} ms |",
                total as f64 / sent_secs,
                stats.resyncs.load(Ordering::Relaxed),
                ms(p50),
                ms(p99),
                rss_before as f64 / 1024.0,
                rss_max.load(Ordering::Relaxed) as f64 / 1024.0,
                ms(scrape_median),
            );
        }
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
    }
    drop(gw);
}
