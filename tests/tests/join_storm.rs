//! A join storm: a real nats-server restarts under a real gateway following 1,000 machines of
//! the **fleet emulator** (emulated agents speaking the agent's wire protocol; see
//! `cbus_tests::emulator`), so every machine reconnects at once. Units changed while NATS was
//! away (no signal reached anyone) must be in the gateway's state afterwards: it re-reads every
//! machine with bounded concurrency, and ends with exactly the emulator's truth, without
//! unbounded memory.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use cbus_tests::emulator::{Emulator, EmulatorSpec};
use cbus_tests::gateway::{http_get, rss_kib};
use cbus_tests::{GatewayProcess, NatsServer};

const MACHINES: usize = 1_000;
const UNITS: usize = 20;

/// (host, unit, state) of every unit whose state series is 1 in a /metrics text.
fn gateway_view(text: &str) -> BTreeSet<(String, String, String)> {
    text.lines()
        .filter(|l| l.starts_with("cbus_systemd_unit_state{") && l.ends_with(" 1"))
        .filter_map(|l| {
            let label = |name: &str| {
                let start = l.find(&format!("{name}=\""))? + name.len() + 2;
                let end = start + l[start..].find('"')?;
                Some(l[start..end].to_owned())
            };
            Some((label("host")?, label("name")?, label("state")?))
        })
        .collect()
}

fn truth(emulator: &Emulator) -> BTreeSet<(String, String, String)> {
    emulator
        .agents
        .iter()
        .flat_map(|a| {
            a.units()
                .into_iter()
                .map(|(name, active)| (a.info.hostname.clone(), name, active))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_join_storm_the_gateway_holds_every_machines_exact_units() {
    let mut nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), "storm-token", &[]);
    let mut spec = EmulatorSpec::new(MACHINES);
    spec.units = UNITS;
    spec.heartbeat = Duration::from_secs(2);
    let emulator = Emulator::start(&nats.url(), &spec).await;
    let metrics = || http_get(gateway.port, "/metrics").unwrap_or_default();

    let loaded = cbus_tests::wait_for(Duration::from_secs(120), || async {
        gateway_view(&metrics()) == truth(&emulator)
    })
    .await;
    assert!(
        loaded,
        "the gateway never held the emulator's {} units ({} seen)",
        MACHINES * UNITS,
        gateway_view(&metrics()).len()
    );
    let rss_before = rss_kib(gateway.pid().expect("gateway pid"));

    // NATS goes away; meanwhile units change on a tenth of the machines; NATS comes back and
    // every emulated agent and the gateway reconnect at once.
    nats.stop();
    for i in (0..MACHINES).step_by(10) {
        emulator.set_unit(i, "emu-003.service", "failed");
        emulator.set_unit(i, &format!("emu-own-{i:05}.service"), "inactive");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.restart();
    let restarted = Instant::now();
    let expected = truth(&emulator);
    let caught_up = cbus_tests::wait_for(Duration::from_secs(60), || async {
        gateway_view(&metrics()) == expected
    })
    .await;
    let view = gateway_view(&metrics());
    assert!(
        caught_up,
        "60 s after the restart the gateway differs from the truth: {} missing, {} extra (e.g. {:?})",
        expected.difference(&view).count(),
        view.difference(&expected).count(),
        expected.difference(&view).next()
    );
    let rss_after = rss_kib(gateway.pid().expect("gateway pid"));
    println!(
        "join storm of {MACHINES} machines x {UNITS} units: the gateway equal to the truth {:?} after the restart; RSS {} -> {} MiB",
        restarted.elapsed(),
        rss_before / 1024,
        rss_after / 1024
    );
    assert!(
        rss_after < rss_before * 2 + 50 * 1024,
        "gateway memory grew from {rss_before} to {rss_after} KiB"
    );
}
