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
    js: jetstream::Context,
    stream: String,
    filter: String,
    start: time::OffsetDateTime,
    start_ms: u64,
    /// `None` after a failure: recreated by the next [`History::next`].
    messages: Option<consumer::pull::Ordered>,
    /// The client's connect count when the consumer was made: a reconnect means the server may
    /// have lost it (a restart), so it is made again at once instead of after missed
    /// heartbeats (async-nats 0.51 reports a lost consumer's pull as an error and stops).
    connects: u64,
    /// Messages the consumer had to deliver when it was created: the replay's length.
    pub pending_at_start: u64,
    last_sequence: u64,
    /// Messages dropped as already delivered or older than the start (after a recreate).
    pub skipped: u64,
    /// Consumers made again after a failure or a reconnect.
    pub recreated: u64,
}

/// How often a waiting [`History::next`] checks for a reconnect.
const RECONNECT_CHECK: Duration = Duration::from_millis(250);

/// Opens `stream` for the messages stored `since` ago or later on `filter` (one subject, with
/// wildcards: nats-server 2.9 takes one filter per consumer).
pub async fn history(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    since: Duration,
) -> Result<History, StreamError> {
    history_after(js, stream, filter, since, 0).await
}

/// [`history`], starting after the stream sequence `after` when that is later than `since`
/// ago: a reader that wants only the recent end of a long stream (the gateway's page of the
/// last N entries) starts at [`Tail::after`] instead of reading everything since the start
/// time. Nothing stored before `since` ago is returned either way.
pub async fn history_after(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    since: Duration,
    after: u64,
) -> Result<History, StreamError> {
    let start = time::OffsetDateTime::now_utc() - since;
    let mut h = History {
        js: js.clone(),
        stream: stream.to_owned(),
        filter: filter.to_owned(),
        start,
        start_ms: unix_ms(start),
        messages: None,
        connects: 0,
        pending_at_start: 0,
        last_sequence: after,
        skipped: 0,
        recreated: 0,
    };
    h.pending_at_start = h.open().await?;
    Ok(h)
}

/// Where a stream ends, for a reader that wants its last messages only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tail {
    /// The first sequence the stream still holds.
    pub first_sequence: u64,
    /// The last sequence stored (0 when nothing ever was).
    pub last_sequence: u64,
}

impl Tail {
    /// The sequence to start after so that at most `n` of the stream's last messages are read
    /// (0: from the start time).
    pub fn after(&self, n: u64) -> u64 {
        let after = self.last_sequence.saturating_sub(n);
        if after < self.first_sequence {
            0
        } else {
            after
        }
    }
}

/// The stream's first and last sequences; `Ok(None)` when the stream does not exist (history
/// is optional: a reader shows "no history" rather than an error).
pub async fn tail(js: &jetstream::Context, stream: &str) -> Result<Option<Tail>, StreamError> {
    match js.get_stream(stream).await {
        Ok(mut s) => {
            let info = s.info().await.map_err(|e| err(stream, e))?;
            Ok(Some(Tail {
                first_sequence: info.state.first_sequence,
                last_sequence: info.state.last_sequence,
            }))
        }
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            Ok(None)
        }
        Err(e) => Err(err(stream, e)),
    }
}

fn unix_ms(t: time::OffsetDateTime) -> u64 {
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

impl History {
    /// Makes the consumer: from the start time, or after the last sequence returned. Returns
    /// how many messages it has to deliver.
    async fn open(&mut self) -> Result<u64, StreamError> {
        let stream = self.stream.as_str();
        self.connects = self
            .js
            .client()
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed);
        let deliver_policy = match self.last_sequence {
            0 => consumer::DeliverPolicy::ByStartTime {
                start_time: self.start,
            },
            n => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: n + 1,
            },
        };
        let handle = self.js.get_stream(stream).await.map_err(|e| {
            err(
                stream,
                format!("cannot open (is it created? cbus streams init): {e}"),
            )
        })?;
        let mut consumer: consumer::Consumer<consumer::pull::OrderedConfig> = handle
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.filter.clone(),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| err(stream, format!("cannot create a consumer: {e}")))?;
        let pending = consumer
            .info()
            .await
            .map(|i| i.num_pending)
            .map_err(|e| err(stream, e))?;
        self.messages = Some(
            consumer
                .messages()
                .await
                .map_err(|e| err(stream, format!("cannot read: {e}")))?,
        );
        Ok(pending)
    }

    fn reconnected(&self) -> bool {
        self.js
            .client()
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed)
            != self.connects
    }

    /// The next message after the last one returned. An `Err` is one failure (the consumer is
    /// made again on the next call, after a pause): the reader may go on, and decides when to
    /// give up.
    pub async fn next(&mut self) -> Option<Result<Stored, StreamError>> {
        loop {
            if self.messages.is_none() {
                if let Err(e) = self.open().await {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    return Some(Err(e));
                }
                self.recreated += 1;
            }
            let messages = self.messages.as_mut()?;
            let message = tokio::select! {
                m = messages.next() => m,
                _ = tokio::time::sleep(RECONNECT_CHECK) => {
                    if self.reconnected() {
                        tracing::debug!(stream = %self.stream, after = self.last_sequence, "reconnected; new consumer");
                        self.messages = None;
                    }
                    continue;
                }
            };
            let message = match message {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    self.messages = None;
                    return Some(Err(err(&self.stream, e)));
                }
                None => return None,
            };
            let (sequence, published_ms) = match message.info() {
                Ok(info) => (info.stream_sequence, unix_ms(info.published)),
                Err(e) => return Some(Err(err(&self.stream, e))),
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

#[cfg(test)]
mod tests {
    use super::Tail;

    #[test]
    fn a_tail_starts_after_the_last_n_messages() {
        let t = Tail {
            first_sequence: 1,
            last_sequence: 100,
        };
        assert_eq!(t.after(10), 90, "reads 91..=100");
        assert_eq!(t.after(100), 0, "the whole stream: from the start time");
        assert_eq!(t.after(1000), 0);
        let aged = Tail {
            first_sequence: 95,
            last_sequence: 100,
        };
        assert_eq!(aged.after(10), 0, "fewer than n left");
        let empty = Tail {
            first_sequence: 0,
            last_sequence: 0,
        };
        assert_eq!(empty.after(10), 0);
    }
}
