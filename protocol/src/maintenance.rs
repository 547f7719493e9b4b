//! Machines under maintenance: expected to be away, so never waited for and never a failure.
//!
//! An operator marks machines (`cbus maintenance on HOST… --reason … --for 2h`) in the JetStream
//! KV bucket [`MAINTENANCE_BUCKET`], key = the machine's nkey. Only operators may write it: an
//! agent has no permission on the bucket, so a compromised machine can neither hide itself from
//! the fleet view nor mark another machine away (docs/security.md). The gateway and the CLI read
//! it. A mark carries an optional expiry; readers ignore a mark past it ([`Maintenance::active_at`]),
//! so a forgotten mark ends by itself instead of hiding a machine for ever.
//!
//! A fan-out does not ask a machine under maintenance (it is reported as `maintenance`, which
//! counts as neither failed nor unreachable); `cbus agents`, the dashboard and `/metrics`
//! (`cbus_agent_maintenance`) show it, so alert rules can leave it out.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::presence::RegistrySpec;

/// JetStream KV bucket of maintenance marks, key = nkey.
pub const MAINTENANCE_BUCKET: &str = "cbus-maintenance";
/// The largest mark the bucket stores (a mark is ~200 bytes; the reason is bounded below).
pub const MAINTENANCE_MAX_ENTRY_BYTES: usize = 4096;
/// The longest reason, in characters: one line in `cbus agents`, not a document.
pub const REASON_MAX_CHARS: usize = 200;
/// The longest hostname or requester a mark keeps, in bytes.
const NAME_MAX_BYTES: usize = 255;

/// One machine's maintenance mark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Maintenance {
    /// The machine's hostname when it was marked (for reading the bucket without the registry).
    pub hostname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unix ms when the mark was set.
    pub since_ms: u64,
    /// Unix ms after which the mark no longer counts; `None`: until `maintenance off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<u64>,
    /// Who set it, as the operator's CLI claims (`user@host`).
    #[serde(default)]
    pub by: String,
}

/// Why a mark is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaintenanceError {
    #[error("maintenance mark of {0} bytes (at most {MAINTENANCE_MAX_ENTRY_BYTES})")]
    TooLarge(usize),
    #[error("maintenance mark is not valid JSON of the expected shape: {0}")]
    Malformed(String),
    #[error("maintenance reason of {0} characters (at most {REASON_MAX_CHARS})")]
    ReasonTooLong(usize),
    #[error("maintenance reason must be one line of printable text")]
    ReasonNotText,
    #[error("maintenance {field} of {len} bytes (at most {NAME_MAX_BYTES})")]
    NameTooLong { field: &'static str, len: usize },
    #[error("maintenance expiry {until_ms} is before its start {since_ms}")]
    EndsBeforeStart { since_ms: u64, until_ms: u64 },
}

impl Maintenance {
    /// A mark set now (`now_ms`) for `duration` (or until cleared), checked.
    pub fn new(
        hostname: impl Into<String>,
        reason: Option<String>,
        now_ms: u64,
        duration: Option<Duration>,
        by: impl Into<String>,
    ) -> Result<Self, MaintenanceError> {
        let m = Maintenance {
            hostname: hostname.into(),
            reason,
            since_ms: now_ms,
            until_ms: duration.map(|d| now_ms.saturating_add(d.as_millis() as u64)),
            by: by.into(),
        };
        m.check()?;
        Ok(m)
    }

    /// Whether the mark counts at `now_ms` (it has no expiry, or the expiry is still ahead).
    pub fn active_at(&self, now_ms: u64) -> bool {
        self.until_ms.is_none_or(|until| now_ms < until)
    }

    /// The stored form.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a maintenance mark serializes")
    }

    /// A stored mark, checked: whoever could write the bucket is trusted to mark machines, but
    /// what they wrote is still bounded before anyone prints it.
    pub fn decode(bytes: &[u8]) -> Result<Self, MaintenanceError> {
        if bytes.len() > MAINTENANCE_MAX_ENTRY_BYTES {
            return Err(MaintenanceError::TooLarge(bytes.len()));
        }
        let m: Maintenance = serde_json::from_slice(bytes)
            .map_err(|e| MaintenanceError::Malformed(e.to_string()))?;
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> Result<(), MaintenanceError> {
        for (field, value) in [("hostname", &self.hostname), ("requester", &self.by)] {
            if value.len() > NAME_MAX_BYTES {
                return Err(MaintenanceError::NameTooLong {
                    field,
                    len: value.len(),
                });
            }
        }
        if let Some(reason) = &self.reason {
            let chars = reason.chars().count();
            if chars > REASON_MAX_CHARS {
                return Err(MaintenanceError::ReasonTooLong(chars));
            }
            // A reason is printed in tables: a newline or an escape sequence would forge rows.
            if reason.chars().any(char::is_control) {
                return Err(MaintenanceError::ReasonNotText);
            }
        }
        if let Some(until_ms) = self.until_ms {
            if until_ms < self.since_ms {
                return Err(MaintenanceError::EndsBeforeStart {
                    since_ms: self.since_ms,
                    until_ms,
                });
            }
        }
        Ok(())
    }
}

/// The nkey of a message on the bucket's subject `$KV.<bucket>.<key>`.
pub fn maintenance_key_of(subject: &str) -> Option<&str> {
    subject
        .strip_prefix("$KV.")?
        .strip_prefix(MAINTENANCE_BUCKET)?
        .strip_prefix('.')
}

/// What the maintenance bucket's stream must be, in the registry's shape: one mark per machine,
/// marks bounded in size, and deletes allowed (`maintenance off` deletes the key). No age limit:
/// a mark ends at its own expiry or when cleared, not when the bucket forgets it.
pub fn maintenance_spec() -> RegistrySpec {
    RegistrySpec {
        stream: format!("KV_{MAINTENANCE_BUCKET}"),
        subjects: vec![format!("$KV.{MAINTENANCE_BUCKET}.>")],
        max_messages_per_subject: 1,
        max_age: Duration::ZERO,
        max_message_size: MAINTENANCE_MAX_ENTRY_BYTES as i32,
        discard_new: true,
        allow_rollup: false,
        deny_delete: false,
        deny_purge: false,
        allow_direct: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(
        reason: Option<&str>,
        duration: Option<Duration>,
    ) -> Result<Maintenance, MaintenanceError> {
        Maintenance::new(
            "web-1",
            reason.map(str::to_owned),
            1_000,
            duration,
            "alice@laptop",
        )
    }

    #[test]
    fn expiry_ends_the_mark() {
        let m = mark(Some("disk swap"), Some(Duration::from_secs(60))).unwrap();
        assert_eq!(m.until_ms, Some(61_000));
        assert!(m.active_at(1_000));
        assert!(m.active_at(60_999));
        assert!(!m.active_at(61_000));
        let forever = mark(None, None).unwrap();
        assert!(forever.active_at(u64::MAX));
    }

    #[test]
    fn round_trips_and_refuses_what_would_forge_output() {
        let m = mark(Some("kernel update"), None).unwrap();
        assert_eq!(Maintenance::decode(&m.encode()).unwrap(), m);
        assert_eq!(
            mark(Some("a\nweb-2  running"), None),
            Err(MaintenanceError::ReasonNotText)
        );
        assert_eq!(
            mark(Some("\u{1b}[2J"), None),
            Err(MaintenanceError::ReasonNotText)
        );
        let long = "x".repeat(REASON_MAX_CHARS + 1);
        assert_eq!(
            mark(Some(&long), None),
            Err(MaintenanceError::ReasonTooLong(REASON_MAX_CHARS + 1))
        );
    }

    #[test]
    fn hostile_stored_marks_are_refused() {
        assert!(matches!(
            Maintenance::decode(&vec![b' '; MAINTENANCE_MAX_ENTRY_BYTES + 1]),
            Err(MaintenanceError::TooLarge(_))
        ));
        assert!(matches!(
            Maintenance::decode(b"{\"hostname\":1}"),
            Err(MaintenanceError::Malformed(_))
        ));
        let backwards = br#"{"hostname":"h","since_ms":10,"until_ms":5}"#;
        assert_eq!(
            Maintenance::decode(backwards),
            Err(MaintenanceError::EndsBeforeStart {
                since_ms: 10,
                until_ms: 5
            })
        );
        let name = format!(r#"{{"hostname":"{}","since_ms":1}}"#, "h".repeat(300));
        assert!(matches!(
            Maintenance::decode(name.as_bytes()),
            Err(MaintenanceError::NameTooLong {
                field: "hostname",
                ..
            })
        ));
    }

    #[test]
    fn key_of_subject() {
        assert_eq!(
            maintenance_key_of("$KV.cbus-maintenance.UABC"),
            Some("UABC")
        );
        assert_eq!(maintenance_key_of("$KV.cbus-agents.UABC"), None);
    }
}
