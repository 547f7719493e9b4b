//! `cluster`: `cbus get` through one server, a 3-node cluster and a site's leaf node, side by side
//! (interleaved, the same agents' work on each), and failover time when a cluster node is killed.
//!
//! Each side has its own agents (on one shared private bus, like the `fanout` section), all
//! running at once, so the runs alternate between sides on an equally loaded machine.

use std::process::Command;
use std::time::{Duration, Instant};

use cbus_client::fleet::Fleet;
use cbus_protocol::presence::AgentState;
use cbus_tests::{bin_path, Agent, NatsCluster, NatsServer, PrivateBus, TestService};

const AGENTS: usize = 10;
const RUNS: usize = 30;
const FAILOVERS: usize = 5;

struct Side {
    name: &'static str,
    /// Where `cbus` connects.
    url: String,
    samples: Vec<Duration>,
}

/// Waits until `n` agents are running in the registry, heard since `since_ms`. Each read is cut
/// at 500 ms, so a read stalled on a leaderless stream does not hide when it came back.
async fn wait_running(url: &str, n: usize, since_ms: u64) -> bool {
    let Ok(client) = async_nats::connect(url).await else {
        return false;
    };
    let fleet = Fleet::new(client, "bench");
    cbus_tests::wait_for(Duration::from_secs(60), || async {
        let read = tokio::time::timeout(Duration::from_millis(500), fleet.registry()).await;
        read.is_ok_and(|r| {
            r.is_ok_and(|a| {
                a.iter()
                    .filter(|a| a.state == AgentState::Running && a.last_seen_ms >= since_ms)
                    .count()
                    >= n
            })
        })
    })
    .await
}

fn get(url: &str) -> Duration {
    crate::timed_get(&bin_path("cbus"), url, AGENTS)
}

pub async fn cluster() {
    println!(
        "\n## cluster: `cbus get` whole process over {AGENTS} agents, {RUNS} runs per side, interleaved"
    );
    let bus = PrivateBus::start();
    let _svc = TestService::start(bus.address());
    let agents = |url: &str, extra: &[&str]| -> Vec<Agent> {
        (0..AGENTS)
            .map(|_| {
                let mut flags = vec!["--no-signals"];
                flags.extend_from_slice(extra);
                Agent::start(url, bus.address(), &flags)
            })
            .collect()
    };

    // Three sides, each with its own registry and agents: one server; a 3-node cluster (R3
    // registry, CLI on node 1); a hub with a site's leaf node (agents at the leaf reaching the
    // hub's JetStream by domain, CLI at the hub).
    let single = NatsServer::start();
    let mut cluster = NatsCluster::start(3, "").await;
    let leaf_port = cbus_tests::free_port();
    let hub = NatsServer::start_with_config(&format!(
        "jetstream {{ domain: hub }}\nleafnodes {{ listen: \"127.0.0.1:{leaf_port}\" }}"
    ));
    let leaf = NatsServer::start_without_jetstream(&format!(
        "leafnodes {{ remotes: [ {{ url: \"nats-leaf://127.0.0.1:{leaf_port}\" }} ] }}"
    ));
    for (url, replicas) in [(single.url(), "1"), (cluster.urls(), "3"), (hub.url(), "1")] {
        let out = Command::new(bin_path("cbus"))
            .args(["--server", &url, "registry", "init", "--replicas", replicas])
            .output()
            .expect("run cbus registry init");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _single_agents = agents(&single.url(), &[]);
    let _cluster_agents = agents(&cluster.urls(), &[]);
    let _leaf_agents = agents(&leaf.url(), &["--js-domain", "hub"]);
    for url in [single.url(), cluster.nodes[0].url(), hub.url()] {
        assert!(wait_running(&url, AGENTS, 0).await, "agents via {url}");
    }
    let mut sides = [
        Side {
            name: "one server",
            url: single.url(),
            samples: Vec::new(),
        },
        Side {
            name: "3-node cluster, agents spread, CLI on one node",
            url: cluster.nodes[0].url(),
            samples: Vec::new(),
        },
        Side {
            name: "hub + leaf: agents at the leaf, CLI at the hub",
            url: hub.url(),
            samples: Vec::new(),
        },
    ];
    for _ in 0..RUNS {
        for side in sides.iter_mut() {
            side.samples.push(get(&side.url));
        }
    }
    let (base, _) = crate::summary(sides[0].samples.clone());
    println!("| path | median | p95 | vs one server |\n|---|---|---|---|");
    for side in &sides {
        let (median, p95) = crate::summary(side.samples.clone());
        println!(
            "| {} | {:.1} ms | {:.1} ms | {:.2}x |",
            side.name,
            crate::ms(median),
            crate::ms(p95),
            median.as_secs_f64() / base.as_secs_f64()
        );
    }

    // Failover: kill a node; time until every cluster agent is heard again through a survivor
    // (reconnected), and until the registry holds every one of them fresh again.
    println!("\n## cluster failover: a node killed (SIGKILL), {AGENTS} agents, {FAILOVERS} runs");
    let (mut heard, mut registered) = (Vec::new(), Vec::new());
    for run in 0..FAILOVERS {
        let victim = run % 3;
        let survivor = cluster.nodes[(victim + 1) % 3].url();
        let watcher = async_nats::connect(&survivor).await.expect("connect");
        let mut presence = watcher
            .subscribe(cbus_protocol::subject::PRESENCE_ALL)
            .await
            .expect("subscribe");
        watcher.flush().await.expect("flush");
        let killed_ms = cbus_protocol::presence::now_ms();
        let t = Instant::now();
        cluster.nodes[victim].kill();
        let mut seen = std::collections::HashSet::new();
        while seen.len() < AGENTS {
            match tokio::time::timeout(
                Duration::from_secs(30),
                futures::StreamExt::next(&mut presence),
            )
            .await
            {
                Ok(Some(m)) => {
                    seen.insert(m.subject.to_string());
                }
                _ => panic!("only {} agents heard after the kill", seen.len()),
            }
        }
        heard.push(t.elapsed());
        assert!(
            wait_running(&survivor, AGENTS, killed_ms).await,
            "agents after the kill"
        );
        registered.push(t.elapsed());
        cluster.nodes[victim].restart();
        cluster.wait_for_jetstream(Duration::from_secs(60)).await;
        // Settled before the next kill: every agent fresh again with all three nodes up.
        assert!(
            wait_running(&survivor, AGENTS, cbus_protocol::presence::now_ms()).await,
            "agents after the restart"
        );
    }
    println!("| until | median | p95 | each |\n|---|---|---|---|");
    for (what, times) in [
        (
            "every agent heard again (reconnected, 500 ms heartbeats)",
            heard,
        ),
        ("every agent fresh in the R3 registry", registered),
    ] {
        let (median, p95) = crate::summary(times.clone());
        println!(
            "| {what} | {:.0} ms | {:.0} ms | {} |",
            crate::ms(median),
            crate::ms(p95),
            times
                .iter()
                .map(|t| format!("{:.0}", crate::ms(*t)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}
