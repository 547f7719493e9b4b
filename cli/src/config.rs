//! Defaults a user keeps in a file, so daily commands need no connection flags.
//!
//! The file is `$CBUS_CONFIG`, else `$XDG_CONFIG_HOME/cbus/config.toml`, else
//! `~/.config/cbus/config.toml`; a missing file is no error. Flags and environment variables
//! win over it. Unknown keys are refused: a typo'd `sever = ...` silently ignored would send
//! queries to the wrong place.
//!
//! ```toml
//! server = "nats://nats.example:4222"
//! creds = "/home/me/.config/cbus/admin.creds"
//! timeout = "3s"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The keys the config file may hold.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub server: Option<String>,
    pub creds: Option<PathBuf>,
    /// nkey seed file.
    pub nkey: Option<PathBuf>,
    pub token: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub tls_ca: Option<PathBuf>,
    /// Default `--timeout`.
    pub timeout: Option<String>,
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
        Ok(text) => toml::from_str(&text).map_err(|e| ConfigError::Invalid {
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
        assert_eq!(c.server.as_deref(), Some("nats://n:4222"));
        assert_eq!(c.timeout.as_deref(), Some("2s"));
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
