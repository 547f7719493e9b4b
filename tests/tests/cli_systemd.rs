//! systemd shortcuts of the real `cbus` binary on two real systemd machines (nspawn), each with
//! its own SSH host key and agent: units, status, start/stop/restart with job waiting, checked
//! on each machine's own bus with zbus.

use std::time::{Duration, Instant};

use cbus_client::fleet;
use cbus_tests::cli::*;
use cbus_tests::{Agent, Machine, MachineSpec, NatsServer};
use serde_json::Value;

/// Restarted by systemd when its process fails to start: in a full suite run the machine's
/// systemd once failed a start that cbus had queued with 219/CGROUP (its process could not be
/// put in the unit's cgroup, right after the unit had been stopped), which is systemd's own
/// trouble in the container, not what this test checks. A start that was never queued still
/// leaves the unit inactive.
const SLEEPER: &str = "[Unit]\nDescription=cbus cli sleeper\nStartLimitIntervalSec=0\n[Service]\n\
    ExecStart=/bin/sleep infinity\nRestart=on-failure\nRestartSec=100ms\n";
/// Its start job takes two seconds, so waiting for the job (not a first glance at the state)
/// is what reports `active`.
const SLOW: &str = "[Unit]\nDescription=cbus cli slow\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/sleep 2\n";
const BROKEN: &str =
    "[Unit]\nDescription=cbus cli broken\n[Service]\nType=oneshot\nExecStart=/bin/false\n";

/// The unit's ActiveState read straight from the machine's system bus, not through cbus.
async fn active_state(m: &Machine, unit: &str) -> String {
    let conn = zbus::connection::Builder::address(m.bus_address().as_str())
        .expect("bus address")
        .build()
        .await
        .expect("connect to the machine's bus");
    let path = cbus_protocol::names::systemd_unit_path(unit);
    let proxy = zbus::Proxy::new(
        &conn,
        "org.freedesktop.systemd1",
        path.as_str(),
        "org.freedesktop.systemd1.Unit",
    )
    .await
    .expect("unit proxy");
    proxy
        .get_property::<String>("ActiveState")
        .await
        .expect("ActiveState")
}

fn rows_of<'a>(doc: &'a Value, host: &str) -> Vec<&'a Value> {
    doc["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["host"] == host)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_shortcuts_change_real_units() {
    let nats = NatsServer::start();
    let url = nats.url();
    let machines = tokio::task::spawn_blocking(|| {
        let spec = |name: &str| {
            MachineSpec::new(name)
                .with_unit("cbus-sleeper.service", SLEEPER)
                .with_unit("cbus-slow.service", SLOW)
                .with_unit("cbus-broken.service", BROKEN)
        };
        cbus_tests::Fleet::boot(&[spec("cli-m1"), spec("cli-m2")])
    })
    .await
    .unwrap();
    let (m1, m2) = (machines.get("cli-m1"), machines.get("cli-m2"));
    let agents: Vec<Agent> = [m1, m2]
        .iter()
        .map(|m| Agent::on_machine(&url, m, &["--allow-all", "--hostname", &m.name]))
        .collect();
    wait_agents(&nats, 2).await;

    // start, names without a suffix are services; the command waits for the jobs.
    let started = Instant::now();
    let out = cbus(&url, &["start", "cbus-sleeper", "cbus-slow", "--json"]);
    let took = started.elapsed();
    let doc = json_of(&out);
    assert!(out.status.success(), "{}", both(&out));
    assert!(
        took >= Duration::from_millis(1500),
        "did not wait for the slow job: {took:?}"
    );
    for host in ["cli-m1", "cli-m2"] {
        let rows = rows_of(&doc, host);
        assert_eq!(rows.len(), 2, "{doc}");
        for r in rows {
            assert_eq!(r["ok"], true, "{r}");
            assert_eq!(r["job_result"], "done", "{r}");
            assert_eq!(r["active_state"], "active", "{r}");
            assert!(r["job"]
                .as_str()
                .unwrap()
                .starts_with("/org/freedesktop/systemd1/job/"));
        }
    }
    assert_eq!(doc["results"][1]["unit"], "cbus-slow.service");
    assert_eq!(doc["results"][1]["sub_state"], "exited");
    for m in [m1, m2] {
        assert_eq!(active_state(m, "cbus-sleeper.service").await, "active");
        assert_eq!(active_state(m, "cbus-slow.service").await, "active");
    }

    // units: machines x units, with SINCE for a pattern.
    let text = ok_stdout(&cbus(&url, &["units", "cbus-*"]));
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("HOST    UNIT                  LOAD    ACTIVE  SUB      SINCE"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("cli-m1  cbus-sleeper.service  loaded  active  running  ")
            && lines[1].contains(" ago  cbus cli sleeper"),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("cli-m2  cbus-slow.service")),
        "{text}"
    );
    let doc = json_of(&cbus(&url, &["units", "cbus-s*", "--json"]));
    let units = doc["units"].as_array().unwrap();
    assert_eq!(units.len(), 4, "{doc}");
    let u = &units[0];
    assert_eq!(
        (
            &u["host"],
            &u["unit"],
            &u["load"],
            &u["active"],
            &u["sub"],
            &u["description"]
        ),
        (
            &"cli-m1".into(),
            &"cbus-sleeper.service".into(),
            &"loaded".into(),
            &"active".into(),
            &"running".into(),
            &"cbus cli sleeper".into()
        )
    );
    assert!(u["since"].as_str().unwrap().ends_with('Z'), "{u}");
    assert_eq!(doc["summary"]["ok"], 2);
    // All units: SINCE left out, everything else there.
    let all = ok_stdout(&cbus(&url, &["-M", "cli-m1", "-s", "units"]));
    assert!(
        all.lines()
            .any(|l| l.starts_with("cli-m1\tbasic.target\tloaded\tactive\tactive\t-\t")),
        "{all}"
    );

    // status: per machine, MainPID as the machine sees it.
    let pid = m1.exec_stdout(&[
        "systemctl",
        "show",
        "-p",
        "MainPID",
        "--value",
        "cbus-sleeper.service",
    ]);
    let text = ok_stdout(&cbus(&url, &["status", "cbus-sleeper", "-s"]));
    let line = text.lines().find(|l| l.starts_with("cli-m1\t")).unwrap();
    let cells: Vec<&str> = line.split('\t').collect();
    assert_eq!(
        cells[..5],
        [
            "cli-m1",
            "cbus-sleeper.service",
            "loaded",
            "active",
            "running"
        ],
        "{text}"
    );
    assert!(cells[5].ends_with('Z'), "{text}");
    assert_eq!(cells[6], pid, "{text}");
    assert_eq!(cells[7], "cbus cli sleeper");
    let table = ok_stdout(&cbus(
        &url,
        &["status", "cbus-sleeper.service", "basic.target"],
    ));
    assert!(
        table.starts_with("HOST    UNIT                  LOAD    ACTIVE  SUB      SINCE"),
        "{table}"
    );
    assert!(
        table.contains("basic.target          loaded  active  active"),
        "{table}"
    );
    let doc = json_of(&cbus(
        &url,
        &["-M", "cli-m2", "status", "cbus-sleeper", "--json"],
    ));
    assert_eq!(
        doc["results"][0]["main_pid"].as_u64().unwrap().to_string(),
        m2.exec_stdout(&[
            "systemctl",
            "show",
            "-p",
            "MainPID",
            "--value",
            "cbus-sleeper.service"
        ])
    );

    // stop on one machine only.
    let text = ok_stdout(&cbus(
        &url,
        &["--hosts", "cli-m1", "stop", "cbus-sleeper.service"],
    ));
    assert!(
        text.starts_with("HOST    UNIT                  JOB"),
        "{text}"
    );
    let row = text.lines().nth(1).unwrap();
    assert!(
        row.starts_with("cli-m1  cbus-sleeper.service") && row.ends_with("done    inactive  dead"),
        "{text}"
    );
    assert_eq!(active_state(m1, "cbus-sleeper.service").await, "inactive");
    assert_eq!(active_state(m2, "cbus-sleeper.service").await, "active");
    assert_eq!(
        m1.exec_stdout(&["systemctl", "is-active", "cbus-sleeper.service"]),
        "inactive"
    );

    // A unit that fails to start: the job result says so, exit 1, machines named.
    let out = cbus(&url, &["start", "cbus-broken", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    let doc = json_of(&out);
    for r in doc["results"].as_array().unwrap() {
        assert_eq!(r["job_result"], "failed", "{r}");
        assert_eq!(r["active_state"], "failed", "{r}");
        assert_eq!(r["ok"], false);
    }
    assert!(
        stderr(&out).contains("failed: cli-m1, cli-m2"),
        "{}",
        both(&out)
    );

    // --no-block: queued, the job path returned at once.
    let out = cbus(&url, &["restart", "cbus-sleeper", "--no-block", "--json"]);
    let doc = json_of(&out);
    assert!(out.status.success(), "{}", both(&out));
    for r in doc["results"].as_array().unwrap() {
        assert!(r["job"].as_str().is_some(), "{r}");
        assert_eq!(r["job_result"], Value::Null);
    }
    let ok = cbus_tests::wait_for(Duration::from_secs(10), || async {
        active_state(m1, "cbus-sleeper.service").await == "active"
    })
    .await;
    // What the machine's systemd had, when not (SLEEPER says what was seen once).
    assert!(
        ok,
        "restart --no-block never started the unit on cli-m1: {}\n{}",
        both(&out),
        m1.exec_stdout(&["systemctl", "status", "--no-pager", "cbus-sleeper.service"])
    );
    // restart waiting: a new main PID.
    let before = m2.exec_stdout(&[
        "systemctl",
        "show",
        "-p",
        "MainPID",
        "--value",
        "cbus-sleeper.service",
    ]);
    let text = ok_stdout(&cbus(
        &url,
        &["-M", "cli-m2", "-s", "restart", "cbus-sleeper"],
    ));
    assert!(
        text.starts_with("cli-m2\tcbus-sleeper.service\t")
            && text.ends_with("\tdone\tactive\trunning\n"),
        "{text}"
    );
    let after = m2.exec_stdout(&[
        "systemctl",
        "show",
        "-p",
        "MainPID",
        "--value",
        "cbus-sleeper.service",
    ]);
    assert_ne!(before, after);

    // Unknown unit: systemd's error per machine, exit 1.
    let out = cbus(&url, &["start", "no-such.service"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("not-found"), "{}", both(&out));

    // A frozen agent on a real systemd machine (SIGSTOP, as a hung host looks): unresponsive
    // within 3 heartbeats (500 ms), then reported at once instead of waited for; exit 3.
    let frozen_pid = agents[1].pid().expect("cli-m2's agent runs") as i32;
    // SAFETY: signalling a child process this test started.
    unsafe { libc::kill(frozen_pid, libc::SIGSTOP) };
    let frozen = Instant::now();
    // Frozen while the registry still calls it running (it becomes unresponsive 2-3 heartbeats
    // later): asked like the others, it holds the fan-out only until it is silent to a
    // liveness probe too, sent 100 ms after the others' answers (docs/cli.md, *Stuck
    // machines*), never until the 10 s timeout, and is named as timed out after the probe.
    let out = cbus(
        &url,
        &[
            "--timeout",
            "10s",
            "--json",
            "get",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager.Version",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", both(&out));
    let doc = json_of(&out);
    let m2 = rows_of(&doc, "cli-m2");
    assert_eq!(m2.len(), 1, "{doc}");
    assert_eq!(m2[0]["status"], "timed-out", "asked while running: {doc}");
    let why = m2[0]["error"]["message"].as_str().unwrap_or_default();
    assert!(why.contains("silent to a liveness probe too"), "{why}");
    assert_eq!(rows_of(&doc, "cli-m1")[0]["ok"], true, "{doc}");
    // The probe is the bound: 100 ms of quiet after the latest answer at t, then
    // max(300 ms, t / 2); the answers of a live machine come well within a second here, so
    // anything near the timeout means the frozen machine was waited for.
    let elapsed = Duration::from_millis(doc["summary"]["elapsed_ms"].as_u64().unwrap());
    println!("get with cli-m2 frozen, still called running: {elapsed:?} ({why})");
    assert!(
        elapsed >= fleet::PROBE_QUIET + fleet::PROBE_WINDOW_MIN,
        "ended before the probe's window: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "waited past the probe: {elapsed:?}"
    );
    let state_of_m2 = || {
        let doc = json_of(&cbus(&url, &["agents", "--json"]));
        doc["agents"][1]["state"].as_str().unwrap_or("").to_owned()
    };
    let ok = cbus_tests::wait_for(Duration::from_secs(10), || async {
        state_of_m2() == "unresponsive"
    })
    .await;
    let noticed = frozen.elapsed();
    println!("cli-m2 unresponsive {noticed:?} after SIGSTOP (heartbeat 500ms)");
    assert!(ok, "cli-m2 never became unresponsive");
    assert!(noticed < Duration::from_millis(2500), "{noticed:?}");
    let started = Instant::now();
    let out = cbus(&url, &["--timeout", "10s", "status", "cbus-sleeper"]);
    let wall = started.elapsed();
    println!(
        "status --timeout 10s with cli-m2 frozen: {wall:?}\n{}",
        both(&out)
    );
    assert_eq!(out.status.code(), Some(3), "{}", both(&out));
    assert!(wall < Duration::from_secs(3), "{wall:?}");
    let text = stdout(&out);
    assert!(
        text.lines()
            .any(|l| l.starts_with("cli-m2") && l.contains("unresponsive (silent ")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("cli-m1") && l.contains("active")),
        "{text}"
    );
    assert!(
        stderr(&out).contains("unresponsive, not asked: cli-m2"),
        "{}",
        both(&out)
    );
    // SAFETY: as above.
    unsafe { libc::kill(frozen_pid, libc::SIGCONT) };
    let ok = cbus_tests::wait_for(Duration::from_secs(10), || async {
        state_of_m2() == "running"
    })
    .await;
    assert!(ok, "cli-m2 did not come back");

    // Cleanup for the machines' shutdown.
    let _ = cbus(&url, &["stop", "cbus-sleeper", "cbus-slow"]);
}
