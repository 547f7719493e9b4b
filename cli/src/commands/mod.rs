//! One module per command family. Each validates its arguments before it connects, asks
//! through [`crate::fanout::Context`], renders with [`crate::render`], and returns the verdict
//! that becomes the exit code.

pub mod agents;
pub mod audit;
pub mod dbus;
pub mod docs;
pub mod keys;
pub mod maintenance;
pub mod monitor;
pub mod server;
pub mod subject;
pub mod systemd;
pub mod watch;
