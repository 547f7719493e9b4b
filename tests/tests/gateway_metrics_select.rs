//! `/metrics`' URL parameters (`collect[]`, `exclude[]`, `shards`/`shard`, docs/metrics.md *At
//! scale*) on a real gateway following the **fleet emulator** (emulated agents speaking the
//! agent's wire protocol, `cbus_tests::emulator`) over a real nats-server: the text checked by
//! promtool, and scraped by a real Prometheus server whose jobs pass the parameters as an
//! operator's `params:` would.

use std::collections::BTreeSet;
use std::time::Duration;

use cbus_tests::emulator::{Emulator, EmulatorSpec};
use cbus_tests::gateway::{http_get, http_status, promtool_errors, scrape_job, Prometheus};
use cbus_tests::{GatewayProcess, NatsServer};

const MACHINES: usize = 60;
const UNITS: usize = 20;

fn promtool_ok(text: &str) {
    if let Some(report) = promtool_errors(text) {
        panic!("promtool: {report}\n{text}");
    }
}

/// The series (name and labels, without the value) of a text's samples.
fn series(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| Some(l.rsplit_once(' ')?.0.to_owned()))
        .collect()
}

/// The families a text declares.
fn families(text: &str) -> BTreeSet<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .collect()
}

/// (host, unit, state) of every unit a state family says is in that state.
fn states(text: &str, one_hot: bool) -> BTreeSet<(String, String, String)> {
    let prefix = if one_hot {
        "cbus_systemd_unit_state{"
    } else {
        "cbus_systemd_unit_active_state{"
    };
    text.lines()
        .filter(|l| l.starts_with(prefix) && l.ends_with(" 1"))
        .filter_map(|l| {
            let label = |name: &str| {
                let start = l
                    .find(&format!(",{name}=\""))
                    .or_else(|| l.find(&format!("{{{name}=\"")))?
                    + name.len()
                    + 3;
                let end = start + l[start..].find('"')?;
                Some(l[start..end].to_owned())
            };
            Some((label("host")?, label("name")?, label("state")?))
        })
        .collect()
}

const COMPACT: &str = "collect[]=cbus_agent_up&collect[]=cbus_systemd_unit_active_state";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_chooses_its_families_and_its_shard_of_machines() {
    let nats = NatsServer::start();
    let gateway = GatewayProcess::start(&nats.url(), "select-token", &[]);
    let port = gateway.port;
    let mut spec = EmulatorSpec::new(MACHINES);
    spec.units = UNITS;
    spec.heartbeat = Duration::from_secs(2);
    let emulator = Emulator::start(&nats.url(), &spec).await;
    let get = |path: &str| http_get(port, path).unwrap_or_default();
    let loaded = cbus_tests::wait_for(Duration::from_secs(60), || async {
        states(&get("/metrics"), true).len() == MACHINES * UNITS
    })
    .await;
    assert!(
        loaded,
        "the gateway never held every unit:\n{}",
        get("/metrics")
    );
    // Some units in other states than the emulator's start, signalled as systemd does.
    for i in [3, 17, 40] {
        assert!(emulator.change_unit(i, "emu-003.service", "failed").await);
    }
    emulator.flush().await;
    let changed = cbus_tests::wait_for(Duration::from_secs(20), || async {
        let text = get("/metrics");
        states(&text, true)
            .iter()
            .filter(|(_, _, s)| s == "failed")
            .count()
            >= 3
    })
    .await;
    assert!(changed, "the failed units never showed");

    // The default scrape has no opt-in family; collect[] serves exactly what it names, and
    // the compact family says what the one-hot says, unit for unit.
    let all = get("/metrics");
    promtool_ok(&all);
    assert!(
        !all.contains("cbus_systemd_unit_active_state"),
        "opt-in only"
    );
    let compact = get(&format!("/metrics?{COMPACT}"));
    promtool_ok(&compact);
    assert_eq!(
        families(&compact),
        BTreeSet::from(["cbus_agent_up", "cbus_systemd_unit_active_state"])
    );
    assert_eq!(states(&compact, false), states(&all, true));
    assert_eq!(
        compact
            .lines()
            .filter(|l| l.starts_with("cbus_systemd_unit_active_state{"))
            .count(),
        MACHINES * UNITS,
        "one series per unit"
    );
    // Percent-encoded brackets, as Prometheus sends them.
    let excluded =
        get("/metrics?exclude%5B%5D=cbus_systemd_unit_state&exclude%5B%5D=agent_metrics");
    promtool_ok(&excluded);
    let forwarded = get("/metrics?collect[]=agent_metrics");
    let mut expected = families(&all);
    expected.remove("cbus_systemd_unit_state");
    expected.retain(|f| !families(&forwarded).contains(f));
    assert_eq!(families(&excluded), expected);
    assert!(!excluded.contains("cbus_systemd_unit_state{"));

    // Three shards hold every series of the default scrape, each once. Details the gateway
    // reads after ListUnits (a service's Type, restart and task counts) change series while
    // they land, so the comparison waits for two whole scrapes in a row to agree.
    let mut before = series(&get("/metrics"));
    let settled = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = series(&get("/metrics"));
        if now == before {
            break;
        }
        assert!(
            std::time::Instant::now() < settled,
            "the gateway's series never settled"
        );
        before = now;
    }
    let mut union = BTreeSet::new();
    let mut total = 0;
    for i in 0..3 {
        let shard = get(&format!("/metrics?shards=3&shard={i}"));
        promtool_ok(&shard);
        let s = series(&shard);
        assert!(
            s.iter().any(|l| l.starts_with("cbus_agent_up{")),
            "shard {i} has machines"
        );
        total += s.len();
        union.extend(s);
    }
    assert_eq!(total, union.len(), "no series in two shards");
    assert_eq!(union, before, "the shards hold the whole scrape's series");

    // A typo is a failed scrape, with the reason.
    for (query, reason) in [
        ("collect[]=cbus_systemd_unit_stat", "unknown family"),
        (
            "collect[]=cbus_agent_up&exclude[]=agent_metrics",
            "cannot be combined",
        ),
        ("shards=3", "shard"),
        ("colect[]=cbus_agent_up", "unknown parameter"),
    ] {
        let (status, body) =
            http_status(port, &format!("/metrics?{query}"), "127.0.0.1").expect("an answer");
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains(reason), "{query}: {body}");
    }

    // A real Prometheus passes `params:` as the gateway reads them: the compact job stores one
    // series per unit, and two shard jobs every machine once between them.
    let prom = Prometheus::start(
        Duration::from_secs(1),
        &[
            scrape_job(
                "compact",
                "collect[]=cbus_agent_up&collect[]=cbus_systemd_unit_active_state",
                &[port],
            ),
            scrape_job("shard-0", "shards=2&shard=0", &[port]),
            scrape_job("shard-1", "shards=2&shard=1", &[port]),
        ]
        .concat(),
    );
    let count = |q: &str| {
        prom.query(q)
            .and_then(|r| r.first()?["value"][1].as_str()?.parse::<usize>().ok())
            .unwrap_or(0)
    };
    let scraped = cbus_tests::wait_for(Duration::from_secs(60), || async {
        count("count(cbus_systemd_unit_active_state{job=\"compact\"})") == MACHINES * UNITS
            && count("count(cbus_agent_up{job=~\"shard-.\"})") == MACHINES
    })
    .await;
    assert!(
        scraped,
        "Prometheus stored {} compact unit series and {} shard machines",
        count("count(cbus_systemd_unit_active_state{job=\"compact\"})"),
        count("count(cbus_agent_up{job=~\"shard-.\"})")
    );
    assert_eq!(count("count(cbus_systemd_unit_state{job=\"compact\"})"), 0);
    assert_eq!(
        count("count(cbus_systemd_unit_active_state{job=\"compact\",state=\"failed\"})"),
        3
    );
    for job in ["shard-0", "shard-1"] {
        assert!(
            count(&format!("count(cbus_agent_up{{job=\"{job}\"}})")) > 0,
            "{job} has machines"
        );
    }
    assert_eq!(
        count("count(count by (host) (cbus_agent_up{job=~\"shard-.\"}))"),
        MACHINES,
        "every machine in one shard"
    );
    assert_eq!(
        count("count(up{job=~\"compact|shard-.\"} == 1)"),
        3,
        "every job's scrape succeeds"
    );
}
