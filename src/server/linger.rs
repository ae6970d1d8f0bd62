//! Lingering close: before a client connection that Spillway closes is
//! dropped, its write side is shut down (the reply is flushed and the client
//! sees EOF) and whatever the client still sends is read and thrown away, for
//! a bounded time and size.
//!
//! Without it, an early reply (413 for a body over `max_request_body`, 431,
//! 408, 400) races the client's upload: closing a socket with unread bytes
//! in its receive buffer makes the kernel send a reset, and a reset makes the
//! client's kernel discard the reply it had already received. nginx
//! (`lingering_close`) and HAProxy do the same.
//!
//! Bounds ([`Bounds::DEFAULT`]): 2 s in all, 1 s without data, 4 MiB
//! discarded; one 8 KiB buffer, allocated only while lingering. A client
//! that closes its side (or that already had, the ordinary keep-alive
//! close) ends it at once.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// How long and how much a lingering close may read.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bounds {
    /// From the start of lingering to the close, whatever the client does.
    pub(crate) total: Duration,
    /// The close comes this long after the last byte from the client.
    pub(crate) quiet: Duration,
    /// At most this many bytes are read and discarded.
    pub(crate) max_bytes: u64,
}

impl Bounds {
    /// 4 MiB covers what a fast client has in flight when the reply is
    /// written (socket buffers autotune to a few MiB), so its upload drains
    /// and it reads the reply instead of a reset; 2 s and 1 s keep a client
    /// that never stops or never closes from holding the connection slot.
    pub(crate) const DEFAULT: Bounds = Bounds {
        total: Duration::from_secs(2),
        quiet: Duration::from_secs(1),
        max_bytes: 4 * 1024 * 1024,
    };
}

/// Why lingering ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The client closed its side (or the connection failed).
    Closed,
    /// Nothing arrived for `quiet`.
    Quiet,
    /// `total` elapsed.
    TimeUp,
    /// `max_bytes` were discarded.
    SizeCap,
}

const BUF: usize = 8 * 1024;

/// Shuts down `stream`'s write side, then reads and discards until the client
/// closes or a bound is reached. Returns why it ended and how many bytes were
/// discarded. The caller drops (closes) the stream afterwards.
pub(crate) async fn linger<S>(stream: &mut S, bounds: Bounds) -> (Ended, u64)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = Instant::now() + bounds.total;
    // Flushes what is buffered (a TLS close_notify too) and sends FIN. A
    // client that does not read can stall the flush: bounded like the rest.
    match tokio::time::timeout_at(deadline, stream.shutdown()).await {
        Ok(Ok(())) => {}
        // Already shut down or reset: the read below sees the same.
        Ok(Err(e)) if is_gone(&e) => return (Ended::Closed, 0),
        Ok(Err(_)) => {}
        Err(_) => return (Ended::TimeUp, 0),
    }
    let mut buf = vec![0u8; BUF];
    let mut discarded = 0u64;
    loop {
        let quiet_until = (Instant::now() + bounds.quiet).min(deadline);
        match tokio::time::timeout_at(quiet_until, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (Ended::Closed, discarded),
            Ok(Ok(n)) => {
                discarded += n as u64;
                if discarded >= bounds.max_bytes {
                    return (Ended::SizeCap, discarded);
                }
            }
            Err(_) if quiet_until >= deadline => return (Ended::TimeUp, discarded),
            Err(_) => return (Ended::Quiet, discarded),
        }
    }
}

fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotConnected | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Bounds = Bounds {
        total: Duration::from_secs(2),
        quiet: Duration::from_secs(1),
        max_bytes: 64 * 1024,
    };

    #[tokio::test(start_paused = true)]
    async fn client_close_ends_it_at_once() {
        let (mut server, mut client) = tokio::io::duplex(1024);
        client.write_all(b"late body bytes").await.unwrap();
        drop(client);
        let start = Instant::now();
        assert_eq!(linger(&mut server, B).await, (Ended::Closed, 15));
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_closed_after_the_quiet_gap() {
        let (mut server, mut client) = tokio::io::duplex(1024);
        let start = Instant::now();
        assert_eq!(linger(&mut server, B).await, (Ended::Quiet, 0));
        assert_eq!(start.elapsed(), B.quiet);
        // The write side was shut down first: the client sees EOF.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickling_client_is_closed_at_the_total_bound() {
        let (mut server, mut client) = tokio::io::duplex(1024);
        let feeder = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if client.write_all(b"x").await.is_err() {
                    return;
                }
            }
        });
        let start = Instant::now();
        let (ended, n) = linger(&mut server, B).await;
        assert_eq!(ended, Ended::TimeUp);
        assert_eq!(start.elapsed(), B.total);
        assert_eq!(n, 6);
        drop(server);
        feeder.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_flooding_client_is_closed_at_the_size_cap() {
        let (mut server, mut client) = tokio::io::duplex(64 * 1024);
        let feeder = tokio::spawn(async move {
            let chunk = vec![b'x'; 4096];
            while client.write_all(&chunk).await.is_ok() {}
        });
        let (ended, n) = linger(&mut server, B).await;
        assert_eq!(ended, Ended::SizeCap);
        assert!(n >= B.max_bytes && n < B.max_bytes + BUF as u64, "{n}");
        drop(server);
        feeder.await.unwrap();
    }
}
