//! The writer task and the queue that feeds it.
//!
//! The frame queue is bounded in bytes as well as in frames ([`Outbox`], `--ws-queue-bytes`):
//! one units snapshot of a big fleet is one frame of megabytes, and 256 of them queued for a
//! client that does not read were gigabytes. A frame tagged with a subscription's generation is
//! skipped when the subscription moved on (it resyncs), so a slow client's stale deltas never
//! reach the socket.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use bytes::Bytes;
use futures::stream::SplitSink;
use futures::SinkExt;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::frames::close_reason;

/// A write that takes longer means the client is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the writer sends.
pub(super) enum Frame {
    /// A text message; tagged ones (subscription, generation) are skipped when their
    /// subscription's generation moved on.
    Text {
        text: String,
        tag: Option<(u64, u64)>,
    },
    Ping,
    Close(u16, String),
}

impl Frame {
    /// A text message that is not part of a subscription's stream.
    pub(super) fn control(text: String) -> Frame {
        Frame::Text { text, tag: None }
    }
}

/// subscription -> its current generation, shared by the session (which moves it) and the
/// writer (which skips frames of older ones).
pub(super) type Generations = Arc<Mutex<HashMap<u64, u64>>>;

/// A frame in the queue, holding its bytes of the client's budget until it is written.
pub(super) struct Queued {
    frame: Frame,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// The session's end of the frame queue: bounded in frames by the channel and in bytes by a
/// semaphore with one permit per byte (`--ws-queue-bytes`). A frame larger than the whole
/// budget takes all of it, so it goes out alone.
#[derive(Clone)]
pub(super) struct Outbox {
    tx: mpsc::Sender<Queued>,
    bytes: Arc<Semaphore>,
    budget: usize,
}

impl Outbox {
    pub(super) fn new(frames: usize, budget: usize) -> (Outbox, mpsc::Receiver<Queued>) {
        let budget = budget.clamp(1, u32::MAX as usize);
        let (tx, rx) = mpsc::channel(frames.max(4));
        let bytes = Arc::new(Semaphore::new(budget));
        (Outbox { tx, bytes, budget }, rx)
    }

    /// The client's byte budget, which signals waiting for the session share.
    pub(super) fn bytes(&self) -> Arc<Semaphore> {
        self.bytes.clone()
    }

    fn cost(&self, frame: &Frame) -> u32 {
        let n = match frame {
            Frame::Text { text, .. } => text.len(),
            Frame::Close(_, reason) => reason.len(),
            Frame::Ping => 0,
        };
        n.min(self.budget) as u32
    }

    /// Queues without waiting; `Full` when either bound is reached.
    pub(super) fn try_send(&self, frame: Frame) -> Result<(), TrySendError<()>> {
        let cost = self.cost(&frame);
        let permit = if cost == 0 {
            None
        } else {
            match self.bytes.clone().try_acquire_many_owned(cost) {
                Ok(p) => Some(p),
                Err(_) => {
                    if self.tx.is_closed() {
                        return Err(TrySendError::Closed(()));
                    }
                    return Err(TrySendError::Full(()));
                }
            }
        };
        self.tx
            .try_send(Queued {
                frame,
                _bytes: permit,
            })
            .map_err(|e| match e {
                TrySendError::Full(_) => TrySendError::Full(()),
                TrySendError::Closed(_) => TrySendError::Closed(()),
            })
    }

    /// Queues, waiting for room (control frames and request results: the client asked).
    pub(super) async fn send(&self, frame: Frame) -> Result<(), ()> {
        let cost = self.cost(&frame);
        let permit = if cost == 0 {
            None
        } else {
            tokio::select! {
                p = self.bytes.clone().acquire_many_owned(cost) => Some(p.map_err(|_| ())?),
                _ = self.tx.closed() => return Err(()),
            }
        };
        self.tx
            .send(Queued {
                frame,
                _bytes: permit,
            })
            .await
            .map_err(|_| ())
    }

    pub(super) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Writes queued frames until the queue closes, a Close went out, or a write fails.
pub(super) async fn writer(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Queued>,
    gens: Generations,
) {
    // Each frame's bytes are given back once it is written (the permit drops with `_queued`).
    while let Some(Queued {
        frame,
        _bytes: _queued,
    }) = rx.recv().await
    {
        let msg = match frame {
            Frame::Text { text, tag } => {
                if let Some((sub, gen)) = tag {
                    let current = gens
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&sub)
                        .copied();
                    if current != Some(gen) {
                        continue;
                    }
                }
                Message::Text(text.into())
            }
            Frame::Ping => Message::Ping(Bytes::new()),
            Frame::Close(code, reason) => {
                close_now(&mut sink, code, &reason).await;
                break;
            }
        };
        // Frames already queued go out in one flush (one write for many small deltas).
        let flush = rx.is_empty();
        let sent = if flush {
            tokio::time::timeout(WRITE_TIMEOUT, sink.send(msg)).await
        } else {
            tokio::time::timeout(WRITE_TIMEOUT, sink.feed(msg)).await
        };
        if !matches!(sent, Ok(Ok(()))) {
            break;
        }
    }
    let _ = sink.close().await;
}

/// Sends a Close frame (its reason cut to what fits).
pub(super) async fn close_now(sink: &mut SplitSink<WebSocket, Message>, code: u16, reason: &str) {
    let _ = tokio::time::timeout(
        WRITE_TIMEOUT,
        sink.send(Message::Close(Some(CloseFrame {
            code,
            reason: close_reason(reason).into(),
        }))),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Frame {
        Frame::control("x".repeat(n))
    }

    #[tokio::test]
    async fn the_outbox_is_bounded_in_bytes() {
        let (out, mut rx) = Outbox::new(100, 100);
        assert!(out.try_send(text(60)).is_ok());
        assert!(matches!(
            out.try_send(text(60)),
            Err(TrySendError::Full(()))
        ));
        assert!(out.try_send(text(40)).is_ok(), "what still fits goes in");
        assert!(out.try_send(Frame::Ping).is_ok(), "pings cost nothing");
        drop(rx.recv().await); // the writer wrote the first frame: its bytes are back
        assert!(out.try_send(text(60)).is_ok());
        // A frame larger than the budget takes all of it: it goes out alone.
        while rx.try_recv().is_ok() {}
        assert!(out.try_send(text(500)).is_ok());
        assert!(out.try_send(text(1)).is_err());
        drop(rx);
        assert!(matches!(
            out.try_send(text(1)),
            Err(TrySendError::Closed(()))
        ));
        assert!(out.send(text(1)).await.is_err());
    }
}
