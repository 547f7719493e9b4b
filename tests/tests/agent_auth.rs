//! NATS authentication: the agent's own nkey (from the host key), user and password, and a
//! token; an agent the server refuses keeps retrying instead of exiting.

mod agent_common;

use std::time::Duration;

use agent_common::*;
use cbus_protocol::fleet::Fleet;
use cbus_protocol::Op;
use cbus_tests::{Agent, NatsServer, PrivateBus, TestService};
use serde_json::json;

async fn admin(nats: &NatsServer) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password("admin".into(), "secret".into())
        .connect(nats.url())
        .await
        .expect("admin connects")
}

#[tokio::test]
async fn nkey_and_user_password() {
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let dir = tempfile::tempdir().unwrap();
    let key = cbus_tests::agent::generate_host_key(dir.path());
    let nkey = cbus_protocol::nkey::from_ssh_host_key(&key)
        .unwrap()
        .public_key();
    let nats = NatsServer::start_with_config(&format!(
        "authorization {{ users = [
            {{ nkey: {nkey} }}
            {{ user: admin, password: secret }}
            {{ user: agentpw, password: pw2 }}
        ] }}"
    ));
    let by_nkey = Agent::start_with_key(&nats.url(), bus.address(), &key, &["--nats-nkey-auth"]);
    let by_password = Agent::start(
        &nats.url(),
        bus.address(),
        &["--user", "agentpw", "--password", "pw2"],
    );
    let mut refused = Agent::start(&nats.url(), bus.address(), &["--nats-nkey-auth"]);
    let fleet = Fleet::new(admin(&nats).await, "test@auth");
    wait_registered(&fleet, &by_nkey.nkey).await;
    wait_registered(&fleet, &by_password.nkey).await;
    let r = ask(
        &fleet,
        &by_nkey.nkey,
        NAME,
        PATH,
        Op::Get,
        Some("Byte"),
        json!({}),
    )
    .await;
    assert_eq!(ok(&r).1, json!(7));

    // The unknown key never gets in, and its agent is still running (retrying).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let agents = fleet.registry().await.unwrap();
    assert!(!agents.iter().any(|a| a.info.nkey == refused.nkey));
    let pid = refused.pid().unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit(") ").next().and_then(|s| s.chars().next());
    assert!(
        matches!(state, Some('R' | 'S' | 'D')),
        "a refused agent must keep retrying, not exit: {stat}"
    );
    refused.stop();
}

#[tokio::test]
async fn token() {
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let nats = NatsServer::start_with_config("authorization { token: s3cret }");
    let agent = Agent::start(&nats.url(), bus.address(), &["--token", "s3cret"]);
    let client = async_nats::ConnectOptions::with_token("s3cret".into())
        .connect(nats.url())
        .await
        .unwrap();
    let fleet = Fleet::new(client, "test@token");
    wait_registered(&fleet, &agent.nkey).await;
    let r = ask(
        &fleet,
        &agent.nkey,
        NAME,
        PATH,
        Op::Get,
        Some("Bool"),
        json!({}),
    )
    .await;
    assert_eq!(ok(&r).1, json!(true));
}
