//! One replay of a KV bucket's latest entries, with a deadline: the registry's read and the
//! maintenance marks' read.

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::time::Duration;

use async_nats::jetstream::context::{RequestError, RequestErrorKind};
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::{
    consumer::push::OrderedConfig, consumer::DeliverPolicy, stream::Stream, ErrorCode, Message,
};
use async_nats::Client;
use futures::StreamExt;
use tokio::time::{timeout_at, Instant};

/// How long a replay waits for entries it was promised after the server said none are left.
const SETTLE: Duration = Duration::from_millis(200);

/// Why a replay ended without its entries.
#[derive(Debug)]
pub(super) struct ReplayError {
    /// There is nothing to read: the server has no JetStream, or not this bucket ([`absent`]).
    pub absent: bool,
    pub message: String,
}

impl ReplayError {
    fn failed(message: impl Into<String>) -> ReplayError {
        ReplayError {
            absent: false,
            message: message.into(),
        }
    }
}

/// Whether a JetStream request failed because there is nothing to read, from the server's
/// error `code` or the request's `source`: no JetStream answers (no responders), or it has no
/// such stream. Not a failure to read one (a timeout, a permission, a stream without a leader),
/// which callers must not take for an empty bucket.
pub(super) fn absent(
    code: Option<ErrorCode>,
    source: Option<&(dyn std::error::Error + 'static)>,
) -> bool {
    let no_stream = code.is_some_and(|c| {
        matches!(
            c,
            ErrorCode::STREAM_NOT_FOUND
                | ErrorCode::JETSTREAM_NOT_ENABLED
                | ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
        )
    });
    let no_responders = source
        .and_then(|s| s.downcast_ref::<RequestError>())
        .is_some_and(|r| r.kind() == RequestErrorKind::NoResponders);
    no_stream || no_responders
}

/// One entry as the replay delivers it.
pub(super) struct Entry<'a> {
    pub message: &'a Message,
    /// Unix ms when the server stored it (the server's clock, never the writer's).
    pub published_ms: u64,
    /// A delete or purge marker (`KV-Operation` header), not a value.
    pub deleted: bool,
}

/// Replays the latest entry of every key of `stream` under `filter`, calling `each` for each,
/// until every key came or `deadline`.
///
/// The pending count a message carries is not enough to know the replay is complete:
/// nats-server 2.9 sometimes delivers the first entry twice and counts both, so pending reaches
/// 0 one entry early (a machine silently missing from a fan-out). The replay is complete when as
/// many distinct keys arrived as the consumer had entries when it was created. Keys, not stream
/// sequences: an entry rewritten by a heartbeat after it was delivered comes again under a new
/// sequence, and counting sequences ended a read of 50,000 entries 14 machines short
/// (cbus-bench scale). If entries expired meanwhile, fewer keys ever come, so after pending was
/// 0 a short quiet spell ([`SETTLE`]) ends the read too.
pub(super) async fn replay_latest<I>(
    client: &Client,
    stream: &Stream<I>,
    filter: String,
    deadline: Instant,
    mut each: impl FnMut(Entry<'_>),
) -> Result<(), ReplayError> {
    let consumer = timeout_at(
        deadline,
        stream.create_consumer(OrderedConfig {
            deliver_subject: client.new_inbox(),
            filter_subject: filter,
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        }),
    )
    .await
    .map_err(|_| ReplayError::failed("timed out"))?
    .map_err(|e| {
        let code = match e.kind() {
            ConsumerErrorKind::JetStream(js) => Some(js.error_code()),
            _ => None,
        };
        ReplayError {
            absent: absent(code, std::error::Error::source(&e)),
            message: e.to_string(),
        }
    })?;
    let expected = consumer.cached_info().num_pending;
    if expected == 0 {
        return Ok(());
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| ReplayError::failed(e.to_string()))?;
    // The keys seen, by a hash of each: a copy of every subject was ~70 bytes per entry, 3.5 MB
    // of a 50,000-entry read. Two keys of one hash would count once, so the replay would not
    // end early on them but at the quiet spell after pending reached 0: slower, never short.
    let mut keys: HashSet<u64> = HashSet::with_capacity(expected.min(1 << 20) as usize);
    // Random keys per replay, so no writer can choose keys that collide.
    let key_hash = std::hash::RandomState::new();
    let mut drained = false;
    loop {
        let wait = if drained {
            deadline.min(Instant::now() + SETTLE)
        } else {
            deadline
        };
        let message = match timeout_at(wait, messages.next()).await {
            Err(_) if drained => {
                tracing::debug!(
                    expected,
                    got = keys.len(),
                    "replay ended short; entries expired while reading"
                );
                return Ok(());
            }
            Err(_) => return Err(ReplayError::failed("timed out while reading")),
            Ok(None) => return Ok(()),
            Ok(Some(Err(e))) => return Err(ReplayError::failed(e.to_string())),
            Ok(Some(Ok(m))) => m,
        };
        let info = message
            .info()
            .map_err(|e| ReplayError::failed(e.to_string()))?;
        let pending = info.pending;
        let published_ms = (info.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
        let deleted = message
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .is_some();
        keys.insert(key_hash.hash_one(message.subject.as_str()));
        each(Entry {
            message: &message,
            published_ms,
            deleted,
        });
        // As many distinct keys as entries were promised: the replay is complete, whatever the
        // pending count says (writers busy while it runs keep it above 0 for a while, and a read
        // that waited for 0 could outlast the caller's deadline).
        if keys.len() as u64 >= expected {
            return Ok(());
        }
        if pending == 0 {
            drained = true;
        }
    }
}
