//! The policy: reads allowed, set and call denied unless a rule allows them.

use cbus_tests::ask::*;

use cbus_client::fleet::Fleet;
use cbus_protocol::{ErrorCode, Op};
use cbus_tests::{Agent, NatsServer, PrivateBus, TestService};
use serde_json::json;
use std::time::Duration;

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

/// Argument patterns and deny rules: a rule allowing `EmitOne` only for texts `ok-*` lets those
/// through, refuses other texts and non-string arguments, and a deny rule wins over it. Every
/// set and call, allowed or denied, is in the audit log with the requester, the target, the
/// arguments' size and digest, never their text.
#[tokio::test]
async fn argument_patterns_and_deny_rules_with_an_audit_log() {
    let nats = NatsServer::start();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        r#"
[[allow]]
ops = ["call"]
destination = "org.cbus.Test"
interface = "org.cbus.Test1"
member = "{EmitOne,Add}"
args = ["ok-*"]

[[allow]]
ops = ["set"]
destination = "org.cbus.Test"
member = "String"
args = ["safe-*"]

[[deny]]
ops = ["call"]
destination = "org.cbus.*"
member = "EmitOne"
args = ["ok-but-denied*"]
"#,
    )
    .unwrap();
    let agent = Agent::start_logged(
        &nats.url(),
        bus.address(),
        &["--policy", policy.to_str().unwrap()],
        "warn,cbus_agent::audit=info",
    );
    let fleet = Fleet::new(nats.connect().await, "alice@policy-test");
    wait_registered(&fleet, &agent.nkey).await;
    let n = agent.nkey.as_str();
    let secret = format!("ok-SECRET-{}", "s".repeat(5000));
    let call = |member: &'static str, args: serde_json::Value| {
        let fleet = &fleet;
        async move {
            ask(
                fleet,
                n,
                NAME,
                PATH,
                Op::Call,
                Some(member),
                json!({ "args": args }),
            )
            .await
        }
    };
    ok(&call("EmitOne", json!(["ok-1"])).await);
    ok(&call("EmitOne", json!([secret])).await);
    let denied = call("EmitOne", json!(["nope"])).await;
    println!("no rule matches: {}", err(&denied));
    assert_eq!(err(&denied).code, ErrorCode::AccessDenied);
    // The deny rule wins over the allow rule that matches too.
    let denied = call("EmitOne", json!(["ok-but-denied"])).await;
    println!("deny rule: {}", err(&denied));
    assert_eq!(err(&denied).code, ErrorCode::AccessDenied);
    assert!(
        err(&denied).message.contains("[[deny]]"),
        "{}",
        err(&denied)
    );
    // A pattern matches strings only: Add's arguments are numbers.
    assert_eq!(
        err(&call("Add", json!([1, 2])).await).code,
        ErrorCode::AccessDenied
    );
    let set = |value: &'static str| {
        let fleet = &fleet;
        async move {
            ask(
                fleet,
                n,
                NAME,
                PATH,
                Op::Set,
                Some("String"),
                json!({ "value": value }),
            )
            .await
        }
    };
    ok(&set("safe-value").await);
    assert_eq!(err(&set("unsafe").await).code, ErrorCode::AccessDenied);

    // The audit log: one line per set and call above, with who, what and how much.
    let mut log = String::new();
    let complete = cbus_tests::wait_for(Duration::from_secs(5), || {
        log = agent.log();
        let lines = log
            .lines()
            .filter(|l| l.contains("cbus_agent::audit"))
            .count();
        async move { lines >= 7 }
    })
    .await;
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cbus_agent::audit"))
        .collect();
    for l in &audit {
        println!("audit: {l}");
    }
    assert!(complete, "expected 7 audit lines:\n{log}");
    assert!(
        audit
            .iter()
            .all(|l| l.contains("INFO") && l.contains("requester=\"alice@policy-test\"")),
        "{audit:#?}"
    );
    let denied_lines = audit
        .iter()
        .filter(|l| l.contains("policy=\"denied\""))
        .count();
    let allowed_lines = audit
        .iter()
        .filter(|l| l.contains("policy=\"allowed\""))
        .count();
    assert_eq!((allowed_lines, denied_lines), (3, 4), "{audit:#?}");
    for l in &audit {
        for field in [
            "op=",
            "destination=org.cbus.Test",
            "path=/org/cbus/Test",
            "member=",
            "args_bytes=",
            "args_sha256=",
            "result=",
        ] {
            assert!(l.contains(field), "{field} missing: {l}");
        }
    }
    let big = audit
        .iter()
        .find(|l| l.contains(&format!("args_bytes={}", secret.len() + 4)))
        .expect("the big argument's size is logged");
    assert!(big.contains("member=\"EmitOne\""), "{big}");
    assert!(
        !log.contains("SECRET"),
        "argument text must never be logged"
    );
    assert!(log.len() < 20_000, "the log holds {} bytes", log.len());
}
