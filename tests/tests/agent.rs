//! cbus-agent against real parts: nats-server, a private bus with the test service, and real
//! systemd machines. Queries go through `protocol::fleet`, the same client the CLI uses.

use std::time::{Duration, Instant};

use cbus_protocol::fleet::{Fleet, Outcome, Query};
use cbus_protocol::presence::AgentState;
use cbus_protocol::{ErrorCode, Op, Reply, Request};
use cbus_tests::{Agent, MachineSpec, NatsServer, PrivateBus, TestService};
use futures::StreamExt;
use serde_json::{json, Value};

const NAME: &str = TestService::NAME;
const PATH: &str = TestService::PATH;

/// Waits until the registry lists `nkey` as running.
async fn wait_registered(fleet: &Fleet, nkey: &str) {
    let ok = cbus_tests::wait_for(Duration::from_secs(20), || async {
        fleet
            .registry()
            .await
            .map(|agents| {
                agents
                    .iter()
                    .any(|a| a.info.nkey == nkey && a.state == AgentState::Running)
            })
            .unwrap_or(false)
    })
    .await;
    assert!(ok, "agent {nkey} never appeared in the registry");
}

async fn ask(
    fleet: &Fleet,
    nkey: &str,
    dest: &str,
    path: &str,
    op: Op,
    member: Option<&str>,
    request: Value,
) -> Reply {
    let agents = fleet.registry().await.expect("registry");
    let target: Vec<_> = agents.into_iter().filter(|a| a.info.nkey == nkey).collect();
    assert_eq!(target.len(), 1, "agent {nkey} in registry");
    let query = Query {
        destination: dest.into(),
        path: path.into(),
        op,
        member: member.map(str::to_owned),
        request: serde_json::from_value::<Request>(request).expect("request json"),
    };
    let out = fleet
        .fan_out(&target, &query, Duration::from_secs(10))
        .await
        .expect("fan out");
    match out.into_iter().next().map(|o| o.outcome) {
        Some(Outcome::Replied(r)) => r,
        other => panic!("no reply: {other:?}"),
    }
}

fn ok(reply: &Reply) -> (Option<String>, Value) {
    match &reply.result {
        Ok(s) => (s.signature.clone(), s.value.clone()),
        Err(e) => panic!("expected success, got {e}"),
    }
}

fn err(reply: &Reply) -> &cbus_protocol::ErrorBody {
    match &reply.result {
        Err(e) => e,
        Ok(s) => panic!("expected an error, got {s:?}"),
    }
}

#[tokio::test]
async fn every_op_against_the_test_service() {
    cbus_tests::init_tracing();
    let nats = NatsServer::start();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let agent = Agent::start(&nats.url(), bus.address(), &["--allow-all"]);
    let fleet = Fleet::new(nats.connect().await, "test@agent");
    wait_registered(&fleet, &agent.nkey).await;
    let n = agent.nkey.as_str();

    // get: values typed by signature, interface resolved by introspection.
    let cases = [
        ("Byte", "y", json!(7)),
        ("UInt64", "t", json!("18446744073709551615")),
        ("Int64", "x", json!("-9007199254740993")),
        ("Bytes", "ay", json!("AAEC/w==")),
        ("IntDict", "a{ui}", json!({"1": -1, "20": 2})),
        ("Struct", "(sib)", json!(["s", 1, true])),
        ("ObjectPath", "o", json!("/org/cbus/Test")),
        ("Signature", "g", json!("a{sv}")),
        ("Double", "d", json!(2.5)),
    ];
    for (prop, sig, value) in cases {
        let r = ask(&fleet, n, NAME, PATH, Op::Get, Some(prop), json!({})).await;
        assert_eq!(ok(&r), (Some(sig.to_owned()), value), "property {prop}");
    }
    let r = ask(
        &fleet,
        n,
        NAME,
        PATH,
        Op::Get,
        Some("Dict"),
        json!({"interface": "org.cbus.Test1"}),
    )
    .await;
    assert_eq!(ok(&r).1["answer"], json!({"t": "u", "v": 42}));

    // set with and without signature, then read back.
    let r = ask(
        &fleet,
        n,
        NAME,
        PATH,
        Op::Set,
        Some("UInt64"),
        json!({"value": "12345678901234567890"}),
    )
    .await;
    ok(&r);
    let r = ask(&fleet, n, NAME, PATH, Op::Get, Some("UInt64"), json!({})).await;
    assert_eq!(ok(&r).1, json!("12345678901234567890"));
    let r = ask(&fleet, n, NAME, PATH, Op::Set, Some("Dict"), json!({"value": {"k": {"t": "as", "v": ["x"]}}, "signature": "a{sv}", "interface": "org.cbus.Test1"})).await;
    ok(&r);
    let r = ask(&fleet, n, NAME, PATH, Op::Get, Some("Dict"), json!({})).await;
    assert_eq!(ok(&r).1, json!({"k": {"t": "as", "v": ["x"]}}));
    let r = ask(
        &fleet,
        n,
        NAME,
        PATH,
        Op::Set,
        Some("Byte"),
        json!({"value": 256}),
    )
    .await;
    assert_eq!(err(&r).code, ErrorCode::InvalidArgument);
    let r = ask(
        &fleet,
        n,
        NAME,
        PATH,
        Op::Set,
        Some("Version"),
        json!({"value": "2"}),
    )
    .await;
    assert_eq!(err(&r).code, ErrorCode::AccessDenied);

    // getall, one interface and all.
    let r = ask(
        &fleet,
        n,
        NAME,
        PATH,
        Op::GetAll,
        None,
        json!({"interface": "org.cbus.Test1"}),
    )
    .await;
    let (sig, v) = ok(&r);
    assert_eq!(sig.as_deref(), Some("a{sv}"));
    assert_eq!(v["Version"], json!({"t": "s", "v": "1.0"}));
    let r = ask(&fleet, n, NAME, PATH, Op::GetAll, None, json!({})).await;
    let (sig, v) = ok(&r);
    assert_eq!(sig.as_deref(), Some("a{sa{sv}}"));
    assert_eq!(
        v["org.cbus.Test1"]["Bytes"],
        json!({"t": "ay", "v": "AAEC/w=="})
    );

    // call: auto signature, explicit signature, many types, no args, errors.
    let r = ask(
        &fleet,
        n,
        NAME,
        PATH,
        Op::Call,
        Some("Add"),
        json!({"args": [2, 3]}),
    )
    .await;
    assert_eq!(ok(&r), (Some("i".into()), json!([5])));
    let all = json!([1, true, -2, 3, -4, 5, "-6", "7", 8.5, "s", "/o", "a{sv}", "AQI=", ["a"], {"k": {"t": "d", "v": 1.5}}, ["x", 1, false]]);
    let r = ask(
        &fleet,
        n,
        NAME,
        PATH,
        Op::Call,
        Some("EchoAll"),
        json!({"args": all}),
    )
    .await;
    assert_eq!(ok(&r), (Some("ybnqiuxtdsogayasa{sv}(sib)".into()), all));
    let r = ask(&fleet, n, NAME, PATH, Op::Call, Some("Echo"), json!({"args": [{"t": "at", "v": ["1", "2"]}], "signature": "v", "interface": "org.cbus.Test1"})).await;
    assert_eq!(ok(&r).1, json!([{"t": "at", "v": ["1", "2"]}]));
    let r = ask(&fleet, n, NAME, PATH, Op::Call, Some("NoArgs"), json!({})).await;
    assert_eq!(ok(&r), (Some(String::new()), json!([])));
    let r = ask(&fleet, n, NAME, PATH, Op::Call, Some("Ping"), json!({})).await;
    let e = err(&r);
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(
        e.message.contains("org.cbus.Test1, org.cbus.Test2"),
        "{}",
        e.message
    );
    let r = ask(
        &fleet,
        n,
        NAME,
        PATH,
        Op::Call,
        Some("Ping"),
        json!({"interface": "org.cbus.Test2"}),
    )
    .await;
    assert_eq!(ok(&r).1, json!(["pong from Test2"]));
    let r = ask(
        &fleet,
        n,
        NAME,
        PATH,
        Op::Call,
        Some("Fail"),
        json!({"args": ["boom"]}),
    )
    .await;
    let e = err(&r);
    assert_eq!(e.dbus_name.as_deref(), Some("org.cbus.Test.Error.Failed"));
    assert_eq!(e.message, "boom");
    let r = ask(
        &fleet,
        n,
        NAME,
        PATH,
        Op::Call,
        Some("Add"),
        json!({"args": [1, "x"]}),
    )
    .await;
    assert_eq!(err(&r).message, "argument 2: expected int32, got \"x\"");
    let r = ask(
        &fleet,
        n,
        NAME,
        PATH,
        Op::Call,
        Some("Sleep"),
        json!({"args": [3000], "timeout_ms": 200}),
    )
    .await;
    assert_eq!(err(&r).code, ErrorCode::Timeout);

    // introspect and list-names.
    let r = ask(&fleet, n, NAME, PATH, Op::Introspect, None, json!({})).await;
    let (_, v) = ok(&r);
    assert_eq!(v["children"], json!(["child1"]));
    assert!(v["xml"].as_str().unwrap().contains("org.cbus.Test2"));
    let r = ask(
        &fleet,
        n,
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        Op::ListNames,
        None,
        json!({}),
    )
    .await;
    let (sig, v) = ok(&r);
    assert_eq!(sig.as_deref(), Some("a{ss}"));
    assert!(v[NAME].as_str().unwrap().starts_with(':'));

    // not found.
    let r = ask(
        &fleet,
        n,
        "org.cbus.Missing",
        PATH,
        Op::Get,
        Some("X"),
        json!({"interface": "a.b"}),
    )
    .await;
    assert_eq!(err(&r).code, ErrorCode::NotFound);
    let r = ask(&fleet, n, NAME, "/nope", Op::Get, Some("X"), json!({})).await;
    assert_eq!(err(&r).code, ErrorCode::NotFound);
}

#[tokio::test]
async fn malformed_requests_get_errors_and_the_agent_keeps_serving() {
    let nats = NatsServer::start();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let agent = Agent::start(
        &nats.url(),
        bus.address(),
        &["--allow-all", "--max-request-bytes", "4096"],
    );
    let client = nats.connect().await;
    let fleet = Fleet::new(client.clone(), "test@agent");
    wait_registered(&fleet, &agent.nkey).await;
    let base = format!("dbus.agent.{}", agent.nkey);
    let dest = "org_2ecbus_2eTest";
    let path = "org.cbus.Test";
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    let bad_subjects = [
        format!("{base}.x"),
        format!("{base}.{dest}.{path}.get"),
        format!("{base}.{dest}.{path}.frob.X"),
        format!("{base}.org.cbus.Test.get.X"),
        format!("{base}._zz.{path}.get.X"),
        format!("{base}.{dest}.{path}.get.-"),
        format!("{base}.{dest}.{path}.get.1X"),
        format!("{base}.{dest}.a-b.get.X"),
        format!("{base}.{dest}.{path}.call.-"),
        format!("{base}._41.-.get.X"),
    ];
    for s in &bad_subjects {
        cases.push((s.clone(), b"{}".to_vec()));
    }
    let bad_bodies: Vec<Vec<u8>> = vec![
        b"{".to_vec(),
        b"[]".to_vec(),
        b"null".to_vec(),
        b"{\"argz\":1}".to_vec(),
        b"{\"args\":5}".to_vec(),
        b"{\"args\":[1,2,3]}".to_vec(),
        b"{\"signature\":\"(\"}".to_vec(),
        b"{\"signature\":\"h\",\"args\":[1]}".to_vec(),
        b"{\"interface\":\"not an interface\"}".to_vec(),
        vec![0xff, 0xfe, 0x00],
        vec![b'{'; 5000],
    ];
    for body in &bad_bodies {
        for (op, member) in [
            ("call", "Add"),
            ("get", "Int32"),
            ("set", "Int32"),
            ("call", "Missing"),
        ] {
            cases.push((format!("{base}.{dest}.{path}.{op}.{member}"), body.clone()));
        }
    }
    // Wrong types for auto-typed calls.
    for bad in [
        json!(["a", 1]),
        json!([1.5, 1]),
        json!([1, null]),
        json!([4294967296i64, 1]),
        json!([{}, 1]),
    ] {
        for _ in 0..10 {
            cases.push((
                format!("{base}.{dest}.{path}.call.Add"),
                serde_json::to_vec(&json!({"args": bad})).unwrap(),
            ));
        }
    }
    assert!(cases.len() >= 100, "{} cases", cases.len());
    for (subject, body) in &cases {
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            client.request(subject.clone(), body.clone().into()),
        )
        .await
        .unwrap_or_else(|_| panic!("no reply within 10 s for {subject}"))
        .unwrap_or_else(|e| panic!("request {subject}: {e}"));
        let reply = Reply::from_payload(&reply.payload).expect("reply is an envelope");
        assert!(
            reply.result.is_err(),
            "{subject} {:?} should fail",
            String::from_utf8_lossy(body)
        );
    }
    // A request without a reply subject is ignored, and the agent still serves.
    client
        .publish(format!("{base}.{dest}.{path}.call.Add"), "{}".into())
        .await
        .unwrap();
    let r = ask(
        &fleet,
        &agent.nkey,
        NAME,
        PATH,
        Op::Call,
        Some("Add"),
        json!({"args": [20, 22]}),
    )
    .await;
    assert_eq!(ok(&r).1, json!([42]));
}

#[tokio::test]
async fn policy_denies_calls_and_sets_unless_allowed() {
    let nats = NatsServer::start();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[allow]]\nops = [\"call\"]\ndestination = \"org.cbus.*\"\nmember = \"Add\"\n",
    )
    .unwrap();
    let port = cbus_tests::free_port();
    let listen = format!("127.0.0.1:{port}");
    let agent = Agent::start(
        &nats.url(),
        bus.address(),
        &[
            "--policy",
            policy.to_str().unwrap(),
            "--metrics-listen",
            &listen,
        ],
    );
    let fleet = Fleet::new(nats.connect().await, "test@policy");
    wait_registered(&fleet, &agent.nkey).await;
    let n = agent.nkey.as_str();
    let r = ask(
        &fleet,
        n,
        NAME,
        PATH,
        Op::Call,
        Some("Add"),
        json!({"args": [1, 2]}),
    )
    .await;
    assert_eq!(ok(&r).1, json!([3]));
    let r = ask(
        &fleet,
        n,
        NAME,
        PATH,
        Op::Call,
        Some("Concat"),
        json!({"args": [["a"]]}),
    )
    .await;
    assert_eq!(err(&r).code, ErrorCode::AccessDenied);
    let r = ask(
        &fleet,
        n,
        NAME,
        PATH,
        Op::Set,
        Some("Int32"),
        json!({"value": 1}),
    )
    .await;
    assert_eq!(err(&r).code, ErrorCode::AccessDenied);
    let r = ask(&fleet, n, NAME, PATH, Op::Get, Some("Int32"), json!({})).await;
    ok(&r);

    // The local metrics endpoint counts what was denied.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    use std::io::{Read, Write};
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(
        text.contains("cbus_agent_requests_total{op=\"call\",outcome=\"error\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("cbus_agent_requests_total{op=\"get\",outcome=\"ok\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn signals_arrive_with_headers_and_floods_are_counted() {
    let nats = NatsServer::start();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let client = nats.connect().await;
    let agent = Agent::start(
        &nats.url(),
        bus.address(),
        &[
            "--allow-all",
            "--signal-queue",
            "1",
            "--metrics-interval",
            "200ms",
        ],
    );
    let fleet = Fleet::new(client.clone(), "test@signals");
    wait_registered(&fleet, &agent.nkey).await;
    let mut sigs = client
        .subscribe(format!("dbus.signals.{}.>", agent.nkey))
        .await
        .unwrap();
    let mut metrics = client
        .subscribe(format!("dbus.metrics.{}", agent.nkey))
        .await
        .unwrap();
    client.flush().await.unwrap();

    // The one-slot queue may drop any signal, this one too: emit until one gets through.
    let mut found = None;
    for _ in 0..20 {
        let r = ask(
            &fleet,
            &agent.nkey,
            NAME,
            PATH,
            Op::Call,
            Some("EmitOne"),
            json!({"args": ["hi"]}),
        )
        .await;
        ok(&r);
        let deadline = Instant::now() + Duration::from_millis(500);
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline.into(), sigs.next()).await {
            if m.headers
                .as_ref()
                .and_then(|h| h.get("Member"))
                .map(|v| v.as_str())
                == Some("Message")
            {
                found = Some(m);
                break;
            }
        }
        if found.is_some() {
            break;
        }
    }
    let msg = found.expect("no Message signal arrived");
    let h = msg.headers.clone().unwrap();
    let sender = h.get("Sender").unwrap().as_str().to_owned();
    assert!(sender.starts_with(':'));
    assert_eq!(h.get("Sender-Name").map(|v| v.as_str()), Some(NAME));
    assert_eq!(h.get("Interface").unwrap().as_str(), "org.cbus.Test1");
    assert_eq!(h.get("Path").unwrap().as_str(), PATH);
    assert_eq!(h.get("Signature").unwrap().as_str(), "s");
    assert_eq!(h.get("NKey").unwrap().as_str(), agent.nkey);
    let parsed = cbus_protocol::SignalSubject::parse(&msg.subject).unwrap();
    assert_eq!(parsed.sender, sender);
    assert_eq!(parsed.path, PATH);
    assert_eq!(
        serde_json::from_slice::<Value>(&msg.payload).unwrap(),
        json!(["hi"])
    );

    // A flood through a one-slot queue: drops are counted, not silent.
    let r = ask(
        &fleet,
        &agent.nkey,
        NAME,
        PATH,
        Op::Call,
        Some("EmitSignals"),
        json!({"args": [20000]}),
    )
    .await;
    ok(&r);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut dropped = false;
    while !dropped {
        let Ok(Some(msg)) = tokio::time::timeout_at(deadline.into(), metrics.next()).await else {
            break;
        };
        dropped = String::from_utf8_lossy(&msg.payload)
            .lines()
            .any(|l| l.starts_with("cbus_agent_signals_dropped_total ") && !l.ends_with(" 0"));
    }
    assert!(dropped, "drop counter never moved");
}

#[tokio::test]
async fn reconnects_after_nats_restart_and_says_goodbye() {
    let mut nats = NatsServer::start();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let mut agent = Agent::start(&nats.url(), bus.address(), &[]);
    let fleet = Fleet::new(nats.connect().await, "test@restart");
    wait_registered(&fleet, &agent.nkey).await;
    nats.restart();
    let n = agent.nkey.clone();
    let served = cbus_tests::wait_for(Duration::from_secs(30), || {
        let fleet = fleet.clone();
        let n = n.clone();
        async move {
            let Ok(agents) = fleet.registry().await else {
                return false;
            };
            let target: Vec<_> = agents.into_iter().filter(|a| a.info.nkey == n).collect();
            let q = Query {
                destination: NAME.into(),
                path: PATH.into(),
                op: Op::Get,
                member: Some("Int32".into()),
                request: Request::default(),
            };
            matches!(
                fleet
                    .fan_out(&target, &q, Duration::from_secs(1))
                    .await
                    .ok()
                    .and_then(|o| o.into_iter().next())
                    .map(|o| o.outcome),
                Some(Outcome::Replied(Reply { result: Ok(_), .. }))
            )
        }
    })
    .await;
    assert!(served, "agent did not serve again after the NATS restart");

    agent.stop();
    let agents = fleet.registry().await.unwrap();
    let me = agents.iter().find(|a| a.info.nkey == n).unwrap();
    assert_eq!(me.state, AgentState::Stopped);
}

const SLEEPER: &str =
    "[Unit]\nDescription=cbus test sleeper\n[Service]\nExecStart=/bin/sleep infinity\n";

#[tokio::test]
async fn real_systemd_machine() {
    let nats = NatsServer::start();
    let machines = tokio::task::spawn_blocking(|| {
        cbus_tests::Fleet::boot(
            &[MachineSpec::new("agent-1").with_unit("sleeper.service", SLEEPER)],
        )
    })
    .await
    .unwrap();
    let m = &machines.machines[0];
    let agent = Agent::start_with_key(
        &nats.url(),
        &m.bus_address(),
        &m.host_key_path(),
        &["--allow-all", "--hostname", "agent-1"],
    );
    assert_eq!(agent.nkey, m.nkey());
    let client = nats.connect().await;
    let fleet = Fleet::new(client.clone(), "test@systemd");
    wait_registered(&fleet, &agent.nkey).await;
    let n = agent.nkey.as_str();
    let sd = "org.freedesktop.systemd1";
    let unit = cbus_protocol::names::systemd_unit_path("sleeper.service");
    let mut changes = client
        .subscribe(format!(
            "dbus.signals.{n}.*.org.freedesktop.systemd1.unit.sleeper_2eservice"
        ))
        .await
        .unwrap();
    client.flush().await.unwrap();

    let r = ask(
        &fleet,
        n,
        sd,
        "/org/freedesktop/systemd1",
        Op::Get,
        Some("SystemState"),
        json!({}),
    )
    .await;
    assert_eq!(ok(&r).1, json!("running"));
    let r = ask(
        &fleet,
        n,
        sd,
        "/org/freedesktop/systemd1",
        Op::Call,
        Some("StartUnit"),
        json!({"args": ["sleeper.service", "replace"]}),
    )
    .await;
    assert_eq!(ok(&r).0.as_deref(), Some("o"));
    let active = cbus_tests::wait_for(Duration::from_secs(10), || async {
        let r = ask(
            &fleet,
            n,
            sd,
            &unit,
            Op::Get,
            Some("ActiveState"),
            json!({"interface": "org.freedesktop.systemd1.Unit"}),
        )
        .await;
        r.result
            .map(|s| s.value == json!("active"))
            .unwrap_or(false)
    })
    .await;
    assert!(active);
    assert_eq!(
        m.exec_stdout(&["systemctl", "is-active", "sleeper.service"]),
        "active"
    );

    // PropertiesChanged for the unit arrived on NATS, with ActiveState in its payload.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut saw_active = false;
    while !saw_active {
        let Ok(Some(msg)) = tokio::time::timeout_at(deadline.into(), changes.next()).await else {
            break;
        };
        let args: Value = serde_json::from_slice(&msg.payload).unwrap();
        saw_active = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Member"))
            .map(|v| v.as_str())
            == Some("PropertiesChanged")
            && args[1]["ActiveState"] == json!({"t": "s", "v": "active"});
    }
    assert!(saw_active, "no PropertiesChanged with ActiveState=active");

    let r = ask(
        &fleet,
        n,
        sd,
        "/org/freedesktop/systemd1",
        Op::Call,
        Some("StopUnit"),
        json!({"args": ["sleeper.service", "replace"]}),
    )
    .await;
    ok(&r);
    let stopped = cbus_tests::wait_for(Duration::from_secs(10), || async {
        m.exec_stdout(&["systemctl", "is-active", "sleeper.service"]) == "inactive"
    })
    .await;
    assert!(stopped);
    let r = ask(
        &fleet,
        n,
        sd,
        "/org/freedesktop/systemd1",
        Op::Call,
        Some("StartUnit"),
        json!({"args": ["nope.service", "replace"]}),
    )
    .await;
    assert_eq!(err(&r).code, ErrorCode::NotFound);
    drop(agent);
    drop(machines);
}
