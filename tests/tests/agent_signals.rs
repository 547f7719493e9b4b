//! Signals reach NATS on the right subjects with the right headers and bodies; floods through a
//! tiny queue are dropped and counted.

mod agent_common;

use agent_common::*;
use std::time::{Duration, Instant};

use cbus_protocol::fleet::Fleet;
use cbus_protocol::Op;
use cbus_tests::{Agent, NatsServer, PrivateBus, TestService};
use futures::StreamExt;
use serde_json::{json, Value};

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

/// Signals of our own peer: one struct stays one struct, the root path has its token, the
/// well-known name and hostname are in the headers, filters hold back what they exclude, and a
/// signal carrying a file descriptor is counted instead of forwarded.
#[tokio::test]
async fn signal_shapes_filters_and_unencodable_bodies() {
    use std::os::fd::AsFd;

    let nats = NatsServer::start();
    let bus = PrivateBus::start();
    let peer = zbus::connection::Builder::address(bus.address())
        .unwrap()
        .name("org.cbus.Peer")
        .unwrap()
        .build()
        .await
        .unwrap();
    let client = nats.connect().await;
    let agent = Agent::start(
        &nats.url(),
        bus.address(),
        &[
            "--hostname",
            "signal-host",
            "--exclude-interface",
            "org.cbus.Noise1",
            "--exclude-path-prefix",
            "/org/cbus/Quiet",
            "--metrics-interval",
            "200ms",
        ],
    );
    let fleet = Fleet::new(client.clone(), "test@shapes");
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
    // The agent learns the peer's well-known name from NameOwnerChanged/ListNames.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let shapes = "/org/cbus/Shapes";
    let iface = "org.cbus.Shapes1";
    peer.emit_signal(None::<&str>, shapes, iface, "Moved", &((3i32, 4i32),))
        .await
        .unwrap();
    peer.emit_signal(None::<&str>, shapes, iface, "Pair", &(3i32, 4i32))
        .await
        .unwrap();
    peer.emit_signal(None::<&str>, shapes, "org.cbus.Noise1", "Noise", &("x",))
        .await
        .unwrap();
    peer.emit_signal(None::<&str>, "/org/cbus/Quiet/x", iface, "Hidden", &("x",))
        .await
        .unwrap();
    let devnull = std::fs::File::open("/dev/null").unwrap();
    peer.emit_signal(
        None::<&str>,
        shapes,
        iface,
        "WithFd",
        &(zvariant::Fd::from(devnull.as_fd()),),
    )
    .await
    .unwrap();
    peer.emit_signal(None::<&str>, "/", iface, "Root", &())
        .await
        .unwrap();

    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen
        .iter()
        .any(|(m, ..): &(String, String, Value, String)| m == "Root")
    {
        let Ok(Some(msg)) = tokio::time::timeout_at(deadline.into(), sigs.next()).await else {
            panic!("signals missing; saw {seen:?}");
        };
        if header(&msg, "Sender-Name") != Some("org.cbus.Peer") {
            continue; // the bus driver's own signals
        }
        assert_eq!(header(&msg, "Hostname"), Some("signal-host"));
        assert_eq!(header(&msg, "NKey"), Some(agent.nkey.as_str()));
        seen.push((
            header(&msg, "Member").unwrap_or_default().to_owned(),
            header(&msg, "Signature").unwrap_or_default().to_owned(),
            serde_json::from_slice::<Value>(&msg.payload).unwrap(),
            msg.subject.to_string(),
        ));
    }
    let members: Vec<&str> = seen.iter().map(|(m, ..)| m.as_str()).collect();
    assert_eq!(members, ["Moved", "Pair", "Root"], "{seen:?}");
    assert_eq!((seen[0].1.as_str(), &seen[0].2), ("(ii)", &json!([[3, 4]])));
    assert_eq!((seen[1].1.as_str(), &seen[1].2), ("ii", &json!([3, 4])));
    assert_eq!((seen[2].1.as_str(), &seen[2].2), ("", &json!([])));
    assert!(seen[2].3.ends_with(".-"), "root path token: {}", seen[2].3);
    let parsed = cbus_protocol::SignalSubject::parse(&seen[0].3).unwrap();
    assert_eq!(parsed.path, shapes);

    // The descriptor-carrying signal was counted, not forwarded.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut counted = false;
    while !counted {
        let Ok(Some(m)) = tokio::time::timeout_at(deadline.into(), metrics.next()).await else {
            break;
        };
        let text = String::from_utf8_lossy(&m.payload).into_owned();
        counted = sample(&text, "cbus_agent_signals_unencodable_total").unwrap_or(0.0) >= 1.0;
    }
    assert!(counted, "unencodable signal not counted");

    // The agent still forwards signals afterwards.
    peer.emit_signal(None::<&str>, shapes, iface, "After", &("ok",))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let Ok(Some(msg)) = tokio::time::timeout_at(deadline.into(), sigs.next()).await else {
            panic!("no signal after the descriptor");
        };
        if header(&msg, "Member") == Some("After") {
            break;
        }
    }
}

/// Without the privilege to become a bus monitor (not root, not the bus's user), the agent falls
/// back to one broad match rule and signals still arrive.
#[tokio::test]
async fn match_rule_fallback_without_monitor_privilege() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;

    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (child, address) = start_bus(dir.path());
    let _daemon = Daemon(child);
    let _svc = TestService::start(&address);
    let key = cbus_tests::agent::generate_host_key(dir.path());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let nkey = cbus_protocol::nkey::from_ssh_host_key(&key)
        .unwrap()
        .public_key();
    // nobody: BecomeMonitor is refused (dbus-daemon allows it to root and its own user only).
    let agent = std::process::Command::new(cbus_tests::bin_path("cbus-agent"))
        .args([
            "--nats-url",
            &nats.url(),
            "--bus",
            &address,
            "--heartbeat",
            "500ms",
        ])
        .args(["--allow-all", "--host-key"])
        .arg(&key)
        .env(
            "RUST_LOG",
            std::env::var("CBUS_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .uid(65534)
        .gid(65534)
        .spawn()
        .expect("start cbus-agent as nobody");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            cbus_tests::util::terminate(&mut self.0, Duration::from_secs(5));
        }
    }
    let _agent = Kill(agent);
    let client = nats.connect().await;
    let fleet = Fleet::new(client.clone(), "test@fallback");
    wait_registered(&fleet, &nkey).await;
    let mut sigs = client
        .subscribe(format!("dbus.signals.{nkey}.>"))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let r = ask(
        &fleet,
        &nkey,
        NAME,
        PATH,
        Op::Call,
        Some("EmitOne"),
        json!({"args": ["fb"]}),
    )
    .await;
    ok(&r);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let Ok(Some(m)) = tokio::time::timeout_at(deadline.into(), sigs.next()).await else {
            panic!("no signal through the match rule");
        };
        if header(&m, "Member") == Some("Message") {
            assert_eq!(header(&m, "Sender-Name"), Some(NAME));
            assert_eq!(
                serde_json::from_slice::<Value>(&m.payload).unwrap(),
                json!(["fb"])
            );
            break;
        }
    }
}

/// Filters apply before the queue: a flood of excluded signals drops nothing.
#[tokio::test]
async fn excluded_floods_do_not_fill_the_queue() {
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
            "--exclude-interface",
            "org.cbus.Test1",
            "--metrics-interval",
            "200ms",
        ],
    );
    let fleet = Fleet::new(client.clone(), "test@excluded");
    wait_registered(&fleet, &agent.nkey).await;
    let r = ask(
        &fleet,
        &agent.nkey,
        NAME,
        PATH,
        Op::Call,
        Some("EmitSignals"),
        json!({"args": [5000]}),
    )
    .await;
    ok(&r);
    let mut metrics = client
        .subscribe(format!("dbus.metrics.{}", agent.nkey))
        .await
        .unwrap();
    // Two reports after the flood, so the second one certainly counts all of it.
    let mut last = String::new();
    for _ in 0..2 {
        let m = tokio::time::timeout(Duration::from_secs(5), metrics.next())
            .await
            .expect("metrics report")
            .unwrap();
        last = String::from_utf8_lossy(&m.payload).into_owned();
    }
    assert_eq!(
        sample(&last, "cbus_agent_signals_dropped_total"),
        Some(0.0),
        "{last}"
    );
}
