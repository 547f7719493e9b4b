//! Rolling operations of the real `cbus` on four real systemd machines (nspawn), each with its
//! own agent: batches as a running counter, the hold judged from systemd's signals (a unit that
//! starts and then fails on one machine), `--max-fail` stopping the rollout, unreachable
//! machines counted against it, `--order label:KEY`, and `--resume` of the JSON report running
//! only the machines that were not done.

use cbus_tests::cli::*;
use cbus_tests::{Agent, Machine, MachineSpec, NatsServer};
use serde_json::Value;

/// Runs until it is killed, except where /etc/cbus-broken exists: there it is active for a
/// second and then fails (so its restart job succeeds and only the hold can tell).
const UNIT: &str = "[Unit]\nDescription=cbus rolling\nStartLimitIntervalSec=0\n[Service]\nExecStart=/bin/sh -c 'if [ -e /etc/cbus-broken ]; then sleep 1; exit 3; fi; exec sleep infinity'\n";

fn main_pid(m: &Machine) -> String {
    m.exec_stdout(&[
        "systemctl",
        "show",
        "-p",
        "MainPID",
        "--value",
        "cbus-roll.service",
    ])
}

fn machines_of(doc: &Value) -> Vec<(String, String)> {
    doc["machines"]
        .as_array()
        .unwrap_or_else(|| panic!("no machines in {doc}"))
        .iter()
        .map(|m| {
            (
                m["host"].as_str().unwrap().to_owned(),
                m["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn machine<'a>(doc: &'a Value, host: &str) -> &'a Value {
    doc["machines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["host"] == host)
        .unwrap_or_else(|| panic!("no {host} in {doc}"))
}

/// The most machines whose [started, started + elapsed) intervals overlap at one instant.
fn most_in_flight(doc: &Value) -> usize {
    let spans: Vec<(u64, u64)> = doc["machines"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| {
            let s = m["started_ms"].as_u64()?;
            Some((s, s + m["elapsed_ms"].as_u64()?))
        })
        .collect();
    spans
        .iter()
        .map(|(s, _)| spans.iter().filter(|(a, b)| a <= s && s < b).count())
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restarts_stop_at_max_fail_and_resume() {
    let nats = NatsServer::start();
    let url = nats.url();
    let names = ["roll-m1", "roll-m2", "roll-m3", "roll-m4"];
    let machines = tokio::task::spawn_blocking(move || {
        let specs: Vec<MachineSpec> = names
            .iter()
            .map(|n| MachineSpec::new(*n).with_unit("cbus-roll.service", UNIT))
            .collect();
        cbus_tests::Fleet::boot(&specs)
    })
    .await
    .unwrap();
    let m: Vec<&Machine> = names.iter().map(|n| machines.get(n)).collect();
    // Zones for --order label:zone: m3 and m4 in a, m2 in b, m1 without.
    let zone = ["", "zone=b", "zone=a", "zone=a"];
    let mut agents: Vec<Agent> = m
        .iter()
        .zip(zone)
        .map(|(m, z)| {
            let mut extra = vec!["--allow-all", "--hostname", &m.name];
            if !z.is_empty() {
                extra.extend(["--label", z]);
            }
            Agent::on_machine(&url, m, &extra)
        })
        .collect();
    wait_agents(&nats, 4).await;
    let out = cbus(&url, &["start", "cbus-roll"]);
    assert!(out.status.success(), "{}", both(&out));
    m[2].exec(&["touch", "/etc/cbus-broken"]);
    let before: Vec<String> = m.iter().map(|m| main_pid(m)).collect();

    // One at a time, a 2 s hold, the first failure stops: m1 and m2 done, m3's unit is active
    // after its restart and fails during the hold, m4 is never touched.
    let out = cbus(
        &url,
        &[
            "restart",
            "cbus-roll",
            "--batch",
            "1",
            "--hold",
            "2s",
            "--max-fail",
            "0",
            "--json",
        ],
    );
    println!("{}", both(&out));
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    let doc = json_of(&out);
    assert_eq!(
        machines_of(&doc),
        [
            ("roll-m1".into(), "done".into()),
            ("roll-m2".into(), "done".into()),
            ("roll-m3".into(), "failed".into()),
            ("roll-m4".into(), "not-started".into()),
        ]
    );
    let m3 = machine(&doc, "roll-m3");
    assert_eq!(m3["job_result"], "done", "{m3}");
    assert_eq!(m3["result"], "exit-code", "{m3}");
    assert!(
        m3["error"].as_str().unwrap().contains("during the hold"),
        "{m3}"
    );
    // Done means held: m1 took at least the hold.
    assert!(
        machine(&doc, "roll-m1")["elapsed_ms"].as_u64().unwrap() >= 2000,
        "{doc}"
    );
    assert_eq!(doc["rollout"]["halted"], true);
    assert_eq!(doc["summary"]["not-started"], 1);
    assert!(
        stderr(&out).contains("stopped at --max-fail 0"),
        "{}",
        both(&out)
    );
    assert_eq!(most_in_flight(&doc), 1, "{doc}");
    assert_ne!(main_pid(m[0]), before[0], "m1 was restarted");
    assert_eq!(main_pid(m[3]), before[3], "m4 must not have been touched");
    let report = std::env::temp_dir().join(format!("cbus-roll-{}.json", std::process::id()));
    std::fs::write(&report, &out.stdout).unwrap();

    // A report of another command or unit is refused before anything is sent.
    let report_arg = report.to_str().unwrap();
    let out = cbus(&url, &["stop", "cbus-roll", "--resume", report_arg]);
    assert_eq!(out.status.code(), Some(2), "{}", both(&out));
    assert!(
        stderr(&out).contains("not of `stop cbus-roll.service`"),
        "{}",
        both(&out)
    );

    // Fixed, resumed two at a time: only m3 and m4 run; m1 and m2 are left alone.
    m[2].exec(&["rm", "-f", "/etc/cbus-broken"]);
    let m1_pid = main_pid(m[0]);
    let out = cbus(
        &url,
        &[
            "restart",
            "cbus-roll",
            "--resume",
            report_arg,
            "--batch",
            "2",
            "--hold",
            "1s",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", both(&out));
    let doc = json_of(&out);
    assert_eq!(
        machines_of(&doc),
        [
            ("roll-m3".into(), "done".into()),
            ("roll-m4".into(), "done".into()),
        ]
    );
    assert_eq!(doc["rollout"]["resumed_from"], report_arg);
    assert_eq!(main_pid(m[0]), m1_pid, "m1 was done and must not run again");
    assert_ne!(main_pid(m[3]), before[3], "m4 ran this time");
    let _ = std::fs::remove_file(&report);

    // By zone, two in flight at most, each next one as soon as one ends: m3, m4 (a), m2 (b),
    // then m1 (no zone).
    let out = cbus(
        &url,
        &[
            "restart",
            "cbus-roll",
            "--batch",
            "50%",
            "--order",
            "label:zone",
            "--hold",
            "1s",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", both(&out));
    let doc = json_of(&out);
    let order: Vec<String> = machines_of(&doc).into_iter().map(|(h, _)| h).collect();
    assert_eq!(order, ["roll-m3", "roll-m4", "roll-m2", "roll-m1"], "{doc}");
    assert_eq!(most_in_flight(&doc), 2, "{doc}");

    // A machine whose agent is gone is unreachable and counts against --max-fail: with 25%
    // of four it is tolerated (exit 3: nothing failed, one not reached).
    agents[1].stop();
    let out = cbus(
        &url,
        &[
            "restart",
            "cbus-roll",
            "--batch",
            "4",
            "--max-fail",
            "25%",
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", both(&out));
    let doc = json_of(&out);
    assert_eq!(machine(&doc, "roll-m2")["state"], "unreachable", "{doc}");
    assert_eq!(doc["summary"]["done"], 3, "{doc}");
    // With none tolerated and one at a time, it stops the rollout after m1.
    let out = cbus(&url, &["restart", "cbus-roll", "--batch", "1", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    let doc = json_of(&out);
    assert_eq!(
        machines_of(&doc),
        [
            ("roll-m1".into(), "done".into()),
            ("roll-m2".into(), "unreachable".into()),
            ("roll-m3".into(), "not-started".into()),
            ("roll-m4".into(), "not-started".into()),
        ]
    );
    // The table says the same for humans.
    let out = cbus(&url, &["restart", "cbus-roll", "--batch", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    let text = stdout(&out);
    assert!(text.starts_with("HOST     STATE"), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("roll-m4  not-started")),
        "{text}"
    );
    assert!(
        stderr(&out).contains("4 machine(s): 1 done, 0 failed, 1 unreachable, 2 not started (stopped at --max-fail 0)"),
        "{}",
        both(&out)
    );
    let _ = cbus(&url, &["stop", "cbus-roll"]);
}
