//! Accept loop and per-connection serving: HTTP/1.1, h2c prior knowledge or
//! both (`auto`), `max_connections` (accept pauses above it), EMFILE back-off,
//! request header timeout (hyper closes a connection whose request head does
//! not arrive in time), keep-alive idle timeout, header size limit (431), and
//! graceful close on drain (`Connection: close` / GOAWAY).
//!
//! With `tls:` (see `tls.rs`) each accepted stream is handshaken first:
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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use prometheus::IntGauge;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use super::tls::{Alpn, TlsListener};
use crate::config::{ListenerConfig, ListenerProtocol};
use crate::proxy::{self, ConnInfo, Shared};
use crate::shutdown::{Phase, PhaseWaker, Tracker};

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
            t,
            cfg.protocol,
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
        Owned(tokio::spawn(t.clone().rotate(stop).instrument(span)))
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
                conn.run(TokioIo::new(stream), info, Alpn::None, None).await;
                return;
            };
            // Boxed: the handshake state is several KiB, and plain connections
            // (and TLS ones once handshaken) should not carry its size all their life.
            let accepted = Box::pin(tls.accept(stream)).await;
            drop(handshake);
            match accepted {
                Ok(a) => {
                    let info = Arc::new(ConnInfo::new(remote, true));
                    let identity = match (tls.identity_header(), a.identity) {
                        (Some(h), Some(v)) => Some((h.clone(), v)),
                        _ => None,
                    };
                    // Boxed for the same reason: a TLS stream is large.
                    Box::pin(conn.run(TokioIo::new(a.stream), info, a.alpn, identity)).await;
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

/// The listener's HTTP builders, one per [`Proto`]. A connection limited to
/// one protocol gets hyper's own builder for it: hyper-util's auto builder
/// ignores `http1_only` / `http2_only` when serving with upgrades.
struct Builders {
    auto: Builder<TokioExecutor>,
    h1: hyper::server::conn::http1::Builder,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

impl Builders {
    fn new(cfg: &ListenerConfig) -> Self {
        let header_list = cfg.max_header_bytes.0.min(u64::from(u32::MAX)) as u32;
        let mut auto = Builder::new(TokioExecutor::new());
        auto.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(cfg.request_header_timeout.0)
            .max_buf_size(cfg.max_header_bytes.0 as usize)
            .keep_alive(true);
        auto.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(header_list)
            .max_concurrent_streams(1024)
            .max_pending_accept_reset_streams(256)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        let mut h1 = hyper::server::conn::http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(cfg.request_header_timeout.0)
            .max_buf_size(cfg.max_header_bytes.0 as usize)
            .keep_alive(true);
        let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(header_list)
            .max_concurrent_streams(1024)
            .max_pending_accept_reset_streams(256)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        Builders { auto, h1, h2 }
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
    tracked: crate::shutdown::Tracked,
    /// Identity headers removed from every request (see [`identity_headers`]).
    strip: Arc<[HeaderName]>,
}

/// Request activity on a connection, for the idle timer.
struct Activity {
    start: Instant,
    active: AtomicUsize,
    last_ms: AtomicU64,
}

impl Connection {
    /// Serves requests until the connection ends. `identity` is added to
    /// every request after the incoming copies were stripped.
    async fn run<I>(
        self,
        io: I,
        info: Arc<ConnInfo>,
        alpn: Alpn,
        identity: Option<(HeaderName, HeaderValue)>,
    ) where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        self.gauge.inc();
        let activity = Arc::new(Activity {
            start: Instant::now(),
            active: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        });
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
        };
        let b = &self.builders;
        match Proto::select(alpn, self.protocol) {
            Proto::Auto => {
                let conn = b.auto.serve_connection_with_upgrades(io, svc);
                watch.drive(conn, |c| c.graceful_shutdown()).await
            }
            Proto::Http1 => {
                let conn = b.h1.serve_connection(io, svc).with_upgrades();
                watch.drive(conn, |c| c.graceful_shutdown()).await
            }
            Proto::Http2 => {
                let conn = b.h2.serve_connection(io, svc);
                // Boxed: an HTTP/2 connection's state is large and only h2
                // connections should pay for it.
                Box::pin(watch.drive(conn, |c| c.graceful_shutdown())).await
            }
        }
        self.gauge.dec();
        drop(self.tracked);
    }
}

/// What ends or winds down a connection besides the client: drain and idleness.
struct Watch {
    shared: Arc<Shared>,
    activity: Arc<Activity>,
    idle: Duration,
}

impl Watch {
    /// Runs `conn` to its end: graceful close (`Connection: close` / GOAWAY)
    /// once the drain stops accepting or the connection is idle, and dropped
    /// outright when the drain timeout has expired.
    async fn drive<C, E>(self, conn: C, graceful: impl Fn(Pin<&mut C>))
    where
        C: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        tokio::pin!(conn);
        let idle = idle_watch(self.activity, self.idle);
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
                return Poll::Ready(Ok(()));
            }
            if !closing && phase >= Phase::Stopping {
                closing = true;
                graceful(conn.as_mut());
            }
            if let Poll::Ready(res) = conn.as_mut().poll(cx) {
                return Poll::Ready(res);
            }
            if !closing && idle.as_mut().poll(cx).is_ready() {
                closing = true;
                graceful(conn.as_mut());
                return conn.as_mut().poll(cx);
            }
            Poll::Pending
        })
        .await;
        if let Err(e) = res {
            tracing::debug!(error = %e, "client connection ended with an error");
        }
    }
}

/// Resolves once the connection has had no request in progress for `idle`.
async fn idle_watch(act: Arc<Activity>, idle: Duration) {
    loop {
        let last = Duration::from_millis(act.last_ms.load(Ordering::Relaxed));
        let due = act.start + last + idle;
        if Instant::now() >= due && act.active.load(Ordering::Relaxed) == 0 {
            return;
        }
        let next = if Instant::now() >= due {
            Instant::now() + idle
        } else {
            due
        };
        tokio::time::sleep_until(next).await;
    }
}
