//! One exchange on one connection: the request written, the response head
//! read, the response body decoded from the socket.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::decode::{decode_step, parse_head, Decode, Head, Step};
use super::encode::{framing, push_hex, Framing};
use super::pool::{Conn, Kept, Pool};
use super::Io;
use super::{Error, MAX_CHUNK_EXTENSIONS, MAX_HEAD, MAX_INFORMATIONAL, MAX_READ, READ_CHUNK};
use crate::proxy::io::UpstreamIo;
use crate::proxy::outcome::BoxError;
use crate::proxy::request_body::UpstreamBody;

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
    fn poll_send<T: Io>(&mut self, io: &mut T, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
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
/// chunk's size line, data and CRLF. Fixed size, so queueing never
/// allocates. The slots past `len` are empty, and empty slots cost nothing
/// to drop (a `Bytes` drop is a call through its vtable, even for no bytes).
#[derive(Default)]
struct WriteQueue {
    bufs: [Option<Bytes>; QUEUE],
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
            let last = self.bufs[QUEUE - 1].take().unwrap_or_default();
            let mut merged = BytesMut::with_capacity(last.len() + b.len());
            merged.extend_from_slice(&last);
            merged.extend_from_slice(&b);
            self.bufs[QUEUE - 1] = Some(merged.freeze());
            return;
        }
        self.bufs[self.len] = Some(b);
        self.len += 1;
    }

    fn clear(&mut self) {
        for b in &mut self.bufs[..self.len] {
            *b = None;
        }
        self.len = 0;
    }

    /// Fills `out` with the queued bytes; returns how many slices are used.
    fn slices<'a>(&'a self, out: &mut [IoSlice<'a>; QUEUE]) -> usize {
        for (s, b) in out.iter_mut().zip(&self.bufs[..self.len]) {
            *s = IoSlice::new(b.as_deref().unwrap_or_default());
        }
        self.len
    }

    /// Drops `n` written bytes from the front.
    fn advance(&mut self, mut n: usize) {
        let mut done = 0;
        while n > 0 && done < self.len {
            let Some(front) = &mut self.bufs[done] else {
                done += 1;
                continue;
            };
            if n >= front.len() {
                n -= front.len();
                self.bufs[done] = None;
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

/// One connection in use by one exchange.
struct Wire<T> {
    io: T,
    buf: BytesMut,
    kept: Option<Pin<Box<Kept>>>,
    pool: Arc<Pool<T>>,
    /// How much to make room for when the buffer runs out.
    next_read: usize,
}

impl<T: Io> Wire<T> {
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
pub(crate) fn exchange<T: Io>(
    conn: Conn<T>,
    reused: bool,
    head: Bytes,
    body: UpstreamBody,
    method: &Method,
    pool: Arc<Pool<T>>,
) -> ExchangeFuture<T> {
    let chunked = framing(&body) == Framing::Chunked;
    let mut queue = WriteQueue::default();
    queue.push_back(head.clone());
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
            request_head: head,
            informational: 0,
            wire: Some(Wire {
                io: conn.io,
                buf: conn.buf,
                kept: conn.kept,
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
        idempotent: crate::proxy::retry::is_idempotent(method),
    }
}

/// An exchange until its response head (a plain struct rather than an
/// `async fn`, so the request future that holds it stays small).
pub(crate) struct ExchangeFuture<T = UpstreamIo> {
    ex: Exchange<T>,
    reused: bool,
    is_head: bool,
    idempotent: bool,
}

impl<T> ExchangeFuture<T> {
    /// The connection's timer, for the caller's per-try `deadline`, polled
    /// while the response head is awaited: due at `deadline` or before it,
    /// so when it fires before `deadline` the caller resets it to
    /// `deadline`. `None` for a connection that has not been pooled, or
    /// once the exchange has given its connection away.
    pub(crate) fn deadline_timer(&mut self, deadline: Instant) -> Option<Pin<&mut Sleep>> {
        let kept = self.ex.wire.as_mut()?.kept.as_mut()?;
        kept.as_mut().timer(deadline)
    }
}

impl<T: Io> std::future::Future for ExchangeFuture<T> {
    type Output = Result<Response<H1Body<T>>, Error>;

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
                    let head = std::mem::take(&mut this.ex.request_head);
                    Error::Stale(msg, head, body)
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

struct Exchange<T> {
    wire: Option<Wire<T>>,
    /// The request head as written: a `101` is only valid when it asked
    /// for an upgrade.
    request_head: Bytes,
    /// Informational responses seen so far.
    informational: usize,
    sender: Sender,
}

impl<T: Io> Exchange<T> {
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        is_head: bool,
    ) -> Poll<Result<Response<H1Body<T>>, HeadError>> {
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
                        if !asks_upgrade(&self.request_head) {
                            return Poll::Ready(Err(HeadError::Reset(
                                "upstream switched protocols without an upgrade request".into(),
                            )));
                        }
                        // The wire is taken here, never found missing: `wire`
                        // above is this same `Option`, so every return is Ready.
                        return Poll::Ready(match self.wire.take() {
                            Some(wire) => {
                                let body = H1Body::new(State::Upgraded, wire, None, false);
                                Ok(head.into_response(body))
                            }
                            None => Err(HeadError::Reset("exchange already finished".into())),
                        });
                    }
                    Ok(Some(head)) if head.status.is_informational() => {
                        self.informational += 1;
                        if self.informational > MAX_INFORMATIONAL {
                            return Poll::Ready(Err(HeadError::Reset(
                                "upstream sent too many informational responses".into(),
                            )));
                        }
                        continue;
                    }
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
    fn body_for(&mut self, head: Head) -> Result<Response<H1Body<T>>, HeadError> {
        let sender = std::mem::replace(&mut self.sender, Sender::finished());
        // Boxed: a body still being written when the head arrives is rare,
        // and inline it would add its size to every response body, which is
        // moved several times on its way to the client.
        let sender = (!sender.done()).then(|| Box::new(sender));
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

/// Whether an encoded request head (lower-case names, see
/// [`encode_head`](super::encode_head)) carries an `Upgrade` header.
fn asks_upgrade(head: &[u8]) -> bool {
    const NAME: &[u8] = b"\r\nupgrade:";
    head.windows(NAME.len()).any(|w| w == NAME)
}

// === response body ===

/// A response body read from the upstream connection it owns. The
/// connection returns to the pool when the body ends cleanly.
pub(crate) struct H1Body<T = UpstreamIo> {
    state: State,
    wire: Option<Wire<T>>,
    /// The request body, when it is still being written (full duplex).
    sender: Option<Box<Sender>>,
    keep_alive: bool,
    /// What remains of the chunk-extension budget.
    ext_left: usize,
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
pub(crate) struct Upgraded<T = UpstreamIo> {
    /// The connection, now carrying the upgraded protocol.
    pub io: T,
    /// What the upstream sent after the `101` head.
    pub read_ahead: Bytes,
}

impl<T: Io> H1Body<T> {
    fn new(state: State, wire: Wire<T>, sender: Option<Box<Sender>>, keep_alive: bool) -> Self {
        let mut body = H1Body {
            state,
            wire: Some(wire),
            sender,
            keep_alive,
            ext_left: MAX_CHUNK_EXTENSIONS,
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
                    kept: wire.kept,
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
    pub(crate) fn take_upgraded(&mut self) -> Option<Upgraded<T>> {
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
impl<T: Io> Body for H1Body<T> {
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
            match decode_step(decode, &mut wire.buf, &mut this.ext_left) {
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
    use super::super::encode_head;
    use super::*;
    use http::{HeaderMap, HeaderValue};
    use http_body_util::BodyExt;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

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
            Err(Error::Stale(m, ..)) => return Err(format!("stale: {m}")),
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

    #[tokio::test(start_paused = true)]
    async fn a_pooled_connection_whose_buffer_was_released_still_serves() {
        let (addr, mut seen) = scripted(
            vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nagain\r\n0\r\n\r\n",
            ],
            usize::MAX,
        )
        .await;
        let pool = Arc::new(Pool::new(8, Duration::from_secs(60)));
        let (s, body, _) = get(addr, &pool, "/1").await.unwrap();
        assert_eq!((s, &body[..]), (StatusCode::OK, &b"ok"[..]));
        assert!(pool.idle_buffers()[0] > 0, "pooled with its read buffer");
        pool.reap();
        assert!(pool.idle_buffers()[0] > 0, "kept while recently used");
        tokio::time::advance(Duration::from_secs(2)).await;
        pool.reap();
        assert_eq!(pool.idle_buffers(), vec![0], "freed once idle");
        let (s, body, _) = get(addr, &pool, "/2").await.unwrap();
        assert_eq!((s, &body[..]), (StatusCode::OK, &b"again"[..]));
        assert_eq!(pool.idle_count(), 1);
        for want in ["conn1 GET /1 HTTP/1.1", "conn1 GET /2 HTTP/1.1"] {
            assert_eq!(seen.recv().await.unwrap(), want, "the same connection");
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
        match exchange(conn, true, head.clone(), replay, &Method::PUT, pool).await {
            Err(Error::Stale(_, head_back, UpstreamBody::Replay(Some(back)))) => {
                assert_eq!(head_back, head, "the head comes back too");
                assert_eq!(back, body);
            }
            Err(Error::Stale(..)) => panic!("the body must come back whole"),
            Err(Error::Reset(m)) => panic!("reset instead of stale: {m}"),
            Err(Error::Body(e)) => panic!("body error: {e}"),
            Ok(_) => panic!("no response was sent"),
        }
    }
}
