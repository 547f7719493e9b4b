//! What every WebSocket session shares.

use std::sync::Arc;
use std::time::Duration;

use cbus_client::fleet::Fleet;
use tokio::sync::Semaphore;

use crate::auth::{OriginPolicy, Token};
use crate::changes::Router;
use crate::objects::Objects;
use crate::store::Store;

/// Everything a session needs; shared by all sessions.
pub(crate) struct WsContext {
    pub store: Store,
    pub changes: Router,
    pub objects: Objects,
    pub fleet: Fleet,
    pub token: Token,
    pub origins: OriginPolicy,
    pub allow_token_in_url: bool,
    pub heartbeat: Duration,
    /// Frames queued per client.
    pub queue: usize,
    /// Bytes queued per client.
    pub queue_bytes: usize,
    pub request_timeout: Duration,
    /// Time a client has to authenticate.
    pub auth_timeout: Duration,
    /// Slots of clients that have not authenticated yet.
    pub unauthenticated: Arc<Semaphore>,
}
