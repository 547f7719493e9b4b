//! `cbus monitor --since` on real parts: a nats-server with JetStream on a store that outlives
//! a restart, a real agent on a private dbus-daemon with the test service, the real `cbus`.
//! Signals stored before the monitor started are replayed, then live ones follow, and a NATS
//! restart in the middle loses none and repeats none: the printed sequence is exactly the
//! emitted one.

use std::time::{Duration, Instant};

use cbus_tests::cli::*;
use cbus_tests::{Agent, NatsServer, PrivateBus, TestService};
use serde_json::Value;

/// The `Message` texts printed so far, until `last` shows up or the deadline.
fn read_until(run: &Running, seen: &mut Vec<String>, last: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while !seen.iter().any(|s| s == last) && Instant::now() < deadline {
        if let Some(line) = run.stdout_line(Duration::from_millis(200)) {
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
            seen.push(v["args"][0].as_str().unwrap_or_default().to_owned());
        }
    }
}

/// Emits `Message(text)` once the agent listens again after the restart (the registry on the
/// kept store says it runs before its subscription is back): retried only while the request
/// reached nobody, so the signal is emitted exactly once.
fn emit_when_back(url: &str, text: &str) {
    let arg = serde_json::to_string(&serde_json::json!([text])).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = cbus(
            url,
            &[
                "-M",
                "hist-a",
                "invoke",
                "org.cbus.Test",
                "/org/cbus/Test",
                "EmitOne",
                &arg,
            ],
        );
        if out.status.success() {
            return;
        }
        assert!(
            stdout(&out).contains("not connected") && Instant::now() < deadline,
            "{}",
            both(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_since_replays_then_follows_across_a_nats_restart() {
    let mut nats = NatsServer::start();
    let url = nats.url();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let _agent = Agent::start(
        &url,
        bus.address(),
        &["--allow-all", "--hostname", "hist-a"],
    );
    wait_agents(&nats, 1).await;

    // Without the signal stream, --since is a clear error (exit 2), not an empty watch.
    let missing = cbus(&url, &["monitor", "--since", "1m"]);
    assert_eq!(missing.status.code(), Some(2), "{}", both(&missing));
    assert!(
        stderr(&missing).contains("cbus-signals"),
        "{}",
        both(&missing)
    );
    let bad = cbus(&url, &["monitor", "--since", "soon"]);
    assert_eq!(bad.status.code(), Some(2), "{}", both(&bad));

    let init = cbus(
        &url,
        &[
            "streams",
            "init",
            "--signals",
            "--signals-max-age",
            "10m",
            "--signals-max-bytes",
            "64MiB",
        ],
    );
    let text = ok_stdout(&init);
    assert!(text.contains("stream cbus-signals created"), "{text}");
    assert!(text.contains("stream cbus-audit created"), "{text}");

    // Emitted before the monitor exists: only the stream has them.
    let mut expected = Vec::new();
    for i in 1..=3 {
        let t = format!("before-{i}");
        emit(&url, "hist-a", &t);
        expected.push(t);
    }
    // Let the stream store them (the agent publishes without waiting).
    std::thread::sleep(Duration::from_millis(500));
    let run = Running::spawn(
        &url,
        &[
            "monitor", "--json", "--since", "10m", "--member", "Message", "-M", "hist-a",
        ],
    );
    let mut seen = Vec::new();
    read_until(&run, &mut seen, "before-3", Duration::from_secs(15));
    assert_eq!(seen, expected, "replay");

    // Live, through the same consumer.
    for i in 1..=2 {
        let t = format!("live-{i}");
        emit(&url, "hist-a", &t);
        expected.push(t);
    }
    read_until(&run, &mut seen, "live-2", Duration::from_secs(15));
    assert_eq!(seen, expected, "live after the replay");

    // NATS restarts on the same port and store; the agent and the monitor reconnect.
    nats.restart();
    wait_agents(&nats, 1).await;
    for i in 1..=3 {
        let t = format!("after-{i}");
        emit_when_back(&url, &t);
        expected.push(t);
    }
    read_until(&run, &mut seen, "after-3", Duration::from_secs(30));
    // Anything late would be a duplicate: give it a moment to show.
    std::thread::sleep(Duration::from_secs(1));
    while let Some(line) = run.stdout_line(Duration::from_millis(300)) {
        let v: Value = serde_json::from_str(&line).unwrap();
        seen.push(v["args"][0].as_str().unwrap_or_default().to_owned());
    }
    run.signal(libc::SIGTERM);
    let (out, _) = run.finish(Duration::from_secs(10));
    assert!(out.status.success(), "{}", both(&out));
    println!("monitor --since printed: {seen:?}");
    assert_eq!(
        seen,
        expected,
        "no gap and no duplicate across the restart:\n{}",
        both(&out)
    );

    // A second monitor from the same start replays all of it, stored times included.
    let again = Running::spawn(
        &url,
        &["monitor", "--json", "--since", "10m", "--member", "Message"],
    );
    let mut replay = Vec::new();
    read_until(&again, &mut replay, "after-3", Duration::from_secs(15));
    again.signal(libc::SIGTERM);
    let _ = again.finish(Duration::from_secs(10));
    assert_eq!(
        replay, expected,
        "the stream kept every signal across the restart"
    );
}
