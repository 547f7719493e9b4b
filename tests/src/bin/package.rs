//! `cbus-package`: the Debian packages cbus, cbus-agent and cbus-gateway from binaries already
//! built (`./dev package` builds the `dist` profile, then runs this). See `cbus_tests::package`.
//!
//! ```text
//! cbus-package [--profile dist] [--out target/packages] [--fast] [PACKAGE...]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use cbus_tests::package::{self, Build, PACKAGES};

const USAGE: &str = "usage: cbus-package [--profile PROFILE] [--out DIR] [--fast] [PACKAGE...]
  Packages the binaries of PROFILE (default dist) that cargo already built; PACKAGE is cbus,
  cbus-agent or cbus-gateway (default: all three). Needs cargo-deb (./dev deps).";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let root = package::workspace_root();
    let mut build = Build {
        profile: "dist".into(),
        // Not cargo-deb's own target/debian: each cargo-deb run (the install test's too) deletes
        // the package's older .deb files there.
        out: root.join("target/packages"),
        fast: false,
    };
    let mut names = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--profile" => build.profile = args.next().context("--profile needs a value")?,
            "--out" => build.out = PathBuf::from(args.next().context("--out needs a value")?),
            "--fast" => build.fast = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            a if a.starts_with('-') => bail!("unknown flag {a}\n{USAGE}"),
            a => names.push(a.to_owned()),
        }
    }
    if names.is_empty() {
        names = PACKAGES.iter().map(|(deb, _, _)| deb.to_string()).collect();
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    for deb in package::build(&root, &build, &names)? {
        let size = std::fs::metadata(&deb.path)
            .with_context(|| format!("stat {}", deb.path.display()))?
            .len();
        println!("{}  ({:.1} MB)", deb.path.display(), size as f64 / 1e6);
        if deb.name == "cbus-agent" {
            let bin = package::file_size(&deb.path, "./usr/bin/cbus-agent")?;
            println!(
                "  /usr/bin/cbus-agent: {:.1} MB (limit {:.0} MB)",
                bin as f64 / 1e6,
                package::AGENT_MAX_BYTES as f64 / 1e6
            );
        }
    }
    Ok(())
}
