//! The agent registry (JetStream KV) read by the CLI and the gateway: every entry comes back
//! while agents keep rewriting theirs, which is what heartbeats do all the time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_nats::jetstream;
use std::time::Duration;

use cbus_client::fleet::{ensure_registry, Fleet, Selector};
use cbus_protocol::presence::{host_index_key, now_ms, PresenceEvent, PresenceKind};
use cbus_tests::NatsServer;

const AGENTS: usize = 50;

fn heartbeat(i: usize) -> (String, Vec<u8>) {
    let nkey = format!("U{i:055}");
    let event = PresenceEvent {
        event: PresenceKind::Heartbeat,
        sent_at_ms: now_ms(),
        agent: cbus_tests::synthetic_agent_info(&nkey, format!("host-{i:02}")),
    };
    let payload = serde_json::to_vec(&event).expect("presence event serializes");
    (nkey, payload)
}

/// nats-server 2.9 sometimes delivers the first entry of a last-per-subject replay twice and
/// counts both in the pending figure; a read that trusted that figure lost one machine in about
/// one read in a hundred here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_entry_is_read_while_entries_are_rewritten() {
    cbus_tests::init_tracing();
    let nats = NatsServer::start();
    let client = nats.connect().await;
    let store = ensure_registry(&jetstream::new(client.clone()), 1)
        .await
        .expect("registry bucket");
    for i in 0..AGENTS {
        let (key, payload) = heartbeat(i);
        store.put(key, payload.into()).await.expect("put");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut puts = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (key, payload) = heartbeat(puts as usize % AGENTS);
                store.put(key, payload.into()).await.expect("put");
                puts += 1;
            }
            puts
        })
    };
    let fleet = Fleet::new(nats.connect().await, "test@registry");
    let mut short = Vec::new();
    for read in 0..400 {
        let agents = fleet.registry().await.expect("registry read");
        if agents.len() != AGENTS {
            short.push((read, agents.len()));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let puts = writer.await.expect("writer");
    assert!(
        puts > 400,
        "entries were rewritten during the reads ({puts} puts)"
    );
    assert!(
        short.is_empty(),
        "reads (index, entries) that missed some of the {AGENTS} entries: {short:?}"
    );
}

/// Agents that start together all find no bucket and create it at once; every one of them must
/// end up with the registry (nats-server 2.9 can refuse a racing create with "subjects overlap").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_creating_the_bucket_at_once_all_get_it() {
    cbus_tests::init_tracing();
    for round in 0..10 {
        let nats = NatsServer::start();
        let mut clients = Vec::new();
        for _ in 0..8 {
            clients.push(nats.connect().await);
        }
        let start = Arc::new(tokio::sync::Barrier::new(clients.len()));
        let creators: Vec<_> = clients
            .into_iter()
            .map(|client| {
                let start = start.clone();
                tokio::spawn(async move {
                    start.wait().await;
                    ensure_registry(&jetstream::new(client), 1)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        for c in creators {
            let created = c.await.expect("creator task");
            assert!(created.is_ok(), "round {round}: {created:?}");
        }
    }
}

/// A selection by hostname reads its machines through the host index, not the whole registry,
/// and stays what a full read would select: a false or stale index key leads nowhere, and a
/// machine without one (an agent older than the index) is still found, by a full read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selection_by_name_reads_only_its_machines() {
    const N: usize = 2_000;
    cbus_tests::init_tracing();
    let nats = NatsServer::start();
    let client = nats.connect().await;
    let store = ensure_registry(&jetstream::new(client.clone()), 1)
        .await
        .expect("registry bucket");
    let entry = |i: usize| {
        let nkey = format!("U{i:055}");
        let event = PresenceEvent {
            event: PresenceKind::Heartbeat,
            sent_at_ms: now_ms(),
            agent: cbus_tests::synthetic_agent_info(&nkey, format!("host-{i:04}")),
        };
        (nkey, serde_json::to_vec(&event).unwrap())
    };
    for i in 0..N {
        let (nkey, payload) = entry(i);
        store.put(&nkey, payload.into()).await.expect("put");
        // host-0001 has no index key, as an agent from before the index.
        if i != 1 {
            let key = host_index_key(&format!("host-{i:04}"), &nkey).unwrap();
            store.put(key, "".into()).await.expect("put index");
        }
    }
    // Machine 5 also claims host-0003 in the index (its entry says host-0005).
    let false_key = host_index_key("host-0003", &entry(5).0).unwrap();
    store.put(false_key, "".into()).await.expect("put index");
    // One more machine named host-0004: a name may be two machines, and a lookup finds both.
    let twin = format!("U{N:055}");
    let event = PresenceEvent {
        event: PresenceKind::Heartbeat,
        sent_at_ms: now_ms(),
        agent: cbus_tests::synthetic_agent_info(&twin, "host-0004".to_owned()),
    };
    store
        .put(&twin, serde_json::to_vec(&event).unwrap().into())
        .await
        .expect("put");
    store
        .put(host_index_key("host-0004", &twin).unwrap(), "".into())
        .await
        .expect("put index");
    const KNOWN: usize = N + 1;

    let fleet = Fleet::new(nats.connect().await, "test@registry");
    let out_msgs = || {
        nats.varz()
            .and_then(|v| v["out_msgs"].as_u64())
            .expect("varz")
    };
    let select = |hosts: &[&str], nkeys: &[String]| {
        let selector = Selector {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            nkeys: nkeys.to_vec(),
            ..Default::default()
        };
        let fleet = fleet.clone();
        async move {
            let before = out_msgs();
            let found = fleet
                .select_within(
                    &selector,
                    Duration::from_secs(5),
                    Duration::from_millis(500),
                )
                .await
                .expect("selection");
            let sent = out_msgs() - before;
            let hosts: Vec<String> = found
                .agents
                .iter()
                .map(|a| a.info.hostname.clone())
                .collect();
            (hosts, found.known, sent)
        }
    };
    // Indexed names: only their machines come from the server, not 2,000 entries.
    let (hosts, known, sent) = select(&["host-0002", "host-1999"], &[]).await;
    assert_eq!(hosts, ["host-0002", "host-1999"]);
    assert_eq!(known, 2);
    assert!(sent < 50, "{sent} messages for two machines");
    // The false index key leads to an entry that does not carry the name: not selected.
    let (hosts, _, sent) = select(&["host-0003"], &[]).await;
    assert_eq!(hosts, ["host-0003"]);
    assert!(sent < 50, "{sent} messages for one machine");
    // Both machines of a shared name.
    let (hosts, known, sent) = select(&["host-0004"], &[]).await;
    assert_eq!(hosts, ["host-0004", "host-0004"]);
    assert_eq!(known, 2);
    assert!(sent < 50, "{sent} messages for two machines");
    // By nkey: its entry alone.
    let (hosts, _, sent) = select(&[], &[entry(7).0]).await;
    assert_eq!(hosts, ["host-0007"]);
    assert!(sent < 50, "{sent} messages for one machine");
    // Not in the index: the whole registry is read, and the machine is found.
    let (hosts, known, sent) = select(&["host-0001"], &[]).await;
    assert_eq!(hosts, ["host-0001"]);
    assert_eq!(known, KNOWN);
    assert!(sent >= N as u64, "{sent}");
    // A glob reads it whole; a name no machine has says so with the fleet's size.
    let (hosts, known, _) = select(&["host-000?"], &[]).await;
    assert_eq!(hosts.len(), 11);
    assert_eq!(known, KNOWN);
    let (hosts, known, _) = select(&["no-such-host"], &[]).await;
    assert!(hosts.is_empty());
    assert_eq!(known, KNOWN);
    // The whole fleet: every entry, and no index key taken for one.
    assert_eq!(fleet.registry().await.unwrap().len(), KNOWN);
}
