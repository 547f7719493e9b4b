//! Signals reach NATS on the right subjects with the right headers and bodies; floods through a
//! tiny queue are dropped and counted.

use cbus_tests::ask::*;
use std::time::{Duration, Instant};

use cbus_client::fleet::Fleet;
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
    let nats = NatsServer::start();
    // nobody must reach the bus socket, the host key and the agent binary: all in a 0755 dir
    // (the build's target/ may be in a 0700 home).
    let nobody = cbus_tests::Unprivileged::new();
    let bus = PrivateBus::start_in(nobody.dir());
    let address = bus.address().to_owned();
    let _svc = TestService::start(&address);
    let key = cbus_tests::agent::generate_host_key(nobody.dir());
    nobody.share(&key);
    let nkey = cbus_protocol::nkey::from_ssh_host_key(&key)
        .unwrap()
        .public_key();
    // nobody: BecomeMonitor is refused (dbus-daemon allows it to root and its own user only).
    let agent = nobody
        .command("cbus-agent")
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
        .spawn()
        .expect("start cbus-agent as nobody");
    let _agent = cbus_tests::KillOnDrop(agent);
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

/// One connection that owns two well-known names: `Sender-Name` lists both (sorted), and after
/// it releases one, only the other. (Consumers trust unit state by name: a name left out, or a
/// stale one kept, would be a wrong verdict.)
#[tokio::test]
async fn sender_name_lists_every_name_the_sender_owns() {
    let nats = NatsServer::start();
    let bus = PrivateBus::start();
    let peer = zbus::connection::Builder::address(bus.address())
        .unwrap()
        .name("org.cbus.PeerTwo")
        .unwrap()
        .name("org.cbus.Peer")
        .unwrap()
        .build()
        .await
        .unwrap();
    let client = nats.connect().await;
    let agent = Agent::start(&nats.url(), bus.address(), &[]);
    let fleet = Fleet::new(client.clone(), "test@names");
    wait_registered(&fleet, &agent.nkey).await;
    let mut sigs = client
        .subscribe(format!("dbus.signals.{}.>", agent.nkey))
        .await
        .unwrap();
    client.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let sender_names = |member: &'static str| {
        let peer = peer.clone();
        async move {
            peer.emit_signal(
                None::<&str>,
                "/org/cbus/Names",
                "org.cbus.Names1",
                member,
                &(),
            )
            .await
            .unwrap();
        }
    };
    sender_names("Both").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let both = loop {
        let Ok(Some(m)) = tokio::time::timeout_at(deadline.into(), sigs.next()).await else {
            panic!("signal Both never arrived");
        };
        if header(&m, "Member") == Some("Both") {
            break m;
        }
    };
    println!("Sender-Name: {:?}", header(&both, "Sender-Name"));
    assert_eq!(
        header(&both, "Sender-Name"),
        Some("org.cbus.Peer org.cbus.PeerTwo")
    );
    assert!(cbus_client::headers::sender_owns(
        both.headers.as_ref(),
        "org.cbus.Peer"
    ));

    assert!(peer.release_name("org.cbus.Peer").await.unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    sender_names("One").await;
    let one = loop {
        let Ok(Some(m)) = tokio::time::timeout_at(deadline.into(), sigs.next()).await else {
            panic!("signal One never arrived");
        };
        if header(&m, "Member") == Some("One") {
            break m;
        }
    };
    assert_eq!(header(&one, "Sender-Name"), Some("org.cbus.PeerTwo"));
}

/// Resident memory of a process, from /proc (kB -> bytes).
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Any local user may send huge signals on the system bus. 24 signals of 20 MiB (NATS
/// max_payload is 1 MiB, so none could ever be published) are dropped before they are queued,
/// counted as too_large in the agent's metrics (local endpoint and the ones it publishes), the
/// agent's memory stays under 100 MB throughout, and a normal signal afterwards still arrives.
/// (Before, the agent queued and decoded them: 2.9 GB.)
#[tokio::test]
async fn huge_signal_flood_is_dropped_before_queueing_and_memory_stays_bounded() {
    const BIG: usize = 20 * 1024 * 1024;
    const COUNT: u64 = 24;
    let nats = NatsServer::start();
    // dbus-daemon's own limits would refuse or drop some of the flood; the agent must cope
    // with all of it.
    let bus = PrivateBus::start_with(
        r#"<limit name="max_message_size">67108864</limit>
  <limit name="max_incoming_bytes">1073741824</limit>
  <limit name="max_outgoing_bytes">1073741824</limit>"#,
    );
    let client = nats.connect().await;
    let port = cbus_tests::free_port();
    let listen = format!("127.0.0.1:{port}");
    let agent = Agent::start(
        &nats.url(),
        bus.address(),
        &["--metrics-listen", &listen, "--metrics-interval", "200ms"],
    );
    let pid = agent.pid().unwrap();
    let fleet = Fleet::new(client.clone(), "test@flood");
    wait_registered(&fleet, &agent.nkey).await;
    let mut sigs = client
        .subscribe(format!("dbus.signals.{}.>", agent.nkey))
        .await
        .unwrap();
    let mut published = client
        .subscribe(format!("dbus.metrics.{}", agent.nkey))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let before = rss_bytes(pid).unwrap();

    // Sample the agent's RSS every 10 ms while the flood runs.
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = std::thread::spawn({
        let sampling = sampling.clone();
        move || {
            let mut peak = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_bytes(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        }
    });
    let flooder = bus.connect().await;
    let big = "x".repeat(BIG);
    let started = Instant::now();
    for _ in 0..COUNT {
        flooder
            .emit_signal(
                None::<&str>,
                "/org/cbus/Flood",
                "org.cbus.Flood1",
                "Big",
                &(&big,),
            )
            .await
            .unwrap();
    }
    drop(big);
    let metrics_text = || async {
        let body = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).ok()?;
            Some(text)
        })
        .await
        .unwrap();
        body.unwrap_or_default()
    };
    let too_large = "cbus_agent_signals_dropped_by_reason_total{reason=\"too_large\"}";
    let counted = cbus_tests::wait_for(Duration::from_secs(60), || async {
        sample(&metrics_text().await, too_large) == Some(COUNT as f64)
    })
    .await;
    let flood_secs = started.elapsed().as_secs_f64();
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    let text = metrics_text().await;
    println!(
        "flood of {COUNT} x {} MiB: agent RSS before {:.1} MB, peak {:.1} MB; {too_large} = {:?}, \
         cbus_agent_signals_dropped_total = {:?}, forwarded {:?}; {flood_secs:.1} s",
        BIG >> 20,
        before as f64 / 1e6,
        peak as f64 / 1e6,
        sample(&text, too_large),
        sample(&text, "cbus_agent_signals_dropped_total"),
        sample(&text, "cbus_agent_signals_forwarded_total"),
    );
    assert!(counted, "drops not counted as too_large:\n{text}");
    assert!(
        peak < 100_000_000,
        "agent RSS peaked at {:.1} MB",
        peak as f64 / 1e6
    );

    // The metrics the agent publishes say the same.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let Ok(Some(m)) = tokio::time::timeout_at(deadline.into(), published.next()).await else {
            panic!("published metrics never counted the drops");
        };
        if sample(&String::from_utf8_lossy(&m.payload), too_large) == Some(COUNT as f64) {
            break;
        }
    }

    // And a normal signal after the flood still arrives.
    flooder
        .emit_signal(
            None::<&str>,
            "/org/cbus/Flood",
            "org.cbus.Flood1",
            "Small",
            &("ok",),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let Ok(Some(m)) = tokio::time::timeout_at(deadline.into(), sigs.next()).await else {
            panic!("no normal signal after the flood");
        };
        assert_ne!(header(&m, "Member"), Some("Big"));
        if header(&m, "Member") == Some("Small") {
            break;
        }
    }
}
