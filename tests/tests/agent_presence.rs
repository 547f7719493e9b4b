//! Presence: hello and heartbeats in the registry, ping answers, goodbye on SIGTERM; the agent
//! reconnects by itself after a NATS restart.

use cbus_tests::ask::*;
use std::time::Duration;

use cbus_client::fleet::{Fleet, Outcome, Query};
use cbus_protocol::presence::AgentState;
use cbus_protocol::{Op, Reply, Request};
use cbus_tests::{Agent, NatsServer, PrivateBus, TestService};
use futures::StreamExt;
use serde_json::json;

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

/// The next presence event; checks it came on the subject of the agent it names.
async fn next(sub: &mut async_nats::Subscriber) -> cbus_protocol::presence::PresenceEvent {
    let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("presence message in time")
        .expect("subscription open");
    let ev: cbus_protocol::presence::PresenceEvent =
        serde_json::from_slice(&msg.payload).expect("presence event");
    assert_eq!(
        msg.subject.as_str(),
        format!("dbus.presence.{}", ev.agent.nkey)
    );
    ev
}

/// Hello, heartbeats into the registry, ping, and goodbye (message and registry) on SIGTERM.
#[tokio::test]
async fn hello_heartbeat_ping_goodbye() {
    use cbus_protocol::presence::{AgentInfo, PresenceEvent, PresenceKind, REGISTRY_BUCKET};

    let nats = NatsServer::start();
    let bus = PrivateBus::start();
    let client = nats.connect().await;
    let mut presence = client.subscribe("dbus.presence.*").await.unwrap();
    client.flush().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = cbus_tests::agent::generate_host_key(dir.path());
    let mut agent = Agent::start_with_key(
        &nats.url(),
        bus.address(),
        &key,
        &[
            "--hostname",
            "pres-host",
            "--label",
            "role=test",
            "--label",
            "dc=lab",
        ],
    );
    let hello = next(&mut presence).await;
    assert_eq!(hello.event, PresenceKind::Hello);
    assert_eq!(hello.agent.nkey, agent.nkey);
    assert_eq!(hello.agent.hostname, "pres-host");
    assert_eq!(hello.agent.bus, bus.address());
    assert_eq!(hello.agent.heartbeat_ms, 500);
    assert!(hello.agent.bus_connected);
    assert_eq!(
        hello.agent.labels.get("role").map(String::as_str),
        Some("test")
    );
    assert_eq!(
        hello.agent.labels.get("dc").map(String::as_str),
        Some("lab")
    );
    let beat = next(&mut presence).await;
    assert_eq!(beat.event, PresenceKind::Heartbeat);
    assert_eq!(beat.agent.started_at_ms, hello.agent.started_at_ms);

    // The registry holds the latest event, with the bucket's limits.
    let js = async_nats::jetstream::new(client.clone());
    let kv = js
        .get_key_value(REGISTRY_BUCKET)
        .await
        .expect("registry bucket");
    let status = kv.status().await.unwrap();
    assert_eq!(status.history(), 1);
    assert_eq!(status.max_age(), cbus_protocol::presence::REGISTRY_MAX_AGE);
    let entry = kv.get(&agent.nkey).await.unwrap().expect("registry entry");
    let stored: PresenceEvent = serde_json::from_slice(&entry).unwrap();
    assert!(matches!(
        stored.event,
        PresenceKind::Hello | PresenceKind::Heartbeat
    ));
    assert_eq!(stored.agent.labels, hello.agent.labels);

    // A ping finds it, with its own info.
    let fleet = Fleet::new(client.clone(), "test@ping");
    let found = fleet.ping(Duration::from_secs(1)).await.unwrap();
    let info: &AgentInfo = &found
        .iter()
        .find(|a| a.info.nkey == agent.nkey)
        .unwrap()
        .info;
    assert_eq!(info.hostname, "pres-host");
    assert!(info.bus_connected);

    // SIGTERM: goodbye on the subject and in the registry.
    agent.stop();
    let bye = loop {
        let ev = next(&mut presence).await;
        if ev.event != PresenceKind::Heartbeat {
            break ev;
        }
    };
    assert_eq!(bye.event, PresenceKind::Goodbye);
    let entry = kv.get(&agent.nkey).await.unwrap().expect("registry entry");
    let stored: PresenceEvent = serde_json::from_slice(&entry).unwrap();
    assert_eq!(stored.event, PresenceKind::Goodbye);
    let fleet = Fleet::new(client.clone(), "test@presence");
    let me = fleet.registry().await.unwrap();
    let me = me.iter().find(|a| a.info.nkey == agent.nkey).unwrap();
    assert_eq!(me.state, AgentState::Stopped);
}

/// A NATS server without JetStream: no registry, but presence messages, pings and requests work.
#[tokio::test]
async fn plain_nats_without_jetstream() {
    let server = NatsServer::start_plain();
    let url = server.url();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let mut presence = client.subscribe("dbus.presence.*").await.unwrap();
    client.flush().await.unwrap();
    let agent = Agent::start(&url, bus.address(), &[]);
    for _ in 0..3 {
        let msg = tokio::time::timeout(Duration::from_secs(10), presence.next())
            .await
            .expect("presence without JetStream")
            .unwrap();
        assert_eq!(
            msg.subject.as_str(),
            format!("dbus.presence.{}", agent.nkey)
        );
    }
    // Without a registry, the fleet is found by ping, and requests work as usual.
    let fleet = Fleet::new(client.clone(), "test@plain");
    let agents = fleet.agents(Duration::from_millis(500)).await.unwrap();
    assert!(
        agents.iter().any(|a| a.info.nkey == agent.nkey),
        "{agents:?}"
    );
    let target: Vec<_> = agents
        .into_iter()
        .filter(|a| a.info.nkey == agent.nkey)
        .collect();
    let q = Query {
        destination: NAME.into(),
        path: PATH.into(),
        op: Op::Get,
        member: Some("String".into()),
        request: Request::default(),
    };
    let out = fleet
        .fan_out(&target, &q, Duration::from_secs(5))
        .await
        .unwrap();
    match &out[0].outcome {
        Outcome::Replied(r) => assert_eq!(ok(r).1, json!("hello")),
        other => panic!("{other:?}"),
    }
}

/// A ping is answered on the agent's own presence subject (where only it may publish), never on
/// the ping's reply inbox (which every agent could write to); a flood of pings is answered at
/// most ten times a second, and still after the last ping.
#[tokio::test]
async fn pings_are_answered_on_the_agents_own_presence_subject() {
    use cbus_protocol::presence::{now_ms, PresenceKind};

    let nats = NatsServer::start_plain();
    let bus = PrivateBus::start();
    let client = nats.connect().await;
    let mut presence = client.subscribe("dbus.presence.*").await.unwrap();
    client.flush().await.unwrap();
    // Heartbeats a minute apart: any presence event after the hello is a ping's answer.
    let agent = Agent::start(&nats.url(), bus.address(), &["--heartbeat", "60s"]);
    assert_eq!(next(&mut presence).await.event, PresenceKind::Hello);

    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.unwrap();
    client.flush().await.unwrap();
    let pinged_at = now_ms();
    client
        .publish_with_reply("dbus.ping", inbox.clone(), "".into())
        .await
        .unwrap();
    // The agent subscribed to pings before it said hello.
    let pong = next(&mut presence).await;
    assert_eq!(pong.event, PresenceKind::Heartbeat);
    assert_eq!(pong.agent.nkey, agent.nkey);
    assert!(pong.sent_at_ms >= pinged_at, "{pong:?}");
    let on_inbox = tokio::time::timeout(Duration::from_millis(300), replies.next()).await;
    assert!(
        on_inbox.is_err(),
        "an answer on the reply inbox: {on_inbox:?}"
    );

    // 50 pings at once: a few answers, the last one sent after the last ping.
    let mut last_ping = 0;
    for _ in 0..50 {
        last_ping = now_ms();
        client
            .publish_with_reply("dbus.ping", inbox.clone(), "".into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    let mut answers = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Ok(Some(msg)) = tokio::time::timeout_at(until, presence.next()).await {
        let ev: cbus_protocol::presence::PresenceEvent =
            serde_json::from_slice(&msg.payload).unwrap();
        answers.push(ev.sent_at_ms);
    }
    assert!(
        !answers.is_empty() && answers.len() <= 3,
        "answers to 50 pings within 1.5 s: {answers:?}"
    );
    assert!(
        answers.iter().any(|&at| at >= last_ping),
        "no answer after the last ping at {last_ping}: {answers:?}"
    );
}
