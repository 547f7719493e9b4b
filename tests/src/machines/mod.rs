//! Real systemd machines, booted with `systemd-nspawn` from an overlay of `/`: the one way to
//! boot, mask, tear down and sweep machines, used by the integration tests, `cbus-bench` and the
//! dev fleet (`cbus-dev`).
//!
//! Each machine gets its own hostname, machine-id and SSH ed25519 host key (so its own cbus
//! nkey), and host services that would clash on the shared loopback or slow the boot are masked.
//! Machines share the host's network namespace, so an agent inside reaches a NATS server on
//! 127.0.0.1. From the host, a machine's system bus is
//! `unix:path=/proc/<leader>/root/run/dbus/system_bus_socket`.
//!
//! A test's fleet is torn down (SIGTERM to nspawn powers the machine off, then the overlay is
//! unmounted) in `Drop`, so also when a test panics; a fleet left behind by a killed test run is
//! swept the next time a fleet boots. A detached fleet (the dev fleet) outlives the process that
//! booted it: its machines are recorded ([`MachineRecord`]) and torn down by [`teardown`].

mod root;
mod teardown;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use root::{generate_host_key, masked_units};
pub use teardown::{leftover_mounts, remove_machine_dirs, rooted_in, teardown, StillMounted};

use crate::procs::{alive, comm, first_child};
use crate::util::terminate;

/// Where test fleets live; must not be on an overlay itself (it is the upper layer).
const STATE_ROOT: &str = "/var/tmp/cbus-machines";

/// What to boot.
#[derive(Debug, Clone, Default)]
pub struct MachineSpec {
    pub name: String,
    /// Unit files dropped into /etc/systemd/system: (file name, contents). One of them failing
    /// at boot fails the boot.
    pub units: Vec<(String, String)>,
    /// Units to enable (wanted by multi-user.target).
    pub enable: Vec<String>,
    /// Extra files: (absolute path inside the machine, contents, mode).
    pub files: Vec<(String, String, u32)>,
    /// Host files copied in: (path on the host, absolute path inside the machine, mode).
    pub copies: Vec<(PathBuf, String, u32)>,
    /// Symbolic links: (absolute path inside the machine, target), e.g. a timer's `.wants` link.
    pub links: Vec<(String, String)>,
    /// Keep sshd running (port must then differ per machine: set it in `files`).
    pub ssh: bool,
    /// An ed25519 host key (private; its `.pub` next to it) to install instead of generating
    /// one, so that the machine's nkey is known before it boots.
    pub host_key: Option<PathBuf>,
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

/// Why a machine did not boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("machine in {} did not start; console:\n{console}", dir.display())]
    NoInit { dir: PathBuf, console: String },
    #[error("machine {name} exited while booting; console ({}):\n{console}", log.display())]
    Exited {
        name: String,
        log: PathBuf,
        console: String,
    },
    #[error("machine {name}: a unit of its own failed:\n{failed}")]
    UnitFailed { name: String, failed: String },
    #[error("machine {name} is {state:?}, not running; failed units:\n{failed}")]
    Timeout {
        name: String,
        state: String,
        failed: String,
    },
}

pub(super) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BootError {
    let what = what.into();
    move |source| BootError::Io { what, source }
}

/// What a detached machine's owner keeps to find it again (e.g. in a JSON state file).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MachineRecord {
    pub name: String,
    /// The machine's directory (its overlay's upper, work and root dirs, its console log).
    pub dir: PathBuf,
    pub nspawn_pid: u32,
}

/// A booted machine.
pub struct Machine {
    pub name: String,
    dir: PathBuf,
    /// The nspawn process while this machine is powered off on drop; `None` when detached.
    nspawn: Option<Child>,
    nspawn_pid: u32,
    leader: u32,
    /// The units the spec put there: if one of them failed at boot, booting failed.
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

    /// Where nspawn writes the machine's console.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
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

    /// How to find this machine again from another process.
    pub fn record(&self) -> MachineRecord {
        MachineRecord {
            name: self.name.clone(),
            dir: self.dir.clone(),
            nspawn_pid: self.nspawn_pid,
        }
    }

    /// The machine a record names, if it still runs: its nspawn is alive and has a systemd child.
    pub fn reattach(record: &MachineRecord) -> Option<Machine> {
        if !alive(record.nspawn_pid) {
            return None;
        }
        let leader = first_child(record.nspawn_pid).filter(|&l| comm(l) == "systemd")?;
        Some(Machine {
            name: record.name.clone(),
            dir: record.dir.clone(),
            nspawn: None,
            nspawn_pid: record.nspawn_pid,
            leader,
            own_units: Vec::new(),
        })
    }

    /// A command that runs inside the machine (all namespaces of its init).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.leader.to_string(), "-a", "--"])
            .args(args);
        c
    }

    /// Runs a command inside the machine.
    pub fn exec(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run nsenter")
    }

    /// Runs a command inside and returns its trimmed stdout.
    pub fn exec_stdout(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.exec(args).stdout)
            .trim()
            .to_owned()
    }

    /// Waits until `systemctl is-system-running` says `running`. A unit of the host's image that
    /// failed (seen on a loaded host: systemd-user-sessions) is only reported; one of the spec's
    /// own units failing, the machine exiting, or no end of booting by `timeout` is an error.
    pub fn wait_running(&self, timeout: Duration) -> Result<(), BootError> {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.exec_stdout(&["systemctl", "is-system-running"]);
            if state == "running" {
                return Ok(());
            }
            if state == "degraded" {
                let failed = self.exec_stdout(&["systemctl", "--failed", "--no-legend", "--plain"]);
                let ours = failed
                    .lines()
                    .filter_map(|l| l.split_whitespace().next())
                    .any(|unit| self.own_units.iter().any(|u| u == unit));
                if ours {
                    return Err(BootError::UnitFailed {
                        name: self.name.clone(),
                        failed,
                    });
                }
                eprintln!("warning: machine {} is degraded:\n{failed}", self.name);
                return Ok(());
            }
            if !alive(self.nspawn_pid) {
                return Err(BootError::Exited {
                    name: self.name.clone(),
                    log: self.console_log(),
                    console: console_tail(&self.console_log()),
                });
            }
            if Instant::now() > deadline {
                return Err(BootError::Timeout {
                    name: self.name.clone(),
                    state,
                    failed: self.exec_stdout(&["systemctl", "--failed", "--no-legend"]),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn shutdown(&mut self) {
        if let Some(mut child) = self.nspawn.take() {
            terminate(&mut child, Duration::from_secs(15));
            if teardown(&self.dir).is_ok() {
                let _ = std::fs::remove_dir_all(&self.dir);
            }
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Machines booted together. A test's fleet ([`Fleet::boot`]) is powered off and cleaned when
/// dropped; a detached one ([`Fleet::boot_detached`]) is left running.
pub struct Fleet {
    pub machines: Vec<Machine>,
    dir: PathBuf,
    detached: bool,
}

impl Fleet {
    /// Boots the machines of a test in parallel and waits until each is `running`; panics when
    /// one does not boot (what booted is torn down).
    pub fn boot(specs: &[MachineSpec]) -> Fleet {
        Self::try_boot(specs).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Fleet::boot`] that returns why a machine did not boot (for callers that retry).
    pub fn try_boot(specs: &[MachineSpec]) -> Result<Fleet, BootError> {
        preflight();
        sweep_stale();
        // Tests of one binary boot fleets in parallel, so pid and time alone may repeat.
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = PathBuf::from(STATE_ROOT).join(format!(
            "{}-{}-{}",
            std::process::id(),
            cbus_protocol::presence::now_ms(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(io("create machine state dir"))?;
        let mut fleet = Fleet {
            machines: Vec::new(),
            dir,
            detached: false,
        };
        std::fs::write(fleet.dir.join("owner.pid"), std::process::id().to_string())
            .map_err(io("write owner pid"))?;
        // On an error the fleet is dropped here: what booted is powered off.
        fleet.start_all(specs, Duration::from_secs(60))?;
        Ok(fleet)
    }

    /// Boots machines into `dir` that outlive this process (nspawn in a session of its own) and
    /// waits until each is `running`. Nothing is torn down on drop, also not on an error: the
    /// owner records [`Machine::record`] and later calls [`teardown`] on `dir`.
    pub fn boot_detached(
        dir: &Path,
        specs: &[MachineSpec],
        timeout: Duration,
    ) -> Result<Fleet, BootError> {
        preflight();
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        let mut fleet = Fleet {
            machines: Vec::new(),
            dir: dir.to_owned(),
            detached: true,
        };
        fleet.start_all(specs, timeout)?;
        Ok(fleet)
    }

    fn start_all(&mut self, specs: &[MachineSpec], timeout: Duration) -> Result<(), BootError> {
        for spec in specs {
            let m = start_machine(&self.dir, spec, self.detached)?;
            self.machines.push(m);
        }
        for m in &self.machines {
            m.wait_running(timeout)?;
        }
        Ok(())
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
        if self.detached {
            return;
        }
        // Power off all at once, then wait: sequential shutdowns would add up.
        for m in &self.machines {
            if let Some(child) = &m.nspawn {
                // SAFETY: kill(2) on a child we have not reaped.
                unsafe {
                    libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
                }
            }
        }
        for m in &mut self.machines {
            if let Some(mut child) = m.nspawn.take() {
                terminate(&mut child, Duration::from_secs(15));
            }
        }
        // One teardown for the whole fleet (each scans /proc): orphans, overlays, directories.
        if teardown(&self.dir).is_ok() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn preflight() {
    assert_eq!(
        // SAFETY: geteuid has no preconditions.
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
}

fn start_machine(
    fleet_dir: &Path,
    spec: &MachineSpec,
    detached: bool,
) -> Result<Machine, BootError> {
    let dir = fleet_dir.join(&spec.name);
    let root = dir.join("root");
    for sub in ["upper", "work", "root"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(io("create overlay dirs"))?;
    }
    run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir=/,upperdir={},workdir={}",
            dir.join("upper").display(),
            dir.join("work").display()
        ))
        .arg(&root))?;
    root::prepare_root(&root, spec)?;
    let log = std::fs::File::create(dir.join("console.log")).map_err(io("console log"))?;
    let mut cmd = Command::new("systemd-nspawn");
    cmd.arg("-D")
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
        .stdout(log.try_clone().map_err(io("console log"))?)
        .stderr(log);
    if detached {
        use std::os::unix::process::CommandExt as _;
        // SAFETY: setsid is async-signal-safe. A session of its own: the terminal's hangup (or
        // Ctrl-C) to the booting process does not reach the machine.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
    }
    let nspawn = cmd.spawn().map_err(io("start systemd-nspawn"))?;
    let nspawn_pid = nspawn.id();
    // Owned by a Machine before waiting, so a test machine that does not start is still powered
    // off and unmounted when the wait fails.
    let mut machine = Machine {
        name: spec.name.clone(),
        dir,
        nspawn: (!detached).then_some(nspawn),
        nspawn_pid,
        leader: 0,
        own_units: spec.units.iter().map(|(name, _)| name.clone()).collect(),
    };
    machine.leader = wait_leader(nspawn_pid, &machine.dir)?;
    Ok(machine)
}

/// The machine's init is the nspawn process's child, once it has become systemd (it execs after
/// setting up namespaces).
fn wait_leader(nspawn_pid: u32, dir: &Path) -> Result<u32, BootError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(pid) = first_child(nspawn_pid).filter(|&p| comm(p) == "systemd") {
            return Ok(pid);
        }
        if Instant::now() > deadline || !alive(nspawn_pid) {
            return Err(BootError::NoInit {
                dir: dir.to_owned(),
                console: console_tail(&dir.join("console.log")),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last lines of a console log.
fn console_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

pub(super) fn run(cmd: &mut Command) -> Result<(), BootError> {
    let out = cmd.output().map_err(io(format!("run {cmd:?}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BootError::Command {
            cmd: format!("{cmd:?}"),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// Tears down test fleets whose owning test process is gone (a killed test run).
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
        if owner.is_some_and(alive) {
            continue;
        }
        if teardown(&fleet.path()).is_ok() {
            let _ = std::fs::remove_dir_all(fleet.path());
        }
    }
}
