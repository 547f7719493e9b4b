//! The request server's D-Bus connection (opened on first use, dropped when the bus goes away)
//! and calls with or without auto-start.

use std::sync::Arc;
use std::time::Duration;

use cbus_protocol::envelope::{ErrorBody, ErrorCode};
use futures::StreamExt;
use zbus::Connection;

use super::errors::dbus_error;
use super::{RequestServer, Start};

impl RequestServer {
    pub(super) async fn conn(&self) -> Result<Connection, ErrorBody> {
        if let Some(c) = self.conn.read().await.clone() {
            return Ok(c);
        }
        let mut slot = self.conn.write().await;
        if let Some(c) = slot.clone() {
            return Ok(c);
        }
        match self
            .bus
            .connect_with(
                false,
                Some(self.limits.call_timeout + Duration::from_secs(1)),
            )
            .await
        {
            Ok(c) => {
                *slot = Some(c.clone());
                Ok(c)
            }
            Err(e) => Err(ErrorBody::new(
                ErrorCode::Disconnected,
                format!("cannot connect to D-Bus ({:?}): {e}", self.bus),
            )),
        }
    }

    pub(super) async fn dbus_call<B>(
        &self,
        dest: &str,
        path: &str,
        iface: Option<&str>,
        member: &str,
        body: &B,
        start: Start,
    ) -> Result<zbus::Message, ErrorBody>
    where
        B: serde::Serialize + zvariant::DynamicType,
    {
        let conn = self.conn().await?;
        let result = match start {
            Start::Allowed => {
                conn.call_method(Some(dest), path, iface, member, body)
                    .await
            }
            Start::Never => {
                self.call_no_auto_start(&conn, dest, path, iface, member, body)
                    .await
            }
        };
        match result {
            Ok(m) => Ok(m),
            Err(zbus::Error::InputOutput(e)) if e.kind() == std::io::ErrorKind::TimedOut => Err(
                ErrorBody::new(ErrorCode::Timeout, "D-Bus peer did not reply in time"),
            ),
            Err(e @ (zbus::Error::InputOutput(_) | zbus::Error::Handshake(_))) => {
                // The bus went away: reconnect on the next request.
                *self.conn.write().await = None;
                Err(ErrorBody::new(ErrorCode::Disconnected, e.to_string()))
            }
            Err(e) => Err(dbus_error(e)),
        }
    }
    /// A method call with NO_AUTO_START: a destination that is not running answers
    /// ServiceUnknown instead of being started. zbus offers flags only on typed proxy calls,
    /// which do not hand out the reply message, so the call is built and its reply awaited here
    /// (bounded like the connection's own method timeout).
    pub(super) async fn call_no_auto_start<B>(
        &self,
        conn: &Connection,
        dest: &str,
        path: &str,
        iface: Option<&str>,
        member: &str,
        body: &B,
    ) -> zbus::Result<zbus::Message>
    where
        B: serde::Serialize + zvariant::DynamicType,
    {
        let mut builder = zbus::Message::method_call(path, member)?
            .destination(dest)?
            .with_flags(zbus::message::Flags::NoAutoStart)?;
        if let Some(i) = iface {
            builder = builder.interface(i)?;
        }
        let msg = builder.build(body)?;
        let serial = msg.primary_header().serial_num();
        // Listening before sending, so the reply cannot slip by.
        let mut replies = zbus::MessageStream::from(conn);
        conn.send(&msg).await?;
        let wait = async {
            while let Some(m) = replies.next().await {
                let m = m?;
                if m.header().reply_serial() != Some(serial) {
                    continue;
                }
                match m.message_type() {
                    zbus::message::Type::MethodReturn => return Ok(m),
                    zbus::message::Type::Error => return Err(zbus::Error::from(m)),
                    _ => {}
                }
            }
            Err(zbus::Error::InputOutput(Arc::new(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "D-Bus connection closed",
            ))))
        };
        match tokio::time::timeout(self.limits.call_timeout + Duration::from_secs(1), wait).await {
            Ok(r) => r,
            Err(_) => Err(zbus::Error::InputOutput(Arc::new(std::io::Error::from(
                std::io::ErrorKind::TimedOut,
            )))),
        }
    }
}
