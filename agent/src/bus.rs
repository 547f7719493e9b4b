//! The D-Bus side: connecting to the chosen bus (with backoff, since the agent may start before
//! dbus or outlive a restart of it), and knowing which well-known name each unique name owns:
//! signals carry only the unique sender (`:1.7`), users think in well-known names.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use zbus::Connection;

/// Which bus to bridge.
#[derive(Debug, Clone)]
pub enum BusKind {
    System,
    User,
    Address(String),
}

impl BusKind {
    pub fn parse(s: &str) -> Self {
        match s {
            "system" => BusKind::System,
            "user" | "session" => BusKind::User,
            other => BusKind::Address(other.to_owned()),
        }
    }

    /// A new connection; `monitor` connections get a deep queue, since a flood of signals must be
    /// read fast (and counted as drops further on) rather than stall the bus.
    pub async fn connect(&self, monitor: bool) -> zbus::Result<Connection> {
        self.connect_with(monitor, None).await
    }

    /// Like [`BusKind::connect`], with a limit on how long a method call may wait for its reply.
    pub async fn connect_with(
        &self,
        monitor: bool,
        method_timeout: Option<Duration>,
    ) -> zbus::Result<Connection> {
        let builder = match self {
            BusKind::System => zbus::connection::Builder::system()?,
            BusKind::User => zbus::connection::Builder::session()?,
            BusKind::Address(a) => zbus::connection::Builder::address(a.as_str())?,
        };
        let builder = if monitor {
            builder.max_queued(1 << 16)
        } else {
            builder
        };
        let builder = match method_timeout {
            Some(t) => builder.method_timeout(t),
            None => builder,
        };
        builder.build().await
    }

    /// Connects, retrying with exponential backoff (up to 30 s between tries) until it works.
    pub async fn connect_with_backoff(&self, monitor: bool) -> Connection {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.connect(monitor).await {
                Ok(c) => return c,
                Err(e) => {
                    tracing::warn!(bus = ?self, error = %e, retry_in = ?delay, "cannot connect to D-Bus");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

/// unique name -> a well-known name it owns.
#[derive(Clone, Default)]
pub struct NameOwners {
    inner: Arc<RwLock<HashMap<String, String>>>,
}

impl NameOwners {
    pub fn well_known(&self, unique: &str) -> Option<String> {
        self.inner.read().ok()?.get(unique).cloned()
    }

    fn set(&self, unique: String, name: String) {
        if let Ok(mut m) = self.inner.write() {
            m.insert(unique, name);
        }
    }

    fn remove_name(&self, name: &str) {
        if let Ok(mut m) = self.inner.write() {
            m.retain(|_, v| v != name);
        }
    }

    fn remove_unique(&self, unique: &str) {
        if let Ok(mut m) = self.inner.write() {
            m.remove(unique);
        }
    }

    fn clear(&self) {
        if let Ok(mut m) = self.inner.write() {
            m.clear();
        }
    }

    /// Fills the map from ListNames, then follows NameOwnerChanged until the connection ends.
    /// `on_change` is told of every name whose owner changed or that went away (to drop caches).
    pub async fn track(&self, conn: &Connection, on_change: impl Fn(&str)) -> zbus::Result<()> {
        // A plain message stream, not a proxy's signal stream: it ends when the bus goes away,
        // which is how this loop learns to reconnect.
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender("org.freedesktop.DBus")?
            .interface("org.freedesktop.DBus")?
            .member("NameOwnerChanged")?
            .build();
        // Subscribe before listing, so no change falls between the two.
        let mut changes = zbus::MessageStream::for_match_rule(rule, conn, None).await?;
        let dbus = zbus::fdo::DBusProxy::new(conn).await?;
        self.clear();
        for name in dbus.list_names().await? {
            if name.starts_with(':') {
                continue;
            }
            if let Ok(owner) = dbus.get_name_owner(name.as_ref()).await {
                self.set(owner.to_string(), name.to_string());
            }
        }
        while let Some(item) = changes.next().await {
            let msg = item?;
            let Ok((name, _old, new_owner)) = msg.body().deserialize::<(String, String, String)>()
            else {
                continue;
            };
            if name.starts_with(':') {
                // A unique name is never reused: it only ever goes away.
                if new_owner.is_empty() {
                    on_change(&name);
                    self.remove_unique(&name);
                }
                continue;
            }
            on_change(&name);
            self.remove_name(&name);
            if !new_owner.is_empty() {
                self.set(new_owner, name);
            }
        }
        Ok(())
    }
}
