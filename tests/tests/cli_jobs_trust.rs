//! Job waits of the real `cbus` binary on a real systemd machine (nspawn) under attack (issue
//! #13): a local user's forged `JobRemoved` (item 5) must not decide a job's result, and a NATS
//! server that freezes or dies during the wait (item 4) must end the command with the
//! `disconnected` error by its deadline (`--timeout` + `--job-timeout`), never hang or blame the
//! machine.

use std::time::Duration;

use cbus_tests::cli::*;
use cbus_tests::{Agent, Machine, MachineSpec, NatsServer};
use futures::StreamExt;
use serde_json::Value;

/// Its start job takes three seconds (ExecStartPre), long enough to forge its end meanwhile.
const SLOW_START: &str = "[Unit]\nDescription=cbus slow start\n[Service]\nType=oneshot\n\
RemainAfterExit=yes\nExecStartPre=/bin/sleep 3\nExecStart=/bin/true\n";
const UNIT: &str = "cbus-slowstart.service";

/// The id of the machine's running job for `unit`, once there is one.
fn job_id(m: &Machine, unit: &str) -> Option<String> {
    for _ in 0..200 {
        let jobs = m.exec_stdout(&["systemctl", "list-jobs", "--no-legend", "--full"]);
        if let Some(line) = jobs.lines().find(|l| l.contains(unit)) {
            return line.split_whitespace().next().map(str::to_owned);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_results_come_from_systemd_and_job_waits_end_by_their_deadline() {
    let mut nats = NatsServer::start();
    let url = nats.url();
    let machines = tokio::task::spawn_blocking(|| {
        cbus_tests::Fleet::boot(&[MachineSpec::new("jobs-m1").with_unit(UNIT, SLOW_START)])
    })
    .await
    .unwrap();
    let m = machines.get("jobs-m1");
    let _agent = Agent::on_machine(&url, m, &["--allow-all", "--hostname", &m.name]);
    wait_agents(&nats, 1).await;

    // 1. A forged JobRemoved with result "failed", sent by nobody while the real job runs.
    let watcher = nats.connect().await;
    let mut manager_signals = watcher
        .subscribe(format!(
            "dbus.signals.{}.*.org.freedesktop.systemd1",
            m.nkey()
        ))
        .await
        .unwrap();
    watcher.flush().await.unwrap();
    let run = Running::spawn(&url, &["start", "cbus-slowstart", "--json"]);
    let id = job_id(m, UNIT).expect("the start job never showed");
    let job = format!("/org/freedesktop/systemd1/job/{id}");
    let leader = m.leader_pid().to_string();
    let forged = std::process::Command::new("nsenter")
        .args(["-t", &leader, "-a", "--"])
        .args([
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "busctl",
            "emit",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            "JobRemoved",
            "uoss",
            &id,
            &job,
            UNIT,
            "failed",
        ])
        .output()
        .expect("run busctl emit");
    assert!(forged.status.success(), "{forged:?}");
    let (out, took) = run.finish(Duration::from_secs(30));
    // The forgery did reach NATS, as a JobRemoved for this job with the result "failed" and
    // without systemd among its sender's names.
    let mut forgery_published = false;
    while let Ok(Some(msg)) =
        tokio::time::timeout(Duration::from_millis(500), manager_signals.next()).await
    {
        let h = msg.headers.as_ref();
        let args: Value = serde_json::from_slice(&msg.payload).unwrap_or(Value::Null);
        if cbus_client::headers::get(h, "Member") == Some("JobRemoved")
            && args[1] == job.as_str()
            && args[3] == "failed"
            && !cbus_client::headers::sender_owns(h, "org.freedesktop.systemd1")
        {
            forgery_published = true;
        }
    }
    println!(
        "start with a forged JobRemoved(failed) for {job}: exit {:?} after {:.2}s, forgery on NATS: {forgery_published}",
        out.status.code(),
        took.as_secs_f64()
    );
    assert!(forgery_published, "the forged signal never reached NATS");
    assert!(out.status.success(), "{}", both(&out));
    let doc: Value = serde_json::from_str(stdout(&out).trim()).expect("JSON");
    let row = &doc["results"][0];
    assert_eq!(row["job"], job.as_str(), "{doc}");
    assert_eq!(row["job_result"], "done", "{doc}");
    assert_eq!(row["active_state"], "active", "{doc}");
    assert!(
        stderr(&out).contains("ignored 1 JobRemoved signal(s) that systemd did not send"),
        "{}",
        both(&out)
    );
    assert_eq!(
        m.exec_stdout(&["systemctl", "is-active", UNIT]),
        "active",
        "systemd's own view"
    );

    // 2. The server freezes during a restart's job wait: disconnected by the deadline.
    let (timeout, job_timeout) = (Duration::from_secs(2), Duration::from_secs(8));
    let run = Running::spawn(
        &url,
        &[
            "--timeout",
            "2s",
            "restart",
            "cbus-slowstart",
            "--job-timeout",
            "8s",
        ],
    );
    let waiting = run.wait_stderr("waiting for jobs", Duration::from_secs(1));
    nats.freeze();
    let frozen_at = run.started.elapsed();
    let (out, took) = run.finish(Duration::from_secs(60));
    nats.thaw();
    println!(
        "restart, server frozen {:.2}s after the start (job wait begun: {waiting}): exit {:?} after {:.2}s (deadline {:.1}s)",
        frozen_at.as_secs_f64(),
        out.status.code(),
        took.as_secs_f64(),
        (timeout + job_timeout).as_secs_f64()
    );
    println!("  {}", stderr(&out).trim_end().lines().last().unwrap_or(""));
    assert_eq!(out.status.code(), Some(2), "{}", both(&out));
    assert!(
        stderr(&out).contains("cbus: disconnected:"),
        "{}",
        both(&out)
    );
    assert!(
        took <= timeout + job_timeout + Duration::from_millis(1500),
        "took {took:?}"
    );
    wait_agents(&nats, 1).await;

    // 3. The server dies during the job wait: the flush of the next poll used to wait for it
    // forever; now the command ends with disconnected when the reconnects are spent or at the
    // deadline, whichever comes first.
    let run = Running::spawn(
        &url,
        &[
            "--timeout",
            "2s",
            "restart",
            "cbus-slowstart",
            "--job-timeout",
            "30s",
        ],
    );
    let waiting = run.wait_stderr("waiting for jobs", Duration::from_secs(1));
    let killed_at = run.started.elapsed();
    nats.stop();
    let (out, took) = run.finish(Duration::from_secs(60));
    println!(
        "restart, server killed {:.2}s after the start (job wait begun: {waiting}): exit {:?} after {:.2}s (deadline 32s, reconnect budget ~7.5s)",
        killed_at.as_secs_f64(),
        out.status.code(),
        took.as_secs_f64()
    );
    println!("  {}", stderr(&out).trim_end().lines().last().unwrap_or(""));
    assert_eq!(out.status.code(), Some(2), "{}", both(&out));
    assert!(
        stderr(&out).contains("cbus: disconnected:"),
        "{}",
        both(&out)
    );
    assert!(took <= Duration::from_secs(15), "took {took:?}");
}
