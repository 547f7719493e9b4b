//! `cbus watch` of the real binary on two real systemd machines (nspawn): NDJSON off a terminal
//! (first values, a unit stopped on one machine, a frozen agent shown unresponsive and back),
//! and in a pseudo-terminal the table redrawn in place with counts by value and the changed
//! machine highlighted.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cbus_tests::cli::*;
use cbus_tests::{Agent, Machine, MachineSpec, NatsServer};
use serde_json::Value;

const UNIT: &str = "[Unit]\nDescription=cbus watched\n[Service]\nExecStart=/bin/sleep infinity\n";

/// Waits for an NDJSON line that `want` accepts; the lines seen meanwhile, for the message.
fn line_where(
    run: &Running,
    within: Duration,
    want: impl Fn(&Value) -> bool,
) -> Result<Value, Vec<String>> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Some(line) = run.stdout_line(left) else {
            break;
        };
        let v: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if want(&v) {
            return Ok(v);
        }
        seen.push(line);
    }
    Err(seen)
}

/// Starts `cbus ARGS` with a pseudo-terminal as stdin and stdout; what it writes is collected.
fn in_pty(url: &str, args: &[&str]) -> (std::process::Child, Arc<Mutex<Vec<u8>>>) {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty fills the two descriptors; no name, termios or size given.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: both descriptors were just opened and are owned here.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let child = command()
        .env("LINES", "40")
        .arg("--server")
        .arg(url)
        .args(args)
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave))
        .stderr(Stdio::null())
        .spawn()
        .expect("run cbus");
    let screen = Arc::new(Mutex::new(Vec::new()));
    let sink = screen.clone();
    let mut master = std::fs::File::from(master);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // Ends with EIO once the child and every copy of the slave are gone.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    (child, screen)
}

/// The last complete frame drawn (from a cursor-home to a clear-below).
fn last_frame(screen: &Mutex<Vec<u8>>) -> String {
    let text = String::from_utf8_lossy(&screen.lock().unwrap()).into_owned();
    let end = text.rfind("\x1b[J").unwrap_or(0);
    let start = text[..end].rfind("\x1b[H").map_or(0, |s| s + 3);
    text[start..end].to_owned()
}

fn wait_frame(
    screen: &Mutex<Vec<u8>>,
    within: Duration,
    want: impl Fn(&str) -> bool,
) -> Result<String, String> {
    let deadline = Instant::now() + within;
    loop {
        let f = last_frame(screen);
        if want(&f) {
            return Ok(f);
        }
        if Instant::now() >= deadline {
            return Err(f);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn plain(frame: &str) -> String {
    frame
        .replace("\x1b[7m", "")
        .replace("\x1b[0m", "")
        .replace("\x1b[K", "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_shows_changes_pushed_by_signals() {
    let nats = NatsServer::start();
    let url = nats.url();
    let machines = tokio::task::spawn_blocking(|| {
        let spec = |n: &str| MachineSpec::new(n).with_unit("cbus-watched.service", UNIT);
        cbus_tests::Fleet::boot(&[spec("watch-m1"), spec("watch-m2")])
    })
    .await
    .unwrap();
    let (m1, m2): (&Machine, &Machine) = (machines.get("watch-m1"), machines.get("watch-m2"));
    let agents: Vec<Agent> = [m1, m2]
        .iter()
        .map(|m| Agent::on_machine(&url, m, &["--allow-all", "--hostname", &m.name]))
        .collect();
    wait_agents(&nats, 2).await;
    for m in [m1, m2] {
        m.exec(&["systemctl", "start", "cbus-watched.service"]);
    }

    // Off a terminal: NDJSON, the first value of each machine, then changes.
    let run = Running::spawn(&url, &["watch", "cbus-watched"]);
    for host in ["watch-m1", "watch-m2"] {
        let first = line_where(&run, Duration::from_secs(10), |v| {
            v["host"] == host && v["initial"] == true
        })
        .unwrap_or_else(|seen| panic!("no first value of {host}: {seen:?}"));
        assert_eq!(first["value"], "active", "{first}");
        assert_eq!(first["sub_state"], "running", "{first}");
        assert_eq!(first["state"], "live", "{first}");
    }
    let stopped = Instant::now();
    m1.exec(&["systemctl", "stop", "cbus-watched.service"]);
    let change = line_where(&run, Duration::from_secs(10), |v| {
        v["host"] == "watch-m1" && v["value"] == "inactive"
    })
    .unwrap_or_else(|seen| panic!("the stop on watch-m1 was not shown: {seen:?}"));
    println!("stop shown {:?} after systemctl stop", stopped.elapsed());
    assert_eq!(change["sub_state"], "dead", "{change}");
    assert!(change.get("previous").is_some(), "{change}");
    // A frozen agent (a hung host): unresponsive once its heartbeats stop, live when back.
    let pid = agents[1].pid().expect("agent runs") as i32;
    // SAFETY: signalling a child process this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let stuck = line_where(&run, Duration::from_secs(10), |v| {
        v["host"] == "watch-m2" && v["state"] == "unresponsive"
    });
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let stuck =
        stuck.unwrap_or_else(|seen| panic!("frozen watch-m2 never shown unresponsive: {seen:?}"));
    assert!(stuck["silent_ms"].as_u64().unwrap() >= 1500, "{stuck}");
    let back = line_where(&run, Duration::from_secs(10), |v| {
        v["host"] == "watch-m2" && v["state"] == "live"
    });
    assert!(back.is_ok(), "watch-m2 never shown live again: {back:?}");
    run.signal(libc::SIGTERM);
    let (out, _) = run.finish(Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));

    // On a terminal: counts on top, the changed machine highlighted.
    let (mut child, screen) = in_pty(&url, &["watch", "cbus-watched"]);
    let frame = wait_frame(&screen, Duration::from_secs(10), |f| {
        f.contains("active: 1   inactive: 1")
    })
    .unwrap_or_else(|f| panic!("no counts on screen:\n{f}"));
    assert!(
        frame.contains("cbus watch cbus-watched.service ActiveState: 2 machine(s)"),
        "{frame}"
    );
    let text = plain(&frame);
    assert!(text.contains("HOST      ACTIVE    SUB"), "{text}");
    m1.exec(&["systemctl", "start", "cbus-watched.service"]);
    let frame = wait_frame(&screen, Duration::from_secs(10), |f| {
        f.contains("active: 2")
    })
    .unwrap_or_else(|f| panic!("the start on watch-m1 was not drawn:\n{f}"));
    let m1_line = frame
        .lines()
        .find(|l| l.contains("watch-m1"))
        .unwrap_or_default();
    assert!(
        m1_line.starts_with("\x1b[7m"),
        "watch-m1 not highlighted:\n{frame:?}"
    );
    let m2_line = frame
        .lines()
        .find(|l| l.contains("watch-m2"))
        .unwrap_or_default();
    assert!(
        !m2_line.starts_with("\x1b[7m"),
        "watch-m2 highlighted:\n{frame:?}"
    );
    assert!(
        plain(m1_line).contains("watch-m1  active  running"),
        "{frame}"
    );
    // SAFETY: signalling a child process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    std::thread::sleep(Duration::from_millis(100));
    let all = String::from_utf8_lossy(&screen.lock().unwrap()).into_owned();
    assert!(
        all.ends_with("\x1b[?25h"),
        "cursor not shown again: {:?}",
        &all[all.len().saturating_sub(40)..]
    );
}
