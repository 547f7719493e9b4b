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
