//! Where the dev fleet lives and which ports and names it uses, from `CBUS_DEV_*`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// The dev fleet's settings (all environment variables are optional).
pub struct Settings {
    /// State: nats config and data, secrets, the state file (`CBUS_DEV_DIR`, default `.dev`).
    pub dir: PathBuf,
    /// Machine overlays (`CBUS_DEV_MACHINES`; default: `$CBUS_DEV_DIR/machines`, or
    /// `/var/tmp/cbus-dev-<hash>` when that is on overlayfs itself).
    pub machines: PathBuf,
    pub nats_port: u16,
    pub gateway_port: u16,
    /// Machine and demo unit name prefix (`cbus`: `cbus-1`, `cbus-demo-web`).
    pub prefix: String,
    pub boot_timeout: Duration,
    /// Where cbus, cbus-agent and cbus-gateway are: next to this binary (target/<profile>).
    pub bin: PathBuf,
}

fn var<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v
            .parse()
            .ok()
            .with_context(|| format!("{name}={v} is not valid")),
        _ => Ok(default),
    }
}

impl Settings {
    pub fn from_env() -> Result<Settings> {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("tests/ is in the repository")
            .to_path_buf();
        let dir =
            std::path::absolute(var("CBUS_DEV_DIR", repo.join(".dev"))?).context("CBUS_DEV_DIR")?;
        let machines = match std::env::var_os("CBUS_DEV_MACHINES").filter(|v| !v.is_empty()) {
            Some(m) => std::path::absolute(PathBuf::from(m)).context("CBUS_DEV_MACHINES")?,
            // An overlay's upperdir cannot be on overlayfs: keep the overlays outside, one dir
            // per state dir.
            None if on_overlayfs(&dir) => PathBuf::from(format!(
                "/var/tmp/cbus-dev-{:x}",
                fnv1a(dir.to_string_lossy().as_bytes())
            )),
            None => dir.join("machines"),
        };
        let bin = std::env::current_exe()
            .context("where is cbus-dev")?
            .parent()
            .context("cbus-dev has a directory")?
            .to_path_buf();
        Ok(Settings {
            dir,
            machines,
            nats_port: var("CBUS_DEV_NATS_PORT", 4222)?,
            gateway_port: var("CBUS_DEV_GATEWAY_PORT", 9850)?,
            prefix: var("CBUS_DEV_PREFIX", "cbus".to_owned())?,
            boot_timeout: Duration::from_secs(var("CBUS_DEV_BOOT_TIMEOUT", 60)?),
            bin,
        })
    }

    /// The hub's first node: where the CLI, the gateway and hub machines connect first.
    pub fn nats_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.nats_port)
    }

    /// A port `offset` above `CBUS_DEV_NATS_PORT` (the other nodes' client, route and leaf
    /// ports), or why there is none.
    pub fn port_above(&self, offset: u32) -> Result<u16> {
        u16::try_from(u32::from(self.nats_port) + offset)
            .ok()
            .with_context(|| {
                format!(
                    "CBUS_DEV_NATS_PORT={} leaves no room for port +{offset}",
                    self.nats_port
                )
            })
    }

    /// The config of nats-server `node`: the hub's first node keeps the one-server name.
    pub fn node_conf(&self, node: Node) -> PathBuf {
        self.dir.join(match node {
            Node::Hub(0) => "nats/nats.conf".to_owned(),
            Node::Hub(i) => format!("nats/hub-{i}.conf"),
            Node::Site(j) => format!("nats/site-{j}.conf"),
        })
    }

    pub fn node_log(&self, node: Node) -> PathBuf {
        self.dir.join(match node {
            Node::Hub(0) => "nats/log".to_owned(),
            Node::Hub(i) => format!("nats/hub-{i}.log"),
            Node::Site(j) => format!("nats/site-{j}.log"),
        })
    }

    pub fn nats_conf(&self) -> PathBuf {
        self.node_conf(Node::Hub(0))
    }

    pub fn nats_log(&self) -> PathBuf {
        self.node_log(Node::Hub(0))
    }

    pub fn gateway_log(&self) -> PathBuf {
        self.dir.join("gateway/log")
    }

    pub fn token_file(&self) -> PathBuf {
        self.dir.join("gateway.token")
    }

    pub fn have_bins(&self) -> bool {
        ["cbus-agent", "cbus", "cbus-gateway"]
            .iter()
            .all(|b| self.bin.join(b).is_file())
    }

    /// The overlays cannot live where the upper dir would be on overlayfs.
    pub fn check_machines_dir(&self) -> Result<()> {
        if on_overlayfs(&self.machines) {
            bail!(
                "{} is on overlayfs, which cannot hold an overlay's upper dir; set CBUS_DEV_MACHINES to a dir on a real filesystem (e.g. /var/tmp/cbus-dev)",
                self.machines.display()
            );
        }
        Ok(())
    }

    /// A random secret kept in the state dir (created on first use, readable by root only).
    pub fn secret(&self, name: &str) -> Result<String> {
        let path = self.dir.join(name);
        if let Ok(s) = cbus_tests::devfleet::secret(&self.dir, name) {
            if !s.is_empty() {
                return Ok(s);
            }
        }
        let mut bytes = [0u8; 24];
        use std::io::Read as _;
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .context("read /dev/urandom")?;
        // Letters and digits only: the secret goes into a nats config and shell exports as is.
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let s: String = bytes
            .iter()
            .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
            .collect();
        write_private(&path, &s)?;
        Ok(s)
    }
}

/// One nats-server of the fleet: node `i` of the hub's cluster (from 0), or site `j`'s leaf
/// (from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    Hub(u32),
    Site(u32),
}

/// How many nats-servers the fleet runs: `cluster` routed hub nodes with clustered JetStream
/// (`./dev up --cluster N`, 1 by default) and `sites` leaf nodes dialling the hub, each with
/// machines of its own (`--sites N`, 0 by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub cluster: u32,
    pub sites: u32,
}

/// The hub's JetStream domain when there are sites: their leaves have no JetStream, so their
/// agents reach the registry as `$JS.hub.API.…` (`cbus-agent --js-domain hub`).
pub const HUB_DOMAIN: &str = "hub";

impl Layout {
    pub const ONE: Layout = Layout {
        cluster: 1,
        sites: 0,
    };

    /// Every node: the hub's, then the sites'.
    pub fn nodes(self) -> impl Iterator<Item = Node> {
        (0..self.cluster)
            .map(Node::Hub)
            .chain((1..=self.sites).map(Node::Site))
    }

    /// The site of machine number `index`: machines go round the hub and the sites in turn
    /// (`up 3 --sites 2`: one machine each).
    pub fn site_of(self, index: u32) -> u32 {
        index.saturating_sub(1) % (self.sites + 1)
    }

    /// Client port of `node`: hub nodes from `CBUS_DEV_NATS_PORT` up, sites from +300.
    pub fn client_port(self, s: &Settings, node: Node) -> Result<u16> {
        match node {
            Node::Hub(0) => Ok(s.nats_port),
            Node::Hub(i) => s.port_above(i),
            Node::Site(j) => s.port_above(300 + j),
        }
    }

    /// Route port of hub node `i` (+100 up).
    pub fn route_port(self, s: &Settings, i: u32) -> Result<u16> {
        s.port_above(100 + i)
    }

    /// Leaf-node port of hub node `i` (+200 up); leaves may dial any node.
    pub fn leaf_port(self, s: &Settings, i: u32) -> Result<u16> {
        s.port_above(200 + i)
    }

    /// Every hub node's client URL.
    pub fn hub_urls(self, s: &Settings) -> Result<Vec<String>> {
        (0..self.cluster)
            .map(|i| {
                Ok(format!(
                    "nats://127.0.0.1:{}",
                    self.client_port(s, Node::Hub(i))?
                ))
            })
            .collect()
    }

    /// The URLs machine `index` at `site` dials: a site machine its leaf; a hub machine every
    /// hub node, the list turned by its number so the agents spread over the nodes.
    pub fn machine_urls(self, s: &Settings, index: u32, site: u32) -> Result<Vec<String>> {
        if site > 0 {
            return Ok(vec![format!(
                "nats://127.0.0.1:{}",
                self.client_port(s, Node::Site(site))?
            )]);
        }
        let mut urls = self.hub_urls(s)?;
        let turn = usize::try_from(index).unwrap_or(0) % urls.len().max(1);
        urls.rotate_left(turn);
        Ok(urls)
    }
}

/// Writes a file only root may read.
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("write {}", path.display()))
}

/// Whether a path, or its nearest existing parent, is on overlayfs.
fn on_overlayfs(path: &Path) -> bool {
    const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
    let mut p = path;
    while !p.exists() {
        match p.parent() {
            Some(parent) => p = parent,
            None => return false,
        }
    }
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes only into the zeroed struct we pass.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == OVERLAYFS_SUPER_MAGIC
    }
}

/// A hash that stays the same across builds (the overlay dir is found again by it).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
