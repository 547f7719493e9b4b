//! Fixtures that start real parts for cbus's integration tests: a `nats-server` on a free port,
//! a private `dbus-daemon` with our test service, and real systemd machines booted with
//! `systemd-nspawn`. Nothing here is a mock: each fixture runs the program a user would run, and
//! kills it (and cleans its files and mounts) when dropped, also when a test panics.
//!
//! Each fixture is here once, for every test binary: asking an agent ([`ask`]), running the CLI
//! ([`cli`]), running a binary as an unprivileged user ([`unprivileged`]). The machine code
//! ([`machines`]) also boots the dev fleet (`cbus-dev`, whose state [`devfleet`] reads) and the
//! bench's machines. [`package`] builds the Debian packages (`./dev package`, the install test).

pub mod agent;
pub mod ask;
pub mod bins;
pub mod browser;
pub mod cli;
pub mod cluster;
pub mod dbus;
pub mod devfleet;
pub mod emulator;
pub mod gateway;
pub mod machines;
pub mod nats;
pub mod package;
pub mod procs;
pub mod unprivileged;
pub mod util;

pub use agent::Agent;
pub use bins::bin_path;
pub use cluster::{Link, NatsCluster, TestCa, TlsFiles};
pub use dbus::{PrivateBus, TestService};
pub use gateway::{GatewayProcess, GatewayStart, WsClient};
pub use machines::{Fleet, Machine, MachineSpec};
pub use nats::NatsServer;
pub use unprivileged::Unprivileged;
pub use util::{free_port, init_tracing, synthetic_agent_info, wait_for, KillOnDrop};
