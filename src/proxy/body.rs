//! The response's body on its way to the client.
//!
//! * [`RespBody`]: an upstream's response body (Spillway's HTTP/1.1 client or
//!   hyper's HTTP/2 one).
//! * [`ProxyBody`]: what the client receives: a local reply or the upstream's
//!   body wrapped with the request's guard, so the route permit is held until
//!   the last byte (or an error, or the client going away).
//!
//! The request side lives in `request_body`.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::outcome::{find_client_fault, ClientFault};
use super::request_body::IdleTimer;

pub(crate) use super::outcome::BoxError;
pub(crate) use super::request_body::{ClientWait, RequestBody, UpstreamBody};

/// Why Spillway itself ended a response body. (The client's request body
/// fails with a [`ClientBodyError`] instead: that is the client's fault.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// No bytes for `response_body_idle`.
    IdleTimeout,
    /// The request deadline passed.
    RequestTimeout,
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::IdleTimeout => f.write_str("body idle timeout"),
            BodyError::RequestTimeout => f.write_str("request deadline passed"),
        }
    }
}

impl StdError for BodyError {}

// === RespBody ===

/// An upstream's response body: from Spillway's HTTP/1.1 client or from
/// hyper's (HTTP/2). The large variant is not boxed: the body already lives
/// inside the boxed `UpstreamResponse`, and a second box would cost an
/// allocation per request.
#[allow(clippy::large_enum_variant)]
pub(crate) enum RespBody {
    H1(super::h1::H1Body),
    Hyper(Incoming),
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RespBody::H1(b) => Pin::new(b).poll_frame(cx),
            RespBody::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|e| Box::new(e) as BoxError))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::H1(b) => b.is_end_stream(),
            RespBody::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::H1(b) => b.size_hint(),
            RespBody::Hyper(b) => b.size_hint(),
        }
    }
}

// === ProxyBody ===

/// Something that must live exactly as long as the response body: permits and
/// end-of-request bookkeeping. `finish` is told whether the body completed,
/// and when (the body's poll has often just read the clock).
/// Held by value inside the (already boxed) response state, so a request
/// costs no allocation of its own for it.
pub(crate) trait BodyGuard: Send + 'static {
    fn finish(self, outcome: BodyOutcome, now: Instant);
}

/// The guard the proxy hands its response bodies.
type Guard = super::RequestGuard;

/// How a response body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BodyOutcome {
    Complete,
    /// The upstream broke its response body.
    Error,
    /// The client's request body failed while the response streamed (full
    /// duplex): the client's fault.
    Client(ClientFault),
    IdleTimeout,
    /// The request deadline (`timeouts.request`) passed while the body streamed.
    RequestTimeout,
    /// The client went away before the end.
    Dropped,
}

/// The body sent to the client.
pub struct ProxyBody {
    kind: Kind,
}

enum Kind {
    Empty,
    Full(Option<Bytes>),
    Upstream(Box<UpstreamResponse>),
}

struct UpstreamResponse {
    inner: RespBody,
    guard: Option<Guard>,
    timer: IdleTimer,
    /// The whole exchange must end by the request deadline.
    deadline: Instant,
    deadline_sleep: Option<Pin<Box<Sleep>>>,
    /// The body's declared length, and how much of it the client has been
    /// given: a codec may drop a body once its length is written without
    /// polling for the end, which is a complete response, not a client abort.
    expected: Option<u64>,
    delivered: u64,
}

impl UpstreamResponse {
    fn finish(&mut self, outcome: BodyOutcome) {
        self.finish_at(outcome, None);
    }

    /// [`UpstreamResponse::finish`] at `now`, when the caller has read the clock.
    fn finish_at(&mut self, outcome: BodyOutcome, now: Option<Instant>) {
        if let Some(g) = self.guard.take() {
            g.finish(outcome, now.unwrap_or_else(Instant::now));
        }
    }
}

impl Drop for UpstreamResponse {
    fn drop(&mut self) {
        let complete = self.expected.is_some_and(|n| self.delivered >= n);
        self.finish(if complete {
            BodyOutcome::Complete
        } else {
            BodyOutcome::Dropped
        });
    }
}

impl ProxyBody {
    /// A body with no bytes (an empty local reply, or the response to an upgrade).
    pub(crate) fn empty() -> Self {
        ProxyBody { kind: Kind::Empty }
    }

    /// A body of exactly `b` (a local reply's bytes).
    pub(crate) fn full(b: Bytes) -> Self {
        ProxyBody {
            kind: Kind::Full(Some(b)),
        }
    }

    /// The upstream's body; `guard` is finished when it ends.
    pub(crate) fn upstream(
        inner: RespBody,
        guard: Guard,
        idle: Duration,
        deadline: Instant,
    ) -> Self {
        let mut resp = UpstreamResponse {
            inner,
            guard: Some(guard),
            timer: IdleTimer::new(idle),
            deadline,
            deadline_sleep: None,
            expected: None,
            delivered: 0,
        };
        resp.expected = resp.inner.size_hint().exact();
        if resp.inner.is_end_stream() {
            // An empty body (204, HEAD, ...) is never polled: release at once.
            resp.finish(BodyOutcome::Complete);
        }
        ProxyBody {
            kind: Kind::Upstream(Box::new(resp)),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            Kind::Upstream(u) => match Pin::new(&mut u.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    // Read once: for the deadline, and as the end of the
                    // request if this frame is the last.
                    let now = u.guard.is_some().then(Instant::now);
                    if now.is_some_and(|now| now >= u.deadline) {
                        u.finish_at(BodyOutcome::RequestTimeout, now);
                        return Poll::Ready(Some(Err(Box::new(BodyError::RequestTimeout))));
                    }
                    u.timer.progress();
                    if let Some(d) = frame.data_ref() {
                        u.delivered += d.len() as u64;
                    }
                    if u.inner.is_end_stream() {
                        u.finish_at(BodyOutcome::Complete, now);
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    u.finish(match find_client_fault(e.as_ref()) {
                        Some(fault) => BodyOutcome::Client(fault),
                        None => BodyOutcome::Error,
                    });
                    Poll::Ready(Some(Err(e)))
                }
                Poll::Ready(None) => {
                    u.finish(BodyOutcome::Complete);
                    Poll::Ready(None)
                }
                Poll::Pending => {
                    if u.guard.is_none() {
                        return Poll::Pending;
                    }
                    let deadline = u.deadline;
                    let sleep = u
                        .deadline_sleep
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if sleep.as_mut().poll(cx).is_ready() {
                        u.finish(BodyOutcome::RequestTimeout);
                        return Poll::Ready(Some(Err(Box::new(BodyError::RequestTimeout))));
                    }
                    ready!(u.timer.poll_expired(cx));
                    u.finish(BodyOutcome::IdleTimeout);
                    Poll::Ready(Some(Err(Box::new(BodyError::IdleTimeout))))
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(b) => b.is_none(),
            Kind::Upstream(u) => u.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |d| d.len() as u64)),
            Kind::Upstream(u) => u.inner.size_hint(),
        }
    }
}
