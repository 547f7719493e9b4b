//! cbus-gateway's WebSocket API and /metrics against two real systemd machines with real agents:
//! auth (4401), malformed frames (1002), snapshots then deltas with sequence numbers when a
//! unit is stopped on a machine, a restart request with one result per machine then `done`,
//! a followed object and a signal subscription, and /metrics validated by promtool.

use std::collections::BTreeMap;
use std::time::Duration;

use cbus_tests::gateway::{http_get, promtool_errors};
use cbus_tests::{wait_for, Agent, GatewayProcess, Machine, MachineSpec, NatsServer};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const TOKEN: &str = "ws-test-token-0123456789";
const UNIT: &str = "gw-sleeper.service";
// No start rate limit: the test starts and restarts it several times in a few seconds, and a
// start past systemd's default limit (5 in 10 s) would fail it with start-limit-hit.
const SLEEPER: &str = "[Unit]\nDescription=gateway sleeper\nStartLimitIntervalSec=0\n[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n";

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

struct Client {
    ws: Ws,
    /// Messages read, for failure reports.
    seen: Vec<Value>,
    /// The units table, from every message of subscription "u" read on the way.
    units: Units,
}

impl Client {
    async fn connect(url: &str, bearer: Option<&str>) -> Client {
        let mut req = url.into_client_request().expect("ws url");
        if let Some(t) = bearer {
            req.headers_mut().insert(
                "Authorization",
                format!("Bearer {t}").parse().expect("header value"),
            );
        }
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("WebSocket connect");
        Client {
            ws,
            seen: Vec::new(),
            units: Units::default(),
        }
    }

    async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .expect("send");
    }

    async fn send_raw(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.to_owned().into()))
            .await
            .expect("send");
    }

    /// The next JSON message (pings skipped), or None on close/timeout.
    async fn next(&mut self, timeout: Duration) -> Option<Value> {
        // One deadline for the whole call: the server's pings must not restart the wait.
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(t.as_str()).expect("server sends JSON");
                    if v["type"] == "ping" {
                        continue;
                    }
                    if v["sub"] == "u" {
                        self.units.apply(&v);
                    }
                    return Some(v);
                }
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => {
                    return None
                }
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Reads until `pred` holds for a message; returns it. Messages read on the way are kept
    /// in `seen` for the caller's bookkeeping.
    async fn expect(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(v) = self.next(left).await else {
                panic!(
                    "timed out waiting for {what}; seen:\n{}",
                    self.seen
                        .iter()
                        .rev()
                        .take(20)
                        .map(|v| v.to_string().chars().take(400).collect::<String>())
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            };
            self.seen.push(v.clone());
            if pred(&v) {
                return v;
            }
        }
    }

    /// Like [`Self::expect`], but a matching message already read while waiting for something
    /// else counts too: deltas of different subscriptions arrive in no fixed order.
    async fn expect_any(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return v.clone();
        }
        self.expect(what, timeout, pred).await
    }

    /// Reads until the server closes; returns the close code and reason.
    async fn close_code(&mut self) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(Some(f))))) => {
                    return (u16::from(f.code), f.reason.as_str().to_owned())
                }
                Ok(Some(Ok(Message::Close(None)))) => return (1005, String::new()),
                Ok(Some(Ok(_))) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }
}

/// Units table kept from a snapshot and its deltas, checking sequence numbers.
#[derive(Default)]
struct Units {
    rows: BTreeMap<(String, String), Value>,
    seq: u64,
}

impl Units {
    fn apply(&mut self, msg: &Value) {
        match msg["type"].as_str() {
            Some("snapshot") => {
                self.rows.clear();
                for r in msg["data"].as_array().expect("rows") {
                    self.insert(r);
                }
                self.seq = msg["seq"].as_u64().expect("seq");
            }
            Some("delta") => {
                let seq = msg["seq"].as_u64().expect("seq");
                assert_eq!(seq, self.seq + 1, "delta sequence numbers are consecutive");
                self.seq = seq;
                let d = &msg["data"];
                if let Some(m) = d["replace"].as_str() {
                    self.rows.retain(|(mm, _), _| mm != m);
                }
                for r in d["upsert"].as_array().into_iter().flatten() {
                    self.insert(r);
                }
                for k in d["remove"].as_array().into_iter().flatten() {
                    self.rows.remove(&(
                        k[0].as_str().unwrap_or("").into(),
                        k[1].as_str().unwrap_or("").into(),
                    ));
                }
            }
            _ => {}
        }
    }

    fn insert(&mut self, r: &Value) {
        let key = (
            r[0].as_str().unwrap_or("").to_owned(),
            r[2].as_str().unwrap_or("").to_owned(),
        );
        self.rows.insert(key, r.clone());
    }

    fn active(&self, machine: &str, unit: &str) -> Option<String> {
        self.rows
            .get(&(machine.to_owned(), unit.to_owned()))
            .and_then(|r| r[6].as_str().map(str::to_owned))
    }
}

fn is_active(m: &Machine) -> String {
    m.exec_stdout(&["systemctl", "is-active", UNIT])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_api_and_metrics_against_real_machines() {
    cbus_tests::init_tracing();
    let nats = NatsServer::start();
    let fleet = tokio::task::spawn_blocking(|| {
        let specs: Vec<MachineSpec> = ["gw-a", "gw-b"]
            .iter()
            .map(|name| {
                let mut s = MachineSpec::new(*name).with_unit(UNIT, SLEEPER);
                s.enable.push(UNIT.into());
                s
            })
            .collect();
        cbus_tests::Fleet::boot(&specs)
    })
    .await
    .expect("boot machines");
    let (a, b) = (fleet.get("gw-a"), fleet.get("gw-b"));
    let _agents: Vec<Agent> = [a, b]
        .iter()
        .map(|m| {
            Agent::on_machine(
                &nats.url(),
                m,
                &[
                    "--hostname",
                    &m.name,
                    "--allow-all",
                    "--metrics-interval",
                    "300ms",
                ],
            )
        })
        .collect();
    let (nkey_a, nkey_b) = (a.nkey(), b.nkey());
    let gw = GatewayProcess::start(&nats.url(), TOKEN, &["--ws-heartbeat", "1s"]);
    let url = gw.ws_url();
    let t = Duration::from_secs(30);

    // Bad token in the header: 4401 with a clear reason.
    let mut c = Client::connect(&url, Some("wrong")).await;
    let (code, reason) = c.close_code().await;
    assert_eq!((code, reason.as_str()), (4401, "invalid token"));
    // Bad token as the first message.
    let mut c = Client::connect(&url, None).await;
    c.send(json!({"type": "auth", "token": "nope"})).await;
    assert_eq!(c.close_code().await.0, 4401);
    // Anything but auth first.
    let mut c = Client::connect(&url, None).await;
    c.send(json!({"type": "subscribe", "id": "m", "resource": "machines"}))
        .await;
    let (code, reason) = c.close_code().await;
    assert_eq!(code, 4401);
    assert!(reason.contains("authenticate first"), "{reason}");
    // Malformed frame after auth: 1002 with the parse error.
    let mut c = Client::connect(&url, Some(TOKEN)).await;
    let hello = c.next(t).await.expect("hello");
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["v"], 1);
    c.send_raw("{not json").await;
    let (code, reason) = c.close_code().await;
    assert_eq!(code, 1002);
    assert!(reason.starts_with("not JSON"), "{reason}");
    let mut c = Client::connect(&url, Some(TOKEN)).await;
    c.next(t).await.expect("hello");
    c.send(json!({"type": "frobnicate"})).await;
    assert_eq!(
        c.close_code().await,
        (1002, "unknown message type \"frobnicate\"".into())
    );

    // The real client: token as first message, like the dashboard.
    let mut c = Client::connect(&url, None).await;
    c.send(json!({"type": "auth", "token": TOKEN})).await;
    let hello = c.next(t).await.expect("hello");
    assert_eq!(hello["type"], "hello", "{hello}");

    c.send(json!({"type": "subscribe", "id": "m", "resource": "machines"}))
        .await;
    let snap = c
        .expect("machines snapshot", t, |v| {
            v["type"] == "snapshot" && v["sub"] == "m"
        })
        .await;
    assert_eq!(snap["schema"]["key"], "nkey");

    c.send(json!({"type": "subscribe", "id": "u", "resource": "units", "unit": "gw-*.service"}))
        .await;
    let snap = c
        .expect("units snapshot", t, |v| {
            v["type"] == "snapshot" && v["sub"] == "u"
        })
        .await;
    let columns: Vec<&str> = snap["schema"]["columns"]
        .as_array()
        .expect("column schema")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(&columns[..3], ["machine", "host", "name"]);
    // Both machines' units arrive (in the snapshot or as deltas when the machines load).
    while c.units.active(&nkey_a, UNIT).as_deref() != Some("active")
        || c.units.active(&nkey_b, UNIT).as_deref() != Some("active")
    {
        c.expect("units of both machines", t, |v| v["sub"] == "u")
            .await;
    }
    let row = &c.units.rows[&(nkey_a.clone(), UNIT.to_owned())];
    assert_eq!(row[1], "gw-a");
    assert_eq!(row[3], "service");
    assert_eq!(row[5], "loaded");
    // "since" (StateChangeTimestamp) arrives with the targeted gets after ListUnits.
    while c.units.rows[&(nkey_a.clone(), UNIT.to_owned())][8]
        .as_u64()
        .is_none()
    {
        c.expect("since of the unit", t, |v| v["sub"] == "u").await;
    }

    // Follow the unit's object on machine A, and its signals.
    let unit_path = "/org/freedesktop/systemd1/unit/gw_2dsleeper_2eservice";
    c.send(
        json!({"type": "subscribe", "id": "o", "resource": "object", "machine": nkey_a,
        "dest": "org.freedesktop.systemd1", "path": unit_path,
        "interface": "org.freedesktop.systemd1.Unit"}),
    )
    .await;
    let obj = c
        .expect("object snapshot", t, |v| {
            v["type"] == "snapshot" && v["sub"] == "o"
        })
        .await;
    assert!(obj.get("error").is_none(), "{obj}");
    let props = obj["schema"]["interfaces"][0]["properties"]
        .as_array()
        .expect("introspection schema");
    assert!(props.iter().any(|p| p["name"] == "ActiveState"));
    assert_eq!(
        obj["data"]["org.freedesktop.systemd1.Unit"]["ActiveState"]["v"],
        "active"
    );
    c.send(
        json!({"type": "subscribe", "id": "s", "resource": "signals", "machine": nkey_a,
        "member": "PropertiesChanged", "path_prefix": unit_path}),
    )
    .await;
    c.expect("signals snapshot", t, |v| {
        v["type"] == "snapshot" && v["sub"] == "s"
    })
    .await;

    // A unit stopped on machine A (outside cbus) shows as a delta.
    let out = a.exec(&["systemctl", "stop", UNIT]);
    assert!(out.status.success(), "systemctl stop failed");
    while c.units.active(&nkey_a, UNIT).as_deref() != Some("inactive") {
        let v = c
            .expect("delta with inactive", t, |v| v["sub"] == "u")
            .await;
        assert_eq!(v["type"], "delta", "{v}");
    }
    assert_eq!(c.units.active(&nkey_b, UNIT).as_deref(), Some("active"));
    c.expect_any("object delta", t, |v| {
        v["type"] == "delta"
            && v["sub"] == "o"
            && v["data"]["changed"]["ActiveState"]["v"] == "inactive"
    })
    .await;
    let sig = c
        .expect_any("signal delta", t, |v| {
            v["type"] == "delta" && v["sub"] == "s"
        })
        .await;
    assert_eq!(sig["data"]["machine"], nkey_a.as_str());
    assert_eq!(sig["data"]["host"], "gw-a");
    assert_eq!(sig["data"]["member"], "PropertiesChanged");
    assert_eq!(sig["data"]["path"], unit_path);

    // A restart through the gateway: one result per machine, then done.
    c.send(json!({"type": "request", "id": "r1", "op": "restart",
        "targets": [nkey_a, nkey_b], "unit": UNIT}))
        .await;
    let mut results = BTreeMap::new();
    let done = loop {
        let v = c
            .expect("results and done", t, |v| {
                v["id"] == "r1" || (v["type"] == "delta" && v["sub"] == "u")
            })
            .await;
        match v["type"].as_str() {
            Some("result") => {
                assert_eq!(v["ok"], true, "{v}");
                results.insert(v["machine"].as_str().unwrap_or("").to_owned(), v.clone());
            }
            Some("done") => break v,
            Some("delta") => {}
            _ => panic!("unexpected {v}"),
        }
    };
    assert_eq!(results.len(), 2, "one result per machine");
    assert_eq!(results[&nkey_a]["host"], "gw-a");
    assert_eq!(results[&nkey_b]["host"], "gw-b");
    assert_eq!(
        (
            done["ok"].as_u64(),
            done["failed"].as_u64(),
            done["timed_out"].as_u64()
        ),
        (Some(2), Some(0), Some(0))
    );
    // The state changed on the machine (a result means the job was queued, so it may still be
    // running for a moment), and the change reached the client.
    assert!(
        wait_for(t, || async { is_active(a) == "active" }).await,
        "{UNIT} on gw-a is {} after the restart:\n{}",
        is_active(a),
        a.exec_stdout(&["journalctl", "--no-pager", "-n", "40", "-u", UNIT])
    );
    while c.units.active(&nkey_a, UNIT).as_deref() != Some("active") {
        c.expect("delta back to active", t, |v| v["sub"] == "u")
            .await;
    }

    // A request to an unknown machine and one that fails on the machine.
    c.send(json!({"type": "request", "id": 2, "op": "stop", "targets": ["UNKNOWN"], "unit": UNIT}))
        .await;
    let r = c
        .expect("unknown machine result", t, |v| {
            v["id"] == 2 && v["type"] == "result"
        })
        .await;
    assert_eq!(r["error"]["code"], "not-found");
    c.expect("done", t, |v| v["id"] == 2 && v["type"] == "done")
        .await;
    c.send(
        json!({"type": "request", "id": 3, "op": "get", "targets": [nkey_b],
        "dest": "org.freedesktop.systemd1", "path": unit_path, "member": "NoSuchProperty",
        "interface": "org.freedesktop.systemd1.Unit"}),
    )
    .await;
    let r = c
        .expect("error result", t, |v| v["id"] == 3 && v["type"] == "result")
        .await;
    assert_eq!(r["ok"], false);
    assert!(r["error"]["code"].is_string(), "{r}");
    let d = c
        .expect("done", t, |v| v["id"] == 3 && v["type"] == "done")
        .await;
    assert_eq!(d["failed"], 1);

    // Unsubscribe stops deltas for that subscription.
    c.send(json!({"type": "unsubscribe", "id": "s"})).await;
    c.expect("unsubscribed", t, |v| {
        v["type"] == "unsubscribed" && v["sub"] == "s"
    })
    .await;

    // /metrics from the cache, valid for promtool, with both machines' unit states.
    let port = gw.port;
    let line = |host: &str, state: &str| {
        format!("cbus_systemd_unit_state{{host=\"{host}\",name=\"{UNIT}\",type=\"simple\",state=\"{state}\"}} 1")
    };
    let ok = cbus_tests::wait_for(Duration::from_secs(20), || async {
        let m = http_get(port, "/metrics").unwrap_or_default();
        m.contains(&line("gw-a", "active"))
            && m.contains(&line("gw-b", "active"))
            && m.contains("cbus_agent_requests_total{host=\"gw-b\"")
    })
    .await;
    let text = http_get(port, "/metrics").unwrap_or_default();
    assert!(ok, "metrics incomplete:\n{text}");
    if let Some(report) = promtool_errors(&text) {
        panic!("promtool: {report}");
    }
    assert!(text.contains(&format!(
        "cbus_systemd_unit_restarts_total{{host=\"gw-a\",name=\"{UNIT}\"}}"
    )));
    assert!(text.contains(&format!(
        "cbus_agent_up{{host=\"gw-b\",nkey=\"{nkey_b}\"}} 1"
    )));
    assert!(text.contains(&format!(
        "cbus_systemd_unit_start_time_seconds{{host=\"gw-a\",name=\"{UNIT}\"}}"
    )));

    slow_client_gets_resync(&nats.url(), a, &nkey_a).await;
}

/// A client that does not read while changes happen: a gateway with a tiny per-client queue
/// drops its queued deltas and sends fresh snapshots marked `resync`; once the client reads
/// again, every subscription ends consistent with the machine.
async fn slow_client_gets_resync(nats_url: &str, a: &Machine, nkey_a: &str) {
    let gw = GatewayProcess::start(nats_url, TOKEN, &["--ws-queue", "4"]);
    let t = Duration::from_secs(30);
    // Wait until this gateway has loaded machine A's units.
    let mut probe = Client::connect(&gw.ws_url(), Some(TOKEN)).await;
    probe.next(t).await.expect("hello");
    probe
        .send(json!({"type": "subscribe", "id": "u", "resource": "units", "machines": [nkey_a]}))
        .await;
    while probe.units.active(nkey_a, UNIT).as_deref() != Some("active") {
        probe.expect("units loaded", t, |v| v["sub"] == "u").await;
    }
    drop(probe);

    let mut c = Client::connect(&gw.ws_url(), Some(TOKEN)).await;
    c.next(t).await.expect("hello");
    const SUBS: usize = 48;
    for i in 0..SUBS {
        c.send(json!({"type": "subscribe", "id": format!("s{i}"), "resource": "units"}))
            .await;
    }
    // Not reading: the socket buffers fill with snapshots, then the queue.
    for _ in 0..3 {
        assert!(a.exec(&["systemctl", "restart", UNIT]).status.success());
    }
    assert!(a.exec(&["systemctl", "stop", UNIT]).status.success());
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Now read everything, keeping one table per subscription.
    let mut tables: BTreeMap<String, Units> = BTreeMap::new();
    let mut resyncs = 0;
    while let Some(v) = c.next(Duration::from_secs(3)).await {
        let Some(sub) = v["sub"].as_str() else {
            continue;
        };
        if v["type"] == "snapshot" && v["resync"] == true {
            resyncs += 1;
        }
        tables.entry(sub.to_owned()).or_default().apply(&v);
    }
    assert!(
        resyncs > 0,
        "a client that fell behind gets resync snapshots"
    );
    assert_eq!(tables.len(), SUBS, "every subscription got its snapshot");
    for (sub, table) in &tables {
        assert_eq!(
            table.active(nkey_a, UNIT).as_deref(),
            Some("inactive"),
            "subscription {sub} ends consistent with the machine"
        );
    }
}
