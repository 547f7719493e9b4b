//! The JetStream streams that keep history, as data: the audit trail (`dbus.audit.*`) and,
//! optionally, the signals (`dbus.signals.>`), each bounded by age and bytes. Creating them is
//! the client crate's (`cbus_client::streams`, `cbus streams init`); agents publish on their
//! subjects with plain NATS publishes and never touch the JetStream API, so a stream that is
//! missing costs the fleet nothing but the history.

use std::time::Duration;

use crate::subject;

/// The stream of audit entries ([`crate::audit::AuditEntry`]).
pub const AUDIT_STREAM: &str = "cbus-audit";
/// The optional stream of signals, for `cbus monitor --since`.
pub const SIGNAL_STREAM: &str = "cbus-signals";

pub const DEFAULT_AUDIT_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
pub const DEFAULT_AUDIT_MAX_BYTES: i64 = 1 << 30;
pub const DEFAULT_SIGNAL_MAX_AGE: Duration = Duration::from_secs(3600);
pub const DEFAULT_SIGNAL_MAX_BYTES: i64 = 1 << 30;

/// What a history stream must be: its subjects, and limits by age and bytes (the oldest
/// messages go first when either is reached).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    pub name: &'static str,
    pub subjects: Vec<String>,
    pub max_age: Duration,
    pub max_bytes: i64,
    /// The largest message stored; `None`: the server's `max_payload`.
    pub max_message_size: Option<i32>,
    /// Whether single messages may not be deleted through the API (the audit trail: an entry
    /// goes only by age or bytes, or with the whole stream's purge).
    pub deny_delete: bool,
}

/// The audit stream with these limits.
pub fn audit_stream(max_age: Duration, max_bytes: i64) -> StreamSpec {
    StreamSpec {
        name: AUDIT_STREAM,
        subjects: vec![subject::AUDIT_ALL.to_owned()],
        max_age,
        max_bytes,
        max_message_size: Some(crate::audit::MAX_ENTRY_BYTES as i32),
        deny_delete: true,
    }
}

/// The signal stream with these limits.
pub fn signal_stream(max_age: Duration, max_bytes: i64) -> StreamSpec {
    StreamSpec {
        name: SIGNAL_STREAM,
        subjects: vec![subject::SIGNALS_ALL.to_owned()],
        max_age,
        max_bytes,
        max_message_size: None,
        deny_delete: false,
    }
}

/// Parses a size as operators write it: `1GiB`, `512MiB`, `64KiB`, `1GB`, `10MB` or plain
/// bytes. Zero and sizes beyond 2^62 are refused.
pub fn parse_bytes(text: &str) -> Result<i64, String> {
    let s = text.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {text:?} (e.g. 1GiB, 512MiB, 1000000)"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        u => {
            return Err(format!(
                "invalid size unit {u:?} in {text:?} (KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ))
        }
    };
    match n.checked_mul(factor) {
        Some(b) if b > 0 && b <= 1 << 62 => Ok(b as i64),
        _ => Err(format!("size {text:?} must be positive and at most 4 EiB")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("10MB"), Ok(10_000_000));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("1XB").is_err());
        assert!(parse_bytes("-1").is_err());
        assert!(parse_bytes("99999999999TiB").is_err());
    }

    #[test]
    fn specs_cover_the_agents_subjects() {
        let a = audit_stream(DEFAULT_AUDIT_MAX_AGE, DEFAULT_AUDIT_MAX_BYTES);
        assert_eq!(a.subjects, ["dbus.audit.*"]);
        assert!(crate::subject::audit_nkey(&crate::subject::audit(
            "UBQUIKYGFC7CH5XMF52P2NN4ESI4XTXGAKT3WTG3XGU3352DMHGZQAX7"
        ))
        .is_some());
        let s = signal_stream(DEFAULT_SIGNAL_MAX_AGE, DEFAULT_SIGNAL_MAX_BYTES);
        assert_eq!(s.subjects, ["dbus.signals.>"]);
    }
}
