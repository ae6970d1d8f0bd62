//! Idle connections per endpoint.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::ReadBuf;
use tokio::time::Instant;

use super::conn::Conn;
use super::Io;
use super::READ_CHUNK;
use crate::proxy::upstream::UpstreamIo;

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
}

/// How many of the most recently used idle connections keep their buffer.
const BUFFERED_IDLE: usize = 16;

/// A pooled connection keeps a read buffer up to this size (idle memory
/// stays at most this much per pooled connection).
const KEEP_BUFFER: usize = READ_CHUNK;

impl<T: Io> Pool<T> {
    pub(crate) fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Pool {
            idle: Mutex::new(VecDeque::new()),
            max_idle,
            idle_timeout,
        }
    }

    /// The most recently used live connection, if any.
    pub(crate) fn checkout(&self) -> Option<Conn<T>> {
        loop {
            let candidate = {
                let mut idle = self.idle.lock();
                let now = Instant::now();
                // Oldest first: drop what has idled too long.
                while idle
                    .front()
                    .is_some_and(|c| now.duration_since(c.since) >= self.idle_timeout)
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

    /// Returns a connection whose exchange ended cleanly.
    pub(super) fn checkin(&self, mut conn: Conn<T>) {
        if self.max_idle == 0 {
            return;
        }
        if conn.buf.capacity() > KEEP_BUFFER {
            conn.buf = BytesMut::new();
        }
        let mut idle = self.idle.lock();
        if idle.len() >= self.max_idle {
            idle.pop_front();
        }
        idle.push_back(IdleConn {
            conn,
            since: Instant::now(),
        });
        // Checkout is newest first, so connections deep in the pool are rarely
        // used: only the newest few keep their read buffer.
        if let Some(deep) = idle.len().checked_sub(BUFFERED_IDLE + 1) {
            idle[deep].conn.buf = BytesMut::new();
        }
    }

    /// Idle connections held now.
    #[cfg(test)]
    pub(crate) fn idle_count(&self) -> usize {
        self.idle.lock().len()
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
}
