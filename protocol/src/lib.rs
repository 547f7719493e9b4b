//! The cbus wire contract, shared by the agent, the CLI and the gateway.
//!
//! Everything that crosses NATS is defined here and nowhere else: subjects ([`subject`]), header
//! names ([`headers`]), request bodies and the reply envelope ([`envelope`]), presence
//! ([`presence`]), maintenance marks ([`maintenance`]), introspection schemas ([`introspect`]) and the lossless JSON form of D-Bus
//! values ([`codec`]), subject-token escaping ([`token`]), names ([`names`]), agent identities
//! ([`nkey`]) the NATS permission sets ([`permissions`]), audit entries ([`audit`]) and the history
//! streams ([`streams`]). The human-readable version is
//! docs/protocol.md.
//!
//! The crate is sans-IO, as quinn-proto is to quinn and zvariant to zbus: it holds no NATS
//! client and no runtime, so the contract can be read, tested and reused without either. Talking
//! to NATS as a requester is `cbus-client`'s; the agent is the responder.

pub mod audit;
pub mod codec;
pub mod envelope;
pub mod error;
pub mod headers;
pub mod introspect;
pub mod maintenance;
pub mod names;
pub mod nkey;
pub mod permissions;
pub mod presence;
pub mod streams;
pub mod subject;
pub mod token;

pub use envelope::{ErrorBody, ErrorCode, Reply, Request, Success};
pub use error::{CodecError, NameError, NkeyError, SubjectError};
pub use subject::{Op, RequestSubject, SignalSubject, Target};

/// The cbus version every part reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
