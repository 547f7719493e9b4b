//! `cbus monitor` against real agents: line and NDJSON output, filters (sender by well-known
//! name, interface, member, path, machine), and clean stops on SIGINT, SIGTERM and a closed pipe.

use std::io::BufRead;
use std::process::{Child, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use cbus_tests::cli::*;
use cbus_tests::{Agent, NatsServer, PrivateBus, TestService};
use serde_json::{json, Value};

struct Monitor {
    child: Child,
    lines: Receiver<String>,
}

impl Monitor {
    fn spawn(url: &str, args: &[&str]) -> Monitor {
        let mut child = command()
            .args(["--server", url, "monitor"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run cbus monitor");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Monitor { child, lines }
    }

    /// Emits `Message(text)` on `host` until the monitor prints a line (its subscription is up
    /// once a signal sent after it arrives), and returns that line.
    fn first_line(&self, url: &str, host: &str, text: &str) -> String {
        for _ in 0..50 {
            emit(url, host, text);
            if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                return l;
            }
        }
        panic!("monitor printed nothing");
    }

    fn signal(&self, sig: i32) {
        // SAFETY: signalling a child we started.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    fn wait(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.wait().expect("wait monitor");
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        (status, err)
    }
}

#[tokio::test]
async fn monitor_lines_filters_and_clean_stops() {
    let nats = NatsServer::start();
    let url = nats.url();
    let (bus_a, bus_b) = (PrivateBus::start(), PrivateBus::start());
    let _svc_a = TestService::start(bus_a.address());
    let _svc_b = TestService::start(bus_b.address());
    let _a = Agent::start(
        &url,
        bus_a.address(),
        &["--allow-all", "--hostname", "mon-a"],
    );
    let _b = Agent::start(
        &url,
        bus_b.address(),
        &["--allow-all", "--hostname", "mon-b"],
    );
    wait_agents(&nats, 2).await;

    // One line per signal: time, host, sender, path, interface.member, args. SIGINT: exit 0.
    let m = Monitor::spawn(&url, &["--member", "Message", "--path", "/org/cbus"]);
    let line = m.first_line(&url, "mon-a", "hello monitor");
    let (time, rest) = line.split_once(' ').unwrap();
    assert_eq!(time.len(), "12:34:56.789".len(), "{line}");
    assert_eq!(
        rest,
        "mon-a org.cbus.Test /org/cbus/Test org.cbus.Test1.Message [\"hello monitor\"]"
    );
    m.signal(libc::SIGINT);
    let (status, err) = m.wait();
    assert!(status.success(), "{status:?} {err}");
    assert!(err.is_empty(), "{err}");

    // NDJSON, with the sender filtered by its well-known name. SIGTERM: exit 0.
    let m = Monitor::spawn(
        &url,
        &[
            "--json",
            "--sender",
            "org.cbus.Test",
            "--interface",
            "org.cbus.Test1",
        ],
    );
    let line = m.first_line(&url, "mon-a", "as json");
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["host"], "mon-a");
    assert_eq!(v["member"], "Message");
    assert_eq!(v["sender_name"], "org.cbus.Test");
    assert!(v["sender"].as_str().unwrap().starts_with(':'));
    assert_eq!(v["path"], "/org/cbus/Test");
    assert_eq!(v["signature"], "s");
    assert_eq!(v["args"], json!(["as json"]));
    assert!(v["time_ms"].as_u64().unwrap() > 0);
    m.signal(libc::SIGTERM);
    assert!(m.wait().0.success());

    // Only the selected machine; only the named member (Tick from EmitSignals, not Message).
    let m = Monitor::spawn(&url, &["-s", "--hosts", "mon-b", "--member", "Tick"]);
    let mut got = None;
    for _ in 0..50 {
        for host in ["mon-a", "mon-b"] {
            let out = cbus(
                &url,
                &[
                    "-M",
                    host,
                    "invoke",
                    "org.cbus.Test",
                    "/org/cbus/Test",
                    "EmitSignals",
                    "[1]",
                ],
            );
            assert!(out.status.success(), "{}", both(&out));
            emit(&url, host, "not a tick");
        }
        if let Ok(l) = m.lines.recv_timeout(Duration::from_millis(200)) {
            got = Some(l);
            break;
        }
    }
    let line = got.expect("no Tick from mon-b");
    assert!(
        line.ends_with("mon-b org.cbus.Test /org/cbus/Test org.cbus.Test1.Tick [0,\"tick\"]"),
        "{line}"
    );
    // Whatever else arrived is mon-b's Tick too.
    std::thread::sleep(Duration::from_millis(300));
    while let Ok(l) = m.lines.try_recv() {
        assert!(l.contains(" mon-b ") && l.contains(".Tick "), "{l}");
    }
    m.signal(libc::SIGINT);
    assert!(m.wait().0.success());

    // A reader that goes away (cbus monitor | head -1): cbus stops quietly, exit 0.
    let m = Monitor::spawn(&url, &[]);
    let _ = m.first_line(&url, "mon-a", "first");
    let Monitor { mut child, lines } = m;
    drop(lines); // the reader thread ends at its next line, closing the pipe
    let mut exited = None;
    for i in 0..100 {
        emit(&url, "mon-a", &format!("more {i}"));
        if let Ok(Some(status)) = child.try_wait() {
            exited = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = exited.expect("monitor kept running with nobody reading");
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
    assert!(status.success(), "{status:?} {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Issue #13, item 6: a compromised agent publishes on its own signal subject (all the server's
/// permissions allow it) with another machine's `NKey` and `Hostname` headers. The machine of a
/// signal is the subject's `<nkey>`: the impersonation is dropped and counted, and a bare
/// `Hostname` claim is overridden by the registry's hostname for that nkey.
#[tokio::test]
async fn monitor_attributes_signals_by_subject_not_headers() {
    let nats = NatsServer::start();
    let url = nats.url();
    let (bus_a, bus_b) = (PrivateBus::start(), PrivateBus::start());
    let _svc_a = TestService::start(bus_a.address());
    let _svc_b = TestService::start(bus_b.address());
    let a = Agent::start(
        &url,
        bus_a.address(),
        &["--allow-all", "--hostname", "imp-a"],
    );
    let b = Agent::start(
        &url,
        bus_b.address(),
        &["--allow-all", "--hostname", "imp-b"],
    );
    wait_agents(&nats, 2).await;

    let run = Running::spawn(&url, &["monitor", "--json", "--member", "Message"]);
    let mut first = None;
    for i in 0..50 {
        emit(&url, "imp-a", &format!("sync {i}"));
        if let Some(l) = run.stdout_line(Duration::from_millis(200)) {
            first = Some(l);
            break;
        }
    }
    let first: Value = serde_json::from_str(&first.expect("monitor printed nothing")).unwrap();
    assert_eq!(first["host"], "imp-a");

    // What a compromised imp-a may publish: its own subject, anyone's headers.
    let attacker = nats.connect().await;
    let subject = format!("dbus.signals.{}._3a1_2e99.org.cbus.Test", a.nkey);
    let forge = |nkey: &str, text: &str| {
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in [
            ("NKey", nkey),
            ("Hostname", "imp-b"),
            ("Sender", ":1.99"),
            ("Path", "/org/cbus/Test"),
            ("Interface", "org.cbus.Test1"),
            ("Member", "Message"),
            ("Signature", "s"),
        ] {
            h.insert(k, v);
        }
        (h, serde_json::to_vec(&json!([text])).unwrap())
    };
    for (nkey, text) in [
        (b.nkey.as_str(), "as imp-b"),
        (a.nkey.as_str(), "hostname claim"),
    ] {
        let (h, payload) = forge(nkey, text);
        attacker
            .publish_with_headers(subject.clone(), h, payload.into())
            .await
            .unwrap();
    }
    attacker.flush().await.unwrap();
    // A real signal after them: once it shows, the forged ones have been handled.
    let mut lines = Vec::new();
    'marker: for i in 0..50 {
        emit(&url, "imp-a", &format!("after {i}"));
        while let Some(l) = run.stdout_line(Duration::from_millis(200)) {
            let after = l.contains("\"after ");
            lines.push(l);
            if after {
                break 'marker;
            }
        }
    }
    run.signal(libc::SIGTERM);
    let (out, _) = run.finish(Duration::from_secs(10));
    assert!(out.status.success(), "{}", both(&out));
    let docs: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    println!("monitor printed {} line(s) after the forgeries", docs.len());
    assert!(docs.iter().any(|d| d["args"][0]
        .as_str()
        .is_some_and(|t| t.starts_with("after "))));
    for d in &docs {
        assert_ne!(d["host"], "imp-b", "impersonation shown: {d}");
        assert_ne!(d["nkey"], b.nkey.as_str(), "impersonation shown: {d}");
        assert_ne!(d["args"][0], "as imp-b", "impersonation shown: {d}");
    }
    let claim = docs
        .iter()
        .find(|d| d["args"][0] == "hostname claim")
        .unwrap_or_else(|| panic!("the signal with a bare Hostname claim is missing: {docs:?}"));
    assert_eq!(claim["host"], "imp-a", "{claim}");
    assert_eq!(claim["nkey"], a.nkey.as_str(), "{claim}");
    assert!(
        stderr(&out).contains("dropped 1 signal(s) whose NKey header disagreed"),
        "{}",
        both(&out)
    );
}
