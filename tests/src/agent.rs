//! A real `cbus-agent` process for tests, with its own generated SSH host key.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::bins::bin_path;
use crate::util::terminate;

/// A running agent; SIGKILLed on drop unless stopped before.
pub struct Agent {
    child: Option<Child>,
    pub nkey: String,
    _dir: Option<tempfile::TempDir>,
    /// Where stderr goes, for agents started with [`Agent::start_logged`].
    log: Option<PathBuf>,
}

/// Generates an ed25519 host key in `dir`; returns its path.
pub fn generate_host_key(dir: &Path) -> PathBuf {
    let path = dir.join("ssh_host_ed25519_key");
    crate::machines::generate_host_key(&path, "cbus-test")
        .unwrap_or_else(|e| panic!("{e} (ssh-keygen: apt-get install openssh-client)"));
    path
}

impl Agent {
    /// Starts an agent with a fresh host key; `extra` are more flags.
    pub fn start(nats_url: &str, bus: &str, extra: &[&str]) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir for host key");
        let key = generate_host_key(dir.path());
        let mut agent = Self::start_with_key(nats_url, bus, &key, extra);
        agent._dir = Some(dir);
        agent
    }

    /// Starts an agent with a fresh host key, its log (filtered by `rust_log`, e.g.
    /// `warn,cbus_agent::audit=info`) written to a file that [`Agent::log`] reads.
    pub fn start_logged(nats_url: &str, bus: &str, extra: &[&str], rust_log: &str) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir for host key");
        let key = generate_host_key(dir.path());
        let log = dir.path().join("agent.log");
        let file = std::fs::File::create(&log).expect("create agent log");
        let mut agent = Self::spawn(nats_url, bus, &key, extra, rust_log, Stdio::from(file));
        agent._dir = Some(dir);
        agent.log = Some(log);
        agent
    }

    /// What the agent logged so far (agents from [`Agent::start_logged`]; empty otherwise).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Starts an agent for a real systemd machine: on its bus, with its host key (so its nkey).
    pub fn on_machine(nats_url: &str, machine: &crate::Machine, extra: &[&str]) -> Agent {
        Self::start_with_key(
            nats_url,
            &machine.bus_address(),
            &machine.host_key_path(),
            extra,
        )
    }

    /// Starts an agent with a given host key.
    pub fn start_with_key(nats_url: &str, bus: &str, key: &Path, extra: &[&str]) -> Agent {
        let rust_log = std::env::var("CBUS_AGENT_LOG").unwrap_or_else(|_| "warn".into());
        Self::spawn(nats_url, bus, key, extra, &rust_log, Stdio::inherit())
    }

    fn spawn(
        nats_url: &str,
        bus: &str,
        key: &Path,
        extra: &[&str],
        rust_log: &str,
        stderr: Stdio,
    ) -> Agent {
        let nkey = cbus_protocol::nkey::from_ssh_host_key(key)
            .expect("host key")
            .public_key();
        // 500 ms heartbeats unless the test asks for its own interval.
        let heartbeat: &[&str] = if extra.contains(&"--heartbeat") {
            &[]
        } else {
            &["--heartbeat", "500ms"]
        };
        let child = Command::new(bin_path("cbus-agent"))
            .args(["--nats-url", nats_url, "--bus", bus])
            .args(heartbeat)
            .arg("--host-key")
            .arg(key)
            .args(extra)
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start cbus-agent");
        Agent {
            child: Some(child),
            nkey,
            _dir: None,
            log: None,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGTERM and wait: the agent says goodbye.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, Duration::from_secs(5));
        }
    }

    /// SIGSTOP, as a hung host looks, once every thread has stopped ([`crate::procs::freeze`]).
    pub fn freeze(&self) {
        crate::procs::freeze(self.pid().expect("agent running"));
    }

    /// SIGKILL: no goodbye, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}
