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
use std::task::Poll;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use super::linger;
use crate::config::watch::FileWatch;
use crate::config::{content_hash, ListenerConfig, ListenerProtocol, ListenerTls};
use crate::proxy::{self, ConnInfo, Shared};
use crate::shutdown::{Phase, PhaseWaker, Tracker};
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
        let tls = tls.clone();
        let name = cfg.name.clone();
        // Owned by the connection tracker: drain waits for every connection task.
        tokio::spawn(async move {
            let _slot = slot;
            let Some(tls) = tls else {
                let info = Arc::new(ConnInfo::new(remote, false));
                conn.run(stream, info, Alpn::None, None).await;
                return;
            };
            // Boxed: the handshake state is several KiB, and plain connections
            // (and TLS ones once handshaken) should not carry its size all their life.
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
                    // Boxed for the same reason: a TLS stream is large.
                    Box::pin(conn.run(a.stream, info, a.alpn, identity)).await;
                }
                Err(e) => {
                    tracing::debug!(listener = %name, %remote, error = %e, "TLS handshake did not complete")
                }
            }
        });
    }
    tracing::debug!(listener = %cfg.name, "stopped accepting");
    if let Some(r) = rotation {
        r.join("tls rotation").await;
    }
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
        Builders { h1, h2 }
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
    /// request was in progress ([`NO_HEAD`]: none pending). Cleared when the
    /// head is complete (the request reaches the service).
    head_since_ms: AtomicU64,
    /// HTTP/2: no request-head clock (streams, pings and settings frames
    /// arrive on an idle connection).
    head_clock_off: AtomicBool,
    /// Set by the watcher: the pending head took too long.
    head_timed_out: AtomicBool,
}

const NO_HEAD: u64 = u64::MAX;

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            active: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            head_since_ms: AtomicU64::new(NO_HEAD),
            head_clock_off: AtomicBool::new(false),
            head_timed_out: AtomicBool::new(false),
        }
    }

    /// Bytes arrived from the client: starts the head clock if they begin a
    /// request head (no request in progress, none pending). Bytes read while
    /// a request runs (its body, or a pipelined next head) do not; a partial
    /// head left after such a request is then bounded by the idle timeout.
    fn bytes_arrived(&self) {
        if self.active.load(Ordering::Relaxed) == 0
            && self.head_since_ms.load(Ordering::Relaxed) == NO_HEAD
        {
            let since = self.start.elapsed().as_millis() as u64;
            self.head_since_ms.store(since, Ordering::Relaxed);
        }
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
            if buf.remaining() > 0 {
                let _ = this.poll_read_stream(cx, buf);
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
        match self.get_mut().inner.as_mut() {
            Some(s) => Pin::new(s).poll_write(cx, buf),
            None => Poll::Ready(Err(dropped())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().inner.as_mut() {
            Some(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            None => Poll::Ready(Err(dropped())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().inner.as_mut() {
            Some(s) => Pin::new(s).poll_flush(cx),
            None => Poll::Ready(Err(dropped())),
        }
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().inner.as_mut() {
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
        let mut stream = HeadClock::new(stream, activity.clone(), back);
        let shared = self.shared.clone();
        let act = activity.clone();
        let strip = self.strip.clone();
        let svc = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            let shared = shared.clone();
            let info = info.clone();
            let act = act.clone();
            for name in strip.iter() {
                req.headers_mut().remove(name);
            }
            if let Some((name, value)) = &identity {
                req.headers_mut().insert(name.clone(), value.clone());
            }
            // Boxed per request: hyper keeps a connection's in-flight
            // future in a slot sized for it for the connection's whole life,
            // so an unboxed ~4 KiB proxy future cost every idle keep-alive
            // connection ~4 KiB of RSS (1,000 idle connections: 35.1 ->
            // 30.8 MiB); the allocation per request measured ~1% CPU.
            Box::pin(async move {
                // The head is complete: its clock stops.
                act.head_since_ms.store(NO_HEAD, Ordering::Relaxed);
                act.active.fetch_add(1, Ordering::Relaxed);
                let resp = proxy::handle(req, &info, &shared).await;
                act.last_ms
                    .store(act.start.elapsed().as_millis() as u64, Ordering::Relaxed);
                act.active.fetch_sub(1, Ordering::Relaxed);
                Ok::<_, Infallible>(resp)
            })
        });
        let watch = Watch {
            shared: self.shared.clone(),
            activity,
            idle: self.idle,
            head: self.head_timeout,
        };
        let b = &self.builders;
        let h2 = match proto {
            Proto::Auto => {
                let sniff = std::pin::pin!(Sniff {
                    io: &mut stream,
                    cancelled: false,
                });
                watch.drive(sniff, |s| s.get_mut().cancelled = true).await
            }
            Proto::Http1 => Some(false),
            Proto::Http2 => Some(true),
        };
        let io = TokioIo::new(stream);
        match h2 {
            // Closed, failed or timed out before the first request; dropping
            // `io` hands the stream back for the lingering close.
            None => drop(io),
            // The connection is pinned where it is built and driven by
            // reference: an async fn's moved-from locals keep their space in
            // the task for as long as their scope spans an await, so passing
            // it by value stored it twice in every connection's task.
            Some(false) => {
                let conn = std::pin::pin!(b.h1.serve_connection(io, svc).with_upgrades());
                watch.drive(conn, |c| c.graceful_shutdown()).await;
            }
            Some(true) => {
                // Boxed: an HTTP/2 connection's state is large and only h2
                // connections should pay for it.
                let mut conn = Box::pin(b.h2.serve_connection(io, svc));
                watch.drive(conn.as_mut(), |c| c.graceful_shutdown()).await;
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

/// What ends or winds down a connection besides the client: drain, idleness
/// and a request head that takes too long.
struct Watch {
    shared: Arc<Shared>,
    activity: Arc<Activity>,
    idle: Duration,
    head: Duration,
}

impl Watch {
    /// Runs `conn` to its end: graceful close (`Connection: close` / GOAWAY)
    /// once the drain stops accepting or the connection is idle, and dropped
    /// outright when the drain timeout has expired. `None` when it failed or
    /// was dropped.
    async fn drive<C, T, E>(
        &self,
        mut conn: Pin<&mut C>,
        graceful: impl Fn(Pin<&mut C>),
    ) -> Option<T>
    where
        C: Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        let act = self.activity.clone();
        let idle = idle_watch(self.activity.clone(), self.idle, self.head);
        tokio::pin!(idle);
        let shutdown = &self.shared.shutdown;
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
}

/// Resolves once the connection has had no request in progress for `idle`,
/// or a pending request head is older than `head`. One timer per connection,
/// re-armed at most every `head` (so a head that starts mid-sleep is caught
/// at its deadline) and never per request.
async fn idle_watch(act: Arc<Activity>, idle: Duration, head: Duration) -> Watched {
    loop {
        let now = Instant::now();
        let busy = act.active.load(Ordering::Relaxed) > 0;
        let last = Duration::from_millis(act.last_ms.load(Ordering::Relaxed));
        let idle_due = act.start + last + idle;
        if now >= idle_due && !busy {
            return Watched::Idle;
        }
        let mut next = if now >= idle_due {
            now + idle
        } else {
            idle_due
        };
        if !act.head_clock_off.load(Ordering::Relaxed) {
            let since = act.head_since_ms.load(Ordering::Relaxed);
            if since != NO_HEAD && !busy {
                let head_due = act.start + Duration::from_millis(since) + head;
                if now >= head_due {
                    return Watched::SlowHead;
                }
                next = next.min(head_due);
            }
            next = next.min(now + head);
        }
        tokio::time::sleep_until(next).await;
    }
}
