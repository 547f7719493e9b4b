//! The audit trail and the signal history through the gateway, on real parts: a nats-server
//! with JetStream and the code's permission sets (operator, gateway, the agent's own nkey), a
//! real agent on a private dbus-daemon with the test service, the real `cbus-gateway` as the
//! `gateway` user, its WebSocket API, and the dashboard in headless Chromium
//! (tests/dashboard/audit.mjs).
//!
//! Checked: the `audit` resource's page holds a denied call and allowed calls with the agent's
//! fields, the requester marked as a claim, then live entries as deltas; bounds (`limit`) and
//! filters (`machine`); a `signals` subscription with `since_ms` replays a signal emitted
//! before it, then follows live ones with no duplicate at the seam, also across a NATS restart
//! (audit entries too); the dashboard shows all of
//! that, and a requester claim that is markup stays text; a machine marked for maintenance is
//! shown so in the units table, the summary and the fleet counts. Without JetStream, both are
//! live only and say why, and an audit entry naming another machine than its subject is
//! dropped.

use std::time::Duration;

use cbus_protocol::permissions;
use cbus_protocol::subject::{Op, RequestSubject, Target};
use cbus_tests::browser::Script;
use cbus_tests::cli::*;
use cbus_tests::{Agent, GatewayProcess, NatsServer, PrivateBus, TestService};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const TOKEN: &str = "history-test-token-0123456789";
const OPERATOR_PW: &str = "op-secret";
const GATEWAY_PW: &str = "gw-secret";
const HOST: &str = "audited";
const HOSTILE: &str = "<img src=x onerror=\"window.pwned=1\"><b id=pwned>mallory</b>";

fn server_config(agent: &str) -> String {
    format!(
        "authorization {{ users = [\n\
         {{ user: operator, password: {OPERATOR_PW}, permissions: {} }}\n\
         {{ user: gateway, password: {GATEWAY_PW}, permissions: {} }}\n\
         {{ nkey: {agent}, permissions: {} }}\n] }}",
        permissions::operator().to_config(),
        permissions::gateway().to_config(),
        permissions::agent(agent).to_config()
    )
}

/// `cbus` as the operator.
fn op(url: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--user", "operator", "--password", OPERATOR_PW];
    all.extend_from_slice(args);
    cbus(url, &all)
}

fn emit(url: &str, text: &str) {
    let arg = json!([text]).to_string();
    let out = op(
        url,
        &["invoke", "org.cbus.Test", "/org/cbus/Test", "EmitOne", &arg],
    );
    assert!(out.status.success(), "{}", both(&out));
}

/// Emits `Message(text)` once the agent listens again after a NATS restart: retried only
/// while the request reached nobody, so the signal is emitted exactly once.
fn emit_when_back(url: &str, text: &str) {
    let arg = json!([text]).to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let out = op(
            url,
            &["invoke", "org.cbus.Test", "/org/cbus/Test", "EmitOne", &arg],
        );
        if out.status.success() {
            return;
        }
        assert!(
            stdout(&out).contains("not connected") && std::time::Instant::now() < deadline,
            "{}",
            both(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next frame other than a ping, within `within`.
async fn next(ws: &mut Ws, within: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("JSON frame");
                if v["type"] != "ping" {
                    return Some(v);
                }
            }
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}

/// Reads frames until one matches, with a deadline; panics with what was seen.
async fn expect(ws: &mut Ws, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next(ws, left).await {
            Some(v) if pred(&v) => return v,
            Some(v) => seen.push(v.to_string().chars().take(300).collect::<String>()),
            None => panic!("timed out waiting for {what}; seen:\n{}", seen.join("\n")),
        }
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into()))
        .await
        .expect("send");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_trail_and_signal_history_in_the_gateway_and_the_dashboard() {
    cbus_tests::init_tracing();
    let pw_dir = tokio::task::spawn_blocking(cbus_tests::browser::browser_deps);
    let dir = tempfile::tempdir().unwrap();
    let key = cbus_tests::agent::generate_host_key(dir.path());
    let nkey = cbus_protocol::nkey::from_ssh_host_key(&key)
        .unwrap()
        .public_key();
    let mut nats = NatsServer::start_with_config(&server_config(&nkey));
    let url = nats.url();
    assert!(op(&url, &["registry", "init"]).status.success());
    let init = op(&url, &["streams", "init", "--signals"]);
    assert!(init.status.success(), "{}", both(&init));

    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[allow]]\nops = [\"call\"]\ndestination = \"org.cbus.Test\"\nmember = \"EmitOne\"\n",
    )
    .unwrap();
    let _agent = Agent::start_with_key(
        &url,
        bus.address(),
        &key,
        &[
            "--nats-nkey-auth",
            "--hostname",
            HOST,
            "--policy",
            policy.to_str().unwrap(),
        ],
    );
    let operator =
        async_nats::ConnectOptions::with_user_and_password("operator".into(), OPERATOR_PW.into())
            .connect(&url)
            .await
            .unwrap();
    let fleet = cbus_client::fleet::Fleet::new(operator.clone(), "test");
    assert!(cbus_tests::ask::wait_running(&fleet, Duration::from_secs(20), |c| c == 1).await);

    // The maintenance bucket exists before the gateway starts (an operator's first mark makes
    // it), so the gateway follows marks from the start.
    for what in ["on", "off"] {
        let out = op(&url, &["maintenance", what, HOST]);
        assert!(out.status.success(), "{}", both(&out));
    }

    // Before anyone looks: a signal (an allowed call), a denied call, and an allowed call
    // whose requester claim is markup.
    emit(&url, "before-page");
    let denied = op(
        &url,
        &[
            "invoke",
            "org.cbus.Test",
            "/org/cbus/Test",
            "EmitSignals",
            "[1]",
        ],
    );
    assert_eq!(denied.status.code(), Some(1), "{}", both(&denied));
    let subject = RequestSubject {
        target: Target::Agent(nkey.clone()),
        destination: "org.cbus.Test".into(),
        path: "/org/cbus/Test".into(),
        op: Op::Call,
        member: Some("EmitOne".into()),
    }
    .encode()
    .unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(cbus_protocol::headers::REQUESTER, HOSTILE);
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        operator.request_with_headers(subject, headers, r#"{"args":["hostile"]}"#.into()),
    )
    .await
    .expect("reply in time")
    .expect("reply");
    assert!(
        String::from_utf8_lossy(&reply.payload).contains("\"ok\":true"),
        "{:?}",
        reply.payload
    );

    // The gateway as the deployment runs it: its own NATS user with the gateway's permissions.
    let gw = GatewayProcess::start(
        &url,
        TOKEN,
        &["--user", "gateway", "--password", GATEWAY_PW],
    );
    let mut req = format!("ws://127.0.0.1:{}/ws", gw.port)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("ws");
    let hello = expect(&mut ws, "hello", |v| v["type"] == "hello").await;
    assert!(hello["resources"]
        .as_array()
        .unwrap()
        .contains(&json!("audit")));

    // The page: all three entries, oldest first, with what the agent vouches for.
    send(
        &mut ws,
        json!({"type":"subscribe","id":"a","resource":"audit","since_ms":600000}),
    )
    .await;
    let snap = expect(&mut ws, "audit snapshot", |v| v["sub"] == "a").await;
    assert_eq!(snap["type"], "snapshot", "{snap}");
    assert_eq!(snap["resource"], "audit");
    let schema = &snap["schema"];
    assert_eq!(
        schema["claimed"],
        json!(["requester", "reply_to"]),
        "{schema}"
    );
    assert!(schema["agent_vouches"]
        .as_array()
        .unwrap()
        .contains(&json!("policy")));
    assert_eq!(schema["history"]["available"], true, "{schema}");
    assert_eq!(schema["history"]["stream"], "cbus-audit");
    // The gateway's own reads of the machine when it joined are audited too (read-listed
    // calls); the test's three are those on the test service.
    let all = snap["data"].as_array().unwrap();
    let rows: Vec<&Value> = all
        .iter()
        .filter(|r| r["destination"] == "org.cbus.Test")
        .collect();
    assert_eq!(rows.len(), 3, "{snap}");
    assert!(all
        .windows(2)
        .all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64()));
    let d = &rows[1];
    assert_eq!(
        (
            d["op"].as_str(),
            d["member"].as_str(),
            d["policy"].as_str(),
            d["result"].as_str()
        ),
        (
            Some("call"),
            Some("EmitSignals"),
            Some("denied"),
            Some("access-denied")
        ),
        "{d}"
    );
    assert_eq!(d["machine"], nkey.as_str());
    assert_eq!(d["host"], HOST);
    assert_eq!(d["destination"], "org.cbus.Test");
    assert_eq!(d["path"], "/org/cbus/Test");
    assert_eq!(d["interface"], "org.cbus.Test1");
    assert_eq!(d["args_bytes"], 3);
    assert_eq!(d["args_sha256"].as_str().unwrap().len(), 64);
    assert!(d["requester"].as_str().unwrap().contains('@'), "{d}");
    assert!(d["seq"].as_u64().unwrap() > rows[0]["seq"].as_u64().unwrap());
    assert!(d["stored_ms"].as_u64().unwrap() > 0);
    assert_eq!(rows[0]["policy"], "allowed");
    assert_eq!(rows[2]["requester"], HOSTILE);
    assert_eq!(rows[2]["result"], "ok");

    // Bounds and filters: the newest one only; another machine's trail is empty; a bad nkey
    // is refused with an error frame, and the connection stays.
    send(
        &mut ws,
        json!({"type":"subscribe","id":"a1","resource":"audit","limit":1}),
    )
    .await;
    let one = expect(&mut ws, "limit 1", |v| v["sub"] == "a1").await;
    assert_eq!(one["data"].as_array().unwrap().len(), 1, "{one}");
    let newest = all.last().unwrap()["seq"].as_u64();
    assert!(one["data"][0]["seq"].as_u64() >= newest, "{one}");
    assert!(
        one["schema"]["history"]["older"].as_u64() >= Some(all.len() as u64 - 1),
        "{one}"
    );
    let other = "UBQUIKYGFC7CH5XMF52P2NN4ESI4XTXGAKT3WTG3XGU3352DMHGZQAX7";
    send(
        &mut ws,
        json!({"type":"subscribe","id":"a2","resource":"audit","machine":other}),
    )
    .await;
    let none = expect(&mut ws, "other machine", |v| v["sub"] == "a2").await;
    assert_eq!(none["data"], json!([]), "{none}");
    send(
        &mut ws,
        json!({"type":"subscribe","id":"a3","resource":"audit","machine":"nope"}),
    )
    .await;
    let bad = expect(&mut ws, "bad machine", |v| v["sub"] == "a3").await;
    assert_eq!(bad["type"], "error", "{bad}");

    // Signals from 10 minutes ago: the one emitted before, marked as replayed.
    send(
        &mut ws,
        json!({"type":"subscribe","id":"s","resource":"signals","member":"Message","since_ms":600000}),
    )
    .await;
    let s = expect(&mut ws, "signals snapshot", |v| v["sub"] == "s").await;
    assert_eq!(s["schema"]["history"]["available"], true, "{s}");
    let first = expect(&mut ws, "replayed signal", |v| {
        v["sub"] == "s" && v["type"] == "delta"
    })
    .await;
    assert_eq!(first["data"]["args"], json!(["before-page"]), "{first}");
    assert_eq!(first["data"]["replayed"], true);
    assert_eq!(first["data"]["host"], HOST);

    // Live: a new call is an audit delta, and its signal follows the replay.
    emit(&url, "after-open");
    let mut texts = vec![first["data"]["args"][0].as_str().unwrap().to_owned()];
    let mut live = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while live.is_none() || !texts.iter().any(|t| t == "after-open") {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(v) = next(&mut ws, left).await else {
            panic!("no live entry or signal; got {texts:?}, entry {live:?}")
        };
        match (v["sub"].as_str(), v["type"].as_str()) {
            (Some("a"), Some("delta")) if v["data"]["member"] == "EmitOne" => live = Some(v),
            (Some("s"), Some("delta")) => {
                assert_eq!(
                    v["data"]["replayed"].as_bool().unwrap_or(false),
                    v["data"]["args"][0] != "after-open",
                    "{v}"
                );
                texts.push(v["data"]["args"][0].as_str().unwrap_or("").to_owned());
            }
            _ => {}
        }
    }
    let live = live.unwrap();
    assert_eq!(live["data"]["member"], "EmitOne", "{live}");
    assert_eq!(live["data"]["policy"], "allowed");
    assert!(live["data"]["seq"].as_u64() > rows[2]["seq"].as_u64());
    // Exactly what was emitted, once each, in order: no gap, no duplicate at the seam.
    assert_eq!(texts, ["before-page", "hostile", "after-open"]);

    // NATS restarts on the same port and store: the gateway's readers are made again after
    // the last sequence each delivered, so what is stored next comes once and nothing before
    // it comes again.
    let last_seq = live["data"]["seq"].as_u64().unwrap();
    nats.restart();
    emit_when_back(&url, "after-restart");
    let (mut signals, mut entries) = (Vec::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !signals.iter().any(|t| t == "after-restart")
        || !entries.iter().any(|(_, m)| m == "EmitOne")
    {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(v) = next(&mut ws, left).await else {
            panic!("nothing after the restart: signals {signals:?}, entries {entries:?}")
        };
        match (v["sub"].as_str(), v["type"].as_str()) {
            (Some("s"), Some("delta")) => {
                signals.push(v["data"]["args"][0].as_str().unwrap_or("").to_owned())
            }
            (Some("a"), Some("delta")) => entries.push((
                v["data"]["seq"].as_u64().unwrap(),
                v["data"]["member"].as_str().unwrap_or("").to_owned(),
            )),
            (Some("s" | "a"), Some("snapshot")) => panic!("unexpected resync: {v}"),
            _ => {}
        }
    }
    assert_eq!(signals, ["after-restart"], "no gap, no duplicate");
    // The gateway's own reads of the machine after reconnecting are audited too; each entry
    // comes once, in order, after the last one before the restart.
    let seqs: Vec<u64> = entries.iter().map(|(s, _)| *s).collect();
    assert!(
        seqs[0] > last_seq && seqs.windows(2).all(|w| w[0] < w[1]),
        "{entries:?}"
    );
    drop(ws);

    // The dashboard.
    let pw_dir = pw_dir.await.expect("browser deps");
    let shot = "/tmp/cbus-dashboard-audit.png";
    let env = [
        ("GATEWAY_URL", gw.base_url()),
        ("TOKEN", TOKEN.into()),
        ("HOST", HOST.into()),
        ("HOSTILE", HOSTILE.into()),
        ("SHOT", shot.into()),
    ];
    let mut script = Script::start(&pw_dir, "audit.mjs", env, Duration::from_secs(120));
    while let Some(line) = script.next_line().await {
        match line.as_str() {
            "STEP CALL" => emit(&url, "live-call"),
            "STEP EMIT" => emit(&url, "page-live"),
            "STEP MAINTENANCE" => {
                let on = op(&url, &["maintenance", "on", HOST, "--reason", "disk swap"]);
                assert!(on.status.success(), "{}", both(&on));
            }
            _ => {}
        }
    }
    script.finish().await;
}

/// Without JetStream (or before `cbus streams init`), history is live only and says why: the
/// `audit` and `signals` snapshots carry `history.available: false` with the error, entries and
/// signals come live from plain subscriptions, and an entry whose body names another machine
/// than its subject is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_streams_history_is_live_only() {
    cbus_tests::init_tracing();
    let nats = NatsServer::start_without_jetstream("");
    let client = async_nats::connect(nats.url()).await.unwrap();
    let gw = GatewayProcess::start(&nats.url(), TOKEN, &[]);
    let mut req = format!("ws://127.0.0.1:{}/ws", gw.port)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("ws");
    send(
        &mut ws,
        json!({"type":"subscribe","id":"a","resource":"audit"}),
    )
    .await;
    let a = expect(&mut ws, "audit snapshot", |v| v["sub"] == "a").await;
    assert_eq!(a["schema"]["history"]["available"], false, "{a}");
    assert!(a["schema"]["history"]["error"].is_string(), "{a}");
    assert_eq!(a["data"], json!([]));
    send(
        &mut ws,
        json!({"type":"subscribe","id":"s","resource":"signals","member":"Message","since_ms":60000}),
    )
    .await;
    let s = expect(&mut ws, "signals snapshot", |v| v["sub"] == "s").await;
    assert_eq!(s["schema"]["history"]["available"], false, "{s}");

    let a_key = "UBQUIKYGFC7CH5XMF52P2NN4ESI4XTXGAKT3WTG3XGU3352DMHGZQAX7";
    let b_key = nkeys::KeyPair::new_user().public_key();
    let entry = |nkey: &str, member: &str| cbus_protocol::audit::AuditEntry {
        time_ms: 1,
        nkey: nkey.into(),
        hostname: "h".into(),
        requester: Some("someone".into()),
        reply_to: None,
        broadcast: false,
        op: Op::Call,
        destination: "org.x".into(),
        path: "/".into(),
        interface: None,
        member: member.into(),
        args_bytes: Some(2),
        args_sha256: Some("00".repeat(32)),
        policy: cbus_protocol::audit::PolicyVerdict::Denied,
        result: "access-denied".into(),
    };
    let subject = cbus_protocol::subject::audit(a_key);
    // On A's subject, a body naming B: dropped. Then A's own.
    for e in [entry(&b_key, "Forged"), entry(a_key, "Real")] {
        client
            .publish(subject.clone(), e.to_payload().into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    let live = expect(&mut ws, "live audit entry", |v| {
        v["sub"] == "a" && v["type"] == "delta"
    })
    .await;
    assert_eq!(
        live["data"]["member"], "Real",
        "the forged one was taken: {live}"
    );
    assert_eq!(live["data"]["machine"], a_key);
    assert_eq!(live["data"]["seq"], 0, "heard live, not from the stream");

    let mut headers = async_nats::HeaderMap::new();
    headers.insert(cbus_protocol::headers::MEMBER, "Message");
    let signal = cbus_protocol::subject::SignalSubject::new(a_key, ":1.5", "/org/x")
        .unwrap()
        .encode()
        .unwrap();
    client
        .publish_with_headers(signal, headers, r#"["live"]"#.into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let sig = expect(&mut ws, "live signal", |v| {
        v["sub"] == "s" && v["type"] == "delta"
    })
    .await;
    assert_eq!(sig["data"]["args"], json!(["live"]), "{sig}");
    assert!(sig["data"].get("replayed").is_none(), "{sig}");
}
