//! The gateway against a network peer (issue #13): idle connections, connection floods,
//! WebSockets that never authenticate, DNS rebinding (a foreign Host header), and where a
//! generated token goes. Real nats-server and gateway binary; timeouts are set short so the tests
//! are quick, through the environment, so that `CBUS_TEST_GATEWAY_BIN=<older build>` runs the
//! same attacks against a build without these limits. Each prints its figures.

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use cbus_tests::gateway::{http_get, http_status, raise_own_nofile, sample};
use cbus_tests::{GatewayProcess, GatewayStart, NatsServer, WsClient};
use serde_json::json;

const TOKEN: &str = "limits-test-token-0123456789";

/// Opens `n` TCP connections that never send a byte.
fn idle_connections(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            // Paced a little, so the listen backlog (1,024) never overflows on a loaded host:
            // connections the kernel dropped would only arrive seconds later.
            if i % 100 == 99 {
                std::thread::sleep(Duration::from_millis(20));
            }
            TcpStream::connect(("127.0.0.1", port))
                .unwrap_or_else(|e| panic!("connection {i} of {n}: {e}"))
        })
        .collect()
}

/// How many of `conns` the server has closed (a read returns EOF or an error at once).
fn closed(conns: &[TcpStream]) -> usize {
    conns
        .iter()
        .filter(|c| {
            c.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
            let mut b = [0u8; 64];
            match (&**c).read(&mut b) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
            }
        })
        .count()
}

async fn authenticated_hello(gw: &GatewayProcess) -> Result<Duration, String> {
    let t = Instant::now();
    let mut ws = WsClient::connect(&gw.ws_url(), Some(TOKEN))
        .await
        .map_err(|e| e.to_string())?;
    ws.until(Duration::from_secs(5), |v| v["type"] == "hello")
        .await
        .ok_or("no hello")?;
    Ok(t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_lock_the_gateway_out() {
    cbus_tests::init_tracing();
    let limit = raise_own_nofile();
    assert!(
        limit >= 4096,
        "this test needs RLIMIT_NOFILE >= 4096, have {limit}"
    );
    let nats = NatsServer::start();
    // 1,024 open files: what a unit without LimitNOFILE= gets.
    let gw = GatewayProcess::start_with(GatewayStart {
        nats_url: &nats.url(),
        token: Some(TOKEN),
        env: &[("CBUS_GATEWAY_HEADER_TIMEOUT", "8s")],
        nofile_soft: Some(1024),
        ..Default::default()
    });
    let conns = idle_connections(gw.port, 1100);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let t = Instant::now();
    let metrics = tokio::task::spawn_blocking({
        let port = gw.port;
        move || http_get(port, "/metrics")
    })
    .await
    .unwrap();
    let metrics_took = t.elapsed();
    let ws = authenticated_hello(&gw).await;
    eprintln!(
        "with 1,100 idle connections: /metrics {} in {metrics_took:?}, authenticated WebSocket {ws:?}",
        if metrics.is_some() { "answered" } else { "did not answer" },
    );
    let text = metrics.expect("/metrics answers while 1,100 idle connections are open");
    assert!(
        metrics_took < Duration::from_secs(3),
        "/metrics took {metrics_took:?}"
    );
    let ws = ws.expect("an authenticated WebSocket answers");
    assert!(ws < Duration::from_secs(3), "hello took {ws:?}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", gw.pid().unwrap())).unwrap();
    eprintln!(
        "{}",
        limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap_or("")
    );
    drop(text);
    // Accepting 1,100 connections takes a moment on a loaded host.
    let counted = cbus_tests::wait_for(Duration::from_secs(10), || async {
        let text = http_get(gw.port, "/metrics").unwrap_or_default();
        sample(&text, "cbus_gateway_connections").unwrap_or(0.0) >= 1100.0
    })
    .await;
    assert!(
        counted,
        "the gateway accepted and counts the 1,100 connections"
    );

    // They never sent a request: closed once the header timeout passed.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut n = closed(&conns);
    while n < conns.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        n = closed(&conns);
    }
    eprintln!(
        "{n} of {} idle connections closed by the 8 s header timeout",
        conns.len()
    );
    assert_eq!(
        n,
        conns.len(),
        "idle connections are closed after the header timeout"
    );
    let left = sample(
        &http_get(gw.port, "/metrics").unwrap(),
        "cbus_gateway_connections",
    );
    assert!(left < Some(10.0), "connections left open: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_at_once() {
    cbus_tests::init_tracing();
    raise_own_nofile();
    let nats = NatsServer::start();
    let gw = GatewayProcess::start_with(GatewayStart {
        nats_url: &nats.url(),
        token: Some(TOKEN),
        env: &[
            ("CBUS_GATEWAY_MAX_CONNECTIONS", "100"),
            ("CBUS_GATEWAY_HEADER_TIMEOUT", "3s"),
        ],
        ..Default::default()
    });
    let conns = idle_connections(gw.port, 150);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = closed(&conns);
    eprintln!("150 idle connections against --max-connections 100: {refused} closed at once");
    assert!(
        (50..=52).contains(&refused),
        "{refused} of 150 closed at once, expected the 50 over the cap"
    );
    // The idle ones time out and free their slots; the gateway serves again.
    let back = cbus_tests::wait_for(Duration::from_secs(10), || async {
        http_get(gw.port, "/healthz").is_some()
    })
    .await;
    assert!(back, "the gateway serves again after the header timeout");
    let text = http_get(gw.port, "/metrics").unwrap();
    let counted = sample(
        &text,
        "cbus_gateway_dropped_total{reason=\"connection_limit\"}",
    );
    assert!(counted >= Some(50.0), "refusals are counted: {counted:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_that_do_not_authenticate_are_capped_and_timed_out() {
    cbus_tests::init_tracing();
    let nats = NatsServer::start();
    let gw = GatewayProcess::start_with(GatewayStart {
        nats_url: &nats.url(),
        token: Some(TOKEN),
        env: &[
            ("CBUS_GATEWAY_MAX_UNAUTHENTICATED", "4"),
            ("CBUS_GATEWAY_AUTH_TIMEOUT", "2s"),
        ],
        ..Default::default()
    });
    let mut pending = Vec::new();
    for _ in 0..4 {
        pending.push(
            WsClient::connect(&gw.ws_url(), None)
                .await
                .expect("upgrade"),
        );
    }
    let fifth = WsClient::connect(&gw.ws_url(), None).await;
    let hello = authenticated_hello(&gw).await;
    eprintln!(
        "4 unauthenticated WebSockets open: a 5th {}, an authenticated one {hello:?}",
        match &fifth {
            Ok(_) => "was accepted".to_owned(),
            Err(e) => format!("was refused ({e})"),
        }
    );
    assert!(
        matches!(&fifth, Err(e) if e.to_string().contains("503")),
        "a 5th unauthenticated WebSocket is refused with 503"
    );
    hello.expect("an authenticated client still gets in");
    let t = Instant::now();
    for ws in &mut pending {
        let end = ws.next(Duration::from_secs(5)).await;
        assert_eq!(
            end,
            Some(Err((4401, "authentication timed out".into()))),
            "closed after the auth timeout"
        );
    }
    eprintln!("the 4 were closed after {:?}", t.elapsed());
    // Their slots are free again.
    let mut again = WsClient::connect(&gw.ws_url(), None)
        .await
        .expect("a slot is free again");
    again.send(json!({"type": "auth", "token": TOKEN})).await;
    assert!(again
        .until(Duration::from_secs(5), |v| v["type"] == "hello")
        .await
        .is_some());
    let text = http_get(gw.port, "/metrics").unwrap();
    assert_eq!(
        sample(
            &text,
            "cbus_gateway_dropped_total{reason=\"unauthenticated_limit\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_host_header_is_refused() {
    cbus_tests::init_tracing();
    let nats = NatsServer::start();
    let gw = GatewayProcess::start_with(GatewayStart {
        nats_url: &nats.url(),
        token: Some(TOKEN),
        env: &[("CBUS_GATEWAY_ALLOW_HOST", "gw.example")],
        ..Default::default()
    });
    let port = gw.port;
    let results = tokio::task::spawn_blocking(move || {
        let mut r = Vec::new();
        for path in ["/metrics", "/", "/app.js", "/ws"] {
            for host in [
                "evil.example".to_owned(),
                format!("evil.example:{port}"),
                format!("127.0.0.1:{port}"),
                format!("localhost:{port}"),
                format!("gw.example:{port}"),
            ] {
                r.push((
                    path,
                    host.clone(),
                    http_status(port, path, &host).map(|x| x.0),
                ));
            }
        }
        r
    })
    .await
    .unwrap();
    for (path, host, status) in &results {
        eprintln!("GET {path} Host: {host} -> {status:?}");
        let foreign = host.starts_with("evil.");
        if foreign {
            assert_eq!(*status, Some(421), "GET {path} with Host {host}");
        } else if *path == "/ws" {
            // Not an upgrade request: the WebSocket handler's own refusal, past the Host check.
            assert_ne!(*status, Some(421), "GET {path} with Host {host}");
        } else {
            assert_eq!(*status, Some(200), "GET {path} with Host {host}");
        }
    }
    // A real WebSocket upgrade under a foreign name is refused too.
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(gw.ws_url())
            .unwrap();
    req.headers_mut()
        .insert("Host", "evil.example".parse().unwrap());
    req.headers_mut()
        .insert("Authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let upgrade = tokio_tungstenite::connect_async(req).await;
    eprintln!(
        "WebSocket upgrade with Host: evil.example -> {:?}",
        upgrade.as_ref().err()
    );
    assert!(
        matches!(&upgrade, Err(e) if e.to_string().contains("421")),
        "upgrade refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_token_goes_to_a_private_file_not_to_the_log() {
    use std::os::unix::fs::PermissionsExt as _;
    cbus_tests::init_tracing();
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("client-token");
    let log = dir.path().join("gateway.log");
    let token_arg = token_file.to_string_lossy().into_owned();
    let gw = GatewayProcess::start_with(GatewayStart {
        nats_url: &nats.url(),
        token: None,
        env: &[("CBUS_GATEWAY_GENERATED_TOKEN_FILE", &token_arg)],
        log_level: Some("debug"),
        stderr: Some(log.clone()),
        ..Default::default()
    });
    let token = std::fs::read_to_string(&token_file).expect("the token file was written");
    let token = token.trim();
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    let text = std::fs::read_to_string(&log).unwrap();
    eprintln!(
        "token file mode {mode:o}, {} bytes; the log mentions the file: {}, the token: {}",
        token.len(),
        text.contains(&token_arg),
        text.contains(token)
    );
    assert_eq!(token.len(), 64);
    assert_eq!(mode, 0o600, "only its owner may read the token");
    assert!(!text.contains(token), "the token is in the log:\n{text}");
    assert!(text.contains(&token_arg), "the log says where the token is");
    let mut ws = WsClient::connect(&gw.ws_url(), Some(token))
        .await
        .expect("ws");
    assert!(
        ws.until(Duration::from_secs(5), |v| v["type"] == "hello")
            .await
            .is_some(),
        "the file's token authenticates"
    );
}
