//! Answering requests: get, set, getall, call, introspect and list-names.
//!
//! Each request runs in its own task, bounded by a semaphore, with a per-call timeout, so one
//! slow D-Bus peer cannot hold up the others. Every outcome, including a malformed subject or
//! body, is a reply in the shared envelope: the requester always learns what went wrong.
//! Missing interfaces and signatures are filled from introspection ([`crate::schema_cache`]); an
//! ambiguous member is an error listing the candidates, never a guess (the original guessed).
//!
//! Reads stay reads. A method call to a name that is not running would start its service (bus
//! activation), so reads (get, getall, introspect, read-listed calls, and the introspection that
//! looks a member up) are sent with NO_AUTO_START; only a set or call the policy allows may
//! start a service. systemd loads a unit when its object is read, and a client reacting to the
//! resulting UnitNew by reading it again loops forever, so a read of a unit object that systemd
//! has not loaded and that has no unit file is answered not-found (asking `GetUnit` and
//! `GetUnitFileState`, which never load).
//!
//! Every remote set and call, allowed or denied, is logged at info on the target
//! `cbus_agent::audit`: requester (a claim of the requester's, from `Cbus-Requester`), op,
//! destination, path, interface, member, the arguments' size and a digest (never their text),
//! the policy's verdict and the result; the same, as an `AuditEntry`, is published on the
//! agent's audit subject `dbus.audit.<nkey>` ([`crate::audit`], bounded, drops counted). A set or
//! call refused before it was read (agent busy, body unreadable) has an entry too.
//!
//! The module is split by stage: [`intake`] (subscriptions, limits, replies), [`ops`] (the six
//! ops on D-Bus), [`resolve`] (members looked up by introspection), [`guard`] (the policy's
//! verdict and the audit line), [`dbus`] (the connection and calls with or without
//! auto-start) and [`errors`] (D-Bus and resolution errors as reply errors).

mod dbus;
mod errors;
mod guard;
mod intake;
mod ops;
mod resolve;

use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use cbus_protocol::envelope::{ErrorBody, Success};
use tokio::sync::{RwLock, Semaphore};
use zbus::Connection;

use crate::audit::AuditLog;
use crate::bus::BusKind;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::schema_cache::SchemaCache;

/// Whether a D-Bus call may start the destination's service if it is not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Reads: NO_AUTO_START.
    Never,
    /// A set or call the policy allows.
    Allowed,
}

type Outcome = Result<Success, ErrorBody>;

/// Who answers: the agent's identity as replies name it.
#[derive(Debug, Clone)]
pub struct Identity {
    pub nkey: String,
    pub hostname: String,
}

/// How much the agent takes on at once, and how long it waits for D-Bus.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The longest a D-Bus call may take (a request may ask for less, never more).
    pub call_timeout: Duration,
    /// Larger request bodies are refused unread.
    pub max_request_bytes: usize,
    /// D-Bus calls in flight at once.
    pub max_concurrent_calls: usize,
}

/// Serves requests for one agent.
pub struct RequestServer {
    me: Identity,
    client: Client,
    bus: BusKind,
    policy: Policy,
    metrics: Arc<Metrics>,
    /// Every set and call's entry, published on the agent's audit subject.
    audit: AuditLog,
    limits: Limits,
    /// D-Bus calls in flight: bounded by `Limits::max_concurrent_calls`.
    calls: Semaphore,
    /// Requests accepted but not answered yet (waiting for a call slot or running); more are
    /// refused at once, so a request flood cannot grow the agent's memory.
    pending: Arc<Semaphore>,
    conn: RwLock<Option<Connection>>,
    schemas: SchemaCache,
}

impl RequestServer {
    pub fn new(
        me: Identity,
        client: Client,
        bus: BusKind,
        policy: Policy,
        metrics: Arc<Metrics>,
        audit: AuditLog,
        limits: Limits,
    ) -> Self {
        let slots = limits.max_concurrent_calls.max(1);
        RequestServer {
            me,
            client,
            bus,
            policy,
            metrics,
            audit,
            limits,
            calls: Semaphore::new(slots),
            pending: Arc::new(Semaphore::new(slots.saturating_mul(16).max(256))),
            conn: RwLock::new(None),
            schemas: SchemaCache::default(),
        }
    }

    /// Drops cached introspection of a destination whose owner changed.
    pub fn forget(&self, destination: &str) {
        self.schemas.forget(destination);
    }
}
