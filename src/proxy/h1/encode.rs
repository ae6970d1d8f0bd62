//! Request head encoding and request body framing.

use bytes::BytesMut;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, Method};
use http_body::Body;

use crate::proxy::headers::Forwarded;
use crate::proxy::request_body::UpstreamBody;

// === request head ===

/// How the request body is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Framing {
    /// No body: the request's own `Content-Length` (if any) passes.
    None,
    Length(u64),
    Chunked,
}

/// How `body` is framed: its known length, chunked when the length is unknown, or none.
pub(super) fn framing(body: &UpstreamBody) -> Framing {
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
    let mut out = BytesMut::new();
    encode_head_into(&mut out, method, target, headers, fwd, body, true);
    out
}

/// [`encode_head`] appended to `out`. With `exact`, `out` first makes room
/// for the head's exact size (one pass over the headers to add it up);
/// without, it grows as the head is written, for a buffer that has room for
/// most heads already.
pub(super) fn encode_head_into(
    out: &mut BytesMut,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    fwd: Option<&Forwarded>,
    body: &UpstreamBody,
    exact: bool,
) {
    let framing = framing(body);
    if exact {
        let mut len = method.as_str().len() + target.len() + 64;
        for (n, v) in headers {
            len += n.as_str().len() + v.len() + 4;
        }
        if let Some(f) = fwd {
            len += f.encoded_len();
        }
        out.reserve(len);
    }
    // Most requests carry none of the headers the forwarding ones replace.
    let replacing = fwd.filter(|f| f.replaces_some());
    out.extend_from_slice(method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (n, v) in headers {
        if n == TRANSFER_ENCODING
            || (n == CONTENT_LENGTH && framing != Framing::None)
            || replacing.is_some_and(|f| f.replaces(n))
        {
            continue;
        }
        out.extend_from_slice(n.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(f) = fwd {
        f.encode(out);
    }
    match framing {
        Framing::None => {}
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
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
/// Appends `n` in lower-case hex without allocating: a chunk's size line.
pub(super) fn push_hex(out: &mut BytesMut, mut n: usize) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::HeaderValue;

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
}
