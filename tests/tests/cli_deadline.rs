//! The real `cbus` binary when NATS goes away mid-command (issue #13, item 4): a frozen server
//! (SIGSTOP: TCP stays open, nothing answers) during a `get`, and a server that dies during a
//! `monitor`. Before, the first was reported as the machines timing out (exit 1) and the second
//! reconnected forever; now both end with the `disconnected` error (exit 2), the first by the
//! command's deadline, the second once the bounded reconnects are spent.

use std::time::{Duration, Instant};

use cbus_tests::cli::*;
use cbus_tests::{Agent, NatsServer, PrivateBus, TestService};

/// How long after its deadline a command may still be running (process exit, a loaded machine).
const GRACE: Duration = Duration::from_millis(1500);

fn last_line(text: &str) -> &str {
    text.trim_end().lines().last().unwrap_or("")
}

#[tokio::test]
async fn get_ends_disconnected_by_its_deadline_when_the_server_freezes() {
    let mut nats = NatsServer::start();
    let url = nats.url();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let agent = Agent::start(&url, bus.address(), &["--allow-all", "--hostname", "dl-a"]);
    wait_agents(&nats, 1).await;
    // A machine that takes its time: the agent is stopped, so the get waits for its reply.
    let agent_pid = agent.pid().expect("agent pid") as libc::pid_t;
    // SAFETY: signalling a child we started.
    unsafe { libc::kill(agent_pid, libc::SIGSTOP) };

    let timeout = Duration::from_secs(5);
    let run = Running::spawn(
        &url,
        &[
            "--timeout",
            "5s",
            "get",
            "org.cbus.Test",
            "/org/cbus/Test",
            "String",
        ],
    );
    // Freeze once the request is out (the CLI logs "asking" just before it publishes).
    let asked = run.wait_stderr("asking", Duration::from_millis(1500));
    nats.freeze();
    let frozen_at = run.started.elapsed();
    let (out, took) = run.finish(Duration::from_secs(30));
    nats.thaw();
    // SAFETY: as above.
    unsafe { libc::kill(agent_pid, libc::SIGCONT) };
    println!(
        "get, server frozen at {:.2}s (request seen: {asked}): exit {:?} after {:.2}s (deadline {:.1}s)",
        frozen_at.as_secs_f64(),
        out.status.code(),
        took.as_secs_f64(),
        timeout.as_secs_f64()
    );
    println!("  {}", last_line(&stderr(&out)));
    assert_eq!(out.status.code(), Some(2), "{}", both(&out));
    assert!(
        stderr(&out).contains("cbus: disconnected:"),
        "{}",
        both(&out)
    );
    assert!(
        !stderr(&out).contains("timed out after"),
        "machines blamed for the server's silence:\n{}",
        both(&out)
    );
    assert!(took <= timeout + GRACE, "took {took:?}\n{}", both(&out));
}

/// `cbus monitor` once it is subscribed: a signal sent after it started shows up.
fn monitor_following(url: &str, host: &str) -> Running {
    let run = Running::spawn(url, &["monitor", "--member", "Message"]);
    for i in 0..50 {
        emit(url, host, &format!("before {i}"));
        if run.stdout_line(Duration::from_millis(200)).is_some() {
            return run;
        }
    }
    panic!("monitor printed nothing");
}

#[tokio::test]
async fn monitor_ends_disconnected_when_the_server_dies() {
    let mut nats = NatsServer::start();
    let url = nats.url();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let _agent = Agent::start(&url, bus.address(), &["--allow-all", "--hostname", "dl-m"]);
    wait_agents(&nats, 1).await;
    let run = monitor_following(&url, "dl-m");
    let killed = Instant::now();
    nats.stop();
    let (out, _) = run.finish(Duration::from_secs(40));
    let took = killed.elapsed();
    // 10 reconnects with pauses of 0, 0.25, 0.5, 0.75 and then 1 s: about 7.5 s.
    let budget = Duration::from_millis(7500);
    println!(
        "monitor, server killed: exit {:?} {:.2}s after the kill (reconnect budget {:.1}s)",
        out.status.code(),
        took.as_secs_f64(),
        budget.as_secs_f64()
    );
    println!("  {}", last_line(&stderr(&out)));
    assert_eq!(out.status.code(), Some(2), "{}", both(&out));
    assert!(
        stderr(&out).contains("cbus: disconnected:"),
        "{}",
        both(&out)
    );
    assert!(took <= budget + GRACE * 2, "took {took:?}\n{}", both(&out));
    // It did try to reconnect rather than give up at once.
    assert!(took >= Duration::from_secs(3), "took {took:?}");
}

#[tokio::test]
async fn monitor_ends_disconnected_when_the_server_freezes() {
    let mut nats = NatsServer::start();
    let url = nats.url();
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let _agent = Agent::start(&url, bus.address(), &["--allow-all", "--hostname", "dl-f"]);
    wait_agents(&nats, 1).await;
    let run = monitor_following(&url, "dl-f");
    let frozen = Instant::now();
    nats.freeze();
    let (out, _) = run.finish(Duration::from_secs(60));
    let took = frozen.elapsed();
    nats.thaw();
    // Two unanswered pings (about 3 s), then 10 attempts that each wait out the 2 s connect
    // timeout (TCP connects, the handshake never comes), with 7.5 s of pauses between them.
    let budget = Duration::from_millis(3000 + 10 * 2000 + 7500);
    println!(
        "monitor, server frozen: exit {:?} {:.2}s after the freeze (budget {:.1}s)",
        out.status.code(),
        took.as_secs_f64(),
        budget.as_secs_f64()
    );
    println!("  {}", last_line(&stderr(&out)));
    assert_eq!(out.status.code(), Some(2), "{}", both(&out));
    assert!(
        stderr(&out).contains("cbus: disconnected:"),
        "{}",
        both(&out)
    );
    assert!(took <= budget + GRACE * 2, "took {took:?}\n{}", both(&out));
}
