//! The gateway against what a local user on a host, a compromised agent and a network peer can
//! send it (issue #13), on real parts: real systemd machines with real agents, a real
//! nats-server, the gateway binary.
//!
//! - one read of a missing unit on a host makes a handful of signals, not an endless storm;
//! - unit signals `busctl emit`ted by `nobody` change no unit state and add no series;
//! - a signal's machine is its subject's, whatever its `NKey` header claims;
//! - WebSocket clients that never read cost their byte budget, not 256 snapshots each.
//!
//! Each test prints its figures; `CBUS_TEST_GATEWAY_BIN=<old build>` runs them against another
//! gateway build to see them fail there.

use std::time::{Duration, Instant};

use cbus_tests::gateway::{http_get, rss_kib, sample};
use cbus_tests::{Agent, Fleet, GatewayProcess, MachineSpec, NatsServer, WsClient};
use futures::StreamExt;
use serde_json::{json, Value};

const TOKEN: &str = "trust-test-token-0123456789";
const UNIT: &str = "gt-sleeper.service";
const UNIT_PATH: &str = "/org/freedesktop/systemd1/unit/gt_2dsleeper_2eservice";
const SLEEPER: &str = "[Unit]\nDescription=trust sleeper\n[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n";

async fn boot(name: &'static str) -> Fleet {
    tokio::task::spawn_blocking(move || {
        let mut spec = MachineSpec::new(name).with_unit(UNIT, SLEEPER);
        spec.enable.push(UNIT.into());
        Fleet::boot(&[spec])
    })
    .await
    .expect("boot")
}

fn metrics(port: u16) -> String {
    http_get(port, "/metrics").unwrap_or_default()
}

fn state_line(host: &str, state: &str) -> String {
    format!(
        "cbus_systemd_unit_state{{host=\"{host}\",name=\"{UNIT}\",type=\"simple\",state=\"{state}\"}}"
    )
}

fn dropped(text: &str, reason: &str) -> f64 {
    sample(
        text,
        &format!("cbus_gateway_dropped_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

/// Waits until the gateway exports the sleeper as active on `host`.
async fn wait_active(port: u16, host: &str) {
    let ok = cbus_tests::wait_for(Duration::from_secs(30), || async {
        sample(&metrics(port), &state_line(host, "active")) == Some(1.0)
    })
    .await;
    assert!(ok, "{UNIT} never exported active:\n{}", metrics(port));
}

/// Signals published for one machine during `window`.
async fn count_signals(sub: &mut async_nats::Subscriber, window: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + window;
    let mut n = 0;
    while let Ok(Some(_)) = tokio::time::timeout_at(deadline, sub.next()).await {
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_of_a_missing_unit_starts_no_signal_storm() {
    cbus_tests::init_tracing();
    let nats = NatsServer::start();
    let fleet = boot("gt-storm").await;
    let m = &fleet.machines[0];
    let agent = Agent::on_machine(&nats.url(), m, &["--hostname", "gt-storm"]);
    let gw = GatewayProcess::start(&nats.url(), TOKEN, &[]);
    wait_active(gw.port, "gt-storm").await;
    // Let the machine's load (ListUnits, then a read per unit) finish.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let client = nats.connect().await;
    let mut sub = client
        .subscribe(format!("dbus.signals.{}.>", agent.nkey))
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    let quiet = count_signals(&mut sub, Duration::from_secs(2)).await;
    let pid = gw.pid().expect("gateway pid");
    let rss_before = rss_kib(pid);

    // Any user may do this on a host: systemd loads the unit to say it does not exist (UnitNew),
    // then unloads it (UnitRemoved). A gateway that reads the unit back loads it again, for ever.
    let out = m.exec(&["systemctl", "status", "nosuch.service"]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "systemctl status of a missing unit"
    );
    let storm = count_signals(&mut sub, Duration::from_secs(5)).await;
    let rss_after = rss_kib(pid);
    let text = metrics(gw.port);
    let checks = sample(&text, "cbus_gateway_unit_checks_total").unwrap_or(0.0);

    // The same read again.
    let out = m.exec(&["systemctl", "status", "nosuch.service"]);
    assert_eq!(out.status.code(), Some(4));
    let again = count_signals(&mut sub, Duration::from_secs(3)).await;
    let text2 = metrics(gw.port);
    let checks2 = sample(&text2, "cbus_gateway_unit_checks_total").unwrap_or(0.0);
    // A remote read of another missing unit, through the agent.
    let get = std::process::Command::new(cbus_tests::bin_path("cbus"))
        .args(["--server", &nats.url(), "get", "org.freedesktop.systemd1"])
        .args([
            "/org/freedesktop/systemd1/unit/nosuch2_2eservice",
            "org.freedesktop.systemd1.Unit.ActiveState",
        ])
        .output()
        .expect("run cbus get");
    let remote = count_signals(&mut sub, Duration::from_secs(5)).await;
    let rss_end = rss_kib(pid);
    eprintln!(
        "signals: {quiet} in 2 s before, {storm} in 5 s after `systemctl status nosuch.service`, \
         {again} in 3 s after the second, {remote} in 5 s after `cbus get` of nosuch2.service \
         ({}); gateway RSS {rss_before} -> {rss_after} -> {rss_end} KiB; unit checks {checks} \
         then {checks2}",
        String::from_utf8_lossy(&get.stdout).trim()
    );
    assert!(remote <= 20, "a remote read made {remote} signals in 5 s");
    assert!(
        rss_end.saturating_sub(rss_before) < 4 * 1024,
        "gateway RSS grew {rss_before} -> {rss_end} KiB"
    );
    assert!(
        storm <= 20,
        "one read made {storm} signals in 5 s: the gateway reloads the unit it reads"
    );
    assert!(again <= 20, "the second read made {again} signals");
    assert!(
        rss_after.saturating_sub(rss_before) < 4 * 1024,
        "gateway RSS grew {rss_before} -> {rss_after} KiB"
    );
    assert!(
        checks >= 1.0,
        "the UnitNew was checked with systemd:\n{text}"
    );
    // Not-found names are remembered when systemd still held the unit when asked; either way
    // a check is one call that loads nothing, at most one per signal systemd sent.
    assert!(
        checks2 - checks <= again as f64,
        "{} checks for {again} signals",
        checks2 - checks
    );
    assert!(
        !text2.contains("nosuch.service"),
        "a not-found unit is not followed"
    );
    // Still following real changes.
    assert!(m.exec(&["systemctl", "stop", UNIT]).status.success());
    let stopped = cbus_tests::wait_for(Duration::from_secs(10), || async {
        sample(&metrics(gw.port), &state_line("gt-storm", "inactive")) == Some(1.0)
    })
    .await;
    assert!(stopped, "a real stop still reaches the cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unit_signals_forged_by_a_local_user_change_nothing() {
    cbus_tests::init_tracing();
    let nats = NatsServer::start();
    let fleet = boot("gt-forge").await;
    let m = &fleet.machines[0];
    let _agent = Agent::on_machine(&nats.url(), m, &["--hostname", "gt-forge"]);
    let gw = GatewayProcess::start(&nats.url(), TOKEN, &[]);
    wait_active(gw.port, "gt-forge").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = metrics(gw.port);
    let series = |t: &str| {
        t.lines()
            .filter(|l| l.starts_with("cbus_systemd_unit_state{"))
            .count()
    };
    let series_before = series(&before);

    // As nobody: one PropertiesChanged saying the unit failed, and 500 UnitNew of made-up units.
    let script = format!(
        "busctl emit {UNIT_PATH} org.freedesktop.DBus.Properties PropertiesChanged 'sa{{sv}}as' \
         org.freedesktop.systemd1.Unit 1 ActiveState s failed 0 && \
         i=0; while [ $i -lt 500 ]; do i=$((i+1)); \
         busctl emit /org/freedesktop/systemd1 org.freedesktop.systemd1.Manager UnitNew so \
         fake-$i.service /org/freedesktop/systemd1/unit/fake_2d${{i}}_2eservice || exit 1; done"
    );
    let started = Instant::now();
    let out = m.exec(&[
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "sh",
        "-c",
        &script,
    ]);
    assert!(
        out.status.success(),
        "busctl emit as nobody: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("501 forged signals emitted in {:?}", started.elapsed());
    // Until the gateway has seen them all (or long enough for the old code to act on them).
    cbus_tests::wait_for(Duration::from_secs(15), || async {
        dropped(&metrics(gw.port), "not_from_systemd") >= 501.0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = metrics(gw.port);
    let series_after = series(&after);
    let host = "gt-forge";
    eprintln!(
        "unit state series {series_before} -> {series_after}; {UNIT} active={:?} failed={:?}; \
         dropped not_from_systemd={}",
        sample(&after, &state_line(host, "active")),
        sample(&after, &state_line(host, "failed")),
        dropped(&after, "not_from_systemd"),
    );
    assert_eq!(
        m.exec_stdout(&["systemctl", "is-active", UNIT]),
        "active",
        "systemd itself says active"
    );
    assert_eq!(
        sample(&after, &state_line(host, "failed")),
        Some(0.0),
        "a forged PropertiesChanged turned {UNIT} failed"
    );
    assert_eq!(sample(&after, &state_line(host, "active")), Some(1.0));
    assert!(!after.contains("fake-"), "forged UnitNew added units");
    assert!(
        series_after <= series_before + 12,
        "series grew {series_before} -> {series_after}"
    );
    assert!(dropped(&after, "not_from_systemd") >= 501.0, "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_belongs_to_the_machine_of_its_subject() {
    cbus_tests::init_tracing();
    let nats = NatsServer::start();
    let fleet = boot("gt-victim").await;
    let m = &fleet.machines[0];
    let victim = Agent::on_machine(&nats.url(), m, &["--hostname", "gt-victim"]);
    let gw = GatewayProcess::start(&nats.url(), TOKEN, &[]);
    wait_active(gw.port, "gt-victim").await;

    // The attacker: an agent with its own key, publishing on its own subjects (all NATS
    // permissions allow it), claiming to be the victim in its headers.
    let client = nats.connect().await;
    let attacker = nkeys::KeyPair::new_user().public_key();
    let hello = cbus_protocol::presence::PresenceEvent {
        event: cbus_protocol::presence::PresenceKind::Hello,
        sent_at_ms: cbus_protocol::presence::now_ms(),
        agent: cbus_tests::synthetic_agent_info(attacker.clone(), "gt-attacker"),
    };
    client
        .publish(
            format!("dbus.presence.{attacker}"),
            serde_json::to_vec(&hello).unwrap().into(),
        )
        .await
        .unwrap();
    let mut ws = WsClient::connect(&gw.ws_url(), Some(TOKEN))
        .await
        .expect("ws");
    ws.until(Duration::from_secs(5), |v| v["type"] == "hello")
        .await
        .expect("hello");
    ws.send(json!({"type": "subscribe", "id": "s", "resource": "signals"}))
        .await;
    ws.until(Duration::from_secs(5), |v| v["type"] == "snapshot")
        .await
        .expect("signals snapshot");

    let sender = "_3a1_2e999";
    // An honest signal from the attacker's machine, sent until the WebSocket shows it: the
    // gateway's NATS subscription for the signals resource is in place from then on.
    let honest = |member: &str| {
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in [
            ("NKey", attacker.as_str()),
            ("Sender", ":1.999"),
            ("Path", "/marker"),
            ("Interface", "org.example.Marker"),
            ("Member", member),
            ("Signature", ""),
        ] {
            h.insert(k, v);
        }
        (format!("dbus.signals.{attacker}.{sender}.marker"), h)
    };
    let mut warm = false;
    for _ in 0..50 {
        let (subject, h) = honest("Warmup");
        client
            .publish_with_headers(subject, h, "[]".into())
            .await
            .unwrap();
        if ws
            .until(Duration::from_millis(200), |v| {
                v["type"] == "delta" && v["data"]["member"] == "Warmup"
            })
            .await
            .is_some()
        {
            warm = true;
            break;
        }
    }
    assert!(
        warm,
        "signals from the attacker's machine reach the WebSocket"
    );
    let forged = |member: &str, path_tokens: &str, signature: &str, path: &str| {
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in [
            ("NKey", victim.nkey.as_str()),
            ("Hostname", "gt-victim"),
            ("Sender", ":1.999"),
            ("Sender-Name", "org.freedesktop.systemd1"),
            ("Path", path),
            ("Member", member),
            ("Signature", signature),
        ] {
            h.insert(k, v);
        }
        (format!("dbus.signals.{attacker}.{sender}.{path_tokens}"), h)
    };
    let (subject, h) = forged(
        "UnitRemoved",
        "org.freedesktop.systemd1",
        "so",
        "/org/freedesktop/systemd1",
    );
    let mut h = h;
    h.insert("Interface", "org.freedesktop.systemd1.Manager");
    client
        .publish_with_headers(subject, h, json!([UNIT, UNIT_PATH]).to_string().into())
        .await
        .unwrap();
    let (subject, mut h) = forged(
        "PropertiesChanged",
        "org.freedesktop.systemd1.unit.gt_2dsleeper_2eservice",
        "sa{sv}as",
        UNIT_PATH,
    );
    h.insert("Interface", "org.freedesktop.DBus.Properties");
    let body =
        json!(["org.freedesktop.systemd1.Unit", {"ActiveState": {"t": "s", "v": "failed"}}, []]);
    client
        .publish_with_headers(subject, h, body.to_string().into())
        .await
        .unwrap();
    // Then an honest one from the attacker's machine: it arrives after the forged ones.
    let (subject, h) = honest("Marker");
    client
        .publish_with_headers(subject, h, "[]".into())
        .await
        .unwrap();
    client.flush().await.unwrap();

    let mut seen = Vec::new();
    let marker = ws
        .until(Duration::from_secs(10), |v| {
            if v["type"] == "delta" && v["data"]["member"] != "Warmup" {
                seen.push(v["data"].clone());
            }
            v["type"] == "delta" && v["data"]["member"] == "Marker"
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = metrics(gw.port);
    eprintln!(
        "signals seen on the WebSocket: {}; victim's unit active={:?} failed={:?}; dropped nkey_mismatch={}",
        seen.len(),
        sample(&text, &state_line("gt-victim", "active")),
        sample(&text, &state_line("gt-victim", "failed")),
        dropped(&text, "nkey_mismatch"),
    );
    for s in &seen {
        assert_ne!(
            s["machine"],
            Value::from(victim.nkey.clone()),
            "a signal on the attacker's subject was shown as the victim's: {s}"
        );
    }
    assert_eq!(
        sample(&text, &state_line("gt-victim", "active")),
        Some(1.0),
        "the attacker's UnitRemoved/PropertiesChanged changed the victim's unit:\n{text}"
    );
    assert_eq!(sample(&text, &state_line("gt-victim", "failed")), Some(0.0));
    let marker = marker.expect("the honest signal reaches the WebSocket");
    assert_eq!(marker["data"]["machine"], Value::from(attacker.clone()));
    assert_eq!(marker["data"]["host"], "gt-attacker", "host from presence");
    assert!(dropped(&text, "nkey_mismatch") >= 2.0, "{text}");
}

/// A WebSocket client that never reads, with a small receive buffer so the gateway's queue for
/// it fills instead of the kernel's buffers. Subscribes to the units table `subs` times, then
/// resubscribes as long as the gateway takes its frames.
async fn non_reading_client(
    port: u16,
    subs: usize,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket
        .connect(([127, 0, 0, 1], port).into())
        .await
        .expect("connect");
    let mut req = format!("ws://127.0.0.1:{port}/ws")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream)
        .await
        .expect("upgrade");
    let send = |i: usize, kind: &str| {
        let v = match kind {
            "sub" => json!({"type": "subscribe", "id": format!("u{i}"), "resource": "units"}),
            _ => json!({"type": "unsubscribe", "id": format!("u{i}")}),
        };
        Message::Text(v.to_string().into())
    };
    for i in 0..subs {
        if tokio::time::timeout(Duration::from_secs(1), ws.send(send(i, "sub")))
            .await
            .is_err()
        {
            return ws;
        }
    }
    for round in 0..400 {
        let i = round % subs;
        for kind in ["unsub", "sub"] {
            if tokio::time::timeout(Duration::from_secs(1), ws.send(send(i, kind)))
                .await
                .is_err()
            {
                return ws;
            }
        }
    }
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_do_not_read_cost_a_bounded_number_of_bytes() {
    cbus_tests::init_tracing();
    let nats = NatsServer::start();
    let fleet = boot("gt-bytes").await;
    let m = &fleet.machines[0];
    let _agent = Agent::on_machine(&nats.url(), m, &["--hostname", "gt-bytes"]);
    let budget = 256 * 1024;
    let budget_text = budget.to_string();
    let gw = GatewayProcess::start_with(cbus_tests::GatewayStart {
        nats_url: &nats.url(),
        token: Some(TOKEN),
        env: &[("CBUS_GATEWAY_WS_QUEUE_BYTES", &budget_text)],
        ..Default::default()
    });
    wait_active(gw.port, "gt-bytes").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut probe = WsClient::connect(&gw.ws_url(), Some(TOKEN)).await.unwrap();
    probe
        .send(json!({"type": "subscribe", "id": "u", "resource": "units"}))
        .await;
    let snapshot = probe
        .until(Duration::from_secs(5), |v| v["type"] == "snapshot")
        .await
        .expect("snapshot");
    let frame = snapshot.to_string().len();
    drop(probe);

    let pid = gw.pid().unwrap();
    let before = rss_kib(pid);
    let clients = 16;
    let mut held = Vec::new();
    for _ in 0..clients {
        held.push(non_reading_client(gw.port, 64).await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid);
    let growth = after.saturating_sub(before);
    eprintln!(
        "units snapshot {frame} bytes; {clients} clients that never read: gateway RSS {before} -> {after} KiB \
         (+{growth} KiB; per-client budget {} KiB, 256 frames would be {} KiB each)",
        budget / 1024,
        frame * 256 / 1024
    );
    // Each client may hold its byte budget, plus what the kernel and the session have in hand;
    // queues bounded by frame count alone hold 256 snapshots each.
    // (plus 16 MiB for the sessions, buffers and the allocator).
    let bound = (clients * (budget + 2 * frame) / 1024) as u64 + 16 * 1024;
    assert!(
        growth < bound,
        "gateway RSS grew {growth} KiB for {clients} clients that never read (bound {bound} KiB)"
    );
    // The gateway still serves everyone else.
    assert!(http_get(gw.port, "/metrics").is_some());
    drop(held);
}
