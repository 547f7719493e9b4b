//! cbus-agent serving every op against the test service on a private bus: many signatures
//! round-trip (a{sv}, ay, x/t, variants, structs), interfaces and signatures come from
//! introspection, an ambiguous member is an error, one struct stays one struct, broadcasts are
//! answered once per machine, and a slow call does not hold up the others.

use cbus_tests::ask::*;
use std::time::{Duration, Instant};

use cbus_client::fleet::Fleet;
use cbus_protocol::{ErrorCode, Op, Reply};
use cbus_tests::{Agent, NatsServer, PrivateBus, TestService};
use futures::StreamExt;
use serde_json::json;

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

/// A peer of our own on the bus whose methods return one struct, or the same fields as two
/// results: the D-Bus signatures `(ii)` and `ii` must stay apart.
struct Shapes;

#[derive(serde::Serialize, serde::Deserialize, zvariant::Type)]
struct Point {
    x: i32,
    y: i32,
}

#[zbus::interface(name = "org.cbus.Shapes1")]
impl Shapes {
    // zbus sends a bare struct as the whole body (`ii`); a 1-tuple is one struct result.
    fn point(&self) -> (Point,) {
        (Point { x: 3, y: 4 },)
    }

    fn pair(&self) -> (i32, i32) {
        (3, 4)
    }

    fn sum(&self, p: Point) -> i32 {
        p.x + p.y
    }
}

#[tokio::test]
async fn one_struct_stays_one_struct() {
    let nats = NatsServer::start();
    let bus = PrivateBus::start();
    let _peer = zbus::connection::Builder::address(bus.address())
        .unwrap()
        .name("org.cbus.Shapes")
        .unwrap()
        .serve_at("/org/cbus/Shapes", Shapes)
        .unwrap()
        .build()
        .await
        .unwrap();
    let agent = Agent::start(&nats.url(), bus.address(), &["--allow-all"]);
    let fleet = Fleet::new(nats.connect().await, "test@shapes");
    wait_registered(&fleet, &agent.nkey).await;
    let n = agent.nkey.as_str();
    let (dest, path, iface) = ("org.cbus.Shapes", "/org/cbus/Shapes", "org.cbus.Shapes1");
    for request in [json!({}), json!({"interface": iface, "signature": ""})] {
        let r = ask(
            &fleet,
            n,
            dest,
            path,
            Op::Call,
            Some("Point"),
            request.clone(),
        )
        .await;
        assert_eq!(ok(&r), (Some("(ii)".into()), json!([[3, 4]])), "{request}");
        let r = ask(&fleet, n, dest, path, Op::Call, Some("Pair"), request).await;
        assert_eq!(ok(&r), (Some("ii".into()), json!([3, 4])));
    }
    // One struct argument in: typed by introspection, or by an explicit signature.
    let r = ask(
        &fleet,
        n,
        dest,
        path,
        Op::Call,
        Some("Sum"),
        json!({"args": [[3, 4]]}),
    )
    .await;
    assert_eq!(ok(&r).1, json!([7]));
    let r = ask(
        &fleet,
        n,
        dest,
        path,
        Op::Call,
        Some("Sum"),
        json!({"args": [[5, 6]], "signature": "(ii)", "interface": iface}),
    )
    .await;
    assert_eq!(ok(&r).1, json!([11]));
    let r = ask(
        &fleet,
        n,
        dest,
        path,
        Op::Call,
        Some("Sum"),
        json!({"args": [[5, "x"]]}),
    )
    .await;
    assert_eq!(err(&r).code, ErrorCode::InvalidArgument);
    assert_eq!(
        err(&r).message,
        "argument 1, field 1: expected int32, got \"x\""
    );
}

/// A broadcast request to every agent: each machine (nkey) answers once, even with two agent
/// processes for the same host key.
#[tokio::test]
async fn broadcasts_are_answered_once_per_machine() {
    let nats = NatsServer::start();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let dir = tempfile::tempdir().unwrap();
    let key = cbus_tests::agent::generate_host_key(dir.path());
    let twin_a = Agent::start_with_key(&nats.url(), bus.address(), &key, &[]);
    let twin_b = Agent::start_with_key(&nats.url(), bus.address(), &key, &[]);
    let other = Agent::start(&nats.url(), bus.address(), &[]);
    assert_eq!(twin_a.nkey, twin_b.nkey);
    let client = nats.connect().await;
    let fleet = Fleet::new(client.clone(), "test@broadcast");
    wait_registered(&fleet, &twin_a.nkey).await;
    wait_registered(&fleet, &other.nkey).await;
    // Both twins subscribed once they announced; give the second one a moment as well.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let subject = cbus_protocol::RequestSubject::new(
        cbus_protocol::Target::Broadcast,
        NAME,
        PATH,
        Op::Get,
        Some("Int32".into()),
    )
    .unwrap()
    .encode()
    .unwrap();
    for _ in 0..5 {
        let inbox = client.new_inbox();
        let mut replies = client.subscribe(inbox.clone()).await.unwrap();
        client
            .publish_with_reply(subject.clone(), inbox, "{}".into())
            .await
            .unwrap();
        let mut from = Vec::new();
        // Until both machines answered, then a little longer to catch a duplicate.
        let mut deadline = Instant::now() + Duration::from_secs(5);
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline.into(), replies.next()).await {
            let reply = Reply::from_payload(&m.payload).expect("envelope");
            assert_eq!(ok(&reply), (Some("i".into()), json!(-32)));
            from.push(reply.nkey);
            if from.len() == 2 {
                deadline = Instant::now() + Duration::from_millis(300);
            }
        }
        from.sort();
        let mut want = vec![twin_a.nkey.clone(), other.nkey.clone()];
        want.sort();
        assert_eq!(from, want, "one reply per machine");
    }
}

/// Each request runs on its own: a slow D-Bus call does not delay a quick one, and
/// `--max-concurrent-calls` is the bound when the operator wants one.
#[tokio::test]
async fn slow_calls_do_not_block_others() {
    let nats = NatsServer::start();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let free = Agent::start(&nats.url(), bus.address(), &["--allow-all"]);
    let single = Agent::start(
        &nats.url(),
        bus.address(),
        &["--allow-all", "--max-concurrent-calls", "1"],
    );
    let fleet = Fleet::new(nats.connect().await, "test@slow");
    wait_registered(&fleet, &free.nkey).await;
    wait_registered(&fleet, &single.nkey).await;
    for (agent, bounded) in [(&free, false), (&single, true)] {
        let n = agent.nkey.clone();
        let slow = {
            let fleet = fleet.clone();
            let n = n.clone();
            tokio::spawn(async move {
                ask(
                    &fleet,
                    &n,
                    NAME,
                    PATH,
                    Op::Call,
                    Some("Sleep"),
                    json!({"args": [1500]}),
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        let r = ask(
            &fleet,
            &n,
            NAME,
            PATH,
            Op::Call,
            Some("Add"),
            json!({"args": [1, 1]}),
        )
        .await;
        let took = started.elapsed();
        assert_eq!(ok(&r).1, json!([2]));
        if bounded {
            assert!(took >= Duration::from_millis(900), "not bounded: {took:?}");
        } else {
            assert!(took < Duration::from_millis(900), "blocked: {took:?}");
        }
        ok(&slow.await.unwrap());
    }
}

/// Set then get, for every writable property type, without signatures (typed by introspection):
/// JSON -> D-Bus -> JSON gives back exactly what was sent.
#[tokio::test]
async fn set_then_get_round_trips_every_type() {
    let nats = NatsServer::start();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let agent = Agent::start(&nats.url(), bus.address(), &["--allow-all"]);
    let fleet = Fleet::new(nats.connect().await, "test@roundtrip");
    wait_registered(&fleet, &agent.nkey).await;
    let n = agent.nkey.as_str();
    let cases = [
        ("Byte", "y", json!(255)),
        ("Bool", "b", json!(false)),
        ("Int16", "n", json!(-32768)),
        ("UInt16", "q", json!(65535)),
        ("Int32", "i", json!(-2147483648i64)),
        ("UInt32", "u", json!(4294967295u64)),
        ("Int64", "x", json!("-9223372036854775808")),
        ("UInt64", "t", json!("18446744073709551615")),
        ("Double", "d", json!(-0.125)),
        ("String", "s", json!("hé \"quoted\" \n line")),
        ("ObjectPath", "o", json!("/a/b_c/D9")),
        ("Bytes", "ay", json!("AP8QIA==")),
        ("Strings", "as", json!(["", "x", "y z"])),
        (
            "Dict",
            "a{sv}",
            json!({"n": {"t": "x", "v": "-5"}, "nested": {"t": "v", "v": {"t": "ay", "v": "AQ=="}}, "st": {"t": "(sib)", "v": ["a", 1, true]}}),
        ),
        ("IntDict", "a{ui}", json!({"0": 0, "4294967295": -1})),
        ("Struct", "(sib)", json!(["z", -7, false])),
        (
            "Variant",
            "v",
            json!({"t": "a{sas}", "v": {"k": ["v1", "v2"]}}),
        ),
    ];
    for (prop, sig, value) in &cases {
        let r = ask(
            &fleet,
            n,
            NAME,
            PATH,
            Op::Set,
            Some(prop),
            json!({"value": value}),
        )
        .await;
        assert_eq!(ok(&r), (None, serde_json::Value::Null), "set {prop}");
        let r = ask(&fleet, n, NAME, PATH, Op::Get, Some(prop), json!({})).await;
        assert_eq!(
            ok(&r),
            (Some((*sig).to_owned()), value.clone()),
            "get {prop}"
        );
    }
    // Numbers accepted for 64-bit types up to 2^53, returned as strings.
    let r = ask(
        &fleet,
        n,
        NAME,
        PATH,
        Op::Set,
        Some("UInt64"),
        json!({"value": 9007199254740992u64}),
    )
    .await;
    ok(&r);
    let r = ask(&fleet, n, NAME, PATH, Op::Get, Some("UInt64"), json!({})).await;
    assert_eq!(ok(&r).1, json!("9007199254740992"));
    // Byte arrays also accepted as arrays of numbers.
    let r = ask(
        &fleet,
        n,
        NAME,
        PATH,
        Op::Set,
        Some("Bytes"),
        json!({"value": [1, 2, 3]}),
    )
    .await;
    ok(&r);
    let r = ask(&fleet, n, NAME, PATH, Op::Get, Some("Bytes"), json!({})).await;
    assert_eq!(ok(&r).1, json!("AQID"));
    // getall reports the same values in variant form.
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
    let (_, all) = ok(&r);
    assert_eq!(all["Struct"], json!({"t": "(sib)", "v": ["z", -7, false]}));
    assert_eq!(
        all["Variant"],
        json!({"t": "v", "v": {"t": "a{sas}", "v": {"k": ["v1", "v2"]}}})
    );
}
