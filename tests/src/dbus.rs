//! A private `dbus-daemon` on a temp unix socket, and our test service on it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::bins::bin_path;
use crate::util::terminate;

/// A private bus that allows everything (including eavesdropping, so BecomeMonitor works).
pub struct PrivateBus {
    address: String,
    child: Child,
    dir: PathBuf,
    /// The bus's own temp dir, unless it was started in a given one.
    _temp: Option<tempfile::TempDir>,
}

/// The bus's configuration: listening on `listen`, allowing everything, with `extra` inside
/// `<busconfig>`.
fn bus_config(listen: &str, extra: &str) -> String {
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>{listen}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
    <allow user="*"/>
  </policy>
  <limit name="max_match_rules_per_connection">100000</limit>
  {extra}
</busconfig>
"#
    )
}

impl PrivateBus {
    pub fn start() -> PrivateBus {
        Self::start_with("")
    }

    /// Starts a bus with more configuration: `extra` is inserted into `<busconfig>`, e.g.
    /// `<limit name="max_message_size">...</limit>` or a `<servicedir>` for bus activation.
    pub fn start_with(extra: &str) -> PrivateBus {
        let temp = tempfile::tempdir().expect("tempdir for dbus-daemon");
        let listen = format!("unix:dir={}", temp.path().display());
        let (child, address) = spawn(temp.path(), &bus_config(&listen, extra));
        PrivateBus {
            address,
            child,
            dir: temp.path().to_owned(),
            _temp: Some(temp),
        }
    }

    /// Starts a bus on the fixed socket `dir/bus.sock`, so that a bus started again in `dir`
    /// has the same address (`unix:path=…`, without the daemon's guid).
    pub fn start_in(dir: &Path) -> PrivateBus {
        let socket = dir.join("bus.sock");
        let _ = std::fs::remove_file(&socket);
        let listen = format!("unix:path={}", socket.display());
        let (child, _) = spawn(dir, &bus_config(&listen, ""));
        PrivateBus {
            address: listen,
            child,
            dir: dir.to_owned(),
            _temp: None,
        }
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// A directory of the bus's own, for files a test puts next to it (service files…).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A zbus connection to this bus.
    pub async fn connect(&self) -> zbus::Connection {
        zbus::connection::Builder::address(self.address.as_str())
            .expect("bus address")
            .build()
            .await
            .expect("connect to private bus")
    }
}

/// Starts `dbus-daemon` with `config` (written into `dir`); its child and printed address.
fn spawn(dir: &Path, config: &str) -> (Child, String) {
    let path = dir.join("bus.conf");
    std::fs::write(&path, config).expect("write bus config");
    let mut child = Command::new("dbus-daemon")
        .arg(format!("--config-file={}", path.display()))
        .args(["--nofork", "--print-address=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start dbus-daemon (apt-get install dbus)");
    let stdout = child.stdout.take().expect("dbus-daemon stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read dbus-daemon address");
    let address = line.trim().to_owned();
    assert!(!address.is_empty(), "dbus-daemon printed no address");
    (child, address)
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(2));
    }
}

/// `cbus-test-service` serving `org.cbus.Test` on a bus; killed on drop.
pub struct TestService {
    child: Child,
}

impl TestService {
    pub const NAME: &'static str = "org.cbus.Test";
    pub const PATH: &'static str = "/org/cbus/Test";
    pub const IFACE: &'static str = "org.cbus.Test1";

    /// The service's process id (to freeze it: a D-Bus service that hangs).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts the service and waits until it owns its name.
    pub fn start(address: &str) -> TestService {
        Self::start_named(address, Self::NAME)
    }

    pub fn start_named(address: &str, name: &str) -> TestService {
        let mut child = Command::new(bin_path("cbus-test-service"))
            .args(["--address", address, "--name", name])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start cbus-test-service");
        let stdout = child.stdout.take().expect("test service stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read test service output");
        assert_eq!(line.trim(), "READY", "test service did not start");
        TestService { child }
    }
}

impl Drop for TestService {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(2));
    }
}
