//! `cbus`: fan D-Bus queries out across a fleet over NATS, and return as soon as every machine
//! answered.
//!
//! Exit codes: 0 every machine succeeded; 1 some failed, timed out, were not connected, or none
//! matched; 2 usage or connection error, or NATS lost during the command (`disconnected`, by the
//! command's deadline at the latest; see `fanout`). Typed failures ([`error::Failure`]) travel up to
//! [`main`], the only place that prints them and picks the exit code.

mod args;
mod commands;
mod config;
mod connect;
mod error;
mod fanout;
mod output;
mod render;
mod spinner;
mod status;

use std::process::ExitCode;

use cbus_client::systemd::UnitJob;
use clap::Parser;

use args::{Cli, Command};
use commands::{
    agents, audit, dbus, docs, keys, maintenance, monitor, server, subject, systemd, watch,
};
use error::Failure;
use render::Format;

/// Keeps glibc's malloc to one arena. By default each thread that meets contention gets its
/// own arena (up to 8 per core), and memory freed in one is not reused by another: a
/// 50,000-machine `get`, whose registry read, replies and rendering run on the runtime's
/// worker threads, peaked 10-25 MiB higher with them (106-127 MiB against 96-100 MiB with one
/// arena, docs/benchmarks.md), at no measurable cost in time for a command's two threads.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn one_malloc_arena() {
    // SAFETY: mallopt only sets an allocator parameter; it is called before any thread starts.
    // A refusal (0) leaves the default, which is only more memory.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn one_malloc_arena() {}

fn main() -> ExitCode {
    one_malloc_arena();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CBUS_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cbus: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(run(cli));
    // Do not wait for background tasks (NATS reconnects) on the way out.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if f.is_reported() {
                eprintln!("cbus: {f}");
            }
            ExitCode::from(f.exit_code())
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let format = if cli.output.json {
        Format::Json
    } else if cli.output.simple {
        Format::Simple
    } else if cli.output.group {
        Format::Grouped
    } else {
        Format::Table
    };
    // Commands that need no fleet (and no config).
    let command = match cli.command {
        Command::Nkey { key } => return keys::nkey(key.as_deref()),
        Command::Keyscan { hosts, stdin } => return keys::keyscan(&hosts, stdin, format),
        Command::Subject(s) => return subject::run(s),
        Command::Completions { shell } => return docs::completions(shell),
        Command::Man { dir } => return docs::man(dir.as_deref()),
        Command::Permissions {
            role,
            nkey,
            js_domain,
        } => return server::permissions(role, nkey.as_deref(), js_domain.as_deref()),
        other => other,
    };
    let file = config::load().map_err(error::usage)?;
    let ctx = fanout::Context::new(cli.conn, &cli.targets, file, format)?;
    let result = match command {
        Command::Get {
            dest,
            path,
            property,
        } => dbus::get(&ctx, dbus::Object::new(dest, path)?, &property).await,
        Command::Set {
            dest,
            path,
            property,
            value,
            sig,
        } => dbus::set(&ctx, dbus::Object::new(dest, path)?, &property, &value, sig).await,
        Command::Getall {
            dest,
            path,
            interface,
        } => dbus::get_all(&ctx, dbus::Object::new(dest, path)?, interface).await,
        Command::Invoke {
            dest,
            path,
            method,
            args,
            sig,
        } => {
            let obj = dbus::Object::new(dest, path)?;
            dbus::invoke(&ctx, obj, &method, args.as_deref(), sig).await
        }
        Command::Introspect { dest, path, xml } => {
            dbus::introspect(&ctx, dbus::Object::new(dest, path)?, xml).await
        }
        Command::Names { all } => dbus::names(&ctx, all).await,
        Command::Agents => agents::run(&ctx).await,
        Command::Maintenance(m) => maintenance::run(&ctx, m).await,
        Command::Registry(args::RegistryCommand::Init { replicas }) => {
            server::registry_init(&ctx, usize::from(replicas)).await
        }
        Command::Monitor {
            sender,
            interface,
            member,
            path,
            since,
            js_domain,
        } => {
            let watch = monitor::Watch {
                sender,
                interface,
                member,
                path,
            };
            monitor::run(&ctx, watch, since.as_deref(), js_domain.as_deref()).await
        }
        Command::Audit {
            since,
            limit,
            js_domain,
        } => audit::run(&ctx, &since, limit, js_domain.as_deref()).await,
        Command::Streams(args::StreamsCommand::Init {
            audit_max_age,
            audit_max_bytes,
            signals,
            signals_max_age,
            signals_max_bytes,
            replicas,
            js_domain,
        }) => {
            let limits = server::StreamLimits {
                audit_max_age: &audit_max_age,
                audit_max_bytes: &audit_max_bytes,
                signals: signals.then_some((signals_max_age.as_str(), signals_max_bytes.as_str())),
                replicas: usize::from(replicas),
                js_domain: js_domain.as_deref(),
            };
            server::streams_init(&ctx, limits).await
        }
        Command::Watch { what } => watch::run(&ctx, &what).await,
        Command::Units { pattern } => systemd::units(&ctx, pattern).await,
        Command::Status { units } => systemd::status(&ctx, units).await,
        Command::Start(a) => systemd::action(&ctx, UnitJob::Start, a).await,
        Command::Stop(a) => systemd::action(&ctx, UnitJob::Stop, a).await,
        Command::Restart(a) => systemd::action(&ctx, UnitJob::Restart, a).await,
        Command::Reload(a) => systemd::action(&ctx, UnitJob::Reload, a).await,
        Command::Nkey { .. }
        | Command::Keyscan { .. }
        | Command::Subject(_)
        | Command::Completions { .. }
        | Command::Man { .. }
        | Command::Permissions { .. } => Ok(()),
    };
    ctx.finish(result)
}
