//! Real systemd machines, booted with `systemd-nspawn` from an overlay of `/`.
//!
//! Each machine gets its own hostname, machine-id and SSH ed25519 host key (so its own cbus
//! nkey), and host services that would clash on the shared loopback or slow the boot are masked.
//! Machines share the host's network namespace, so an agent inside reaches a NATS server on
//! 127.0.0.1. From the host, a machine's system bus is
//! `unix:path=/proc/<leader>/root/run/dbus/system_bus_socket`.
//!
//! Teardown (SIGTERM to nspawn powers the machine off, then the overlay is unmounted) runs in
//! `Drop`, so also when a test panics; a fleet left behind by a killed test run is swept the next
//! time a fleet boots.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::terminate;

/// Where machine state lives; must not be on an overlay itself (it is the upper layer).
const STATE_ROOT: &str = "/var/tmp/cbus-machines";

/// Host units that must not run inside the machines: they would fight over the shared loopback
/// (nats, ssh, prometheus…), or only slow the boot down.
const MASKED: &[&str] = &[
    "nats-server.service",
    "nix-daemon.service",
    "nix-daemon.socket",
    "postgresql.service",
    "prometheus.service",
    "prometheus-node-exporter.service",
    "avahi-daemon.service",
    "avahi-daemon.socket",
    "smartmontools.service",
    "e2scrub_reap.service",
    "nvmefc-boot-connections.service",
    "nvmf-autoconnect.service",
    "systemd-pstore.service",
    // Nothing reads utmp in a test machine, and it fails now and then on a loaded host.
    "systemd-update-utmp.service",
    "systemd-update-utmp-runlevel.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "man-db.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "logrotate.timer",
];
/// Masked unless the spec asks for SSH.
const SSH_UNITS: &[&str] = &["ssh.service", "ssh.socket", "rescue-ssh.target"];

/// What to boot.
#[derive(Debug, Clone, Default)]
pub struct MachineSpec {
    pub name: String,
    /// Unit files dropped into /etc/systemd/system: (file name, contents).
    pub units: Vec<(String, String)>,
    /// Units to enable (wanted by multi-user.target).
    pub enable: Vec<String>,
    /// Extra files: (absolute path inside the machine, contents, mode).
    pub files: Vec<(String, String, u32)>,
    /// Keep sshd running (port must then differ per machine: set it in `files`).
    pub ssh: bool,
}

impl MachineSpec {
    pub fn new(name: impl Into<String>) -> Self {
        MachineSpec {
            name: name.into(),
            ..Default::default()
        }
    }

    /// Adds a unit file and enables it.
    pub fn with_unit(mut self, name: &str, contents: &str) -> Self {
        self.units.push((name.to_owned(), contents.to_owned()));
        self
    }
}

/// A booted machine.
pub struct Machine {
    pub name: String,
    dir: PathBuf,
    nspawn: Option<Child>,
    leader: u32,
    /// The units the test put there: if one of them failed at boot, booting failed.
    own_units: Vec<String>,
}

impl Machine {
    /// PID (on the host) of the machine's init.
    pub fn leader_pid(&self) -> u32 {
        self.leader
    }

    /// The machine's root file system as seen from the host.
    pub fn root_dir(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// D-Bus address of the machine's system bus, usable from the host.
    pub fn bus_address(&self) -> String {
        format!(
            "unix:path=/proc/{}/root/run/dbus/system_bus_socket",
            self.leader
        )
    }

    /// The machine's SSH host private key (for `cbus-agent --host-key`).
    pub fn host_key_path(&self) -> PathBuf {
        self.root_dir().join("etc/ssh/ssh_host_ed25519_key")
    }

    /// The public half, `ssh-ed25519 AAAA…`.
    pub fn host_key_public(&self) -> String {
        std::fs::read_to_string(self.root_dir().join("etc/ssh/ssh_host_ed25519_key.pub"))
            .expect("read machine host key")
    }

    /// The cbus nkey of this machine.
    pub fn nkey(&self) -> String {
        cbus_protocol::nkey::from_ssh_public_key(&self.host_key_public())
            .expect("machine host key is ed25519")
    }

    /// Runs a command inside the machine (all namespaces of its init).
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a", "--"])
            .args(args)
            .output()
            .expect("run nsenter")
    }

    /// Runs a command inside and returns its trimmed stdout.
    pub fn exec_stdout(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.exec(args).stdout)
            .trim()
            .to_owned()
    }

    /// Waits until `systemctl is-system-running` says `running`. A unit of the host's image that
    /// failed (seen on a loaded host: systemd-user-sessions) is only reported; one of the test's
    /// own units failing, or no end of booting by `timeout`, panics.
    pub fn wait_running(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.exec_stdout(&["systemctl", "is-system-running"]);
            if state == "running" {
                return;
            }
            if state == "degraded" {
                let failed = self.exec_stdout(&["systemctl", "--failed", "--no-legend", "--plain"]);
                let ours = failed
                    .lines()
                    .filter_map(|l| l.split_whitespace().next())
                    .any(|unit| self.own_units.iter().any(|u| u == unit));
                assert!(
                    !ours,
                    "machine {}: a test unit failed:\n{failed}",
                    self.name
                );
                eprintln!("warning: machine {} is degraded:\n{failed}", self.name);
                return;
            }
            if Instant::now() > deadline {
                let failed = self.exec_stdout(&["systemctl", "--failed", "--no-legend"]);
                panic!(
                    "machine {} is {state:?}, not running; failed units:\n{failed}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn shutdown(&mut self) {
        if let Some(mut child) = self.nspawn.take() {
            terminate(&mut child, Duration::from_secs(15));
        }
        unmount_and_remove(&self.dir);
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Machines booted together; all are powered off and cleaned when the fleet is dropped.
pub struct Fleet {
    pub machines: Vec<Machine>,
    dir: PathBuf,
}

impl Fleet {
    /// Boots the machines in parallel and waits until each is `running`.
    pub fn boot(specs: &[MachineSpec]) -> Fleet {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "booting systemd machines needs root (systemd-nspawn, overlay mounts)"
        );
        assert!(
            Command::new("systemd-nspawn")
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false),
            "systemd-nspawn is missing: apt-get install systemd-container (or ./dev deps)"
        );
        sweep_stale();
        // Tests of one binary boot fleets in parallel, so pid and time alone may repeat.
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = PathBuf::from(STATE_ROOT).join(format!(
            "{}-{}-{}",
            std::process::id(),
            cbus_protocol::presence::now_ms(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create machine state dir");
        std::fs::write(dir.join("owner.pid"), std::process::id().to_string())
            .expect("write owner pid");
        let mut fleet = Fleet {
            machines: Vec::new(),
            dir,
        };
        for spec in specs {
            let m = start_machine(&fleet.dir, spec);
            fleet.machines.push(m);
        }
        for m in &fleet.machines {
            m.wait_running(Duration::from_secs(60));
        }
        fleet
    }

    /// Where this fleet's overlays and state live (removed on drop).
    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    pub fn get(&self, name: &str) -> &Machine {
        self.machines
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no machine {name}"))
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Power off all at once, then wait: sequential shutdowns would add up.
        for m in &self.machines {
            if let Some(child) = &m.nspawn {
                unsafe {
                    libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
                }
            }
        }
        for m in &mut self.machines {
            m.shutdown();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_machine(fleet_dir: &Path, spec: &MachineSpec) -> Machine {
    let dir = fleet_dir.join(&spec.name);
    let root = dir.join("root");
    for sub in ["upper", "work", "root"] {
        std::fs::create_dir_all(dir.join(sub)).expect("create overlay dirs");
    }
    run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir=/,upperdir={},workdir={}",
            dir.join("upper").display(),
            dir.join("work").display()
        ))
        .arg(&root));
    let etc = root.join("etc");
    // A machine-id of its own: systemd-machine-id-setup --root would copy the host's
    // /var/lib/dbus/machine-id, and every machine would share the host's id.
    let _ = std::fs::remove_file(etc.join("machine-id"));
    let _ = std::fs::remove_file(root.join("var/lib/dbus/machine-id"));
    let id = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .expect("read a random uuid")
        .trim()
        .replace('-', "");
    std::fs::write(etc.join("machine-id"), format!("{id}\n")).expect("write machine-id");
    std::fs::write(etc.join("hostname"), format!("{}\n", spec.name)).expect("write hostname");
    let system = etc.join("systemd/system");
    let mut masked: Vec<String> = MASKED.iter().map(|s| s.to_string()).collect();
    masked.extend(host_enabled_services());
    if spec.ssh {
        masked.retain(|u| !SSH_UNITS.contains(&u.as_str()));
    } else {
        masked.extend(SSH_UNITS.iter().map(|s| s.to_string()));
    }
    for unit in &masked {
        let link = system.join(unit);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/dev/null", &link).expect("mask unit");
    }
    // Every host key but ours goes, so sshd (when kept) and cbus use the machine's own.
    if let Ok(entries) = std::fs::read_dir(etc.join("ssh")) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("ssh_host_") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C"])
        .arg(format!("root@{}", spec.name))
        .arg("-f")
        .arg(etc.join("ssh/ssh_host_ed25519_key")));
    for (name, contents) in &spec.units {
        std::fs::write(system.join(name), contents).expect("write unit file");
    }
    if !spec.enable.is_empty() {
        let wants = system.join("multi-user.target.wants");
        std::fs::create_dir_all(&wants).expect("create wants dir");
        for unit in &spec.enable {
            let _ =
                std::os::unix::fs::symlink(format!("/etc/systemd/system/{unit}"), wants.join(unit));
        }
    }
    for (path, contents, mode) in &spec.files {
        let target = root.join(path.trim_start_matches('/'));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).expect("create file dir");
        }
        std::fs::write(&target, contents).expect("write file");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(*mode))
            .expect("chmod file");
    }
    let log = std::fs::File::create(dir.join("console.log")).expect("console log");
    let nspawn = Command::new("systemd-nspawn")
        .arg("-D")
        .arg(&root)
        .args(["-M", &spec.name])
        .args([
            "--register=no",
            "--link-journal=no",
            "--keep-unit",
            "-b",
            "--console=pipe",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone log"))
        .stderr(log)
        .spawn()
        .expect("start systemd-nspawn");
    let nspawn_pid = nspawn.id();
    // Owned by a Machine before waiting, so a machine that does not start is still powered off
    // and unmounted when the wait panics.
    let mut machine = Machine {
        name: spec.name.clone(),
        dir,
        nspawn: Some(nspawn),
        leader: 0,
        own_units: spec.units.iter().map(|(name, _)| name.clone()).collect(),
    };
    machine.leader = wait_leader(nspawn_pid, &machine.dir);
    machine
}

/// What the host image enables beyond a minimal system: its own services and SysV scripts.
/// Whatever packages a host has installed, the machines boot only systemd, D-Bus and what a test
/// adds, so `is-system-running` reaches `running` on any host of this kind.
fn host_enabled_services() -> Vec<String> {
    const KEEP: &[&str] = &["dbus.service", "dbus.socket", "getty@tty1.service"];
    let mut units = Vec::new();
    for wants in [
        "multi-user.target.wants",
        "sockets.target.wants",
        "timers.target.wants",
        "default.target.wants",
        "sysinit.target.wants",
    ] {
        if let Ok(entries) = std::fs::read_dir(Path::new("/etc/systemd/system").join(wants)) {
            units.extend(
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned()),
            );
        }
    }
    if let Ok(entries) = std::fs::read_dir("/etc/init.d") {
        units.extend(
            entries
                .flatten()
                .map(|e| format!("{}.service", e.file_name().to_string_lossy())),
        );
    }
    units.retain(|u| {
        (u.ends_with(".service") || u.ends_with(".socket") || u.ends_with(".timer"))
            && !KEEP.contains(&u.as_str())
            && !u.starts_with("systemd-")
            && !u.starts_with("dbus")
    });
    units
}

/// The machine's init is the nspawn process's child.
fn wait_leader(nspawn_pid: u32, dir: &Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{nspawn_pid}/task/{nspawn_pid}/children"))
                .unwrap_or_default();
        if let Some(pid) = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
        {
            // Wait until the child has become systemd (it execs after setting up namespaces).
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "systemd" {
                return pid;
            }
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
            panic!(
                "machine in {} did not start; console:\n{log}",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn unmount_and_remove(dir: &Path) {
    let root = dir.join("root");
    for _ in 0..50 {
        let mounted = std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(&*root.to_string_lossy()));
        if !mounted {
            break;
        }
        let ok = Command::new("umount")
            .arg(&root)
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Removes fleets whose owning test process is gone (a killed test run).
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(STATE_ROOT) else {
        return;
    };
    for fleet in entries.flatten() {
        // The owner is in the name as well as in owner.pid: a fleet booting in a parallel test
        // has its directory for a moment before its owner.pid (CI once swept one in that gap).
        let named = fleet
            .file_name()
            .to_str()
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        let owner = std::fs::read_to_string(fleet.path().join("owner.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .or(named);
        let alive = owner.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if alive {
            continue;
        }
        if let Ok(machines) = std::fs::read_dir(fleet.path()) {
            for m in machines.flatten() {
                if m.path().is_dir() {
                    unmount_and_remove(&m.path());
                }
            }
        }
        let _ = std::fs::remove_dir_all(fleet.path());
    }
}

/// Mount points left under `dir` (a fleet's [`Fleet::state_dir`]), for leak checks. Scoped to one
/// fleet so that other fleets booted at the same time (a benchmark, a second test run) don't count.
pub fn leftover_mounts(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| Path::new(m).starts_with(dir))
        .map(str::to_owned)
        .collect()
}
