//! Who this agent is: the NATS nkey derived from the host's SSH ed25519 key (as the original
//! CBus did, so an id survives reinstalling the agent and can be computed from `ssh-keyscan`),
//! and the hostname it reports.

use std::path::Path;

use cbus_protocol::NkeyError;

/// Why the agent cannot establish its identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Key(#[from] NkeyError),
    #[error("cannot export the nkey seed: {0}")]
    Seed(String),
    #[error("cannot read the hostname ({0}); pass --hostname")]
    Hostname(std::io::Error),
}

/// An nkey seed (`SU...`), kept for nkey authentication; never printed.
#[derive(Clone)]
pub struct Seed(pub String);

impl std::fmt::Debug for Seed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Seed(..)")
    }
}

/// The agent's id and names.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The public user nkey (`U...`): the agent id in every subject.
    pub nkey: String,
    pub seed: Seed,
    pub hostname: String,
}

impl Identity {
    /// From an nkey seed file when given, else from the SSH host key.
    pub fn load(
        host_key: &Path,
        seed_file: Option<&Path>,
        hostname: Option<&str>,
    ) -> Result<Self, IdentityError> {
        let keypair = match seed_file {
            Some(path) => cbus_protocol::nkey::from_seed_file(path)?,
            None => cbus_protocol::nkey::from_ssh_host_key(host_key)?,
        };
        let seed = keypair
            .seed()
            .map_err(|e| IdentityError::Seed(e.to_string()))?;
        let hostname = match hostname {
            Some(h) => h.to_owned(),
            None => hostname::get()
                .map_err(IdentityError::Hostname)?
                .to_string_lossy()
                .into_owned(),
        };
        Ok(Identity {
            nkey: keypair.public_key(),
            seed: Seed(seed),
            hostname,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_key_gives_the_same_id_as_its_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        let ok = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("ssh-keygen not available; skipped");
            return;
        }
        let id = Identity::load(&key, None, Some("h1")).unwrap();
        let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
        assert_eq!(
            id.nkey,
            cbus_protocol::nkey::from_ssh_public_key(&public).unwrap()
        );
        assert!(id.seed.0.starts_with("SU"));
        assert_eq!(format!("{:?}", id.seed), "Seed(..)");
        assert_eq!(id.hostname, "h1");
        assert!(matches!(
            Identity::load(&dir.path().join("missing"), None, None),
            Err(IdentityError::Key(_))
        ));
    }
}
