//! The Debian packages `cbus`, `cbus-agent` and `cbus-gateway`, built by cargo-deb from each
//! binary crate's `[package.metadata.deb]`: one implementation for `./dev package` (the
//! `cbus-package` binary, profile `dist`) and for the install test (tests/tests/packages.rs, the
//! debug build it already has).
//!
//! cargo-deb packages files; what is generated from the code comes first, into
//! `target/deb-assets/` (out of git, rewritten at each build): man pages from the clap
//! definitions (`cbus man`, and `cbus_agent::Config` / `cbus_gateway::Config` through
//! clap_mangen), `cbus completions` for bash, zsh and fish, and the systemd units, which are
//! agent/cbus-agent.service and gateway/cbus-gateway.service with the binary where a package puts
//! it (`/usr/bin`, not `/usr/local/bin` of a hand install). The crates' metadata names these
//! files by `../target/deb-assets/...`.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::CommandFactory;

/// The version of cargo-deb `./dev deps` installs and the packages are built with.
pub const CARGO_DEB_VERSION: &str = "3.8.0";

/// The agent's binary as packaged must stay under this (15 MB), for a release build.
pub const AGENT_MAX_BYTES: u64 = 15_000_000;

/// (Debian package, Cargo package, binary).
pub const PACKAGES: [(&str, &str, &str); 3] = [
    ("cbus", "cbus-cli", "cbus"),
    ("cbus-agent", "cbus-agent", "cbus-agent"),
    ("cbus-gateway", "cbus-gateway", "cbus-gateway"),
];

/// Why a package could not be built or read.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} exited with {status}: {stderr}")]
    Command {
        cmd: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error(
        "cargo-deb {CARGO_DEB_VERSION} is missing (found: {found}); install it with ./dev deps"
    )]
    NoCargoDeb { found: String },
    #[error("{} not found; build it first (cargo build --profile {profile})", path.display())]
    NoBinary { path: PathBuf, profile: String },
    #[error("{unit}: expected one `ExecStart=/usr/local/bin/` line to point at /usr/bin")]
    UnitShape { unit: String },
    #[error("{cmd} printed no .deb path")]
    NoDebPath { cmd: String },
    #[error("unknown package {0} (known: cbus, cbus-agent, cbus-gateway)")]
    Unknown(String),
    #[error("{} holds no {file}", deb.display())]
    NotInPackage { deb: PathBuf, file: String },
    #[error("cbus-agent in {} is {bytes} bytes, over the {AGENT_MAX_BYTES} limit", deb.display())]
    TooBig { deb: PathBuf, bytes: u64 },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PackageError {
    let what = what.into();
    move |source| PackageError::Io { what, source }
}

/// The workspace this crate was built in.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// Cargo's directory for `profile`'s binaries (`CARGO_TARGET_DIR` honoured, as cargo-deb does).
pub fn bin_dir(root: &Path, profile: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target.join(if profile == "dev" { "debug" } else { profile })
}

/// Where the generated assets go; the crates' `[package.metadata.deb]` names this directory.
pub fn assets_dir(root: &Path) -> PathBuf {
    root.join("target/deb-assets")
}

/// Writes man pages, completions and the packaged units into [`assets_dir`]. `cbus` is the CLI
/// binary that renders its own pages and completions.
pub fn write_assets(root: &Path, cbus: &Path) -> Result<(), PackageError> {
    let dir = assets_dir(root);
    let man = dir.join("man");
    let _ = std::fs::remove_dir_all(&dir);
    // The CLI's pages (cbus.1, cbus-get.1, ...) apart, so its package takes them all by a glob.
    let cli_man = man.join("cbus");
    std::fs::create_dir_all(&cli_man).map_err(io(format!("create {}", cli_man.display())))?;
    run_stdout(Command::new(cbus).arg("man").arg(&cli_man))?;
    for (name, cmd) in [
        ("cbus-agent", cbus_agent::Config::command()),
        ("cbus-gateway", cbus_gateway::Config::command()),
    ] {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd)
            .render(&mut page)
            .map_err(io(format!("render {name}.1")))?;
        write(&man.join(format!("{name}.1")), &page)?;
    }
    let completions = dir.join("completions");
    std::fs::create_dir_all(&completions).map_err(io("create completions dir"))?;
    for shell in ["bash", "zsh", "fish"] {
        let script = run_stdout(Command::new(cbus).args(["completions", shell]))?;
        write(&completions.join(format!("cbus.{shell}")), &script)?;
    }
    for (package, source) in [
        ("cbus-agent", "agent/cbus-agent.service"),
        ("cbus-gateway", "gateway/cbus-gateway.service"),
    ] {
        let text = std::fs::read_to_string(root.join(source)).map_err(io(source))?;
        let unit = packaged_unit(&text, package).ok_or_else(|| PackageError::UnitShape {
            unit: source.to_owned(),
        })?;
        let units = dir.join("units").join(package);
        std::fs::create_dir_all(&units).map_err(io("create units dir"))?;
        write(&units.join(format!("{package}.service")), unit.as_bytes())?;
    }
    Ok(())
}

/// A shipped unit as the package installs it: the binary in /usr/bin, its man page named.
fn packaged_unit(text: &str, binary: &str) -> Option<String> {
    let from = format!("ExecStart=/usr/local/bin/{binary}");
    if text.lines().filter(|l| l.starts_with(&from)).count() != 1 {
        return None;
    }
    let mut out = String::with_capacity(text.len() + 32);
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(&from) {
            out.push_str(&format!("ExecStart=/usr/bin/{binary}{rest}"));
        } else if line.starts_with("Documentation=") {
            out.push_str(&format!("{line} man:{binary}(1)"));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    Some(out)
}

/// One built package.
#[derive(Debug, Clone)]
pub struct Deb {
    pub name: String,
    pub path: PathBuf,
}

/// How to build.
#[derive(Debug, Clone)]
pub struct Build {
    /// Cargo profile whose binaries are packaged (`dist` for releases, `dev` in the test).
    pub profile: String,
    /// Where the .deb files go.
    pub out: PathBuf,
    /// Lighter compression (the test: it only installs the package).
    pub fast: bool,
}

/// Generates the assets from `profile`'s binaries and builds `packages` (Debian names) with
/// cargo-deb, without building anything with cargo. A release agent over [`AGENT_MAX_BYTES`]
/// is an error; the debug build is stripped, but bigger.
pub fn build(root: &Path, b: &Build, packages: &[&str]) -> Result<Vec<Deb>, PackageError> {
    check_cargo_deb()?;
    let bins = bin_dir(root, &b.profile);
    for &name in packages {
        let (_, _, binary) = lookup(name)?;
        let path = bins.join(binary);
        if !path.is_file() {
            return Err(PackageError::NoBinary {
                path,
                profile: b.profile.clone(),
            });
        }
    }
    write_assets(root, &bins.join("cbus"))?;
    std::fs::create_dir_all(&b.out).map_err(io(format!("create {}", b.out.display())))?;
    let mut debs = Vec::new();
    for &name in packages {
        let (_, crate_name, _) = lookup(name)?;
        let mut cmd = Command::new("cargo");
        cmd.current_dir(root)
            .args(["deb", "--locked", "--no-build", "-p", crate_name])
            .args(["--profile", &b.profile])
            .arg("--output")
            .arg(&b.out);
        if b.fast {
            cmd.arg("--fast");
        }
        // The dist profile has cargo strip; the debug build cargo-deb strips itself.
        if b.profile == "dev" {
            cmd.arg("--strip");
        }
        let stdout = run_stdout(&mut cmd)?;
        // cargo-deb prints the path of the package it wrote.
        let path = String::from_utf8_lossy(&stdout)
            .lines()
            .rev()
            .find(|l| l.trim_end().ends_with(".deb"))
            .map(|l| PathBuf::from(l.trim()))
            .ok_or_else(|| PackageError::NoDebPath {
                cmd: format!("{cmd:?}"),
            })?;
        if name == "cbus-agent" && b.profile != "dev" {
            let bytes = file_size(&path, "./usr/bin/cbus-agent")?;
            if bytes >= AGENT_MAX_BYTES {
                return Err(PackageError::TooBig { deb: path, bytes });
            }
        }
        debs.push(Deb {
            name: name.to_owned(),
            path,
        });
    }
    Ok(debs)
}

fn lookup(name: &str) -> Result<(&'static str, &'static str, &'static str), PackageError> {
    PACKAGES
        .iter()
        .copied()
        .find(|(deb, _, _)| *deb == name)
        .ok_or_else(|| PackageError::Unknown(name.to_owned()))
}

fn check_cargo_deb() -> Result<(), PackageError> {
    let found = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if found == format!("cargo-deb {CARGO_DEB_VERSION}") {
        Ok(())
    } else {
        Err(PackageError::NoCargoDeb {
            found: if found.is_empty() {
                "none".into()
            } else {
                found
            },
        })
    }
}

/// One file in a package, as `dpkg-deb --contents` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `-rwxr-xr-x`, `drwxr-xr-x`, ...
    pub mode: String,
    pub size: u64,
    /// `./usr/bin/cbus-agent`
    pub path: String,
}

/// The files of a package.
pub fn contents(deb: &Path) -> Result<Vec<Entry>, PackageError> {
    let out = run_stdout(Command::new("dpkg-deb").arg("--contents").arg(deb))?;
    Ok(String::from_utf8_lossy(&out)
        .lines()
        .filter_map(parse_entry)
        .collect())
}

/// `-rwxr-xr-x root/root  16205992 2026-12-02 11:20 ./usr/bin/cbus-agent`
fn parse_entry(line: &str) -> Option<Entry> {
    let mut fields = line.split_whitespace();
    let mode = fields.next()?.to_owned();
    let _owner = fields.next()?;
    let size = fields.next()?.parse().ok()?;
    let (_date, _time) = (fields.next()?, fields.next()?);
    let path = fields.next()?.to_owned();
    Some(Entry { mode, size, path })
}

/// The size of `path` (`./usr/...`) in a package.
pub fn file_size(deb: &Path, path: &str) -> Result<u64, PackageError> {
    contents(deb)?
        .into_iter()
        .find(|e| e.path == path)
        .map(|e| e.size)
        .ok_or_else(|| PackageError::NotInPackage {
            deb: deb.to_owned(),
            file: path.to_owned(),
        })
}

/// A control file of a package (`control`, `conffiles`, `postinst`, ...).
pub fn control_file(deb: &Path, name: &str) -> Result<String, PackageError> {
    let out = run_stdout(Command::new("dpkg-deb").arg("--info").arg(deb).arg(name))?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), PackageError> {
    std::fs::write(path, bytes).map_err(io(format!("write {}", path.display())))
}

fn run_stdout(cmd: &mut Command) -> Result<Vec<u8>, PackageError> {
    let out = cmd.output().map_err(io(format!("run {cmd:?}")))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(PackageError::Command {
            cmd: format!("{cmd:?}"),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_units_point_at_usr_bin() {
        let root = workspace_root();
        for (binary, source) in [
            ("cbus-agent", "agent/cbus-agent.service"),
            ("cbus-gateway", "gateway/cbus-gateway.service"),
        ] {
            let text = std::fs::read_to_string(root.join(source)).unwrap();
            let unit = packaged_unit(&text, binary).expect(source);
            assert!(
                unit.contains(&format!("\nExecStart=/usr/bin/{binary}\n")),
                "{unit}"
            );
            assert!(!unit.contains("/usr/local/bin"), "{unit}");
            assert!(unit.contains(&format!("man:{binary}(1)")), "{unit}");
            // Everything else as shipped.
            assert_eq!(unit.lines().count(), text.lines().count());
        }
        assert_eq!(packaged_unit("[Service]\nExecStart=/bin/true\n", "x"), None);
    }

    #[test]
    fn dev_installs_this_cargo_deb() {
        let dev = std::fs::read_to_string(workspace_root().join("dev")).unwrap();
        assert!(dev.contains(&format!("\nCARGO_DEB_VERSION={CARGO_DEB_VERSION}\n")));
    }

    #[test]
    fn dpkg_deb_listing() {
        assert_eq!(
            parse_entry("-rwxr-xr-x root/root  16205992 2026-12-02 11:20 ./usr/bin/cbus-agent"),
            Some(Entry {
                mode: "-rwxr-xr-x".into(),
                size: 16_205_992,
                path: "./usr/bin/cbus-agent".into()
            })
        );
        assert_eq!(parse_entry("garbage"), None);
    }
}
