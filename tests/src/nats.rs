//! A real `nats-server` (with JetStream) on a free port, per test.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{free_port, terminate};

/// The nats-server binary: `$CBUS_TEST_NATS_SERVER` (another version, e.g. to compare one
/// against Debian's 2.9 in cbus-bench), else `nats-server` from `PATH`.
pub fn binary() -> PathBuf {
    std::env::var_os("CBUS_TEST_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

/// A running nats-server; killed on drop.
pub struct NatsServer {
    port: u16,
    /// The HTTP monitoring port (`-m`): `/varz` has the server's byte and message counters.
    monitor: u16,
    dir: tempfile::TempDir,
    config: Option<PathBuf>,
    child: Option<Child>,
    frozen: bool,
    jetstream: bool,
    binary: PathBuf,
}

impl NatsServer {
    /// Starts `nats-server -a 127.0.0.1 -p <free port> -js -sd <tempdir>`.
    pub fn start() -> NatsServer {
        Self::start_inner(None)
    }

    /// [`NatsServer::start`] with another nats-server binary (cbus-bench's `--nats-server`).
    pub fn start_binary(binary: &std::path::Path) -> NatsServer {
        Self::start_full(
            tempfile::tempdir().expect("tempdir for nats-server"),
            None,
            true,
            binary.to_path_buf(),
        )
    }

    /// What `binary --version` prints (`nats-server: v2.9.10`), or why it could not be run.
    pub fn version_of(binary: &std::path::Path) -> String {
        match Command::new(binary).arg("--version").output() {
            Ok(out) => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            Err(e) => format!("{}: {e}", binary.display()),
        }
    }

    /// Starts `nats-server -a 127.0.0.1 -p <free port>` without JetStream: no registry bucket.
    pub fn start_plain() -> NatsServer {
        Self::start_in_with(
            tempfile::tempdir().expect("tempdir for nats-server"),
            None,
            false,
        )
    }

    /// Starts with an extra config file. The listen address, port and JetStream store are still
    /// given on the command line, so `text` holds only authorization and the like.
    pub fn start_with_config(text: &str) -> NatsServer {
        Self::start_inner(Some(text))
    }

    /// Starts with TLS required, its certificate signed by a private CA made for this server
    /// ([`NatsServer::tls_ca`]); `text` is more config, as with [`NatsServer::start_with_config`].
    pub fn start_tls(text: &str) -> NatsServer {
        let dir = tempfile::tempdir().expect("tempdir for nats-server");
        let server = crate::cluster::TestCa::new(dir.path()).issue("server");
        let text = format!(
            "tls {{ cert_file: \"{}\", key_file: \"{}\" }}\n{text}",
            server.cert.display(),
            server.key.display()
        );
        Self::start_in(dir, Some(&text))
    }

    /// The private CA of a server started with [`NatsServer::start_tls`] (PEM).
    pub fn tls_ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Starts with `text` as config and no JetStream of its own: a leaf node whose JetStream API
    /// requests go to its hub (a leaf with its own JetStream would answer them itself).
    pub fn start_without_jetstream(text: &str) -> NatsServer {
        let dir = tempfile::tempdir().expect("tempdir for nats-server");
        Self::start_in_with(dir, Some(text), false)
    }

    fn start_inner(config_text: Option<&str>) -> NatsServer {
        Self::start_in(
            tempfile::tempdir().expect("tempdir for nats-server"),
            config_text,
        )
    }

    fn start_in(dir: tempfile::TempDir, config_text: Option<&str>) -> NatsServer {
        Self::start_in_with(dir, config_text, true)
    }

    fn start_in_with(
        dir: tempfile::TempDir,
        config_text: Option<&str>,
        jetstream: bool,
    ) -> NatsServer {
        Self::start_full(dir, config_text, jetstream, binary())
    }

    fn start_full(
        dir: tempfile::TempDir,
        config_text: Option<&str>,
        jetstream: bool,
        binary: PathBuf,
    ) -> NatsServer {
        let config = config_text.map(|text| {
            let path = dir.path().join("nats.conf");
            std::fs::write(&path, text).expect("write nats config");
            path
        });
        let mut server = NatsServer {
            port: free_port(),
            monitor: free_port(),
            dir,
            config,
            child: None,
            frozen: false,
            jetstream,
            binary,
        };
        // A free port can be taken between `free_port` and the server's bind (tests start
        // servers in parallel): the server then exits, and another port is tried.
        for _ in 0..5 {
            match server.spawn() {
                Ok(()) => return server,
                Err(log) => {
                    tracing::warn!(
                        port = server.port,
                        log,
                        "nats-server did not start; another port"
                    );
                    server.port = free_port();
                    server.monitor = free_port();
                }
            }
        }
        panic!("nats-server did not start on five free ports");
    }

    /// Starts the server on `self.port`; `Err` with its log when it exited before listening.
    fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-m", &self.monitor.to_string()]);
        if self.jetstream {
            cmd.arg("-js").arg("-sd").arg(self.dir.path().join("js"));
        }
        cmd.stdout(Stdio::null()).stderr(
            std::fs::File::create(self.dir.path().join("nats-server.log"))
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null()),
        );
        if let Some(config) = &self.config {
            cmd.arg("-c").arg(config);
        }
        let child = cmd
            .spawn()
            .expect("cannot start nats-server (apt-get install nats-server, or ./dev deps)");
        self.child = Some(child);
        let log =
            || std::fs::read_to_string(self.dir.path().join("nats-server.log")).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(10);
        // Ready when this server says it listens: a connect alone could reach another process
        // that holds the port.
        loop {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited {
                self.child = None;
                return Err(log());
            }
            if log().contains("Listening for client connections")
                && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on {}: {}",
                self.port,
                log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's `/varz` (counters since start: `in_bytes`, `in_msgs`, `out_bytes`, ...).
    pub fn varz(&self) -> Option<serde_json::Value> {
        crate::gateway::http_get(self.monitor, "/varz")
            .and_then(|body| serde_json::from_str(&body).ok())
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats-server.log")).unwrap_or_default()
    }

    /// Whether the server process is running (not stopped or killed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGSTOPs the server: its TCP connections stay open and nothing answers, as with a hung
    /// host. [`NatsServer::thaw`] (or drop) continues it.
    pub fn freeze(&mut self) {
        self.signal(libc::SIGSTOP);
        self.frozen = true;
    }

    /// SIGCONTs a frozen server.
    pub fn thaw(&mut self) {
        if self.frozen {
            self.signal(libc::SIGCONT);
            self.frozen = false;
        }
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on the pid of a child we started and have not reaped.
            unsafe {
                libc::kill(child.id() as libc::pid_t, sig);
            }
        }
    }

    /// Stops the server (clients see a disconnect).
    pub fn stop(&mut self) {
        self.thaw();
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Duration::from_secs(5));
        }
    }

    /// SIGKILLs the server, as a crashed node: no goodbye to its routes or clients.
    /// [`NatsServer::restart`] brings it back on the same port and store.
    pub fn kill(&mut self) {
        self.thaw();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops and starts again on the same port and store, for reconnect tests.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(log) = self.spawn() {
            panic!("nats-server did not restart on port {}: {log}", self.port);
        }
    }

    /// A client connection.
    pub async fn connect(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .expect("connect to test nats-server")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `authorization` block of a deployment's nats-server, from the permission sets the code
/// holds (`cbus_protocol::permissions`, as `./dev up` and the NixOS module render them): an
/// `operator` and a `gateway` user with these passwords, and each agent nkey.
pub fn deployment_authorization(agents: &[&str], operator_pw: &str, gateway_pw: &str) -> String {
    use cbus_protocol::permissions;
    let mut users = format!(
        "{{ user: operator, password: {operator_pw}, permissions: {} }}\n\
         {{ user: gateway, password: {gateway_pw}, permissions: {} }}\n",
        permissions::operator().to_config(),
        permissions::gateway().to_config()
    );
    for nkey in agents {
        users.push_str(&format!(
            "{{ nkey: {nkey}, permissions: {} }}\n",
            permissions::agent(nkey).to_config()
        ));
    }
    format!("authorization {{ users = [\n{users}] }}")
}
