//! Commands that need no fleet: nkeys from SSH keys, subjects, man pages.

use std::io::Read;
use std::path::Path;
use std::process::Command;

use cbus_protocol::subject::{Op, RequestSubject, SignalFilter, Target};

use crate::render::Format;
use crate::Failure;

/// `cbus nkey [KEY|FILE]`: the id from a public key line, a file holding one, or stdin.
pub fn nkey(key: Option<&str>) -> Result<(), Failure> {
    let text = match key {
        Some(k) if Path::new(k).is_file() => std::fs::read_to_string(k)
            .map_err(|e| Failure::Usage(format!("cannot read {k}: {e}")))?,
        Some(k) => k.to_owned(),
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| Failure::Usage(format!("cannot read stdin: {e}")))?;
            s
        }
    };
    let id = cbus_protocol::nkey::from_ssh_public_key(text.trim())
        .map_err(|e| Failure::Usage(e.to_string()))?;
    println!("{id}");
    Ok(())
}

/// `cbus keyscan HOST...`: ssh-keyscan's ed25519 keys turned into ids.
pub fn keyscan(hosts: &[String], stdin: bool, format: Format) -> Result<(), Failure> {
    let text = if stdin {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| Failure::Usage(format!("cannot read stdin: {e}")))?;
        s
    } else {
        if hosts.is_empty() {
            return Err(Failure::Usage(
                "name at least one host, or use --stdin".into(),
            ));
        }
        let out = Command::new("ssh-keyscan")
            .args(["-t", "ed25519"])
            .args(hosts)
            .output()
            .map_err(|e| {
                Failure::Usage(format!(
                    "cannot run ssh-keyscan (apt-get install openssh-client): {e}"
                ))
            })?;
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut found = 0;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let Some((host, key)) = line.split_once(' ') else {
            continue;
        };
        match cbus_protocol::nkey::from_ssh_public_key(key) {
            Ok(id) => {
                found += 1;
                match format {
                    Format::Json => println!("{}", serde_json::json!({"host": host, "nkey": id})),
                    _ => println!("{host}\t{id}"),
                }
            }
            Err(e) => eprintln!("{host}: {e}"),
        }
    }
    if found == 0 {
        return Err(Failure::Partial("no ed25519 host keys found".into()));
    }
    Ok(())
}

/// `cbus subject OP DEST PATH [MEMBER] [--agent NKEY]`, or `cbus subject signals ...`.
pub fn subject(
    op: &str,
    dest: Option<String>,
    path: Option<String>,
    member: Option<String>,
    agent: Option<String>,
) -> Result<(), Failure> {
    let usage = |e: &dyn std::fmt::Display| Failure::Usage(e.to_string());
    if op == "signals" {
        // cbus subject signals [SENDER] [PATH] [--agent NKEY]
        let filter = SignalFilter {
            nkey: agent,
            sender: dest,
            path_prefix: path,
        };
        for s in filter.subjects().map_err(|e| usage(&e))? {
            println!("{s}");
        }
        return Ok(());
    }
    let op: Op = op.parse().map_err(|e| usage(&e))?;
    let (Some(dest), Some(path)) = (dest, path) else {
        return Err(Failure::Usage(
            "usage: cbus subject OP DEST PATH [MEMBER] [--agent NKEY]".into(),
        ));
    };
    let target = agent.map_or(Target::Broadcast, Target::Agent);
    let s = RequestSubject::new(target, dest, path, op, member)
        .and_then(|r| r.encode())
        .map_err(|e| usage(&e))?;
    println!("{s}");
    Ok(())
}

/// `cbus man DIR`: one page for cbus and one per subcommand.
pub fn man_pages(dir: &Path) -> Result<(), Failure> {
    let io = |e: std::io::Error| {
        Failure::Usage(format!("cannot write man pages to {}: {e}", dir.display()))
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let cmd = <crate::args::Cli as clap::CommandFactory>::command();
    let mut pages = vec![("cbus".to_owned(), cmd.clone())];
    for sub in cmd.get_subcommands() {
        let name = format!("cbus-{}", sub.get_name());
        // clap wants a 'static name; these few strings live as long as the process anyway.
        let leaked: &'static str = Box::leak(name.clone().into_boxed_str());
        pages.push((name, sub.clone().name(leaked)));
    }
    for (name, c) in pages {
        let mut buf = Vec::new();
        clap_mangen::Man::new(c).render(&mut buf).map_err(io)?;
        std::fs::write(dir.join(format!("{name}.1")), buf).map_err(io)?;
    }
    Ok(())
}
