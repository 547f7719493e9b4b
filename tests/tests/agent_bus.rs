//! The agent outlives a restart of its D-Bus daemon: requests, signals and well-known sender
//! names work again without restarting the agent.

use std::time::{Duration, Instant};

use cbus_client::fleet::Fleet;
use cbus_protocol::Op;
use cbus_tests::ask::*;
use cbus_tests::{Agent, NatsServer, PrivateBus, TestService};
use futures::StreamExt;
use serde_json::json;

#[tokio::test]
async fn survives_a_bus_restart() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = PrivateBus::start_in(dir.path());
    let address = daemon.address().to_owned();
    let mut svc = TestService::start(&address);
    let agent = Agent::start(&nats.url(), &address, &["--allow-all"]);
    let client = nats.connect().await;
    let fleet = Fleet::new(client.clone(), "test@bus-restart");
    wait_registered(&fleet, &agent.nkey).await;
    let n = agent.nkey.clone();
    let r = ask(&fleet, &n, NAME, PATH, Op::Get, Some("Int32"), json!({})).await;
    assert_eq!(ok(&r).1, json!(-32));

    // Restart the daemon on the same socket, and the service on it.
    drop(svc);
    drop(daemon);
    let r = ask(&fleet, &n, NAME, PATH, Op::Get, Some("Int32"), json!({})).await;
    assert_eq!(
        err(&r).code,
        cbus_protocol::ErrorCode::Disconnected,
        "{r:?}"
    );
    let again = PrivateBus::start_in(dir.path());
    assert_eq!(again.address(), address);
    daemon = again;
    svc = TestService::start(&address);

    let served = cbus_tests::wait_for(Duration::from_secs(30), || {
        let fleet = fleet.clone();
        let n = n.clone();
        async move {
            try_ask(
                &fleet,
                &n,
                NAME,
                PATH,
                Op::Get,
                Some("Int32"),
                json!({}),
                Duration::from_secs(2),
            )
            .await
            .is_some_and(|r| r.result.is_ok())
        }
    })
    .await;
    assert!(served, "agent did not serve again after the bus restart");

    // Signals flow again, with the well-known name of the new owner (learnt a moment after the
    // reconnection: a signal in between may lack it).
    let mut sigs = client
        .subscribe(format!("dbus.signals.{n}.>"))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = None;
    while got.is_none() && Instant::now() < deadline {
        let r = ask(
            &fleet,
            &n,
            NAME,
            PATH,
            Op::Call,
            Some("EmitOne"),
            json!({"args": ["again"]}),
        )
        .await;
        ok(&r);
        let until = Instant::now() + Duration::from_millis(500);
        while let Ok(Some(m)) = tokio::time::timeout_at(until.into(), sigs.next()).await {
            if header(&m, "Member") == Some("Message") && header(&m, "Sender-Name").is_some() {
                got = Some(m);
                break;
            }
        }
    }
    let m = got.expect("no signal after the bus restart");
    assert_eq!(header(&m, "Sender-Name"), Some(NAME));
    drop(svc);
    drop(daemon);
}
