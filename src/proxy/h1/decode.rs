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

/// Parses a complete response head off the front of `buf`, or `None` when
/// more bytes are needed.
pub(super) fn parse_head(buf: &mut BytesMut, is_head: bool) -> Result<Option<Head>, String> {
    // First pass: is the head complete, and how long is it?
    let len = {
        let mut raw = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        match httparse::ParserConfig::default()
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
