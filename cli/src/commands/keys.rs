//! `cbus nkey` and `cbus keyscan`: a machine's cbus id from its SSH host key, without NATS.
//!
//! An agent's id is its ed25519 host key re-encoded as a NATS user nkey (`protocol::nkey`), so
//! an operator can learn ids from the keys they already have: a `.pub` file, `known_hosts`,
//! `ssh-keyscan` output, or the private host key on the machine itself.

use std::io::Read;
use std::path::Path;
use std::process::Command;

use serde_json::json;

use crate::error::Failure;
use crate::output;
use crate::render::{self, Format};

/// One ed25519 key found in some text, with the host it was listed for (known_hosts and
/// ssh-keyscan lines start with one).
#[derive(Debug, PartialEq, Eq)]
pub struct Found {
    pub host: Option<String>,
    pub nkey: String,
}

/// Every ed25519 public key in `text`, one per line; other key types are skipped.
pub fn scan(text: &str) -> Vec<Found> {
    let mut found = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let Some(i) = tokens.iter().position(|t| *t == "ssh-ed25519") else {
            continue;
        };
        let Some(blob) = tokens.get(i + 1) else {
            continue;
        };
        if let Ok(nkey) = cbus_protocol::nkey::from_ssh_public_key(&format!("ssh-ed25519 {blob}")) {
            found.push(Found {
                host: (i > 0).then(|| tokens[..i].join(" ")),
                nkey,
            });
        }
    }
    found
}

fn read_stdin() -> Result<String, Failure> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .map_err(|e| Failure::Usage(format!("cannot read standard input: {e}")))?;
    Ok(s)
}

/// `cbus nkey [PUBKEY|FILE]`.
pub fn nkey(key: Option<&str>) -> Result<(), Failure> {
    let text = match key {
        Some(k) if Path::new(k).is_file() => {
            let text = std::fs::read_to_string(k)
                .map_err(|e| Failure::Usage(format!("cannot read {k}: {e}")))?;
            if text.contains("BEGIN OPENSSH PRIVATE KEY") {
                let kp = cbus_protocol::nkey::from_ssh_host_key(Path::new(k))
                    .map_err(|e| Failure::Usage(e.to_string()))?;
                return output::line(&kp.public_key());
            }
            text
        }
        Some(k) => k.to_owned(),
        None => read_stdin()?,
    };
    let found = scan(&text);
    if found.is_empty() {
        // Say why for the common single-key case (wrong type, damaged key).
        let why = match cbus_protocol::nkey::from_ssh_public_key(text.trim()) {
            Err(e) => e.to_string(),
            Ok(_) => "no ed25519 public key found".into(),
        };
        return Err(Failure::Usage(format!(
            "{why}; give an ed25519 public key line (ssh-ed25519 AAAA...), a file holding one, or the private host key"
        )));
    }
    let mut out = String::new();
    for f in found {
        match f.host {
            Some(h) => out.push_str(&format!("{}\t{}\n", render::sanitize(&h), f.nkey)),
            None => out.push_str(&format!("{}\n", f.nkey)),
        }
    }
    output::print(&out)
}

/// `cbus keyscan HOST...` / `--stdin`.
pub fn keyscan(hosts: &[String], stdin: bool, format: Format) -> Result<(), Failure> {
    let text = if stdin {
        read_stdin()?
    } else {
        let out = Command::new("ssh-keyscan")
            .args(["-T", "5", "-t", "ed25519"])
            .args(hosts)
            .output()
            .map_err(|e| {
                Failure::Usage(format!(
                    "cannot run ssh-keyscan ({e}); install openssh-client, or pipe its output into cbus keyscan --stdin"
                ))
            })?;
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let found = scan(&text);
    let rows: Vec<Vec<String>> = found
        .iter()
        .map(|f| vec![f.host.clone().unwrap_or_else(|| "-".into()), f.nkey.clone()])
        .collect();
    match format {
        Format::Json => {
            let hosts: Vec<_> = found
                .iter()
                .map(|f| json!({"host": f.host, "nkey": f.nkey}))
                .collect();
            output::line(&json!({ "hosts": hosts }).to_string())?;
        }
        format => output::print(&render::rows(format, &["HOST", "NKEY"], &rows))?,
    }
    // Hosts asked for that gave no key are named, like machines that did not answer.
    let missing: Vec<&str> = hosts
        .iter()
        .filter(|h| {
            !found.iter().any(|f| {
                f.host.as_deref().is_some_and(|fh| {
                    fh.split(',')
                        .any(|x| x == h.as_str() || x.starts_with(&format!("[{h}]")))
                })
            })
        })
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(Failure::Partial(format!(
            "no ed25519 host key from: {} (unreachable, no SSH server, or no ed25519 key)",
            missing.join(", ")
        )));
    }
    if found.is_empty() {
        return Err(Failure::Partial("no ed25519 host keys found".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // A key made with ssh-keygen, and its nkey computed independently (Python: base32 of
    // 0xA0 + public key + CRC16/XMODEM little-endian).
    const PUB: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOueD+R2hvwspWaFckuZgmPLoq30I6ZxsxUNg42wDoRt test";
    const NKEY: &str = "UDVZ4D7EO2DPYLFFM2CXES4ZQJR4XIVN6QR2M4NTCUGYHDNQB2CG3NAL";

    #[test]
    fn scans_lines_of_every_shape() {
        let one = scan(PUB);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].host, None);
        assert_eq!(one[0].nkey, NKEY);
        let key = PUB.trim_end_matches(" test");
        let text = format!(
            "# comment\nweb1 {key}\n[web2]:2222,10.0.0.2 {key} root@web2\nweb3 ssh-rsa AAAAB3NzaC1yc2E\n\n{PUB}\n"
        );
        let found = scan(&text);
        let hosts: Vec<Option<&str>> = found.iter().map(|f| f.host.as_deref()).collect();
        assert_eq!(
            hosts,
            vec![Some("web1"), Some("[web2]:2222,10.0.0.2"), None]
        );
        assert!(found.iter().all(|f| f.nkey == one[0].nkey));
        assert!(scan("ssh-ed25519 notbase64!").is_empty());
    }
}
