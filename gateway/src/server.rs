//! The HTTP server: accept loops and connections, with limits that keep the gateway reachable.
//!
//! `axum::serve` has no header-read timeout and no connection cap, and the gateway started with
//! systemd's default of 1,024 open files: 1,100 idle TCP connections that never sent a request
//! made it unreachable (accept failed with EMFILE while they waited for ever). So:
//! - the soft `RLIMIT_NOFILE` is raised to the hard limit at start ([`raise_nofile_limit`]; the
//!   unit files set `LimitNOFILE=65536`);
//! - at most `--max-connections` connections are open at once; one over the cap is accepted
//!   and closed at once, and counted (`cbus_gateway_dropped_total{reason="connection_limit"}`),
//!   so the backlog never fills with connections nobody will serve;
//! - a connection must send a request's headers within `--header-timeout` (also between
//!   requests on a kept-alive connection), or it is closed: idle sockets free their slot.
//!
//! A connection's slot travels with its socket ([`Counted`]), so an upgraded WebSocket keeps
//! counting until it closes.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::stats::{self, Dropped};

/// Raises the soft limit of open files to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(lim.rlim_cur)
}

/// The connection slots.
#[derive(Clone)]
pub struct ConnLimit(Arc<Semaphore>);

/// One open connection's slot; frees it when dropped.
pub struct Slot(#[allow(dead_code)] OwnedSemaphorePermit);

impl Drop for Slot {
    fn drop(&mut self) {
        stats::connection_closed();
    }
}

impl ConnLimit {
    pub fn new(max: usize) -> ConnLimit {
        ConnLimit(Arc::new(Semaphore::new(max.max(1))))
    }

    /// A slot, or `None` (counted) when all are taken.
    pub fn admit(&self) -> Option<Slot> {
        match self.0.clone().try_acquire_owned() {
            Ok(p) => {
                stats::connection_opened();
                Some(Slot(p))
            }
            Err(_) => {
                stats::dropped(Dropped::ConnectionLimit);
                None
            }
        }
    }
}

/// A socket with its connection slot.
pub struct Counted<I> {
    io: I,
    _slot: Slot,
}

impl<I> Counted<I> {
    pub fn new(io: I, slot: Slot) -> Self {
        Counted { io, _slot: slot }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Counted<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Counted<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepts TCP connections up to the cap; each gets `on_accept` (plain HTTP serves it, TLS
/// hands it to a handshake task).
pub async fn accept_loop(
    listener: TcpListener,
    limit: ConnLimit,
    mut shutdown: watch::Receiver<bool>,
    mut on_accept: impl FnMut(Counted<tokio::net::TcpStream>),
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (tcp, _addr) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning; connections that close
                // (header timeout) free descriptors.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = limit.admit() else {
            tracing::debug!("connection over --max-connections closed");
            drop(tcp);
            continue;
        };
        // Deltas are small frames: without TCP_NODELAY, Nagle holds one back while an earlier
        // one is unacknowledged, and the client's delayed ACK makes that up to 40 ms.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        on_accept(Counted::new(tcp, slot));
    }
}

/// Serves HTTP/1.1 (with upgrades, for WebSockets) on one connection until it closes or the
/// gateway shuts down.
pub fn spawn_connection<I>(
    io: I,
    app: axum::Router,
    header_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let svc = TowerToHyperService::new(app);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout);
        let conn = builder
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended");
                }
            }
            _ = shutdown.changed() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
            }
        }
    });
}
