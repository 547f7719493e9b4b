//! Running a workspace binary as an unprivileged user (`nobody`). The build's binaries live in
//! the checkout's target/, which that user may not reach: a repository cloned into a 0700
//! directory (root's home on Debian) gives "Permission denied" at exec. So the binary, and what
//! the test hands it (host key, bus socket), go into a temp dir of mode 0755 that anyone can
//! traverse.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::bins::bin_path;

/// The uid and gid of `nobody` / `nogroup` on Debian.
pub const NOBODY: u32 = 65534;

/// A directory `nobody` can reach, removed on drop.
pub struct Unprivileged {
    dir: tempfile::TempDir,
}

impl Unprivileged {
    /// A new 0755 temp dir under the system's temp dir (itself reachable by everyone).
    pub fn new() -> Unprivileged {
        let dir = tempfile::Builder::new()
            .prefix("cbus-nobody-")
            .tempdir_in(std::env::temp_dir())
            .expect("tempdir for an unprivileged process");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod 0755");
        Unprivileged { dir }
    }

    /// Where files for the unprivileged process go.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Makes a file in the dir readable by everyone (e.g. a host key `nobody` must read).
    pub fn share(&self, path: &Path) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    }

    /// A copy of the workspace binary `name` in the dir, executable by everyone.
    pub fn bin(&self, name: &str) -> PathBuf {
        let copy = self.dir.path().join(name);
        if !copy.exists() {
            std::fs::copy(bin_path(name), &copy)
                .unwrap_or_else(|e| panic!("copy {name} to {}: {e}", copy.display()));
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))
                .expect("chmod 0755");
        }
        copy
    }

    /// A command that runs the copy of `name` as `nobody`.
    pub fn command(&self, name: &str) -> Command {
        let mut c = Command::new(self.bin(name));
        c.uid(NOBODY).gid(NOBODY).current_dir(self.dir.path());
        c
    }
}

impl Default for Unprivileged {
    fn default() -> Self {
        Self::new()
    }
}
