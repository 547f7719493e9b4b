//! cbus-gateway over TLS (rustls): with a certificate generated at start (`--self-signed`) and
//! with PEM files (`--tls-cert/--tls-key`), checked by curl.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cbus_tests::{bin_path, free_port, NatsServer};

struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(nats: &NatsServer, port: u16, extra: &[&str]) -> Proc {
    let child = Command::new(bin_path("cbus-gateway"))
        .args(["--nats-url", &nats.url(), "--token", "t"])
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("start cbus-gateway");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "gateway did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    Proc(child)
}

fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5"])
        .args(args)
        .output()
        .expect("run curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn self_signed_and_pem_files() {
    let nats = NatsServer::start();

    let port = free_port();
    let _gw = start(&nats, port, &["--self-signed"]);
    let url = format!("https://127.0.0.1:{port}/healthz");
    let (ok, body) = curl(&["-k", &url]);
    assert!(ok && body == "ok\n", "{body}");
    // Unverified, the self-signed certificate is refused; plain HTTP gets no answer.
    assert!(!curl(&[&url]).0);
    assert!(!curl(&[&format!("http://127.0.0.1:{port}/healthz")]).0);
    let (ok, page) = curl(&["-k", &format!("https://127.0.0.1:{port}/")]);
    assert!(ok && page.contains("cbus"), "dashboard over TLS");

    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("run openssl");
    assert!(status.success());
    let port = free_port();
    let cert_s = cert.to_string_lossy().into_owned();
    let key_s = key.to_string_lossy().into_owned();
    let _gw2 = start(&nats, port, &["--tls-cert", &cert_s, "--tls-key", &key_s]);
    // Verified against the certificate itself, by name.
    let (ok, body) = curl(&[
        "--cacert",
        &cert_s,
        "--resolve",
        &format!("localhost:{port}:127.0.0.1"),
        &format!("https://localhost:{port}/healthz"),
    ]);
    assert!(ok && body == "ok\n", "{body}");

    // A missing key file is a clear start-up error.
    let out = Command::new(bin_path("cbus-gateway"))
        .args(["--nats-url", &nats.url(), "--token", "t", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(["--tls-cert", &cert_s, "--tls-key", "/nonexistent.pem"])
        .output()
        .expect("run gateway");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent.pem"), "{err}");
}
