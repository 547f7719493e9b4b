//! Connecting to NATS for one command.
//!
//! Unlike the agent, the CLI never retries in the background (no `retry_on_initial_connect`):
//! an unreachable server or refused credentials is one clear line and exit code 2 within a
//! couple of seconds, never a hang.

use std::path::PathBuf;
use std::time::Duration;

use crate::args::ConnArgs;
use crate::config::FileConfig;
use crate::error::Failure;

/// Default server when neither flags, environment nor config name one.
pub const DEFAULT_SERVER: &str = "nats://127.0.0.1:4222";
/// How long one connection attempt may take (TCP + TLS + handshake).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Connects with flags, environment and config file merged (flags and environment win).
pub async fn connect(args: &ConnArgs, file: &FileConfig) -> Result<async_nats::Client, Failure> {
    let server = args
        .server
        .clone()
        .or_else(|| file.server.clone())
        .unwrap_or_else(|| DEFAULT_SERVER.into());
    let nkey_seed = match args.nkey.clone().map(PathBuf::from).or(file.nkey.clone()) {
        Some(path) => {
            let kp = cbus_protocol::nkey::from_seed_file(&path)
                .map_err(|e| Failure::Usage(format!("--nkey: {e}")))?;
            Some(kp.seed().map_err(|e| Failure::Usage(e.to_string()))?)
        }
        None => None,
    };
    let opts = cbus_protocol::connect::Credentials {
        creds: args.creds.clone().or(file.creds.clone()),
        nkey_seed,
        user: args.user.clone().or(file.user.clone()),
        password: args.password.clone().or(file.password.clone()),
        token: args.token.clone().or(file.token.clone()),
        tls_ca: args.tls_ca.clone().or(file.tls_ca.clone()),
    }
    .options()
    .await
    .map_err(|e| Failure::Usage(e.to_string()))?;
    let urls: Vec<String> = server
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    if urls.is_empty() {
        return Err(Failure::Usage("--server is empty".into()));
    }
    let failed =
        |why: String| Failure::Connection(format!("cannot connect to NATS at {server}: {why}"));
    let attempt = opts
        .name("cbus")
        .connection_timeout(CONNECT_TIMEOUT)
        .connect(urls);
    // The outer bound also covers DNS, which connection_timeout does not.
    match tokio::time::timeout(CONNECT_TIMEOUT * 2, attempt).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(failed(one_line(&e.to_string()))),
        Err(_) => Err(failed("timed out".into())),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Who is asking, for the agents' audit log (`user@host`).
pub fn requester() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    format!("{user}@{host}")
}
