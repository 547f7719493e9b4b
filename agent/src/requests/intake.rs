//! Intake: the subscriptions, the bound on waiting requests, the deadline of each, and the reply.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Message;
use cbus_client::headers;
use cbus_protocol::codec;
use cbus_protocol::envelope::{ErrorBody, ErrorCode, Reply, Request};
use cbus_protocol::subject::{self, Op, RequestSubject};
use futures::StreamExt;

use super::errors::invalid;
use super::guard::Audit;
use super::{Outcome, RequestServer};

impl RequestServer {
    /// Subscribes to this agent's targeted subjects and to broadcasts (queue group = nkey, so a
    /// machine answers a broadcast once), and serves until the NATS client is closed.
    pub async fn serve(self: Arc<Self>) -> Result<(), async_nats::SubscribeError> {
        let targeted = self
            .client
            .subscribe(subject::agent_requests(&self.me.nkey))
            .await?;
        let broadcast = self
            .client
            .queue_subscribe(subject::BROADCAST_ALL, self.me.nkey.clone())
            .await?;
        let mut messages = futures::stream::select(targeted, broadcast);
        while let Some(msg) = messages.next().await {
            let server = self.clone();
            match self.pending.clone().try_acquire_owned() {
                Ok(permit) => {
                    tokio::spawn(async move {
                        server.handle(msg).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    tokio::spawn(async move { server.refuse_busy(msg).await });
                }
            }
        }
        Ok(())
    }

    /// Answers without queueing: too many requests are waiting already.
    pub(super) async fn refuse_busy(&self, msg: Message) {
        let Some(reply_to) = msg.reply else { return };
        self.metrics
            .requests
            .with_label_values(&["busy", "error"])
            .inc();
        tracing::debug!(subject = %codec::quote(&msg.subject), "agent busy; request refused");
        let reply = Reply {
            nkey: self.me.nkey.clone(),
            hostname: self.me.hostname.clone(),
            result: Err(ErrorBody::new(
                ErrorCode::Timeout,
                "agent busy: too many requests waiting for D-Bus; try again",
            )),
        };
        self.send_reply(reply_to, reply).await;
    }

    /// Publishes a reply; one that NATS would refuse as too large becomes an error reply, so
    /// the requester learns why instead of timing out.
    pub(super) async fn send_reply(&self, reply_to: async_nats::Subject, reply: Reply) {
        let mut payload = reply.to_payload();
        let max = self.client.server_info().max_payload;
        if max > 0 && payload.len() > max {
            tracing::warn!(
                len = payload.len(),
                max,
                "reply larger than NATS max_payload"
            );
            payload = Reply {
                nkey: reply.nkey,
                hostname: reply.hostname,
                result: Err(ErrorBody::new(
                    ErrorCode::InternalError,
                    format!(
                        "reply of {} bytes exceeds the NATS server's max_payload of {max}",
                        payload.len()
                    ),
                )),
            }
            .to_payload();
        }
        if let Err(e) = self.client.publish(reply_to, payload).await {
            tracing::warn!(error = %e, "cannot publish reply");
        }
    }

    pub(super) async fn handle(self: Arc<Self>, msg: Message) {
        let Some(reply_to) = msg.reply.clone() else {
            tracing::debug!(subject = %codec::quote(&msg.subject), "request without reply subject ignored");
            return;
        };
        let (op, outcome) = self.answer(&msg).await;
        let label = if outcome.is_ok() { "ok" } else { "error" };
        self.metrics
            .requests
            .with_label_values(&[op.map(Op::as_str).unwrap_or("invalid"), label])
            .inc();
        match &outcome {
            // Malformed requests are the requester's bug: visible in the agent's log too.
            Err(e) if e.code == ErrorCode::InvalidArgument => {
                tracing::info!(subject = %codec::quote(&msg.subject), error = %e, "invalid request")
            }
            Err(e) => {
                tracing::debug!(subject = %codec::quote(&msg.subject), error = %e, "request failed")
            }
            Ok(_) => {}
        }
        let reply = Reply {
            nkey: self.me.nkey.clone(),
            hostname: self.me.hostname.clone(),
            result: outcome,
        };
        self.send_reply(reply_to, reply).await;
    }

    pub(super) async fn answer(self: &Arc<Self>, msg: &Message) -> (Option<Op>, Outcome) {
        if msg.payload.len() > self.limits.max_request_bytes {
            return (
                None,
                Err(invalid(format!(
                    "request of {} bytes is larger than the agent's limit of {}",
                    msg.payload.len(),
                    self.limits.max_request_bytes
                ))),
            );
        }
        let subject = match RequestSubject::parse(&msg.subject) {
            Ok(s) => s,
            Err(e) => return (None, Err(invalid(e.to_string()))),
        };
        let op = Some(subject.op);
        let request = match Request::from_payload(&msg.payload) {
            Ok(r) => r,
            Err(e) => return (op, Err(invalid(format!("invalid request body: {e}")))),
        };
        if let Err(e) = request.check_for(subject.op) {
            return (op, Err(invalid(e)));
        }
        let requester = headers::get(msg.headers.as_ref(), headers::REQUESTER)
            .unwrap_or("unknown")
            .to_owned();
        let timeout = request
            .timeout_ms
            .map(Duration::from_millis)
            .map_or(self.limits.call_timeout, |t| {
                t.min(self.limits.call_timeout)
            });
        // The timeout covers waiting for a call slot too, so a queued request gets an answer.
        // A call that started keeps its slot until D-Bus answers (or the connection's method
        // timeout, a little above --call-timeout, ends it) even when the requester was already
        // told "timeout": the slots bound the calls the bus sees, not just the ones we wait for
        // (dbus-daemon refuses new calls beyond its per-connection pending-reply limit).
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let server = self.clone();
        let subject2 = subject.clone();
        tokio::spawn(async move {
            let Ok(Ok(_permit)) = tokio::time::timeout_at(deadline, server.calls.acquire()).await
            else {
                // Timed out waiting (the requester is told below) or shutting down; a set or
                // call that never ran is still in the audit log.
                if matches!(subject2.op, Op::Set | Op::Call) {
                    let audit = Audit {
                        interface: request.interface.clone(),
                        verdict: None,
                    };
                    let timeout = ErrorBody::new(ErrorCode::Timeout, "no D-Bus call slot in time");
                    audit.log(&subject2, &request, &requester, &Err(timeout));
                }
                return;
            };
            let outcome = server.dispatch(&subject2, &request, &requester).await;
            let _ = tx.send(outcome);
        });
        let outcome = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) | Err(_) => Err(ErrorBody::new(
                ErrorCode::Timeout,
                format!("D-Bus call did not finish within {timeout:?}"),
            )),
        };
        self.metrics
            .call_seconds
            .with_label_values(&[subject.op.as_str()])
            .observe(started.elapsed().as_secs_f64());
        (op, outcome)
    }

    pub(super) async fn dispatch(
        &self,
        s: &RequestSubject,
        r: &Request,
        requester: &str,
    ) -> Outcome {
        match s.op {
            Op::Set | Op::Call => {
                let mut audit = Audit {
                    interface: r.interface.clone(),
                    verdict: None,
                };
                let outcome = self.write(s, r, &mut audit).await;
                audit.log(s, r, requester, &outcome);
                outcome
            }
            _ => self.read(s, r).await,
        }
    }
}
