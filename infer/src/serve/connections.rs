//! The server's connections: an accept loop that keeps at most `max_connections` open, HTTP/1.1
//! on each with a header read timeout (which also ends idle keep-alive connections) and
//! half-closed clients answered, and a shutdown that closes every connection once the grace
//! period is over, whatever state its request is in.
//!
//! A client that shuts its sending side and one that has gone look the same to the server: both
//! are an end of file after a whole request. A half-closed client is still answered, so the end
//! of file alone cannot cancel its request; instead, while its answer is not yet being written,
//! the connection writes an interim `100 Continue` every [`PROBE_EVERY`], which every HTTP/1.1
//! client skips (RFC 9110, 15.2). A client that has gone answers the probe with a reset, the
//! next probe fails, and the connection is dropped with its request: work for it stops at the
//! engine's next step, as for a stream whose client has left.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::{Extension, Router};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use super::App;

/// How the server treats connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Most time a request's headers may take, counted from the connection's opening or the
    /// end of its previous answer: so also how long an idle keep-alive connection is kept.
    pub header_timeout: Duration,
    /// Most time a request's body may take once its headers have arrived.
    pub body_timeout: Duration,
    /// Most connections open at once; further ones wait, unaccepted, in the listen backlog.
    pub max_connections: usize,
    /// How long running requests get to finish after the shutdown signal.
    pub shutdown_grace: Duration,
}

/// Defaults: `huginn serve`'s.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
pub const BODY_TIMEOUT: Duration = Duration::from_secs(60);
pub const MAX_CONNECTIONS: usize = 1024;
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Descriptors kept for everything but connections: the listener, the model's and tokenizer's
/// files while they load, the log, the runtime's own.
pub const DESCRIPTOR_HEADROOM: usize = 64;

/// After the grace period running requests are cancelled; this long later, connections still
/// open (their answers' last chunks unsent, or a client that never sent a whole request) are
/// closed.
const CANCELLED_FLUSH: Duration = Duration::from_secs(1);

/// How often a client that has sent its whole request and closed its side is asked whether it
/// is still there, until its answer is written.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The probe: an interim response that carries nothing.
const PROBE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_timeout: HEADER_TIMEOUT,
            body_timeout: BODY_TIMEOUT,
            max_connections: MAX_CONNECTIONS.min(most_connections()).max(1),
            shutdown_grace: SHUTDOWN_GRACE,
        }
    }
}

/// The most connections the process's descriptor limit (`RLIMIT_NOFILE`, soft) leaves room
/// for besides [`DESCRIPTOR_HEADROOM`]; 0 when it leaves none.
pub fn most_connections() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    let descriptors = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
    } else {
        // Unreadable: the traditional default.
        1024
    };
    descriptors.saturating_sub(DESCRIPTOR_HEADROOM)
}

/// How long a request's body may take; the handler reads it from the request's extensions
/// (absent when the router is called without a connection, as in tests).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyTimeout(pub Duration);

/// Serves `router` over `listener` until `shutdown` resolves; then stops accepting, lets
/// running requests finish for up to the grace period, cancels what is left, and closes every
/// connection still open a moment later.
pub(crate) async fn run(
    listener: TcpListener,
    app: Arc<App>,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: ConnectionLimits,
) -> std::io::Result<()> {
    let service = TowerToHyperService::new(router.layer(Extension(BodyTimeout(limits.body_timeout))));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // A client may shut its sending side once its request is out and still read the answer.
        .half_close(true);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (close_all, close) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let tcp = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of descriptors or memory, or a connection reset before it was
                    // accepted: wait a little rather than spin.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Tokens are small writes: without TCP_NODELAY, Nagle's algorithm holds each one back
        // until the previous is acknowledged (tens of milliseconds with delayed ACKs).
        let _ = tcp.set_nodelay(true);
        let socket = Socket::new(tcp);
        let gone = socket.client_gone();
        let connection = http.serve_connection(TokioIo::new(socket), service.clone());
        let mut close = close.clone();
        connections.spawn(async move {
            let _permit = permit;
            let closing = async move {
                let _ = close.wait_for(|&closing| closing).await;
            };
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                // Dropping the connection drops its request, whose work then stops.
                () = gone => return,
                () = closing => {}
            }
            // Answers the request in progress, then closes; an idle connection closes now.
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        });
    }
    drop(listener);
    let grace = limits.shutdown_grace;
    tracing::info!("shutting down: finishing running requests (at most {grace:?})");
    app.draining.store(true, Ordering::Release);
    let _ = close_all.send(true);
    if tokio::time::timeout(grace, every(&mut connections)).await.is_err() {
        app.engine.cancel_all();
        if tokio::time::timeout(CANCELLED_FLUSH, every(&mut connections))
            .await
            .is_err()
        {
            tracing::info!("closing {} connections still open", connections.len());
            connections.shutdown().await;
        }
    }
    // Nothing is left to answer: what the engine still holds ends now.
    app.engine.cancel_all();
    Ok(())
}

/// Waits for every connection to end.
async fn every(connections: &mut JoinSet<()>) {
    while connections.join_next().await.is_some() {}
}

/// A connection's socket, shared between hyper and the probe that asks a half-closed client
/// whether it is still there.
struct Socket {
    tcp: Arc<TcpStream>,
    state: Arc<SocketState>,
}

#[derive(Default)]
struct SocketState {
    /// hyper has written since it last read: an answer is on its way (or done), and a probe
    /// could land inside it. hyper reads a client's next request only once its answer to the
    /// one before is whole, so a read means no answer is being written.
    written: AtomicBool,
    /// hyper's writes and the probe's never interleave.
    writing: Mutex<()>,
}

impl Socket {
    fn new(tcp: TcpStream) -> Self {
        Self {
            tcp: Arc::new(tcp),
            state: Arc::default(),
        }
    }

    /// Resolves when the client is known to have gone: it closed its side, and then a probe
    /// written while no answer was being written failed. (hyper itself does not read a
    /// half-closed connection while it answers, so the end of file is looked for here, by
    /// peeking.)
    fn client_gone(&self) -> impl Future<Output = ()> + Send + 'static {
        let (tcp, state) = (self.tcp.clone(), self.state.clone());
        async move {
            let mut byte = [0u8; 1];
            loop {
                match tcp.peek(&mut byte).await {
                    Ok(0) => break,
                    // A next request waits for hyper to read it: look again later.
                    Ok(_) => tokio::time::sleep(PROBE_EVERY).await,
                    Err(_) => return,
                }
            }
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                match probe(&tcp, &state) {
                    Probe::Sent => {}
                    // The answer's own writes tell a gone client from now on.
                    Probe::Answering => return std::future::pending().await,
                    Probe::Gone => return,
                }
            }
        }
    }

    fn lock_writes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.state
            .writing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What one probe found.
enum Probe {
    /// Written (or the send buffer was full with nothing being answered: tried next time).
    Sent,
    /// hyper is writing the answer: no probe may land inside it.
    Answering,
    /// Reset, broken pipe, or a torn probe the stream cannot recover from.
    Gone,
}

/// Writes one probe unless an answer is being written.
fn probe(tcp: &TcpStream, state: &SocketState) -> Probe {
    let _writing = state.writing.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if state.written.load(Ordering::Acquire) {
        return Probe::Answering;
    }
    match tcp.try_write(PROBE) {
        Ok(n) if n == PROBE.len() => Probe::Sent,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Probe::Sent,
        _ => Probe::Gone,
    }
}

impl AsyncRead for Socket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            match self.tcp.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    if n > 0 {
                        self.state.written.store(false, Ordering::Release);
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            let _writing = self.lock_writes();
            self.state.written.store(true, Ordering::Release);
            match self.tcp.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                written => return Poll::Ready(written),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Writes go straight to the socket.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.tcp).shutdown(std::net::Shutdown::Write))
    }
}
