//! Optional TLS for the dashboard, `/ws` and `/metrics` (rustls with ring, the provider the NATS
//! client already links, so no second crypto library).
//!
//! [`serve`] runs each handshake in its own task with a deadline, so one slow or malicious
//! client cannot hold up the accept loop; connections in a handshake count against
//! `--max-connections` like any other ([`crate::server`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::server::{accept_loop, spawn_connection, ConnLimit};

/// A handshake that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {message}")]
    Pem { path: String, message: String },
    #[error("{0} holds no certificate")]
    NoCertificate(String),
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

/// A server configuration from PEM files.
pub fn from_files(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, TlsError> {
    let pem_err = |path: &Path, e: rustls::pki_types::pem::Error| TlsError::Pem {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem_err(cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(cert, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert.display().to_string()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e))?;
    config(certs, key)
}

/// A self-signed certificate for `names` (plus localhost and 127.0.0.1). Returns the
/// configuration and the certificate's PEM, for clients to pin.
pub fn self_signed(names: &[String]) -> Result<(rustls::ServerConfig, String), TlsError> {
    let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    sans.extend(names.iter().cloned());
    let cert =
        rcgen::generate_simple_self_signed(sans).map_err(|e| TlsError::Generate(e.to_string()))?;
    let pem = cert.cert.pem();
    let der = cert.cert.der().clone();
    let key = PrivateKeyDer::try_from(cert.signing_key.serialize_der())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    Ok((config(vec![der], key)?, pem))
}

fn config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Accepts connections (up to the cap), runs their handshakes, and serves HTTP on them.
pub async fn serve(
    tcp: TcpListener,
    config: rustls::ServerConfig,
    limit: ConnLimit,
    app: axum::Router,
    header_timeout: Duration,
    shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let conn_shutdown = shutdown.clone();
    accept_loop(tcp, limit, shutdown, move |stream| {
        let acceptor = acceptor.clone();
        let app = app.clone();
        let shutdown = conn_shutdown.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => spawn_connection(tls, app, header_timeout, shutdown),
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        });
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_and_files() {
        let (_, pem) = self_signed(&["gw.example".into()]).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let dir = std::env::temp_dir().join(format!("cbus-gw-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        std::fs::write(dir.join("c.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.join("k.pem"), cert.signing_key.serialize_pem()).unwrap();
        assert!(from_files(&dir.join("c.pem"), &dir.join("k.pem")).is_ok());
        assert!(matches!(
            from_files(&dir.join("k.pem"), &dir.join("k.pem")),
            Err(TlsError::NoCertificate(_))
        ));
        assert!(from_files(&dir.join("nope"), &dir.join("k.pem")).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
