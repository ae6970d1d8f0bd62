//! Accept loop and per-connection serving: HTTP/1.1, h2c prior knowledge or
//! both (`auto`), `max_connections` (accept pauses above it), EMFILE back-off,
//! request header timeout (a request head that started to arrive must be
//! complete in time, else 408 and close: [`HeadClock`]), keep-alive idle
//! timeout, header size limit (431), graceful close on drain
//! (`Connection: close` / GOAWAY), and a bounded lingering close once hyper
//! lets go of the stream (`linger.rs`), so early replies reach clients that
//! are still sending.
//!
//! With `tls:` (see `crate::tls`) each accepted stream is handshaken first:
//! bounded by `handshake_timeout`, with at most `max_handshakes` in progress
//! (accept pauses above it, like `max_connections`, so a flood of half-open
//! TLS connections costs bounded memory and CPU); ALPN picks HTTP/2 or
//! HTTP/1.1; the verified client identity may be added as a header, and any
//! incoming header of that name is always removed first. The listener's
//! certificate rotation task is owned here and stops with the accept loop.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use http::{HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use super::{fast, linger};
use crate::config::watch::FileWatch;
use crate::config::{content_hash, ListenerConfig, ListenerProtocol, ListenerTls};
use crate::proxy::{self, ConnInfo, Shared};
use crate::shutdown::{Phase, PhaseWaker, Shutdown, Tracker};
use crate::tls::{self, Alpn, TlsListener};

/// Runs one listener until the drain reaches `Stopping`.
///
/// The TLS files are loaded before this returns, synchronously at the call
/// site in `start`: a proxy that has started serves the certificate that was
/// there when it started, and the rotation watch compares against exactly it.
pub(crate) fn serve(
    listener: TcpListener,
    cfg: ListenerConfig,
    shared: Arc<Shared>,
    conns: Arc<Tracker>,
) -> impl Future<Output = ()> + Send + 'static {
    let tls = cfg.tls.as_ref().map(|t| {
        Arc::new(TlsListener::new(
            &cfg.name,
            tls_settings(t, cfg.protocol),
            content_hash,
            &shared.metrics,
        ))
    });
    accept_loop(listener, cfg, shared, conns, tls)
}

async fn accept_loop(
    listener: TcpListener,
    cfg: ListenerConfig,
    shared: Arc<Shared>,
    conns: Arc<Tracker>,
    tls: Option<Arc<TlsListener>>,
) {
    let builders = Arc::new(Builders::new(&cfg));
    let gauge = shared
        .metrics
        .connections
        .with_label_values(&[cfg.name.as_str()]);
    let limit = Arc::new(Semaphore::new(cfg.max_connections));
    let stopping = shared.shutdown.clone();
    let stop = stopping.reached(Phase::Stopping);
    tokio::pin!(stop);
    let strip = identity_headers(&shared);
    let handshakes = tls
        .as_ref()
        .map(|t| Arc::new(Semaphore::new(t.max_handshakes())));
    let rotation = tls.as_ref().map(|t| {
        let shutdown = shared.shutdown.clone();
        let stop = async move { shutdown.reached(Phase::Stopping).await };
        let span = tracing::info_span!("tls_rotation", listener = %cfg.name);
        // Against what was loaded: a file replaced between loading and the
        // watch's first look is reported at once instead of missed.
        let watch = FileWatch::spawn_with_baseline(t.paths(), tls::ROTATION_DEBOUNCE, t.baseline());
        Owned(tokio::spawn(t.clone().rotate(watch, stop).instrument(span)))
    });
    let mut backoff = Duration::from_millis(5);
    loop {
        // Take a connection slot first: above max_connections we stop accepting and
        // let the kernel backlog hold new clients.
        let slot = tokio::select! {
            s = limit.clone().acquire_owned() => match s { Ok(s) => s, Err(_) => break },
            _ = &mut stop => break,
        };
        // Likewise for handshakes in progress.
        let handshake = match &handshakes {
            None => None,
            Some(h) => tokio::select! {
                p = h.clone().acquire_owned() => match p { Ok(p) => Some(p), Err(_) => break },
                _ = &mut stop => break,
            },
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut stop => break,
        };
        let (stream, remote) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOMEM: back off instead of spinning on a full fd table.
                if is_resource_error(&e) {
                    tracing::warn!(listener = %cfg.name, error = %e, ?backoff, "accept failed: out of resources, backing off");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                } else {
                    tracing::debug!(listener = %cfg.name, error = %e, "accept failed");
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = Connection {
            shared: shared.clone(),
            builders: builders.clone(),
            protocol: cfg.protocol,
            gauge: gauge.clone(),
            idle: cfg.idle_timeout.0,
            head_timeout: cfg.request_header_timeout.0,
            tracked: conns.track(),
            strip: strip.clone(),
        };
        // Owned by the connection tracker: drain waits for every connection task.
        let fut = match tls.clone() {
            None => Either::Left(async move {
                let _slot = slot;
                let info = Arc::new(ConnInfo::new(remote, false));
                conn.run(stream, info, Alpn::None, None).await;
            }),
            Some(tls) => {
                let name = cfg.name.clone();
                Either::Right(async move {
                    let _slot = slot;
                    serve_tls(conn, tls, stream, remote, handshake, &name).await;
                })
            }
        };
        tokio::spawn(fut);
    }
    tracing::debug!(listener = %cfg.name, "stopped accepting");
    if let Some(r) = rotation {
        r.join("tls rotation").await;
    }
}

/// Handshakes a TLS connection, then serves it. Both are boxed: the
/// handshake state and a TLS stream are several KiB, and plain connections
/// (and TLS ones once handshaken) should not carry their size all their
/// life. What the handshake returns is taken apart inside a block: a local
/// held across an await keeps its space in the task, even once moved from.
async fn serve_tls(
    conn: Connection,
    tls: Arc<TlsListener>,
    stream: tokio::net::TcpStream,
    remote: std::net::SocketAddr,
    handshake: Option<tokio::sync::OwnedSemaphorePermit>,
    name: &str,
) {
    let run = {
        let accepted = Box::pin(tls.accept(stream)).await;
        drop(handshake);
        match accepted {
            Ok(a) => {
                let info = Arc::new(
                    ConnInfo::new(remote, true)
                        .with_identity(a.peer_identity.as_ref().map(|v| v.as_bytes())),
                );
                let identity = match (tls.identity_header(), a.identity) {
                    (Some(h), Some(v)) => Some((h.clone(), v)),
                    _ => None,
                };
                Box::pin(conn.run(a.stream, info, a.alpn, identity))
            }
            Err(e) => {
                tracing::debug!(listener = %name, %remote, error = %e, "TLS handshake did not complete");
                return;
            }
        }
    };
    run.await;
}

/// A task handle aborted if dropped before it is joined (e.g. when the accept
/// loop itself is aborted at the end of a drain).
struct Owned(JoinHandle<()>);

impl Owned {
    async fn join(mut self, what: &str) {
        if let Err(e) = (&mut self.0).await {
            if !e.is_cancelled() {
                tracing::error!(error = %e, task = what, "task failed");
            }
        }
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Every identity header any listener forwards: stripped from requests on
/// all listeners, so an upstream never sees one a client wrote. Listener
/// changes need a restart, so the set is fixed for the life of the process.
fn identity_headers(shared: &Shared) -> Arc<[HeaderName]> {
    let snap = shared.snapshot.load();
    let mut names: Vec<HeaderName> = snap
        .config
        .listeners
        .iter()
        .filter_map(|l| l.tls.as_ref()?.forward_client_identity_header.clone())
        .collect();
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    names.into()
}

/// The listener's `tls:` as the TLS module takes it.
fn tls_settings(t: &ListenerTls, protocol: ListenerProtocol) -> tls::ListenerTlsSettings {
    tls::ListenerTlsSettings {
        files: tls::ListenerTlsFiles {
            cert: t.cert.clone(),
            key: t.key.clone(),
            client_ca: t.client_ca.clone(),
        },
        alpn: match protocol {
            ListenerProtocol::Auto => tls::ListenerAlpn::Both,
            ListenerProtocol::Http1 => tls::ListenerAlpn::Http1,
            ListenerProtocol::Http2 => tls::ListenerAlpn::Http2,
        },
        handshake_timeout: t.handshake_timeout.0,
        max_handshakes: t.max_handshakes,
        identity_header: t.forward_client_identity_header.clone(),
    }
}

/// The config's file watch drives certificate rotation.
impl tls::FileChanges for FileWatch {
    fn changed(&mut self) -> impl Future<Output = Option<()>> + Send {
        FileWatch::changed(self)
    }
}

/// Which HTTP a connection is served with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    /// HTTP/1.1 or h2c prior knowledge, told apart by the first bytes.
    Auto,
    Http1,
    Http2,
}

impl Proto {
    /// ALPN decides when it negotiated something; else the listener's `protocol`.
    fn select(alpn: Alpn, configured: ListenerProtocol) -> Proto {
        match (alpn, configured) {
            (Alpn::H2, _) => Proto::Http2,
            (Alpn::Http11, _) => Proto::Http1,
            (Alpn::None, ListenerProtocol::Auto) => Proto::Auto,
            (Alpn::None, ListenerProtocol::Http1) => Proto::Http1,
            (Alpn::None, ListenerProtocol::Http2) => Proto::Http2,
        }
    }
}

/// The listener's HTTP builders. `auto` connections are told apart here (see
/// [`HeadClock::poll_sniff`]) and then served by one of the two, instead of
/// by hyper-util's auto connection: its future holds the HTTP/2 connection
/// state inline, so every idle HTTP/1.1 connection carried it; here an
/// HTTP/2 connection's state is boxed and only h2 connections pay for it.
struct Builders {
    h1: hyper::server::conn::http1::Builder,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
    /// `max_header_bytes`: the fast path declines a head that outgrows it.
    max_head: usize,
    /// `http1_fast_path`.
    fast: bool,
}

impl Builders {
    fn new(cfg: &ListenerConfig) -> Self {
        let header_list = cfg.max_header_bytes.0.min(u64::from(u32::MAX)) as u32;
        // No `header_read_timeout`: hyper starts it whenever it waits for a
        // head, so it also closed keep-alive connections that were merely
        // idle (after request_header_timeout instead of idle_timeout), and
        // it armed a boxed timer per request. `HeadClock` replaces it.
        let mut h1 = hyper::server::conn::http1::Builder::new();
        h1.max_buf_size(cfg.max_header_bytes.0 as usize)
            .keep_alive(true);
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(header_list)
            .max_concurrent_streams(1024)
            .max_pending_accept_reset_streams(256)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        Builders {
            h1,
            h2,
            max_head: cfg.max_header_bytes.0 as usize,
            fast: cfg.http1_fast_path,
        }
    }
}

fn is_resource_error(e: &io::Error) -> bool {
    // ENFILE, EMFILE, ENOMEM, ENOBUFS
    matches!(e.raw_os_error(), Some(23 | 24 | 12 | 105))
}

/// One client connection.
struct Connection {
    shared: Arc<Shared>,
    builders: Arc<Builders>,
    protocol: ListenerProtocol,
    gauge: IntGauge,
    idle: Duration,
    /// `request_header_timeout`: from a request head's first byte to its end.
    head_timeout: Duration,
    tracked: crate::shutdown::Tracked,
    /// Identity headers removed from every request (see [`identity_headers`]).
    strip: Arc<[HeaderName]>,
}

/// Request activity on a connection, for the idle and request-head timers.
struct Activity {
    start: Instant,
    active: AtomicUsize,
    last_ms: AtomicU64,
    /// Since `start`, when the first byte of a request head arrived while no
    /// request was in progress ([`NO_HEAD`]: none pending; [`HEAD_UNSTAMPED`]:
    /// one arrived, its time not read yet). Cleared when the head is
    /// complete (the request reaches the service).
    head_since_ms: AtomicU64,
    /// HTTP/2: no request-head clock (streams, pings and settings frames
    /// arrive on an idle connection).
    head_clock_off: AtomicBool,
    /// Set by the watcher: the pending head took too long.
    head_timed_out: AtomicBool,
    /// Response bodies hyper still holds (HTTP/1.1: at most one).
    bodies: AtomicUsize,
    /// The last write or flush on the client stream could not complete
    /// (the client is not reading): hyper still has bytes to send.
    write_blocked: AtomicBool,
    /// HTTP/1.1: the connection is parked (see [`Watch::serve_h1`]), or
    /// about to be. While it is set, a shutdown of the stream (hyper's, as
    /// its connection ends) is a no-op, so the stream is taken back from
    /// hyper still open.
    parked: AtomicBool,
}

const NO_HEAD: u64 = u64::MAX;
/// A head's first bytes arrived in the current poll of the connection; see
/// [`Activity::stamp_head`].
const HEAD_UNSTAMPED: u64 = u64::MAX - 1;

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            active: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            head_since_ms: AtomicU64::new(NO_HEAD),
            head_clock_off: AtomicBool::new(false),
            head_timed_out: AtomicBool::new(false),
            bodies: AtomicUsize::new(0),
            write_blocked: AtomicBool::new(false),
            parked: AtomicBool::new(false),
        }
    }

    /// HTTP/1.1 with nothing in progress: no request in the service, no
    /// response body held by hyper, nothing left to write and no request
    /// head started. Checked right after hyper's connection returned
    /// `Pending`, this means hyper is idle, waiting for the next head.
    fn parkable(&self) -> bool {
        self.active.load(Ordering::Relaxed) == 0
            && self.bodies.load(Ordering::Relaxed) == 0
            && !self.write_blocked.load(Ordering::Relaxed)
            && self.head_since_ms.load(Ordering::Relaxed) == NO_HEAD
            && !self.head_timed_out.load(Ordering::Relaxed)
    }

    /// Bytes arrived from the client: starts the head clock if they begin a
    /// request head (no request in progress, none pending). Bytes read while
    /// a request runs (its body, or a pipelined next head) do not; a partial
    /// head left after such a request is then bounded by the idle timeout.
    fn bytes_arrived(&self) {
        if self.active.load(Ordering::Relaxed) == 0
            && self.head_since_ms.load(Ordering::Relaxed) == NO_HEAD
        {
            self.head_since_ms.store(HEAD_UNSTAMPED, Ordering::Relaxed);
        }
    }

    /// Reads the clock for a head whose first bytes arrived in this poll of
    /// the connection, once hyper waits (or the watcher looks): nearly every
    /// head arrives whole in the read that starts it and reaches the
    /// service, which clears it, in the same poll, so the clock is not read
    /// for it at all.
    fn stamp_head(&self) {
        if self.head_since_ms.load(Ordering::Relaxed) == HEAD_UNSTAMPED {
            let since = self.start.elapsed().as_millis() as u64;
            self.head_since_ms.store(since, Ordering::Relaxed);
        }
    }

    /// Notes whether a write or flush on the client stream is left waiting.
    fn wrote<T>(&self, res: Poll<T>) -> Poll<T> {
        self.write_blocked
            .store(res.is_pending(), Ordering::Relaxed);
        res
    }
}

/// The client stream, watched for the start of request heads (see
/// [`Activity::bytes_arrived`]). When the watcher flags a head as too
/// slow, the next read answers `408` and fails, which ends the connection.
/// Replaces hyper's `header_read_timeout` (see [`Builders::new`]).
///
/// When hyper drops it, the stream goes back to the connection task through
/// `back` for a lingering close (see `linger.rs`), unless the client had
/// already closed its side.
struct HeadClock<S> {
    /// `None` only once dropped.
    inner: Option<S>,
    act: Arc<Activity>,
    first_read: bool,
    answered: bool,
    /// A read returned EOF or failed: the client sends nothing more.
    read_done: bool,
    back: Option<oneshot::Sender<S>>,
    /// `auto`: the first bytes, read to tell HTTP/1.1 from the HTTP/2
    /// preface, replayed to hyper before the stream is read again.
    sniffed: [u8; H2_PREFACE.len()],
    sniffed_len: u8,
    replayed: u8,
    /// Bytes hyper had read but not parsed when its connection was parked
    /// (a pipelined head's start), replayed to the next one.
    carry: Bytes,
}

/// What an h2c prior-knowledge client sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl<S> HeadClock<S> {
    fn new(inner: S, act: Arc<Activity>, back: oneshot::Sender<S>) -> Self {
        HeadClock {
            inner: Some(inner),
            act,
            first_read: true,
            answered: false,
            read_done: false,
            back: Some(back),
            sniffed: [0; H2_PREFACE.len()],
            sniffed_len: 0,
            replayed: 0,
            carry: Bytes::new(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> HeadClock<S> {
    /// `auto`: reads until the bytes stop matching the HTTP/2 preface (or
    /// the client closes): `true` for HTTP/2. What was read is replayed to
    /// hyper. Reads go through [`HeadClock::poll_read_stream`] (not
    /// `poll_read`, which would replay what was already sniffed), so the
    /// head clock and the 408 apply to these bytes as to any others. The
    /// preface may arrive in any number of reads.
    fn poll_sniff(&mut self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<bool>> {
        loop {
            let len = usize::from(self.sniffed_len);
            if len == H2_PREFACE.len() {
                // HTTP/2 has no request head to time: however the preface
                // was split, the head clock stops here.
                self.act.head_clock_off.store(true, Ordering::Relaxed);
                return Poll::Ready(Ok(true));
            }
            let mut chunk = [0u8; H2_PREFACE.len()];
            let mut buf = ReadBuf::new(&mut chunk[..H2_PREFACE.len() - len]);
            std::task::ready!(self.poll_read_stream(cx, &mut buf))?;
            let got = buf.filled();
            if got.is_empty() {
                return Poll::Ready(Ok(false));
            }
            self.sniffed[len..len + got.len()].copy_from_slice(got);
            self.sniffed_len = (len + got.len()) as u8;
            if got != &H2_PREFACE[len..len + got.len()] {
                return Poll::Ready(Ok(false));
            }
        }
    }

    /// Parked: waits for the client to send something, or to close. The
    /// first bytes are kept for the next hyper connection (replayed like the
    /// sniffed ones), and they start the head clock as any request bytes
    /// do. `Ready(true)` for bytes or the end of the stream (hyper then sees
    /// it and closes as usual), `Ready(false)` when the read failed.
    fn poll_wake(&mut self, cx: &mut std::task::Context<'_>) -> Poll<bool> {
        if self.replayed < self.sniffed_len || !self.carry.is_empty() {
            return Poll::Ready(true);
        }
        let mut chunk = [0u8; H2_PREFACE.len()];
        let mut buf = ReadBuf::new(&mut chunk);
        match std::task::ready!(self.poll_read_stream(cx, &mut buf)) {
            Ok(()) => {
                let got = buf.filled();
                self.sniffed[..got.len()].copy_from_slice(got);
                self.sniffed_len = got.len() as u8;
                self.replayed = 0;
                Poll::Ready(true)
            }
            Err(_) => Poll::Ready(false),
        }
    }
}

/// Drives [`HeadClock::poll_sniff`] under a [`Watch`]; cancelled (the
/// connection closes) by the drain or the idle timeout, as hyper's own
/// connections are closed gracefully.
struct Sniff<'a, S> {
    io: &'a mut HeadClock<S>,
    cancelled: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Future for Sniff<'_, S> {
    type Output = io::Result<bool>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if this.cancelled {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "closed before the first request",
            )));
        }
        this.io.poll_sniff(cx)
    }
}

impl<S> Drop for HeadClock<S> {
    fn drop(&mut self) {
        if self.read_done {
            return;
        }
        if let (Some(inner), Some(back)) = (self.inner.take(), self.back.take()) {
            // Err: the connection task no longer waits (an upgraded
            // connection ends after its task); the stream just closes.
            let _ = back.send(inner);
        }
    }
}

fn dropped() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "client stream handed back")
}

const REQUEST_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for HeadClock<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replayed < this.sniffed_len {
            let rest = &this.sniffed[usize::from(this.replayed)..usize::from(this.sniffed_len)];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n as u8;
            // What has arrived since goes into the same read: hyper grows
            // (doubles) its read buffer when a read leaves a partial head in
            // it, and the replayed bytes alone are one.
            if buf.remaining() > 0 && this.carry.is_empty() {
                let _ = this.poll_read_stream(cx, buf);
            }
            return Poll::Ready(Ok(()));
        }
        if !this.carry.is_empty() {
            let n = this.carry.len().min(buf.remaining());
            buf.put_slice(&this.carry.split_to(n));
            if this.carry.is_empty() {
                this.carry = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        this.poll_read_stream(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> HeadClock<S> {
    /// Reads from the client stream itself (see [`AsyncRead::poll_read`]).
    fn poll_read_stream(
        &mut self,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Err(dropped()));
        };
        let mut inner = Pin::new(inner);
        if this.act.head_timed_out.load(Ordering::Relaxed) {
            if !this.answered {
                this.answered = true;
                // Best effort: a client that does not read gets no 408. The
                // lingering close flushes it and shuts the write side down.
                let _ = inner.as_mut().poll_write(cx, REQUEST_TIMEOUT);
                let _ = inner.as_mut().poll_flush(cx);
            }
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head not complete within request_header_timeout",
            )));
        }
        let before = buf.filled().len();
        let room = buf.remaining() > 0;
        let res = inner.poll_read(cx, buf);
        match &res {
            Poll::Ready(Ok(())) => {
                let got = &buf.filled()[before..];
                if !got.is_empty() {
                    if std::mem::take(&mut this.first_read) && got.starts_with(b"PRI ") {
                        // The HTTP/2 preface (h2c prior knowledge on `auto`).
                        this.act.head_clock_off.store(true, Ordering::Relaxed);
                    }
                    this.act.bytes_arrived();
                } else if room {
                    this.read_done = true;
                }
            }
            Poll::Ready(Err(_)) => this.read_done = true,
            Poll::Pending => {}
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeadClock<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.inner.as_mut() {
            Some(s) => this.act.wrote(Pin::new(s).poll_write(cx, buf)),
            None => Poll::Ready(Err(dropped())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.inner.as_mut() {
            Some(s) => this.act.wrote(Pin::new(s).poll_write_vectored(cx, bufs)),
            None => Poll::Ready(Err(dropped())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.inner.as_mut() {
            Some(s) => this.act.wrote(Pin::new(s).poll_flush(cx)),
            None => Poll::Ready(Err(dropped())),
        }
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.act.parked.load(Ordering::Relaxed) {
            // Parking: hyper ends its connection, the stream stays open.
            return Poll::Ready(Ok(()));
        }
        match this.inner.as_mut() {
            Some(s) => Pin::new(s).poll_shutdown(cx),
            None => Poll::Ready(Err(dropped())),
        }
    }
}

impl Connection {
    /// Serves requests until the connection ends. `identity` is added to
    /// every request after the incoming copies were stripped.
    async fn run<S>(
        self,
        stream: S,
        info: Arc<ConnInfo>,
        alpn: Alpn,
        identity: Option<(HeaderName, HeaderValue)>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.gauge.inc();
        let activity = Arc::new(Activity::new());
        let proto = Proto::select(alpn, self.protocol);
        if matches!(proto, Proto::Http2) {
            activity.head_clock_off.store(true, Ordering::Relaxed);
        }
        let (back, mut returned) = oneshot::channel();
        let fast = FastParts {
            info: info.clone(),
            identity: identity.clone(),
        };
        // The stream and the service, boxed and built in one expression:
        // an async fn's locals keep their space in the task while their
        // scope spans an await, even once moved from, and these move into
        // hyper's (boxed) connection.
        let mut io = Box::new((
            HeadClock::new(stream, activity.clone(), back),
            service(&self, info, activity.clone(), identity),
        ));
        let watch = Watch {
            shutdown: self.shared.shutdown.clone(),
            activity,
            idle: self.idle,
            head: self.head_timeout,
        };
        let b = &self.builders;
        let h2 = match proto {
            Proto::Auto => {
                let sniff = std::pin::pin!(Sniff {
                    io: &mut io.0,
                    cancelled: false,
                });
                watch
                    .drive(sniff, |s| s.get_mut().cancelled = true, None)
                    .await
            }
            Proto::Http1 => Some(false),
            Proto::Http2 => Some(true),
        };
        match h2 {
            // Closed, failed or timed out before the first request; dropping
            // the stream hands it back for the lingering close.
            None => drop(io),
            Some(false) => {
                let fast = fast::Conn {
                    shared: &self.shared,
                    info: &fast.info,
                    strip: &self.strip,
                    identity: fast.identity.as_ref(),
                    max_head: b.max_head,
                };
                watch.serve_h1(&b.h1, b.fast.then_some(&fast), io).await
            }
            Some(true) => {
                // Boxed: an HTTP/2 connection's state is large and only h2
                // connections should pay for it.
                let mut conn = Box::pin(b.h2.serve_connection(TokioIo::new(io.0), io.1));
                watch
                    .drive(conn.as_mut(), |c| c.graceful_shutdown(), None)
                    .await;
            }
        }
        // hyper has dropped the stream (the connection future is gone); it is
        // here unless the client closed its side or the connection upgraded.
        if let Ok(mut stream) = returned.try_recv() {
            let shutdown = &self.shared.shutdown;
            if shutdown.phase() < Phase::Stopped {
                // Boxed: only a closing connection pays for the linger state.
                let linger = Box::pin(linger::linger(&mut stream, linger::Bounds::DEFAULT));
                tokio::select! {
                    (ended, discarded) = linger => {
                        tracing::trace!(?ended, discarded, "lingering close done");
                    }
                    // The drain timeout closes lingering connections too.
                    _ = shutdown.reached(Phase::Stopped) => {}
                }
            }
        }
        self.gauge.dec();
        drop(self.tracked);
    }
}

/// The connection's service: strips the identity headers, adds the
/// verified `identity`, and proxies.
fn service(
    conn: &Connection,
    info: Arc<ConnInfo>,
    act: Arc<Activity>,
    identity: Option<(HeaderName, HeaderValue)>,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = http::Response<Counted<proxy::body::ProxyBody>>,
    Error = Infallible,
    Future: Send + 'static,
> + Send
       + Unpin
       + 'static {
    let shared = conn.shared.clone();
    let strip = conn.strip.clone();
    service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let shared = shared.clone();
        let info = info.clone();
        let act = act.clone();
        identify(req.headers_mut(), &strip, identity.as_ref());
        // Boxed per request: hyper keeps a connection's in-flight future
        // in a slot sized for it for the connection's whole life, so an
        // unboxed ~4 KiB proxy future cost every idle keep-alive connection
        // ~4 KiB of RSS (1,000 idle connections: 35.1 -> 30.8 MiB); the
        // allocation per request measured ~1% CPU.
        // One async block, not a wrapper future: moving a future copies all
        // of it, and this one is ~3.5 KiB.
        box_in_place(move || async move {
            request_started(&act);
            let resp = proxy::handle(req.map(Some), &info, &shared).await;
            Ok::<_, Infallible>(response_ready(act, resp))
        })
    })
}

/// Boxes the future `make` returns, written straight into its allocation:
/// `Box::pin(fut)` builds the future on the stack and then copies all of it
/// into the box (~3.5 KiB here, however little of it the first state uses).
/// The safe equivalent, `Box::pin(None)` then `set(Some(..))`, copies too.
fn box_in_place<F>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    let mut slot = Box::<F>::new_uninit();
    slot.write(make());
    // SAFETY: written just above; if `make` panics, the uninitialised box
    // is freed without dropping a value.
    Box::into_pin(unsafe { slot.assume_init() })
}

/// Removes the identity headers a client sent, and adds the verified one.
pub(super) fn identify(
    headers: &mut http::HeaderMap,
    strip: &[HeaderName],
    identity: Option<&(HeaderName, HeaderValue)>,
) {
    for name in strip {
        headers.remove(name);
    }
    if let Some((name, value)) = identity {
        headers.insert(name.clone(), value.clone());
    }
}

/// What the fast path needs besides the [`Connection`].
struct FastParts {
    info: Arc<ConnInfo>,
    identity: Option<(HeaderName, HeaderValue)>,
}

/// Who writes an [`Activity`]'s counters.
#[derive(Clone, Copy)]
enum Writer {
    /// The fast path. It serves HTTP/1.1, where every writer of the counters
    /// (the fast path, and hyper's dispatcher when a request is declined to
    /// it) runs in the connection's own task, one at a time: a plain load and
    /// store cannot lose an update, and costs no locked instruction per
    /// request.
    Only,
    /// hyper's service: HTTP/2 streams run on other tasks.
    Shared,
}

impl Writer {
    /// Adds one to `counter`, or subtracts one when `up` is false.
    fn step(self, counter: &AtomicUsize, up: bool) {
        match (self, up) {
            (Writer::Only, _) => {
                let v = counter.load(Ordering::Relaxed);
                let v = if up {
                    v.wrapping_add(1)
                } else {
                    v.wrapping_sub(1)
                };
                counter.store(v, Ordering::Relaxed);
            }
            (Writer::Shared, true) => {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            (Writer::Shared, false) => {
                counter.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl Activity {
    /// A request reached the service: its head is complete (the head clock
    /// stops) and it is in progress.
    fn started(&self, w: Writer) {
        self.head_since_ms.store(NO_HEAD, Ordering::Relaxed);
        w.step(&self.active, true);
    }

    /// Its response is ready: the request ends, and the response body counts
    /// as in progress until it is done with.
    fn responded(&self, w: Writer) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        // Counted before the request stops counting: the connection never
        // looks idle in between.
        w.step(&self.bodies, true);
        w.step(&self.active, false);
    }

    /// The response body is done with.
    fn body_ended(&self, w: Writer) {
        w.step(&self.bodies, false);
    }
}

impl fast::Hooks for Activity {
    fn head_pending(&self) {
        self.bytes_arrived();
    }

    fn request_started(&self) {
        self.started(Writer::Only);
    }

    fn response_ready(&self) {
        self.responded(Writer::Only);
    }

    fn body_done(&self) {
        self.body_ended(Writer::Only);
    }
}

/// hyper's service: a request reached it.
fn request_started(act: &Activity) {
    act.started(Writer::Shared);
}

/// hyper's service: its response is ready; the body counts until hyper
/// drops it.
fn response_ready<B>(act: Arc<Activity>, resp: http::Response<B>) -> http::Response<Counted<B>> {
    act.responded(Writer::Shared);
    resp.map(|inner| Counted { inner, act })
}

/// A response body, counted in [`Activity::bodies`] until hyper drops it.
struct Counted<B> {
    inner: B,
    act: Arc<Activity>,
}

impl<B: http_body::Body + Unpin> http_body::Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        self.act.body_ended(Writer::Shared);
    }
}

/// How long an HTTP/1.1 connection with nothing in progress keeps hyper's
/// connection state (two 8 KiB buffers and the parser's) before it is
/// parked: a client that sends its next request sooner reuses it as it is;
/// one that waits longer pays for building it again (a few allocations).
const PARK_AFTER: Duration = Duration::from_secs(1);

/// Connections parked so far (all listeners): the memory janitor trims
/// after they change, as after connections close.
static PARKS: AtomicU64 = AtomicU64::new(0);

/// How many times an idle HTTP/1.1 connection was parked since start.
pub(crate) fn parks() -> u64 {
    PARKS.load(Ordering::Relaxed)
}

/// What ends or winds down a connection besides the client: drain, idleness
/// and a request head that takes too long.
struct Watch {
    shutdown: Arc<Shutdown>,
    activity: Arc<Activity>,
    idle: Duration,
    head: Duration,
}

impl Watch {
    /// Serves HTTP/1.1 on `io` until the connection ends.
    ///
    /// Requests go to the fast path ([`fast`]) first; the first one it
    /// declines, with everything after it, goes to a hyper connection,
    /// which serves the connection from there until it ends or parks.
    ///
    /// A connection with nothing in progress for [`PARK_AFTER`] is parked:
    /// the fast path's buffers are freed, or hyper's connection is closed
    /// without shutting the stream down ([`Activity::parked`]), which frees
    /// its buffers and state, and the stream and service are taken back.
    /// The parked connection waits for the client's next bytes under the
    /// same idle timeout and drain, then the fast path serves it again.
    /// Clients see one keep-alive connection throughout.
    /// Without `fast` (tests of hyper's side), hyper serves every request.
    async fn serve_h1<S, Svc, B>(
        &self,
        h1: &http1::Builder,
        fast: Option<&fast::Conn<'_>>,
        mut io: Box<(HeadClock<S>, Svc)>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        Svc: hyper::service::HttpService<hyper::body::Incoming, ResBody = B> + Unpin,
        Svc::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: http_body::Body + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let act = &self.activity;
        loop {
            let mut park = Some(PARK_AFTER);
            if let Some(fast) = fast {
                // Scoped: the fast path's future (boxed, with its buffers
                // and state, so the connection task does not carry its
                // size) is freed before the connection parks.
                let end = {
                    let closing = AtomicBool::new(false);
                    let mut served = Box::pin(fast::serve(&mut io.0, fast, &closing, &**act));
                    self.drive(
                        served.as_mut(),
                        |_| closing.store(true, Ordering::Relaxed),
                        Some(PARK_AFTER),
                    )
                    .await
                };
                match end {
                    // Failed, or the drain timeout expired.
                    None => return,
                    Some(fast::End::Closed) if !act.parked.load(Ordering::Relaxed) => return,
                    Some(fast::End::Closed) => {
                        if !self.park(&mut io.0).await {
                            return;
                        }
                        continue;
                    }
                    Some(fast::End::Declined(bytes)) => {
                        io.0.carry = bytes;
                        act.bytes_arrived();
                    }
                }
            } else if !io.0.carry.is_empty() {
                // hyper alone: a pipelined head's start carried over is
                // served at once (parking again would find it).
                park = None;
            }
            io = {
                // Boxed, and built from the box's fields in one expression
                // (see `Connection::run`). Scoped to this block: a Box
                // moved out of keeps its allocation until it goes out of
                // scope, and a parked connection holds none of it.
                let mut conn = Box::new(
                    h1.serve_connection(TokioIo::new(io.0), io.1)
                        .with_upgrades(),
                );
                self.drive(Pin::new(&mut *conn), |c| c.graceful_shutdown(), park)
                    .await;
                if !act.parked.load(Ordering::Relaxed) {
                    // Ended; dropping `conn` drops the stream (handed back
                    // for the lingering close unless the client closed its
                    // side).
                    return;
                }
                let Some(http1::Parts {
                    io,
                    read_buf,
                    service,
                    ..
                }) = conn.into_parts()
                else {
                    return;
                };
                let mut io = io.into_inner();
                if !read_buf.is_empty() {
                    // hyper had read the start of a pipelined head: the
                    // fast path takes it at once. Copied: `read_buf` is a
                    // view of hyper's whole read buffer, which is freed here.
                    io.carry = Bytes::copy_from_slice(&read_buf);
                }
                Box::new((io, service))
            };
            if io.0.carry.is_empty() && !self.park(&mut io.0).await {
                return;
            }
        }
    }

    /// Parks the connection until the client sends more: `false` when it
    /// is to be closed instead.
    async fn park<S: AsyncRead + AsyncWrite + Unpin>(&self, io: &mut HeadClock<S>) -> bool {
        PARKS.fetch_add(1, Ordering::Relaxed);
        if !self.wait_parked(io).await {
            // Idle timeout or drain: dropped, the stream goes back for
            // the lingering close, as hyper's graceful close of an idle
            // connection ends in it. Or the read failed: just closed.
            return false;
        }
        // Resumed: a hyper connection shuts the stream down for real.
        self.activity.parked.store(false, Ordering::Relaxed);
        true
    }

    /// A parked connection waits for bytes from the client: `true` to
    /// serve them (or the end of the stream) with a new hyper connection,
    /// `false` when the idle timeout or the drain closes it, or the read failed.
    async fn wait_parked<S: AsyncRead + AsyncWrite + Unpin>(&self, io: &mut HeadClock<S>) -> bool {
        let idle = idle_watch(self.activity.clone(), self.idle, self.head, None);
        tokio::pin!(idle);
        let mut registered: Option<PhaseWaker> = None;
        std::future::poll_fn(|cx| {
            if registered.is_none() {
                registered = Some(self.shutdown.register(cx.waker()));
            }
            if self.shutdown.phase() >= Phase::Stopping {
                return Poll::Ready(false);
            }
            if let Poll::Ready(wake) = io.poll_wake(cx) {
                return Poll::Ready(wake);
            }
            match idle.as_mut().poll(cx) {
                Poll::Ready(Watched::Idle) => Poll::Ready(false),
                // No head is pending while parked, and this watch does not
                // park; were one to fire, the next connection looks again.
                Poll::Ready(Watched::SlowHead | Watched::Park) => Poll::Ready(true),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Runs `conn` to its end: graceful close (`Connection: close` / GOAWAY)
    /// once the drain stops accepting or the connection is idle, and dropped
    /// outright when the drain timeout has expired. `None` when it failed or
    /// was dropped. With `park`, an HTTP/1.1 connection that has had nothing
    /// in progress for that long is ended for parking (see
    /// [`Watch::serve_h1`]): [`Activity::parked`] is then left set.
    async fn drive<C, T, E>(
        &self,
        mut conn: Pin<&mut C>,
        graceful: impl Fn(Pin<&mut C>),
        park: Option<Duration>,
    ) -> Option<T>
    where
        C: Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        let act = self.activity.clone();
        let idle = idle_watch(self.activity.clone(), self.idle, self.head, park);
        tokio::pin!(idle);
        let shutdown = &self.shutdown;
        let mut registered: Option<PhaseWaker> = None;
        let mut closing = false;
        let res = std::future::poll_fn(|cx| {
            // The drain is read from an atomic on every poll; the registered
            // waker makes sure a phase change gets this task polled.
            if registered.is_none() {
                registered = Some(shutdown.register(cx.waker()));
            }
            let phase = shutdown.phase();
            if phase >= Phase::Stopped {
                // The drain timeout expired: whatever is still open is closed now
                // (dropping the connection cancels its requests and frees their permits).
                tracing::debug!("drain timeout: closing a connection still in use");
                return Poll::Ready(None);
            }
            if !closing && phase >= Phase::Stopping {
                closing = true;
                graceful(conn.as_mut());
            }
            if let Poll::Ready(res) = conn.as_mut().poll(cx) {
                return Poll::Ready(Some(res));
            }
            act.stamp_head();
            if !closing {
                match idle.as_mut().poll(cx) {
                    Poll::Pending => {}
                    Poll::Ready(Watched::Idle) => {
                        closing = true;
                        graceful(conn.as_mut());
                        return conn.as_mut().poll(cx).map(Some);
                    }
                    Poll::Ready(Watched::SlowHead) => {
                        // The stream answers 408 and fails on hyper's next read.
                        closing = true;
                        act.head_timed_out.store(true, Ordering::Relaxed);
                        tracing::debug!("request head not complete in time: 408");
                        return conn.as_mut().poll(cx).map(Some);
                    }
                    Poll::Ready(Watched::Park) => {
                        // hyper is idle (it just returned Pending with
                        // nothing in progress): closing it ends it at once,
                        // and the stream's shutdown is skipped.
                        act.parked.store(true, Ordering::Relaxed);
                        graceful(conn.as_mut());
                        let res = conn.as_mut().poll(cx);
                        if !matches!(res, Poll::Ready(Ok(_))) {
                            // Not idle after all, or it failed: a graceful
                            // close as for the idle timeout, with a real shutdown.
                            tracing::debug!("connection not idle when parked: closing it");
                            act.parked.store(false, Ordering::Relaxed);
                            closing = true;
                        }
                        return res.map(Some);
                    }
                }
            }
            Poll::Pending
        })
        .await?;
        match res {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::debug!(error = %e, "client connection ended with an error");
                None
            }
        }
    }
}

/// Why the watcher fired.
enum Watched {
    /// No request in progress for `idle`.
    Idle,
    /// A request head started arriving `head` ago and is still not complete.
    SlowHead,
    /// HTTP/1.1 with nothing in progress for the park delay.
    Park,
}

pin_project_lite::pin_project! {
    /// Resolves once the connection has had no request in progress for
    /// `idle`, or a pending request head is older than `head`, or (with
    /// `park`) it has had nothing in progress for that long. One timer per
    /// connection, re-armed at most every `head` (so a head that starts
    /// mid-sleep is caught at its deadline) or `park`, and never per request.
    ///
    /// It is polled on every wake of its connection, nearly always for
    /// nothing: once its timer is registered with the task's waker, it is
    /// only polled again after the timer fired (or for another waker).
    struct IdleWatch {
        act: Arc<Activity>,
        idle: Duration,
        head: Duration,
        park: Option<Duration>,
        #[pin]
        sleep: tokio::time::Sleep,
        // `sleep` is set to the next deadline (not before the first poll).
        armed: bool,
        // The waker `sleep` was last polled with, while it is registered.
        registered: Option<Waker>,
    }
}

fn idle_watch(
    act: Arc<Activity>,
    idle: Duration,
    head: Duration,
    park: Option<Duration>,
) -> IdleWatch {
    // Any deadline: the first poll sets it.
    let sleep = tokio::time::sleep_until(act.start);
    IdleWatch {
        act,
        idle,
        head,
        park,
        sleep,
        armed: false,
        registered: None,
    }
}

impl IdleWatch {
    /// What has fired, or when to look again.
    fn due(
        act: &Activity,
        idle: Duration,
        head: Duration,
        park: Option<Duration>,
    ) -> Result<Watched, Instant> {
        act.stamp_head();
        let now = Instant::now();
        let busy = act.active.load(Ordering::Relaxed) > 0;
        let last = Duration::from_millis(act.last_ms.load(Ordering::Relaxed));
        let idle_due = act.start + last + idle;
        if now >= idle_due && !busy {
            return Ok(Watched::Idle);
        }
        let mut next = if now >= idle_due {
            now + idle
        } else {
            idle_due
        };
        if let Some(after) = park {
            let park_due = act.start + last + after;
            if now < park_due {
                next = next.min(park_due);
            } else if act.parkable() {
                return Ok(Watched::Park);
            } else {
                // A response still streams, or a head is pending: look again later.
                next = next.min(now + after);
            }
        }
        if !act.head_clock_off.load(Ordering::Relaxed) {
            let since = act.head_since_ms.load(Ordering::Relaxed);
            if since != NO_HEAD && !busy {
                let head_due = act.start + Duration::from_millis(since) + head;
                if now >= head_due {
                    return Ok(Watched::SlowHead);
                }
                next = next.min(head_due);
            }
            next = next.min(now + head);
        }
        Err(next)
    }
}

impl Future for IdleWatch {
    type Output = Watched;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Watched> {
        let mut this = self.project();
        loop {
            if let Some(w) = this.registered.as_ref() {
                if w.will_wake(cx.waker()) && !this.sleep.is_elapsed() {
                    return Poll::Pending;
                }
            }
            if *this.armed {
                // With the task's budget used up, the sleep returns Pending
                // without registering its timer's waker.
                let budget = tokio::task::coop::has_budget_remaining();
                if this.sleep.as_mut().poll(cx).is_pending() {
                    *this.registered = budget.then(|| cx.waker().clone());
                    return Poll::Pending;
                }
                *this.armed = false;
                *this.registered = None;
            }
            match Self::due(this.act, *this.idle, *this.head, *this.park) {
                Ok(fired) => return Poll::Ready(fired),
                Err(next) => {
                    this.sleep.as_mut().reset(next);
                    *this.armed = true;
                    *this.registered = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// One HTTP/1.1 connection served by [`Watch::serve_h1`] on real sockets;
    /// the service answers `ok <path>`, or with `respond` for `/slow`.
    struct Served {
        client: TcpStream,
        act: Arc<Activity>,
        shutdown: Arc<Shutdown>,
        /// The stream handed back for the lingering close, if it was.
        done: JoinHandle<Option<TcpStream>>,
    }

    type TestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

    async fn serve_one(idle: Duration, slow: fn() -> TestBody) -> Served {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let act = Arc::new(Activity::new());
        let shutdown = Shutdown::new();
        let (back, returned) = oneshot::channel();
        let io = HeadClock::new(server, act.clone(), back);
        let svc_act = act.clone();
        let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let act = svc_act.clone();
            Box::pin(async move {
                request_started(&act);
                let body = if req.uri().path() == "/slow" {
                    slow()
                } else {
                    TestBody::new(Full::new(Bytes::from(format!("ok {}", req.uri().path()))))
                };
                Ok::<_, Infallible>(response_ready(act, http::Response::new(body)))
            })
        });
        let watch = Watch {
            shutdown: shutdown.clone(),
            activity: act.clone(),
            idle,
            head: Duration::from_secs(10),
        };
        let done = tokio::spawn(async move {
            let h1 = http1::Builder::new();
            watch.serve_h1(&h1, None, Box::new((io, svc))).await;
            returned.await.ok()
        });
        Served {
            client,
            act,
            shutdown,
            done,
        }
    }

    /// Reads one response (content-length or chunked) whole: head and body bytes.
    async fn read_response(c: &mut TcpStream) -> (String, Vec<u8>) {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            assert_eq!(c.read(&mut byte).await.unwrap(), 1, "closed in the head");
            buf.push(byte[0]);
        }
        let head = String::from_utf8(buf).unwrap().to_ascii_lowercase();
        let mut body = Vec::new();
        if let Some(len) = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
        {
            body.resize(len.trim().parse().unwrap(), 0);
            c.read_exact(&mut body).await.unwrap();
        } else {
            while !body.ends_with(b"0\r\n\r\n") {
                assert_eq!(c.read(&mut byte).await.unwrap(), 1, "closed in the body");
                body.push(byte[0]);
            }
        }
        (head, body)
    }

    async fn get(c: &mut TcpStream, path: &str) -> (String, Vec<u8>) {
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .await
            .unwrap();
        read_response(c).await
    }

    /// Reads a response that must be 200 with the test service's body for
    /// `path`; returns its head.
    async fn read_ok(c: &mut TcpStream, path: &str) -> String {
        let (head, body) = read_response(c).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body, format!("ok {path}").as_bytes());
        head
    }

    async fn get_ok(c: &mut TcpStream, path: &str) {
        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let head = read_ok(c, path).await;
        assert!(!head.contains("connection: close"), "{head}");
    }

    fn no_slow() -> TestBody {
        TestBody::new(Full::new(Bytes::new()))
    }

    /// Waits (paused time) until the connection is parked.
    async fn until_parked(act: &Activity) {
        for _ in 0..100 {
            if act.parked.load(Ordering::Relaxed) {
                return;
            }
            tokio::time::sleep(PARK_AFTER / 4).await;
        }
        panic!("the connection was not parked");
    }

    /// A head that stops half-way gets its 408 `head` after its first
    /// bytes, though its start is stamped only once hyper waits for the rest.
    #[tokio::test(start_paused = true)]
    async fn a_partial_head_gets_its_408_at_the_header_timeout() {
        let mut s = serve_one(Duration::from_secs(60), no_slow).await;
        // After the connection's first poll: its watch has armed its timer.
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.client.write_all(b"GET /a HT").await.unwrap();
        let head = tokio::select! {
            biased;
            _ = tokio::time::sleep(Duration::from_millis(10_500)) => None,
            r = read_response(&mut s.client) => Some(r.0),
        };
        let head = head.expect("answered by the header timeout");
        assert!(head.starts_with("http/1.1 408"), "{head}");
    }

    /// The watch's first poll comes when the task's coop budget is used up:
    /// its timer could not register then, and the watch still fires.
    #[tokio::test(start_paused = true)]
    async fn the_idle_watch_fires_after_a_first_poll_without_budget() {
        // In a task of its own: only its wakers get it polled again.
        let task = tokio::spawn(async {
            let act = Arc::new(Activity::new());
            let watch = idle_watch(act, Duration::from_secs(5), Duration::from_secs(10), None);
            tokio::pin!(watch);
            let first = std::future::poll_fn(|cx| {
                while tokio::task::coop::has_budget_remaining() {
                    let spend = std::pin::pin!(tokio::task::consume_budget());
                    let _ = spend.poll(cx);
                }
                Poll::Ready(watch.as_mut().poll(cx).is_pending())
            })
            .await;
            assert!(first);
            // The later deadline is looked at first: a watch that was
            // never woken, only polled along, loses.
            tokio::select! {
                biased;
                _ = tokio::time::sleep(Duration::from_secs(60)) => None,
                w = watch => Some(w),
            }
        });
        let fired = task.await.unwrap();
        assert!(
            matches!(fired, Some(Watched::Idle)),
            "the idle timeout fired"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_parked_and_serves_its_next_requests() {
        let mut s = serve_one(Duration::from_secs(60), no_slow).await;
        get_ok(&mut s.client, "/a").await;
        get_ok(&mut s.client, "/b").await;
        assert!(
            !s.act.parked.load(Ordering::Relaxed),
            "not before PARK_AFTER"
        );
        until_parked(&s.act).await;
        get_ok(&mut s.client, "/c").await;
        assert!(!s.act.parked.load(Ordering::Relaxed), "resumed");
        // Parked and resumed again, any number of times.
        until_parked(&s.act).await;
        get_ok(&mut s.client, "/d").await;
        drop(s.client);
        assert!(
            s.done.await.unwrap().is_none(),
            "the client closed: not lingered"
        );
    }

    /// The proxy's shared state with one route, `/` to `upstream`.
    fn shared_for(upstream: std::net::SocketAddr) -> Arc<Shared> {
        let yaml = format!(
            "version: 1\nlisteners:\n  - name: l\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\n\
             upstreams:\n  app:\n    endpoints: [\"{upstream}\"]\n\
             routes:\n  - name: all\n    match:\n      path_prefix: /\n    upstream: app\n"
        );
        let config = Arc::new(crate::config::load_str(&yaml, "test").unwrap().config);
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let registry = crate::registry::Registry::new(metrics.clone(), config.limits.max_in_flight);
        let (snapshot, _) = registry.build(config, 1, None).unwrap();
        Arc::new(Shared::new(snapshot, metrics, Shutdown::new()))
    }

    /// An upstream answering `up <path>` to every request, on real sockets.
    async fn upstream() -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(http1::Builder::new().serve_connection(
                    TokioIo::new(s),
                    service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = format!("up {}", req.uri().path());
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
                    }),
                ));
            }
        });
        addr
    }

    /// Plain requests take the fast path to the upstream; the first one it
    /// declines (a body) goes to hyper with the rest of the connection;
    /// once parked, the connection comes back to the fast path. Real time:
    /// requests go through the proxy to a real upstream.
    #[tokio::test]
    async fn plain_requests_take_the_fast_path_and_the_rest_go_to_hyper() {
        let shared = shared_for(upstream().await);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, remote) = l.accept().await.unwrap();
        let act = Arc::new(Activity::new());
        let (back, _returned) = oneshot::channel();
        let io = HeadClock::new(server, act.clone(), back);
        // hyper's service here only counts what reaches it.
        let hyper_calls = Arc::new(AtomicUsize::new(0));
        let (svc_act, calls) = (act.clone(), hyper_calls.clone());
        let svc = service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
            let act = svc_act.clone();
            calls.fetch_add(1, Ordering::Relaxed);
            Box::pin(async move {
                request_started(&act);
                let body = TestBody::new(Full::new(Bytes::from_static(b"hyper")));
                Ok::<_, Infallible>(response_ready(act, http::Response::new(body)))
            })
        });
        let watch = Watch {
            shutdown: shared.shutdown.clone(),
            activity: act.clone(),
            idle: Duration::from_secs(60),
            head: Duration::from_secs(10),
        };
        let served = tokio::spawn(async move {
            let info = Arc::new(ConnInfo::new(remote, false));
            let fast = fast::Conn {
                shared: &shared,
                info: &info,
                strip: &[],
                identity: None,
                max_head: 64 * 1024,
            };
            watch
                .serve_h1(&http1::Builder::new(), Some(&fast), Box::new((io, svc)))
                .await;
        });
        let (head, body) = get(&mut client, "/a").await;
        assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
        assert_eq!(body, b"up /a");
        assert_eq!(
            hyper_calls.load(Ordering::Relaxed),
            0,
            "served by the fast path"
        );
        client
            .write_all(b"POST /b HTTP/1.1\r\nHost: t\r\ncontent-length: 2\r\n\r\nhi")
            .await
            .unwrap();
        let (_, body) = read_response(&mut client).await;
        assert_eq!(body, b"hyper");
        assert_eq!(
            hyper_calls.load(Ordering::Relaxed),
            1,
            "a body goes to hyper"
        );
        let (_, body) = get(&mut client, "/c").await;
        assert_eq!(body, b"hyper", "hyper keeps the connection until it parks");
        until_parked(&act).await;
        let (_, body) = get(&mut client, "/d").await;
        assert_eq!(body, b"up /d", "back on the fast path once parked");
        assert_eq!(hyper_calls.load(Ordering::Relaxed), 2);
        // Parked again, now from the fast path, and resumed again.
        until_parked(&act).await;
        let (_, body) = get(&mut client, "/e").await;
        assert_eq!(body, b"up /e");
        drop(client);
        served.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_fresh_connection_that_sends_nothing_is_parked_too() {
        let mut s = serve_one(Duration::from_secs(60), no_slow).await;
        until_parked(&s.act).await;
        // Split across reads: the first bytes wake it, hyper reads the rest.
        s.client.write_all(b"GET /a HT").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.client
            .write_all(b"TP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        read_ok(&mut s.client, "/a").await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_parked_connection_closes_at_its_idle_timeout_with_a_lingering_close() {
        let mut s = serve_one(Duration::from_secs(5), no_slow).await;
        get_ok(&mut s.client, "/a").await;
        until_parked(&s.act).await;
        let lingered = s.done.await.unwrap();
        assert!(lingered.is_some(), "handed back for the lingering close");
    }

    #[tokio::test(start_paused = true)]
    async fn a_parked_connection_closes_when_the_drain_stops_accepting() {
        let mut s = serve_one(Duration::from_secs(60), no_slow).await;
        get_ok(&mut s.client, "/a").await;
        until_parked(&s.act).await;
        s.shutdown.advance(Phase::Stopping);
        let lingered = s.done.await.unwrap();
        assert!(lingered.is_some(), "handed back for the lingering close");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pipelined_partial_head_survives_parking() {
        let mut s = serve_one(Duration::from_secs(60), no_slow).await;
        s.client
            .write_all(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nGET /b HT")
            .await
            .unwrap();
        read_ok(&mut s.client, "/a").await;
        // Idle with the start of /b read: long enough to park.
        tokio::time::sleep(PARK_AFTER * 3).await;
        s.client
            .write_all(b"TP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        read_ok(&mut s.client, "/b").await;
        get_ok(&mut s.client, "/c").await;
    }

    /// A chunk, then a pause of 3 x PARK_AFTER, then another chunk.
    fn paused_body() -> TestBody {
        let chunks = futures_util::stream::unfold(0u8, |n| async move {
            match n {
                0 => Some((Ok(http_body::Frame::data(Bytes::from_static(b"a"))), 1)),
                1 => {
                    tokio::time::sleep(PARK_AFTER * 3).await;
                    Some((Ok(http_body::Frame::data(Bytes::from_static(b"b"))), 2))
                }
                _ => None,
            }
        });
        TestBody::new(http_body_util::StreamBody::new(chunks))
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_that_pauses_longer_than_the_park_delay_is_not_cut_short() {
        let mut s = serve_one(Duration::from_secs(60), paused_body).await;
        let (head, body) = get(&mut s.client, "/slow").await;
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        assert_eq!(body, b"1\r\na\r\n1\r\nb\r\n0\r\n\r\n");
        // Still keep-alive.
        get_ok(&mut s.client, "/a").await;
    }

    /// Far more than the loopback socket buffers hold.
    const BIG: usize = 32 << 20;

    fn big_body() -> TestBody {
        TestBody::new(Full::new(Bytes::from(vec![b'x'; BIG])))
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_the_client_reads_late_is_not_cut_short() {
        let mut s = serve_one(Duration::from_secs(60), big_body).await;
        s.client
            .write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        // The client does not read for a while: hyper's write waits.
        tokio::time::sleep(PARK_AFTER * 3).await;
        assert!(!s.act.parked.load(Ordering::Relaxed));
        let (head, body) = read_response(&mut s.client).await;
        assert!(!head.contains("connection: close"), "{head}");
        assert_eq!(body.len(), BIG);
        get_ok(&mut s.client, "/a").await;
    }
}
