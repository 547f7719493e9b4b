//! Finding the workspace's binaries from a test.
//!
//! Integration tests of one package cannot depend on another package's binaries, so `./dev test`
//! builds them first (`cargo build --workspace --bins`) and tests look next to their own
//! executable (target/<profile>/deps/..).

use std::path::PathBuf;

/// Path of a workspace binary such as `cbus-agent`, `cbus`, `cbus-gateway` or `cbus-test-service`.
pub fn bin_path(name: &str) -> PathBuf {
    if name == "cbus-test-service" {
        if let Some(p) = option_env!("CARGO_BIN_EXE_cbus-test-service") {
            return PathBuf::from(p);
        }
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe
        .parent()
        .expect("test executable has a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found; build the workspace binaries first: cargo build --workspace --bins",
        path.display()
    );
    path
}
