//! Running the real `cbus` binary from the tests, as a user would: no config file, no NATS
//! settings from the environment, output captured (or read line by line while it runs).

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::{bin_path, NatsServer};
use cbus_client::fleet::Fleet;
use serde_json::Value;

/// `cbus` with no config file and no NATS settings from the environment.
pub fn command() -> Command {
    let mut c = Command::new(bin_path("cbus"));
    c.env("CBUS_CONFIG", "/nonexistent/cbus.toml")
        .env_remove("NATS_URL")
        .env_remove("NATS_TOKEN")
        .env_remove("NATS_CREDS")
        .env_remove("NATS_USER")
        .env_remove("NATS_PASSWORD")
        .env_remove("NATS_NKEY")
        .env_remove("NATS_CA")
        .stdin(Stdio::null());
    c
}

/// Runs `cbus --server URL ARGS...`.
pub fn cbus(url: &str, args: &[&str]) -> Output {
    command()
        .arg("--server")
        .arg(url)
        .args(args)
        .output()
        .expect("run cbus")
}

/// Runs `cbus ARGS...` with `input` on stdin.
pub fn cbus_stdin(args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = command()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cbus");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait cbus")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Both streams, for assertion messages.
pub fn both(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        stdout(o),
        stderr(o)
    )
}

pub fn json_of(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", both(o)))
}

/// Asserts success and returns stdout.
#[track_caller]
pub fn ok_stdout(o: &Output) -> String {
    assert!(o.status.success(), "{}", both(o));
    stdout(o)
}

/// The result entry of `host` in a fan-out JSON document.
pub fn result_of(doc: &Value, host: &str) -> Value {
    doc["results"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["host"] == host))
        .cloned()
        .unwrap_or_else(|| panic!("no result for {host} in {doc}"))
}

/// Waits until `n` agents are registered as running.
pub async fn wait_agents(nats: &NatsServer, n: usize) {
    let fleet = Fleet::new(nats.connect().await, "test");
    let ok = crate::ask::wait_running(&fleet, Duration::from_secs(20), |c| c == n).await;
    assert!(ok, "{n} agents never registered");
}

/// Emits `Message(text)` from the test service on `host` (through cbus).
pub fn emit(url: &str, host: &str, text: &str) {
    let arg = serde_json::to_string(&serde_json::json!([text])).unwrap();
    let out = cbus(
        url,
        &[
            "-M",
            host,
            "invoke",
            "org.cbus.Test",
            "/org/cbus/Test",
            "EmitOne",
            &arg,
        ],
    );
    assert!(out.status.success(), "{}", both(&out));
}

/// A `cbus` process still running, with its debug log (`CBUS_LOG=cbus=debug`) and stdout read
/// line by line as they come, so a test can act at a known point of the command.
pub struct Running {
    child: std::process::Child,
    pub started: std::time::Instant,
    stdout: std::sync::mpsc::Receiver<String>,
    stdout_seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    pub fn spawn(url: &str, args: &[&str]) -> Running {
        use std::io::BufRead;
        let mut child = command()
            .env("CBUS_LOG", "cbus=debug")
            .arg("--server")
            .arg(url)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run cbus");
        let started = std::time::Instant::now();
        let (tx, stdout) = std::sync::mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let stdout_seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = stdout_seen.clone();
        let mut readers = vec![std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                seen.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        })];
        let err = child.stderr.take().expect("stderr");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let lines = stderr.clone();
        readers.push(std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        }));
        Running {
            child,
            started,
            stdout,
            stdout_seen,
            stderr,
            readers,
        }
    }

    /// Waits until a stderr line contains `needle`; whether it did within `timeout`.
    pub fn wait_stderr(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self
                .stderr
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(needle))
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// The next stdout line, if one comes within `timeout`.
    pub fn stdout_line(&self, timeout: Duration) -> Option<String> {
        self.stdout.recv_timeout(timeout).ok()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling a child we started.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits for the exit (SIGKILL after `cap`: a hang) and returns everything it wrote, and how
    /// long it ran from its start.
    pub fn finish(mut self, cap: Duration) -> (Output, Duration) {
        let deadline = std::time::Instant::now() + cap;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait cbus") {
                break s;
            }
            if std::time::Instant::now() >= deadline {
                let _ = self.child.kill();
                break self.child.wait().expect("wait cbus");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let took = self.started.elapsed();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let join = |v: &std::sync::Mutex<Vec<String>>| {
            let mut s = v.lock().unwrap().join("\n");
            s.push('\n');
            s.into_bytes()
        };
        (
            Output {
                status,
                stdout: join(&self.stdout_seen),
                stderr: join(&self.stderr),
            },
            took,
        )
    }
}
