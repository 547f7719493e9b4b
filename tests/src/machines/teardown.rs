//! Powering machines off and removing their overlays: the one way, whoever booted them. A test's
//! fleet runs it on drop, the sweep of fleets whose test process died runs it, and `cbus-dev
//! down` runs it on the dev fleet's machines directory. It needs no record of what was started:
//! everything is found in /proc by the directory, so a crash that lost the records loses nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::procs::{alive, all_pids, cmdline, pids_with, stop_pids};

/// Teardown could not unmount everything under a directory; nothing under it was removed.
#[derive(Debug, thiserror::Error)]
#[error("overlays still mounted under {}: {}; see /proc/mounts", dir.display(), mounts.join(" "))]
pub struct StillMounted {
    pub dir: PathBuf,
    pub mounts: Vec<String>,
}

/// Powers off every machine under `dir` (a fleet's directory or one machine's), ends what else
/// runs inside them, and unmounts their overlays. Safe to run when nothing is up.
pub fn teardown(dir: &Path) -> Result<(), StillMounted> {
    let prefix = format!("{}/", dir.display());
    // SIGTERM to nspawn powers its machine off (agents say goodbye); all at once, then wait.
    let nspawns: Vec<u32> = pids_with(&format!("-D {prefix}"))
        .into_iter()
        .filter(|&p| cmdline(p).starts_with("systemd-nspawn"))
        .collect();
    stop_pids(libc::SIGTERM, Duration::from_secs(20), &nspawns);
    // What is left when nspawn itself was killed: inits get systemd's poweroff signal (SIGKILL
    // to an init ends its whole machine), then other processes inside (shells entered with
    // nsenter) are terminated.
    let inits: Vec<u32> = rooted_in(dir)
        .into_iter()
        .filter(|&(_, nspid)| nspid == 1)
        .map(|(pid, _)| pid)
        .collect();
    if !inits.is_empty() {
        eprintln!("powering off machines whose nspawn is gone (init pids: {inits:?})");
    }
    stop_pids(libc::SIGRTMIN() + 4, Duration::from_secs(10), &inits);
    let others: Vec<u32> = rooted_in(dir).into_iter().map(|(pid, _)| pid).collect();
    stop_pids(libc::SIGTERM, Duration::from_secs(3), &others);
    let mut mounts = leftover_mounts(dir);
    mounts.sort_unstable_by(|a, b| b.cmp(a));
    for m in &mounts {
        let umount = |lazy: bool| {
            let mut c = Command::new("umount");
            if lazy {
                c.arg("-l");
            }
            c.arg(m)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        // A machine that just powered off may hold its root for a moment longer.
        let done = (0..10).any(|_| {
            umount(false) || {
                std::thread::sleep(Duration::from_millis(100));
                false
            }
        });
        if !done {
            umount(true);
        }
    }
    let left = leftover_mounts(dir);
    if left.is_empty() {
        Ok(())
    } else {
        Err(StillMounted {
            dir: dir.to_owned(),
            mounts: left,
        })
    }
}

/// Removes the machine directories (those with an overlay's upper and work dirs) under `dir`,
/// and `dir` itself when that leaves it empty. Only after [`teardown`] succeeded: a mounted
/// root would be removed through.
pub fn remove_machine_dirs(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.join("upper").is_dir() && p.join("work").is_dir() {
                let _ = std::fs::remove_dir_all(&p);
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Processes whose root is an overlay with its upper dir under `dir`, as (pid, pid inside its
/// namespace): a machine's init is 1 there.
pub fn rooted_in(dir: &Path) -> Vec<(u32, u32)> {
    let needle = format!("upperdir={}/", dir.display());
    all_pids()
        .into_iter()
        .filter(|&pid| alive(pid))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
                .unwrap_or_default()
                .lines()
                .any(|l| {
                    l.split(' ').nth(4) == Some("/")
                        && l.contains(" - overlay ")
                        && l.contains(&needle)
                })
        })
        .map(|pid| {
            let nspid = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|v| v.split_whitespace().last()?.parse().ok())
                .unwrap_or(0);
            (pid, nspid)
        })
        .collect()
}

/// Mount points left under `dir` (a fleet's [`crate::Fleet::state_dir`]), for leak checks.
/// Scoped to one directory so that other fleets booted at the same time (a benchmark, a second
/// test run) don't count.
pub fn leftover_mounts(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| Path::new(m).starts_with(dir))
        .map(str::to_owned)
        .collect()
}
