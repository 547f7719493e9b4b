//! `./dev up` end to end: `cbus-dev up 2` into its own state dir and ports (so it runs beside
//! a developer's fleet), then the CLI against it, the per-agent NATS permissions of the generated
//! config, `add`, and `down` leaving no machine, mount or server behind. What the fleet started is
//! read from its state file (`cbus_tests::devfleet`), as `cbus-dev status` reads it.
//!
//! Runs with the binaries the test command built already (the profile this test was built with).

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use cbus_tests::devfleet::{self, DevState};
use cbus_tests::Machine;
use futures::StreamExt;

struct DevFleet {
    dir: tempfile::TempDir,
    port: u16,
    gateway_port: u16,
    prefix: &'static str,
}

/// Whether nothing listens on 127.0.0.1:`port` (a bind succeeds).
fn port_free(port: u32) -> bool {
    u16::try_from(port).is_ok_and(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
}

impl DevFleet {
    fn new() -> Self {
        Self::with("devt", &[])
    }

    /// A fleet whose NATS ports `port + offset` are free too (`--cluster`, `--sites`: the other
    /// nodes' client, route and leaf ports).
    fn with(prefix: &'static str, offsets: &[u32]) -> Self {
        let port = std::iter::repeat_with(cbus_tests::free_port)
            .take(100)
            .find(|p| offsets.iter().all(|o| port_free(u32::from(*p) + o)))
            .expect("no free port with free ports above it");
        // Two calls may return the same port: the gateway's must differ from NATS's.
        let gateway_port = std::iter::repeat_with(cbus_tests::free_port)
            .find(|p| *p != port && !offsets.iter().any(|o| u32::from(port) + o == u32::from(*p)))
            .unwrap();
        DevFleet {
            dir: tempfile::Builder::new()
                .prefix("cbus-devfleet-")
                .tempdir()
                .unwrap(),
            port,
            gateway_port,
            prefix,
        }
    }

    /// `cbus-dev ARGS` (target/<profile>/cbus-dev: the fleet uses the binaries next to it, the
    /// same as the CLI calls below).
    fn fleet(&self, args: &[&str]) -> Output {
        Command::new(cbus_tests::bin_path("cbus-dev"))
            .args(args)
            .env("CBUS_DEV_DIR", self.dir.path())
            .env_remove("CBUS_DEV_MACHINES")
            .env("CBUS_DEV_NATS_PORT", self.port.to_string())
            .env("CBUS_DEV_GATEWAY_PORT", self.gateway_port.to_string())
            .env("CBUS_DEV_PREFIX", self.prefix)
            .output()
            .expect("run cbus-dev")
    }

    fn state(&self) -> DevState {
        DevState::load(self.dir.path()).expect("the dev fleet's state")
    }

    fn secret(&self, name: &str) -> String {
        devfleet::secret(self.dir.path(), name).unwrap_or_else(|e| panic!("{e}"))
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn cbus(&self, args: &[&str]) -> Output {
        Command::new(cbus_tests::bin_path("cbus"))
            .args(["--server", &self.url(), "--user", "admin", "--password"])
            .arg(self.secret("admin.password"))
            .args(args)
            .env("CBUS_CONFIG", "/nonexistent")
            .output()
            .expect("run cbus")
    }

    /// A running machine of the fleet.
    fn machine(&self, name: &str) -> Machine {
        self.state()
            .machine(name)
            .and_then(|m| m.machine())
            .unwrap_or_else(|| panic!("machine {name} is not running"))
    }

    /// A machine's root file system, as seen from the host.
    fn root(&self, name: &str) -> PathBuf {
        self.machine(name).root_dir()
    }

    /// The machine's init.
    fn leader(&self, name: &str) -> u32 {
        self.machine(name).leader_pid()
    }

    /// `systemctl is-active UNIT` run inside the machine with nsenter.
    fn is_active_inside(&self, name: &str, unit: &str) -> String {
        self.machine(name)
            .exec_stdout(&["systemctl", "is-active", unit])
    }
}

impl Drop for DevFleet {
    fn drop(&mut self) {
        let _ = self.fleet(&["down"]);
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "failed:\n{}", text(&o));
    text(&o)
}

/// `cbus status UNIT -s` as (host, active state) pairs.
fn states(o: &Output) -> Vec<(String, String)> {
    let out = String::from_utf8_lossy(&o.stdout);
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let state = f.iter().find(|s| {
                ["active", "inactive", "failed", "activating", "deactivating"].contains(s)
            })?;
            Some((f[0].to_owned(), (*state).to_owned()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_up_cli_permissions_add_and_down() {
    let dev = DevFleet::new();
    let up = tokio::task::block_in_place(|| dev.fleet(&["up", "2"]));
    let out = ok(up);
    for want in [
        "devt-1",
        "devt-2",
        "devt-demo-worker.service",
        "$ cbus agents",
        &dev.url(),
        &format!("http://127.0.0.1:{}/metrics", dev.gateway_port),
    ] {
        assert!(out.contains(want), "`up` did not print {want}:\n{out}");
    }
    // Where the overlays are, from the state (the machines' directories' parent).
    let machines = dev.state().machines[0]
        .record
        .dir
        .parent()
        .unwrap()
        .to_path_buf();

    // Agents listed with distinct nkeys and hostnames; each nkey is its host key's.
    let agents: serde_json::Value =
        serde_json::from_slice(&dev.cbus(&["agents", "--json"]).stdout).unwrap();
    let list = agents["agents"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{agents}");
    assert_ne!(list[0]["nkey"], list[1]["nkey"]);
    let mut hosts: Vec<&str> = list
        .iter()
        .map(|a| a["hostname"].as_str().unwrap())
        .collect();
    hosts.sort_unstable();
    assert_eq!(hosts, ["devt-1", "devt-2"]);
    let key = |name: &str| {
        cbus_protocol::nkey::from_ssh_host_key(&dev.root(name).join("etc/ssh/ssh_host_ed25519_key"))
            .unwrap()
    };
    let (kp1, kp2) = (key("devt-1"), key("devt-2"));
    for (kp, host) in [(&kp1, "devt-1"), (&kp2, "devt-2")] {
        assert!(
            list.iter()
                .any(|a| a["nkey"] == kp.public_key() && a["hostname"] == host),
            "{host}'s host key does not give its listed nkey: {agents}"
        );
    }
    // Each machine has its own machine-id too.
    let id = |n: &str| std::fs::read_to_string(dev.root(n).join("etc/machine-id"));
    assert_ne!(id("devt-1").unwrap(), id("devt-2").unwrap());

    // `up` again: already up, nothing restarted.
    let leader_before = dev.leader("devt-1");
    let again = ok(tokio::task::block_in_place(|| dev.fleet(&["up", "2"])));
    assert!(again.contains("already up"), "{again}");
    assert_eq!(dev.leader("devt-1"), leader_before);
    let status = ok(dev.fleet(&["status"]));
    assert!(
        status.contains("nats-server    running")
            && status.contains("cbus-gateway   running")
            && status
                .lines()
                .filter(|l| l.starts_with("devt-") && l.contains("cbus-agent active"))
                .count()
                == 2,
        "{status}"
    );

    // Stop a demo unit on one machine, then start it on all: the CLI and systemd agree.
    let unit = "devt-demo-worker.service";
    ok(dev.cbus(&["--hosts", "devt-1", "stop", unit]));
    let st = states(&dev.cbus(&["status", unit, "-s"]));
    assert!(st.contains(&("devt-1".into(), "inactive".into())), "{st:?}");
    assert!(st.contains(&("devt-2".into(), "active".into())), "{st:?}");
    assert_eq!(dev.is_active_inside("devt-1", unit), "inactive");
    assert_eq!(dev.is_active_inside("devt-2", unit), "active");
    let o = dev.cbus(&["start", unit, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let results = doc["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{doc}");
    assert!(
        results.iter().all(|r| r["active_state"] == "active"),
        "{doc}"
    );
    assert_eq!(dev.is_active_inside("devt-1", unit), "active");
    assert_eq!(dev.is_active_inside("devt-2", unit), "active");
    // And on all machines at once: stop, seen inside both.
    ok(dev.cbus(&["stop", unit]));
    assert_eq!(dev.is_active_inside("devt-1", unit), "inactive");
    assert_eq!(dev.is_active_inside("devt-2", unit), "inactive");

    // Permissions: machine 1's nkey may publish its own signals but not machine 2's, nor listen
    // to machine 2's requests; the gateway user may not speak for an agent.
    let admin = async_nats::ConnectOptions::new()
        .user_and_password("admin".into(), dev.secret("admin.password"))
        .connect(dev.url())
        .await
        .unwrap();
    let mut watch = admin.subscribe("dbus.signals.>").await.unwrap();
    admin.flush().await.unwrap();
    let (tx, mut errors) = tokio::sync::mpsc::unbounded_channel();
    let events = move |e: async_nats::Event| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(e.to_string());
        }
    };
    let impostor = async_nats::ConnectOptions::with_nkey(kp1.seed().unwrap())
        .event_callback(events.clone())
        .connect(dev.url())
        .await
        .expect("machine 1's nkey is a NATS user");
    let gateway = async_nats::ConnectOptions::new()
        .user_and_password("gateway".into(), dev.secret("gateway.password"))
        .event_callback(events)
        .connect(dev.url())
        .await
        .expect("the gateway user");
    let foreign = format!("dbus.signals.{}._3a1_2e1.forged", kp2.public_key());
    let own = format!("dbus.signals.{}._3a1_2e1.genuine", kp1.public_key());
    let by_gateway = format!("dbus.signals.{}._3a1_2e1.gateway", kp1.public_key());
    let requests2 = format!("dbus.agent.{}.>", kp2.public_key());
    let _spy = impostor.subscribe(requests2.clone()).await.unwrap();
    gateway
        .publish(by_gateway.clone(), "[]".into())
        .await
        .unwrap();
    gateway.flush().await.unwrap();
    impostor
        .publish(foreign.clone(), "[]".into())
        .await
        .unwrap();
    // Last: once it arrives, anything the server let through before it has arrived too.
    impostor.publish(own.clone(), "[]".into()).await.unwrap();
    impostor.flush().await.unwrap();
    let mut got = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
        got.push(m.subject.to_string());
        if got.contains(&own) {
            break;
        }
    }
    assert!(got.contains(&own), "own subject not delivered: {got:?}");
    assert!(
        !got.contains(&foreign),
        "server let machine 1 publish as machine 2"
    );
    assert!(
        !got.contains(&by_gateway),
        "server let the gateway publish as machine 1"
    );
    let mut reported: Vec<String> = Vec::new();
    let violated = |reported: &[String], subject: &str| {
        reported
            .iter()
            .any(|e| e.to_lowercase().contains("permissions violation") && e.contains(subject))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while [&foreign, &requests2, &by_gateway]
        .iter()
        .any(|s| !violated(&reported, s))
    {
        match tokio::time::timeout_at(deadline, errors.recv()).await {
            Ok(Some(e)) => reported.push(e),
            _ => break,
        }
    }
    for subject in [&foreign, &requests2, &by_gateway] {
        assert!(
            violated(&reported, subject),
            "no permissions violation reported for {subject}: {reported:?}"
        );
    }
    drop((impostor, gateway, admin));

    // Add a machine: its nkey user is added and nats-server reloaded, its agent joins.
    let added = ok(tokio::task::block_in_place(|| dev.fleet(&["add", "1"])));
    assert!(added.contains("devt-3"), "{added}");
    let agents: serde_json::Value =
        serde_json::from_slice(&dev.cbus(&["agents", "--json"]).stdout).unwrap();
    let running = agents["agents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "running")
        .count();
    assert_eq!(running, 3, "{agents}");

    // Down: no machine, mount or server left; a second down is fine.
    let gateway_pid = dev.state().gateway.expect("the gateway is recorded").pid;
    let machine_dirs: Vec<PathBuf> = dev
        .state()
        .machines
        .iter()
        .map(|m| m.record.dir.clone())
        .collect();
    assert_eq!(machine_dirs.len(), 3);
    let down = tokio::task::block_in_place(|| dev.fleet(&["down"]));
    ok(down);
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains(&format!(" {}/", machines.display())),
        "overlay left mounted:\n{mounts}"
    );
    assert_eq!(
        cbus_tests::machines::rooted_in(&machines),
        Vec::new(),
        "machine processes left"
    );
    let left = [
        cbus_tests::procs::pids_with(&format!("systemd-nspawn -D {}", machines.display())),
        cbus_tests::procs::pids_with(&dev.dir.path().to_string_lossy()),
    ]
    .concat();
    assert!(left.is_empty(), "processes of the dev fleet left: {left:?}");
    let stat = std::fs::read_to_string(format!("/proc/{gateway_pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "cbus-gateway still running: {stat}"
    );
    for d in &machine_dirs {
        assert!(!d.exists(), "machine dir left: {}", d.display());
    }
    ok(tokio::task::block_in_place(|| dev.fleet(&["down"])));
}

/// `./dev up 3 --cluster 3 --sites 2`: three routed hub nodes and two leaf sites, one machine
/// each. Every machine registers, the registry has a replica on every hub node, the CLI works
/// against any hub node and a fan-out from the hub answers the site machines; `down` stops every
/// server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_up_cluster_and_sites() {
    // Client ports +0..2 (hub) and +301..302 (sites), routes +100..102, leaf ports +200..202.
    let offsets = [1, 2, 100, 101, 102, 200, 201, 202, 301, 302];
    let dev = DevFleet::with("devc", &offsets);
    let up =
        tokio::task::block_in_place(|| dev.fleet(&["up", "3", "--cluster", "3", "--sites", "2"]));
    let out = ok(up);
    let hub: Vec<String> = (0..3)
        .map(|i| format!("nats://127.0.0.1:{}", dev.port + i))
        .collect();
    assert!(
        out.contains(&hub.join(",")),
        "`up` did not print every hub URL:\n{out}"
    );

    // Recorded: three hub nodes, two sites, the machines going round hub, site 1, site 2.
    let state = dev.state();
    assert_eq!(state.cluster.len(), 2, "{state:?}");
    assert_eq!(state.sites.len(), 2, "{state:?}");
    let servers: Vec<_> = state.nats_servers().collect();
    assert!(servers.iter().all(|s| s.alive()), "{servers:?}");
    let sites: Vec<(String, u32)> = state
        .machines
        .iter()
        .map(|m| (m.record.name.clone(), m.site))
        .collect();
    assert_eq!(
        sites,
        [
            ("devc-1".into(), 0),
            ("devc-2".into(), 1),
            ("devc-3".into(), 2)
        ]
    );
    let status: serde_json::Value =
        serde_json::from_slice(&ok_out(dev.fleet(&["status", "--json"])).stdout).unwrap();
    let nodes = status["nats_servers"].as_array().unwrap();
    let names: Vec<&str> = nodes.iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["hub-0", "hub-1", "hub-2", "site-1", "site-2"],
        "{status}"
    );
    assert!(nodes.iter().all(|n| n["running"] == true), "{status}");
    let env = ok(dev.fleet(&["env"]));
    assert!(
        env.contains(&format!("NATS_URL={}", hub.join(","))),
        "{env}"
    );

    // Agents: a hub machine dials every hub node (its own order), a site machine its leaf and
    // the hub's JetStream domain.
    let agent_env = |name: &str| {
        std::fs::read_to_string(dev.root(name).join("etc/default/cbus-agent")).unwrap()
    };
    let hub_env = agent_env("devc-1");
    let urls = hub_env
        .lines()
        .find_map(|l| l.strip_prefix("NATS_URL="))
        .unwrap();
    let mut sorted: Vec<&str> = urls.split(',').collect();
    sorted.sort_unstable();
    assert_eq!(sorted, hub, "{hub_env}");
    assert!(!hub_env.contains("CBUS_JS_DOMAIN"), "{hub_env}");
    let site_env = agent_env("devc-2");
    assert!(
        site_env.contains(&format!("NATS_URL=nats://127.0.0.1:{}\n", dev.port + 301))
            && site_env.contains("CBUS_JS_DOMAIN=hub"),
        "{site_env}"
    );

    // The registry: one view with every machine, from any hub node, at three replicas.
    let password = dev.secret("admin.password");
    for url in &hub {
        let out = Command::new(cbus_tests::bin_path("cbus"))
            .args(["--server", url, "--user", "admin", "--password", &password])
            .args(["agents", "-s"])
            .env("CBUS_CONFIG", "/nonexistent")
            .output()
            .unwrap();
        let running = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.split('\t').nth(2) == Some("running"))
            .count();
        assert_eq!(running, 3, "agents from {url}:\n{}", text(&out));
    }
    let admin = async_nats::ConnectOptions::new()
        .user_and_password("admin".into(), password.clone())
        .connect(hub[2].as_str())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(admin);
    let mut stream = js
        .get_stream(format!("KV_{}", cbus_protocol::presence::REGISTRY_BUCKET))
        .await
        .expect("the registry stream");
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.num_replicas, 3, "{:?}", info.config);

    // A fan-out from the hub (the last node) answers every machine once, the site ones too.
    // (The worker, not the web server: fleets side by side may race for a demo web port.)
    let out = Command::new(cbus_tests::bin_path("cbus"))
        .args([
            "--server",
            &hub[2],
            "--user",
            "admin",
            "--password",
            &password,
        ])
        .args(["status", "devc-demo-worker.service", "-s"])
        .env("CBUS_CONFIG", "/nonexistent")
        .output()
        .unwrap();
    let mut answered = states(&out);
    answered.sort();
    let want: Vec<(String, String)> = (1..=3)
        .map(|i| (format!("devc-{i}"), "active".to_owned()))
        .collect();
    assert_eq!(answered, want, "{}", text(&out));

    // Down: every nats-server, the gateway and the machines stop.
    let pids: Vec<u32> = servers
        .iter()
        .map(|s| s.pid)
        .chain(state.gateway.map(|g| g.pid))
        .collect();
    ok(tokio::task::block_in_place(|| dev.fleet(&["down"])));
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z "),
            "pid {pid} still runs: {stat}"
        );
    }
    let left = cbus_tests::procs::pids_with(&dev.dir.path().to_string_lossy());
    assert!(left.is_empty(), "processes of the dev fleet left: {left:?}");
    assert_eq!(dev.state(), DevState::default());
}

fn ok_out(o: Output) -> Output {
    assert!(o.status.success(), "failed:\n{}", text(&o));
    o
}
