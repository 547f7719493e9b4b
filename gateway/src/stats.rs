//! The gateway's own counters, exported on `/metrics` as `cbus_gateway_*`.
//!
//! Everything the gateway refuses or drops because of what an outside party sent (a signal that
//! is not systemd's, a header that disagrees with its subject, a queue that is full, a connection
//! over a cap) is counted here, so an attack shows up as a rising counter instead of a silent gap
//! or unbounded growth. The counters are process-wide: one gateway per process.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why something was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// A unit-state signal (PropertiesChanged on a unit path, UnitNew, UnitRemoved, Reloading)
    /// whose sender does not own `org.freedesktop.systemd1`: any local user can emit those.
    NotFromSystemd,
    /// A message whose `NKey` header names another machine than its subject.
    NkeyMismatch,
    /// The follower's work queue (unit checks, property reads) was full.
    WorkQueueFull,
    /// A TCP connection over `--max-connections`, closed at once.
    ConnectionLimit,
    /// A WebSocket over `--max-unauthenticated` while others still had to authenticate.
    UnauthenticatedLimit,
    /// A client frame that did not fit the client's queue (count or bytes): the client resyncs.
    ClientQueueFull,
    /// A signal for a WebSocket client that did not fit its queue.
    ClientSignal,
    /// An audit entry read for a client that was not one: not an entry, over 16 KiB, or its
    /// body names another machine than its subject (`dbus.audit.<nkey>`).
    AuditRefused,
}

impl Dropped {
    const ALL: [Dropped; 8] = [
        Dropped::NotFromSystemd,
        Dropped::NkeyMismatch,
        Dropped::WorkQueueFull,
        Dropped::ConnectionLimit,
        Dropped::UnauthenticatedLimit,
        Dropped::ClientQueueFull,
        Dropped::ClientSignal,
        Dropped::AuditRefused,
    ];

    /// The `reason` label.
    pub fn reason(self) -> &'static str {
        match self {
            Dropped::NotFromSystemd => "not_from_systemd",
            Dropped::NkeyMismatch => "nkey_mismatch",
            Dropped::WorkQueueFull => "work_queue_full",
            Dropped::ConnectionLimit => "connection_limit",
            Dropped::UnauthenticatedLimit => "unauthenticated_limit",
            Dropped::ClientQueueFull => "client_queue_full",
            Dropped::ClientSignal => "client_signal",
            Dropped::AuditRefused => "audit_refused",
        }
    }
}

static DROPS: [AtomicU64; Dropped::ALL.len()] = [const { AtomicU64::new(0) }; Dropped::ALL.len()];
static CONNECTIONS: AtomicU64 = AtomicU64::new(0);
static UNIT_CHECKS: AtomicU64 = AtomicU64::new(0);

/// Counts one drop.
pub fn dropped(what: Dropped) {
    DROPS[what as usize].fetch_add(1, Ordering::Relaxed);
}

/// How many were dropped for `what` so far.
pub fn dropped_count(what: Dropped) -> u64 {
    DROPS[what as usize].load(Ordering::Relaxed)
}

/// Counts one check of a unit with systemd (after a UnitNew).
pub fn unit_checked() {
    UNIT_CHECKS.fetch_add(1, Ordering::Relaxed);
}

/// Open client connections (TCP), kept by the server.
pub fn connection_opened() {
    CONNECTIONS.fetch_add(1, Ordering::Relaxed);
}

pub fn connection_closed() {
    CONNECTIONS.fetch_sub(1, Ordering::Relaxed);
}

/// Appends the gateway's own families to an exposition.
pub fn render(out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP cbus_gateway_dropped_total Messages, work and connections the gateway dropped or refused, by reason.\n# TYPE cbus_gateway_dropped_total counter"
    );
    for d in Dropped::ALL {
        let _ = writeln!(
            out,
            "cbus_gateway_dropped_total{{reason=\"{}\"}} {}",
            d.reason(),
            dropped_count(d)
        );
    }
    let _ = writeln!(
        out,
        "# HELP cbus_gateway_unit_checks_total Units asked about (without loading them) after a UnitNew.\n# TYPE cbus_gateway_unit_checks_total counter\ncbus_gateway_unit_checks_total {}",
        UNIT_CHECKS.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP cbus_gateway_connections Open client TCP connections.\n# TYPE cbus_gateway_connections gauge\ncbus_gateway_connections {}",
        CONNECTIONS.load(Ordering::Relaxed)
    );
}
