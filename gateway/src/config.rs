//! Command-line flags and environment of `cbus-gateway`.
//!
//! NATS flags are the agent's and the CLI's ([`NatsArgs`]), so one set of credentials works for
//! all three. Client-facing flags (token, origins, TLS) are the gateway's own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use cbus_client::connect::NatsArgs;
use cbus_client::duration::parse_duration;
use clap::Parser;

/// Follows a cbus fleet over NATS; serves a WebSocket API, a dashboard and Prometheus metrics
/// from a cache that NATS traffic keeps current.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "cbus-gateway",
    version,
    about,
    after_help = "/metrics takes node_exporter's URL parameters, for a Prometheus job's `params:`: \
collect[]=FAMILY (repeatable; only these families, also the opt-in \
cbus_systemd_unit_active_state, one series per unit with its state as a label), \
exclude[]=FAMILY (the default families but these), shards=N&shard=I (only the machines whose \
nkey hashes to I of N). FAMILY is a family name, cbus_gateway or agent_metrics. Without \
parameters: every default family. docs/metrics.md, \"At scale\"."
)]
pub struct Config {
    /// HTTP(S) listen address for the dashboard, /ws and /metrics.
    #[arg(long, env = "CBUS_GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Token WebSocket clients must present. Without --token and --token-file the gateway
    /// generates one at start and writes it to --generated-token-file (never to the log).
    #[arg(long, env = "CBUS_GATEWAY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the client token (first line).
    #[arg(long, env = "CBUS_GATEWAY_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Where a generated token is written (mode 0600; replaced at each start). Default:
    /// `$RUNTIME_DIRECTORY/client-token` (systemd's RuntimeDirectory=), else
    /// `$XDG_RUNTIME_DIR/cbus-gateway-<port>.token`, else the same in the temp directory.
    #[arg(long, env = "CBUS_GATEWAY_GENERATED_TOKEN_FILE")]
    pub generated_token_file: Option<PathBuf>,
    /// Also accept the token as `?token=` in the WebSocket URL (off: URLs end up in logs).
    #[arg(long)]
    pub allow_token_in_url: bool,
    /// Origins allowed to open a WebSocket besides the gateway's own host (`https://ops.example`);
    /// `*` allows any. Repeatable.
    #[arg(
        long = "allow-origin",
        env = "CBUS_GATEWAY_ALLOW_ORIGIN",
        value_delimiter = ','
    )]
    pub allow_origins: Vec<String>,
    /// Host names clients may reach the gateway as (the Host header), besides IP addresses,
    /// `localhost`, this machine's hostname and the hosts of --allow-origin; `*` allows any.
    /// Others get 421: a DNS-rebinding page would reach the gateway under its own name.
    /// Repeatable.
    #[arg(
        long = "allow-host",
        env = "CBUS_GATEWAY_ALLOW_HOST",
        value_delimiter = ','
    )]
    pub allow_hosts: Vec<String>,
    /// TLS certificate chain (PEM).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve TLS with a self-signed certificate generated at start (its SHA-256 is logged).
    #[arg(long, conflicts_with = "tls_cert")]
    pub self_signed: bool,

    /// Units to follow and export (regex, anchored).
    #[arg(long, default_value = ".+")]
    pub unit_include: String,
    /// Units not to follow (regex, anchored); node_exporter's default.
    #[arg(long, default_value = crate::model::DEFAULT_EXCLUDE)]
    pub unit_exclude: String,

    /// How often what systemd changes without a signal (tasks, socket connection counts, the
    /// system state) is read again from each running machine, one machine after the other at
    /// a few reads at a time; `0s`: only on load. docs/metrics.md.
    #[arg(long, env = "CBUS_GATEWAY_SYSTEMD_REFRESH", default_value = "60s", value_parser = parse_duration)]
    pub systemd_refresh: Duration,

    /// Interval of server heartbeats on WebSockets.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub ws_heartbeat: Duration,
    /// Frames queued per WebSocket client; a client further behind gets a fresh snapshot.
    #[arg(long, default_value_t = 256)]
    pub ws_queue: usize,
    /// Bytes queued per WebSocket client (one frame larger than this still goes out, alone);
    /// a client further behind gets a fresh snapshot.
    #[arg(long, env = "CBUS_GATEWAY_WS_QUEUE_BYTES", default_value_t = 16 << 20)]
    pub ws_queue_bytes: usize,
    /// Time a client has to send a request's headers (also between requests on a kept-alive
    /// connection); slower connections are closed.
    #[arg(long, env = "CBUS_GATEWAY_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// Client connections open at once at most; more are closed at once.
    #[arg(long, env = "CBUS_GATEWAY_MAX_CONNECTIONS", default_value_t = 8192)]
    pub max_connections: usize,
    /// WebSockets that have not authenticated yet, at most; more are refused (503).
    #[arg(long, env = "CBUS_GATEWAY_MAX_UNAUTHENTICATED", default_value_t = 256)]
    pub max_unauthenticated: usize,
    /// Time a WebSocket client has to authenticate.
    #[arg(long, env = "CBUS_GATEWAY_AUTH_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub auth_timeout: Duration,
    /// Default timeout of requests sent to machines.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// NATS settings, the same in every part (`cbus_client::connect`), last, under their own
    /// help heading. Here `--nats-token` has no `--token` alias: `--token` is the token of the
    /// gateway's own clients.
    #[command(flatten)]
    pub nats: NatsArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let c = Config::try_parse_from([
            "cbus-gateway",
            "--allow-origin",
            "https://a.example,https://b.example",
            "--token",
            "x",
        ])
        .unwrap();
        assert_eq!(c.allow_origins.len(), 2);
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert!(Config::try_parse_from(["cbus-gateway", "--tls-cert", "a"]).is_err());
        assert_eq!(c.token.as_deref(), Some("x"));
        assert_eq!(
            c.nats.nats_token, None,
            "--token is the clients' token here"
        );
    }

    /// Serialises the tests that set or read NATS_* variables.
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn nats_settings_are_the_shared_ones() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        use clap::CommandFactory;
        cbus_client::connect::assert_declared(Config::command, &[]);
    }
}
