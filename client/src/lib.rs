//! cbus over NATS, on the requester's side: what the CLI and the gateway (and, for its NATS
//! settings, the agent) share.
//!
//! `cbus-protocol` says what crosses NATS and holds no I/O; this crate does the talking: the NATS
//! settings every binary accepts and the connection they make ([`connect`]), headers on an
//! async-nats message ([`headers`]), the agent registry, selection and fan-out ([`fleet`]),
//! duration flags ([`duration`]), the history streams ([`streams`]: audit trail and signals), and
//! systemd through cbus ([`systemd`]): Manager calls, units, unit
//! names and signals.

pub mod connect;
pub mod duration;
pub mod fleet;
pub mod headers;
pub mod streams;
pub mod systemd;
