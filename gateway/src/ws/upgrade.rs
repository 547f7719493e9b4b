//! `GET /ws`: the Origin check, authentication (a bearer header, the URL if allowed, or the
//! first frame), and the upgrade.
//!
//! Before a client authenticates it costs a slot of `--max-unauthenticated` and has
//! `--auth-timeout` to do so: connections that never authenticate cannot pile up.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query as UrlQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::sync::OwnedSemaphorePermit;

use super::context::WsContext;
use super::frames::{self, ClientMsg, CLOSE_PROTOCOL_ERROR, CLOSE_UNAUTHORIZED};
use super::session;
use super::writer::close_now;
use crate::auth::bearer;
use crate::stats::{self, Dropped};

/// Largest frame a client may send.
const MAX_FRAME: usize = 1 << 20;
/// Read buffer per connection. tungstenite's default (128 KiB) is zero-filled on every read
/// attempt, and a session polls its socket each time it wakes for a cache change: with 1,000
/// clients that memset took 37% of the CPU and 128 MiB of RSS (docs/benchmarks.md). Clients send
/// small frames; larger ones are still read, in several steps.
const READ_BUFFER: usize = 4096;

/// Authentication decided before the upgrade.
enum PreAuth {
    Valid,
    Invalid,
    Pending,
}

/// `GET /ws`.
pub(crate) async fn handler(
    State(ctx): State<Arc<WsContext>>,
    headers: HeaderMap,
    UrlQuery(query): UrlQuery<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if !ctx.origins.allows(origin, host) {
        tracing::warn!(?origin, ?host, "WebSocket from a foreign origin refused");
        return (
            StatusCode::FORBIDDEN,
            "origin not allowed (start the gateway with --allow-origin)\n",
        )
            .into_response();
    }
    let header_token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer);
    let url_token = ctx
        .allow_token_in_url
        .then(|| query.get("token").map(String::as_str))
        .flatten();
    let pre = match header_token.or(url_token) {
        Some(t) if ctx.token.matches(t) => PreAuth::Valid,
        Some(_) => PreAuth::Invalid,
        None => PreAuth::Pending,
    };
    // A slot while the client has yet to authenticate, refused before the upgrade when all
    // are taken: idle unauthenticated sockets must not crowd out operators.
    let slot = match pre {
        PreAuth::Pending => match ctx.unauthenticated.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                stats::dropped(Dropped::UnauthenticatedLimit);
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many WebSockets waiting to authenticate; try again\n",
                )
                    .into_response();
            }
        },
        _ => None,
    };
    ws.max_message_size(MAX_FRAME)
        .max_frame_size(MAX_FRAME)
        .read_buffer_size(READ_BUFFER)
        .on_upgrade(move |socket| connected(ctx, socket, pre, slot))
}

/// Authenticates an upgraded socket that has not yet, then hands it to a session.
async fn connected(
    ctx: Arc<WsContext>,
    socket: WebSocket,
    pre: PreAuth,
    unauthenticated: Option<OwnedSemaphorePermit>,
) {
    let (mut sink, mut stream) = socket.split();
    match pre {
        PreAuth::Valid => {}
        PreAuth::Invalid => {
            close_now(&mut sink, CLOSE_UNAUTHORIZED, "invalid token").await;
            return;
        }
        PreAuth::Pending => {
            let first = tokio::time::timeout(ctx.auth_timeout, stream.next()).await;
            let refused = match first {
                Err(_) => Some((CLOSE_UNAUTHORIZED, "authentication timed out".to_owned())),
                Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return,
                Ok(Some(Ok(Message::Text(text)))) => match frames::parse(text.as_str()) {
                    Ok(ClientMsg::Auth { token }) if ctx.token.matches(&token) => None,
                    Ok(ClientMsg::Auth { .. }) => {
                        Some((CLOSE_UNAUTHORIZED, "invalid token".to_owned()))
                    }
                    Ok(_) => Some((
                        CLOSE_UNAUTHORIZED,
                        "authenticate first: {\"type\":\"auth\",\"token\":...}".to_owned(),
                    )),
                    Err(e) => Some((CLOSE_PROTOCOL_ERROR, e.to_string())),
                },
                Ok(Some(Ok(_))) => Some((
                    CLOSE_PROTOCOL_ERROR,
                    "expected a text frame {\"type\":\"auth\",...}".to_owned(),
                )),
            };
            if let Some((code, reason)) = refused {
                tracing::info!(code, %reason, "WebSocket refused");
                close_now(&mut sink, code, &reason).await;
                return;
            }
        }
    }
    drop(unauthenticated);
    session::serve(ctx, sink, stream).await;
}
