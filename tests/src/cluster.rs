//! Several real nats-servers working as one: a cluster routed on loopback with clustered
//! JetStream, and leaf nodes (sites) that dial a hub, through a [`Link`] a test can cut.
//!
//! Config follows what was checked on nats-server 2.9.10 (shared/design.md, section 8): every
//! node has a `server_name` (clustered JetStream needs one) and lists every node in `routes`
//! (its own entry is ignored); a leaf without JetStream of its own, so JetStream API requests
//! made at a site (agents writing the registry) are answered by the hub's JetStream.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use crate::nats::NatsServer;
use crate::util::free_port;

/// Nodes of one cluster; each is killed on drop.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` routed nodes with JetStream; `extra` is more config for every node (users,
    /// `leafnodes { listen }`...). Returns once JetStream has a meta leader, so a stream with
    /// `n` replicas can be created.
    pub async fn start(n: usize, extra: &str) -> NatsCluster {
        Self::start_with_tls(n, extra, None).await
    }

    /// As [`NatsCluster::start`], the routes over TLS when `tls` is given: every node presents
    /// `tls.cert` and accepts only peers whose certificate `tls.ca` signed.
    pub async fn start_with_tls(n: usize, extra: &str, tls: Option<&TlsFiles>) -> NatsCluster {
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let nodes: Vec<NatsServer> = routes
            .iter()
            .enumerate()
            .map(|(i, port)| {
                NatsServer::start_with_config(&format!(
                    "server_name: n{i}\n{}{extra}\n",
                    cluster_config("cbus-test", *port, &routes, tls)
                ))
            })
            .collect();
        let cluster = NatsCluster { nodes };
        cluster.wait_for_jetstream(Duration::from_secs(30)).await;
        cluster
    }

    /// Every node's client URL, comma-separated, as `--nats-url` takes them.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until JetStream answers on every running node (a meta leader is elected and the
    /// node knows it); panics at `patience`.
    pub async fn wait_for_jetstream(&self, patience: Duration) {
        let deadline = Instant::now() + patience;
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            let client = node.connect().await;
            loop {
                // `$JS.API.INFO` answers with an error until the node has a meta leader.
                let answered = tokio::time::timeout(
                    Duration::from_secs(2),
                    client.request("$JS.API.INFO", "".into()),
                )
                .await;
                let ready = matches!(&answered, Ok(Ok(m))
                    if !String::from_utf8_lossy(&m.payload).contains("\"error\""));
                if ready {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "JetStream did not come up on {}: {answered:?}\n{}",
                    node.url(),
                    node.log()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The `cluster` block of one node routed to every node on loopback: `listen` is this node's
/// route port, `routes` every node's (its own entry is ignored by the server); over mutual TLS
/// when `tls` is given. Shared by the tests' clusters and the dev fleet (`./dev up --cluster N`).
pub fn cluster_config(name: &str, listen: u16, routes: &[u16], tls: Option<&TlsFiles>) -> String {
    let route_list = routes
        .iter()
        .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "cluster {{ name: {name}, listen: \"127.0.0.1:{listen}\", routes: [{route_list}]{} }}\n",
        tls_block(tls)
    )
}

/// A hub's `leafnodes` listener on loopback that admits leaves as `user`/`password`;
/// `advertise` is the address the hub tells leaves to redial (a [`Link`]'s end), if any. With
/// `tls`, leaves must connect over TLS and present a certificate `tls.ca` signed.
pub fn leaf_listen_config(
    port: u16,
    advertise: Option<SocketAddr>,
    user: &str,
    password: &str,
    tls: Option<&TlsFiles>,
) -> String {
    let advertise = advertise
        .map(|a| format!("advertise: \"{a}\", "))
        .unwrap_or_default();
    format!(
        "leafnodes {{ listen: \"127.0.0.1:{port}\", {advertise}authorization {{ user: {user}, password: {password} }}{} }}\n",
        tls_block(tls)
    )
}

/// A leaf's `leafnodes` block dialling the hub at `hubs` (`host:port`, any node of the hub's
/// cluster) as `user`/`password`; with `tls`, over TLS, presenting `tls.cert` and trusting
/// only hubs `tls.ca` signed.
pub fn leaf_remote_config(
    hubs: &[String],
    user: &str,
    password: &str,
    tls: Option<&TlsFiles>,
) -> String {
    let urls = hubs
        .iter()
        .map(|h| format!("\"nats-leaf://{user}:{password}@{h}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "leafnodes {{ remotes: [ {{ urls: [{urls}]{} }} ] }}\n",
        tls_block(tls)
    )
}

/// `, tls { ... }` for a cluster or leafnodes block: this server's certificate and key, the CA
/// its peers' certificates must be signed by, and peer certificates required (`verify`).
fn tls_block(tls: Option<&TlsFiles>) -> String {
    tls.map(|t| {
        format!(
            ", tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true, timeout: 5 }}",
            t.cert.display(),
            t.key.display(),
            t.ca.display()
        )
    })
    .unwrap_or_default()
}

/// A certificate, its key and the CA that signed it, as PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// A private CA made for a test, in a directory the caller owns; it signs certificates for
/// `127.0.0.1` and `localhost` that serve both ends of a TLS connection (server and client).
pub struct TestCa {
    dir: PathBuf,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    /// A new CA; its certificate is written to `dir/ca.pem`.
    pub fn new(dir: &Path) -> TestCa {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = rcgen::CertifiedIssuer::self_signed(params, key).expect("CA certificate");
        std::fs::write(dir.join("ca.pem"), issuer.pem()).expect("write ca.pem");
        TestCa {
            dir: dir.to_owned(),
            issuer,
        }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A certificate for `127.0.0.1` signed by this CA, as `dir/NAME.pem` and `dir/NAME.key`.
    pub fn issue(&self, name: &str) -> TlsFiles {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("params")
            .signed_by(&key, &self.issuer)
            .expect("certificate");
        let files = TlsFiles {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}.key")),
            ca: self.ca_file(),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }
}

/// A TCP relay standing for a site's WAN link: connections made through [`Link::addr`] reach
/// `target` until [`Link::cut`], which closes them and refuses new ones until [`Link::restore`].
/// A real network path that fails, not a stand-in for a NATS part: both ends are real servers.
pub struct Link {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Link {
    pub async fn start(target: SocketAddr) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind link");
        let addr = listener.local_addr().expect("link address");
        let up = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(tokio::sync::watch::Sender::new(0u64));
        let task = tokio::spawn({
            let up = up.clone();
            let generation = generation.clone();
            async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let mut cut = generation.subscribe();
                    tokio::spawn(async move {
                        let Ok(outbound) = TcpStream::connect(target).await else {
                            return;
                        };
                        let (mut a, mut b) = (inbound, outbound);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                            _ = cut.changed() => {}
                        }
                    });
                }
            }
        });
        Link {
            addr,
            up,
            generation,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every connection through the link and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}
