//! What goes into a machine's overlay before it boots: its own identity (machine-id, hostname,
//! SSH host key), the host units it masks, and the spec's units, files and links. One list of
//! masked units for every machine, whoever boots it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{io, run, BootError, MachineSpec};

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
    // Nothing reads utmp in a machine, and it fails now and then on a loaded host.
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

/// Every unit a machine masks: the fixed list, what the host enables, and SSH unless kept.
pub fn masked_units(ssh: bool) -> Vec<String> {
    let mut masked: Vec<String> = MASKED.iter().map(|s| s.to_string()).collect();
    masked.extend(host_enabled_services());
    if ssh {
        masked.retain(|u| !SSH_UNITS.contains(&u.as_str()));
    } else {
        masked.extend(SSH_UNITS.iter().map(|s| s.to_string()));
    }
    masked.sort_unstable();
    masked.dedup();
    masked
}

/// The machine's own identity, masks, units and files, written into its overlay.
pub(super) fn prepare_root(root: &Path, spec: &MachineSpec) -> Result<(), BootError> {
    let etc = root.join("etc");
    // A machine-id of its own: systemd-machine-id-setup --root would copy the host's
    // /var/lib/dbus/machine-id, and every machine would share the host's id.
    let _ = std::fs::remove_file(etc.join("machine-id"));
    let dbus_id = root.join("var/lib/dbus/machine-id");
    let _ = std::fs::remove_file(&dbus_id);
    let id = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map_err(io("read a random uuid"))?
        .trim()
        .replace('-', "");
    std::fs::write(etc.join("machine-id"), format!("{id}\n")).map_err(io("write machine-id"))?;
    if dbus_id.parent().is_some_and(Path::is_dir) {
        std::os::unix::fs::symlink("/etc/machine-id", &dbus_id).map_err(io("link D-Bus id"))?;
    }
    std::fs::write(etc.join("hostname"), format!("{}\n", spec.name))
        .map_err(io("write hostname"))?;
    let system = etc.join("systemd/system");
    for unit in masked_units(spec.ssh) {
        link(&system.join(unit), "/dev/null")?;
    }
    // Every host key but ours goes, so sshd (when kept) and cbus use the machine's own.
    std::fs::create_dir_all(etc.join("ssh")).map_err(io("create /etc/ssh"))?;
    if let Ok(entries) = std::fs::read_dir(etc.join("ssh")) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("ssh_host_") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let key = etc.join("ssh/ssh_host_ed25519_key");
    match &spec.host_key {
        Some(from) => {
            for (ext, mode) in [("", 0o600), (".pub", 0o644)] {
                let (from, to) = (suffixed(from, ext), suffixed(&key, ext));
                std::fs::copy(&from, &to)
                    .map_err(io(format!("copy host key {}", from.display())))?;
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))
                    .map_err(io("chmod host key"))?;
            }
        }
        None => generate_host_key(&key, &format!("root@{}", spec.name))?,
    }
    for (name, contents) in &spec.units {
        std::fs::write(system.join(name), contents).map_err(io(format!("write unit {name}")))?;
    }
    for unit in &spec.enable {
        let wants = system.join("multi-user.target.wants").join(unit);
        link(&wants, &format!("/etc/systemd/system/{unit}"))?;
    }
    let inside = |path: &str| {
        let target = root.join(path.trim_start_matches('/'));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io(format!("create dir for {path}")))?;
        }
        Ok::<_, BootError>(target)
    };
    for (path, contents, mode) in &spec.files {
        let target = inside(path)?;
        std::fs::write(&target, contents).map_err(io(format!("write {path}")))?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(*mode))
            .map_err(io(format!("chmod {path}")))?;
    }
    for (from, path, mode) in &spec.copies {
        let target = inside(path)?;
        std::fs::copy(from, &target).map_err(io(format!("copy {} to {path}", from.display())))?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(*mode))
            .map_err(io(format!("chmod {path}")))?;
    }
    for (path, to) in &spec.links {
        link(&inside(path)?, to)?;
    }
    Ok(())
}

/// `path` with `suffix` appended to its file name.
fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Generates an ed25519 SSH host key at `path` (and `path.pub`), with no passphrase.
pub fn generate_host_key(path: &Path, comment: &str) -> Result<(), BootError> {
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path))
}

/// A symbolic link at `at` (replacing what is there), its directory created.
fn link(at: &Path, to: &str) -> Result<(), BootError> {
    if let Some(parent) = at.parent() {
        std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
    }
    let _ = std::fs::remove_file(at);
    std::os::unix::fs::symlink(to, at).map_err(io(format!("link {}", at.display())))
}

/// What the host image enables beyond a minimal system: its own services and SysV scripts.
/// Whatever packages a host has installed, the machines boot only systemd, D-Bus and what the
/// spec adds, so `is-system-running` reaches `running` on any host of this kind.
fn host_enabled_services() -> Vec<String> {
    let mut units = Vec::new();
    if let Ok(dirs) = std::fs::read_dir("/etc/systemd/system") {
        for wants in dirs.flatten() {
            if !wants.file_name().to_string_lossy().ends_with(".wants") {
                continue;
            }
            if let Ok(entries) = std::fs::read_dir(wants.path()) {
                units.extend(
                    entries
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned()),
                );
            }
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
            && !u.starts_with("getty@")
            && !u.starts_with("systemd-")
            && !u.starts_with("dbus")
    });
    units
}
