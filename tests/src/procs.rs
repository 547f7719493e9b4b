//! Processes by pid: the ones a fixture did not spawn itself (a detached dev fleet's servers, the
//! machines a killed test run left behind) have no `Child` handle, so they are found in /proc,
//! signalled and waited for here.

use std::time::{Duration, Instant};

/// Whether `pid` runs. A zombie does not: PID 1 of a container may not reap its orphans.
pub fn alive(pid: u32) -> bool {
    state(std::path::Path::new(&format!("/proc/{pid}/stat"))).is_some_and(|s| s != 'Z')
}

/// The state letter of a process or thread from its `stat` file.
fn state(stat_path: &std::path::Path) -> Option<char> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // The state follows the command name, which may itself hold spaces and parentheses.
    stat.rsplit_once(") ")?.1.chars().next()
}

/// SIGSTOPs `pid`, as a hung host looks, and waits until every one of its threads has stopped:
/// `kill` returns before that, and on a loaded machine a thread may take a while to be
/// scheduled and stop. Panics if they have not within 5 s.
pub fn freeze(pid: u32) {
    // SAFETY: sending a signal; no memory is shared.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGSTOP);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let stopped = || {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks
            .flatten()
            .all(|t| matches!(state(&t.path().join("stat")), Some('T' | 't') | None))
    };
    while !stopped() {
        assert!(Instant::now() < deadline, "process {pid} did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every pid in /proc.
pub fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A process's command line with its arguments joined by spaces.
pub fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Running processes whose command line contains `needle`.
pub fn pids_with(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    all_pids()
        .into_iter()
        .filter(|&p| p != me && alive(p) && cmdline(p).contains(needle))
        .collect()
}

/// Sends `sig` to `pids`, waits up to `grace` for them to end, then SIGKILLs what is left.
pub fn stop_pids(sig: libc::c_int, grace: Duration, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    for &pid in pids {
        // SAFETY: kill(2) only sends a signal.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !pids.iter().any(|&p| alive(p)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for &pid in pids.iter().filter(|&&p| alive(p)) {
        // SAFETY: as above.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
    std::thread::sleep(Duration::from_millis(200));
}

/// The first child of `pid` (a machine's init is the nspawn process's child).
pub fn first_child(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The command name of a process (`systemd` for a booted machine's init).
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}
