//! `./dev up` end to end: a NATS server with per-agent nkey users, real machines running the
//! agent as a systemd unit, the CLI against it, and `./dev down` leaving nothing behind.
//! Runs with the debug binaries the test command already built, in its own state dir and port.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use futures::StreamExt;

struct DevFleet {
    repo: PathBuf,
    dir: tempfile::TempDir,
    machines: PathBuf,
    port: u16,
    gateway_port: u16,
}

impl DevFleet {
    fn fleet(&self, args: &[&str]) -> Output {
        Command::new(self.repo.join("scripts/fleet"))
            .args(args)
            .env("CBUS_DEV_DIR", self.dir.path())
            .env("CBUS_DEV_MACHINES", &self.machines)
            .env("CBUS_DEV_NATS_PORT", self.port.to_string())
            .env("CBUS_DEV_GATEWAY_PORT", self.gateway_port.to_string())
            .env("CBUS_DEV_PREFIX", "devt")
            .env("CBUS_DEV_PROFILE", "debug")
            .output()
            .expect("run scripts/fleet")
    }

    fn password(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("admin.password"))
            .expect("admin password")
            .trim()
            .to_owned()
    }

    fn cbus(&self, args: &[&str]) -> Output {
        Command::new(cbus_tests::bin_path("cbus"))
            .args([
                "--server",
                &format!("nats://127.0.0.1:{}", self.port),
                "--user",
                "admin",
                "--password",
                &self.password(),
            ])
            .args(args)
            .env("CBUS_CONFIG", "/nonexistent")
            .output()
            .expect("run cbus")
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_up_cli_permissions_and_down() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let dev = DevFleet {
        repo,
        dir: tempfile::tempdir().unwrap(),
        machines: PathBuf::from(format!("/var/tmp/cbus-devtest-{}", std::process::id())),
        port: cbus_tests::free_port(),
        gateway_port: cbus_tests::free_port(),
    };
    let up = tokio::task::block_in_place(|| dev.fleet(&["up", "2"]));
    assert!(up.status.success(), "dev up failed:\n{}", text(&up));
    let out = text(&up);
    assert!(
        out.contains("devt-1")
            && out.contains("devt-2")
            && out.contains("devt-demo-worker.service"),
        "{out}"
    );

    // Agents listed with distinct nkeys and hostnames.
    let agents: serde_json::Value =
        serde_json::from_slice(&dev.cbus(&["agents", "--json"]).stdout).unwrap();
    let list = agents["agents"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{agents}");
    assert_ne!(list[0]["nkey"], list[1]["nkey"]);
    assert_eq!(list[0]["hostname"], "devt-1");
    assert_eq!(list[1]["hostname"], "devt-2");

    // Stop a demo unit on one machine, then start it on all.
    let o = dev.cbus(&["--hosts", "devt-1", "stop", "devt-demo-worker.service"]);
    assert!(o.status.success(), "{}", text(&o));
    let s = dev.cbus(&["status", "devt-demo-worker.service", "-s"]);
    let st = String::from_utf8_lossy(&s.stdout).to_string();
    assert!(
        st.lines()
            .any(|l| l.starts_with("devt-1\t") && l.contains("\tinactive\t")),
        "{st}"
    );
    assert!(
        st.lines()
            .any(|l| l.starts_with("devt-2\t") && l.contains("\tactive\t")),
        "{st}"
    );
    let o = dev.cbus(&["start", "devt-demo-worker.service", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        doc["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["active_state"] == "active"),
        "{doc}"
    );

    // Permissions: machine 1's key may publish its own signals but not machine 2's.
    let key1 = dev
        .machines
        .join("devt-1/root/etc/ssh/ssh_host_ed25519_key");
    let kp1 = cbus_protocol::nkey::from_ssh_host_key(&key1).unwrap();
    let nkey2 = list
        .iter()
        .map(|a| a["nkey"].as_str().unwrap())
        .find(|n| *n != kp1.public_key())
        .unwrap()
        .to_owned();
    let admin = async_nats::ConnectOptions::new()
        .user_and_password("admin".into(), dev.password())
        .connect(format!("nats://127.0.0.1:{}", dev.port))
        .await
        .unwrap();
    let mut watch = admin.subscribe("dbus.signals.>").await.unwrap();
    admin.flush().await.unwrap();
    let (tx, mut errors) = tokio::sync::mpsc::unbounded_channel();
    let impostor = async_nats::ConnectOptions::with_nkey(kp1.seed().unwrap())
        .event_callback(move |e| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(e.to_string());
            }
        })
        .connect(format!("nats://127.0.0.1:{}", dev.port))
        .await
        .expect("machine 1's nkey is a NATS user");
    let foreign = format!("dbus.signals.{nkey2}._3a1_2e1.forged");
    let own = format!("dbus.signals.{}._3a1_2e1.genuine", kp1.public_key());
    impostor
        .publish(foreign.clone(), "[]".into())
        .await
        .unwrap();
    impostor.publish(own.clone(), "[]".into()).await.unwrap();
    impostor.flush().await.unwrap();
    let mut got = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), watch.next()).await {
        got.push(m.subject.to_string());
    }
    assert!(got.contains(&own), "own subject not delivered: {got:?}");
    assert!(
        !got.contains(&foreign),
        "server let machine 1 publish as machine 2"
    );
    let mut violation = false;
    while let Ok(e) = errors.try_recv() {
        violation |= e.to_lowercase().contains("permission");
    }
    assert!(violation, "server did not report a permissions violation");

    // Down: no machine, mount or server left.
    let down = tokio::task::block_in_place(|| dev.fleet(&["down"]));
    assert!(down.status.success(), "{}", text(&down));
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains(dev.machines.to_str().unwrap()),
        "overlay left mounted"
    );
    let nats_left = std::fs::read_dir("/proc").unwrap().flatten().any(|p| {
        std::fs::read_to_string(p.path().join("cmdline"))
            .map(|c| {
                c.contains(&dev.dir.path().to_string_lossy().to_string())
                    || c.contains(&dev.machines.to_string_lossy().to_string())
            })
            .unwrap_or(false)
    });
    assert!(!nats_left, "a process of the dev fleet is still running");
}
