//! The HTTP/1.1 fast path: Spillway's own server codec, on httparse, for the
//! requests that make up nearly all sidecar traffic, and hyper for the rest.
//!
//! A request head is taken here only when it is plain: HTTP/1.1, an
//! origin-form target, no body framing (`Content-Length`,
//! `Transfer-Encoding`), no `Expect`, `Upgrade` or `TE`, and `Connection`
//! naming at most `keep-alive` or `close`. Anything else, including every
//! head httparse rejects or that outgrows `max_header_bytes`, is *declined*:
//! its bytes, untouched, and the rest of the connection go to hyper, which
//! parses them again and answers them as it always has (400, 413, 431,
//! smuggling checks, bodies, `100-continue`, upgrades). So a hostile head
//! meets hyper's judgement, never a second opinion, and this path only has
//! to frame responses.
//!
//! Responses are framed as hyper frames them (`Server::encode` in hyper
//! 1.x): the same `Content-Length` / chunked choice, no body for `HEAD`,
//! `204` and `304`, `content-length: 0` for an empty body, `connection:
//! close` when the connection will close, and a cached `date`.
//!
//! Client behaviour matches hyper's with `half_close(false)`: a client that
//! closes while its request is in progress (and has sent nothing after it)
//! cancels that request.

use std::cell::RefCell;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::proxy::body::ProxyBody;
use crate::proxy::{self, ConnInfo, Shared};

/// Most headers a request taken here may have; one with more is declined
/// (hyper's own limit is 100).
const MAX_HEADERS: usize = 100;

/// Longest request target taken here (hyper answers longer ones `414`).
const MAX_TARGET: usize = u16::MAX as usize - 1;

/// Read buffer: first size, and the free space kept before each read.
const READ_BUF: usize = 8 * 1024;
const READ_SPARE: usize = 1024;

/// Body chunks up to this size are copied next to the head (one write);
/// larger ones are written from their own buffer.
const COPY_CHUNK: usize = 4 * 1024;

/// Buffered response bytes written out before more are added.
const WRITE_HIGH: usize = 16 * 1024;

/// What one step of parsing found in the read buffer.
#[derive(Debug)]
// Not boxed: the request is built to be moved on at once, and a box would
// cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Step {
    /// A whole head this path serves; its bytes were taken from the buffer.
    Request(Request<Option<Incoming>>, Head),
    /// Not a whole head yet.
    Partial,
    /// A head (or bytes) for hyper: the buffer is left as it was.
    Decline,
}

/// What the connection needs to know about a request it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    /// The client asked to close after this response (`Connection: close`).
    pub close: bool,
    pub head_method: bool,
}

/// Takes the next request head from `buf` when it is one this path serves
/// (see the module docs); anything else leaves `buf` unchanged.
pub(crate) fn take_request(buf: &mut BytesMut) -> Step {
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Step::Partial,
        // Malformed, or too many headers: hyper answers it.
        Err(_) => return Step::Decline,
    };
    if req.version != Some(1) {
        return Step::Decline;
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Step::Decline;
    };
    if !target.starts_with('/') || target.len() > MAX_TARGET {
        return Step::Decline;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Step::Decline;
    };
    if method == Method::CONNECT {
        return Step::Decline;
    }
    let mut close = false;
    // Where each name and value lies in the head, to slice the head's bytes
    // once they are split off: no copy of the values.
    let base = buf.as_ptr() as usize;
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let count = req.headers.len();
    for (span, h) in spans.iter_mut().zip(req.headers.iter()) {
        let name = h.name.as_bytes();
        if is_declined_header(name) {
            return Step::Decline;
        }
        if name.len() == 10 && name.eq_ignore_ascii_case(b"connection") {
            match connection_close(h.value) {
                Some(c) => close |= c,
                None => return Step::Decline,
            }
        }
        *span = (
            (name.as_ptr() as usize - base) as u32,
            name.len() as u32,
            (h.value.as_ptr() as usize - base) as u32,
            h.value.len() as u32,
        );
    }
    let target_span = (target.as_ptr() as usize - base, target.len());
    let head = buf.split_to(len).freeze();
    let mut map = HeaderMap::with_capacity(count);
    for &(ns, nl, vs, vl) in &spans[..count] {
        let (ns, nl, vs, vl) = (ns as usize, nl as usize, vs as usize, vl as usize);
        let name = HeaderName::from_bytes(&head[ns..ns + nl]);
        let value = HeaderValue::from_maybe_shared(head.slice(vs..vs + vl));
        let (Ok(name), Ok(value)) = (name, value) else {
            return decline_after_split(buf, head);
        };
        map.append(name, value);
    }
    let uri = match Uri::from_maybe_shared(head.slice(target_span.0..target_span.0 + target_span.1))
    {
        Ok(u) => u,
        Err(_) => return decline_after_split(buf, head),
    };
    let mut request = Request::new(None);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = map;
    let head_method = request.method() == Method::HEAD;
    Step::Request(request, Head { close, head_method })
}

/// Puts a head that turned out to be declined back in front of `buf`. Rare
/// (names and values httparse accepts but `http` does not): one copy.
fn decline_after_split(buf: &mut BytesMut, head: Bytes) -> Step {
    let mut whole = BytesMut::with_capacity(head.len() + buf.len());
    whole.put_slice(&head);
    whole.put_slice(buf);
    *buf = whole;
    Step::Decline
}

/// Headers that frame a body, expect an interim answer or change the
/// protocol: hyper handles requests with any of them.
fn is_declined_header(name: &[u8]) -> bool {
    let declined: &[u8] = match name.len() {
        2 => b"te",
        6 => b"expect",
        7 if name[0] | 0x20 == b'u' => b"upgrade",
        7 => b"trailer",
        14 => b"content-length",
        17 => b"transfer-encoding",
        _ => return false,
    };
    name.eq_ignore_ascii_case(declined)
}

/// `Some(close)` for a `Connection` value of only `keep-alive` / `close`
/// tokens, `None` for anything else (hyper handles those).
fn connection_close(value: &[u8]) -> Option<bool> {
    let mut close = false;
    for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        if token.eq_ignore_ascii_case(b"close") {
            close = true;
        } else if !token.eq_ignore_ascii_case(b"keep-alive") && !token.is_empty() {
            return None;
        }
    }
    Some(close)
}

// === responses ===

/// How a response body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Exactly this many bytes follow the head.
    Length(u64),
    Chunked,
}

/// The body's length as hyper's dispatcher sees it: `None` when it has
/// ended already, else its exact size when known.
pub(crate) fn body_length<B: Body>(body: &B) -> Option<Option<u64>> {
    if body.is_end_stream() {
        None
    } else {
        Some(body.size_hint().exact())
    }
}

/// Writes a response head for a request (`head_method`: it was `HEAD`)
/// into `dst`. `last`: the connection closes after this response. Returns
/// the framing and whether the connection closes after it (a response's own
/// `Connection: close`, or a `101`); `Err` for a response that cannot be
/// framed (conflicting lengths), which hyper would not send either.
pub(crate) fn encode_head(
    dst: &mut BytesMut,
    status: StatusCode,
    headers: &HeaderMap,
    body: Option<Option<u64>>,
    head_method: bool,
    last: bool,
) -> Result<(Framing, bool), ()> {
    let start = dst.len();
    let res = encode_head_inner(dst, status, headers, body, head_method, last);
    if res.is_err() {
        // Nothing half-written.
        dst.truncate(start);
    }
    res
}

/// A header line that combines the values of one name, still open.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Open {
    None,
    TransferEncoding { chunked_last: bool },
    Connection { close: bool },
}

fn encode_head_inner(
    dst: &mut BytesMut,
    status: StatusCode,
    headers: &HeaderMap,
    body: Option<Option<u64>>,
    head_method: bool,
    mut last: bool,
) -> Result<(Framing, bool), ()> {
    let empty = HeaderMap::new();
    let (status, headers, body) = if status == StatusCode::SWITCHING_PROTOCOLS {
        last = true;
        (status, headers, body)
    } else if status.is_informational() {
        // hyper does not send other 1xx answers as final ones: a bare 500.
        last = true;
        (StatusCode::INTERNAL_SERVER_ERROR, &empty, None)
    } else {
        (status, headers, body)
    };
    let no_length = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let can_body = !(head_method || no_length);

    if status == StatusCode::OK {
        dst.put_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        dst.put_slice(b"HTTP/1.1 ");
        dst.put_slice(status.as_str().as_bytes());
        dst.put_u8(b' ');
        dst.put_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        dst.put_slice(b"\r\n");
    }
    let mut framing = None;
    let mut wrote_date = false;
    let mut wrote_connection = false;
    // The values of one name come one after another in `iter`.
    let mut prev: Option<&HeaderName> = None;
    let mut open = Open::None;
    let mut length_seen: Option<u64> = None;
    for (name, value) in headers.iter() {
        let same = prev == Some(name);
        if !same {
            close_line(dst, &mut open, last);
            prev = Some(name);
        }
        let v = value.as_bytes();
        match *name {
            header::CONTENT_LENGTH => match body {
                // Describes the body a GET would have had: sent as is.
                None if head_method => {
                    put_header(dst, "content-length", v);
                    framing = Some(Framing::Length(0));
                }
                // No body: dropped (an implicit 0 follows).
                None => {}
                Some(known) => {
                    if !same && framing.is_some() {
                        return Err(());
                    }
                    let n = parse_length(v).ok_or(())?;
                    match length_seen {
                        Some(first) if first != n => return Err(()),
                        Some(_) => {}
                        None => {
                            put_header(dst, "content-length", v);
                            length_seen = Some(n);
                            // hyper trusts a body that knows its length.
                            framing = Some(Framing::Length(known.unwrap_or(n)));
                        }
                    }
                }
            },
            header::TRANSFER_ENCODING => {
                if !same && framing.is_some() {
                    return Err(());
                }
                if !can_body {
                    continue;
                }
                if let Open::TransferEncoding { .. } = open {
                    dst.put_slice(b", ");
                } else {
                    dst.put_slice(b"transfer-encoding: ");
                }
                dst.put_slice(v);
                open = Open::TransferEncoding {
                    chunked_last: is_chunked(v),
                };
                framing = Some(Framing::Chunked);
            }
            header::CONNECTION => {
                let close = has_close(v);
                last |= close;
                if let Open::Connection { close: before } = open {
                    dst.put_slice(b", ");
                    open = Open::Connection {
                        close: before || close,
                    };
                } else {
                    dst.put_slice(b"connection: ");
                    open = Open::Connection { close };
                }
                dst.put_slice(v);
                wrote_connection = true;
            }
            header::TRAILER if !can_body => {}
            _ => {
                wrote_date |= *name == header::DATE;
                put_header(dst, name.as_str(), v);
            }
        }
    }
    close_line(dst, &mut open, last);
    if last && !wrote_connection {
        dst.put_slice(b"connection: close\r\n");
    }
    let framing = match framing {
        Some(f) => f,
        None => match body {
            Some(None) => {
                dst.put_slice(b"transfer-encoding: chunked\r\n");
                Framing::Chunked
            }
            None | Some(Some(0)) => {
                if !no_length && !head_method {
                    dst.put_slice(b"content-length: 0\r\n");
                }
                Framing::Length(0)
            }
            Some(Some(n)) if no_length => Framing::Length(n),
            Some(Some(n)) => {
                // Writing to a BytesMut cannot fail.
                let _ = write!(dst, "content-length: {n}\r\n");
                Framing::Length(n)
            }
        },
    };
    if !wrote_date {
        dst.put_slice(b"date: ");
        put_date(dst);
        dst.put_slice(b"\r\n");
    }
    dst.put_slice(b"\r\n");
    let framing = if can_body {
        framing
    } else {
        Framing::Length(0)
    };
    Ok((framing, last))
}

/// Ends a combined header line: `chunked` last for a transfer coding, and
/// `close` for a connection that closes.
fn close_line(dst: &mut BytesMut, open: &mut Open, last: bool) {
    match std::mem::replace(open, Open::None) {
        Open::None => return,
        Open::TransferEncoding { chunked_last } => {
            if !chunked_last {
                dst.put_slice(b", chunked");
            }
        }
        Open::Connection { close } => {
            if last && !close {
                dst.put_slice(b", close");
            }
        }
    }
    dst.put_slice(b"\r\n");
}

fn put_header(dst: &mut BytesMut, name: &str, value: &[u8]) {
    dst.put_slice(name.as_bytes());
    dst.put_slice(b": ");
    dst.put_slice(value);
    dst.put_slice(b"\r\n");
}

fn has_close(v: &[u8]) -> bool {
    v.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
}

fn is_chunked(v: &[u8]) -> bool {
    v.rsplit(|&b| b == b',')
        .next()
        .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// A `Content-Length` value as hyper reads it: digits only.
fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// The current `date` value, formatted once a second per thread.
fn put_date(dst: &mut BytesMut) {
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            c.1 = httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
            c.0 = secs;
        }
        dst.put_slice(c.1.as_bytes());
    });
}

// === the connection loop ===

/// How the fast path ended.
pub(crate) enum End {
    /// The connection is done: closed by the client, failed, answered with
    /// `connection: close`, or told to close while idle (drain, idle
    /// timeout, parking: [`super::listener`] tells them apart).
    Closed,
    /// A request this path does not serve: these bytes (its head and
    /// whatever followed) and the rest of the connection go to hyper.
    Declined(Bytes),
}

/// What the fast path needs from its connection.
pub(crate) struct Conn<'a> {
    pub shared: &'a Arc<Shared>,
    pub info: &'a Arc<ConnInfo>,
    /// Identity headers removed from every request, and the verified one added.
    pub strip: &'a [HeaderName],
    pub identity: Option<&'a (HeaderName, HeaderValue)>,
    pub max_head: usize,
}

/// Hooks into the connection's activity (request started / response
/// ready / body done), shared with hyper's path.
pub(crate) trait Hooks {
    /// Part of a request head is buffered: the head clock runs (bytes read
    /// while a request was in progress did not start it).
    fn head_pending(&self);
    /// A head is complete: the head clock stops, a request is in progress.
    fn request_started(&self);
    /// Its response is ready: the request ends, its body is in progress.
    fn response_ready(&self);
    /// The response body is done with (written, failed or dropped).
    fn body_done(&self);
}

/// Serves requests on `io` until the connection ends or a request is
/// declined. `closing` is set when the connection should close once idle
/// (drain, idle timeout, parking); a response in progress then finishes
/// with `connection: close`.
pub(crate) async fn serve<S, A>(
    io: &mut S,
    conn: &Conn<'_>,
    closing: &AtomicBool,
    act: &A,
) -> Result<End, Infallible>
where
    S: AsyncRead + AsyncWrite + Unpin,
    A: Hooks,
{
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    loop {
        // The next head: parsed from what is buffered, else read.
        // Assigned where the loop breaks: a tuple of the two would be one
        // more move of the request.
        let head;
        let mut req = loop {
            if !buf.is_empty() {
                match take_request(&mut buf) {
                    Step::Request(r, h) => {
                        head = h;
                        break r;
                    }
                    Step::Decline => return Ok(End::Declined(buf.freeze())),
                    Step::Partial if buf.len() >= conn.max_head => {
                        // hyper reads the rest and answers 431.
                        return Ok(End::Declined(buf.freeze()));
                    }
                    Step::Partial => act.head_pending(),
                }
            }
            let read = std::future::poll_fn(|cx| {
                if closing.load(Ordering::Relaxed) {
                    return Poll::Ready(None);
                }
                poll_read(io, cx, &mut buf).map(Some)
            })
            .await;
            match read {
                // Told to close while waiting: nothing buffered ends it at
                // once; a partial head goes to hyper, which decides.
                None if buf.is_empty() => return Ok(End::Closed),
                None => return Ok(End::Declined(buf.freeze())),
                Some(Ok(0)) if buf.is_empty() => return Ok(End::Closed),
                // The client ended inside a head: hyper answers it as ever.
                Some(Ok(0)) => return Ok(End::Declined(buf.freeze())),
                Some(Ok(_)) => {}
                Some(Err(_)) => return Ok(End::Closed),
            }
        };
        act.request_started();
        super::listener::identify(req.headers_mut(), conn.strip, conn.identity);
        // The response, unless the client leaves first (EOF with nothing
        // pipelined): then the request is cancelled, as hyper does. Not
        // boxed: this whole future is, and it is freed when the connection
        // parks, so an idle connection holds none of it. Scoped: the
        // request's state ends with this block.
        let resp = {
            let mut call = std::pin::pin!(proxy::handle(req, conn.info, conn.shared));
            let mut eof = EofWatch::new(&buf);
            std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = call.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                if eof.poll_gone(io, cx, &mut buf) {
                    return Poll::Ready(None);
                }
                Poll::Pending
            })
            .await
        };
        let Some(resp) = resp else {
            act.response_ready();
            act.body_done();
            return Ok(End::Closed);
        };
        act.response_ready();
        let last = head.close || closing.load(Ordering::Relaxed);
        let sent = write_response(io, &mut out, &mut buf, resp, head.head_method, last).await;
        act.body_done();
        match sent {
            Ok(true) => {}
            Ok(false) | Err(_) => return Ok(End::Closed),
        }
        if buf.capacity() > READ_BUF * 4 && buf.is_empty() {
            buf = BytesMut::new();
        }
    }
}

/// Notices a client that closes while its request is in progress, as hyper
/// does: only while nothing of the client's is buffered; bytes that arrive
/// instead (a pipelined head) are kept, and end the watch.
struct EofWatch(bool);

impl EofWatch {
    fn new(buf: &BytesMut) -> Self {
        EofWatch(buf.is_empty())
    }

    /// `true` once the client's stream has ended or failed.
    fn poll_gone<S: AsyncRead + Unpin>(
        &mut self,
        io: &mut S,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> bool {
        if !self.0 {
            return false;
        }
        match poll_read(io, cx, buf) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => true,
            Poll::Ready(Ok(_)) => {
                self.0 = false;
                false
            }
            Poll::Pending => false,
        }
    }
}

/// Reads into `buf`, keeping some free space.
fn poll_read<S: AsyncRead + Unpin>(
    io: &mut S,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_SPARE {
        buf.reserve(READ_BUF.max(buf.len()));
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// Writes the response; `Ok(true)` when the connection stays open for the
/// next request. The body is streamed: what is buffered is written out
/// whenever the body has nothing ready.
async fn write_response<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    out: &mut BytesMut,
    buf: &mut BytesMut,
    resp: Response<ProxyBody>,
    head_method: bool,
    last: bool,
) -> io::Result<bool> {
    let (parts, mut body) = resp.into_parts();
    out.clear();
    let length = body_length(&body);
    let Ok((framing, last)) =
        encode_head(out, parts.status, &parts.headers, length, head_method, last)
    else {
        tracing::debug!(status = %parts.status, "response head cannot be framed: closing the connection");
        return Ok(false);
    };
    drop(parts);
    let mut remaining = match framing {
        Framing::Length(n) => Some(n),
        Framing::Chunked => None,
    };
    if length.is_none() || remaining == Some(0) {
        // Nothing to send (or nothing allowed): the body is not polled.
        drop(body);
        io.write_all(out).await?;
        return Ok(!last);
    }
    let mut eof = EofWatch::new(buf);
    loop {
        let next = std::future::poll_fn(|cx| {
            match Pin::new(&mut body).poll_frame(cx) {
                Poll::Ready(f) => return Poll::Ready(Next::Frame(f)),
                Poll::Pending if !out.is_empty() => return Poll::Ready(Next::Flush),
                Poll::Pending => {}
            }
            if eof.poll_gone(io, cx, buf) {
                return Poll::Ready(Next::Gone);
            }
            Poll::Pending
        })
        .await;
        match next {
            Next::Flush => {
                io.write_all(out).await?;
                out.clear();
            }
            Next::Gone => return Ok(false),
            Next::Frame(None) => break,
            Next::Frame(Some(Err(e))) => {
                tracing::debug!(error = %e, "response body failed: closing the connection");
                return Ok(false);
            }
            Next::Frame(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    // Trailers: only sent to clients that asked (`TE`), and
                    // those requests go to hyper.
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                if let Some(rem) = remaining.as_mut() {
                    if data.len() as u64 > *rem {
                        tracing::debug!(
                            "response body longer than its length: closing the connection"
                        );
                        return Ok(false);
                    }
                    *rem -= data.len() as u64;
                } else {
                    let _ = write!(out, "{:x}\r\n", data.len());
                }
                if data.len() <= COPY_CHUNK {
                    out.put_slice(&data);
                } else {
                    write_two(io, out, data).await?;
                    out.clear();
                }
                if remaining.is_none() {
                    out.put_slice(b"\r\n");
                }
                if out.len() >= WRITE_HIGH {
                    io.write_all(out).await?;
                    out.clear();
                }
            }
        }
    }
    drop(body);
    match remaining {
        Some(0) => {}
        Some(_) => {
            tracing::debug!("response body shorter than its length: closing the connection");
            if !out.is_empty() {
                io.write_all(out).await?;
            }
            return Ok(false);
        }
        None => out.put_slice(b"0\r\n\r\n"),
    }
    io.write_all(out).await?;
    out.clear();
    Ok(!last)
}

enum Next {
    Frame(Option<Result<http_body::Frame<Bytes>, proxy::body::BoxError>>),
    /// The body has nothing ready: write out what is buffered meanwhile.
    Flush,
    /// The client closed its connection.
    Gone,
}

/// Writes `a` then `b`, vectored where the stream supports it.
async fn write_two<S: AsyncWrite + Unpin>(io: &mut S, a: &[u8], mut b: Bytes) -> io::Result<()> {
    let mut a = a;
    while !a.is_empty() {
        let bufs = [io::IoSlice::new(a), io::IoSlice::new(&b)];
        let n = io.write_vectored(&bufs).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n >= a.len() {
            let rest = n - a.len();
            a = &[];
            bytes::Buf::advance(&mut b, rest);
        } else {
            a = &a[n..];
        }
    }
    io.write_all(&b).await
}

#[cfg(test)]
mod tests;
