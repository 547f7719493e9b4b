//! Typed errors of the protocol crate. Each says what was wrong and with which input.

use thiserror::Error;

use crate::subject::Op;

/// A D-Bus name or path that the specification does not allow.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("invalid bus name {name:?}: {reason}")]
    BusName { name: String, reason: &'static str },
    #[error("invalid interface name {name:?}: {reason}")]
    Interface { name: String, reason: &'static str },
    #[error("invalid member name {name:?}: must match [A-Za-z_][A-Za-z0-9_]* (at most 255 bytes)")]
    Member { name: String },
    #[error("invalid object path {path:?}: {reason}")]
    ObjectPath { path: String, reason: &'static str },
}

/// A subject that cbus did not produce or cannot produce.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum SubjectError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("invalid token {token:?}: {reason}")]
    BadEscape { token: String, reason: &'static str },
    #[error("invalid agent nkey {0:?}: expected 'U' followed by 55 base32 characters")]
    BadNkey(String),
    #[error("unknown op {0:?} (expected get, set, getall, call, introspect or list-names)")]
    UnknownOp(String),
    #[error("op {0} needs a member (property or method name)")]
    MissingMember(Op),
    #[error("subject {0:?} has too few tokens")]
    TooFewTokens(String),
    #[error("{0:?} is not a cbus request subject (dbus.agent.<nkey>... or dbus.broadcast...)")]
    NotARequest(String),
    #[error("{0:?} is not a cbus signal subject (dbus.signals.<nkey>.<sender>.<path>)")]
    NotASignal(String),
    #[error("subject would be {len} bytes, more than the {max} cbus allows (nats-server drops the connection on long subjects)")]
    TooLong { len: usize, max: usize },
}

/// A value that cannot be converted between JSON and D-Bus.
///
/// `at` names the position, outermost first, e.g. `argument 2, element 3`.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{}{message}", if at.is_empty() { String::new() } else { format!("{}: ", at.join(", ")) })]
pub struct CodecError {
    pub at: Vec<String>,
    pub message: String,
}

impl CodecError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        CodecError {
            at: Vec::new(),
            message: message.into(),
        }
    }

    /// Prefixes the position with an outer one.
    pub(crate) fn within(mut self, outer: impl Into<String>) -> Self {
        self.at.insert(0, outer.into());
        self
    }
}

/// A key that cannot become an agent identity.
#[derive(Debug, Error)]
pub enum NkeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an OpenSSH private key: {message}")]
    NotOpenSsh { path: String, message: String },
    #[error(
        "{path} holds a {algorithm} key; cbus needs an ed25519 host key (ssh-keygen -t ed25519)"
    )]
    NotEd25519 { path: String, algorithm: String },
    #[error("{path} is encrypted; host keys must not have a passphrase")]
    Encrypted { path: String },
    #[error("not an ed25519 public key: {0}")]
    BadPublicKey(String),
    #[error("invalid nkey seed: {0}")]
    BadSeed(String),
}
