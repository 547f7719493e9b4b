//! The history streams (`cbus_protocol::streams`): creating them with their limits, and reading
//! one from a start time on.
//!
//! A reader is an ordered pull consumer (no acks, one replica, recreated by the client from the
//! last stream sequence it delivered whenever it sees a gap, a missed heartbeat or a lost
//! consumer, as after a NATS restart). Consuming only from the stream, for the replay and then
//! live, means there is no seam between the two; [`History::next`] also drops any message at or
//! below the last stream sequence it returned, and any published before the start time (a
//! consumer recreated before the first message starts from the stream's beginning), so neither
//! a duplicate nor an old message ever reaches the caller. Pulls are bounded by the consumer's
//! batch, so memory is too.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use cbus_protocol::streams::StreamSpec;
use futures::StreamExt;

/// Why a stream could not be created or read.
#[derive(Debug, thiserror::Error)]
#[error("JetStream stream {stream}: {message}")]
pub struct StreamError {
    pub stream: String,
    pub message: String,
}

fn err(stream: &str, message: impl ToString) -> StreamError {
    StreamError {
        stream: stream.to_owned(),
        message: message.to_string(),
    }
}

/// The JetStream context, in `domain` when given (a site reaching its hub's JetStream).
pub fn context(client: async_nats::Client, domain: Option<&str>) -> jetstream::Context {
    match domain {
        Some(d) => jetstream::with_domain(client, d),
        None => jetstream::new(client),
    }
}

/// The stream configuration for `spec` with `replicas` copies.
pub fn stream_config(spec: &StreamSpec, replicas: usize) -> stream::Config {
    stream::Config {
        name: spec.name.to_owned(),
        subjects: spec.subjects.clone(),
        max_age: spec.max_age,
        max_bytes: spec.max_bytes,
        max_message_size: spec.max_message_size.unwrap_or(-1),
        discard: stream::DiscardPolicy::Old,
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: replicas.max(1),
        deny_delete: spec.deny_delete,
        ..Default::default()
    }
}

/// What [`ensure_stream`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamChange {
    Created,
    /// Its subjects or limits differed; they are `spec`'s now (replicas are never lowered).
    Updated,
    Unchanged,
}

/// Creates the stream, or gives an existing one `spec`'s subjects and limits. Idempotent.
pub async fn ensure_stream(
    js: &jetstream::Context,
    spec: &StreamSpec,
    replicas: usize,
) -> Result<StreamChange, StreamError> {
    let mut config = stream_config(spec, replicas);
    match js.get_stream(spec.name).await {
        Ok(mut existing) => {
            let info = existing.info().await.map_err(|e| err(spec.name, e))?;
            let have = &info.config;
            let same = have.subjects == config.subjects
                && have.max_age == config.max_age
                && have.max_bytes == config.max_bytes
                && have.max_message_size == config.max_message_size
                && have.deny_delete == config.deny_delete
                && have.num_replicas >= config.num_replicas;
            if same {
                return Ok(StreamChange::Unchanged);
            }
            config.num_replicas = config.num_replicas.max(have.num_replicas);
            config.storage = have.storage;
            js.update_stream(config)
                .await
                .map_err(|e| err(spec.name, format!("cannot update: {e}")))?;
            Ok(StreamChange::Updated)
        }
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            js.create_stream(config)
                .await
                .map_err(|e| err(spec.name, format!("cannot create: {e}")))?;
            Ok(StreamChange::Created)
        }
        Err(e) => Err(err(spec.name, e)),
    }
}

/// One message read from a history stream.
#[derive(Debug)]
pub struct Stored {
    /// The stream sequence.
    pub sequence: u64,
    /// When the server stored it (Unix ms, the server's clock).
    pub published_ms: u64,
    pub message: async_nats::Message,
}

/// A history stream from a start time on: the replay, then live messages as they are stored.
pub struct History {
    messages: consumer::pull::Ordered,
    /// Messages the consumer had to deliver when it was created: the replay's length.
    pub pending_at_start: u64,
    start_ms: u64,
    last_sequence: u64,
    /// Messages dropped as already delivered or older than the start (after a recreate).
    pub skipped: u64,
}

/// Opens `stream` for the messages stored `since` ago or later on `filter` (one subject, with
/// wildcards: nats-server 2.9 takes one filter per consumer).
pub async fn history(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    since: Duration,
) -> Result<History, StreamError> {
    let now = time::OffsetDateTime::now_utc();
    let start = now - since;
    let start_ms = u64::try_from(start.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
    let handle = js.get_stream(stream).await.map_err(|e| {
        err(
            stream,
            format!("cannot open (is it created? cbus streams init): {e}"),
        )
    })?;
    let mut consumer: consumer::Consumer<consumer::pull::OrderedConfig> = handle
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter.to_owned(),
            deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time: start },
            ..Default::default()
        })
        .await
        .map_err(|e| err(stream, format!("cannot create a consumer: {e}")))?;
    let pending = consumer
        .info()
        .await
        .map(|i| i.num_pending)
        .map_err(|e| err(stream, e))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|e| err(stream, format!("cannot read: {e}")))?;
    Ok(History {
        messages,
        pending_at_start: pending,
        start_ms,
        last_sequence: 0,
        skipped: 0,
    })
}

impl History {
    /// The next message after the last one returned; `None` when the client closed. An `Err`
    /// is one failed pull: the reader may go on.
    pub async fn next(&mut self) -> Option<Result<Stored, StreamError>> {
        loop {
            let message = match self.messages.next().await? {
                Ok(m) => m,
                Err(e) => return Some(Err(err("history", e))),
            };
            let (sequence, published_ms) = match message.info() {
                Ok(info) => (
                    info.stream_sequence,
                    u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0),
                ),
                Err(e) => return Some(Err(err("history", e))),
            };
            if sequence <= self.last_sequence || published_ms < self.start_ms {
                self.skipped += 1;
                continue;
            }
            self.last_sequence = sequence;
            return Some(Ok(Stored {
                sequence,
                published_ms,
                message: message.split().0,
            }));
        }
    }

    /// The stream sequence of the last message returned (0 before the first).
    pub fn last_sequence(&self) -> u64 {
        self.last_sequence
    }
}
