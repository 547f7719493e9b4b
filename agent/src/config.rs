//! Command-line flags and environment variables of `cbus-agent`.
//!
//! Every flag has an environment variable, so the systemd unit needs no command line: a package
//! or a NixOS module writes `/etc/default/cbus-agent` (`NATS_URL=...`, `CBUS_POLICY=...`). Lists
//! are repeated flags, or comma-separated in the environment.

use std::path::PathBuf;
use std::time::Duration;

use cbus_client::connect::{NatsArgs, TOKEN_ALIAS};
use cbus_client::duration::parse_duration;
use clap::Parser;

/// Bridges this host's D-Bus to NATS: forwards signals and answers get/set/getall/call/
/// introspect/list-names requests for the fleet.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "cbus-agent",
    version,
    about,
    long_about = None,
    after_help = "Logging: RUST_LOG (default info), e.g. RUST_LOG=cbus_agent=debug.\n\
                  Reads are always allowed; set and call only as the policy allows (see policy.example.toml).\n\
                  Every remote set and call is logged on target cbus_agent::audit."
)]
// `--token` was the agent's NATS token flag before the settings were shared.
#[command(mut_arg("nats_token", |a| a.alias(TOKEN_ALIAS)))]
pub struct Config {
    /// SSH ed25519 host key; its seed becomes the agent's NATS nkey (the agent id).
    #[arg(long, env = "CBUS_HOST_KEY", default_value = cbus_protocol::nkey::DEFAULT_HOST_KEY)]
    pub host_key: PathBuf,
    /// Use an nkey seed file (SU...) instead of the SSH host key.
    #[arg(long, env = "CBUS_NKEY_SEED_FILE")]
    pub nkey_seed_file: Option<PathBuf>,
    /// Authenticate to NATS with the agent's own nkey (from the host key or --nkey-seed-file)
    /// instead of --nkey.
    #[arg(long, env = "CBUS_NATS_NKEY_AUTH", conflicts_with = "nkey")]
    pub nats_nkey_auth: bool,
    /// Bus to bridge: system, user, or a D-Bus address (unix:path=...).
    #[arg(long, env = "CBUS_BUS", default_value = "system")]
    pub bus: String,
    /// Hostname to report (default: the system's).
    #[arg(long, env = "CBUS_HOSTNAME")]
    pub hostname: Option<String>,
    /// Label reported in presence, KEY=VALUE; repeatable (env: comma-separated).
    #[arg(long = "label", env = "CBUS_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// The JetStream domain that holds the registry, when it is not this NATS server's own: an
    /// agent at a site (a leaf node without JetStream) names the hub's domain, e.g. `hub`.
    #[arg(long, env = "CBUS_JS_DOMAIN")]
    pub js_domain: Option<String>,
    /// Heartbeat interval (e.g. 5s, 500ms).
    #[arg(long, env = "CBUS_HEARTBEAT", default_value = "5s", value_parser = parse_duration)]
    pub heartbeat: Duration,
    /// Policy file (TOML) saying what may be set or called remotely.
    #[arg(long, env = "CBUS_POLICY")]
    pub policy: Option<PathBuf>,
    /// Allow every set and call (trusted development setups only).
    #[arg(long, env = "CBUS_ALLOW_ALL")]
    pub allow_all: bool,
    /// Signals queued between D-Bus and NATS; more are dropped and counted.
    #[arg(long, env = "CBUS_SIGNAL_QUEUE", default_value_t = 8192)]
    pub signal_queue: usize,
    /// Bytes of signals (their D-Bus wire size) queued between D-Bus and NATS; more are dropped
    /// and counted. Bounds the agent's memory when local users flood the bus with big signals.
    #[arg(long, env = "CBUS_SIGNAL_QUEUE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub signal_queue_bytes: usize,
    /// D-Bus calls in flight at once.
    #[arg(long, env = "CBUS_MAX_CONCURRENT_CALLS", default_value_t = 64)]
    pub max_concurrent_calls: usize,
    /// Longest a D-Bus call may take (caps a request's timeout_ms).
    #[arg(long, env = "CBUS_CALL_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub call_timeout: Duration,
    /// Largest request payload accepted.
    #[arg(long, env = "CBUS_MAX_REQUEST_BYTES", default_value_t = 256 * 1024)]
    pub max_request_bytes: usize,
    /// Do not forward signals.
    #[arg(long, env = "CBUS_NO_SIGNALS")]
    pub no_signals: bool,
    /// Forward only signals from these senders (unique or well-known names); repeatable.
    #[arg(long, env = "CBUS_INCLUDE_SENDER", value_delimiter = ',')]
    pub include_sender: Vec<String>,
    /// Never forward signals from these senders.
    #[arg(long, env = "CBUS_EXCLUDE_SENDER", value_delimiter = ',')]
    pub exclude_sender: Vec<String>,
    /// Forward only signals of these interfaces.
    #[arg(long, env = "CBUS_INCLUDE_INTERFACE", value_delimiter = ',')]
    pub include_interface: Vec<String>,
    /// Never forward signals of these interfaces.
    #[arg(long, env = "CBUS_EXCLUDE_INTERFACE", value_delimiter = ',')]
    pub exclude_interface: Vec<String>,
    /// Forward only signals whose path starts with one of these.
    #[arg(long, env = "CBUS_INCLUDE_PATH_PREFIX", value_delimiter = ',')]
    pub include_path_prefix: Vec<String>,
    /// Never forward signals whose path starts with one of these.
    #[arg(long, env = "CBUS_EXCLUDE_PATH_PREFIX", value_delimiter = ',')]
    pub exclude_path_prefix: Vec<String>,
    /// Also serve /metrics (Prometheus text) and /healthz (one line) on this address.
    #[arg(long, env = "CBUS_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How often the agent publishes its own metrics on dbus.metrics.<nkey>.
    #[arg(long, env = "CBUS_METRICS_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub metrics_interval: Duration,
    /// NATS settings, the same in every part (`cbus_client::connect`). Last, under their own
    /// help heading.
    #[command(flatten)]
    pub nats: NatsArgs,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serialises the tests that set or read the NATS_* and CBUS_* variables.
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn nats_settings_are_the_shared_ones() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        use clap::CommandFactory;
        cbus_client::connect::assert_declared(Config::command, &[]);
        // The agent's own nkey and --nkey exclude each other.
        assert!(
            Config::try_parse_from(["cbus-agent", "--nats-nkey-auth", "--nkey", "/s"]).is_err()
        );
    }

    #[test]
    fn labels_and_lists_from_flags_and_environment() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let c = Config::try_parse_from(["cbus-agent", "--label", "role=web", "--label", "dc=x"])
            .unwrap();
        assert_eq!(
            c.labels,
            vec![("role".into(), "web".into()), ("dc".into(), "x".into())]
        );
        assert!(Config::try_parse_from(["cbus-agent", "--label", "nope"]).is_err());
        std::env::set_var("CBUS_LABELS", "a=1,b=2");
        std::env::set_var("CBUS_EXCLUDE_INTERFACE", "x.Y,z.W");
        std::env::set_var("CBUS_SIGNAL_QUEUE", "16");
        std::env::set_var("CBUS_NO_SIGNALS", "true");
        let c = Config::try_parse_from(["cbus-agent"]);
        for v in [
            "CBUS_LABELS",
            "CBUS_EXCLUDE_INTERFACE",
            "CBUS_SIGNAL_QUEUE",
            "CBUS_NO_SIGNALS",
        ] {
            std::env::remove_var(v);
        }
        let c = c.unwrap();
        assert_eq!(c.labels.len(), 2);
        assert_eq!(c.exclude_interface, vec!["x.Y", "z.W"]);
        assert_eq!(c.signal_queue, 16);
        assert!(c.no_signals);
        assert_eq!(c.call_timeout, Duration::from_secs(10));
        assert_eq!(c.bus, "system");
    }
}
