//! Maintenance marks end to end, on a real nats-server with the deployment's permissions: real
//! agents on private buses, the real `cbus` as the operator and a real gateway as the gateway
//! user. A frozen machine under maintenance makes no fan-out wait or fail, is shown as such by
//! `cbus agents` and `/metrics`, and only operators can mark machines.

use std::process::Output;
use std::time::Duration;

use async_nats::jetstream;
use cbus_client::fleet;
use cbus_protocol::maintenance::MAINTENANCE_BUCKET;
use cbus_tests::cli::*;
use cbus_tests::gateway::{http_get, GatewayProcess, GatewayStart};
use cbus_tests::{wait_for, Agent, NatsServer, PrivateBus, TestService};

const OPERATOR_PW: &str = "op-secret";
const GATEWAY_PW: &str = "gw-secret";
const DEST: &str = "org.cbus.Test";
const PATH: &str = "/org/cbus/Test";

struct Machine {
    agent: Agent,
    key: std::path::PathBuf,
    _dir: tempfile::TempDir,
    _svc: TestService,
    _bus: PrivateBus,
}

fn host_key() -> (tempfile::TempDir, std::path::PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let key = cbus_tests::agent::generate_host_key(dir.path());
    let nkey = cbus_protocol::nkey::from_ssh_host_key(&key)
        .unwrap()
        .public_key();
    (dir, key, nkey)
}

fn start(url: &str, host: &str, dir: tempfile::TempDir, key: std::path::PathBuf) -> Machine {
    let bus = PrivateBus::start();
    let svc = TestService::start(bus.address());
    let agent = Agent::start_with_key(
        url,
        bus.address(),
        &key,
        &["--nats-nkey-auth", "--hostname", host],
    );
    Machine {
        agent,
        key,
        _dir: dir,
        _svc: svc,
        _bus: bus,
    }
}

/// `cbus` as the operator.
fn op(url: &str, args: &[&str]) -> Output {
    let mut all = vec!["--user", "operator", "--password", OPERATOR_PW];
    all.extend_from_slice(args);
    cbus(url, &all)
}

fn signal(agent: &Agent, sig: i32) {
    let pid = agent.pid().expect("agent runs") as i32;
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(pid, sig) };
}

fn metric(port: u16, host: &str) -> Option<String> {
    let text = http_get(port, "/metrics")?;
    let prefix = format!("cbus_agent_maintenance{{host=\"{host}\",");
    text.lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit(' ').next())
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_under_maintenance_never_stalls_or_fails_a_fan_out() {
    let keys = [host_key(), host_key(), host_key()];
    let nkeys: Vec<&str> = keys.iter().map(|(_, _, n)| n.as_str()).collect();
    let nats = NatsServer::start_with_config(&cbus_tests::nats::deployment_authorization(
        &nkeys,
        OPERATOR_PW,
        GATEWAY_PW,
    ));
    let url = nats.url();
    // The gateway creates the registry (agents may not), and follows the marks.
    let gw = GatewayProcess::start_with(GatewayStart {
        nats_url: &url,
        token: Some("t"),
        env: &[("NATS_USER", "gateway"), ("NATS_PASSWORD", GATEWAY_PW)],
        ..Default::default()
    });
    let [(da, ka, na), (db, kb, nb), (dc, kc, nc)] = keys;
    let a = start(&url, "mt-a", da, ka);
    let b = start(&url, "mt-b", db, kb);
    let _c = start(&url, "mt-c", dc, kc);
    let operator =
        async_nats::ConnectOptions::with_user_and_password("operator".into(), OPERATOR_PW.into())
            .connect(&url)
            .await
            .unwrap();
    let fleet = fleet::Fleet::new(operator.clone(), "test@maintenance");
    for n in [&na, &nb, &nc] {
        cbus_tests::ask::wait_registered(&fleet, n).await;
    }

    // Usage errors before anything is sent: no selection, a reason that would forge rows.
    let none = op(&url, &["maintenance", "on"]);
    assert_eq!(none.status.code(), Some(2), "{}", both(&none));
    assert!(
        stderr(&none).contains("name the machines"),
        "{}",
        both(&none)
    );
    let forged = op(
        &url,
        &["maintenance", "on", "mt-b", "--reason", "x\nmt-a  running"],
    );
    assert_eq!(forged.status.code(), Some(2), "{}", both(&forged));

    // A frozen machine without a mark: named, and the command says some were unreachable.
    signal(&b.agent, libc::SIGSTOP);
    let get = |extra: &[&str]| {
        let mut args = extra.to_vec();
        args.extend(["--json", "get", DEST, PATH, "Byte"]);
        op(&url, &args)
    };
    let frozen = get(&[]);
    assert_eq!(frozen.status.code(), Some(3), "{}", both(&frozen));
    let silent = |o: &Output| {
        let status = result_of(&json_of(o), "mt-b")["status"].clone();
        status == "timed-out" || status == "unresponsive"
    };
    assert!(silent(&frozen), "{}", both(&frozen));

    // Marked: not asked, shown with its reason, and the command succeeds.
    let on = op(
        &url,
        &[
            "maintenance",
            "on",
            "mt-b",
            "--reason",
            "disk swap",
            "--for",
            "1h",
        ],
    );
    assert!(on.status.success(), "{}", both(&on));
    assert!(
        stdout(&on).contains("maintenance (disk swap; "),
        "{}",
        both(&on)
    );
    let marked = get(&[]);
    assert_eq!(marked.status.code(), Some(0), "{}", both(&marked));
    let doc = json_of(&marked);
    let rb = result_of(&doc, "mt-b");
    assert_eq!(rb["status"], "maintenance", "{doc}");
    assert_eq!(rb["maintenance"]["reason"], "disk swap", "{doc}");
    assert_eq!(
        rb["maintenance"]["by"].as_str().map(|s| s.contains('@')),
        Some(true)
    );
    assert_eq!(result_of(&doc, "mt-a")["status"], "ok", "{doc}");
    assert_eq!(doc["summary"]["maintenance"], 1, "{doc}");
    // The text form names it too.
    let text = op(&url, &["get", DEST, PATH, "Byte"]);
    assert!(text.status.success(), "{}", both(&text));
    assert!(
        stdout(&text)
            .lines()
            .any(|l| l.starts_with("mt-b") && l.contains("maintenance (disk swap; ")),
        "{}",
        both(&text)
    );

    // --ask-maintenance asks it like any other: frozen, it is silent (and, by now,
    // unresponsive: --ask-unresponsive too, so that it is asked and waited for).
    let asked = get(&["--ask-maintenance", "--ask-unresponsive"]);
    assert_eq!(asked.status.code(), Some(3), "{}", both(&asked));
    assert_eq!(
        result_of(&json_of(&asked), "mt-b")["status"],
        "timed-out",
        "{}",
        both(&asked)
    );

    // cbus agents and maintenance list show the mark.
    let agents = ok_stdout(&op(&url, &["agents"]));
    let row = agents.lines().find(|l| l.starts_with("mt-b")).unwrap();
    assert!(
        row.contains("maintenance (") && row.contains("disk swap"),
        "{agents}"
    );
    assert!(agents.lines().next().unwrap().ends_with("NOTE"), "{agents}");
    let list = json_of(&op(&url, &["--json", "maintenance", "list"]));
    let machines = list["machines"].as_array().unwrap();
    assert_eq!(machines.len(), 1, "{list}");
    assert_eq!(machines[0]["host"], "mt-b");
    assert_eq!(machines[0]["nkey"], nb.as_str());

    // The gateway shows it on /metrics, for alert rules to leave out.
    let port = gw.port;
    assert!(
        wait_for(Duration::from_secs(15), || async {
            metric(port, "mt-b").as_deref() == Some("1")
        })
        .await,
        "cbus_agent_maintenance of mt-b never 1: {:?}",
        http_get(port, "/metrics")
    );
    assert_eq!(metric(port, "mt-a").as_deref(), Some("0"));

    // Only operators mark machines: an agent's own key, and the gateway, are refused by the
    // server, and the mark stays as it was.
    let (evil, mut errors) = {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let seed = cbus_protocol::nkey::from_ssh_host_key(&a.key)
            .unwrap()
            .seed()
            .unwrap();
        let client = async_nats::ConnectOptions::with_nkey(seed)
            .custom_inbox_prefix(cbus_protocol::permissions::agent_inbox_prefix(&na))
            .event_callback(move |e| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(e.to_string());
                }
            })
            .connect(&url)
            .await
            .unwrap();
        (client, rx)
    };
    for subject in [
        format!("$KV.{MAINTENANCE_BUCKET}.{na}"),
        format!("$KV.{MAINTENANCE_BUCKET}.{nb}"),
        format!("$JS.API.STREAM.PURGE.KV_{MAINTENANCE_BUCKET}"),
    ] {
        evil.publish(subject.clone(), "{}".into()).await.unwrap();
        evil.flush().await.unwrap();
        let mut hit = false;
        while let Ok(Some(e)) = tokio::time::timeout(Duration::from_secs(5), errors.recv()).await {
            if e.to_lowercase().contains("permissions violation") && e.contains(&subject) {
                hit = true;
                break;
            }
        }
        assert!(hit, "an agent published {subject}");
    }
    let gateway_user =
        async_nats::ConnectOptions::with_user_and_password("gateway".into(), GATEWAY_PW.into())
            .connect(&url)
            .await
            .unwrap();
    let refused = jetstream::new(gateway_user)
        .publish(format!("$KV.{MAINTENANCE_BUCKET}.{na}"), "{}".into())
        .await;
    let acked = match refused {
        Ok(ack) => tokio::time::timeout(Duration::from_secs(2), ack)
            .await
            .is_ok_and(|r| r.is_ok()),
        Err(_) => false,
    };
    assert!(!acked, "the gateway wrote a maintenance mark");
    let marks = fleet
        .maintenance_within(Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(marks.keys().collect::<Vec<_>>(), vec![&nb]);

    // A mark that expires ends by itself: mt-c for a second.
    let short = op(&url, &["maintenance", "on", "mt-c", "--for", "1s"]);
    assert!(short.status.success(), "{}", both(&short));
    assert!(
        wait_for(Duration::from_secs(10), || async {
            metric(port, "mt-c").as_deref() == Some("1")
        })
        .await
    );
    assert!(
        wait_for(Duration::from_secs(10), || async {
            metric(port, "mt-c").as_deref() == Some("0")
        })
        .await,
        "the gateway kept an expired mark"
    );
    let agents = json_of(&op(&url, &["--json", "agents", "--hosts", "mt-c"]));
    assert!(agents["agents"][0].get("maintenance").is_none(), "{agents}");

    // Cleared: the frozen machine is waited for (and reported) again; thawed, all is well.
    let off = op(&url, &["maintenance", "off", "mt-b"]);
    assert!(off.status.success(), "{}", both(&off));
    assert!(stdout(&off).contains("cleared"), "{}", both(&off));
    assert_eq!(get(&[]).status.code(), Some(3));
    assert!(
        wait_for(Duration::from_secs(15), || async {
            metric(port, "mt-b").as_deref() == Some("0")
        })
        .await
    );
    signal(&b.agent, libc::SIGCONT);
    assert!(
        wait_for(Duration::from_secs(15), || async {
            get(&[]).status.code() == Some(0)
        })
        .await,
        "the thawed machine never answered again"
    );
    let list = json_of(&op(&url, &["--json", "maintenance", "list"]));
    assert_eq!(list["machines"].as_array().map(Vec::len), Some(0), "{list}");
}
