//! The request's body on its way up.
//!
//! * [`RequestBody`]: the client's body, with the route's size limit
//!   (`max_request_body`) and the idle gap limit enforced while streaming.
//!   Every error it yields is a `ClientBodyError`: the client's fault.
//! * [`UpstreamBody`]: what the upstream client sends (streamed, replayable
//!   bytes for retries, or nothing).
//!
//! Buffering is bounded: frames are passed through one at a time (hyper's own
//! buffers apply backpressure); only retry replay buffers, up to
//! `retries.max_buffered_body`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::outcome::{BoxError, ClientBodyError, ClientFault};

/// A lazily armed idle timer: it allocates only when a poll has to wait, so
/// bodies that are ready at once pay nothing.
pub(crate) struct IdleTimer {
    idle: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    progressed: bool,
}

impl IdleTimer {
    /// An unarmed timer: nothing is allocated until a poll has to wait.
    pub(crate) fn new(idle: Duration) -> Self {
        IdleTimer {
            idle,
            sleep: None,
            progressed: false,
        }
    }

    /// Called when the inner body made progress.
    pub(crate) fn progress(&mut self) {
        self.progressed = true;
    }

    /// Called when the inner body is pending: Ready means the idle gap expired.
    pub(crate) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let now = Instant::now();
        match &mut self.sleep {
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(now + self.idle))),
            Some(s) if self.progressed => s.as_mut().reset(now + self.idle),
            Some(_) => {}
        }
        self.progressed = false;
        match &mut self.sleep {
            Some(s) => s.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

// === RequestBody ===

/// The client's request body, limited and idle-timed. Every error it yields
/// is a [`ClientBodyError`]: the client's fault, wherever it surfaces.
pub(crate) struct RequestBody {
    inner: Incoming,
    limit: u64,
    seen: u64,
    timer: IdleTimer,
    failed: bool,
    waiting: Option<Arc<ClientWait>>,
}

/// Whether a streamed request body is waiting for the client's bytes (its
/// last poll found nothing), read when an attempt times out: a timeout while
/// the body waits on the client is the client's, not the upstream's.
#[derive(Default)]
pub(crate) struct ClientWait(AtomicBool);

impl ClientWait {
    /// The body is waiting for the client and has not ended.
    pub(crate) fn waiting(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl RequestBody {
    /// Wraps the client's body: more than `limit` bytes, or a gap longer than `idle`, is an error.
    pub(crate) fn new(inner: Incoming, limit: u64, idle: Duration) -> Self {
        RequestBody {
            inner,
            limit,
            seen: 0,
            timer: IdleTimer::new(idle),
            failed: false,
            waiting: None,
        }
    }

    /// A handle telling whether this body is waiting for the client.
    pub(crate) fn client_wait(&mut self) -> Arc<ClientWait> {
        self.waiting.get_or_insert_with(Default::default).clone()
    }

    fn set_waiting(&self, waiting: bool) {
        if let Some(w) = &self.waiting {
            w.0.store(waiting, Ordering::Relaxed);
        }
    }

    fn fail(&mut self, e: ClientBodyError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.failed = true;
        self.set_waiting(false);
        Poll::Ready(Some(Err(Box::new(e))))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.timer.progress();
                this.set_waiting(false);
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.limit {
                        return this.fail(ClientBodyError::new(ClientFault::TooLarge));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => this.fail(ClientBodyError::from_incoming(e)),
            Poll::Ready(None) => {
                this.set_waiting(false);
                Poll::Ready(None)
            }
            Poll::Pending => {
                this.set_waiting(true);
                ready!(this.timer.poll_expired(cx));
                this.fail(ClientBodyError::new(ClientFault::Stalled))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// === UpstreamBody ===

/// What is sent upstream.
pub(crate) enum UpstreamBody {
    Empty,
    Stream(RequestBody),
    /// A buffered body, replayable for retries (cheap `Bytes` clone).
    Replay(Option<Bytes>),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut *self {
            UpstreamBody::Empty => Poll::Ready(None),
            UpstreamBody::Stream(b) => Pin::new(b).poll_frame(cx),
            UpstreamBody::Replay(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Empty => true,
            UpstreamBody::Stream(b) => b.is_end_stream(),
            UpstreamBody::Replay(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Stream(b) => b.size_hint(),
            UpstreamBody::Replay(b) => {
                SizeHint::with_exact(b.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
