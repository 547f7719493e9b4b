//! The cbus wire contract, shared by the agent, the CLI and the gateway.
//!
//! Everything that crosses NATS is defined here and nowhere else: subjects ([`subject`]), header
//! names ([`headers`]), request bodies and the reply envelope ([`envelope`]), presence
//! ([`presence`]), introspection schemas ([`introspect`]) and the lossless JSON form of D-Bus
//! values ([`codec`]). [`fleet`] is the client side of the contract: discovering agents and
//! fanning a request out to them. The human-readable version is docs/protocol.md.

pub mod codec;
#[cfg(feature = "clap")]
pub mod connect;
pub mod duration;
pub mod envelope;
pub mod error;
pub mod fleet;
pub mod headers;
pub mod introspect;
pub mod label;
pub mod names;
pub mod nkey;
pub mod permissions;
pub mod presence;
pub mod subject;

pub use envelope::{ErrorBody, ErrorCode, Reply, Request, Success};
pub use error::{CodecError, NameError, NkeyError, SubjectError};
pub use subject::{Op, RequestSubject, SignalSubject, Target};

/// The cbus version every part reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
