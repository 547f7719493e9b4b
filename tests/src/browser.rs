//! Headless Chromium for the dashboard tests: Chromium (Debian package) and playwright-core
//! (npm, pinned, into target/playwright) are installed when missing, so a test runs from a
//! fresh clone; the driving script (`tests/dashboard/*.mjs`) is copied next to node_modules.

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

/// Installs what is missing and copies `tests/dashboard/<script>` beside node_modules;
/// returns that directory (run `node <dir>/<script>` there).
pub fn deps(script: &str) -> PathBuf {
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
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("dashboard")
            .join(script),
        dir.join(script),
    )
    .unwrap_or_else(|e| panic!("copy {script} next to node_modules: {e}"));
    dir
}
