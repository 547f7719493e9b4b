//! A real `cbus-gateway` process for tests, plus the small HTTP and promtool helpers the gateway
//! tests share.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::bins::bin_path;
use crate::util::{free_port, terminate};

/// A running gateway; stopped on drop.
pub struct GatewayProcess {
    child: Option<Child>,
    pub port: u16,
    pub token: String,
}

impl GatewayProcess {
    /// Starts `cbus-gateway --nats-url URL --listen 127.0.0.1:<free> --token <token>` plus
    /// `extra`, and waits until it answers `/healthz`.
    pub fn start(nats_url: &str, token: &str, extra: &[&str]) -> GatewayProcess {
        Self::start_on(nats_url, token, free_port(), extra)
    }

    /// Like [`GatewayProcess::start`] on a given port (to restart a gateway where clients
    /// expect it).
    pub fn start_on(nats_url: &str, token: &str, port: u16, extra: &[&str]) -> GatewayProcess {
        let child = Command::new(bin_path("cbus-gateway"))
            .args(["--nats-url", nats_url, "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["--token", token])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("CBUS_GATEWAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .expect("start cbus-gateway");
        let gw = GatewayProcess {
            child: Some(child),
            port,
            token: token.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_get(port, "/healthz").is_none() {
            assert!(Instant::now() < deadline, "cbus-gateway did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        gw
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    /// PID of the gateway process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, Duration::from_secs(5));
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `GET path` over HTTP/1.1; the body when the status is 200 (chunked bodies are decoded).
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    if !chunked {
        return Some(body.to_owned());
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).ok()?;
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    Some(out)
}

/// Runs `promtool check metrics` on `text`; returns promtool's report when the exposition is
/// invalid. Lint remarks (exit 3, e.g. counters without `_total`) are not failures.
pub fn promtool_errors(text: &str) -> Option<String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (apt-get install prometheus)");
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes()).expect("write to promtool");
    }
    let out = child.wait_with_output().expect("wait for promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let failed = !matches!(out.status.code(), Some(0) | Some(3))
        || report.contains("error while linting")
        || report.contains("parse");
    failed.then_some(report)
}
