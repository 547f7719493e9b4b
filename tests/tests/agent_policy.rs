//! The policy: reads allowed, set and call denied unless a rule allows them.

mod agent_common;

use agent_common::*;

use cbus_protocol::fleet::Fleet;
use cbus_protocol::{ErrorCode, Op};
use cbus_tests::{Agent, NatsServer, PrivateBus, TestService};
use serde_json::json;

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
