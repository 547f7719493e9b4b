//! The real `cbus` binary against several real agents, each on its own private bus with the
//! test service and its own generated SSH host key: output of every generic command (text,
//! JSON, simple), typed values, targeting, and machines that are silent, crashed or stopped.

use std::time::{Duration, Instant};

use cbus_tests::cli::*;
use cbus_tests::{Agent, NatsServer, PrivateBus, TestService};
use serde_json::json;

const DEST: &str = "org.cbus.Test";
const PATH: &str = "/org/cbus/Test";

/// One machine: a private bus, the test service on it, an agent.
struct Machine {
    agent: Agent,
    svc: TestService,
    _bus: PrivateBus,
}

fn machine(url: &str, host: &str, role: &str) -> Machine {
    let bus = PrivateBus::start();
    let svc = TestService::start(bus.address());
    let agent = Agent::start(
        url,
        bus.address(),
        &[
            "--allow-all",
            "--hostname",
            host,
            "--label",
            &format!("role={role}"),
        ],
    );
    Machine {
        agent,
        svc,
        _bus: bus,
    }
}

fn get(url: &str, extra: &[&str], property: &str) -> std::process::Output {
    let mut args = extra.to_vec();
    args.extend(["get", DEST, PATH, property]);
    cbus(url, &args)
}

#[tokio::test]
async fn values_rendering_and_targeting_over_three_machines() {
    let nats = NatsServer::start();
    let url = nats.url();
    let a = machine(&url, "fan-a", "web");
    let b = machine(&url, "fan-b", "web");
    let _c = machine(&url, "fan-c", "db");
    wait_agents(&nats, 3).await;

    // agents: table, JSON, simple.
    let table = ok_stdout(&cbus(&url, &["agents"]));
    let mut lines = table.lines();
    assert!(
        lines.next().unwrap().starts_with("HOST   NKEY") && table.contains("LAST SEEN"),
        "{table}"
    );
    let first = lines.next().unwrap();
    assert!(
        first.starts_with("fan-a  U") && first.contains(" running ") && first.contains("s ago"),
        "{table}"
    );
    assert!(
        first.contains(&a.agent.nkey) && first.ends_with("role=web"),
        "{table}"
    );
    let doc = json_of(&cbus(&url, &["agents", "--json"]));
    let agents = doc["agents"].as_array().unwrap();
    let hosts: Vec<&str> = agents
        .iter()
        .map(|a| a["hostname"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, vec!["fan-a", "fan-b", "fan-c"]);
    assert!(agents.iter().all(|a| a["state"] == "running"));
    let simple = ok_stdout(&cbus(&url, &["agents", "-s"]));
    assert!(
        simple.starts_with(&format!("fan-a\t{}\trunning\t", a.agent.nkey)),
        "{simple}"
    );

    // get: human table, sorted by host, strings bare.
    assert_eq!(
        ok_stdout(&get(&url, &[], "org.cbus.Test1.String")),
        "HOST   VALUE\nfan-a  hello\nfan-b  hello\nfan-c  hello\n"
    );
    // JSON: typed per the codec, and the fan-out returns as soon as all answered.
    let started = Instant::now();
    let out = get(&url, &["--timeout", "20s", "--json"], "UInt64");
    let wall = started.elapsed();
    let doc = json_of(&out);
    assert!(out.status.success(), "{}", both(&out));
    for r in doc["results"].as_array().unwrap() {
        assert_eq!(r["ok"], true);
        assert_eq!(r["status"], "ok");
        assert_eq!(r["signature"], "t");
        assert_eq!(r["value"], "18446744073709551615");
        assert!(r["nkey"].as_str().unwrap().starts_with('U'));
    }
    let s = &doc["summary"];
    assert_eq!(
        (s["targets"].as_u64(), s["ok"].as_u64()),
        (Some(3), Some(3))
    );
    assert_eq!(s["not_ok"], json!([]));
    assert_eq!(s["timeout_ms"], 20000);
    assert!(s["elapsed_ms"].as_u64().unwrap() < 10_000, "{s}");
    assert!(wall < Duration::from_secs(10), "took {wall:?}");

    // Readable values: bytes decoded when printable, variants as their value.
    assert_eq!(
        ok_stdout(&get(&url, &["-s", "--hosts", "fan-a"], "Bytes")),
        "fan-a\tAAEC/w==\n"
    );
    ok_stdout(&cbus(
        &url,
        &[
            "--hosts",
            "fan-a",
            "set",
            DEST,
            PATH,
            "Bytes",
            "\"aGVsbG8=\"",
        ],
    ));
    assert_eq!(
        ok_stdout(&get(&url, &["-s", "-M", "fan-a"], "Bytes")),
        "fan-a\thello\n"
    );
    assert_eq!(
        result_of(
            &json_of(&get(&url, &["--json", "-M", "fan-a"], "Bytes")),
            "fan-a"
        )["value"],
        "aGVsbG8="
    );
    assert_eq!(
        ok_stdout(&get(&url, &["-s", "-M", "fan-a"], "Dict")),
        "fan-a\t{\"answer\":42,\"name\":\"cbus\"}\n"
    );
    assert_eq!(
        result_of(
            &json_of(&get(&url, &["--json", "-M", "fan-a"], "Dict")),
            "fan-a"
        )["value"],
        json!({"answer": {"t": "u", "v": 42}, "name": {"t": "s", "v": "cbus"}})
    );
    assert_eq!(
        ok_stdout(&get(&url, &["-s", "-M", "fan-a"], "Variant")),
        "fan-a\t3\n"
    );
    assert_eq!(
        ok_stdout(&get(&url, &["-s", "-M", "fan-a"], "Struct")),
        "fan-a\t[\"s\",1,true]\n"
    );

    // Targeting by nkey, host glob and label; set with a bare word and with JSON.
    let out = cbus(
        &url,
        &[
            "--nkeys",
            &b.agent.nkey,
            "-s",
            "set",
            DEST,
            PATH,
            "String",
            "bye",
        ],
    );
    assert_eq!(ok_stdout(&out), "fan-b\tok\n");
    assert_eq!(
        ok_stdout(&get(&url, &["-s"], "String")),
        "fan-a\thello\nfan-b\tbye\nfan-c\thello\n"
    );
    ok_stdout(&cbus(
        &url,
        &["--labels", "role=db", "set", DEST, PATH, "Int32", "41"],
    ));
    assert_eq!(
        ok_stdout(&get(&url, &["-s"], "Int32")),
        "fan-a\t-32\nfan-b\t-32\nfan-c\t41\n"
    );
    let out = cbus(
        &url,
        &[
            "--hosts", "fan-[ab]", "-s", "invoke", DEST, PATH, "Add", "[1,2]",
        ],
    );
    assert_eq!(ok_stdout(&out), "fan-a\t3\nfan-b\t3\n");
    let out = cbus(
        &url,
        &[
            "-M",
            "fan-c",
            "-s",
            "call",
            DEST,
            PATH,
            "org.cbus.Test1.Concat",
            "[[\"a\",\"b\"]]",
            "--sig",
            "as",
        ],
    );
    assert_eq!(ok_stdout(&out), "fan-c\tab\n");
    let out = cbus(&url, &["--labels", "role=web,nope=x", "agents"]);
    assert_eq!(out.status.code(), Some(1));
    let out = get(&url, &["--hosts", "nomatch*"], "String");
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    assert!(
        stderr(&out).contains("no machines match the selection (3 agent(s) known"),
        "{}",
        both(&out)
    );
    assert!(stdout(&out).is_empty());

    // Per-machine errors: exit 1, the error shown per machine, machines named.
    let out = cbus(&url, &["invoke", DEST, PATH, "Ping"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("ambiguous"), "{}", both(&out));
    let out = cbus(
        &url,
        &["invoke", DEST, PATH, "Fail", "[\"boom\"]", "--json"],
    );
    assert_eq!(out.status.code(), Some(1));
    let doc = json_of(&out);
    let r = result_of(&doc, "fan-b");
    assert_eq!(
        (r["ok"].clone(), r["status"].clone()),
        (json!(false), json!("failed"))
    );
    assert_eq!(r["error"]["dbus_name"], "org.cbus.Test.Error.Failed");
    assert_eq!(r["error"]["message"], "boom");
    assert_eq!(doc["summary"]["failed"], 3);
    assert!(
        stderr(&out).contains("3 of 3 machine(s) did not succeed; failed: fan-a, fan-b, fan-c"),
        "{}",
        both(&out)
    );

    // getall, one interface or all.
    let text = ok_stdout(&cbus(
        &url,
        &["-M", "fan-a", "-s", "getall", DEST, PATH, "org.cbus.Test1"],
    ));
    assert!(
        text.contains("fan-a\tVersion\t1.0\n") && text.contains("fan-a\tUInt32\t32\n"),
        "{text}"
    );
    let text = ok_stdout(&cbus(&url, &["-M", "fan-a", "getall", DEST, PATH]));
    assert!(text.starts_with("HOST   PROPERTY"), "{text}");
    assert!(text.contains("org.cbus.Test1.Version"), "{text}");
    let doc = json_of(&cbus(
        &url,
        &[
            "-M",
            "fan-a",
            "--json",
            "getall",
            DEST,
            PATH,
            "org.cbus.Test1",
        ],
    ));
    assert_eq!(
        result_of(&doc, "fan-a")["value"]["Int16"],
        json!({"t": "n", "v": -16})
    );

    // introspect: one help page for the machines that agree.
    let page = ok_stdout(&cbus(&url, &["introspect", DEST, PATH]));
    for expected in [
        "org.cbus.Test /org/cbus/Test  (on fan-a, fan-b, fan-c)\n",
        "interface org.cbus.Test1\n  methods:\n",
        "    Add(i a, i b) -> (i)\n",
        "    Tick(u n, s text)\n",
        "  properties:\n",
        "children:\n  /org/cbus/Test/child1\n",
        "usage:\n  cbus get org.cbus.Test /org/cbus/Test org.cbus.Test1.",
    ] {
        assert!(page.contains(expected), "missing {expected:?} in\n{page}");
    }
    assert!(
        page.lines().any(|l| l.trim_start().starts_with("UInt64")
            && l.contains("t (uint64)")
            && l.ends_with("readwrite")),
        "{page}"
    );
    let xml = ok_stdout(&cbus(
        &url,
        &["-M", "fan-a", "introspect", DEST, PATH, "--xml"],
    ));
    assert!(xml.contains("<interface name=\"org.cbus.Test1\">"), "{xml}");
    let simple = ok_stdout(&cbus(
        &url,
        &["-M", "fan-a", "-s", "introspect", DEST, PATH],
    ));
    assert!(
        simple.contains("fan-a\tmethod\torg.cbus.Test1.Add\tii\ti\n"),
        "{simple}"
    );
    assert!(
        simple.contains("fan-a\tproperty\torg.cbus.Test1.String\ts\treadwrite\n"),
        "{simple}"
    );
    assert!(simple.contains("fan-a\tchild\tchild1\n"), "{simple}");

    // names: well-known names per machine; --all adds unique names.
    let text = ok_stdout(&cbus(&url, &["names", "-s"]));
    for host in ["fan-a", "fan-b", "fan-c"] {
        assert!(
            text.contains(&format!("{host}\torg.cbus.Test\t:")),
            "{text}"
        );
    }
    assert!(!text
        .lines()
        .any(|l| l.split('\t').nth(1).is_some_and(|n| n.starts_with(':'))));
    let all = ok_stdout(&cbus(&url, &["-M", "fan-a", "names", "--all", "-s"]));
    assert!(all.lines().any(|l| l.starts_with("fan-a\t:")), "{all}");
    let doc = json_of(&cbus(&url, &["-M", "fan-a", "names", "--json"]));
    assert_eq!(result_of(&doc, "fan-a")["signature"], "a{ss}");
}

fn signal(agent: &Agent, sig: i32) {
    let pid = agent.pid().expect("agent running") as i32;
    // SAFETY: sending a signal to a child process we started.
    unsafe {
        libc::kill(pid, sig);
    }
}

#[tokio::test]
async fn silent_crashed_and_stopped_machines_are_named() {
    let nats = NatsServer::start();
    let url = nats.url();
    let mut a = machine(&url, "sil-a", "x");
    let b = machine(&url, "sil-b", "x");
    let mut c = machine(&url, "sil-c", "x");
    wait_agents(&nats, 3).await;

    // A frozen agent keeps its NATS subscription but never answers: timed out, by name, and
    // the command returns at the timeout, not later (--no-grace: the grace is tested below).
    b.agent.freeze();
    let started = Instant::now();
    let out = get(&url, &["--timeout", "1s", "--no-grace", "--json"], "String");
    let wall = started.elapsed();
    signal(&b.agent, libc::SIGCONT);
    assert_eq!(out.status.code(), Some(3), "{}", both(&out));
    let doc = json_of(&out);
    let r = result_of(&doc, "sil-b");
    assert_eq!(r["status"], "timed-out");
    assert_eq!(r["ok"], false);
    assert_eq!(r["error"]["code"], "timeout");
    assert_eq!(result_of(&doc, "sil-a")["value"], "hello");
    assert_eq!(doc["summary"]["timed-out"], 1);
    assert_eq!(doc["summary"]["not_ok"][0]["host"], "sil-b");
    assert!(
        wall >= Duration::from_secs(1) && wall < Duration::from_secs(5),
        "{wall:?}"
    );
    assert!(
        stderr(&out).contains("1 of 3 machine(s) did not succeed; timed out after 1s: sil-b"),
        "{}",
        both(&out)
    );

    // A crashed agent (SIGKILL, no goodbye): not connected, known at once.
    c.agent.kill();
    let started = Instant::now();
    let out = get(&url, &["--timeout", "10s"], "String");
    let wall = started.elapsed();
    assert_eq!(out.status.code(), Some(3), "{}", both(&out));
    assert!(wall < Duration::from_secs(5), "{wall:?}");
    let text = stdout(&out);
    assert!(
        text.contains("sil-a  hello") && text.contains("sil-b  hello"),
        "{text}"
    );
    assert!(text.contains("sil-c  not connected"), "{text}");
    assert!(
        stderr(&out).contains("not connected: sil-c"),
        "{}",
        both(&out)
    );
    // Its heartbeats stop: the registry turns it unresponsive (3 x 500 ms).
    let ok = cbus_tests::wait_for(Duration::from_secs(10), || async {
        let doc = json_of(&cbus(&url, &["agents", "--json"]));
        doc["agents"][2]["state"] == "unresponsive"
    })
    .await;
    assert!(ok, "sil-c never became unresponsive");
    assert!(ok_stdout(&cbus(&url, &["agents"])).contains(" unresponsive "));

    // A stopped agent (SIGTERM: goodbye) is reported stopped and not asked.
    a.agent.stop();
    let out = get(&url, &["--json"], "String");
    assert_eq!(out.status.code(), Some(3), "{}", both(&out));
    let doc = json_of(&out);
    assert_eq!(result_of(&doc, "sil-a")["status"], "stopped");
    assert_eq!(result_of(&doc, "sil-b")["status"], "ok");
    let doc = json_of(&cbus(&url, &["agents", "--json"]));
    assert_eq!(doc["agents"][0]["state"], "stopped");
    // Targeting only the live machine succeeds.
    assert_eq!(
        ok_stdout(&get(&url, &["-s", "-M", "sil-b"], "String")),
        "sil-b\thello\n"
    );
}

/// A machine frozen long enough for the registry to call it unresponsive (SIGSTOP: a hung host)
/// is reported at once, with its silence, and not waited for; `--ask-unresponsive` asks it.
#[tokio::test]
async fn an_unresponsive_machine_is_reported_at_once() {
    let nats = NatsServer::start();
    let url = nats.url();
    let _a = machine(&url, "frz-a", "x");
    let b = machine(&url, "frz-b", "x");
    let _c = machine(&url, "frz-c", "x");
    wait_agents(&nats, 3).await;

    // 500 ms heartbeats: unresponsive more than 3 intervals after the last heartbeat, so 1 to
    // 1.5 s after the freeze (plus a registry read).
    b.agent.freeze();
    let frozen = Instant::now();
    let ok = cbus_tests::wait_for(Duration::from_secs(10), || async {
        let doc = json_of(&cbus(&url, &["agents", "--json"]));
        doc["agents"][1]["state"] == "unresponsive"
    })
    .await;
    let noticed = frozen.elapsed();
    println!("frz-b unresponsive {noticed:?} after SIGSTOP (heartbeat 500ms)");
    assert!(ok, "frz-b never became unresponsive");
    assert!(
        noticed >= Duration::from_millis(900) && noticed < Duration::from_millis(2500),
        "unresponsive {noticed:?} after the freeze; 3 heartbeats are 1.5s"
    );

    // Not asked: the get returns far below its timeout, naming it with its silence; exit 3.
    let started = Instant::now();
    let out = get(&url, &["--timeout", "10s"], "String");
    let wall = started.elapsed();
    println!("get --timeout 10s with frz-b unresponsive: {wall:?}");
    assert_eq!(out.status.code(), Some(3), "{}", both(&out));
    assert!(wall < Duration::from_secs(3), "{wall:?}");
    let text = stdout(&out);
    let row = text.lines().find(|l| l.starts_with("frz-b")).unwrap_or("");
    assert!(
        row.starts_with("frz-b  unresponsive (silent ") && row.ends_with("s)"),
        "{text}"
    );
    assert!(
        text.contains("frz-a  hello") && text.contains("frz-c  hello"),
        "{text}"
    );
    assert!(
        stderr(&out)
            .contains("1 of 3 machine(s) did not succeed; unresponsive, not asked: frz-b (silent "),
        "{}",
        both(&out)
    );
    let out = get(&url, &["--timeout", "10s", "-s"], "String");
    assert_eq!(out.status.code(), Some(3), "{}", both(&out));
    assert!(
        stdout(&out).contains("frz-b\tunresponsive (silent "),
        "{}",
        both(&out)
    );
    let out = get(&url, &["--timeout", "10s", "--json"], "String");
    assert_eq!(out.status.code(), Some(3), "{}", both(&out));
    let doc = json_of(&out);
    let r = result_of(&doc, "frz-b");
    assert_eq!(
        (
            r["status"].clone(),
            r["ok"].clone(),
            r["error"]["code"].clone()
        ),
        (json!("unresponsive"), json!(false), json!("timeout")),
        "{r}"
    );
    assert!(r["silent_ms"].as_u64().unwrap() > 1500, "{r}");
    assert_eq!(doc["summary"]["unresponsive"], 1);
    assert_eq!(doc["summary"]["ok"], 2);
    assert!(
        doc["summary"]["elapsed_ms"].as_u64().unwrap() < 3000,
        "{doc}"
    );

    // Asked anyway: it is timed out, after the grace (the others answered) ...
    let started = Instant::now();
    let out = get(
        &url,
        &["--timeout", "10s", "--ask-unresponsive", "--json"],
        "String",
    );
    let wall = started.elapsed();
    println!("get --ask-unresponsive --timeout 10s: {wall:?}");
    assert_eq!(out.status.code(), Some(3), "{}", both(&out));
    let r = result_of(&json_of(&out), "frz-b");
    assert_eq!(r["status"], "timed-out", "{r}");
    assert!(wall < Duration::from_secs(3), "{wall:?}");
    // ... or, without the grace, at the timeout.
    let started = Instant::now();
    let out = get(
        &url,
        &["--timeout", "2s", "--ask-unresponsive", "--no-grace"],
        "String",
    );
    let wall = started.elapsed();
    println!("get --ask-unresponsive --no-grace --timeout 2s: {wall:?}");
    assert_eq!(out.status.code(), Some(3), "{}", both(&out));
    assert!(
        stdout(&out).contains("frz-b  no answer within 2s"),
        "{}",
        both(&out)
    );
    assert!(
        wall >= Duration::from_secs(2) && wall < Duration::from_secs(6),
        "{wall:?}"
    );

    // Thawed, it heartbeats again and answers: exit 0.
    signal(&b.agent, libc::SIGCONT);
    let ok = cbus_tests::wait_for(Duration::from_secs(10), || async {
        get(&url, &["--timeout", "2s"], "String").status.code() == Some(0)
    })
    .await;
    assert!(ok, "frz-b did not come back");
}

/// The fan-out's elapsed ms of a `get --json` in which `host` timed out after the others had
/// answered, for the reason `why` (the grace, or the liveness probe).
fn timed_out_for(out: &std::process::Output, host: &str, why: &str) -> u64 {
    let doc = json_of(out);
    let r = result_of(&doc, host);
    assert_eq!(r["status"], "timed-out", "{r}");
    let message = r["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("the others had answered; {why}")),
        "{r}"
    );
    doc["summary"]["elapsed_ms"].as_u64().expect("elapsed_ms")
}

/// A machine that freezes while the registry still says running (5 s heartbeats, frozen right
/// after one) is asked, stays silent, is probed, and is cut off when it is silent to the probe
/// too: before the grace's second, far from --timeout. A machine alive but slow (its agent
/// answers the probe while its D-Bus service hangs) is held to the grace instead.
#[tokio::test]
async fn a_machine_frozen_mid_query_holds_the_others_only_for_the_grace() {
    let nats = NatsServer::start();
    let url = nats.url();
    let slow_beat = |host: &str| {
        let bus = PrivateBus::start();
        let svc = TestService::start(bus.address());
        let agent = Agent::start(
            &url,
            bus.address(),
            &["--allow-all", "--hostname", host, "--heartbeat", "5s"],
        );
        Machine {
            agent,
            svc,
            _bus: bus,
        }
    };
    let _a = slow_beat("mid-a");
    let b = slow_beat("mid-b");
    let _c = slow_beat("mid-c");
    wait_agents(&nats, 3).await;
    // Each machine answers first, so all three are live when the freeze comes.
    assert_eq!(
        get(&url, &["--timeout", "10s"], "String").status.code(),
        Some(0)
    );
    // Each agent states its round trip right after its hello (no heartbeat later), so the probe
    // sizes its window by it (module `probe`), not by the wide window for agents that state none.
    let stated = cbus_tests::wait_for(Duration::from_secs(3), || async {
        let doc = json_of(&cbus(&url, &["agents", "--json"]));
        doc["agents"].as_array().is_some_and(|a| {
            a.len() == 3
                && a.iter()
                    .all(|m| m["rtt_ms"].as_u64().is_some_and(u64::is_power_of_two))
        })
    })
    .await;
    assert!(stated, "an agent states no round trip");

    b.agent.freeze();
    let doc = json_of(&cbus(&url, &["agents", "--json"]));
    assert_eq!(doc["agents"][1]["hostname"], "mid-b");
    assert_eq!(doc["agents"][1]["state"], "running", "{doc}");
    let started = Instant::now();
    let out = get(&url, &["--timeout", "10s", "--json"], "String");
    let wall = started.elapsed();
    println!("get --timeout 10s with mid-b frozen mid-query: {wall:?}");
    assert_eq!(out.status.code(), Some(3), "{}", both(&out));
    let elapsed = timed_out_for(&out, "mid-b", "silent to a liveness probe too");
    let doc = json_of(&out);
    assert_eq!(result_of(&doc, "mid-a")["value"], "hello");
    assert_eq!(result_of(&doc, "mid-c")["value"], "hello");
    println!("fan-out elapsed_ms {elapsed}");
    // The probe, not the grace (at least GRACE_MIN after the last answer), ended it.
    assert!(
        elapsed < cbus_client::fleet::GRACE_MIN.as_millis() as u64,
        "{doc}"
    );
    assert!(wall < Duration::from_secs(3), "{wall:?}");
    assert!(
        stderr(&out).contains("1 of 3 machine(s) did not succeed; timed out after "),
        "{}",
        both(&out)
    );
    // Without the grace (and so without the probe), the same get waits its timeout.
    let started = Instant::now();
    let out = get(&url, &["--timeout", "2s", "--no-grace"], "String");
    let wall = started.elapsed();
    assert_eq!(out.status.code(), Some(3), "{}", both(&out));
    assert!(wall >= Duration::from_secs(2), "{wall:?}");
    signal(&b.agent, libc::SIGCONT);

    // Alive but slow: the agent runs and answers the probe, its D-Bus service hangs. The probe
    // must not cut it off; the grace does, as it would without probes.
    cbus_tests::procs::freeze(b.svc.pid());
    let out = get(&url, &["--timeout", "10s", "--json"], "String");
    let elapsed = timed_out_for(&out, "mid-b", "grace ended");
    println!("alive but slow: fan-out elapsed_ms {elapsed}");
    assert!(
        (cbus_client::fleet::GRACE_MIN.as_millis() as u64..5_000).contains(&elapsed),
        "{}",
        both(&out)
    );
    // SAFETY: sending a signal to a child process we started.
    unsafe {
        libc::kill(b.svc.pid() as i32, libc::SIGCONT);
    }
}

/// Without JetStream, cbus learns the fleet by ping and still works.
#[tokio::test]
async fn plain_nats_without_jetstream() {
    let server = NatsServer::start_plain();
    let url = server.url();
    let _m = machine(&url, "plain-a", "x");
    let ok = cbus_tests::wait_for(Duration::from_secs(15), || async {
        cbus(&url, &["agents", "-s"]).status.success()
    })
    .await;
    assert!(ok, "agent never answered a ping");
    let out = get(&url, &["-s"], "String");
    assert_eq!(ok_stdout(&out), "plain-a\thello\n");
    // Without JetStream a ping is the only way to know the fleet: nothing to warn of.
    assert!(!stderr(&out).contains("warning"), "{}", both(&out));
}

/// A registry that exists but cannot be read (here: a user whose permissions leave out the
/// registry's stream, as a misconfigured deployment would): the machines come from a ping, and
/// cbus says so on stderr and exits 3, as some machines may be missing; never "all ok".
#[tokio::test]
async fn a_registry_that_cannot_be_read_is_said_and_exits_3() {
    let server = NatsServer::start_with_config(
        "authorization { users = [\n\
         { user: agent, password: agentpw }\n\
         { user: limited, password: limitedpw, permissions: { publish: { deny: \
         [\"$JS.API.STREAM.INFO.KV_cbus-agents\", \"$JS.API.CONSUMER.>\"] } } }\n] }",
    );
    let url = server.url();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let _agent = Agent::start(
        &url,
        bus.address(),
        &[
            "--allow-all",
            "--hostname",
            "unread-a",
            "--user",
            "agent",
            "--password",
            "agentpw",
        ],
    );
    let as_agent = |args: &[&str]| {
        cbus(
            &url,
            &[&["--user", "agent", "--password", "agentpw"][..], args].concat(),
        )
    };
    let limited = |args: &[&str]| {
        cbus(
            &url,
            &[&["--user", "limited", "--password", "limitedpw"][..], args].concat(),
        )
    };
    let registered = cbus_tests::wait_for(Duration::from_secs(15), || async {
        stdout(&as_agent(&["agents", "-s"])).contains("unread-a")
    })
    .await;
    assert!(registered, "the agent never registered");

    let out = limited(&["agents", "-s", "--timeout", "2s"]);
    assert_eq!(out.status.code(), Some(3), "{}", both(&out));
    assert!(stdout(&out).starts_with("unread-a\t"), "{}", both(&out));
    let err = stderr(&out);
    assert!(
        err.contains("cannot read the agent registry") && err.contains("answered a ping"),
        "{err}"
    );
    // A fan-out on such a list: the answers, and exit 3 all the same.
    let out = limited(&["-s", "--timeout", "2s", "get", DEST, PATH, "String"]);
    assert_eq!(out.status.code(), Some(3), "{}", both(&out));
    assert_eq!(stdout(&out), "unread-a\thello\n", "{}", both(&out));
    // The same machines through a user that may read the registry: no warning, exit 0.
    let out = as_agent(&["agents", "-s"]);
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    assert!(!stderr(&out).contains("warning"), "{}", both(&out));
}

#[tokio::test]
async fn group_folds_identical_answers_and_counts_outcomes() {
    let nats = NatsServer::start();
    let url = nats.url();
    let _a = machine(&url, "grp-a", "x");
    let b = machine(&url, "grp-b", "x");
    let _c = machine(&url, "grp-c", "x");
    wait_agents(&nats, 3).await;

    let out = get(&url, &["--group"], "String");
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    assert_eq!(stdout(&out), "hello: 3 machines: grp-a, grp-b, grp-c\n");
    assert!(stderr(&out).contains("3 machines: 3 ok"), "{}", both(&out));

    // A machine that stops answering is its own group, named; the count says how it ended.
    b.agent.freeze();
    let out = get(
        &url,
        &["--group", "--timeout", "1s", "--no-grace"],
        "String",
    );
    assert_eq!(out.status.code(), Some(3), "{}", both(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "hello: 2 machines: grp-a, grp-c", "{text}");
    assert!(
        lines[1].ends_with(": 1 machine: grp-b") && lines.len() == 2,
        "{text}"
    );
    assert!(
        stderr(&out).contains("3 machines: 2 ok, 1 timed-out"),
        "{}",
        both(&out)
    );
    signal(&b.agent, libc::SIGCONT);

    // -s and --json stay one record per machine; --group with either is a usage error.
    assert_eq!(stdout(&get(&url, &["-s"], "String")).lines().count(), 3);
    assert_eq!(
        get(&url, &["--group", "-s"], "String").status.code(),
        Some(2)
    );
}
