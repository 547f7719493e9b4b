//! The dashboard in real headless Chromium (driven by playwright-core, tests/dashboard/
//! dashboard.mjs) against the gateway, real agents and two real systemd machines: login, the
//! machines x units table, stop on one machine (checked over that machine's bus), the signal
//! log, a bulk start with per-machine results, the object browser with a property edit, an
//! unresponsive machine, and reconnecting after the gateway restarts. Screenshots go to
//! /tmp/cbus-dashboard-*.png.
//!
//! Chromium (Debian package) and playwright-core (npm, into target/playwright) are installed
//! when missing (`cbus_tests::browser`), so this runs from a fresh clone.

use std::time::Duration;

use cbus_tests::browser::{browser_deps, Script};
use cbus_tests::{Agent, GatewayProcess, Machine, MachineSpec, NatsServer};

const TOKEN: &str = "dashboard-test-token-42";
const UNIT: &str = "gw-sleeper.service";
const UNIT_PATH: &str = "/org/freedesktop/systemd1/unit/gw_2dsleeper_2eservice";
// No start rate limit: the test starts and restarts it several times in a few seconds, and a
// start past systemd's default limit (5 in 10 s) would fail it with start-limit-hit.
const SLEEPER: &str = "[Unit]\nDescription=gateway sleeper\nStartLimitIntervalSec=0\n[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n";

async fn property(m: &Machine, path: &str, iface: &str, name: &str) -> String {
    let conn = zbus::connection::Builder::address(m.bus_address().as_str())
        .expect("bus address")
        .build()
        .await
        .expect("connect to the machine's bus");
    let proxy = zbus::Proxy::new(
        &conn,
        "org.freedesktop.systemd1",
        path.to_owned(),
        iface.to_owned(),
    )
    .await
    .expect("proxy");
    proxy
        .get_property::<String>(name)
        .await
        .expect("get property")
}

async fn active_state(m: &Machine) -> String {
    property(m, UNIT_PATH, "org.freedesktop.systemd1.Unit", "ActiveState").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_headless_chromium() {
    cbus_tests::init_tracing();
    let pw_dir = tokio::task::spawn_blocking(browser_deps)
        .await
        .expect("browser deps");
    let nats = NatsServer::start();
    let fleet = tokio::task::spawn_blocking(|| {
        let specs: Vec<MachineSpec> = ["dash-a", "dash-b"]
            .iter()
            .map(|name| {
                let mut s = MachineSpec::new(*name).with_unit(UNIT, SLEEPER);
                s.enable.push(UNIT.into());
                s
            })
            .collect();
        cbus_tests::Fleet::boot(&specs)
    })
    .await
    .expect("boot machines");
    let (a, b) = (fleet.get("dash-a"), fleet.get("dash-b"));
    let start_agent =
        |m: &Machine| Agent::on_machine(&nats.url(), m, &["--hostname", &m.name, "--allow-all"]);
    let _agent_a = start_agent(a);
    let mut agent_b = start_agent(b);
    let mut gw = GatewayProcess::start(&nats.url(), TOKEN, &["--ws-heartbeat", "1s"]);
    let port = gw.port;

    let env = [
        ("GATEWAY_URL", gw.base_url()),
        ("TOKEN", TOKEN.into()),
        ("UNIT", UNIT.into()),
        ("HOST_A", a.name.clone()),
        ("HOST_B", b.name.clone()),
        ("SHOTS", "/tmp/cbus-dashboard".into()),
    ];
    let mut script = Script::start(&pw_dir, "dashboard.mjs", env, Duration::from_secs(240));
    while let Some(line) = script.next_line().await {
        match line.as_str() {
            "STEP STOPPED" => {
                assert_eq!(active_state(a).await, "inactive", "stop reached machine A");
                assert_eq!(active_state(b).await, "active", "machine B untouched");
            }
            "STEP EDITED" => {
                let level = property(
                    a,
                    "/org/freedesktop/systemd1",
                    "org.freedesktop.systemd1.Manager",
                    "LogLevel",
                )
                .await;
                assert_eq!(level, "debug", "property edit reached machine A");
                a.exec(&["systemd-analyze", "log-level", "info"]);
            }
            "STEP KILL_B" => agent_b.kill(),
            "STEP STOP_GATEWAY" => gw.stop(),
            "STEP START_GATEWAY" => {
                gw = GatewayProcess::start_on(&nats.url(), TOKEN, port, &["--ws-heartbeat", "1s"]);
            }
            _ => {}
        }
    }
    script.finish().await;
    assert_eq!(
        active_state(a).await,
        "active",
        "bulk start reached machine A"
    );
    drop(gw);
}
