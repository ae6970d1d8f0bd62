//! Idle connections per endpoint.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Weak;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::ReadBuf;
use tokio::time::{Instant, Sleep};

use super::Io;
use super::READ_CHUNK;
use crate::proxy::io::UpstreamIo;

/// An upstream connection and its read buffer, which stays with it in the
/// pool so a request on a pooled connection allocates no buffer; so does
/// what its pooled exchanges reuse ([`Kept`]).
pub(crate) struct Conn<T = UpstreamIo> {
    pub(super) io: T,
    pub(super) buf: BytesMut,
    /// Made at the first pooled exchange. Boxed: the connection travels
    /// inside the response body, which is moved on its way to the client.
    pub(super) kept: Option<Pin<Box<Kept>>>,
}

pin_project_lite::pin_project! {
    /// What a pooled connection's exchanges reuse.
    #[derive(Default)]
    pub(crate) struct Kept {
        // Request heads are split off the front of it; once the previous
        // head is dropped (its exchange has ended) its bytes are written over.
        head_buf: BytesMut,
        // The per-try deadline's timer (see `Kept::timer`), where a new
        // timer per exchange would be registered in the timer wheel and
        // deregistered each time.
        #[pin]
        timer: Option<Sleep>,
    }
}

impl Kept {
    /// The timer, due at `deadline` or before it (made if there was none).
    /// One still waiting for an earlier deadline, an earlier exchange's, is
    /// left where it is: resetting it costs more than the rare early wake,
    /// after which the caller moves it to its own deadline. Deadlines
    /// mostly grow from one exchange to the next, so the timer is reset
    /// about once per deadline's length, not once per exchange.
    pub(super) fn timer(self: Pin<&mut Self>, deadline: Instant) -> Option<Pin<&mut Sleep>> {
        let mut timer = self.project().timer;
        match timer.as_mut().as_pin_mut() {
            Some(t) if t.deadline() == deadline => {}
            Some(t) if t.deadline() < deadline && !t.is_elapsed() => {}
            Some(t) => t.reset(deadline),
            None => timer.set(Some(tokio::time::sleep_until(deadline))),
        }
        timer.as_pin_mut()
    }
}

impl<T> Conn<T> {
    /// A connection that has not carried an exchange yet.
    pub(crate) fn new(io: T) -> Self {
        Conn {
            io,
            buf: BytesMut::new(),
            kept: None,
        }
    }

    /// Encodes a request head (see [`encode_head`](super::encode_head)) into
    /// this connection's head buffer.
    pub(crate) fn encode_head(
        &mut self,
        method: &http::Method,
        target: &str,
        headers: &http::HeaderMap,
        fwd: Option<&crate::proxy::headers::Forwarded>,
        body: &crate::proxy::request_body::UpstreamBody,
    ) -> Bytes {
        let kept = self.kept.get_or_insert_with(Default::default);
        let out = kept.as_mut().project().head_buf;
        // Room for most heads, so one slightly longer than the last does not
        // grow the buffer, and the head's size need not be added up first; a
        // buffer no other head shares is written over from its start rather
        // than grown.
        out.reserve(HEAD_BUF);
        super::encode::encode_head_into(out, method, target, headers, fwd, body, false);
        out.split().freeze()
    }

    /// Frees the read buffer and what the exchanges reuse: the next
    /// exchange makes them again. Dropped by the caller, outside the lock.
    fn release(&mut self) -> (BytesMut, Option<Pin<Box<Kept>>>) {
        (std::mem::take(&mut self.buf), self.kept.take())
    }

    /// Holds anything [`Conn::release`] would free.
    fn holds_memory(&self) -> bool {
        self.buf.capacity() > 0 || self.kept.is_some()
    }
}

// === Pool ===

/// The idle connections of one endpoint, newest last. Bounded by
/// `pool.max_idle_per_endpoint`; a connection idle longer than
/// `pool.idle_timeout` is closed when the pool is next touched, and one the
/// upstream has closed is noticed at checkout without a system call (the
/// readiness the event loop already recorded).
pub(crate) struct Pool<T = UpstreamIo> {
    idle: Mutex<VecDeque<IdleConn<T>>>,
    max_idle: usize,
    idle_timeout: Duration,
}

struct IdleConn<T> {
    conn: Conn<T>,
    since: Instant,
    /// `since + idle_timeout`, kept so a checkout compares instants rather
    /// than computing a duration (none if it overflows: never expires).
    expires: Option<Instant>,
}

/// What a connection's head buffer makes room for at least.
const HEAD_BUF: usize = 1024;

/// How many of the most recently used idle connections keep their buffer.
const BUFFERED_IDLE: usize = 16;

/// A pooled connection keeps a read buffer up to this size (idle memory
/// stays at most this much per pooled connection).
const KEEP_BUFFER: usize = READ_CHUNK;

/// A connection idle this long gives up its buffers and timer at the
/// reaper's next round (the next request on it makes them again).
const RELEASE_BUFFER_AFTER: Duration = Duration::from_secs(1);

impl<T: Io> Pool<T> {
    /// An empty pool keeping at most `max_idle` connections, each for at most `idle_timeout`.
    pub(crate) fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Pool {
            idle: Mutex::new(VecDeque::new()),
            max_idle,
            idle_timeout,
        }
    }

    /// The most recently used live connection, if any, now.
    #[cfg(test)]
    pub(crate) fn checkout(&self) -> Option<Conn<T>> {
        self.checkout_at(Instant::now())
    }

    /// The most recently used live connection, if any, at `now` (the
    /// caller has just read the clock).
    pub(crate) fn checkout_at(&self, now: Instant) -> Option<Conn<T>> {
        loop {
            let candidate = {
                let mut idle = self.idle.lock();
                // Oldest first: drop what has idled too long.
                while idle
                    .front()
                    .is_some_and(|c| c.expires.is_some_and(|e| now >= e))
                {
                    idle.pop_front();
                }
                idle.pop_back()
            };
            let mut idle = candidate?;
            if is_alive(&mut idle.conn.io) {
                return Some(idle.conn);
            }
        }
    }

    /// Closes the idle connections that have expired or that the upstream
    /// closed (or sent stray bytes on), and frees the buffers and timers of
    /// those idle for [`RELEASE_BUFFER_AFTER`]: a quiet endpoint's pool then
    /// holds sockets only. Connections and buffers are dropped outside the lock:
    /// closing a socket is a system call.
    pub(super) fn reap(&self) {
        let now = Instant::now();
        type Released = (BytesMut, Option<Pin<Box<Kept>>>);
        let (dropped, released): (Vec<IdleConn<T>>, Vec<Released>) = {
            let mut idle = self.idle.lock();
            let mut dropped = Vec::new();
            let mut released = Vec::new();
            let mut kept = VecDeque::with_capacity(idle.len());
            for mut c in idle.drain(..) {
                let idled = now.duration_since(c.since);
                if idled >= self.idle_timeout || !is_alive(&mut c.conn.io) {
                    dropped.push(c);
                } else {
                    if idled >= RELEASE_BUFFER_AFTER && c.conn.holds_memory() {
                        released.push(c.conn.release());
                    }
                    kept.push_back(c);
                }
            }
            *idle = kept;
            (dropped, released)
        };
        drop(dropped);
        drop(released);
    }

    /// Returns a connection whose exchange ended cleanly.
    pub(super) fn checkin(&self, mut conn: Conn<T>) {
        if self.max_idle == 0 {
            return;
        }
        if conn.buf.capacity() > KEEP_BUFFER {
            conn.buf = BytesMut::new();
        }
        // The timer keeps the waker of the task that last polled it, and so
        // that task's allocation, until the next exchange polls it or the
        // reaper frees it (idle for RELEASE_BUFFER_AFTER, seen at its next
        // round): one per pooled connection, for seconds at most; if it
        // fires meanwhile, that task is polled once for nothing. Trading it
        // for a no-op waker at every check-in cost ~150 instructions per
        // request.
        if let Some(kept) = &mut conn.kept {
            let head_buf = kept.as_mut().project().head_buf;
            if head_buf.capacity() > KEEP_BUFFER {
                *head_buf = BytesMut::new();
            }
        }
        let released = {
            let mut idle = self.idle.lock();
            if idle.len() >= self.max_idle {
                idle.pop_front();
            }
            let since = Instant::now();
            idle.push_back(IdleConn {
                conn,
                since,
                expires: since.checked_add(self.idle_timeout),
            });
            // Checkout is newest first, so connections deep in the pool are
            // rarely used: only the newest few keep their buffers.
            idle.len()
                .checked_sub(BUFFERED_IDLE + 1)
                .map(|deep| idle[deep].conn.release())
        };
        // Outside the lock: dropping a timer takes the timer driver's.
        drop(released);
    }

    /// Idle connections held now.
    #[cfg(test)]
    pub(crate) fn idle_count(&self) -> usize {
        self.idle.lock().len()
    }

    /// The read buffer capacity of each idle connection, oldest first.
    #[cfg(test)]
    pub(crate) fn idle_buffers(&self) -> Vec<usize> {
        self.idle
            .lock()
            .iter()
            .map(|c| c.conn.buf.capacity())
            .collect()
    }
}

/// How often the reaper looks at idle connections: half the idle timeout,
/// so a connection outlives it by at most that much, within [100ms, 5s].
pub(crate) fn reap_period(idle_timeout: Duration) -> Duration {
    (idle_timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// The background task that closes one upstream's expired idle connections,
/// so a quiet endpoint does not hold sockets (half-closed by the upstream)
/// until its next request. It holds the pools weakly and ends when they are
/// gone; dropping the `Reaper` (with its upstream) stops it at once.
pub(crate) struct Reaper {
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl Reaper {
    /// Starts the reaper for `pools` (one upstream's endpoints), named
    /// `upstream` in its logs. Needs a Tokio runtime.
    pub(crate) fn spawn<T: Io>(upstream: &str, pools: Vec<Weak<Pool<T>>>) -> Reaper {
        let upstream = upstream.to_string();
        let period = pools
            .iter()
            .filter_map(Weak::upgrade)
            .map(|p| reap_period(p.idle_timeout))
            .min()
            .unwrap_or(Duration::from_secs(5));
        let task = async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tracing::debug!(upstream = %upstream, ?period, "idle connection reaper started");
            loop {
                tick.tick().await;
                let mut any = false;
                for pool in pools.iter().filter_map(Weak::upgrade) {
                    any = true;
                    pool.reap();
                }
                if !any {
                    break;
                }
            }
            tracing::debug!(upstream = %upstream, "idle connection reaper stopped: upstream gone");
        };
        Reaper {
            handle: Some(tokio::spawn(task)),
        }
    }

    /// The task's handle, to await its end (it is no longer stopped on drop).
    #[cfg(test)]
    pub(crate) fn into_handle(mut self) -> tokio::task::JoinHandle<()> {
        match self.handle.take() {
            Some(h) => h,
            None => tokio::spawn(async {}),
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

/// An idle connection is usable when reading it would block: end of stream
/// or unexpected bytes mean the upstream closed it or broke the protocol.
fn is_alive<T: Io>(io: &mut T) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    matches!(Pin::new(io).poll_read(&mut cx, &mut buf), Poll::Pending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::h1::script::{Ev, Script};
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    #[tokio::test]
    async fn only_the_newest_idle_connections_keep_a_read_buffer() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let n = BUFFERED_IDLE + 4;
        let accept = tokio::spawn(async move {
            let mut held = Vec::new();
            for _ in 0..n {
                held.push(l.accept().await.unwrap().0);
            }
            held
        });
        let pool = Pool::new(64, Duration::from_secs(60));
        for _ in 0..n {
            let io = UpstreamIo::Plain(TcpStream::connect(addr).await.unwrap());
            pool.checkin(Conn {
                io,
                buf: BytesMut::with_capacity(1024),
                kept: None,
            });
        }
        let _held = accept.await.unwrap();
        let buffered: Vec<bool> = pool
            .idle
            .lock()
            .iter()
            .map(|c| c.conn.buf.capacity() > 0)
            .collect();
        assert_eq!(buffered.iter().filter(|b| **b).count(), BUFFERED_IDLE);
        assert!(
            buffered[n - BUFFERED_IDLE..].iter().all(|b| *b),
            "the newest keep theirs"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_expire_and_the_pool_is_bounded() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let mut held = Vec::new();
            for _ in 0..3 {
                held.push(l.accept().await.unwrap().0);
            }
            held
        });
        let pool = Pool::new(2, Duration::from_secs(10));
        for _ in 0..3 {
            pool.checkin(Conn::new(UpstreamIo::Plain(
                TcpStream::connect(addr).await.unwrap(),
            )));
        }
        let _held = accept.await.unwrap();
        assert_eq!(
            pool.idle_count(),
            2,
            "max_idle_per_endpoint bounds the pool"
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(
            pool.checkout().is_none(),
            "expired connections are closed, not handed out"
        );
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_reaper_closes_idle_connections_without_further_requests() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let idle_timeout = Duration::from_secs(10);
        let pool = Arc::new(Pool::new(8, idle_timeout));
        let reaper = Reaper::spawn("app", vec![Arc::downgrade(&pool)]);
        let client = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = l.accept().await.unwrap();
        pool.checkin(Conn::new(UpstreamIo::Plain(client)));
        let start = Instant::now();
        // The upstream sees its connection closed: no request touched the pool.
        let mut byte = [0u8; 1];
        assert_eq!(server.read(&mut byte).await.unwrap(), 0);
        let waited = start.elapsed();
        assert!(
            waited >= idle_timeout,
            "not before the idle timeout: {waited:?}"
        );
        assert!(
            waited <= idle_timeout + reap_period(idle_timeout),
            "within one period after it: {waited:?}"
        );
        assert_eq!(pool.idle_count(), 0);
        drop(reaper);
    }

    #[tokio::test(start_paused = true)]
    async fn the_reaper_drops_connections_the_upstream_closed_and_stops_with_the_pool() {
        let pool = Arc::new(Pool::new(8, Duration::from_secs(60)));
        let reaper = Reaper::spawn("app", vec![Arc::downgrade(&pool)]);
        let (open, io) = Script::new([]);
        pool.checkin(Conn::new(io));
        let (closed, io) = Script::new([]);
        pool.checkin(Conn::new(io));
        closed.push(Ev::Eof);
        tokio::time::sleep(reap_period(Duration::from_secs(60)) * 2).await;
        assert!(closed.closed(), "closed by the upstream: dropped");
        assert!(!open.closed(), "still idle and open: kept");
        assert_eq!(pool.idle_count(), 1);
        drop(pool);
        // With no pool left the task ends by itself.
        let handle = reaper.into_handle();
        tokio::time::timeout(Duration::from_secs(60), handle)
            .await
            .expect("the reaper stops once its pools are gone")
            .unwrap();
        assert!(open.closed());
    }
}
