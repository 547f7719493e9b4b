//! The command line, as clap definitions; completions and man pages are generated from these.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Read, call and watch D-Bus (and systemd) on every machine at once, over NATS.
#[derive(Debug, Parser)]
#[command(name = "cbus", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub targets: TargetArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(long, global = true, env = "NATS_URL")]
    pub server: Option<String>,
    /// NATS credentials file (.creds).
    #[arg(long, global = true, env = "NATS_CREDS")]
    pub creds: Option<PathBuf>,
    /// File holding an nkey seed (SU...) to authenticate with.
    #[arg(long, global = true)]
    pub nkey: Option<PathBuf>,
    /// NATS token.
    #[arg(long, global = true, env = "NATS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// NATS user.
    #[arg(long, global = true, env = "NATS_USER")]
    pub user: Option<String>,
    /// NATS password.
    #[arg(long, global = true, env = "NATS_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// CA certificate for a NATS server with TLS.
    #[arg(long, global = true)]
    pub tls_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// Only these machines, by nkey (comma-separated).
    #[arg(long, global = true, value_delimiter = ',')]
    pub nkeys: Vec<String>,
    /// Only machines whose hostname matches one of these globs (comma-separated).
    #[arg(long, global = true, value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// Only machines with all these labels (KEY=VALUE, comma-separated).
    #[arg(long, global = true, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// How long to wait for machines to answer (e.g. 5s, 500ms).
    #[arg(long, global = true, default_value = "5s")]
    pub timeout: String,
}

#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// One JSON document on stdout (NDJSON for monitor).
    #[arg(long, global = true, conflicts_with = "simple")]
    pub json: bool,
    /// Terse tab-separated lines for shell pipelines.
    #[arg(short, long, global = true)]
    pub simple: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read a property: cbus get DEST PATH [IFACE.]PROPERTY
    Get {
        dest: String,
        path: String,
        property: String,
    },
    /// Write a property; VALUE is JSON (a bare word is a string).
    Set {
        dest: String,
        path: String,
        property: String,
        value: String,
        /// D-Bus signature of VALUE (default: the property's type).
        #[arg(long)]
        sig: Option<String>,
    },
    /// Read every property of an object (or of one interface).
    Getall {
        dest: String,
        path: String,
        interface: Option<String>,
    },
    /// Call a method: cbus invoke DEST PATH [IFACE.]METHOD '[ARGS...]'
    #[command(alias = "call")]
    Invoke {
        dest: String,
        path: String,
        method: String,
        /// Arguments as a JSON array.
        args: Option<String>,
        /// D-Bus in-signature (default: from introspection).
        #[arg(long)]
        sig: Option<String>,
    },
    /// Describe an object: interfaces, methods, properties, signals, children.
    Introspect {
        dest: String,
        path: String,
        /// Print the raw introspection XML.
        #[arg(long)]
        xml: bool,
    },
    /// Bus names on each machine, with their owners.
    Names,
    /// Live signals from the fleet; Ctrl-C stops.
    Monitor {
        /// Sender's unique name (:1.7).
        #[arg(long)]
        sender: Option<String>,
        /// Only this interface.
        #[arg(long)]
        interface: Option<String>,
        /// Only this signal name.
        #[arg(long)]
        member: Option<String>,
        /// Only this path and below.
        #[arg(long)]
        path: Option<String>,
    },
    /// The fleet: every agent with its state.
    Agents,
    /// systemd units on each machine (optionally matching a glob pattern).
    Units { pattern: Option<String> },
    /// State of a unit on each machine.
    Status { unit: String },
    /// Start units on each machine and wait for the jobs.
    Start(UnitAction),
    /// Stop units on each machine and wait for the jobs.
    Stop(UnitAction),
    /// Restart units on each machine and wait for the jobs.
    Restart(UnitAction),
    /// Reload units on each machine and wait for the jobs.
    Reload(UnitAction),
    /// The cbus id (nkey) of an ed25519 public key (argument, file, or stdin).
    Nkey { key: Option<String> },
    /// The cbus ids of SSH hosts (runs ssh-keyscan, or reads its output with --stdin).
    Keyscan {
        hosts: Vec<String>,
        #[arg(long)]
        stdin: bool,
    },
    /// Print the NATS subject of a query (for `nats sub` / `nats req`).
    Subject {
        /// get, set, getall, call, introspect, list-names, or signals.
        op: String,
        dest: Option<String>,
        path: Option<String>,
        member: Option<String>,
        /// Target one agent instead of the broadcast subject.
        #[arg(long = "agent")]
        agent: Option<String>,
    },
    /// Shell completions.
    Completions { shell: clap_complete::Shell },
    /// Write man pages into DIR.
    Man { dir: PathBuf },
}

#[derive(Debug, Args)]
pub struct UnitAction {
    #[arg(required = true)]
    pub units: Vec<String>,
    /// Do not wait for the jobs to finish.
    #[arg(long)]
    pub no_block: bool,
}
