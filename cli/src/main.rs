//! `cbus`: fan D-Bus queries out across a fleet and return as soon as every machine answered.
//!
//! Exit codes: 0 every machine answered successfully; 1 some failed, timed out, were not
//! connected, or none matched; 2 usage or connection error.

mod args;
mod connect;
mod keys;
mod monitor;
mod query;
mod render;
mod systemd;

use clap::Parser;

use args::{Cli, Command};

/// Why a command did not fully succeed; decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Bad arguments: exit 2.
    #[error("{0}")]
    Usage(String),
    /// NATS unreachable: exit 2.
    #[error("{0}")]
    Connection(String),
    /// Some machines failed or did not answer (already reported): exit 1.
    #[error("{0}")]
    Partial(String),
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let code = match run(cli).await {
        Ok(()) => 0,
        Err(f) => {
            eprintln!("cbus: {f}");
            match f {
                Failure::Partial(_) => 1,
                Failure::Usage(_) | Failure::Connection(_) => 2,
            }
        }
    };
    std::process::exit(code);
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let format = if cli.output.json {
        render::Format::Json
    } else if cli.output.simple {
        render::Format::Simple
    } else {
        render::Format::Table
    };
    match cli.command {
        Command::Nkey { key } => return keys::nkey(key.as_deref()),
        Command::Keyscan { hosts, stdin } => return keys::keyscan(&hosts, stdin, format),
        Command::Subject {
            op,
            dest,
            path,
            member,
            agent,
        } => return keys::subject(&op, dest, path, member, agent),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "cbus", &mut std::io::stdout());
            return Ok(());
        }
        Command::Man { dir } => return keys::man_pages(&dir),
        _ => {}
    }
    let ctx = query::Context::new(&cli.conn, &cli.targets, format).await?;
    match cli.command {
        Command::Get {
            dest,
            path,
            property,
        } => query::get(&ctx, dest, path, &property).await,
        Command::Set {
            dest,
            path,
            property,
            value,
            sig,
        } => query::set(&ctx, dest, path, &property, &value, sig).await,
        Command::Getall {
            dest,
            path,
            interface,
        } => query::get_all(&ctx, dest, path, interface).await,
        Command::Invoke {
            dest,
            path,
            method,
            args,
            sig,
        } => query::invoke(&ctx, dest, path, &method, args.as_deref(), sig).await,
        Command::Introspect { dest, path, xml } => query::introspect(&ctx, dest, path, xml).await,
        Command::Names => query::names(&ctx).await,
        Command::Agents => query::agents(&ctx).await,
        Command::Monitor {
            sender,
            interface,
            member,
            path,
        } => monitor::run(&ctx, sender, interface, member, path).await,
        Command::Units { pattern } => systemd::units(&ctx, pattern).await,
        Command::Status { unit } => systemd::status(&ctx, &unit).await,
        Command::Start(a) => systemd::action(&ctx, "StartUnit", a).await,
        Command::Stop(a) => systemd::action(&ctx, "StopUnit", a).await,
        Command::Restart(a) => systemd::action(&ctx, "RestartUnit", a).await,
        Command::Reload(a) => systemd::action(&ctx, "ReloadUnit", a).await,
        Command::Nkey { .. }
        | Command::Keyscan { .. }
        | Command::Subject { .. }
        | Command::Completions { .. }
        | Command::Man { .. } => Ok(()),
    }
}
