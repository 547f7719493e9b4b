//! Real headless Chromium for the dashboard's tests and the bench: Chromium (Debian package)
//! and playwright-core (npm, pinned, into `target/playwright`) are installed when missing, so
//! the tests run from a fresh clone; the scripts of `tests/dashboard/` are copied next to
//! `node_modules` so that their `import 'playwright-core'` resolves.

use std::path::{Path, PathBuf};

pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Pinned: the version the scripts were written against (a newer one may change the API).
pub const PLAYWRIGHT: &str = "playwright-core@1.65.1";

fn run(cmd: &mut std::process::Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Installs Chromium and playwright-core when missing; returns the directory holding
/// node_modules/playwright-core and the scripts.
pub fn browser_deps() -> PathBuf {
    if !Path::new(CHROMIUM).exists() {
        run(std::process::Command::new("apt-get")
            .args(["install", "-y", "-qq", "chromium"])
            .env("DEBIAN_FRONTEND", "noninteractive"));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("playwright");
    if !dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        std::fs::create_dir_all(&dir).expect("create playwright dir");
        run(std::process::Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
            .arg(&dir)
            .arg(PLAYWRIGHT));
    }
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboard");
    for entry in std::fs::read_dir(&scripts).expect("tests/dashboard") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "mjs") {
            let name = path.file_name().expect("file name");
            std::fs::copy(&path, dir.join(name)).expect("copy script next to node_modules");
        }
    }
    dir
}

/// A dashboard script (`tests/dashboard/<name>`, copied by [`browser_deps`]) run by node,
/// speaking the step protocol of `driver.mjs`: it prints `STEP <name>` and waits; the test does
/// its part, and the script goes on when the test asks for the next line. `FAIL ...` ends the
/// test with the transcript; `DONE` is the script's last word.
pub struct Script {
    node: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    out: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    transcript: Vec<String>,
    deadline: tokio::time::Instant,
    stepped: bool,
    done: bool,
}

impl Script {
    /// Starts `node <dir>/<name>` with `env`; the whole run must end within `within`.
    pub fn start<I, K, V>(dir: &Path, name: &str, env: I, within: std::time::Duration) -> Script
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<std::ffi::OsStr>,
        V: AsRef<std::ffi::OsStr>,
    {
        use std::process::Stdio;
        use tokio::io::AsyncBufReadExt;
        let mut node = tokio::process::Command::new("node")
            .arg(dir.join(name))
            .current_dir(dir)
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("run node (apt-get install nodejs npm)");
        let stdin = node.stdin.take().expect("node stdin");
        let out = tokio::io::BufReader::new(node.stdout.take().expect("node stdout")).lines();
        Script {
            node,
            stdin,
            out,
            transcript: Vec::new(),
            deadline: tokio::time::Instant::now() + within,
            stepped: false,
            done: false,
        }
    }

    /// The script's next line (the last `STEP` answered first); `None` once it closed its output.
    pub async fn next_line(&mut self) -> Option<String> {
        use tokio::io::AsyncWriteExt;
        if std::mem::take(&mut self.stepped) {
            self.stdin.write_all(b"go\n").await.expect("write to node");
            self.stdin.flush().await.expect("flush node stdin");
        }
        let line = match tokio::time::timeout_at(self.deadline, self.out.next_line()).await {
            Ok(Ok(Some(l))) => l,
            Ok(_) => return None,
            Err(_) => panic!("dashboard script timed out:\n{}", self.transcript()),
        };
        self.transcript.push(line.clone());
        if line.starts_with("FAIL") {
            panic!("dashboard: {line}\n{}", self.transcript());
        }
        self.stepped = line.starts_with("STEP ");
        self.done |= line == "DONE";
        Some(line)
    }

    /// Everything the script printed so far.
    pub fn transcript(&self) -> String {
        self.transcript.join("\n")
    }

    /// Waits for node to end; prints the transcript, and fails unless the script said `DONE`
    /// and exited 0.
    pub async fn finish(mut self) {
        let status = self.node.wait().await.expect("wait for node");
        println!("{}", self.transcript());
        assert!(
            self.done && status.success(),
            "dashboard script failed ({status}):\n{}",
            self.transcript()
        );
    }
}
