//! Connecting to NATS for one command, with defaults from ~/.config/cbus/config.toml.
//!
//! Unlike the agent, the CLI never retries in the background: an unreachable server is one clear
//! line and exit code 2 within seconds.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::args::ConnArgs;
use crate::Failure;

/// Defaults a user can keep in `~/.config/cbus/config.toml` (or `$CBUS_CONFIG`); flags and
/// environment variables win.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub server: Option<String>,
    pub creds: Option<PathBuf>,
    pub nkey: Option<PathBuf>,
    pub token: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub tls_ca: Option<PathBuf>,
}

fn config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CBUS_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var_os("HOME")?;
    Some(PathBuf::from(home).join(".config/cbus/config.toml"))
}

fn load_file() -> Result<FileConfig, Failure> {
    let Some(path) = config_path() else {
        return Ok(FileConfig::default());
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text)
            .map_err(|e| Failure::Usage(format!("invalid config {}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileConfig::default()),
        Err(e) => Err(Failure::Usage(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// Connects with flags, environment and config file merged.
pub async fn connect(args: &ConnArgs) -> Result<async_nats::Client, Failure> {
    let file = load_file()?;
    let server = args
        .server
        .clone()
        .or(file.server)
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let nkey_seed = match args.nkey.clone().or(file.nkey) {
        Some(path) => {
            let kp = cbus_protocol::nkey::from_seed_file(&path)
                .map_err(|e| Failure::Usage(e.to_string()))?;
            Some(kp.seed().map_err(|e| Failure::Usage(e.to_string()))?)
        }
        None => None,
    };
    let opts = cbus_protocol::connect::Credentials {
        creds: args.creds.clone().or(file.creds),
        nkey_seed,
        user: args.user.clone().or(file.user),
        password: args.password.clone().or(file.password),
        token: args.token.clone().or(file.token),
        tls_ca: args.tls_ca.clone().or(file.tls_ca),
    }
    .options()
    .await
    .map_err(|e| Failure::Usage(e.to_string()))?;
    let urls: Vec<String> = server.split(',').map(|s| s.trim().to_owned()).collect();
    opts.name("cbus")
        .connection_timeout(Duration::from_secs(3))
        .connect(urls)
        .await
        .map_err(|e| Failure::Connection(format!("cannot connect to NATS at {server}: {e}")))
}

/// Who is asking, for the agents' audit log.
pub fn requester() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    format!("{user}@{host}")
}
