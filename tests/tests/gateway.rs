//! cbus-gateway's /metrics against a real systemd machine and agent, checked by promtool.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use cbus_tests::{bin_path, free_port, Agent, MachineSpec, NatsServer};

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// axum answers small bodies without chunking only sometimes; strip chunk sizes if present.
fn metrics(port: u16) -> String {
    let body = http_get(port, "/metrics").unwrap_or_default();
    if body
        .lines()
        .next()
        .is_some_and(|l| u64::from_str_radix(l.trim(), 16).is_ok() && !l.contains(' '))
    {
        let mut out = String::new();
        let mut rest = body.as_str();
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
                break;
            };
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        body
    }
}

fn promtool_ok(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (apt-get install prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    // promtool exits 0 when the format is valid; lint remarks (e.g. counters without _total) go
    // to stdout with exit 3, so only parse errors fail here.
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !report.contains("error while linting") && !report.contains("parse"),
        "promtool: {report}\n{text}"
    );
}

const SLEEPER: &str = "[Unit]\nDescription=gateway sleeper\n[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n";

#[tokio::test]
async fn metrics_from_cache_follow_real_units() {
    let nats = NatsServer::start();
    let machines = tokio::task::spawn_blocking(|| {
        let mut spec = MachineSpec::new("gw-1").with_unit("gw-sleeper.service", SLEEPER);
        spec.enable.push("gw-sleeper.service".into());
        cbus_tests::Fleet::boot(&[spec])
    })
    .await
    .unwrap();
    let m = &machines.machines[0];
    let mut agent = Agent::start_with_key(
        &nats.url(),
        &m.bus_address(),
        &m.host_key_path(),
        &["--hostname", "gw-1", "--metrics-interval", "300ms"],
    );
    let port = free_port();
    let _gateway = Gateway(
        Command::new(bin_path("cbus-gateway"))
            .args([
                "--nats-url",
                &nats.url(),
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .env(
                "RUST_LOG",
                std::env::var("CBUS_GATEWAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .spawn()
            .expect("start cbus-gateway"),
    );

    let line = |state: &str, v: u8| {
        format!("cbus_systemd_unit_state{{host=\"gw-1\",name=\"gw-sleeper.service\",type=\"service\",state=\"{state}\"}} {v}")
    };
    let seen = cbus_tests::wait_for(Duration::from_secs(20), || async {
        metrics(port).contains(&line("active", 1))
    })
    .await;
    assert!(seen, "unit state never exported:\n{}", metrics(port));
    let text = metrics(port);
    promtool_ok(&text);
    assert!(
        text.contains(&format!(
            "cbus_agent_up{{host=\"gw-1\",nkey=\"{}\"}} 1",
            agent.nkey
        )),
        "{text}"
    );
    assert!(
        !text.contains(".mount\""),
        "node_exporter's default excludes apply"
    );
    let forwarded = cbus_tests::wait_for(Duration::from_secs(10), || async {
        metrics(port).contains("cbus_agent_requests_total{host=\"gw-1\"")
    })
    .await;
    assert!(forwarded, "agent metrics not forwarded:\n{}", metrics(port));
    promtool_ok(&metrics(port));

    // A change on the machine reaches the cache through PropertiesChanged, not through a scrape.
    let out = m.exec(&["systemctl", "stop", "gw-sleeper.service"]);
    assert!(out.status.success());
    let stopped = cbus_tests::wait_for(Duration::from_secs(10), || async {
        metrics(port).contains(&line("inactive", 1))
    })
    .await;
    assert!(stopped, "stop not reflected:\n{}", metrics(port));

    // An agent that goes silent is reported down.
    agent.kill();
    let down = cbus_tests::wait_for(Duration::from_secs(10), || async {
        metrics(port).contains(&format!(
            "cbus_agent_up{{host=\"gw-1\",nkey=\"{}\"}} 0",
            agent.nkey
        ))
    })
    .await;
    assert!(down, "silent agent still up");
}

/// Kills the gateway also when an assertion fails.
struct Gateway(std::process::Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
