//! Agent identity: the NATS user NKey derived from the host's SSH ed25519 host key.
//!
//! The host key's 32-byte ed25519 seed becomes the seed of a NATS user key pair, exactly as the
//! original CBus did, so `U...` ids carry over. From a public key alone (`cbus nkey`,
//! `cbus keyscan`) the id is the 32-byte public key re-encoded with the user prefix; nkeys keeps
//! that encoder private, so it is written out here (base32 without padding, CRC16/XMODEM
//! little-endian).

use std::path::Path;

use data_encoding::BASE32_NOPAD;
use nkeys::{KeyPair, KeyPairType};

use crate::error::NkeyError;

/// Default location of the host key.
pub const DEFAULT_HOST_KEY: &str = "/etc/ssh/ssh_host_ed25519_key";
/// nkeys prefix byte of a user public key ('U').
const PREFIX_USER: u8 = 20 << 3;

/// The key pair of an agent, from an OpenSSH ed25519 private key file.
pub fn from_ssh_host_key(path: &Path) -> Result<KeyPair, NkeyError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| NkeyError::Read {
        path: shown.clone(),
        source,
    })?;
    let key = ssh_key::PrivateKey::from_openssh(&text).map_err(|e| NkeyError::NotOpenSsh {
        path: shown.clone(),
        message: e.to_string(),
    })?;
    if key.is_encrypted() {
        return Err(NkeyError::Encrypted { path: shown });
    }
    let Some(ed) = key.key_data().ed25519() else {
        return Err(NkeyError::NotEd25519 {
            path: shown,
            algorithm: key.algorithm().to_string(),
        });
    };
    KeyPair::new_from_raw(KeyPairType::User, ed.private.to_bytes())
        .map_err(|e| NkeyError::BadSeed(e.to_string()))
}

/// The key pair from a file holding an nkey seed (`SU...`), as `nk -gen user` writes it.
pub fn from_seed_file(path: &Path) -> Result<KeyPair, NkeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| NkeyError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let seed = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("SU"))
        .ok_or_else(|| NkeyError::BadSeed(format!("no user seed (SU...) in {}", path.display())))?;
    KeyPair::from_seed(seed).map_err(|e| NkeyError::BadSeed(e.to_string()))
}

/// The agent id for an OpenSSH public key line (`ssh-ed25519 AAAA... comment`).
pub fn from_ssh_public_key(line: &str) -> Result<String, NkeyError> {
    let key = ssh_key::PublicKey::from_openssh(line.trim())
        .map_err(|e| NkeyError::BadPublicKey(e.to_string()))?;
    let Some(ed) = key.key_data().ed25519() else {
        return Err(NkeyError::BadPublicKey(format!(
            "{} key; cbus ids come from ed25519 host keys",
            key.algorithm()
        )));
    };
    Ok(encode_user_public(&ed.0))
}

/// Encodes a raw ed25519 public key as a NATS user public key (`U...`).
pub fn encode_user_public(public: &[u8; 32]) -> String {
    let mut raw = Vec::with_capacity(35);
    raw.push(PREFIX_USER);
    raw.extend_from_slice(public);
    let crc = crc16_xmodem(&raw);
    raw.extend_from_slice(&crc.to_le_bytes());
    BASE32_NOPAD.encode(&raw)
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_encoding_matches_nkeys() {
        for _ in 0..20 {
            let kp = KeyPair::new_user();
            let (_, raw) = nkeys::from_public_key(&kp.public_key()).unwrap();
            assert_eq!(encode_user_public(&raw), kp.public_key());
        }
    }

    #[test]
    fn ssh_private_and_public_agree() {
        let dir = std::env::temp_dir().join(format!("cbus-nkey-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = ssh_key::PrivateKey::random(
            &mut ssh_key::rand_core::OsRng,
            ssh_key::Algorithm::Ed25519,
        )
        .unwrap();
        let path = dir.join("host_key");
        std::fs::write(&path, key.to_openssh(ssh_key::LineEnding::LF).unwrap()).unwrap();
        let kp = from_ssh_host_key(&path).unwrap();
        let public_line = key.public_key().to_openssh().unwrap();
        assert_eq!(from_ssh_public_key(&public_line).unwrap(), kp.public_key());
        assert!(kp.public_key().starts_with('U'));
        assert!(matches!(
            from_ssh_host_key(&dir.join("missing")),
            Err(NkeyError::Read { .. })
        ));
        std::fs::write(dir.join("garbage"), "hello").unwrap();
        assert!(matches!(
            from_ssh_host_key(&dir.join("garbage")),
            Err(NkeyError::NotOpenSsh { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
