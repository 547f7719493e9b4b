//! Defaults a user keeps in a file, so daily commands need no connection flags.
//!
//! The file is `$CBUS_CONFIG`, else `$XDG_CONFIG_HOME/cbus/config.toml`, else
//! `~/.config/cbus/config.toml`; a missing file is no error. Flags and environment variables
//! win over it. Unknown keys are refused: a typo'd `sever = ...` silently ignored would send
//! queries to the wrong place.
//!
//! The NATS keys are those of [`NatsArgs`] (the flags' names with `_`: `nats_url`, `nats_token`,
//! `creds`, `nkey`, `user`, `password`, `tls_ca`; `server` and `token` are the old spellings of
//! the first two), plus `timeout`, the default `--timeout`.
//!
//! ```toml
//! nats_url = "nats://nats.example:4222"
//! creds = "/home/me/.config/cbus/admin.creds"
//! tls_ca = "/home/me/.config/cbus/nats-ca.pem"
//! timeout = "3s"
//! ```

use std::path::{Path, PathBuf};

use cbus_client::connect::NatsArgs;
use serde::Deserialize;

/// The keys the config file may hold.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FileConfig {
    /// The NATS settings, under the same names as the flags.
    pub nats: NatsArgs,
    /// Default `--timeout`.
    pub timeout: Option<String>,
}

/// The file's own keys, besides the NATS settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OwnKeys {
    timeout: Option<String>,
}

impl FileConfig {
    /// Parses the file's text: `timeout`, and the rest as [`NatsArgs`] (which refuses keys it
    /// does not know).
    fn parse(text: &str) -> Result<FileConfig, toml::de::Error> {
        let mut table: toml::Table = toml::from_str(text)?;
        let mut own = toml::Table::new();
        if let Some(t) = table.remove("timeout") {
            own.insert("timeout".into(), t);
        }
        let own: OwnKeys = own.try_into()?;
        Ok(FileConfig {
            nats: table.try_into()?,
            timeout: own.timeout,
        })
    }
}

/// Why the config file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid config {path}: {message}")]
    Invalid { path: String, message: String },
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where the config file is, from the environment.
pub fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CBUS_CONFIG") {
        return Some(PathBuf::from(p));
    }
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("cbus/config.toml"));
    }
    let home = std::env::var_os("HOME")?;
    Some(PathBuf::from(home).join(".config/cbus/config.toml"))
}

/// Loads the config file, or the empty config when there is none.
pub fn load() -> Result<FileConfig, ConfigError> {
    match path() {
        Some(p) => load_from(&p),
        None => Ok(FileConfig::default()),
    }
}

/// Loads one file; a missing file is the empty config.
pub fn load_from(path: &Path) -> Result<FileConfig, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => FileConfig::parse(&text).map_err(|e| ConfigError::Invalid {
            path: path.display().to_string(),
            message: e.message().to_owned(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileConfig::default()),
        Err(source) => Err(ConfigError::Read {
            path: path.display().to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_refuses_typos_and_tolerates_absence() {
        let dir = std::env::temp_dir().join(format!("cbus-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.toml");
        std::fs::write(&file, "server = \"nats://n:4222\"\ntimeout = \"2s\"\n").unwrap();
        let c = load_from(&file).unwrap();
        assert_eq!(c.nats.urls().unwrap(), vec!["nats://n:4222"]);
        assert_eq!(c.timeout.as_deref(), Some("2s"));
        std::fs::write(
            &file,
            "nats_url = [\"nats://n:4222\"]\ntls_ca = \"/ca.pem\"\nnkey = \"/s\"\n\
             token = \"t\"\n",
        )
        .unwrap();
        let c = load_from(&file).unwrap();
        assert_eq!(c.nats.urls().unwrap(), vec!["nats://n:4222"]);
        assert_eq!(c.nats.tls_ca.as_deref(), Some(Path::new("/ca.pem")));
        assert_eq!(c.nats.nkey.as_deref(), Some("/s"));
        assert_eq!(c.nats.nats_token.as_deref(), Some("t"));
        assert_eq!(c.timeout, None);
        std::fs::write(&file, "sever = \"x\"\n").unwrap();
        let e = load_from(&file).unwrap_err().to_string();
        assert!(e.contains("invalid config") && e.contains("sever"), "{e}");
        assert_eq!(
            load_from(&dir.join("missing.toml")).unwrap(),
            FileConfig::default()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
