//! `scale`: the CLI at fleet sizes beyond what this machine holds as real agents, with the
//! **fleet emulator** (`cbus_tests::emulator`), and the overlap that keeps it honest: the same
//! `cbus get` against 200 real `cbus-agent` processes and 200 emulated agents, interleaved.
//!
//! Per size: `cbus get` of one property on every machine, the same with 1 % frozen (first while
//! the registry still calls them running, so they are asked and the grace ends the wait, then
//! once they are known unresponsive and are not asked), `cbus --hosts ONE get`, `cbus agents`,
//! the CLI's peak RSS, and the bytes per second the NATS server receives from heartbeats.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use cbus_client::fleet::Fleet;
use cbus_protocol::presence::AgentState;
use cbus_tests::emulator::{Emulator, EmulatorSpec};
use cbus_tests::{bin_path, Agent, NatsServer, PrivateBus, TestService};

use crate::{ms, summary};

const PROPERTY: [&str; 3] = [
    TestService::NAME,
    TestService::PATH,
    "org.cbus.Test1.String",
];

/// One `cbus` run: wall time, stdout lines, exit code, and the process's own peak RSS.
struct Run {
    took: Duration,
    lines: usize,
    code: i32,
    rss_kib: i64,
}

/// Runs `cbus ARGS` against `url`, whole process, under `/usr/bin/time -f %M` for its own
/// peak RSS. Not `wait4` or RUSAGE_CHILDREN on a child of this process: a child forked from the
/// bench counts the bench's resident pages (the emulator's, hundreds of MiB) until it execs, and
/// that, not cbus, was the "CLI peak RSS" of 407 MiB at 10,000 and 2 GB at 50,000 first
/// recorded here.
fn cbus(url: &str, args: &[&str]) -> Run {
    let rss_file = tempfile::NamedTempFile::new().expect("temp file");
    let t = Instant::now();
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%M", "-o"])
        .arg(rss_file.path())
        .arg(bin_path("cbus"))
        .args(["--server", url])
        .args(args)
        .output()
        .expect("run cbus under /usr/bin/time");
    let took = t.elapsed();
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 3,
        "cbus {args:?} exited {code}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rss_kib = std::fs::read_to_string(rss_file.path())
        .ok()
        .and_then(|t| t.lines().last().and_then(|l| l.trim().parse().ok()))
        .unwrap_or(0);
    Run {
        took,
        lines: String::from_utf8_lossy(&out.stdout).lines().count(),
        code,
        rss_kib,
    }
}

async fn registry_counts(url: &str) -> (usize, usize) {
    let Ok(client) = async_nats::connect(url).await else {
        return (0, 0);
    };
    let fleet = Fleet::new(client, "bench");
    match fleet.registry().await {
        Ok(agents) => (
            agents
                .iter()
                .filter(|a| a.state == AgentState::Running)
                .count(),
            agents
                .iter()
                .filter(|a| a.state == AgentState::Unresponsive)
                .count(),
        ),
        Err(_) => (0, 0),
    }
}

fn median_of(runs: usize, mut f: impl FnMut() -> Duration) -> (Duration, Duration) {
    summary((0..runs).map(|_| f()).collect())
}

/// A nats-server: `binary`, else `nats-server` from PATH (`$CBUS_TEST_NATS_SERVER`).
fn server(binary: Option<&PathBuf>) -> NatsServer {
    binary.map_or_else(NatsServer::start, |b| NatsServer::start_binary(b))
}

pub async fn scale(sizes: &[usize], binaries: &[PathBuf]) {
    // Each size against every server given, one after the other: a row per server version.
    let binaries: Vec<Option<&PathBuf>> = if binaries.is_empty() {
        vec![None]
    } else {
        binaries.iter().map(Some).collect()
    };
    let version = |b: Option<&PathBuf>| {
        let v = NatsServer::version_of(&b.cloned().unwrap_or_else(cbus_tests::nats::binary));
        v.trim_start_matches("nats-server: ").to_owned()
    };
    for &b in &binaries {
        println!("server: {}", version(b));
    }
    println!("\n## scale (fleet emulator): `cbus` whole process, median (p95); 200 units per machine, heartbeat 5 s");
    println!("| machines | get, all answering | get, 1% frozen, still called running | get, 1% known unresponsive | --hosts ONE get | --hosts GLOB get (10 machines) | agents | heartbeat bytes/s into the server | CLI peak RSS: get / --hosts ONE / agents |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for &n in sizes {
        for &binary in &binaries {
            scale_one(n, binary, &version(binary)).await;
        }
    }
    overlap().await;
}

/// One row of `scale`: `n` emulated machines on a server from `binary`.
async fn scale_one(n: usize, binary: Option<&PathBuf>, version: &str) {
    let nats = server(binary);
    let url = nats.url();
    let started = Instant::now();
    let spec = EmulatorSpec::new(n);
    let emulator = Emulator::start(&url, &spec).await;
    let registered = cbus_tests::wait_for(Duration::from_secs(300), || async {
        registry_counts(&url).await.0 >= n
    })
    .await;
    assert!(registered, "{n} emulated agents did not register");
    eprintln!(
        "{n} emulated agents registered in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Heartbeat traffic, idle fleet: the server's received bytes over 10 s, from one heartbeat
    // interval after registration on (the emulator's first heartbeats come an interval after
    // its hellos: measured at once, 1,000 and 10,000 machines showed about half their rate, as
    // a fleet that registered within seconds spent much of the 10 s in that gap).
    tokio::time::sleep(spec.heartbeat).await;
    let in_bytes = || {
        nats.varz()
            .and_then(|v| v["in_bytes"].as_u64())
            .unwrap_or(0)
    };
    let beats = || {
        emulator
            .sent
            .heartbeats
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let (b0, h0, t0) = (in_bytes(), beats(), Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let secs = t0.elapsed().as_secs_f64();
    let rate = (in_bytes() - b0) as f64 / secs;
    let beat_rate = (beats() - h0) as f64 / secs;

    let runs = if n >= 50_000 { 5 } else { 10 };
    // A timeout that a loaded host's 50,000-machine get fits in (the 5 s default ended one
    // with `disconnected` at load 9); the grace, not the timeout, ends the frozen runs.
    let get = [
        "-s",
        "--timeout",
        "30s",
        "get",
        PROPERTY[0],
        PROPERTY[1],
        PROPERTY[2],
    ];
    let mut not_ok = 0;
    let mut get_rss = 0;
    let all = median_of(runs, || {
        let r = cbus(&url, &get);
        // Every machine has a line; one whose heartbeat the emulator sent late may be
        // reported unresponsive (exit 3), never missing.
        assert_eq!(r.lines, n);
        not_ok += usize::from(r.code != 0);
        get_rss = get_rss.max(r.rss_kib);
        r.took
    });
    // One machine by its name (the host index), and by a glob that matches only it (the
    // whole registry is read): what a selection of one costs with and without the index.
    let one_host = format!("{}{:05}", "emu-", n / 2);
    let one_glob = format!("{}{:04}?", "emu-", n / 20);
    let mut one_rss = 0;
    let one = median_of(runs, || {
        let r = cbus(&url, &[&["--hosts", one_host.as_str()][..], &get].concat());
        assert_eq!(r.lines, 1);
        one_rss = one_rss.max(r.rss_kib);
        r.took
    });
    let glob = median_of(runs, || {
        let r = cbus(&url, &[&["--hosts", one_glob.as_str()][..], &get].concat());
        assert_eq!(r.lines, 10);
        r.took
    });
    let mut agents_rss = 0;
    let agents = median_of(runs, || {
        let r = cbus(&url, &["agents", "-s", "--timeout", "30s"]);
        assert!(r.lines >= n, "{}", r.lines);
        agents_rss = agents_rss.max(r.rss_kib);
        r.took
    });

    // 1 % frozen: asked while the registry still calls them running (the grace ends the
    // wait), then known unresponsive (not asked).
    let frozen = (n / 100).max(1);
    for i in 0..frozen {
        emulator.freeze(i * (n / frozen));
    }
    let mid = median_of(3, || {
        let r = cbus(&url, &get);
        assert_eq!((r.lines, r.code), (n, 3));
        r.took
    });
    let known = cbus_tests::wait_for(Duration::from_secs(60), || async {
        registry_counts(&url).await.1 >= frozen
    })
    .await;
    assert!(known, "frozen agents never became unresponsive");
    let unresponsive = median_of(runs, || {
        let r = cbus(&url, &get);
        assert_eq!((r.lines, r.code), (n, 3));
        r.took
    });
    let fmt = |(m, p): (Duration, Duration)| format!("{:.0} ms ({:.0})", ms(m), ms(p));
    let mib = |kib: i64| kib as f64 / 1024.0;
    println!(
            "| {n}, {version} | {}{} | {} | {} | {} | {} | {} | {:.0} KB/s ({:.0} heartbeats/s) | {:.0} / {:.0} / {:.0} MiB |",
            fmt(all),
            if not_ok > 0 {
                format!(", {not_ok} of {runs} runs exit 3")
            } else {
                String::new()
            },
            fmt(mid),
            fmt(unresponsive),
            fmt(one),
            fmt(glob),
            fmt(agents),
            rate / 1000.0,
            beat_rate,
            mib(get_rss),
            mib(one_rss),
            mib(agents_rss),
        );
    println!("load average after {n}: {}", crate::loadavg());
    drop(emulator);
}

/// `emulate`: a server and `n` emulated agents, held until the process is killed, so that
/// `cbus` can be profiled against them by hand (`perf record`, heaptrack).
pub async fn hold(n: usize, binary: Option<&PathBuf>) {
    let nats = server(binary);
    let url = nats.url();
    let emulator = Emulator::start(&url, &EmulatorSpec::new(n)).await;
    let registered = cbus_tests::wait_for(Duration::from_secs(300), || async {
        registry_counts(&url).await.0 >= n
    })
    .await;
    assert!(registered, "{n} emulated agents did not register");
    println!(
        "{n} emulated agents on {url}; SIGUSR1 freezes 1 % of them for {:?} (still called \
         running meanwhile); Ctrl-C ends them",
        FREEZE_FOR
    );
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .expect("SIGUSR1 handler");
    let frozen = (n / 100).max(1);
    loop {
        tokio::select! {
            // SIGINT (Ctrl-C, or `kill -INT`) ends it with the server torn down; SIGTERM
            // would orphan it.
            _ = tokio::signal::ctrl_c() => return,
            _ = usr1.recv() => {
                (0..frozen).for_each(|i| emulator.freeze(i * (n / frozen)));
                println!("froze {frozen}");
                tokio::time::sleep(FREEZE_FOR).await;
                (0..frozen).for_each(|i| emulator.thaw(i * (n / frozen)));
                println!("thawed");
            }
        }
    }
}

/// How long `emulate` keeps machines frozen after a SIGUSR1: with the emulator's 5 s heartbeats
/// a machine is silent at most 13 s, under the 3 heartbeats (15 s) after which the registry
/// calls it unresponsive, so it is still asked.
const FREEZE_FOR: Duration = Duration::from_secs(8);

/// 200 real agents against 200 emulated ones: `cbus get`, interleaved, each on its own server.
async fn overlap() {
    const N: usize = 200;
    println!("\n## scale overlap: {N} real cbus-agent processes vs {N} emulated agents, `cbus get`, interleaved, 20 runs each");
    let real_nats = NatsServer::start();
    let emu_nats = NatsServer::start();
    // Private buses, 20 agents on each (a bus per agent would be 200 more daemons on 2 cores).
    let buses: Vec<(PrivateBus, TestService)> = (0..N / 20)
        .map(|_| {
            let bus = PrivateBus::start();
            let svc = TestService::start(bus.address());
            (bus, svc)
        })
        .collect();
    let real: Vec<Agent> = (0..N)
        .map(|i| {
            Agent::start(
                &real_nats.url(),
                buses[i % buses.len()].0.address(),
                &["--no-signals", "--heartbeat", "5s"],
            )
        })
        .collect();
    let _emulator = Emulator::start(&emu_nats.url(), &EmulatorSpec::new(N)).await;
    for url in [real_nats.url(), emu_nats.url()] {
        let ok = cbus_tests::wait_for(Duration::from_secs(120), || async {
            registry_counts(&url).await.0 >= N
        })
        .await;
        assert!(ok, "{N} agents did not register on {url}");
    }
    let (mut r, mut e) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        for (url, samples) in [(real_nats.url(), &mut r), (emu_nats.url(), &mut e)] {
            let r = cbus(&url, &["-s", "get", PROPERTY[0], PROPERTY[1], PROPERTY[2]]);
            assert_eq!(r.lines, N);
            samples.push(r.took);
        }
    }
    let ((rm, rp), (em, ep)) = (summary(r), summary(e));
    println!("| agents | median | p95 |\n|---|---|---|");
    println!("| {N} real | {:.1} ms | {:.1} ms |", ms(rm), ms(rp));
    println!("| {N} emulated | {:.1} ms | {:.1} ms |", ms(em), ms(ep));
    println!(
        "emulated / real: {:.2} (the emulator is fit for scale figures within this factor)",
        em.as_secs_f64() / rm.as_secs_f64()
    );
    drop(real);
}
