//! The command line as clap definitions. Help, shell completions and man pages are all generated
//! from these, so this file is the one place a flag is described.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Read, call and watch D-Bus (and systemd) on every machine at once, over NATS.
///
/// Every query goes to all machines unless --nkeys, --hosts or --labels narrow it, and returns
/// as soon as every machine answered. Machines the registry calls unresponsive are not asked but
/// reported at once (--ask-unresponsive asks them); machines that stop answering are named as
/// timed out, a grace after the others answered or at --timeout.
///
/// Exit status: 0 every machine succeeded; 1 some machine failed (an error reply, a failed job)
/// or none matched; 2 usage or connection error, or the connection to NATS was lost during the
/// command (disconnected); 3 no machine failed, but some could not be reached (unresponsive,
/// timed out, not connected, stopped), or may be missing (the registry could not be read, and
/// the machines came from a ping).
#[derive(Debug, Parser)]
#[command(name = "cbus", version, about, long_about, max_term_width = 100)]
// `--token` was the CLI's NATS token flag before the settings were shared.
#[command(mut_arg("nats_token", |a| a.alias(cbus_client::connect::TOKEN_ALIAS)))]
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

/// How to reach NATS: the settings every part shares (`cbus_client::connect`). Unset flags
/// fall back to the environment, then to the config file (`$CBUS_CONFIG`, else
/// `~/.config/cbus/config.toml`). (`cbus subject` takes --nkey as the agent to address instead.)
pub use cbus_client::connect::NatsArgs as ConnArgs;

/// Which machines a command addresses.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Machines")]
pub struct TargetArgs {
    /// Only these machines, by nkey (comma-separated)
    #[arg(long, global = true, value_delimiter = ',', value_name = "NKEY,...")]
    pub nkeys: Vec<String>,
    /// Only machines whose hostname matches one of these globs (comma-separated)
    #[arg(
        long,
        short = 'M',
        visible_alias = "machine",
        global = true,
        value_delimiter = ',',
        value_name = "GLOB,..."
    )]
    pub hosts: Vec<String>,
    /// Only machines with all these labels (comma-separated)
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        value_name = "KEY=VALUE,..."
    )]
    pub labels: Vec<String>,
    /// How long the whole command may take (connect, registry, answers), e.g. 5s, 500ms, 1m;
    /// a job wait adds --job-timeout [default: 5s]
    #[arg(long, short = 't', global = true, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// Ask machines the registry calls unresponsive (heartbeats stopped) too, and wait for them
    /// like the others. Without it they are not asked: reported at once as `unresponsive
    /// (silent 17s)`
    #[arg(long, global = true)]
    pub ask_unresponsive: bool,
    /// Ask machines under maintenance (`cbus maintenance on`) too, and wait for them like the
    /// others. Without it they are not asked: reported as `maintenance (REASON; 1h left)`,
    /// which never makes the exit code non-zero
    #[arg(long, global = true)]
    pub ask_maintenance: bool,
    /// Wait for every silent machine until --timeout, instead of a grace after the latest
    /// answer: max(1s, 2 x how long that answer took), for reads (docs/cli.md, "Stuck machines")
    #[arg(long, global = true)]
    pub no_grace: bool,
}

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Output")]
pub struct OutputArgs {
    /// One JSON document on stdout (NDJSON for monitor)
    #[arg(long, global = true, conflicts_with = "simple")]
    pub json: bool,
    /// Terse tab-separated lines for pipelines (host first)
    #[arg(short, long, global = true)]
    pub simple: bool,
    /// Fold identical answers: `active: 9,990 machines` then the odd ones by name (a table of
    /// more than 50 rows on a terminal is folded anyway); a count by outcome goes to stderr
    #[arg(short = 'g', long, global = true, conflicts_with_all = ["json", "simple"])]
    pub group: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read a property on every machine
    #[command(after_help = "Example: cbus get org.freedesktop.systemd1 \
        /org/freedesktop/systemd1/unit/basic_2etarget ActiveState")]
    Get {
        /// Bus name, e.g. org.freedesktop.systemd1
        dest: String,
        /// Object path, e.g. /org/freedesktop/systemd1
        path: String,
        /// Property, optionally with its interface (IFACE.PROPERTY)
        #[arg(value_name = "[IFACE.]PROPERTY")]
        property: String,
    },
    /// Write a property on every machine
    #[command(
        after_help = "VALUE is JSON in cbus's D-Bus encoding (64-bit integers as strings, \
        byte arrays as base64, variants as {\"t\":SIG,\"v\":VALUE}); a bare word that is not \
        JSON is a string.\nExample: cbus set org.cbus.Test /org/cbus/Test String hello"
    )]
    Set {
        dest: String,
        path: String,
        #[arg(value_name = "[IFACE.]PROPERTY")]
        property: String,
        /// JSON value, or a bare word taken as a string
        value: String,
        /// D-Bus signature of VALUE [default: the property's type, from introspection]
        #[arg(long, value_name = "SIG")]
        sig: Option<String>,
    },
    /// Read every property of an object (or of one interface)
    Getall {
        dest: String,
        path: String,
        /// Only this interface
        interface: Option<String>,
    },
    /// Call a method on every machine
    #[command(
        visible_alias = "call",
        after_help = "Example: cbus invoke org.freedesktop.systemd1 /org/freedesktop/systemd1 \
            StartUnit '[\"nginx.service\",\"replace\"]'"
    )]
    Invoke {
        dest: String,
        path: String,
        #[arg(value_name = "[IFACE.]METHOD")]
        method: String,
        /// Arguments as a JSON array
        #[arg(value_name = "ARGS_JSON")]
        args: Option<String>,
        /// D-Bus in-signature of the arguments [default: from introspection]
        #[arg(long, value_name = "SIG")]
        sig: Option<String>,
    },
    /// A help page for an object: its interfaces, methods, properties, signals and children
    Introspect {
        dest: String,
        path: String,
        /// Print the raw introspection XML
        #[arg(long)]
        xml: bool,
    },
    /// Bus names on each machine, with their owners
    Names {
        /// Also list unique names (:1.42)
        #[arg(long)]
        all: bool,
    },
    /// Live signals from the fleet, one line each; Ctrl-C stops
    Monitor {
        /// Only signals from this sender: a unique name (:1.7) or a well-known name
        #[arg(long, value_name = "NAME")]
        sender: Option<String>,
        /// Only this interface
        #[arg(long, value_name = "IFACE")]
        interface: Option<String>,
        /// Only this signal name
        #[arg(long, value_name = "MEMBER")]
        member: Option<String>,
        /// Only this object path and the objects below it
        #[arg(long, value_name = "PREFIX")]
        path: Option<String>,
        /// First replay the signals of this long ago from the signal stream (cbus streams init
        /// --signals), then follow live ones, with no gap and no duplicate in between
        #[arg(long, value_name = "DURATION")]
        since: Option<String>,
        /// The JetStream domain of the signal stream (with --since)
        #[arg(long, value_name = "DOMAIN", requires = "since")]
        js_domain: Option<String>,
    },
    /// The audit trail: every remote set and call the agents received, allowed or denied
    #[command(
        after_help = "Reads the audit stream (cbus streams init). The machine of an \
        entry is the one that published it; the requester is what the client claimed \
        (docs/security.md).\nExample: cbus audit --since 1h --hosts 'web-*'"
    )]
    Audit {
        /// Entries of this long ago and later, e.g. 10m, 1h, 7d
        #[arg(long, value_name = "DURATION", default_value = "1h")]
        since: String,
        /// Show at most the newest N entries (the older ones are counted on stderr)
        #[arg(long, value_name = "N", default_value_t = 1000)]
        limit: usize,
        /// The JetStream domain of the audit stream
        #[arg(long, value_name = "DOMAIN")]
        js_domain: Option<String>,
    },
    /// The history streams: `cbus streams init` creates them with their limits
    #[command(subcommand)]
    Streams(StreamsCommand),
    /// A live view of one unit's state, or one property, across the fleet
    #[command(
        after_help = "On a terminal: a table redrawn in place, counts by value on top, \
        machines that just changed highlighted. Otherwise: NDJSON, one line per machine at the \
        start and one per change. Pushed by signals; machines whose heartbeats stop are shown \
        as unresponsive. Ctrl-C stops.\n\
        Examples: cbus watch nginx\n  \
        cbus watch org.freedesktop.hostname1 /org/freedesktop/hostname1 Hostname"
    )]
    Watch {
        /// UNIT, or DEST PATH [IFACE.]PROPERTY
        #[arg(required = true, num_args = 1..=3, value_name = "UNIT | DEST PATH PROP")]
        what: Vec<String>,
    },
    /// The fleet: every agent with its state, last heartbeat, version, bus and labels
    Agents,
    /// systemd units on each machine: host, unit, load, active, sub, since, description
    #[command(
        after_help = "SINCE (time of the last state change) is fetched only when a \
        PATTERN is given and it matches at most 100 distinct units; listing every unit on \
        every machine shows it as '-' to keep that to one call per machine."
    )]
    Units {
        /// Only units matching this glob, e.g. 'nginx*' or '*.timer'
        pattern: Option<String>,
    },
    /// State of units on each machine: load, active, sub, since, main PID, description
    Status {
        #[arg(required = true, value_name = "UNIT")]
        units: Vec<String>,
    },
    /// Start units on each machine and wait for the jobs
    Start(UnitAction),
    /// Stop units on each machine and wait for the jobs
    Stop(UnitAction),
    /// Restart units on each machine and wait for the jobs
    Restart(UnitAction),
    /// Reload units on each machine and wait for the jobs
    Reload(UnitAction),
    /// The cbus id (NATS user nkey) of an ed25519 SSH key
    #[command(
        after_help = "KEY is a public key line (ssh-ed25519 AAAA...), a file holding \
        one (a .pub file, known_hosts or ssh-keyscan output), or an OpenSSH private host key. \
        Without KEY, standard input is read.\n\
        Example: cbus nkey /etc/ssh/ssh_host_ed25519_key.pub"
    )]
    Nkey {
        #[arg(value_name = "PUBKEY|FILE")]
        key: Option<String>,
    },
    /// The cbus ids of SSH hosts (runs ssh-keyscan -t ed25519)
    Keyscan {
        #[arg(value_name = "HOST", required_unless_present = "stdin")]
        hosts: Vec<String>,
        /// Read ssh-keyscan output from standard input instead of running it
        #[arg(long, conflicts_with = "hosts")]
        stdin: bool,
    },
    /// Print NATS subjects, for use with `nats sub` / `nats req`
    #[command(subcommand)]
    Subject(SubjectCommand),
    /// Shell completions on stdout
    #[command(after_help = "Example: cbus completions bash > /etc/bash_completion.d/cbus")]
    Completions { shell: clap_complete::Shell },
    /// Man pages: write cbus.1 and one page per command into DIR, or cbus.1 to stdout
    Man { dir: Option<PathBuf> },
    /// Mark machines as expected away (maintenance), clear the mark, or list the marks
    #[command(subcommand)]
    Maintenance(MaintenanceCommand),
    /// The agent registry: `cbus registry init` creates it (the gateway also does at start)
    #[command(subcommand)]
    Registry(RegistryCommand),
    /// The NATS permissions of a cbus role, as a nats-server `permissions` value (JSON)
    #[command(after_help = "Example: a users entry for one machine's agent:\n  \
        { nkey: U..., permissions: $(cbus permissions agent U...) }")]
    Permissions {
        role: PermissionRole,
        /// The agent's nkey (agents only)
        nkey: Option<String>,
        /// The JetStream domain of the registry, for an agent at a site whose leaf node has no
        /// JetStream (the agent runs with the same --js-domain)
        #[arg(long)]
        js_domain: Option<String>,
    },
}

/// Maintenance marks: machines expected to be away are not asked by fan-outs and never fail a
/// command; `cbus agents`, the dashboard and /metrics (`cbus_agent_maintenance`) show them.
#[derive(Debug, Subcommand)]
pub enum MaintenanceCommand {
    /// Mark machines (by hostname glob, or --hosts/--nkeys/--labels) as under maintenance
    #[command(
        after_help = "Example: cbus maintenance on 'web-1*' --reason 'kernel update' --for 2h"
    )]
    On {
        /// Hostname globs of the machines to mark (with --hosts, --nkeys, --labels: all must match)
        #[arg(value_name = "HOST")]
        hosts: Vec<String>,
        /// Why, shown with the machine everywhere (one line, at most 200 characters)
        #[arg(long)]
        reason: Option<String>,
        /// How long the mark lasts, e.g. 2h, 30m; without it, until `maintenance off`
        #[arg(long = "for", value_name = "DURATION")]
        duration: Option<String>,
    },
    /// Clear the mark of machines (by hostname glob, or --hosts/--nkeys/--labels)
    Off {
        #[arg(value_name = "HOST")]
        hosts: Vec<String>,
    },
    /// The machines under maintenance now, with reason, expiry and who marked them
    List,
}

/// What to do with the agent registry (a JetStream KV bucket).
#[derive(Debug, Clone, Copy, Subcommand)]
pub enum RegistryCommand {
    /// Create the bucket, or close an existing one to rollups and purges (operator rights)
    #[command(after_help = "Example, on a 3-node cluster: cbus registry init --replicas 3")]
    Init {
        /// Copies JetStream keeps of the bucket: 1 on one server, 3 on a cluster (the
        /// registry then survives a node). An existing bucket with fewer is given more.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
        replicas: u8,
    },
}

/// What to do with the history streams (JetStream).
#[derive(Debug, Clone, Subcommand)]
pub enum StreamsCommand {
    /// Create the audit stream (and with --signals the signal stream), or give existing ones
    /// these limits (operator rights); idempotent
    #[command(
        after_help = "Example: cbus streams init --audit-max-age 90d --signals \
        --signals-max-age 1h --signals-max-bytes 512MiB"
    )]
    Init {
        /// Audit entries older than this are dropped
        #[arg(long, value_name = "DURATION", default_value = "30d")]
        audit_max_age: String,
        /// The audit stream's size; the oldest entries go first when it is full
        #[arg(long, value_name = "SIZE", default_value = "1GiB")]
        audit_max_bytes: String,
        /// Also keep signals, for `cbus monitor --since`
        #[arg(long)]
        signals: bool,
        /// Signals older than this are dropped
        #[arg(
            long,
            value_name = "DURATION",
            default_value = "1h",
            requires = "signals"
        )]
        signals_max_age: String,
        /// The signal stream's size; the oldest signals go first when it is full
        #[arg(
            long,
            value_name = "SIZE",
            default_value = "1GiB",
            requires = "signals"
        )]
        signals_max_bytes: String,
        /// Copies JetStream keeps: 1 on one server, 3 on a cluster
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
        replicas: u8,
        /// The JetStream domain to create them in (a hub seen from a site)
        #[arg(long, value_name = "DOMAIN")]
        js_domain: Option<String>,
    },
}

/// The roles whose NATS permissions cbus defines (docs/security.md).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PermissionRole {
    /// One machine's agent: only its own subjects, inbox and broadcast queue group
    Agent,
    /// The gateway: requests, and reading signals, presence, metrics and the registry
    Gateway,
    /// An operator's `cbus`: the gateway's rights and the JetStream API
    Operator,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("rolling").args(["batch", "resume"]).multiple(true)))]
pub struct UnitAction {
    /// Unit names; a name without a type suffix means NAME.service
    #[arg(required = true, value_name = "UNIT")]
    pub units: Vec<String>,
    /// Do not wait for the jobs to finish
    #[arg(long)]
    pub no_block: bool,
    /// How long to wait for the jobs to finish (added to --timeout for the command's deadline)
    #[arg(long, value_name = "DURATION", default_value = "90s")]
    pub job_timeout: String,
    #[command(flatten)]
    pub rolling: RollingArgs,
}

/// A rolling operation: machines a few at a time, stopping at a failure threshold.
#[derive(Debug, Default, Args)]
#[command(next_help_heading = "Rolling (docs/cli.md, \"Rolling operations\")")]
pub struct RollingArgs {
    /// Roll: at most N machines (or P% of them, rounded up) in flight at once; as each one ends
    /// the next starts. One UNIT only
    #[arg(long, value_name = "N|P%", conflicts_with = "no_block")]
    pub batch: Option<String>,
    /// A machine is done only when its unit is active (inactive for stop) and stayed so for
    /// this long, judged from systemd's PropertiesChanged signals [default: 0s]
    #[arg(long, value_name = "DURATION", requires = "rolling")]
    pub hold: Option<String>,
    /// Start no new machine once more than N (or P%) machines failed or were unreachable;
    /// those in flight finish [default: 0, the first failure stops the rollout]
    #[arg(long, value_name = "N|P%", requires = "rolling")]
    pub max_fail: Option<String>,
    /// The order machines are taken in: by hostname, or by a label's value (then hostname;
    /// machines without the label last)
    #[arg(long, value_name = "host|label:KEY", requires = "rolling")]
    pub order: Option<String>,
    /// Run only the machines a previous rollout's --json report says are not done (failed,
    /// unreachable, not started); same command and UNIT. Without --batch, one at a time
    #[arg(long, value_name = "FILE", conflicts_with = "no_block")]
    pub resume: Option<PathBuf>,
}

impl RollingArgs {
    pub fn is_rolling(&self) -> bool {
        self.batch.is_some() || self.resume.is_some()
    }
}

/// An object and member to address, and optionally one agent.
#[derive(Debug, Args)]
pub struct SubjectQuery {
    pub dest: String,
    pub path: String,
    /// Property or method name
    pub member: String,
    /// Address this agent instead of the broadcast subject
    #[arg(long, value_name = "NKEY")]
    pub nkey: Option<String>,
}

/// An object to address, and optionally one agent.
#[derive(Debug, Args)]
pub struct SubjectObject {
    pub dest: String,
    pub path: String,
    /// Address this agent instead of the broadcast subject
    #[arg(long, value_name = "NKEY")]
    pub nkey: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SubjectCommand {
    /// Request subject to read a property
    Get(SubjectQuery),
    /// Request subject to write a property
    Set(SubjectQuery),
    /// Request subject to call a method
    Call(SubjectQuery),
    /// Request subject to read every property of an object
    Getall(SubjectObject),
    /// Request subject to introspect an object
    Introspect(SubjectObject),
    /// Request subject to list bus names
    ListNames {
        /// Address this agent instead of the broadcast subject
        #[arg(long, value_name = "NKEY")]
        nkey: Option<String>,
    },
    /// Subjects to subscribe to for signals
    Signals {
        /// Only this agent's signals
        #[arg(long, value_name = "NKEY")]
        nkey: Option<String>,
        /// Only this sender (a unique name such as :1.7; signals carry unique names)
        #[arg(long, value_name = "NAME")]
        sender: Option<String>,
        /// Only this object path and below
        #[arg(long, value_name = "PREFIX")]
        path: Option<String>,
    },
    /// Subject of agents' presence events
    Presence {
        #[arg(long, value_name = "NKEY")]
        nkey: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    /// Serialises the tests that set or read NATS_* variables.
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn nats_settings_are_the_shared_ones() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        // Global: before the subcommand and after it.
        cbus_client::connect::assert_declared(Cli::command, &["agents"]);
        let before = Cli::try_parse_from(["cbus", "--nats-url", "nats://a:1", "agents"]).unwrap();
        assert_eq!(before.conn.urls().unwrap(), ["nats://a:1"]);
    }

    #[test]
    fn global_flags_anywhere_and_subject_nkey() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let cli = Cli::try_parse_from([
            "cbus", "get", "a.b", "/x", "P", "--json", "-M", "web-*", "-t", "2s",
        ])
        .unwrap();
        assert!(cli.output.json);
        assert_eq!(cli.targets.hosts, vec!["web-*"]);
        assert_eq!(cli.targets.timeout.as_deref(), Some("2s"));
        let cli = Cli::try_parse_from(["cbus", "subject", "get", "a.b", "/x", "P", "--nkey", "U1"])
            .unwrap();
        let Command::Subject(SubjectCommand::Get(q)) = cli.command else {
            panic!("wrong command")
        };
        assert_eq!(q.nkey.as_deref(), Some("U1"));
        assert!(Cli::try_parse_from(["cbus", "call", "a.b", "/x", "M", "[]"]).is_ok());
        assert!(Cli::try_parse_from(["cbus", "--json", "-s", "agents"]).is_err());
        assert!(Cli::try_parse_from(["cbus", "start"]).is_err());
        assert!(Cli::try_parse_from(["cbus", "keyscan"]).is_err());
    }
}
