//! The real `cbus` binary against real agents, a private bus per agent, and a systemd machine.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cbus_protocol::fleet::Fleet;
use cbus_protocol::presence::AgentState;
use cbus_tests::{bin_path, Agent, MachineSpec, NatsServer, PrivateBus, TestService};
use serde_json::{json, Value};

fn cbus(nats: &str, args: &[&str]) -> Output {
    Command::new(bin_path("cbus"))
        .arg("--server")
        .arg(nats)
        .args(args)
        .env("CBUS_CONFIG", "/nonexistent/cbus.toml")
        .output()
        .expect("run cbus")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json_of(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            stdout(o),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

async fn wait_agents(nats: &NatsServer, n: usize) {
    let fleet = Fleet::new(nats.connect().await, "test");
    let ok = cbus_tests::wait_for(Duration::from_secs(20), || async {
        fleet
            .registry()
            .await
            .map(|a| a.iter().filter(|a| a.state == AgentState::Running).count() == n)
            .unwrap_or(false)
    })
    .await;
    assert!(ok, "{n} agents never registered");
}

#[tokio::test]
async fn fan_out_commands_over_two_machines() {
    let nats = NatsServer::start();
    let url = nats.url();
    let (bus_a, bus_b) = (PrivateBus::start(), PrivateBus::start());
    let _svc_a = TestService::start(bus_a.address());
    let _svc_b = TestService::start(bus_b.address());
    let mut a = Agent::start(
        &url,
        bus_a.address(),
        &["--allow-all", "--hostname", "cli-a", "--label", "role=a"],
    );
    let mut b = Agent::start(
        &url,
        bus_b.address(),
        &["--allow-all", "--hostname", "cli-b", "--label", "role=b"],
    );
    wait_agents(&nats, 2).await;

    let out = cbus(&url, &["agents", "--json"]);
    assert!(out.status.success());
    let agents = json_of(&out)["agents"].as_array().unwrap().clone();
    let hosts: Vec<&str> = agents
        .iter()
        .map(|a| a["hostname"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, vec!["cli-a", "cli-b"]);
    assert!(agents.iter().all(|a| a["state"] == "running"));
    let table = stdout(&cbus(&url, &["agents"]));
    assert!(table.starts_with("HOST"), "{table}");
    assert!(
        table.contains(&a.nkey) && table.contains("role=b"),
        "{table}"
    );

    // Returns as soon as both answered, far before the timeout.
    let started = Instant::now();
    let out = cbus(
        &url,
        &[
            "--timeout",
            "20s",
            "get",
            "org.cbus.Test",
            "/org/cbus/Test",
            "UInt64",
            "--json",
        ],
    );
    let elapsed = started.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    let doc = json_of(&out);
    assert_eq!(doc["summary"]["ok"], 2);
    for r in doc["results"].as_array().unwrap() {
        assert_eq!(r["signature"], "t");
        assert_eq!(r["value"], "18446744073709551615");
    }
    let text = stdout(&cbus(
        &url,
        &[
            "get",
            "org.cbus.Test",
            "/org/cbus/Test",
            "org.cbus.Test1.String",
        ],
    ));
    assert_eq!(text, "HOST   VALUE\ncli-a  hello\ncli-b  hello\n");

    // Defaults from the config file: no --server needed.
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("config.toml");
    std::fs::write(&cfg, format!("server = \"{url}\"\n")).unwrap();
    let out = Command::new(bin_path("cbus"))
        .args(["agents", "-s"])
        .env("CBUS_CONFIG", &cfg)
        .env_remove("NATS_URL")
        .output()
        .unwrap();
    assert_eq!(
        stdout(&out).lines().count(),
        2,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&cfg, "sever = \"typo\"\n").unwrap();
    let out = Command::new(bin_path("cbus"))
        .arg("agents")
        .env("CBUS_CONFIG", &cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid config"));

    // Targeting.
    let out = cbus(
        &url,
        &[
            "--hosts",
            "cli-a",
            "-s",
            "invoke",
            "org.cbus.Test",
            "/org/cbus/Test",
            "Add",
            "[1,2]",
        ],
    );
    assert_eq!(stdout(&out), "cli-a\t3\n");
    let out = cbus(
        &url,
        &[
            "--labels",
            "role=b",
            "-s",
            "get",
            "org.cbus.Test",
            "/org/cbus/Test",
            "Int32",
        ],
    );
    assert_eq!(stdout(&out), "cli-b\t-32\n");
    let out = cbus(
        &url,
        &[
            "--nkeys",
            &b.nkey,
            "-s",
            "set",
            "org.cbus.Test",
            "/org/cbus/Test",
            "String",
            "bye",
        ],
    );
    assert!(out.status.success());
    let out = cbus(
        &url,
        &["-s", "get", "org.cbus.Test", "/org/cbus/Test", "String"],
    );
    assert_eq!(stdout(&out), "cli-a\thello\ncli-b\tbye\n");
    let out = cbus(
        &url,
        &[
            "--hosts",
            "nomatch*",
            "get",
            "org.cbus.Test",
            "/org/cbus/Test",
            "String",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no machines match"));

    // Introspection as a help page, getall, names.
    let text = stdout(&cbus(
        &url,
        &[
            "--hosts",
            "cli-a",
            "introspect",
            "org.cbus.Test",
            "/org/cbus/Test",
        ],
    ));
    assert!(text.contains("method   Add(i a, i b) -> (i)"), "{text}");
    assert!(text.contains("property Version s (read)"), "{text}");
    assert!(text.contains("signal   Tick(u n, s text)"), "{text}");
    assert!(text.contains("children: child1"), "{text}");
    let text = stdout(&cbus(
        &url,
        &[
            "--hosts",
            "cli-a",
            "-s",
            "getall",
            "org.cbus.Test",
            "/org/cbus/Test",
            "org.cbus.Test1",
        ],
    ));
    assert!(text.contains("cli-a\tVersion\t1.0"), "{text}");
    let text = stdout(&cbus(&url, &["names", "-s"]));
    assert!(text.contains("cli-a\torg.cbus.Test\t:"), "{text}");

    // Errors per machine: exit 1, error shown.
    let out = cbus(
        &url,
        &[
            "invoke",
            "org.cbus.Test",
            "/org/cbus/Test",
            "Fail",
            "[\"boom\"]",
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        json_of(&out)["results"][0]["error"]["dbus_name"],
        "org.cbus.Test.Error.Failed"
    );

    // Usage errors: exit 2 before anything is sent.
    for args in [
        vec!["invoke", "org.cbus.Test", "/org/cbus/Test", "Add", "[1,"],
        vec!["invoke", "org.cbus.Test", "/org/cbus/Test", "Add", "{}"],
        vec![
            "invoke",
            "org.cbus.Test",
            "/org/cbus/Test",
            "Add",
            "[1,\"x\"]",
            "--sig",
            "ii",
        ],
        vec!["get", "not a name", "/org/cbus/Test", "X"],
        vec!["get", "org.cbus.Test", "relative/path", "X"],
        vec![
            "--timeout",
            "soon",
            "get",
            "org.cbus.Test",
            "/org/cbus/Test",
            "X",
        ],
    ] {
        let out = cbus(&url, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty());
    }

    // A crashed agent (no goodbye) is named as not connected; a stopped one as stopped.
    b.kill();
    let out = cbus(
        &url,
        &["get", "org.cbus.Test", "/org/cbus/Test", "Int32", "--json"],
    );
    assert_eq!(out.status.code(), Some(1));
    let doc = json_of(&out);
    let b_result = doc["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["host"] == "cli-b")
        .unwrap()
        .clone();
    assert!(
        b_result["status"] == "not-connected" || b_result["status"] == "timed-out",
        "{b_result}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("cli-b"));
    a.stop();
    let out = cbus(
        &url,
        &["get", "org.cbus.Test", "/org/cbus/Test", "Int32", "--json"],
    );
    let doc = json_of(&out);
    let a_result = doc["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["host"] == "cli-a")
        .unwrap()
        .clone();
    assert_eq!(a_result["status"], "stopped");
}

#[test]
fn offline_commands_and_unreachable_nats() {
    let out = cbus("nats://127.0.0.1:1", &["agents"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to NATS"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let dir = tempfile::tempdir().unwrap();
    let key = cbus_tests::agent::generate_host_key(dir.path());
    let expected = cbus_protocol::nkey::from_ssh_host_key(&key)
        .unwrap()
        .public_key();
    let pubfile = format!("{}.pub", key.display());
    let out = cbus("nats://127.0.0.1:1", &["nkey", &pubfile]);
    assert_eq!(stdout(&out).trim(), expected);
    let line = std::fs::read_to_string(&pubfile).unwrap();
    let out = cbus("nats://127.0.0.1:1", &["keyscan", "--stdin"]);
    assert_eq!(out.status.code(), Some(1), "no input, no keys");
    let mut child = Command::new(bin_path("cbus"))
        .args(["keyscan", "--stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("web1 {line}").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(stdout(&out), format!("web1\t{expected}\n"));
    let out = cbus(
        "nats://127.0.0.1:1",
        &["nkey", "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC"],
    );
    assert_eq!(out.status.code(), Some(2));

    let out = cbus(
        "x",
        &[
            "subject",
            "get",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1/unit/basic_2etarget",
            "ActiveState",
        ],
    );
    assert_eq!(stdout(&out).trim(), "dbus.broadcast.org_2efreedesktop_2esystemd1.org.freedesktop.systemd1.unit.basic_2etarget.get.ActiveState");
    let out = cbus(
        "x",
        &[
            "subject",
            "signals",
            ":1.1",
            "/org/freedesktop/systemd1/unit",
        ],
    );
    assert_eq!(stdout(&out), "dbus.signals.*._3a1_2e1.org.freedesktop.systemd1.unit\ndbus.signals.*._3a1_2e1.org.freedesktop.systemd1.unit.>\n");

    let out = cbus("x", &["completions", "bash"]);
    assert!(stdout(&out).contains("_cbus()"));
    let out = cbus("x", &["man", dir.path().join("man").to_str().unwrap()]);
    assert!(out.status.success());
    assert!(dir.path().join("man/cbus-invoke.1").exists());
}

const SLEEPER: &str =
    "[Unit]\nDescription=cbus cli sleeper\n[Service]\nExecStart=/bin/sleep infinity\n";

#[tokio::test]
async fn systemd_shortcuts_change_real_units() {
    let nats = NatsServer::start();
    let url = nats.url();
    let machines = tokio::task::spawn_blocking(|| {
        cbus_tests::Fleet::boot(&[
            MachineSpec::new("cli-m1").with_unit("cbus-sleeper.service", SLEEPER)
        ])
    })
    .await
    .unwrap();
    let m = &machines.machines[0];
    let _agent = Agent::start_with_key(
        &url,
        &m.bus_address(),
        &m.host_key_path(),
        &["--allow-all", "--hostname", "cli-m1"],
    );
    wait_agents(&nats, 1).await;

    let out = cbus(&url, &["start", "cbus-sleeper.service"]);
    assert!(
        out.status.success(),
        "{}{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    assert!(text.contains("cli-m1") && text.contains("active"), "{text}");
    assert_eq!(
        m.exec_stdout(&["systemctl", "is-active", "cbus-sleeper.service"]),
        "active"
    );

    let out = cbus(&url, &["units", "cbus-*", "--json"]);
    let units = json_of(&out)["units"].clone();
    assert_eq!(
        units,
        json!([{"host": "cli-m1", "unit": "cbus-sleeper.service", "load": "loaded", "active": "active", "sub": "running", "description": "cbus cli sleeper"}])
    );
    let text = stdout(&cbus(&url, &["status", "cbus-sleeper.service"]));
    assert!(text.contains("running") && text.contains("ago"), "{text}");

    let out = cbus(&url, &["stop", "cbus-sleeper.service", "--json"]);
    assert!(out.status.success());
    assert_eq!(json_of(&out)["results"][0]["active_state"], "inactive");
    assert_eq!(
        m.exec_stdout(&["systemctl", "is-active", "cbus-sleeper.service"]),
        "inactive"
    );

    let out = cbus(&url, &["start", "no-such.service"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("not-found"), "{}", stdout(&out));
}

#[tokio::test]
async fn monitor_prints_signals_as_lines_and_ndjson() {
    use std::io::BufRead;
    let nats = NatsServer::start();
    let url = nats.url();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let _agent = Agent::start(&url, bus.address(), &["--allow-all", "--hostname", "mon-a"]);
    wait_agents(&nats, 1).await;

    let spawn = |json: bool| {
        let mut cmd = Command::new(bin_path("cbus"));
        cmd.args([
            "--server",
            &url,
            "monitor",
            "--member",
            "Message",
            "--path",
            "/org/cbus",
        ]);
        if json {
            cmd.arg("--json");
        }
        cmd.stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run cbus monitor")
    };
    for json in [false, true] {
        let mut child = spawn(json);
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        // The subscription is up once a signal emitted after it arrives; emit until one does.
        let mut line = None;
        for _ in 0..50 {
            let out = cbus(
                &url,
                &[
                    "invoke",
                    "org.cbus.Test",
                    "/org/cbus/Test",
                    "EmitOne",
                    "[\"hello monitor\"]",
                ],
            );
            assert!(out.status.success());
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
                line = Some(l);
                break;
            }
        }
        // SIGINT stops it cleanly, like Ctrl-C.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGINT);
        }
        let status = child.wait().unwrap();
        let line = line.expect("monitor printed no signal");
        if json {
            let v: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["host"], "mon-a");
            assert_eq!(v["member"], "Message");
            assert_eq!(v["sender_name"], "org.cbus.Test");
            assert_eq!(v["args"], json!(["hello monitor"]));
        } else {
            assert!(
                line.contains(
                    "mon-a org.cbus.Test /org/cbus/Test org.cbus.Test1.Message [\"hello monitor\"]"
                ),
                "{line}"
            );
        }
        assert!(status.success(), "monitor exit {status:?}");
    }
}
