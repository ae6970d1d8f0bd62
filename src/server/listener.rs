//! Accept loop and per-connection serving: HTTP/1.1, h2c prior knowledge or
//! both (`auto`), `max_connections` (accept pauses above it), EMFILE back-off,
//! request header timeout (hyper closes a connection whose request head does
//! not arrive in time), keep-alive idle timeout, header size limit (431), and
//! graceful close on drain (`Connection: close` / GOAWAY).

use std::convert::Infallible;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use prometheus::IntGauge;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::config::{ListenerConfig, ListenerProtocol};
use crate::proxy::{self, ConnInfo, Shared};
use crate::shutdown::{Phase, Tracker};

/// Runs one listener until the drain reaches `Stopping`.
pub(crate) async fn serve(
    listener: TcpListener,
    cfg: ListenerConfig,
    shared: Arc<Shared>,
    conns: Arc<Tracker>,
) {
    let builder = Arc::new(builder(&cfg));
    let gauge = shared
        .metrics
        .connections
        .with_label_values(&[cfg.name.as_str()]);
    let limit = Arc::new(Semaphore::new(cfg.max_connections));
    let stopping = shared.shutdown.clone();
    let stop = stopping.reached(Phase::Stopping);
    tokio::pin!(stop);
    let mut backoff = Duration::from_millis(5);
    loop {
        // Take a connection slot first: above max_connections we stop accepting and
        // let the kernel backlog hold new clients.
        let slot = tokio::select! {
            s = limit.clone().acquire_owned() => match s { Ok(s) => s, Err(_) => break },
            _ = &mut stop => break,
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
        let info = Arc::new(ConnInfo {
            remote,
            https: false,
        });
        let conn = Connection {
            shared: shared.clone(),
            builder: builder.clone(),
            gauge: gauge.clone(),
            idle: cfg.idle_timeout.0,
            tracked: conns.track(),
        };
        // Owned by the connection tracker: drain waits for every connection task.
        tokio::spawn(async move {
            let _slot = slot;
            conn.run(TokioIo::new(stream), info).await;
        });
    }
    tracing::debug!(listener = %cfg.name, "stopped accepting");
}

fn builder(cfg: &ListenerConfig) -> Builder<TokioExecutor> {
    let mut b = Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.request_header_timeout.0)
        .max_buf_size(cfg.max_header_bytes.0 as usize)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(cfg.max_header_bytes.0.min(u64::from(u32::MAX)) as u32)
        .max_concurrent_streams(1024)
        .max_pending_accept_reset_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    match cfg.protocol {
        ListenerProtocol::Http1 => b.http1_only(),
        ListenerProtocol::Http2 => b.http2_only(),
        ListenerProtocol::Auto => b,
    }
}

fn is_resource_error(e: &io::Error) -> bool {
    // ENFILE, EMFILE, ENOMEM, ENOBUFS
    matches!(e.raw_os_error(), Some(23 | 24 | 12 | 105))
}

/// One client connection.
struct Connection {
    shared: Arc<Shared>,
    builder: Arc<Builder<TokioExecutor>>,
    gauge: IntGauge,
    idle: Duration,
    tracked: crate::shutdown::Tracked,
}

/// Request activity on a connection, for the idle timer.
struct Activity {
    start: Instant,
    active: AtomicUsize,
    last_ms: AtomicU64,
}

impl Connection {
    async fn run<I>(self, io: I, info: Arc<ConnInfo>)
    where
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
        let svc = service_fn(move |req| {
            let shared = shared.clone();
            let info = info.clone();
            let act = act.clone();
            async move {
                act.active.fetch_add(1, Ordering::Relaxed);
                let resp = proxy::handle(req, &info, &shared).await;
                act.last_ms
                    .store(act.start.elapsed().as_millis() as u64, Ordering::Relaxed);
                act.active.fetch_sub(1, Ordering::Relaxed);
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = self.builder.serve_connection_with_upgrades(io, svc);
        tokio::pin!(conn);
        let stop = self.shared.shutdown.reached(Phase::Stopping);
        tokio::pin!(stop);
        let idle = idle_watch(activity, self.idle);
        tokio::pin!(idle);
        let mut closing = false;
        loop {
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        tracing::debug!(error = %e, "client connection ended with an error");
                    }
                    break;
                }
                _ = &mut stop, if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ = &mut idle, if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
        self.gauge.dec();
        drop(self.tracked);
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
