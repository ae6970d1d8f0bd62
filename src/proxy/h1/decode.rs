//! Response head parsing and response body decoding.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, Version};

use super::{MAX_CHUNK_LINE, MAX_HEADERS, MAX_TRAILERS};

// === response head ===

/// A parsed response head: status, headers, body delimiting, whether the connection is reusable.
pub(super) struct Head {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) decode: Decode,
    pub(super) keep_alive: bool,
}

impl Head {
    /// The head as an HTTP/1.1 `Response` carrying `body`.
    pub(super) fn into_response<B>(self, body: B) -> Response<B> {
        let mut resp = Response::new(body);
        *resp.status_mut() = self.status;
        *resp.version_mut() = Version::HTTP_11;
        *resp.headers_mut() = self.headers;
        resp
    }
}

/// How the response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Decode {
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    Eof,
}

/// Where a chunked body decoder is: size line, chunk data left, the CRLF after it, trailers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// Headers whose places [`parse_head`] notes as it parses; a head with more
/// is parsed a second time. Most responses carry a handful, and the notes
/// are cleared on every call.
const INLINE_SPANS: usize = 24;

/// Where one header's name and value lie in the head: offsets and lengths.
#[derive(Clone, Copy, Default)]
struct Span {
    name: u32,
    name_len: u32,
    value: u32,
    value_len: u32,
}

/// Parses a complete response head off the front of `buf`, or `None` when
/// more bytes are needed.
///
/// One parse: httparse borrows `buf`, so each header's place is noted as
/// offsets; the head is then split off and its values are cut from its own
/// bytes (shared, not copied), and the buffer keeps what follows. The
/// framing headers are read on the way, with no lookup in the map.
pub(super) fn parse_head(buf: &mut BytesMut, is_head: bool) -> Result<Option<Head>, String> {
    let mut spans = [Span::default(); INLINE_SPANS];
    let (len, code, http10, count) = {
        let mut raw = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, &mut raw)
        {
            // The bound holds however the head arrived: in small reads
            // (checked by the caller while it is incomplete) or in one.
            Ok(httparse::Status::Complete(n)) if n > super::MAX_HEAD => {
                return Err("upstream response head too large".into())
            }
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(format!("invalid upstream response head: {e}")),
        };
        // httparse's slices point into `buf`; within the head (at most
        // MAX_HEAD bytes), so every offset fits in a u32.
        let base = buf.as_ptr() as usize;
        let offset = |s: &[u8]| (s.as_ptr() as usize).wrapping_sub(base) as u32;
        for (span, h) in spans.iter_mut().zip(resp.headers.iter()) {
            *span = Span {
                name: offset(h.name.as_bytes()),
                name_len: h.name.len() as u32,
                value: offset(h.value),
                value_len: h.value.len() as u32,
            };
        }
        (len, resp.code, resp.version == Some(0), resp.headers.len())
    };
    let mut head = buf.split_to(len).freeze();
    let code = code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| format!("invalid upstream status {code}"))?;
    let mut headers = HeaderMap::with_capacity(count);
    let mut framing = Framing::default();
    let name_of =
        |name: &[u8]| header_name(name).map_err(|_| "invalid upstream header name".to_string());
    let mut add = |name: HeaderName, value: Bytes| -> Result<(), String> {
        let value = HeaderValue::from_maybe_shared(value)
            .map_err(|_| format!("invalid value in upstream header {name}"))?;
        framing.note(&name, &value);
        headers.append(name, value);
        Ok(())
    };
    if count <= INLINE_SPANS {
        for (i, span) in spans[..count].iter().enumerate() {
            let (n, v) = (span.name as usize, span.value as usize);
            let end = v + span.value_len as usize;
            // Always in range (the offsets came from slices of these bytes);
            // checked anyway, as an error rather than a panic.
            let (Some(name), true) = (head.get(n..n + span.name_len as usize), end <= head.len())
            else {
                return Err("invalid upstream response head".into());
            };
            let name = name_of(name)?;
            let value = if i + 1 == count {
                // The last value is the head itself, cut down: one reference
                // count update fewer than a slice and the head's drop.
                let mut last = std::mem::take(&mut head);
                last.truncate(end);
                last.advance(v);
                last
            } else {
                head.slice(v..end)
            };
            add(name, value)?;
        }
    } else {
        // More headers than were noted: the split-off head is parsed again,
        // its slices are then its own.
        let mut raw = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        if let Err(e) = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, &head, &mut raw)
        {
            return Err(format!("invalid upstream response head: {e}"));
        }
        for h in resp.headers.iter() {
            add(name_of(h.name.as_bytes())?, head.slice_ref(h.value))?;
        }
    }

    let mut keep_alive = !http10 && !framing.close;
    let no_body = is_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let decode = if no_body {
        Decode::Length(0)
    } else if let Some(te) = &framing.last_te {
        // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3), and a
        // message with both may be an attempt at smuggling: never reuse.
        if framing.length.is_some() {
            keep_alive = false;
        }
        if last_coding_is_chunked(te) {
            Decode::Chunked(Chunk::Size)
        } else {
            keep_alive = false;
            Decode::Eof
        }
    } else if let Some(length) = framing.length {
        Decode::Length(length.map_err(str::to_string)?)
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

/// The framing headers of a response head, read while it is parsed.
#[derive(Default)]
struct Framing {
    /// A `Connection` header lists `close`.
    close: bool,
    /// The last `Transfer-Encoding` value.
    last_te: Option<HeaderValue>,
    /// The one `Content-Length` (repeated values must agree), when there is any.
    length: Option<Result<u64, &'static str>>,
}

impl Framing {
    fn note(&mut self, name: &HeaderName, value: &HeaderValue) {
        if name == CONNECTION {
            self.close |= has_token(value, "close");
        } else if name == TRANSFER_ENCODING {
            self.last_te = Some(value.clone());
        } else if name == CONTENT_LENGTH {
            self.length = Some(match self.length {
                None => content_length(value, None),
                Some(Ok(seen)) => content_length(value, Some(seen)),
                Some(Err(e)) => Err(e),
            });
        }
    }
}

/// The standard names upstreams send most, matched without hashing or
/// case folding (as sent in lower case or capitalized); anything else goes
/// through [`HeaderName::from_bytes`].
fn header_name(b: &[u8]) -> Result<HeaderName, http::header::InvalidHeaderName> {
    use http::header;
    Ok(match b {
        b"content-length" | b"Content-Length" => header::CONTENT_LENGTH,
        b"content-type" | b"Content-Type" => header::CONTENT_TYPE,
        b"date" | b"Date" => header::DATE,
        b"server" | b"Server" => header::SERVER,
        b"connection" | b"Connection" => header::CONNECTION,
        b"transfer-encoding" | b"Transfer-Encoding" => header::TRANSFER_ENCODING,
        b"cache-control" | b"Cache-Control" => header::CACHE_CONTROL,
        b"etag" | b"ETag" => header::ETAG,
        b"last-modified" | b"Last-Modified" => header::LAST_MODIFIED,
        b"vary" | b"Vary" => header::VARY,
        _ => HeaderName::from_bytes(b)?,
    })
}

fn has_token(v: &HeaderValue, token: &str) -> bool {
    v.to_str()
        .unwrap_or("")
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn last_coding_is_chunked(te: &HeaderValue) -> bool {
    te.to_str()
        .ok()
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
}

/// One `Content-Length` value (a comma-separated list of equal numbers),
/// which must agree with the one `seen` before it.
fn content_length(v: &HeaderValue, mut seen: Option<u64>) -> Result<u64, &'static str> {
    const INVALID: &str = "invalid upstream content-length";
    // Not UTF-8 (obs-text) cannot be digits either.
    for part in v.as_bytes().split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() {
            return Err(INVALID);
        }
        let mut n: u64 = 0;
        for &b in part {
            if !b.is_ascii_digit() {
                return Err(INVALID);
            }
            n = n
                .checked_mul(10)
                .and_then(|n| n.checked_add(u64::from(b - b'0')))
                .ok_or(INVALID)?;
        }
        if seen.is_some_and(|s| s != n) {
            return Err("conflicting upstream content-length values");
        }
        seen = Some(n);
    }
    seen.ok_or(INVALID)
}

/// One decoding step over the buffered bytes.
pub(super) enum Step {
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

/// One step of decoding `buf` as `decode`. `ext_left` is what remains of the
/// body's budget for chunk extensions, which are skipped but not free: each
/// line is bounded, and so is their total.
pub(super) fn decode_step(decode: Decode, buf: &mut BytesMut, ext_left: &mut usize) -> Step {
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
            // Optional whitespace (RFC 9112 §7.1.1 BWS), then extensions or nothing.
            let rest = &line[digits..];
            let ws = rest
                .iter()
                .position(|b| *b != b' ' && *b != b'\t')
                .unwrap_or(rest.len());
            let ext = &rest[ws..];
            if digits == 0 || digits > 16 || !(ext.is_empty() || ext[0] == b';') {
                return Step::Invalid("invalid upstream chunk size".into());
            }
            match ext_left.checked_sub(rest.len()) {
                Some(left) => *ext_left = left,
                None => return Step::Invalid("upstream chunk extensions too large".into()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::h1::MAX_CHUNK_EXTENSIONS;

    fn decode_all(
        mut decode: Decode,
        input: &[u8],
    ) -> Result<(Vec<u8>, Option<HeaderMap>), String> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        let mut ext_left = MAX_CHUNK_EXTENSIONS;
        loop {
            match decode_step(decode, &mut buf, &mut ext_left) {
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
        match decode_step(Decode::Length(3), &mut buf, &mut 0) {
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
    fn framing_headers_are_read_whatever_their_case_and_position() {
        let parse = |raw: &str, head: bool| parse_head(&mut BytesMut::from(raw), head);
        let h = parse(
            "HTTP/1.1 200 OK\r\nDate: x\r\nContent-Length: 007\r\nX-Up: a\r\n\r\nbody",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.decode, h.keep_alive), (Decode::Length(7), true));
        assert_eq!(h.headers["content-length"], "007");
        assert_eq!(h.headers["x-up"], "a");
        assert_eq!(h.headers.len(), 3);
        let h = parse(
            "HTTP/1.1 200 OK\r\nCONNECTION: Keep-Alive\r\nConnection: Close\r\ncontent-length: 1\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(!h.keep_alive, "close in any Connection header");
        assert_eq!(h.headers.get_all("connection").iter().count(), 2);
        let h = parse(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: Chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            h.decode,
            Decode::Chunked(Chunk::Size),
            "the last coding counts"
        );
        // A body-less response never reads its Content-Length.
        let h = parse(
            "HTTP/1.1 304 Not Modified\r\ncontent-length: x\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.decode, Decode::Length(0));
        for bad in [
            "content-length: 18446744073709551616",
            "content-length: ",
            "content-length: 1,,1",
            "content-length: 1\r\ncontent-length: x",
            "content-length: 2\r\nContent-Length: 3",
        ] {
            let raw = format!("HTTP/1.1 200 OK\r\n{bad}\r\n\r\n");
            assert!(parse(&raw, false).is_err(), "{bad:?}");
        }
        let h = parse(
            "HTTP/1.1 200 OK\r\ncontent-length: 18446744073709551615\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.decode, Decode::Length(u64::MAX));
    }

    #[test]
    fn heads_with_many_headers_parse_whole_and_in_order() {
        for n in [
            INLINE_SPANS - 1,
            INLINE_SPANS,
            INLINE_SPANS + 1,
            MAX_HEADERS - 1,
        ] {
            let mut raw = String::from("HTTP/1.1 200 OK\r\n");
            for i in 0..n {
                raw.push_str(&format!("x-h{i}: v{i}\r\n"));
            }
            raw.push_str("Content-Length: 2\r\n\r\nok");
            let mut buf = BytesMut::from(raw.as_str());
            let h = parse_head(&mut buf, false).unwrap().unwrap();
            assert_eq!(h.headers.len(), n + 1, "{n} headers");
            let names: Vec<&str> = h.headers.keys().map(|k| k.as_str()).collect();
            for (i, name) in names.iter().take(n).enumerate() {
                assert_eq!(*name, format!("x-h{i}"));
                assert_eq!(h.headers[*name], format!("v{i}"));
            }
            assert_eq!(h.decode, Decode::Length(2));
            assert_eq!(&buf[..], b"ok", "the body stays in the buffer");
        }
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
}
