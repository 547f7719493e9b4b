//! A compromised agent against a real nats-server configured with the permission sets the code
//! holds (`protocol::permissions`, the same ones `./dev up` and the NixOS module render): with
//! only its own key it cannot read another's requests or replies, answer for another machine,
//! hide or wipe registry entries, or change the registry bucket. Each forbidden action is tried
//! and seen refused by the server (a permissions violation) or ignored by the client side.

use std::time::Duration;

use async_nats::jetstream;
use cbus_client::fleet::{self, Fleet, Outcome, Query};
use cbus_protocol::permissions;
use cbus_protocol::presence::{self, AgentState, PresenceEvent, PresenceKind};
use cbus_protocol::{Op, Request};
use cbus_tests::ask::*;
use cbus_tests::{Agent, NatsServer, PrivateBus, TestService};
use futures::StreamExt;
use serde_json::json;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;

const OPERATOR_PW: &str = "op-secret";
const GATEWAY_PW: &str = "gw-secret";

/// The server's users: each agent nkey, the gateway and the operator, with the code's sets.
fn server_config(agents: &[&str]) -> String {
    cbus_tests::nats::deployment_authorization(agents, OPERATOR_PW, GATEWAY_PW)
}

async fn user(nats: &NatsServer, name: &str, password: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(name.into(), password.into())
        .connect(nats.url())
        .await
        .expect("user connects")
}

/// An attacker holding `seed` (a machine's own key), with the server's errors collected.
async fn attacker(
    nats: &NatsServer,
    seed: &str,
) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let public = nkeys::KeyPair::from_seed(seed).unwrap().public_key();
    let client = async_nats::ConnectOptions::with_nkey(seed.into())
        .custom_inbox_prefix(permissions::agent_inbox_prefix(&public))
        .event_callback(move |e| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(e.to_string());
            }
        })
        .connect(nats.url())
        .await
        .expect("a machine's own nkey is a NATS user");
    (client, rx)
}

/// Waits until the server reported a permissions violation naming `subject`.
async fn violation(
    errors: &mut mpsc::UnboundedReceiver<String>,
    seen: &mut Vec<String>,
    subject: &str,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let hit = |seen: &[String]| {
        seen.iter()
            .any(|e| e.to_lowercase().contains("permissions violation") && e.contains(subject))
    };
    while !hit(seen) {
        match tokio::time::timeout_at(deadline, errors.recv()).await {
            Ok(Some(e)) => seen.push(e),
            _ => break,
        }
    }
    assert!(
        hit(seen),
        "no permissions violation for {subject}: {seen:?}"
    );
}

fn get_byte() -> Query {
    Query {
        destination: NAME.into(),
        path: PATH.into(),
        op: Op::Get,
        member: Some("Byte".into()),
        request: serde_json::from_value::<Request>(json!({})).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compromised_agent_cannot_impersonate_hide_or_wipe_others() {
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let dir = tempfile::tempdir().unwrap();
    let (key_a, key_v) = {
        let a = dir.path().join("a");
        let v = dir.path().join("v");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&v).unwrap();
        (
            cbus_tests::agent::generate_host_key(&a),
            cbus_tests::agent::generate_host_key(&v),
        )
    };
    let kp_a = cbus_protocol::nkey::from_ssh_host_key(&key_a).unwrap();
    let kp_v = cbus_protocol::nkey::from_ssh_host_key(&key_v).unwrap();
    // A machine with no agent: the attacker holds its key too, to answer requests as it.
    let kp_m = nkeys::KeyPair::new_user();
    let (a, v, m) = (kp_a.public_key(), kp_v.public_key(), kp_m.public_key());
    let nats = NatsServer::start_with_config(&server_config(&[&a, &v, &m]));

    // Agents may not create the registry; the gateway does (and closes it to rollups).
    let gateway = user(&nats, "gateway", GATEWAY_PW).await;
    fleet::close_registry(&jetstream::new(gateway.clone()), 1)
        .await
        .expect("the gateway creates the registry");
    let _agent_a = Agent::start_with_key(&nats.url(), bus.address(), &key_a, &["--nats-nkey-auth"]);
    let _agent_v = Agent::start_with_key(&nats.url(), bus.address(), &key_v, &["--nats-nkey-auth"]);
    let operator = user(&nats, "operator", OPERATOR_PW).await;
    let fleet = Fleet::new(operator.clone(), "test@permissions");
    // The sets are enough for the real thing: both register and answer.
    wait_registered(&fleet, &a).await;
    wait_registered(&fleet, &v).await;
    let r = ask(&fleet, &v, NAME, PATH, Op::Get, Some("Byte"), json!({})).await;
    assert_eq!(ok(&r).1, json!(7));
    // ... and write their host index keys beside their entries.
    let store = jetstream::new(operator.clone())
        .get_key_value(presence::REGISTRY_BUCKET)
        .await
        .unwrap();
    for agent in fleet.registry().await.unwrap() {
        let key = presence::host_index_key(&agent.info.hostname, &agent.info.nkey).unwrap();
        let indexed = cbus_tests::wait_for(Duration::from_secs(10), || async {
            matches!(store.entry(&key).await, Ok(Some(_)))
        })
        .await;
        assert!(indexed, "no host index key {key}");
    }

    let (evil, mut errors) = attacker(&nats, &kp_a.seed().unwrap()).await;
    let mut seen = Vec::new();

    // 1. Reading everyone's replies: subscribing to _INBOX.> is refused, and nothing arrives.
    let mut replies = evil.subscribe("_INBOX.>").await.unwrap();
    violation(&mut errors, &mut seen, "_INBOX.>").await;
    let r = ask(&fleet, &v, NAME, PATH, Op::Get, Some("Byte"), json!({})).await;
    assert_eq!(ok(&r).1, json!(7));
    let leaked = tokio::time::timeout(Duration::from_millis(500), replies.next()).await;
    assert!(
        leaked.is_err() || matches!(leaked, Ok(None)),
        "a reply leaked: {leaked:?}"
    );

    // 2. Reading another machine's requests, or joining its broadcast queue group.
    let _spy = evil.subscribe(format!("dbus.agent.{v}.>")).await.unwrap();
    violation(&mut errors, &mut seen, &format!("dbus.agent.{v}.>")).await;
    let _queue = evil
        .queue_subscribe("dbus.broadcast.>", v.clone())
        .await
        .unwrap();
    violation(&mut errors, &mut seen, "dbus.broadcast.>").await;

    // 3. Speaking for another machine: its signals, presence and registry key.
    for subject in [
        format!("dbus.signals.{v}._3a1_2e1.forged"),
        format!("dbus.presence.{v}"),
        format!("$KV.{}.{v}", presence::REGISTRY_BUCKET),
        format!("$KV.{}.host.victim.{v}", presence::REGISTRY_BUCKET),
    ] {
        evil.publish(subject.clone(), "{}".into()).await.unwrap();
        evil.flush().await.unwrap();
        violation(&mut errors, &mut seen, &subject).await;
    }

    // 4. Changing, purging or deleting the registry bucket through the JetStream API.
    let stream = format!("KV_{}", presence::REGISTRY_BUCKET);
    for api in [
        "STREAM.UPDATE",
        "STREAM.DELETE",
        "STREAM.PURGE",
        "STREAM.CREATE",
    ] {
        let subject = format!("$JS.API.{api}.{stream}");
        evil.publish(subject.clone(), "{}".into()).await.unwrap();
        evil.flush().await.unwrap();
        violation(&mut errors, &mut seen, &subject).await;
    }

    // 5. Its own registry key, with a body that names the victim and says goodbye: ignored and
    //    counted; the victim stays running.
    let js = jetstream::new(evil.clone());
    let forged = PresenceEvent {
        event: PresenceKind::Goodbye,
        sent_at_ms: presence::now_ms(),
        agent: cbus_tests::synthetic_agent_info(&v, "victim"),
    };
    js.publish(
        format!("$KV.{}.{a}", presence::REGISTRY_BUCKET),
        serde_json::to_vec(&forged).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .expect("an agent may write its own key");
    let agents = fleet.registry().await.unwrap();
    let victim = agents
        .iter()
        .find(|s| s.info.nkey == v)
        .expect("victim listed");
    assert_eq!(victim.state, AgentState::Running, "{agents:?}");
    assert!(fleet.rejected().registry.load(Ordering::Relaxed) >= 1);

    // 6. A rollup that would wipe every entry: refused by the bucket, nothing lost.
    let mut rollup = async_nats::HeaderMap::new();
    rollup.insert("Nats-Rollup", "all");
    let wiped = match js
        .publish_with_headers(
            format!("$KV.{}.{a}", presence::REGISTRY_BUCKET),
            rollup,
            "{}".into(),
        )
        .await
    {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    assert!(!wiped, "the registry accepted a rollup");
    let after = fleet.registry().await.unwrap();
    assert!(
        after.iter().any(|s| s.info.nkey == v),
        "victim's entry lost: {after:?}"
    );

    // 7. Answering as another machine: the reply subject says who was asked; an envelope that
    //    names someone else is dropped and counted, never shown as the victim's answer.
    let (as_m, _m_errors) = attacker(&nats, &kp_m.seed().unwrap()).await;
    let mut requests = as_m.subscribe(format!("dbus.agent.{m}.>")).await.unwrap();
    as_m.flush().await.unwrap();
    let forged_reply = cbus_protocol::Reply {
        nkey: v.clone(),
        hostname: "victim".into(),
        result: Ok(cbus_protocol::Success {
            signature: Some("y".into()),
            value: json!(99),
        }),
    }
    .to_payload();
    let answer = tokio::spawn({
        let as_m = as_m.clone();
        async move {
            let req = tokio::time::timeout(Duration::from_secs(10), requests.next())
                .await
                .ok()
                .flatten()
                .expect("a request for m");
            as_m.publish(req.reply.unwrap(), forged_reply)
                .await
                .unwrap();
        }
    });
    let target = fleet::AgentStatus {
        info: cbus_tests::synthetic_agent_info(&m, "m"),
        state: AgentState::Running,
        last_seen_ms: presence::now_ms(),
        maintenance: None,
    };
    let out = fleet
        .fan_out(&[target], &get_byte(), Duration::from_secs(5))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .unwrap_or_else(|_| panic!("the request for m reached the attacker: {out:?}"))
        .unwrap();
    match &out[0].outcome {
        Outcome::Replied(r) => {
            assert_eq!(r.nkey, m, "attributed to the machine asked");
            assert!(r.result.is_err(), "a forged answer was taken: {r:?}");
        }
        other => panic!("expected the forged reply to be seen and refused: {other:?}"),
    }
    assert_eq!(fleet.rejected().replies.load(Ordering::Relaxed), 1);
    // 8. Answering pings on the reply inbox with another machine's nkey under a false name,
    //    and with an nkey no agent holds: a ping takes answers only from each machine's own
    //    presence subject, so neither shows.
    let mut pings = evil.subscribe("dbus.ping").await.unwrap();
    evil.flush().await.unwrap();
    let liar = tokio::spawn({
        let evil = evil.clone();
        let lies = [
            cbus_tests::synthetic_agent_info(&v, "evil-victim"),
            cbus_tests::synthetic_agent_info(&m, "ghost"),
        ];
        async move {
            while let Some(ping) = pings.next().await {
                for lie in &lies {
                    let body = serde_json::to_vec(lie).unwrap();
                    let _ = evil.publish(ping.reply.clone().unwrap(), body.into()).await;
                }
            }
        }
    });
    let found = fleet.ping(Duration::from_secs(1)).await.unwrap();
    liar.abort();
    let victim = found
        .iter()
        .find(|s| s.info.nkey == v)
        .expect("victim answers");
    assert_ne!(victim.info.hostname, "evil-victim", "{found:?}");
    assert!(found.iter().all(|s| s.info.nkey != m), "{found:?}");
    assert!(found.iter().any(|s| s.info.nkey == a), "{found:?}");

    println!(
        "refused by the server: {} violations; ignored: registry {}, replies {}",
        seen.len(),
        fleet.rejected().registry.load(Ordering::Relaxed),
        fleet.rejected().replies.load(Ordering::Relaxed)
    );
}

/// A bucket created by an older cbus (rollups allowed, purge not denied) is closed by the
/// gateway, and the closed configuration is what a fresh one gets.
#[tokio::test]
async fn the_gateway_closes_an_open_registry() {
    let nats = NatsServer::start();
    let client = nats.connect().await;
    let js = jetstream::new(client);
    let mut old = fleet::registry_config(1);
    old.allow_rollup = true;
    old.deny_purge = false;
    old.max_message_size = -1;
    js.create_stream(old).await.unwrap();
    assert!(
        fleet::close_registry(&js, 1).await.unwrap(),
        "an open bucket is changed"
    );
    let mut stream = js
        .get_stream(format!("KV_{}", presence::REGISTRY_BUCKET))
        .await
        .unwrap();
    let config = stream.info().await.unwrap().config.clone();
    assert!(!config.allow_rollup && config.deny_purge && config.deny_delete);
    assert_eq!(
        config.max_message_size,
        presence::REGISTRY_MAX_ENTRY_BYTES as i32
    );
    assert!(
        !fleet::close_registry(&js, 1).await.unwrap(),
        "a closed bucket is left alone"
    );
}
