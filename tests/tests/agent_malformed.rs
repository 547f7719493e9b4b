//! 100+ malformed requests (bad subjects, bad JSON, wrong signatures, unknown names, paths and
//! members): each gets an error reply, and the agent keeps serving. Oversized replies and request
//! floods are answered too.

use std::time::{Duration, Instant};

use cbus_client::fleet::Fleet;
use cbus_protocol::{ErrorCode, Op, Reply};
use cbus_tests::ask::*;
use cbus_tests::{Agent, NatsServer, PrivateBus, TestService};
use futures::StreamExt;
use serde_json::json;

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

/// A reply larger than the server's max_payload becomes an error reply instead of silence.
#[tokio::test]
async fn oversized_reply_is_an_error() {
    let nats = NatsServer::start_with_config("max_payload: 4096");
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let agent = Agent::start(&nats.url(), bus.address(), &[]);
    let fleet = Fleet::new(nats.connect().await, "test@big");
    wait_registered(&fleet, &agent.nkey).await;
    let r = ask(
        &fleet,
        &agent.nkey,
        NAME,
        PATH,
        Op::Introspect,
        None,
        json!({}),
    )
    .await;
    let e = err(&r);
    assert!(e.message.contains("max_payload"), "{e}");
    let r = ask(
        &fleet,
        &agent.nkey,
        NAME,
        PATH,
        Op::Get,
        Some("Int32"),
        json!({}),
    )
    .await;
    assert_eq!(ok(&r).1, json!(-32));
}

/// A flood of slow requests: each gets an answer (timed out in the queue, or refused as busy
/// beyond the pending bound), and the agent serves normally afterwards.
#[tokio::test]
async fn request_flood_is_bounded_and_answered() {
    let nats = NatsServer::start();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let agent = Agent::start(
        &nats.url(),
        bus.address(),
        &[
            "--allow-all",
            "--max-concurrent-calls",
            "1",
            "--call-timeout",
            "1s",
        ],
    );
    let client = nats.connect().await;
    let fleet = Fleet::new(client.clone(), "test@flood");
    wait_registered(&fleet, &agent.nkey).await;
    let subject = format!(
        "dbus.agent.{}.org_2ecbus_2eTest.org.cbus.Test.call.Sleep",
        agent.nkey
    );
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(format!("{inbox}.*")).await.unwrap();
    let n = 400;
    for i in 0..n {
        client
            .publish_with_reply(
                subject.clone(),
                format!("{inbox}.{i}"),
                r#"{"args":[2000]}"#.into(),
            )
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    let mut busy = 0;
    let mut timeouts = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    for _ in 0..n {
        let m = tokio::time::timeout_at(deadline.into(), replies.next())
            .await
            .expect("every request answered in time")
            .unwrap();
        let reply = Reply::from_payload(&m.payload).unwrap();
        let e = err(&reply);
        assert_eq!(e.code, ErrorCode::Timeout, "{e}");
        if e.message.contains("busy") {
            busy += 1;
        } else {
            timeouts += 1;
        }
    }
    assert!(busy >= n - 256, "busy {busy}, timed out {timeouts}");
    // Once the one running Sleep ended (its call slot is held until D-Bus answers or the
    // connection's method timeout), the agent serves again; dbus-daemon never saw more calls
    // than the slots, so it does not refuse ours (LimitsExceeded).
    let served = cbus_tests::wait_for(Duration::from_secs(10), || async {
        let r = ask(
            &fleet,
            &agent.nkey,
            NAME,
            PATH,
            Op::Call,
            Some("Add"),
            json!({"args": [2, 2]}),
        )
        .await;
        match &r.result {
            Ok(s) => s.value == json!([4]),
            Err(e) => {
                assert_eq!(e.code, ErrorCode::Timeout, "{e}");
                false
            }
        }
    })
    .await;
    assert!(served, "agent did not serve after the flood");
}

/// Bad input of 120 KB (a signature, an interface name, an object path, a dict key) gets an
/// error reply that names the problem and quotes only a bounded prefix of the input: the reply
/// stays under 1 KB instead of echoing the input whole.
#[tokio::test]
async fn errors_quote_bad_input_in_bounded_form() {
    let nats = NatsServer::start();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let agent = Agent::start(&nats.url(), bus.address(), &["--allow-all"]);
    let client = nats.connect().await;
    let fleet = Fleet::new(client.clone(), "test@quote");
    wait_registered(&fleet, &agent.nkey).await;
    let base = format!("dbus.agent.{}.org_2ecbus_2eTest.org.cbus.Test", agent.nkey);
    const BIG: usize = 120 * 1024;
    let cases = [
        (
            "call.Add",
            json!({"signature": "(".repeat(BIG), "args": []}),
            "invalid D-Bus signature",
        ),
        (
            "get.Int32",
            json!({"interface": "x".repeat(BIG)}),
            "invalid interface name",
        ),
        (
            "call.Echo",
            json!({"signature": "v", "args": [{"t": "o", "v": format!("/{}", "a-".repeat(BIG / 2))}]}),
            "invalid object path",
        ),
        (
            "call.Echo",
            json!({"signature": "v", "args": [{"t": "a{ub}", "v": {"x".repeat(BIG): true}}]}),
            "key",
        ),
    ];
    for (tail, body, names) in cases {
        let payload = serde_json::to_vec(&body).unwrap();
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            client.request(format!("{base}.{tail}"), payload.clone().into()),
        )
        .await
        .expect("reply in time")
        .expect("request");
        let parsed = Reply::from_payload(&reply.payload).expect("envelope");
        let e = err(&parsed);
        println!(
            "{tail}: request {} bytes -> reply {} bytes: {e}",
            payload.len(),
            reply.payload.len()
        );
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
        assert!(e.message.contains(names), "{e}");
        assert!(
            reply.payload.len() < 1024,
            "reply of {} bytes",
            reply.payload.len()
        );
    }
}
