//! Intake: the subscriptions, the bound on waiting requests, the deadline of each, and the reply.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::Message;
use cbus_protocol::codec;
use cbus_protocol::envelope::{ErrorBody, ErrorCode, Reply, Request};
use cbus_protocol::subject::{self, Op, RequestSubject};
use futures::StreamExt;

use super::errors::invalid;
use super::guard::{Asker, Audit};
use super::{Outcome, RequestServer};

/// The agent's request subscriptions: its own subject, and broadcasts in its queue group.
pub struct Subscriptions {
    targeted: async_nats::Subscriber,
    broadcast: async_nats::Subscriber,
}

impl RequestServer {
    /// Subscribes to this agent's targeted subjects and to broadcasts (queue group = nkey, so a
    /// machine answers a broadcast once). Done before the agent says hello on the same
    /// connection, so the server has the subscriptions before anyone can see the agent.
    pub async fn subscribe(&self) -> Result<Subscriptions, async_nats::SubscribeError> {
        let targeted = self
            .client
            .subscribe(subject::agent_requests(&self.me.nkey))
            .await?;
        let broadcast = self
            .client
            .queue_subscribe(subject::BROADCAST_ALL, self.me.nkey.clone())
            .await?;
        Ok(Subscriptions {
            targeted,
            broadcast,
        })
    }

    /// Serves the requests of `subs` until the NATS client is closed.
    pub async fn serve(self: Arc<Self>, subs: Subscriptions) {
        let mut messages = futures::stream::select(subs.targeted, subs.broadcast);
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
    }

    /// Answers without queueing: too many requests are waiting already.
    pub(super) async fn refuse_busy(&self, msg: Message) {
        let Some(reply_to) = msg.reply.clone() else {
            return;
        };
        self.metrics
            .requests
            .with_label_values(&["busy", "error"])
            .inc();
        tracing::debug!(subject = %codec::quote(&msg.subject), "agent busy; request refused");
        let refusal = Err(ErrorBody::new(
            ErrorCode::Timeout,
            "agent busy: too many requests waiting for D-Bus; try again",
        ));
        // A refused set or call is audited too, without reading its body (a flood is when the
        // agent has the least time for that).
        if let Ok(s) = RequestSubject::parse(&msg.subject) {
            if !s.op.is_read() {
                self.audit(
                    &Audit::unreached(None),
                    &s,
                    None,
                    &Asker::of(&msg),
                    &refusal,
                );
            }
        }
        let reply = Reply {
            nkey: self.me.nkey.clone(),
            hostname: self.me.hostname.clone(),
            result: refusal,
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
        let subject = match RequestSubject::parse(&msg.subject) {
            Ok(s) => s,
            Err(e) => return (None, Err(invalid(e.to_string()))),
        };
        let op = Some(subject.op);
        let asker = Asker::of(msg);
        // A set or call refused before its body was read is still in the audit trail.
        let refuse = |r: Option<&Request>, e: ErrorBody| {
            let refusal = Err(e);
            if !subject.op.is_read() {
                let audit = Audit::unreached(r.and_then(|r| r.interface.clone()));
                self.audit(&audit, &subject, r, &asker, &refusal);
            }
            (op, refusal)
        };
        if msg.payload.len() > self.limits.max_request_bytes {
            return refuse(
                None,
                invalid(format!(
                    "request of {} bytes is larger than the agent's limit of {}",
                    msg.payload.len(),
                    self.limits.max_request_bytes
                )),
            );
        }
        let request = match Request::from_payload(&msg.payload) {
            Ok(r) => r,
            Err(e) => return refuse(None, invalid(format!("invalid request body: {e}"))),
        };
        if let Err(e) = request.check_for(subject.op) {
            return refuse(Some(&request), invalid(e));
        }
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
                    let audit = Audit::unreached(request.interface.clone());
                    let timeout = ErrorBody::new(ErrorCode::Timeout, "no D-Bus call slot in time");
                    server.audit(&audit, &subject2, Some(&request), &asker, &Err(timeout));
                }
                return;
            };
            let outcome = server.dispatch(&subject2, &request, &asker).await;
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

    pub(super) async fn dispatch(&self, s: &RequestSubject, r: &Request, asker: &Asker) -> Outcome {
        match s.op {
            Op::Set | Op::Call => {
                let mut audit = Audit {
                    interface: r.interface.clone(),
                    verdict: None,
                };
                let outcome = self.write(s, r, &mut audit).await;
                self.audit(&audit, s, Some(r), asker, &outcome);
                outcome
            }
            _ => self.read(s, r).await,
        }
    }
}
