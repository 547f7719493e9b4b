//! The D-Bus side: connecting to the chosen bus (with backoff, since the agent may start before
//! dbus or outlive a restart of it), and knowing which well-known name each unique name owns:
//! signals carry only the unique sender (`:1.7`), users think in well-known names.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use zbus::Connection;

/// Messages zbus may hold on the monitor connection before it stops reading the socket (then
/// dbus-daemon holds them, within its own limits). zbus counts messages, not bytes, and a message
/// may be 32 MiB on a default system bus, so this stays small (8 × 32 MiB in the worst case, a
/// message or two in practice): the signal reader drains it at once, checking only sizes, and
/// its own queue is bounded in bytes. (`cbus-bench signals`, debug build: 300,000 signals are
/// forwarded at the rate the former 65,536 slots gave.)
pub const MONITOR_QUEUE: usize = 8;

/// Whether the agent is connected to its bus, as the name-owner tracker sees it: its connection
/// lives as long as the bus does and notices a restart at once (its signal stream ends), while
/// the request server's connection is opened lazily and would report only when a request comes.
/// One writer (the tracker), readers in presence (`bus_connected` in every heartbeat) and the
/// `cbus_agent_bus_connected` gauge, which is set here and nowhere else.
#[derive(Clone)]
pub struct BusLink {
    state: Arc<tokio::sync::watch::Sender<bool>>,
    gauge: prometheus::IntGauge,
}

impl BusLink {
    pub fn new(gauge: prometheus::IntGauge) -> Self {
        gauge.set(0);
        BusLink {
            state: Arc::new(tokio::sync::watch::Sender::new(false)),
            gauge,
        }
    }

    pub fn set(&self, up: bool) {
        self.gauge.set(i64::from(up));
        self.state.send_replace(up);
    }

    pub fn is_up(&self) -> bool {
        *self.state.borrow()
    }

    /// Waits until connected, at most `patience`; says whether it is.
    pub async fn wait_up(&self, patience: Duration) -> bool {
        let mut rx = self.state.subscribe();
        tokio::time::timeout(patience, rx.wait_for(|up| *up))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

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

    /// A new connection; `monitor` connections get a short zbus queue ([`MONITOR_QUEUE`]).
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
            builder.max_queued(MONITOR_QUEUE)
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

/// unique name -> every well-known name it owns.
///
/// A connection may own several names (systemd owns `org.freedesktop.systemd1` and nothing else,
/// but a service may own a name per API it offers), and consumers decide whom to trust by name
/// (`headers::sender_owns`), so all of them are kept, not the last one seen.
#[derive(Clone, Default)]
pub struct NameOwners {
    inner: Arc<RwLock<HashMap<String, BTreeSet<String>>>>,
}

impl NameOwners {
    /// The well-known names `unique` owns, sorted; empty when none (or unknown).
    pub fn well_known(&self, unique: &str) -> Vec<String> {
        self.inner
            .read()
            .ok()
            .and_then(|m| m.get(unique).map(|names| names.iter().cloned().collect()))
            .unwrap_or_default()
    }

    fn add(&self, unique: &str, name: &str) {
        if let Ok(mut m) = self.inner.write() {
            m.entry(unique.to_owned())
                .or_default()
                .insert(name.to_owned());
        }
    }

    /// Forgets `name` wherever it is (a name has one owner at a time).
    fn remove_name(&self, name: &str) {
        if let Ok(mut m) = self.inner.write() {
            m.retain(|_, names| {
                names.remove(name);
                !names.is_empty()
            });
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

    /// Applies one NameOwnerChanged(name, old, new); returns whether `name` is a well-known name
    /// whose owner changed (its cached introspection is then stale).
    fn apply(&self, name: &str, new_owner: &str) -> bool {
        if name.starts_with(':') {
            // A unique name is never reused: it only ever goes away.
            if new_owner.is_empty() {
                self.remove_unique(name);
            }
            return false;
        }
        self.remove_name(name);
        if !new_owner.is_empty() {
            self.add(new_owner, name);
        }
        true
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
                self.add(owner.as_str(), name.as_str());
            }
        }
        while let Some(item) = changes.next().await {
            let msg = item?;
            let Ok((name, _old, new_owner)) = msg.body().deserialize::<(String, String, String)>()
            else {
                continue;
            };
            let unique_gone = name.starts_with(':') && new_owner.is_empty();
            if self.apply(&name, &new_owner) || unique_gone {
                on_change(&name);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_connection_owns_several_names() {
        let o = NameOwners::default();
        o.apply("org.b", ":1.5");
        o.apply("org.a", ":1.5");
        o.apply("org.c", ":1.6");
        assert_eq!(o.well_known(":1.5"), ["org.a", "org.b"]);
        // org.b moves to another connection: only that name leaves :1.5.
        o.apply("org.b", ":1.6");
        assert_eq!(o.well_known(":1.5"), ["org.a"]);
        assert_eq!(o.well_known(":1.6"), ["org.b", "org.c"]);
        // Released: gone, and an owner with no names left is forgotten.
        o.apply("org.a", "");
        assert!(o.well_known(":1.5").is_empty());
        assert!(o.inner.read().unwrap().get(":1.5").is_none());
        o.apply(":1.6", "");
        assert!(o.well_known(":1.6").is_empty());
    }
}
