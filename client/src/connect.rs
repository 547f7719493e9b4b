//! The NATS settings, declared once: flags, environment variables and config-file keys of every
//! part (`cbus`, `cbus-agent`, `cbus-gateway`), and what they mean as connection options.
//!
//! Each binary flattens [`NatsArgs`] into its own flags; what the settings mean is decided here,
//! and only here: the nkey seed file, for one, is read by [`NatsArgs::options`]. How a
//! connection is kept is said explicitly by a [`Reconnect`] policy: a service (agent, gateway)
//! must come up before its server and outlive its restarts, a command (the CLI) must end.
//!
//! Old spellings stay as hidden aliases: `--server` (the CLI's), `--token-nats` (the gateway's)
//! and, in the agent and the CLI, `--token` (see [`TOKEN_ALIAS`]; the gateway's `--token` is the
//! token its own clients present).
//!

use std::path::PathBuf;
use std::time::Duration;

use async_nats::ConnectOptions;
use serde::Deserialize;

/// Where a part connects when no URL is given.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// The old spelling of `--nats-token` in the agent and the CLI, where `--token` means nothing
/// else. Added with `#[command(mut_arg("nats_token", |a| a.alias(TOKEN_ALIAS)))]`.
pub const TOKEN_ALIAS: &str = "token";

/// How to reach and authenticate to NATS; any combination the server accepts.
///
/// As flags and environment variables (clap), and as keys of the CLI's config file (serde:
/// `nats_url` or `server`, `nats_token` or `token`, `creds`, `nkey`, `user`, `password`,
/// `tls_ca`).
#[derive(Clone, Default, PartialEq, Eq, clap::Args, Deserialize)]
#[command(next_help_heading = "NATS")]
#[serde(default, deny_unknown_fields)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated [default: nats://127.0.0.1:4222]
    #[arg(
        long = "nats-url",
        alias = "server",
        env = "NATS_URL",
        global = true,
        value_name = "URL",
        value_delimiter = ','
    )]
    #[serde(alias = "server", deserialize_with = "one_or_many")]
    pub nats_url: Vec<String>,
    /// NATS token
    #[arg(
        long = "nats-token",
        alias = "token-nats",
        env = "NATS_TOKEN",
        global = true,
        value_name = "TOKEN",
        hide_env_values = true
    )]
    #[serde(alias = "token")]
    pub nats_token: Option<String>,
    /// NATS credentials file (.creds: user JWT and seed)
    #[arg(long, env = "NATS_CREDS", global = true, value_name = "FILE")]
    pub creds: Option<PathBuf>,
    /// File holding an nkey seed (SU...) to authenticate to NATS with
    // A String, not a PathBuf: `cbus subject ... --nkey NKEY` (an agent's id) shares the id.
    #[arg(long, env = "NATS_NKEY", global = true, value_name = "SEEDFILE")]
    pub nkey: Option<String>,
    /// NATS user (with --password)
    #[arg(long, env = "NATS_USER", global = true)]
    pub user: Option<String>,
    /// NATS password
    #[arg(long, env = "NATS_PASSWORD", global = true, hide_env_values = true)]
    pub password: Option<String>,
    /// CA certificate of a NATS server with TLS (requires TLS)
    #[arg(long, env = "NATS_CA", global = true, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
}

/// Why the NATS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NatsArgsError {
    #[error("cannot read NATS credentials {path}: {source}")]
    Creds {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--nkey: {0}")]
    Nkey(#[source] cbus_protocol::NkeyError),
    #[error("--nkey and the agent's own nkey (--nats-nkey-auth) exclude each other")]
    TwoNkeys,
    #[error("TLS CA {0} does not exist")]
    MissingCa(String),
    #[error("a NATS password needs a user (--user)")]
    PasswordWithoutUser,
    #[error("--nats-url names no server")]
    NoUrl,
}

impl NatsArgs {
    /// These settings, each one that is unset taken from `fallback` (flags and environment over
    /// the config file).
    pub fn or(self, fallback: NatsArgs) -> NatsArgs {
        NatsArgs {
            nats_url: if self.nats_url.is_empty() {
                fallback.nats_url
            } else {
                self.nats_url
            },
            nats_token: self.nats_token.or(fallback.nats_token),
            creds: self.creds.or(fallback.creds),
            nkey: self.nkey.or(fallback.nkey),
            user: self.user.or(fallback.user),
            password: self.password.or(fallback.password),
            tls_ca: self.tls_ca.or(fallback.tls_ca),
        }
    }

    /// The server URLs to try: each entry split at commas and trimmed, [`DEFAULT_URL`] when none
    /// is given; given but all empty is an error.
    pub fn urls(&self) -> Result<Vec<String>, NatsArgsError> {
        if self.nats_url.is_empty() {
            return Ok(vec![DEFAULT_URL.to_owned()]);
        }
        let urls: Vec<String> = self
            .nats_url
            .iter()
            .flat_map(|u| u.split(','))
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Err(NatsArgsError::NoUrl);
        }
        Ok(urls)
    }

    /// Connection options carrying these credentials (the nkey seed file is read here).
    pub async fn options(&self) -> Result<ConnectOptions, NatsArgsError> {
        self.options_with_seed(None).await
    }

    /// Like [`NatsArgs::options`], authenticating with `own_seed` (an nkey seed the caller
    /// holds, such as the agent's own) instead of `--nkey`; giving both is an error.
    pub async fn options_with_seed(
        &self,
        own_seed: Option<String>,
    ) -> Result<ConnectOptions, NatsArgsError> {
        let seed = match (own_seed, &self.nkey) {
            (Some(_), Some(_)) => return Err(NatsArgsError::TwoNkeys),
            (Some(seed), None) => Some(seed),
            (None, Some(path)) => Some(
                cbus_protocol::nkey::from_seed_file(std::path::Path::new(path))
                    .and_then(|kp| {
                        kp.seed()
                            .map_err(|e| cbus_protocol::NkeyError::BadSeed(e.to_string()))
                    })
                    .map_err(NatsArgsError::Nkey)?,
            ),
            (None, None) => None,
        };
        let mut opts = match seed {
            Some(seed) => ConnectOptions::with_nkey(seed),
            None => ConnectOptions::new(),
        };
        if let Some(path) = &self.creds {
            opts = opts
                .credentials_file(path.clone())
                .await
                .map_err(|source| NatsArgsError::Creds {
                    path: path.display().to_string(),
                    source,
                })?;
        }
        match (&self.user, &self.password) {
            (Some(u), Some(p)) => opts = opts.user_and_password(u.clone(), p.clone()),
            (None, Some(_)) => return Err(NatsArgsError::PasswordWithoutUser),
            _ => {}
        }
        if let Some(token) = &self.nats_token {
            opts = opts.token(token.clone());
        }
        if let Some(ca) = &self.tls_ca {
            if !ca.exists() {
                return Err(NatsArgsError::MissingCa(ca.display().to_string()));
            }
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        Ok(opts)
    }
}

/// How a connection is kept: retried at first, reconnected after a loss, and how a frozen server
/// is noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconnect {
    /// A service (the agent, the gateway): the first connection is retried in the background
    /// (`connect` returns before it is up, so a service started before its NATS server still
    /// comes up), and a lost one is reconnected forever, [`Reconnect::service_delay`] apart.
    Forever,
    /// A command (the CLI): one connection attempt of at most `connect_timeout` (an unreachable
    /// server is one clear error, never a hang), at most `max` reconnects after a loss,
    /// [`Reconnect::command_delay`] apart, and a ping every `ping_interval` (async-nats drops a
    /// connection after two unanswered pings, so a frozen server is noticed within about three
    /// intervals).
    Bounded {
        max: usize,
        connect_timeout: Duration,
        ping_interval: Duration,
    },
}

impl Reconnect {
    /// Pause before reconnect attempt `n` of a service: 100 ms doubling, at most 10 s.
    pub fn service_delay(n: usize) -> Duration {
        Duration::from_millis((100 * 2u64.saturating_pow(n.min(8) as u32)).min(10_000))
    }

    /// Pause before connection attempt `n` of a command (1-based; the first at once): then
    /// 250 ms more each time, at most 1 s. With a server that refuses connections ten
    /// reconnects take about 8 s in all.
    pub fn command_delay(n: usize) -> Duration {
        Duration::from_millis(250 * n.saturating_sub(1).min(4) as u64)
    }

    /// `opts` with this policy's retry, reconnect and ping settings.
    pub fn apply(self, opts: ConnectOptions) -> ConnectOptions {
        match self {
            Reconnect::Forever => opts
                .retry_on_initial_connect()
                .max_reconnects(None)
                .reconnect_delay_callback(Reconnect::service_delay),
            Reconnect::Bounded {
                max,
                connect_timeout,
                ping_interval,
            } => opts
                .connection_timeout(connect_timeout)
                .ping_interval(ping_interval)
                .max_reconnects(max)
                .reconnect_delay_callback(Reconnect::command_delay),
        }
    }
}

/// Secrets (token, password) show as `<hidden>`: a logged config must not leak them.
impl std::fmt::Debug for NatsArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |s: &Option<String>| s.as_ref().map(|_| "<hidden>");
        f.debug_struct("NatsArgs")
            .field("nats_url", &self.nats_url)
            .field("nats_token", &hidden(&self.nats_token))
            .field("creds", &self.creds)
            .field("nkey", &self.nkey)
            .field("user", &self.user)
            .field("password", &hidden(&self.password))
            .field("tls_ca", &self.tls_ca)
            .finish()
    }
}

/// A URL list in a config file: `"nats://a:4222,nats://b:4222"` or `["nats://a:4222", ...]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// Checks that a binary's whole command line (`command`, e.g. `Cli::command`) declares the NATS
/// settings as [`NatsArgs`] does, and that they parse the same from flags, from their old
/// spellings and from the environment (`args` go first, e.g. a subcommand). Each binary's tests
/// call it, so a binary that drops, renames or shadows one fails. It sets and clears the
/// `NATS_*` variables: callers serialise it with their other tests that read the environment.
#[doc(hidden)]
pub fn assert_declared(command: impl Fn() -> clap::Command, args: &[&str]) {
    use clap::FromArgMatches;
    // clap reads an argument's environment variable when the command is built: one per parse.
    let cmd = &command();
    let expected = [
        ("nats_url", "nats-url", "NATS_URL"),
        ("nats_token", "nats-token", "NATS_TOKEN"),
        ("creds", "creds", "NATS_CREDS"),
        ("nkey", "nkey", "NATS_NKEY"),
        ("user", "user", "NATS_USER"),
        ("password", "password", "NATS_PASSWORD"),
        ("tls_ca", "tls-ca", "NATS_CA"),
    ];
    let name = cmd.get_name().to_owned();
    for (id, long, env) in expected {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id() == id)
            .unwrap_or_else(|| panic!("{name}: no argument {id}"));
        assert_eq!(arg.get_long(), Some(long), "{name}: {id}");
        assert_eq!(
            arg.get_env().and_then(|e| e.to_str()),
            Some(env),
            "{name}: {id}"
        );
    }
    let parse = |extra: &[&str]| -> NatsArgs {
        let argv = std::iter::once(name.as_str())
            .chain(args.iter().copied())
            .chain(extra.iter().copied());
        let matches = command()
            .try_get_matches_from(argv)
            .unwrap_or_else(|e| panic!("{name} {extra:?}: {e}"));
        NatsArgs::from_arg_matches(&matches).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let urls = "nats://a:1,nats://b:2";
    let flags = parse(&[
        "--nats-url",
        urls,
        "--tls-ca",
        "/ca.pem",
        "--nkey",
        "/seed",
        "--nats-token",
        "t",
    ]);
    assert_eq!(
        flags.urls().unwrap(),
        ["nats://a:1", "nats://b:2"],
        "{name}"
    );
    assert_eq!(flags.tls_ca, Some(PathBuf::from("/ca.pem")), "{name}");
    assert_eq!(flags.nkey.as_deref(), Some("/seed"), "{name}");
    assert_eq!(flags.nats_token.as_deref(), Some("t"), "{name}");
    let old = ["--server", urls, "--tls-ca", "/ca.pem", "--nkey", "/seed"];
    let token_aliases = cmd
        .get_arguments()
        .find(|a| a.get_id() == "nats_token")
        .and_then(|a| a.get_all_aliases())
        .unwrap_or_default();
    for alias in token_aliases {
        let alias = format!("--{alias}");
        let spelled: Vec<&str> = old.iter().copied().chain([alias.as_str(), "t"]).collect();
        assert_eq!(parse(&spelled), flags, "{name} {spelled:?}");
    }
    let vars = [
        ("NATS_URL", urls),
        ("NATS_CA", "/ca.pem"),
        ("NATS_NKEY", "/seed"),
        ("NATS_TOKEN", "t"),
    ];
    for (var, value) in vars {
        std::env::set_var(var, value);
    }
    let from_env = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| parse(&[])));
    for (var, _) in vars {
        std::env::remove_var(var);
    }
    assert_eq!(
        from_env.expect("parses from the environment"),
        flags,
        "{name}"
    );
    assert_eq!(parse(&[]).urls().unwrap(), [DEFAULT_URL], "{name}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    /// A binary as the three declare the settings: flattened, with the old `--token` alias.
    #[derive(Parser)]
    #[command(name = "cbus-any", mut_arg("nats_token", |a| a.alias(TOKEN_ALIAS)))]
    struct Binary {
        #[command(flatten)]
        nats: NatsArgs,
    }

    #[test]
    fn flags_old_spellings_and_environment() {
        assert_declared(Binary::command, &[]);
        let b = Binary::try_parse_from(["cbus-any", "--token", "t"]).unwrap();
        assert_eq!(b.nats.nats_token.as_deref(), Some("t"));
    }

    #[test]
    fn reconnect_delays() {
        assert_eq!(Reconnect::command_delay(1), Duration::ZERO);
        assert_eq!(Reconnect::command_delay(2), Duration::from_millis(250));
        assert_eq!(Reconnect::command_delay(99), Duration::from_secs(1));
        assert_eq!(Reconnect::service_delay(0), Duration::from_millis(100));
        assert_eq!(Reconnect::service_delay(3), Duration::from_millis(800));
        assert_eq!(Reconnect::service_delay(99), Duration::from_secs(10));
    }

    #[test]
    fn urls_merge_and_debug() {
        let given = NatsArgs {
            nats_url: vec!["nats://a:1, nats://b:2".into(), " ".into()],
            password: Some("pw".into()),
            user: Some("u".into()),
            ..Default::default()
        };
        assert_eq!(given.urls().unwrap(), vec!["nats://a:1", "nats://b:2"]);
        assert_eq!(NatsArgs::default().urls().unwrap(), vec![DEFAULT_URL]);
        let blank = NatsArgs {
            nats_url: vec![" ".into()],
            ..Default::default()
        };
        assert!(matches!(blank.urls(), Err(NatsArgsError::NoUrl)));
        let file = NatsArgs {
            nats_url: vec!["nats://file:3".into()],
            tls_ca: Some("/ca.pem".into()),
            user: Some("file-user".into()),
            ..Default::default()
        };
        let merged = given.clone().or(file.clone());
        assert_eq!(merged.nats_url, given.nats_url);
        assert_eq!(merged.user.as_deref(), Some("u"));
        assert_eq!(merged.tls_ca, file.tls_ca);
        assert_eq!(NatsArgs::default().or(file.clone()), file);
        let shown = format!("{merged:?}");
        assert!(
            !shown.contains("pw") && shown.contains("<hidden>"),
            "{shown}"
        );
    }

    #[test]
    fn config_file_keys_old_and_new() {
        let old: NatsArgs = serde_json::from_str(
            r#"{"server": "nats://a:1,nats://b:2", "token": "t", "tls_ca": "/ca"}"#,
        )
        .unwrap();
        let new: NatsArgs = serde_json::from_str(
            r#"{"nats_url": ["nats://a:1", "nats://b:2"], "nats_token": "t", "tls_ca": "/ca"}"#,
        )
        .unwrap();
        assert_eq!(old.urls().unwrap(), new.urls().unwrap());
        assert_eq!(old.nats_token, new.nats_token);
        assert!(serde_json::from_str::<NatsArgs>(r#"{"sever": "x"}"#).is_err());
    }

    #[tokio::test]
    async fn refused_settings() {
        let dir = std::env::temp_dir().join(format!("cbus-nats-args-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad_seed = dir.join("bad.seed");
        std::fs::write(&bad_seed, "no seed here\n").unwrap();
        let with = |a: NatsArgs| async move { a.options().await.err() };
        let e = with(NatsArgs {
            nkey: Some(bad_seed.display().to_string()),
            ..Default::default()
        })
        .await;
        assert!(matches!(e, Some(NatsArgsError::Nkey(_))), "{e:?}");
        let e = with(NatsArgs {
            password: Some("p".into()),
            ..Default::default()
        })
        .await;
        assert!(
            matches!(e, Some(NatsArgsError::PasswordWithoutUser)),
            "{e:?}"
        );
        let e = with(NatsArgs {
            tls_ca: Some(dir.join("missing.pem")),
            ..Default::default()
        })
        .await;
        assert!(matches!(e, Some(NatsArgsError::MissingCa(_))), "{e:?}");
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        let good = dir.join("good.seed");
        std::fs::write(&good, format!("{seed}\n")).unwrap();
        let both = NatsArgs {
            nkey: Some(good.display().to_string()),
            ..Default::default()
        };
        assert!(matches!(
            both.options_with_seed(Some(seed)).await.err(),
            Some(NatsArgsError::TwoNkeys)
        ));
        assert!(both.options().await.is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
