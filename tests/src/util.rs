//! Small helpers shared by the fixtures and tests.

use std::future::Future;
use std::net::TcpListener;
use std::time::{Duration, Instant};

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind an ephemeral port on 127.0.0.1")
}

/// What a synthetic agent (one that only talks NATS, for load and registry tests) says about
/// itself: started now, system bus connected, 5 s heartbeat, no labels.
pub fn synthetic_agent_info(
    nkey: impl Into<String>,
    hostname: impl Into<String>,
) -> cbus_protocol::presence::AgentInfo {
    let now = cbus_protocol::presence::now_ms();
    cbus_protocol::presence::AgentInfo {
        nkey: nkey.into(),
        hostname: hostname.into(),
        version: cbus_protocol::VERSION.into(),
        bus: "system".into(),
        started_at_ms: now,
        heartbeat_ms: 5000,
        bus_connected: true,
        labels: Default::default(),
        rtt_ms: None,
    }
}

/// Polls `condition` until it returns true or `timeout` passes; returns whether it held.
pub async fn wait_for<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Logs from tests, filtered by RUST_LOG; safe to call more than once.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILL. Returns once the child is reaped.
pub fn terminate(child: &mut std::process::Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: kill(2) with a pid we own; no memory is touched.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A child process that is terminated (SIGTERM, then SIGKILL after 5 s) when this is dropped,
/// also when the test panics.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        terminate(&mut self.0, Duration::from_secs(5));
    }
}

/// The value of a sample in Prometheus text (`name{labels}` exactly as rendered), e.g.
/// `cbus_agent_signals_dropped_total`.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}
