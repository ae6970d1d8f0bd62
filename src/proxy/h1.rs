//! Spillway's own HTTP/1.1 upstream client, driven inside the task that
//! serves the client's request.
//!
//! hyper-util's pooled client runs every upstream connection as a task of its
//! own and talks to it through channels: each request costs a pool checkout
//! keyed by a hashed URI, a channel hop to the connection task, a oneshot back
//! and a spawned task that waits to return the connection to the pool. Here a
//! request *owns* its upstream connection from checkout to the last byte of
//! the response: the head is written, the response head is read, and the
//! response body ([`H1Body`]) reads and decodes straight from the socket when
//! the client's connection polls it. The request body, when one streams, is
//! written from the same polls (full duplex, one task). When the exchange
//! ends cleanly the connection goes back to its endpoint's [`Pool`].
//!
//! Framing follows RFC 9112 §6: `Transfer-Encoding: chunked` (trailers
//! included) and `Content-Length` (conflicting values are an error), else
//! the body runs to the end of the connection; no body for `HEAD`, 1xx,
//! 204 and 304. A response carrying both framing headers, `Connection:
//! close`, HTTP/1.0, an unfinished request body or stray bytes after the
//! body make the connection single-use. Response heads are bounded
//! ([`MAX_HEAD`]), like chunk-size lines and trailer sections.
//!
//! Buffering is bounded: one read buffer per exchange, refilled only when
//! the client's side asks for more.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::body::{BoxError, UpstreamBody};
use super::headers::Forwarded;
use super::upstream::UpstreamIo;

/// Largest response head (status line + headers) accepted from an upstream.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// Most headers in one response head or trailer section.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (size, extensions, CRLF).
const MAX_CHUNK_LINE: usize = 4096;
/// Largest trailer section.
const MAX_TRAILERS: usize = 16 * 1024;
/// Read buffer size at first; it doubles (up to [`MAX_READ`]) while reads
/// fill it, so large bodies move in large reads.
const READ_CHUNK: usize = 8 * 1024;
const MAX_READ: usize = 64 * 1024;

// === Pool ===

/// The idle connections of one endpoint, newest last. Bounded by
/// `pool.max_idle_per_endpoint`; a connection idle longer than
/// `pool.idle_timeout` is closed when the pool is next touched, and one the
/// upstream has closed is noticed at checkout without a system call (the
/// readiness the event loop already recorded).
pub(crate) struct Pool {
    idle: Mutex<VecDeque<IdleConn>>,
    max_idle: usize,
    idle_timeout: Duration,
}

struct IdleConn {
    conn: Conn,
    since: Instant,
}

/// An upstream connection and its read buffer, which stays with it in the
/// pool so a request on a pooled connection allocates no buffer.
pub(crate) struct Conn {
    io: UpstreamIo,
    buf: BytesMut,
}

impl Conn {
    pub(crate) fn new(io: UpstreamIo) -> Self {
        Conn {
            io,
            buf: BytesMut::new(),
        }
    }
}

/// How many of the most recently used idle connections keep their buffer.
const BUFFERED_IDLE: usize = 16;

/// A pooled connection keeps a read buffer up to this size (idle memory
/// stays at most this much per pooled connection).
const KEEP_BUFFER: usize = READ_CHUNK;

impl Pool {
    pub(crate) fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Pool {
            idle: Mutex::new(VecDeque::new()),
            max_idle,
            idle_timeout,
        }
    }

    /// The most recently used live connection, if any.
    pub(crate) fn checkout(&self) -> Option<Conn> {
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
    fn checkin(&self, mut conn: Conn) {
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
fn is_alive(io: &mut UpstreamIo) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    matches!(Pin::new(io).poll_read(&mut cx, &mut buf), Poll::Pending)
}

// === request head ===

/// How the request body is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// No body: the request's own `Content-Length` (if any) passes.
    None,
    Length(u64),
    Chunked,
}

fn framing(body: &UpstreamBody) -> Framing {
    match body {
        UpstreamBody::Empty | UpstreamBody::Replay(None) => Framing::None,
        UpstreamBody::Replay(Some(b)) => Framing::Length(b.len() as u64),
        UpstreamBody::Stream(b) => match b.size_hint().exact() {
            Some(n) => Framing::Length(n),
            None => Framing::Chunked,
        },
    }
}

/// Serializes a request head: origin-form target, HTTP/1.1, the headers as
/// they are (names lower-case), the forwarding headers, and Spillway's own
/// body framing.
pub(crate) fn encode_head(
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    fwd: Option<&Forwarded>,
    body: &UpstreamBody,
) -> BytesMut {
    let framing = framing(body);
    let mut len = method.as_str().len() + target.len() + 64;
    for (n, v) in headers {
        len += n.as_str().len() + v.len() + 4;
    }
    if let Some(f) = fwd {
        f.each(|n, v| len += n.as_str().len() + v.len() + 4);
    }
    let mut out = BytesMut::with_capacity(len);
    out.extend_from_slice(method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut put = |n: &HeaderName, v: &HeaderValue| {
        out.extend_from_slice(n.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    for (n, v) in headers {
        if n == TRANSFER_ENCODING
            || (n == CONTENT_LENGTH && framing != Framing::None)
            || fwd.is_some_and(|f| f.replaces(n))
        {
            continue;
        }
        put(n, v);
    }
    if let Some(f) = fwd {
        f.each(&mut put);
    }
    match framing {
        Framing::None => {}
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(&mut out, n);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn push_decimal(out: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

// === errors ===

/// Why an exchange failed before a response head was complete.
pub(crate) enum Error {
    /// A reused connection turned out to be closed before any byte of a
    /// response arrived, and the request can be sent again as it was
    /// (idempotent, or its head was never written): here it is back.
    Stale(String, UpstreamBody),
    /// The connection broke, or the upstream broke the protocol.
    Reset(String),
    /// The client's request body failed (limit, stall, or its connection).
    Body(BoxError),
}

// === the exchange ===

/// The request body still to be written, with its framing.
struct Sender {
    body: UpstreamBody,
    chunked: bool,
    /// Bytes queued for the socket, in order.
    queue: WriteQueue,
    /// The body has ended and its terminator is queued.
    ended: bool,
    /// Something was written since the last flush.
    unflushed: bool,
    /// Writing failed: the upstream stopped reading (it may still answer).
    broken: bool,
    /// Any frame of a streamed body was taken (it cannot be replayed).
    touched: bool,
}

impl Sender {
    /// A sender with nothing left to write.
    fn finished() -> Self {
        Sender {
            body: UpstreamBody::Empty,
            chunked: false,
            queue: WriteQueue::default(),
            ended: true,
            unflushed: false,
            broken: false,
            touched: false,
        }
    }

    fn done(&self) -> bool {
        self.broken || (self.ended && self.queue.is_empty() && !self.unflushed)
    }

    /// Writes what can be written. `Ready(Ok)` once everything is on the
    /// wire; `Ready(Err)` only for a failure of the client's body (a write
    /// failure marks the sender broken instead: the response may still come).
    fn poll_send(
        &mut self,
        io: &mut UpstreamIo,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), BoxError>> {
        loop {
            while !self.queue.is_empty() {
                let mut slices = [IoSlice::new(&[]); QUEUE];
                let n = self.queue.slices(&mut slices);
                match Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n]) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        self.broken = true;
                        self.queue.clear();
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Ready(Ok(written)) => {
                        self.unflushed = true;
                        self.queue.advance(written);
                    }
                }
            }
            if self.unflushed {
                match Pin::new(&mut *io).poll_flush(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(_)) => {
                        self.broken = true;
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Ready(Ok(())) => self.unflushed = false,
                }
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            if let UpstreamBody::Stream(_) = self.body {
                self.touched = true;
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => {
                    self.ended = true;
                    if self.chunked {
                        self.queue.push_back(Bytes::from_static(b"0\r\n\r\n"));
                    }
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) => {
                        if self.chunked {
                            let mut size = BytesMut::with_capacity(18);
                            push_hex(&mut size, data.len());
                            size.extend_from_slice(b"\r\n");
                            self.queue.push_back(size.freeze());
                            self.queue.push_back(data);
                            self.queue.push_back(Bytes::from_static(b"\r\n"));
                        } else {
                            self.queue.push_back(data);
                        }
                    }
                    Err(frame) => {
                        // Trailers end a chunked body; a length-framed one cannot carry them.
                        if let (true, Ok(trailers)) = (self.chunked, frame.into_trailers()) {
                            let mut t = BytesMut::from(&b"0\r\n"[..]);
                            for (n, v) in &trailers {
                                t.extend_from_slice(n.as_str().as_bytes());
                                t.extend_from_slice(b": ");
                                t.extend_from_slice(v.as_bytes());
                                t.extend_from_slice(b"\r\n");
                            }
                            t.extend_from_slice(b"\r\n");
                            self.queue.push_back(t.freeze());
                            self.ended = true;
                            self.chunked = false;
                        }
                    }
                },
                Some(Err(e)) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Bytes waiting for the socket, in order: at most a head and a body, or a
/// chunk's size line, data and CRLF. Fixed size, so queueing never allocates.
#[derive(Default)]
struct WriteQueue {
    bufs: [Bytes; QUEUE],
    len: usize,
}

const QUEUE: usize = 4;

impl WriteQueue {
    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push_back(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        if self.len == QUEUE {
            // Never happens (the queue is drained before a frame is taken), but
            // stay correct if it does: merge into the last slot.
            let last = std::mem::take(&mut self.bufs[QUEUE - 1]);
            let mut merged = BytesMut::with_capacity(last.len() + b.len());
            merged.extend_from_slice(&last);
            merged.extend_from_slice(&b);
            self.bufs[QUEUE - 1] = merged.freeze();
            return;
        }
        self.bufs[self.len] = b;
        self.len += 1;
    }

    fn clear(&mut self) {
        for b in &mut self.bufs[..self.len] {
            *b = Bytes::new();
        }
        self.len = 0;
    }

    /// Fills `out` with the queued bytes; returns how many slices are used.
    fn slices<'a>(&'a self, out: &mut [IoSlice<'a>; QUEUE]) -> usize {
        for (s, b) in out.iter_mut().zip(&self.bufs[..self.len]) {
            *s = IoSlice::new(b);
        }
        self.len
    }

    /// Drops `n` written bytes from the front.
    fn advance(&mut self, mut n: usize) {
        let mut done = 0;
        while n > 0 && done < self.len {
            let front = &mut self.bufs[done];
            if n >= front.len() {
                n -= front.len();
                *front = Bytes::new();
                done += 1;
            } else {
                front.advance(n);
                n = 0;
            }
        }
        if done > 0 {
            self.bufs[..self.len].rotate_left(done);
            self.len -= done;
        }
    }
}

fn push_hex(out: &mut BytesMut, mut n: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// One connection in use by one exchange.
struct Wire {
    io: UpstreamIo,
    buf: BytesMut,
    pool: Arc<Pool>,
    /// How much to make room for when the buffer runs out.
    next_read: usize,
}

impl Wire {
    /// Reads more into the buffer; `Ready(Ok(0))` is the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let spare = self.buf.capacity() - self.buf.len();
        if spare < 1024 {
            self.buf.reserve(self.next_read);
        }
        let spare = self.buf.capacity() - self.buf.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.buf
        ))?;
        if n == spare && self.next_read < MAX_READ {
            self.next_read *= 2;
        }
        Poll::Ready(Ok(n))
    }
}

/// Sends `head` (and `body`) on `io` and reads the response head. The
/// response body is returned unread, as an [`H1Body`] that owns the
/// connection. `reused` says whether `io` came from the pool, which makes a
/// connection found closed before any response byte a [`Error::Stale`].
pub(crate) fn exchange(
    conn: Conn,
    reused: bool,
    head: Bytes,
    body: UpstreamBody,
    method: &Method,
    pool: Arc<Pool>,
) -> ExchangeFuture {
    let chunked = framing(&body) == Framing::Chunked;
    let mut queue = WriteQueue::default();
    queue.push_back(head);
    let mut ended = false;
    let body = match body {
        UpstreamBody::Replay(Some(b)) => {
            // Written with the head (one vectored write; the bytes are shared,
            // not copied) and kept whole for a replay on a fresh connection.
            queue.push_back(b.clone());
            ended = true;
            UpstreamBody::Replay(Some(b))
        }
        UpstreamBody::Empty | UpstreamBody::Replay(None) => {
            ended = true;
            body
        }
        other => other,
    };
    ExchangeFuture {
        ex: Exchange {
            wire: Some(Wire {
                io: conn.io,
                buf: conn.buf,
                pool,
                next_read: READ_CHUNK,
            }),
            sender: Sender {
                body,
                chunked,
                queue,
                ended,
                unflushed: false,
                broken: false,
                touched: false,
            },
        },
        reused,
        is_head: method == Method::HEAD,
        idempotent: super::retry::is_idempotent(method),
    }
}

/// An exchange until its response head (a plain struct rather than an
/// `async fn`, so the request future that holds it stays small).
pub(crate) struct ExchangeFuture {
    ex: Exchange,
    reused: bool,
    is_head: bool,
    idempotent: bool,
}

impl std::future::Future for ExchangeFuture {
    type Output = Result<Response<H1Body>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let err = match ready!(this.ex.poll_head(cx, this.is_head)) {
            Ok(resp) => return Poll::Ready(Ok(resp)),
            Err(e) => e,
        };
        Poll::Ready(Err(match err {
            HeadError::Closed(msg) => {
                let s = &this.ex.sender;
                let replayable = !s.touched && !matches!(s.body, UpstreamBody::Stream(_));
                let unsent = s.broken && !s.touched;
                if this.reused && (this.idempotent || unsent) && replayable {
                    let body = std::mem::replace(&mut this.ex.sender.body, UpstreamBody::Empty);
                    Error::Stale(msg, body)
                } else {
                    Error::Reset(msg)
                }
            }
            HeadError::Reset(msg) => Error::Reset(msg),
            HeadError::Body(e) => Error::Body(e),
        }))
    }
}

enum HeadError {
    /// End of stream or a reset before any response byte.
    Closed(String),
    Reset(String),
    Body(BoxError),
}

struct Exchange {
    wire: Option<Wire>,
    sender: Sender,
}

impl Exchange {
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        is_head: bool,
    ) -> Poll<Result<Response<H1Body>, HeadError>> {
        let Some(wire) = self.wire.as_mut() else {
            return Poll::Ready(Err(HeadError::Reset("exchange already finished".into())));
        };
        loop {
            if !self.sender.done() {
                if let Poll::Ready(Err(e)) = self.sender.poll_send(&mut wire.io, cx) {
                    return Poll::Ready(Err(HeadError::Body(e)));
                }
            }
            if !wire.buf.is_empty() {
                match parse_head(&mut wire.buf, is_head) {
                    Ok(Some(head)) if head.status == StatusCode::SWITCHING_PROTOCOLS => {
                        let Some(wire) = self.wire.take() else {
                            return Poll::Pending;
                        };
                        let body = H1Body::new(State::Upgraded, wire, None, false);
                        return Poll::Ready(Ok(head.into_response(body)));
                    }
                    Ok(Some(head)) if head.status.is_informational() => continue,
                    Ok(Some(head)) => return Poll::Ready(self.body_for(head)),
                    Ok(None) if wire.buf.len() > MAX_HEAD => {
                        return Poll::Ready(Err(HeadError::Reset(
                            "upstream response head too large".into(),
                        )))
                    }
                    Ok(None) => {}
                    Err(msg) => return Poll::Ready(Err(HeadError::Reset(msg))),
                }
            }
            let seen = !wire.buf.is_empty();
            match ready!(wire.poll_fill(cx)) {
                Ok(0) if seen => {
                    return Poll::Ready(Err(HeadError::Reset(
                        "upstream closed the connection in the response head".into(),
                    )))
                }
                Ok(0) => {
                    return Poll::Ready(Err(HeadError::Closed(
                        "upstream closed the connection before responding".into(),
                    )))
                }
                Ok(_) => {}
                Err(e) if seen => return Poll::Ready(Err(HeadError::Reset(e.to_string()))),
                Err(e) => return Poll::Ready(Err(HeadError::Closed(e.to_string()))),
            }
        }
    }

    /// The response body for a final head.
    fn body_for(&mut self, head: Head) -> Result<Response<H1Body>, HeadError> {
        let sender = std::mem::replace(&mut self.sender, Sender::finished());
        let sender = (!sender.done()).then_some(sender);
        let state = match head.decode {
            Decode::Length(0) => State::Done,
            d => State::Reading(d),
        };
        let Some(wire) = self.wire.take() else {
            return Err(HeadError::Reset("exchange already finished".into()));
        };
        let body = H1Body::new(state, wire, sender, head.keep_alive);
        Ok(head.into_response(body))
    }
}

// === response head ===

struct Head {
    status: StatusCode,
    headers: HeaderMap,
    decode: Decode,
    keep_alive: bool,
}

impl Head {
    fn into_response(self, body: H1Body) -> Response<H1Body> {
        let mut resp = Response::new(body);
        *resp.status_mut() = self.status;
        *resp.version_mut() = Version::HTTP_11;
        *resp.headers_mut() = self.headers;
        resp
    }
}

/// How the response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decode {
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    Eof,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// Parses a complete response head off the front of `buf`, or `None` when
/// more bytes are needed.
fn parse_head(buf: &mut BytesMut, is_head: bool) -> Result<Option<Head>, String> {
    // First pass: is the head complete, and how long is it?
    let len = {
        let mut raw = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, &mut raw)
        {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(format!("invalid upstream response head: {e}")),
        }
    };
    // Second pass over the head's own bytes, so header values share them
    // (no copy) and the buffer keeps what follows.
    let head = buf.split_to(len).freeze();
    let mut raw = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    if let Err(e) = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, &head, &mut raw)
    {
        return Err(format!("invalid upstream response head: {e}"));
    }
    let code = resp.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| format!("invalid upstream status {code}"))?;
    let http10 = resp.version == Some(0);
    let mut headers = HeaderMap::with_capacity(resp.headers.len());
    for h in resp.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| "invalid upstream header name".to_string())?;
        let value = HeaderValue::from_maybe_shared(head.slice_ref(h.value))
            .map_err(|_| format!("invalid value in upstream header {name}"))?;
        headers.append(name, value);
    }

    let mut keep_alive = !http10 && !has_token(&headers, &CONNECTION, "close");
    let no_body = is_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let decode = if no_body {
        Decode::Length(0)
    } else if headers.contains_key(TRANSFER_ENCODING) {
        // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3), and a
        // message with both may be an attempt at smuggling: never reuse.
        if headers.contains_key(CONTENT_LENGTH) {
            keep_alive = false;
        }
        if last_coding_is_chunked(&headers) {
            Decode::Chunked(Chunk::Size)
        } else {
            keep_alive = false;
            Decode::Eof
        }
    } else if headers.contains_key(CONTENT_LENGTH) {
        Decode::Length(content_length(&headers)?)
    } else {
        keep_alive = false;
        Decode::Eof
    };
    Ok(Some(Head {
        status,
        headers,
        decode,
        keep_alive,
    }))
}

fn has_token(h: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    h.get_all(name).iter().any(|v| {
        v.to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    })
}

fn last_coding_is_chunked(h: &HeaderMap) -> bool {
    h.get_all(TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
}

/// The one Content-Length of a response: repeated values must agree.
fn content_length(h: &HeaderMap) -> Result<u64, String> {
    let mut found: Option<u64> = None;
    for v in h.get_all(CONTENT_LENGTH) {
        for part in v.to_str().unwrap_or("").split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err("invalid upstream content-length".into());
            }
            let n: u64 = part
                .parse()
                .map_err(|_| "invalid upstream content-length".to_string())?;
            if found.is_some_and(|f| f != n) {
                return Err("conflicting upstream content-length values".into());
            }
            found = Some(n);
        }
    }
    found.ok_or_else(|| "invalid upstream content-length".into())
}

// === response body ===

/// A response body read from the upstream connection it owns. The
/// connection returns to the pool when the body ends cleanly.
pub(crate) struct H1Body {
    state: State,
    wire: Option<Wire>,
    /// The request body, when it is still being written (full duplex).
    sender: Option<Sender>,
    keep_alive: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Reading(Decode),
    /// A `101`: the connection is waiting to be taken by a tunnel.
    Upgraded,
    Done,
}

/// A `101 Switching Protocols` upstream side: the connection and any bytes
/// the upstream sent after the head.
pub(crate) struct Upgraded {
    pub io: UpstreamIo,
    pub read_ahead: Bytes,
}

impl H1Body {
    fn new(state: State, wire: Wire, sender: Option<Sender>, keep_alive: bool) -> Self {
        let mut body = H1Body {
            state,
            wire: Some(wire),
            sender,
            keep_alive,
        };
        if body.state == State::Done {
            body.end();
        }
        body
    }

    /// The body ended: the connection goes back to the pool when the whole
    /// exchange was clean, else it is closed.
    fn end(&mut self) {
        self.state = State::Done;
        if let Some(wire) = self.wire.take() {
            if self.keep_alive && self.sender.is_none() && wire.buf.is_empty() {
                wire.pool.checkin(Conn {
                    io: wire.io,
                    buf: wire.buf,
                });
            }
        }
        self.sender = None;
    }

    /// Ends with an error: the connection is closed.
    fn abort(&mut self, msg: String) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state = State::Done;
        self.wire = None;
        self.sender = None;
        Poll::Ready(Some(Err(Box::new(ReadError(msg)))))
    }

    /// Takes the connection of a `101` response for tunnelling.
    pub(crate) fn take_upgraded(&mut self) -> Option<Upgraded> {
        if self.state != State::Upgraded {
            return None;
        }
        self.state = State::Done;
        self.wire.take().map(|w| Upgraded {
            io: w.io,
            read_ahead: w.buf.freeze(),
        })
    }
}

/// The upstream broke its response body (or the connection did).
#[derive(Debug)]
pub(crate) struct ReadError(String);

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ReadError {}

/// One decoding step over the buffered bytes.
enum Step {
    /// A data frame; `None` when it was the last one.
    Data(Bytes, Option<Decode>),
    /// Framing consumed, nothing to yield yet.
    Next(Decode),
    /// The body ended, with trailers maybe.
    End(Option<HeaderMap>),
    NeedMore,
    Invalid(String),
}

/// Where `delim` starts within the first `limit` bytes of `buf`; else more
/// bytes are needed, or (with `limit` bytes already there) the upstream sent
/// something too long.
fn find_within(buf: &[u8], delim: &[u8], limit: usize, too_long: &str) -> Result<usize, Step> {
    let window = &buf[..buf.len().min(limit)];
    match window.windows(delim.len()).position(|w| w == delim) {
        Some(i) => Ok(i),
        None if buf.len() >= limit => Err(Step::Invalid(format!("upstream {too_long}"))),
        None => Err(Step::NeedMore),
    }
}

fn decode_step(decode: Decode, buf: &mut BytesMut) -> Step {
    match decode {
        Decode::Length(0) => Step::End(None),
        Decode::Length(n) => {
            if buf.is_empty() {
                return Step::NeedMore;
            }
            let k = (buf.len() as u64).min(n);
            let data = buf.split_to(k as usize).freeze();
            let rest = n - k;
            Step::Data(data, (rest > 0).then_some(Decode::Length(rest)))
        }
        Decode::Eof => {
            if buf.is_empty() {
                return Step::NeedMore;
            }
            Step::Data(buf.split().freeze(), Some(Decode::Eof))
        }
        Decode::Chunked(Chunk::Size) => {
            let eol = match find_within(buf, b"\r\n", MAX_CHUNK_LINE, "chunk-size line too long") {
                Ok(i) => i,
                Err(step) => return step,
            };
            let line = &buf[..eol];
            let digits = line
                .iter()
                .position(|b| !b.is_ascii_hexdigit())
                .unwrap_or(line.len());
            let rest = &line[digits..];
            if digits == 0
                || digits > 16
                || !(rest.is_empty() || rest[0] == b';' || rest[0] == b' ' || rest[0] == b'\t')
            {
                return Step::Invalid("invalid upstream chunk size".into());
            }
            let mut size: u64 = 0;
            for &b in &line[..digits] {
                // At most 16 hex digits: fits in a u64.
                size = (size << 4) | u64::from((b as char).to_digit(16).unwrap_or(0));
            }
            buf.advance(eol + 2);
            Step::Next(Decode::Chunked(if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            }))
        }
        Decode::Chunked(Chunk::Data(n)) => {
            if buf.is_empty() {
                return Step::NeedMore;
            }
            let k = (buf.len() as u64).min(n);
            let data = buf.split_to(k as usize).freeze();
            let next = if k == n {
                Chunk::DataEnd
            } else {
                Chunk::Data(n - k)
            };
            Step::Data(data, Some(Decode::Chunked(next)))
        }
        Decode::Chunked(Chunk::DataEnd) => {
            if buf.len() < 2 {
                return Step::NeedMore;
            }
            if &buf[..2] != b"\r\n" {
                return Step::Invalid("missing CRLF after upstream chunk".into());
            }
            buf.advance(2);
            Step::Next(Decode::Chunked(Chunk::Size))
        }
        Decode::Chunked(Chunk::Trailers) => {
            if buf.len() < 2 {
                return Step::NeedMore;
            }
            if &buf[..2] == b"\r\n" {
                buf.advance(2);
                return Step::End(None);
            }
            let end = match find_within(buf, b"\r\n\r\n", MAX_TRAILERS, "trailer section too large")
            {
                Ok(i) => i,
                Err(step) => return step,
            };
            let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let parsed = match httparse::parse_headers(&buf[..end + 4], &mut raw) {
                Ok(httparse::Status::Complete((_, hs))) => {
                    let mut map = HeaderMap::with_capacity(hs.len());
                    for h in hs {
                        match (
                            HeaderName::from_bytes(h.name.as_bytes()),
                            HeaderValue::from_bytes(h.value),
                        ) {
                            (Ok(n), Ok(v)) => {
                                map.append(n, v);
                            }
                            _ => return Step::Invalid("invalid upstream trailer".into()),
                        }
                    }
                    map
                }
                _ => return Step::Invalid("invalid upstream trailer section".into()),
            };
            buf.advance(end + 4);
            Step::End(Some(parsed))
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let State::Reading(mut decode) = this.state else {
            return Poll::Ready(None);
        };
        let Some(wire) = this.wire.as_mut() else {
            this.state = State::Done;
            return Poll::Ready(None);
        };
        // Keep the request body flowing while the response streams.
        if let Some(s) = this.sender.as_mut() {
            match s.poll_send(&mut wire.io, cx) {
                Poll::Ready(Err(e)) => {
                    // The client's body failed (full duplex): pass its error on
                    // as it is, so the failure stays the client's.
                    this.state = State::Done;
                    this.wire = None;
                    this.sender = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Ok(())) if s.done() && !s.broken => this.sender = None,
                _ => {}
            }
        }
        loop {
            let Some(wire) = this.wire.as_mut() else {
                return Poll::Ready(None);
            };
            match decode_step(decode, &mut wire.buf) {
                Step::Data(data, Some(next)) => {
                    this.state = State::Reading(next);
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Step::Data(data, None) => {
                    this.end();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Step::Next(next) => {
                    decode = next;
                    this.state = State::Reading(next);
                    continue;
                }
                Step::End(trailers) => {
                    this.end();
                    return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                }
                Step::Invalid(msg) => return this.abort(msg),
                Step::NeedMore => {}
            }
            match ready!(wire.poll_fill(cx)) {
                Ok(0) if decode == Decode::Eof => {
                    // Close-delimited: the end of the stream is the end of the body.
                    this.keep_alive = false;
                    this.end();
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return this
                        .abort("upstream closed the connection before the end of the body".into())
                }
                Ok(_) => {}
                Err(e) => return this.abort(e.to_string()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        !matches!(self.state, State::Reading(_))
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Reading(Decode::Length(n)) => SizeHint::with_exact(n),
            State::Reading(_) => SizeHint::default(),
            _ => SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    fn decode_all(
        mut decode: Decode,
        input: &[u8],
    ) -> Result<(Vec<u8>, Option<HeaderMap>), String> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match decode_step(decode, &mut buf) {
                Step::Data(d, next) => {
                    out.extend_from_slice(&d);
                    match next {
                        Some(n) => decode = n,
                        None => return Ok((out, None)),
                    }
                }
                Step::Next(n) => decode = n,
                Step::End(t) => return Ok((out, t)),
                Step::NeedMore => return Err("need more".into()),
                Step::Invalid(m) => return Err(m),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let (data, trailers) = decode_all(
            Decode::Chunked(Chunk::Size),
            b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\ngrpc-status: 0\r\nx-t: a\r\n\r\n",
        )
        .unwrap();
        assert_eq!(data, b"hello0123456789");
        let t = trailers.unwrap();
        assert_eq!(t["grpc-status"], "0");
        assert_eq!(t["x-t"], "a");
        let (data, trailers) =
            decode_all(Decode::Chunked(Chunk::Size), b"3\r\nabc\r\n0\r\n\r\n").unwrap();
        assert_eq!(data, b"abc");
        assert!(trailers.is_none());
    }

    #[test]
    fn broken_chunking_is_an_error_not_a_hang() {
        for bad in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX",
            b"-1\r\n",
            b"11111111111111111\r\n",
            b"\r\n",
        ] {
            let r = decode_all(Decode::Chunked(Chunk::Size), bad);
            assert!(
                r.as_ref().is_err_and(|e| e != "need more"),
                "{bad:?}: {r:?}"
            );
        }
        let long = vec![b'1'; MAX_CHUNK_LINE + 1];
        assert!(
            decode_all(Decode::Chunked(Chunk::Size), &long).is_err_and(|e| e.contains("too long"))
        );
        // Incomplete input asks for more instead of failing.
        assert_eq!(
            decode_all(Decode::Chunked(Chunk::Size), b"5\r\nhel").unwrap_err(),
            "need more"
        );
    }

    #[test]
    fn length_and_eof_bodies() {
        assert_eq!(decode_all(Decode::Length(3), b"abc").unwrap().0, b"abc");
        let mut buf = BytesMut::from(&b"abcdef"[..]);
        match decode_step(Decode::Length(3), &mut buf) {
            Step::Data(d, None) => assert_eq!(&d[..], b"abc"),
            _ => panic!("expected the last frame"),
        }
        assert_eq!(
            &buf[..],
            b"def",
            "bytes after the body stay (and make the connection single-use)"
        );
    }

    #[test]
    fn response_framing_rules() {
        let parse = |raw: &str, head: bool| parse_head(&mut BytesMut::from(raw), head);
        let h = parse("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!((h.decode, h.keep_alive), (Decode::Length(5), true));
        let h = parse("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(h.decode, Decode::Length(0), "HEAD has no body");
        let h = parse("HTTP/1.1 204 No Content\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!(h.decode, Decode::Length(0));
        let h = parse(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (h.decode, h.keep_alive),
            (Decode::Chunked(Chunk::Size), false)
        );
        let h = parse("HTTP/1.1 200 OK\r\n\r\n", false).unwrap().unwrap();
        assert_eq!((h.decode, h.keep_alive), (Decode::Eof, false));
        let h = parse(
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(!h.keep_alive);
        let h = parse("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let h = parse("HTTP/1.1 200 OK\r\ncontent-length: 4, 4\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!(h.decode, Decode::Length(4));
        assert!(parse(
            "HTTP/1.1 200 OK\r\ncontent-length: 4\r\ncontent-length: 5\r\n\r\n",
            false
        )
        .is_err());
        assert!(parse("HTTP/1.1 200 OK\r\ncontent-length: +4\r\n\r\n", false).is_err());
        assert!(parse("HTTP/1.1 200 OK\r\ncontent-length: 4\r\n", false)
            .unwrap()
            .is_none());
        assert!(parse("HTTP/1.1 abc\r\n\r\n", false).is_err());
    }

    #[test]
    fn request_heads_carry_spillways_framing() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("svc"));
        h.insert("content-length", HeaderValue::from_static("999"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        let head = encode_head(
            &Method::POST,
            "/a?b=1",
            &h,
            None,
            &UpstreamBody::Replay(Some(Bytes::from_static(b"xyz"))),
        );
        assert_eq!(
            &head[..],
            &b"POST /a?b=1 HTTP/1.1\r\nhost: svc\r\ncontent-length: 3\r\n\r\n"[..]
        );
        h.remove("transfer-encoding");
        h.insert("content-length", HeaderValue::from_static("0"));
        let head = encode_head(&Method::GET, "/", &h, None, &UpstreamBody::Empty);
        assert_eq!(
            &head[..],
            &b"GET / HTTP/1.1\r\nhost: svc\r\ncontent-length: 0\r\n\r\n"[..]
        );
    }

    #[test]
    fn forwarding_headers_are_written_in_place_of_the_clients() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("svc"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("spoofed"));
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        let ip = crate::proxy::headers::ip_header_value("127.0.0.1".parse().unwrap());
        let fwd =
            crate::proxy::headers::forwarded(&h, &ip, true, Some(HeaderValue::from_static("svc")));
        let head = encode_head(&Method::GET, "/", &h, Some(&fwd), &UpstreamBody::Empty);
        let text = String::from_utf8(head.to_vec()).unwrap();
        for line in [
            "x-request-id: abc\r\n",
            "x-forwarded-for: 10.0.0.1, 127.0.0.1\r\n",
            "x-forwarded-proto: https\r\n",
            "x-forwarded-host: svc\r\n",
        ] {
            assert_eq!(text.matches(line).count(), 1, "{line:?} once in {text:?}");
        }
        assert!(!text.contains("spoofed"));
        assert_eq!(text.matches("x-forwarded-for").count(), 1);
    }

    #[test]
    fn write_queue_advances_across_buffers() {
        let mut q = WriteQueue::default();
        q.push_back(Bytes::from_static(b"ab"));
        q.push_back(Bytes::from_static(b"cde"));
        q.push_back(Bytes::from_static(b"f"));
        q.advance(3);
        let mut s = [IoSlice::new(&[]); QUEUE];
        let n = q.slices(&mut s);
        let joined: Vec<u8> = s[..n].iter().flat_map(|x| x.iter().copied()).collect();
        assert_eq!(joined, b"def");
        q.advance(3);
        assert!(q.is_empty());
    }

    /// A scripted upstream: answers each request head it reads with the next
    /// canned response; `close_after` closes after that many responses.
    async fn scripted(
        responses: Vec<&'static [u8]>,
        close_after: usize,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<String>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut next = 0;
            let mut conn_no = 0;
            while next < responses.len() {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                conn_no += 1;
                let mut served = 0;
                let mut buf = Vec::new();
                while next < responses.len() && served < close_after {
                    let mut chunk = [0u8; 4096];
                    let n = match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        let _ = tx.send(format!(
                            "conn{conn_no} {}",
                            head.lines().next().unwrap_or("")
                        ));
                        let _ = s.write_all(responses[next]).await;
                        next += 1;
                        served += 1;
                    }
                }
            }
        });
        (addr, rx)
    }

    async fn get(
        addr: std::net::SocketAddr,
        pool: &Arc<Pool>,
        path: &str,
    ) -> Result<(StatusCode, Vec<u8>, Option<HeaderMap>), String> {
        let (io, reused) = match pool.checkout() {
            Some(io) => (io, true),
            None => (
                Conn::new(UpstreamIo::Plain(TcpStream::connect(addr).await.unwrap())),
                false,
            ),
        };
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("up"));
        let head = encode_head(&Method::GET, path, &h, None, &UpstreamBody::Empty).freeze();
        let resp = match exchange(
            io,
            reused,
            head,
            UpstreamBody::Empty,
            &Method::GET,
            pool.clone(),
        )
        .await
        {
            Ok(r) => r,
            Err(Error::Stale(m, _)) => return Err(format!("stale: {m}")),
            Err(Error::Reset(m)) => return Err(m),
            Err(Error::Body(e)) => return Err(e.to_string()),
        };
        let status = resp.status();
        let collected = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        let trailers = collected.trailers().cloned();
        Ok((status, collected.to_bytes().to_vec(), trailers))
    }

    #[tokio::test]
    async fn keep_alive_connections_are_reused_and_chunked_trailers_pass() {
        let (addr, mut seen) = scripted(
            vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-trailer: t\r\n\r\n",
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n",
            ],
            usize::MAX,
        )
        .await;
        let pool = Arc::new(Pool::new(8, Duration::from_secs(60)));
        let (s, body, _) = get(addr, &pool, "/1").await.unwrap();
        assert_eq!((s, &body[..]), (StatusCode::OK, &b"ok"[..]));
        assert_eq!(pool.idle_count(), 1);
        let (s, body, trailers) = get(addr, &pool, "/2").await.unwrap();
        assert_eq!((s, &body[..]), (StatusCode::OK, &b"abc"[..]));
        assert_eq!(trailers.unwrap()["x-trailer"], "t");
        let (s, body, _) = get(addr, &pool, "/3").await.unwrap();
        assert_eq!((s, body.len()), (StatusCode::CREATED, 0), "1xx skipped");
        assert_eq!(pool.idle_count(), 1);
        for want in [
            "conn1 GET /1 HTTP/1.1",
            "conn1 GET /2 HTTP/1.1",
            "conn1 GET /3 HTTP/1.1",
        ] {
            assert_eq!(
                seen.recv().await.unwrap(),
                want,
                "one connection for all three"
            );
        }
    }

    #[tokio::test]
    async fn single_use_responses_are_not_pooled() {
        let (addr, _seen) = scripted(
            vec![b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\na"],
            1,
        )
        .await;
        let pool = Arc::new(Pool::new(8, Duration::from_secs(60)));
        get(addr, &pool, "/").await.unwrap();
        assert_eq!(pool.idle_count(), 0);
        // Close-delimited: the body is everything until the upstream closes.
        let (addr, _seen) = scripted(vec![b"HTTP/1.1 200 OK\r\n\r\nuntil-close"], 1).await;
        let (_, body, _) = get(addr, &pool, "/").await.unwrap();
        assert_eq!(body, b"until-close");
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error() {
        let (addr, _seen) =
            scripted(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"], 1).await;
        let pool = Arc::new(Pool::new(8, Duration::from_secs(60)));
        let err = get(addr, &pool, "/").await.unwrap_err();
        assert!(err.contains("before the end of the body"), "{err}");
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_pooled_connection_closed_by_the_upstream_is_stale_not_an_error() {
        // Serves one response per connection without saying so.
        let (addr, _seen) = scripted(
            vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na",
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb",
            ],
            1,
        )
        .await;
        let pool = Arc::new(Pool::new(8, Duration::from_secs(60)));
        get(addr, &pool, "/").await.unwrap();
        assert_eq!(pool.idle_count(), 1);
        // Either the checkout sees the close, or the exchange reports it as stale.
        match pool.checkout() {
            None => {}
            Some(io) => {
                let head = encode_head(
                    &Method::GET,
                    "/",
                    &HeaderMap::new(),
                    None,
                    &UpstreamBody::Empty,
                )
                .freeze();
                let r = exchange(
                    io,
                    true,
                    head,
                    UpstreamBody::Empty,
                    &Method::GET,
                    pool.clone(),
                )
                .await;
                assert!(
                    matches!(r, Err(Error::Stale(..))),
                    "a reused, closed connection is stale"
                );
            }
        }
        let (_, body, _) = get(addr, &pool, "/").await.unwrap();
        assert_eq!(body, b"b");
    }

    #[tokio::test]
    async fn a_stale_connection_hands_back_the_whole_replayable_body() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        // The upstream closes the connection without answering.
        drop(l.accept().await.unwrap().0);
        let pool = Arc::new(Pool::new(8, Duration::from_secs(60)));
        let body = Bytes::from(vec![b'x'; 20 * 1024]);
        let replay = UpstreamBody::Replay(Some(body.clone()));
        let head = encode_head(&Method::PUT, "/", &HeaderMap::new(), None, &replay).freeze();
        let conn = Conn::new(UpstreamIo::Plain(client));
        match exchange(conn, true, head, replay, &Method::PUT, pool).await {
            Err(Error::Stale(_, UpstreamBody::Replay(Some(back)))) => assert_eq!(back, body),
            Err(Error::Stale(..)) => panic!("the body must come back whole"),
            Err(Error::Reset(m)) => panic!("reset instead of stale: {m}"),
            Err(Error::Body(e)) => panic!("body error: {e}"),
            Ok(_) => panic!("no response was sent"),
        }
    }

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
