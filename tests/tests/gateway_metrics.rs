//! cbus-gateway's /metrics against a real systemd machine and agent, checked by promtool.

use std::time::Duration;

use cbus_tests::gateway::{http_get, promtool_errors};
use cbus_tests::{Agent, GatewayProcess, MachineSpec, NatsServer};

fn metrics(port: u16) -> String {
    http_get(port, "/metrics").unwrap_or_default()
}

fn promtool_ok(text: &str) {
    if let Some(report) = promtool_errors(text) {
        panic!("promtool: {report}\n{text}");
    }
}

const SLEEPER: &str = "[Unit]\nDescription=gateway sleeper\n[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n";

#[tokio::test]
async fn metrics_from_cache_follow_real_units() {
    let mut nats = NatsServer::start();
    let machines = tokio::task::spawn_blocking(|| {
        let mut spec = MachineSpec::new("gw-1").with_unit("gw-sleeper.service", SLEEPER);
        spec.enable.push("gw-sleeper.service".into());
        cbus_tests::Fleet::boot(&[spec])
    })
    .await
    .unwrap();
    let m = &machines.machines[0];
    let mut agent = Agent::on_machine(
        &nats.url(),
        m,
        &["--hostname", "gw-1", "--metrics-interval", "300ms"],
    );
    let gateway = GatewayProcess::start(&nats.url(), "metrics-test-token", &[]);
    let port = gateway.port;

    let line = |state: &str, v: u8| {
        format!("cbus_systemd_unit_state{{host=\"gw-1\",name=\"gw-sleeper.service\",type=\"simple\",state=\"{state}\"}} {v}")
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
    // The unit's states as labels (its unit-file state depends on how the test made it).
    assert!(
        text.lines().any(|l| l.starts_with(
            "cbus_systemd_unit_info{host=\"gw-1\",name=\"gw-sleeper.service\",type=\"service\",service_type=\"simple\",mount_type=\"\",load_state=\"loaded\",active_state=\"active\",sub_state=\"running\",unit_file_state=\""
        ) && l.ends_with("} 1")),
        "{text}"
    );
    // The per-state counts agree with the one-hot series they summarise.
    let active = text
        .lines()
        .filter(|l| {
            l.starts_with("cbus_systemd_unit_state{host=\"gw-1\"")
                && l.ends_with("state=\"active\"} 1")
        })
        .count();
    assert!(
        text.contains(&format!(
            "cbus_systemd_units{{host=\"gw-1\",state=\"active\"}} {active}"
        )),
        "{text}"
    );
    assert!(text.contains("cbus_build_info{version=\""), "{text}");
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

    // NATS goes away while the unit starts; once everyone reconnected the cache catches up.
    nats.stop();
    let out = m.exec(&["systemctl", "start", "gw-sleeper.service"]);
    assert!(out.status.success());
    nats.restart();
    let caught_up = cbus_tests::wait_for(Duration::from_secs(40), || async {
        metrics(port).contains(&line("active", 1))
    })
    .await;
    assert!(
        caught_up,
        "change during the NATS outage never arrived:\n{}",
        metrics(port)
    );

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
