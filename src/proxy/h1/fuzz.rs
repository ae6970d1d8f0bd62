//! The client driven over a byte stream held in memory, for the fuzz
//! targets (`spillway::fuzz_api::h1_response`): no sockets, no runtime, no
//! timers. Reads hand out the given chunks in order and then end the
//! stream; writes are accepted and dropped. Nothing here ever returns
//! `Pending`, so an exchange that does not finish within a bounded number
//! of polls is a hang in the client, reported as a panic.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{encode_head, exchange, Conn, Pool, UpstreamBody};
use crate::proxy::headers::Forwarded;

/// An upstream whose whole answer is known up front.
struct MemIo {
    reads: VecDeque<Bytes>,
    /// Largest read handed out at once (the client's buffer may be larger).
    max_read: usize,
}

impl AsyncRead for MemIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let max = self.max_read;
        // An empty chunk would read as the end of the stream: skip them.
        while self.reads.front().is_some_and(Bytes::is_empty) {
            self.reads.pop_front();
        }
        if let Some(front) = self.reads.front_mut() {
            let n = front.len().min(buf.remaining()).min(max);
            buf.put_slice(&front.split_to(n));
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for MemIo {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// What one exchange produced (only what the invariants look at).
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    status: Option<StatusCode>,
    body: Vec<u8>,
    trailers: bool,
    /// The body ended with an error (or the exchange did).
    failed: bool,
}

/// Polls `fut` with a no-op waker; `None` if it is still pending after
/// `limit` polls.
fn poll_bounded<F: Future>(fut: F, limit: usize) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..limit {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return Some(v);
        }
    }
    None
}

/// One exchange of `method` (with `body`) answered by `reads`.
fn run(method: &Method, body: Option<Bytes>, reads: Vec<Bytes>, max_read: usize) -> Outcome {
    let total: usize = reads.iter().map(Bytes::len).sum();
    let io = MemIo {
        reads: reads.into(),
        max_read: max_read.max(1),
    };
    let pool: Arc<Pool<MemIo>> = Arc::new(Pool::new(4, Duration::from_secs(60)));
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("upstream"));
    let body = UpstreamBody::Replay(body);
    let head = encode_head(method, "/fuzz", &headers, None, &body).freeze();
    // Every poll reads at least one byte or finishes: the input's length
    // (in reads of at least one byte) bounds the polls, with room for
    // framing steps that read nothing.
    let limit = 64 + 4 * total;
    let fut = exchange(Conn::new(io), false, head, body, method, pool);
    let resp = match poll_bounded(fut, limit) {
        Some(Ok(r)) => r,
        Some(Err(_)) => {
            return Outcome {
                status: None,
                body: Vec::new(),
                trailers: false,
                failed: true,
            }
        }
        None => panic!("the response head did not finish within {limit} polls"),
    };
    let status = resp.status();
    let mut b = resp.into_body();
    let mut out = Outcome {
        status: Some(status),
        body: Vec::new(),
        trailers: false,
        failed: false,
    };
    if b.take_upgraded().is_some() {
        return out;
    }
    let mut cx = Context::from_waker(Waker::noop());
    let mut polls = 0;
    loop {
        polls += 1;
        assert!(
            polls <= limit,
            "the response body did not finish within {limit} polls"
        );
        match Pin::new(&mut b).poll_frame(&mut cx) {
            Poll::Ready(None) => break,
            Poll::Ready(Some(Err(_))) => {
                out.failed = true;
                break;
            }
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(d) => {
                    out.body.extend_from_slice(&d);
                    assert!(
                        out.body.len() <= total,
                        "decoded body ({} bytes) longer than the input ({total})",
                        out.body.len()
                    );
                }
                Err(f) => {
                    assert!(f.is_trailers(), "a frame neither data nor trailers");
                    assert!(!out.trailers, "two trailer sections");
                    out.trailers = true;
                }
            },
            Poll::Pending => panic!("the response body is pending on a stream that never is"),
        }
    }
    assert!(
        b.is_end_stream(),
        "the body ended but does not say it has ended"
    );
    let bodiless = *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    if bodiless {
        assert!(
            out.body.is_empty(),
            "a {status} response to {method} with a body"
        );
        assert!(
            !out.trailers,
            "a {status} response to {method} with trailers"
        );
    }
    out
}

/// Feeds `data` as an upstream's bytes to the client for a GET, a HEAD and
/// a POST with a small body: in one read, split in two at an offset taken
/// from the data, and in small reads. Panics on a hang or a broken
/// invariant; an error response is fine.
pub(crate) fn response(data: &[u8]) {
    let whole = Bytes::copy_from_slice(data);
    let first = data.first().copied().unwrap_or(0) as usize;
    let last = data.last().copied().unwrap_or(0) as usize;
    let at = if data.is_empty() {
        0
    } else {
        (first * 251 + last) % (data.len() + 1)
    };
    let post = Some(Bytes::from_static(b"fuzz=1"));
    for (method, body) in [
        (Method::GET, None),
        (Method::HEAD, None),
        (Method::POST, post),
    ] {
        let one = run(&method, body.clone(), vec![whole.clone()], usize::MAX);
        let split = run(
            &method,
            body.clone(),
            vec![whole.slice(..at), whole.slice(at..)],
            usize::MAX,
        );
        // How the bytes arrive must not change what they mean.
        assert_eq!(one, split, "{method}: one read vs split at {at}");
        if data.len() <= 4096 {
            let small = run(&method, body, vec![whole.clone()], 1 + last % 7);
            assert_eq!(
                one,
                small,
                "{method}: one read vs reads of {}",
                1 + last % 7
            );
        }
    }
}

/// The request head the client writes for `method` and `target` with
/// these headers and forwarding headers, and a buffered body (or none).
pub(crate) fn request_head(
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    fwd: &Forwarded,
    body: Option<Bytes>,
) -> BytesMut {
    encode_head(
        method,
        target,
        headers,
        Some(fwd),
        &UpstreamBody::Replay(body),
    )
}
