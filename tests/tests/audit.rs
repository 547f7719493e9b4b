//! The audit trail on real parts: a nats-server with JetStream and the code's permission sets,
//! a real agent (its own nkey user) on a private dbus-daemon with the test service, and the
//! `cbus` binary as the operator. A denied call and an allowed set each leave one entry in the
//! audit stream, published by the agent on its own subject, with the arguments' size and
//! SHA-256 but never their text; `cbus audit` reads them (table, -s, --json, selection).

use std::time::{Duration, Instant};

use cbus_protocol::permissions;
use cbus_tests::cli::*;
use cbus_tests::{Agent, NatsServer, PrivateBus, TestService};
use serde_json::Value;
use sha2::Digest as _;

const OPERATOR_PW: &str = "op-secret";

fn server_config(agent: &str) -> String {
    format!(
        "authorization {{ users = [\n\
         {{ user: operator, password: {OPERATOR_PW}, permissions: {} }}\n\
         {{ nkey: {agent}, permissions: {} }}\n] }}",
        permissions::operator().to_config(),
        permissions::agent(agent).to_config()
    )
}

/// `cbus` as the operator.
fn op(url: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--user", "operator", "--password", OPERATOR_PW];
    all.extend_from_slice(args);
    cbus(url, &all)
}

fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads `cbus audit --json` until `n` entries are there (agents publish without waiting for
/// the stream), with a deadline.
fn entries(url: &str, extra: &[&str], n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut args = vec!["audit", "--json", "--since", "10m"];
        args.extend_from_slice(extra);
        let out = op(url, &args);
        assert!(out.status.success(), "{}", both(&out));
        let doc = json_of(&out);
        let list = doc["entries"].as_array().cloned().unwrap_or_default();
        if list.len() >= n || Instant::now() > deadline {
            return list;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_and_allowed_writes_are_in_the_audit_stream() {
    let dir = tempfile::tempdir().unwrap();
    let key = cbus_tests::agent::generate_host_key(dir.path());
    let nkey = cbus_protocol::nkey::from_ssh_host_key(&key)
        .unwrap()
        .public_key();
    let nats = NatsServer::start_with_config(&server_config(&nkey));
    let url = nats.url();
    // The operator creates the registry and the streams; agents may not.
    assert!(op(&url, &["registry", "init"]).status.success());
    // Before the audit stream exists, reading it is a clear connection error (exit 2).
    let missing = op(&url, &["audit"]);
    assert_eq!(missing.status.code(), Some(2), "{}", both(&missing));
    assert!(
        stderr(&missing).contains("cbus-audit"),
        "{}",
        both(&missing)
    );
    // Idempotent: the second run finds the stream as asked.
    for expected in ["created", "unchanged"] {
        let init = op(
            &url,
            &[
                "streams",
                "init",
                "--audit-max-age",
                "7d",
                "--audit-max-bytes",
                "64MiB",
            ],
        );
        let text = ok_stdout(&init);
        assert!(
            text.contains(&format!("stream cbus-audit {expected}")),
            "{text}"
        );
    }
    let bad = op(&url, &["streams", "init", "--audit-max-bytes", "lots"]);
    assert_eq!(bad.status.code(), Some(2), "{}", both(&bad));

    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[allow]]\nops = [\"set\"]\ndestination = \"org.cbus.Test\"\nmember = \"String\"\n",
    )
    .unwrap();
    let _agent = Agent::start_with_key(
        &url,
        bus.address(),
        &key,
        &[
            "--nats-nkey-auth",
            "--hostname",
            "audited",
            "--policy",
            policy.to_str().unwrap(),
        ],
    );
    let operator =
        async_nats::ConnectOptions::with_user_and_password("operator".into(), OPERATOR_PW.into())
            .connect(&url)
            .await
            .unwrap();
    let fleet = cbus_client::fleet::Fleet::new(operator.clone(), "test");
    assert!(cbus_tests::ask::wait_running(&fleet, Duration::from_secs(20), |c| c == 1).await);

    // A call the policy denies, with an argument that must never reach the trail.
    let secret = "[\"do-not-log-me\"]";
    let denied = op(
        &url,
        &[
            "invoke",
            "org.cbus.Test",
            "/org/cbus/Test",
            "EmitOne",
            secret,
        ],
    );
    assert_eq!(denied.status.code(), Some(1), "{}", both(&denied));
    assert!(
        stdout(&denied).contains("access-denied") || stdout(&denied).contains("policy"),
        "{}",
        both(&denied)
    );
    // A set it allows.
    let allowed = op(
        &url,
        &[
            "set",
            "org.cbus.Test",
            "/org/cbus/Test",
            "String",
            "hunter2",
        ],
    );
    assert!(allowed.status.success(), "{}", both(&allowed));

    let list = entries(&url, &[], 2);
    println!("audit entries: {list:#?}");
    assert_eq!(list.len(), 2, "{list:?}");
    let call = &list[0];
    assert_eq!(call["op"], "call");
    assert_eq!(call["machine"], nkey.as_str());
    assert_eq!(call["nkey"], nkey.as_str());
    assert_eq!(call["hostname"], "audited");
    assert_eq!(call["destination"], "org.cbus.Test");
    assert_eq!(call["path"], "/org/cbus/Test");
    assert_eq!(call["member"], "EmitOne");
    assert_eq!(call["interface"], "org.cbus.Test1");
    assert_eq!(call["policy"], "denied");
    assert_eq!(call["result"], "access-denied");
    assert_eq!(call["broadcast"], false);
    assert!(call["requester"].as_str().unwrap().contains('@'), "{call}");
    assert!(
        call["reply_to"].as_str().unwrap().starts_with("_INBOX."),
        "{call}"
    );
    assert_eq!(call["args_bytes"], secret.len());
    assert_eq!(call["args_sha256"], sha256_hex(secret.as_bytes()));
    let set = &list[1];
    assert_eq!(
        (
            set["op"].as_str(),
            set["policy"].as_str(),
            set["result"].as_str()
        ),
        (Some("set"), Some("allowed"), Some("ok"))
    );
    assert_eq!(set["args_sha256"], sha256_hex(b"\"hunter2\""));
    assert!(set["time_ms"].as_u64() >= call["time_ms"].as_u64());

    // The stream holds no argument text anywhere.
    let raw = op(&url, &["audit", "--json", "--since", "10m"]);
    assert!(!stdout(&raw).contains("do-not-log-me") && !stdout(&raw).contains("hunter2"));

    // Table and simple lines; a selection by host; --limit keeps the newest.
    let table = ok_stdout(&op(&url, &["audit", "--since", "1h"]));
    assert!(table.starts_with("TIME"), "{table}");
    assert!(
        table.lines().any(|l| l.contains("audited")
            && l.contains("denied")
            && l.contains("org.cbus.Test1.EmitOne")),
        "{table}"
    );
    let simple = ok_stdout(&op(&url, &["audit", "-s", "-M", "audited"]));
    assert_eq!(simple.lines().count(), 2, "{simple}");
    assert!(
        simple.lines().nth(1).unwrap().contains("\tset\t"),
        "{simple}"
    );
    let newest = op(&url, &["audit", "--json", "--limit", "1"]);
    let doc = json_of(&newest);
    assert_eq!(doc["entries"].as_array().unwrap().len(), 1);
    assert_eq!(doc["entries"][0]["op"], "set");
    assert_eq!(doc["summary"]["older_not_shown"], 1);
    assert!(stderr(&newest).contains("1 older"), "{}", both(&newest));
    let nobody = op(&url, &["audit", "-M", "nosuch"]);
    assert_eq!(nobody.status.code(), Some(1), "{}", both(&nobody));

    // Only the agent may publish on its audit subject: the operator cannot forge an entry.
    let forged = operator
        .publish(cbus_protocol::subject::audit(&nkey), "{}".into())
        .await;
    operator.flush().await.unwrap();
    drop(forged);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(entries(&url, &[], 3).len(), 2, "a forged entry was stored");
}
