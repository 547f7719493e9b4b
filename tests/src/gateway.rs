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
        Self::start_with(GatewayStart {
            nats_url,
            token: Some(token),
            port: Some(port),
            extra,
            ..Default::default()
        })
    }

    /// Starts a gateway as `opts` says and waits until it answers `/healthz`.
    pub fn start_with(opts: GatewayStart<'_>) -> GatewayProcess {
        let port = opts.port.unwrap_or_else(free_port);
        // CBUS_TEST_GATEWAY_BIN runs another build (e.g. the previous commit's, to see a test
        // fail on the code it fixes).
        let bin = opts
            .bin
            .clone()
            .or_else(|| std::env::var_os("CBUS_TEST_GATEWAY_BIN").map(std::path::PathBuf::from))
            .unwrap_or_else(|| bin_path("cbus-gateway"));
        let mut cmd = Command::new(bin);
        cmd.args(["--nats-url", opts.nats_url, "--listen"])
            .arg(format!("127.0.0.1:{port}"));
        if let Some(token) = opts.token {
            cmd.args(["--token", token]);
        }
        cmd.args(opts.extra)
            .envs(opts.env.iter().copied())
            .env(
                "RUST_LOG",
                opts.log_level.map(str::to_owned).unwrap_or_else(|| {
                    std::env::var("CBUS_GATEWAY_LOG").unwrap_or_else(|_| "warn".into())
                }),
            )
            .stdin(Stdio::null());
        if let Some(path) = &opts.stderr {
            cmd.stderr(std::fs::File::create(path).expect("gateway log file"));
        }
        if let Some(soft) = opts.nofile_soft {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let mut lim = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    lim.rlim_cur = soft.min(lim.rlim_max);
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("start cbus-gateway");
        let gw = GatewayProcess {
            child: Some(child),
            port,
            token: opts.token.unwrap_or_default().to_owned(),
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

/// How to start a gateway ([`GatewayProcess::start_with`]).
#[derive(Debug, Default, Clone)]
pub struct GatewayStart<'a> {
    pub nats_url: &'a str,
    /// `--token`; `None` lets the gateway generate one.
    pub token: Option<&'a str>,
    /// Listen port (default: a free one).
    pub port: Option<u16>,
    pub extra: &'a [&'a str],
    /// RUST_LOG (default: $CBUS_GATEWAY_LOG or `warn`).
    pub log_level: Option<&'a str>,
    /// Where stderr (the log) goes (default: inherited).
    pub stderr: Option<std::path::PathBuf>,
    /// Soft RLIMIT_NOFILE of the process, as a unit without LimitNOFILE= would give it (1024).
    pub nofile_soft: Option<u64>,
    /// Environment (settings given this way are ignored by a build that lacks them, where a
    /// flag would stop it from starting: for running a test against an older build).
    pub env: &'a [(&'a str, &'a str)],
    /// The gateway binary (default: $CBUS_TEST_GATEWAY_BIN, else this workspace's build), e.g.
    /// a previous build for a side-by-side benchmark.
    pub bin: Option<std::path::PathBuf>,
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

/// `GET path` with a given Host header; the status code and body (not decoded), or `None` when
/// the gateway closed the connection without an answer.
pub fn http_status(port: u16, path: &str, host: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
    Some((status, body.unwrap_or_default()))
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The value of a sample in a /metrics text, for the gateway tests and the bench.
pub use crate::util::sample;

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (tests that open many sockets).
pub fn raise_own_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only touch the struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// A small WebSocket client of the gateway's API.
pub struct WsClient {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl WsClient {
    /// Connects to `url`, with `Authorization: Bearer <token>` when given; the error is the
    /// refused handshake's (e.g. HTTP 503).
    pub async fn connect(
        url: &str,
        bearer: Option<&str>,
    ) -> Result<WsClient, tokio_tungstenite::tungstenite::Error> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
        let mut req = url.into_client_request()?;
        if let Some(t) = bearer {
            req.headers_mut().insert(
                "Authorization",
                format!("Bearer {t}").parse().expect("header value"),
            );
        }
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(req),
        )
        .await
        .map_err(|_| tokio_tungstenite::tungstenite::Error::ConnectionClosed)??;
        Ok(WsClient { ws })
    }

    pub async fn send(&mut self, v: serde_json::Value) {
        use futures::SinkExt as _;
        self.ws
            .send(tokio_tungstenite::tungstenite::Message::Text(
                v.to_string().into(),
            ))
            .await
            .expect("send");
    }

    /// The next JSON message (server pings skipped); `Err` with the close code and reason when
    /// the server closed; `None` on timeout.
    pub async fn next(
        &mut self,
        timeout: Duration,
    ) -> Option<Result<serde_json::Value, (u16, String)>> {
        use futures::StreamExt as _;
        use tokio_tungstenite::tungstenite::Message;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: serde_json::Value =
                        serde_json::from_str(t.as_str()).expect("server sends JSON");
                    if v["type"] == "ping" {
                        continue;
                    }
                    return Some(Ok(v));
                }
                Ok(Some(Ok(Message::Close(f)))) => {
                    return Some(Err(f
                        .map(|f| (u16::from(f.code), f.reason.as_str().to_owned()))
                        .unwrap_or((1005, String::new()))))
                }
                Ok(None) | Ok(Some(Err(_))) => return Some(Err((1006, String::new()))),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Reads until a message satisfies `pred` (returned) or `timeout` passes (`None`).
    pub async fn until(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(Ok(v)) if pred(&v) => return Some(v),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    }
}

/// One item of Prometheus' `scrape_configs:` (indented for [`Prometheus::start`]): the job
/// `job` scraping `/metrics` of each gateway port in `targets`, with the URL query `query`
/// (`collect[]=a&collect[]=b&shards=2&shard=0`, without `?`; empty for none) as the job's
/// `params:`, which is how a deployment passes them.
pub fn scrape_job(job: &str, query: &str, targets: &[u16]) -> String {
    let mut yml = format!("  - job_name: {job}\n");
    let mut params: Vec<(&str, Vec<&str>)> = Vec::new();
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        match params.iter_mut().find(|(name, _)| *name == k) {
            Some((_, vs)) => vs.push(v),
            None => params.push((k, vec![v])),
        }
    }
    if !params.is_empty() {
        yml.push_str("    params:\n");
        for (k, vs) in params {
            yml.push_str(&format!("      '{k}': ['{}']\n", vs.join("', '")));
        }
    }
    let targets: Vec<String> = targets.iter().map(|p| format!("'127.0.0.1:{p}'")).collect();
    yml.push_str(&format!(
        "    static_configs:\n      - targets: [{}]\n",
        targets.join(", ")
    ));
    yml
}

/// A real Prometheus server (Debian's `prometheus` package) with its data in a temporary
/// directory; stopped on drop.
pub struct Prometheus {
    pub port: u16,
    child: crate::util::KillOnDrop,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts one that scrapes every `interval` (also its timeout) with `scrape_configs`, the
    /// YAML list under `scrape_configs:` (each item indented by two spaces).
    pub fn start(interval: Duration, scrape_configs: &str) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let config = dir.path().join("prometheus.yml");
        let secs = interval.as_secs().max(1);
        std::fs::write(
            &config,
            format!("global:\n  scrape_interval: {secs}s\n  scrape_timeout: {secs}s\nscrape_configs:\n{scrape_configs}"),
        )
        .expect("write prometheus.yml");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run prometheus (apt-get install prometheus, or ./dev deps)");
        Prometheus {
            port,
            child: crate::util::KillOnDrop(child),
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// An instant query's result vector (`data.result`), `None` until the server answers.
    pub fn query(&self, promql: &str) -> Option<Vec<serde_json::Value>> {
        let q: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let text = http_get(self.port, &format!("/api/v1/query?query={q}"))?;
        let doc: serde_json::Value = serde_json::from_str(&text).ok()?;
        doc["data"]["result"].as_array().cloned()
    }
}
