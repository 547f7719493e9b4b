//! Why a command did not fully succeed, and the exit code that says so.
//!
//! Scripts branch on the exit code, so the outcomes are kept apart by type rather than by
//! message: 1 means "asked, and some machine failed" (or none matched), 3 means "no machine
//! failed, but some could not be reached" (unresponsive, timed out, not connected, stopped,
//! or missing from a list that came from a ping because the registry could not be read),
//! 2 means "could not ask, or lost NATS while asking" (then nothing can be said about the
//! machines, so no machine is blamed).

use std::fmt;

/// A command's failure; [`Failure::exit_code`] decides the process exit status.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Bad arguments or configuration, found before anything was sent: exit 2.
    #[error("{0}")]
    Usage(String),
    /// NATS unreachable, refused us, or failed under us: exit 2.
    #[error("{0}")]
    Connection(String),
    /// NATS went away during the command (killed, frozen, unreachable) and did not come back
    /// before its deadline, or the client gave up reconnecting: exit 2. What the machines did
    /// is unknown, so this is never reported as their timeout.
    #[error("disconnected: {0}")]
    Disconnected(String),
    /// Some machines failed (an error reply, a failed job), or none matched: exit 1.
    #[error("{0}")]
    Partial(String),
    /// No machine failed, but some could not be reached: unresponsive, timed out, not
    /// connected or stopped, or possibly missing (a ping stood in for an unreadable
    /// registry, `Context::finish`): exit 3.
    #[error("{0}")]
    Unreachable(String),
    /// Standard output was closed (`cbus monitor | head`): stop quietly, exit 0.
    #[error("standard output closed")]
    Closed,
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Closed => 0,
            Failure::Partial(_) => 1,
            Failure::Unreachable(_) => 3,
            Failure::Usage(_) | Failure::Connection(_) | Failure::Disconnected(_) => 2,
        }
    }

    /// Whether the failure is worth a line on stderr.
    pub fn is_reported(&self) -> bool {
        !matches!(self, Failure::Closed)
    }
}

/// A usage failure from any displayable error (names, signatures, codec errors).
pub fn usage(e: impl fmt::Display) -> Failure {
    Failure::Usage(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(Failure::Usage("x".into()).exit_code(), 2);
        assert_eq!(Failure::Connection("x".into()).exit_code(), 2);
        assert_eq!(Failure::Disconnected("x".into()).exit_code(), 2);
        assert_eq!(
            Failure::Disconnected("x".into()).to_string(),
            "disconnected: x"
        );
        assert_eq!(Failure::Partial("x".into()).exit_code(), 1);
        assert_eq!(Failure::Unreachable("x".into()).exit_code(), 3);
        assert_eq!(Failure::Closed.exit_code(), 0);
        assert!(!Failure::Closed.is_reported());
    }
}
