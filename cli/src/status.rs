//! The status word of each machine (or each machine and unit) in a command's result.
//!
//! It is printed (JSON `status`, summary counts), and it decides the verdict and so the exit
//! code ([`crate::fanout::verdict_of`]): as an enum, a misspelt status is a compile error rather
//! than a machine silently counted as failed.

use cbus_client::fleet::Outcome;
use cbus_protocol::ErrorCode;

/// How one machine (or one job on it) fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    Ok,
    /// The machine answered with an error, or its job failed.
    Failed,
    /// The agent is not connected to NATS (no responders).
    NotConnected,
    /// No answer before the fan-out ended.
    TimedOut,
    /// The agent said goodbye; not asked.
    Stopped,
    /// The registry says its heartbeats stopped; not asked.
    Unresponsive,
    /// The job was still running when `--job-timeout` passed.
    Unfinished,
    /// An operator marked it under maintenance (expected away); not asked, and neither a
    /// failure nor unreachable.
    Maintenance,
    /// A rolling operation stopped at `--max-fail` before this machine's turn.
    NotStarted,
}

impl Status {
    /// Every status, in the order summaries list them.
    pub const FAN_OUT: [Status; 7] = [
        Status::Ok,
        Status::Failed,
        Status::TimedOut,
        Status::NotConnected,
        Status::Stopped,
        Status::Unresponsive,
        Status::Maintenance,
    ];

    /// The status of one fan-out outcome.
    pub fn of(o: &Outcome) -> Status {
        match o {
            Outcome::Replied(r) if r.result.is_ok() => Status::Ok,
            Outcome::Replied(_) => Status::Failed,
            Outcome::NoResponders => Status::NotConnected,
            Outcome::TimedOut { .. } => Status::TimedOut,
            Outcome::Stopped => Status::Stopped,
            Outcome::Unresponsive { .. } => Status::Unresponsive,
            Outcome::Maintenance(_) => Status::Maintenance,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Failed => "failed",
            Status::NotConnected => "not-connected",
            Status::TimedOut => "timed-out",
            Status::Stopped => "stopped",
            Status::Unresponsive => "unresponsive",
            Status::Unfinished => "unfinished",
            Status::Maintenance => "maintenance",
            Status::NotStarted => "not-started",
        }
    }

    pub fn is_ok(self) -> bool {
        self == Status::Ok
    }

    /// Whether this status makes a command's exit code other than 0: everything but ok and
    /// maintenance (a machine expected away never fails a command).
    pub fn counts_against(self) -> bool {
        !matches!(self, Status::Ok | Status::Maintenance)
    }

    /// Whether the machine could not be reached (as opposed to answering with an error): these
    /// alone make exit code 3 (docs/cli.md, exit codes).
    pub fn is_unreachable(self) -> bool {
        matches!(
            self,
            Status::TimedOut | Status::NotConnected | Status::Stopped | Status::Unresponsive
        )
    }

    /// The error code of a row with this status that has no error reply of its own (a job
    /// that did not finish, a machine lost during the wait).
    pub fn error_code(self) -> ErrorCode {
        match self {
            Status::TimedOut | Status::Unfinished | Status::Unresponsive => ErrorCode::Timeout,
            Status::NotConnected | Status::Stopped | Status::Maintenance => ErrorCode::Disconnected,
            Status::Ok | Status::Failed | Status::NotStarted => ErrorCode::InternalError,
        }
    }

    /// Why, in a verdict: `timed out after 5s: b, d`.
    pub fn reason(self, timeout: &str) -> String {
        match self {
            Status::TimedOut => format!("timed out after {timeout}"),
            Status::NotConnected => "not connected".into(),
            Status::Unresponsive => "unresponsive, not asked".into(),
            other => other.as_str().to_owned(),
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Status {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_classes() {
        assert_eq!(Status::of(&Outcome::NoResponders), Status::NotConnected);
        assert_eq!(Status::NotConnected.as_str(), "not-connected");
        assert!(Status::Unresponsive.is_unreachable() && Status::TimedOut.is_unreachable());
        assert!(!Status::Failed.is_unreachable() && !Status::Unfinished.is_unreachable());
        assert_eq!(
            serde_json::to_value(Status::TimedOut).unwrap(),
            serde_json::json!("timed-out")
        );
        assert_eq!(Status::Unfinished.error_code(), ErrorCode::Timeout);
        assert_eq!(Status::Stopped.error_code(), ErrorCode::Disconnected);
    }
}
