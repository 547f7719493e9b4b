//! The WebSocket API at `/ws`: authentication, subscriptions with snapshots and deltas,
//! requests with one result per machine, heartbeats. docs/protocol.md ("WebSocket API")
//! describes the messages.
//!
//! - [`upgrade`]: the Origin check, authentication and the upgrade;
//! - [`session`]: one connection's loop (reader task, session, writer task);
//! - [`writer`]: the writer task and its queue, bounded in frames and bytes;
//! - [`subscription`]: resources compiled into what a session follows, with their snapshots
//!   and deltas;
//! - [`request`]: requests checked, sent to each machine, answered per machine;
//! - [`rolling`]: rolling start/stop/restart (`batch`, `max_fail`) by the CLI's planner;
//! - [`signals`]: the tasks that forward signals to signal subscriptions;
//! - [`history`]: the audit trail and the recent past of signals, read from their JetStream
//!   streams (a page, then new entries; a replay, then live signals, with no seam);
//! - [`frames`] parses what clients send, [`outgoing`] is what the gateway sends;
//! - [`context`] holds what all sessions share.
//!
//! Within `ws`: `upgrade` uses `session`, which uses every other module but `upgrade`;
//! `subscription` uses `history` and `signals`; `history` uses `signals`; `request` and
//! `subscription` use `context`; `request`, `signals`, `history` and `subscription` use
//! `outgoing`; `request` uses `rolling`, which uses no other;
//! `writer` and `outgoing` use only `frames`, which uses no other.

mod context;
mod frames;
mod history;
mod outgoing;
mod request;
mod rolling;
mod session;
mod signals;
mod subscription;
mod upgrade;
mod writer;

pub(crate) use context::WsContext;
pub(crate) use upgrade::handler;
