//! NATS authentication: the agent's own nkey (from the host key), user and password, a token, a
//! `.creds` file (JWT, server in operator mode) and TLS with a private CA; an agent the server
//! refuses keeps retrying instead of exiting.

use std::time::Duration;

use cbus_client::fleet::{Fleet, Outcome, Query};
use cbus_protocol::{Op, Reply, Request};
use cbus_tests::ask::*;
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

/// Asks until the agent answers, finding it by `dbus.ping` (in operator mode the account has no
/// JetStream, so there is no registry; plain NATS discovery must do).
async fn wait_answers(fleet: &Fleet, nkey: &str) -> Reply {
    let query = Query {
        destination: NAME.into(),
        path: PATH.into(),
        op: Op::Get,
        member: Some("Bool".into()),
        request: Request::default(),
    };
    for _ in 0..40 {
        let found = fleet
            .ping(Duration::from_millis(250))
            .await
            .unwrap_or_default();
        let target: Vec<_> = found.into_iter().filter(|a| a.info.nkey == nkey).collect();
        if !target.is_empty() {
            let out = fleet.fan_out(&target, &query, Duration::from_secs(5)).await;
            if let Some(Outcome::Replied(r)) = out
                .ok()
                .and_then(|o| o.into_iter().next())
                .map(|o| o.outcome)
            {
                return r;
            }
        }
        // An empty ping comes back at once while the agent is still connecting.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("agent {nkey} never answered");
}

fn creds(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
}

#[tokio::test]
async fn creds_file() {
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let operator = nats_jwt::KeyPair::new_operator();
    let account = nats_jwt::KeyPair::new_account();
    let account_jwt = nats_jwt::Token::new_account(account.public_key())
        .name("cbus")
        .sign(&operator);
    // JetStream (the harness starts it) needs a system account in operator mode.
    let system = nats_jwt::KeyPair::new_account();
    let system_jwt = nats_jwt::Token::new_account(system.public_key())
        .name("SYS")
        .sign(&operator);
    let user = |name: &str| {
        let key = nats_jwt::KeyPair::new_user();
        let jwt = nats_jwt::Token::new_user(account.public_key(), key.public_key())
            .name(name)
            .sign(&account);
        creds(&jwt, &key.seed().expect("user seed"))
    };
    let nats = NatsServer::start_with_config(&format!(
        "trusted_keys: [{op}]\nsystem_account: {sys}\nresolver: MEMORY\n\
         resolver_preload: {{ {acc}: \"{account_jwt}\", {sys}: \"{system_jwt}\" }}\n",
        op = operator.public_key(),
        acc = account.public_key(),
        sys = system.public_key(),
    ));
    let dir = tempfile::tempdir().unwrap();
    let agent_creds = dir.path().join("agent.creds");
    std::fs::write(&agent_creds, user("agent")).unwrap();
    let client_creds = dir.path().join("client.creds");
    std::fs::write(&client_creds, user("client")).unwrap();
    let agent = Agent::start(
        &nats.url(),
        bus.address(),
        &["--creds", agent_creds.to_str().unwrap()],
    );
    let client = async_nats::ConnectOptions::with_credentials_file(&client_creds)
        .await
        .expect("read client creds")
        .connect(nats.url())
        .await
        .expect("client connects with its creds");
    let fleet = Fleet::new(client, "test@creds");
    let r = wait_answers(&fleet, &agent.nkey).await;
    assert_eq!(ok(&r).1, json!(true));

    // Without credentials the same server refuses a client: the creds are what let the agent in.
    assert!(
        async_nats::connect(nats.url()).await.is_err(),
        "the operator-mode server must refuse a client without creds"
    );
}

#[tokio::test]
async fn tls_with_private_ca() {
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let nats = NatsServer::start_tls("");
    let ca_pem = nats.tls_ca();
    let agent = Agent::start(
        &nats.url(),
        bus.address(),
        &["--tls-ca", ca_pem.to_str().unwrap()],
    );
    let client = async_nats::ConnectOptions::new()
        .add_root_certificates(ca_pem.clone())
        .require_tls(true)
        .connect(nats.url())
        .await
        .expect("client connects over TLS");
    let fleet = Fleet::new(client, "test@tls");
    let r = wait_answers(&fleet, &agent.nkey).await;
    assert_eq!(ok(&r).1, json!(true));

    // An agent without the CA cannot verify the server, never gets in, and keeps retrying.
    let mut blind = Agent::start(&nats.url(), bus.address(), &[]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let agents = fleet.registry().await.unwrap();
    assert!(agents.iter().any(|a| a.info.nkey == agent.nkey));
    assert!(
        !agents.iter().any(|a| a.info.nkey == blind.nkey),
        "an agent that cannot verify the server must not get in"
    );
    assert!(blind
        .pid()
        .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists()));
    blind.stop();
}
