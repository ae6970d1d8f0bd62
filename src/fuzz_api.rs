//! Entry points for the fuzz targets in `fuzz/` and for the bounded pass in
//! `tests/fuzz_corpus.rs`; not a stable API.
//!
//! Each function takes arbitrary bytes and must return for every input:
//! no panic, no hang, no unbounded allocation. Where an invariant is cheap
//! to state it is checked with an assertion, so a broken invariant shows up
//! as a crash the fuzzer reports.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, HOST, TE, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};

use crate::proxy::{h1, headers, timeout};
use crate::tls::inspect;

/// The bytes as an upstream's answer to the HTTP/1.1 client, for a GET, a
/// HEAD and a POST with a small body; in one read, in two reads split at an
/// offset taken from the data, and in small reads. However the bytes
/// arrive, the outcome is the same; the decoded body is never longer than
/// the input; HEAD, 204 and 304 answers have no body.
pub fn h1_response(data: &[u8]) {
    h1::fuzz::response(data);
}

/// A client's request head made from the bytes, through what Spillway does
/// to it on the way to an HTTP/1.1 upstream: hop-by-hop headers stripped,
/// forwarding headers added, the head encoded. The encoded head must parse
/// (httparse, as upstream servers do) to the same method and target, with
/// no hop-by-hop header left and Spillway's own framing.
///
/// Layout: byte 0 holds flags (bit 0 HTTPS, bit 1 a request body, bit 2 an
/// IPv6 peer); the rest is split at `\n` into the method, the target and
/// `name:value` header lines. Parts `http` rejects are skipped, as hyper
/// would have rejected them.
pub fn request_head(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let https = flags & 1 != 0;
    let body = (flags & 2 != 0).then(|| Bytes::from_static(b"body"));
    let peer = if flags & 4 != 0 {
        IpAddr::V6(Ipv6Addr::LOCALHOST)
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7))
    };
    let mut lines = rest.split(|&b| b == b'\n');
    let method = lines
        .next()
        .and_then(|m| Method::from_bytes(m).ok())
        .unwrap_or(Method::GET);
    let uri = lines
        .next()
        .and_then(|t| Uri::try_from(t).ok())
        .unwrap_or_else(|| Uri::from_static("/"));
    let mut h = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        h.append(name, value);
    }

    // What the proxy does before sending (see `prepare` and `send`).
    let upgrade = headers::is_upgrade_request(&h);
    let listed = connection_tokens(&h);
    let original_host = match h.get(HOST) {
        Some(v) => Some(v.clone()),
        None => uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    };
    if let (None, Some(host)) = (h.get(HOST), &original_host) {
        h.insert(HOST, host.clone());
    }
    headers::strip_hop_by_hop(&mut h, upgrade);
    let ip = headers::ip_header_value(peer);
    let fwd = headers::forwarded(&h, &ip, https, original_host);
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let head = h1::fuzz::request_head(&method, target, &h, &fwd, body.clone());

    // What an upstream server reads.
    let mut raw = vec![httparse::EMPTY_HEADER; h.len() + 8];
    let mut req = httparse::Request::new(&mut raw);
    let parsed = req.parse(&head);
    match parsed {
        Ok(httparse::Status::Complete(n)) => {
            assert_eq!(n, head.len(), "bytes after the encoded head: {head:?}")
        }
        other => panic!("the encoded head does not parse ({other:?}): {head:?}"),
    }
    assert_eq!(req.method, Some(method.as_str()), "method changed");
    assert_eq!(req.path, Some(target), "target changed");
    let mut proto = 0;
    let mut lengths = Vec::new();
    for hdr in req.headers.iter() {
        let name = hdr.name.to_ascii_lowercase();
        let value = hdr.value;
        match name.as_str() {
            "transfer-encoding" | "keep-alive" | "proxy-connection" | "proxy-authenticate" => {
                panic!("hop-by-hop header {name} forwarded: {head:?}")
            }
            "connection" => assert!(
                upgrade && value.eq_ignore_ascii_case(b"upgrade"),
                "connection header forwarded: {head:?}"
            ),
            "upgrade" => assert!(upgrade, "upgrade header without an upgrade: {head:?}"),
            "te" => assert!(
                value.eq_ignore_ascii_case(b"trailers"),
                "te other than trailers forwarded: {head:?}"
            ),
            "x-forwarded-proto" => proto += 1,
            "content-length" => lengths.push(value.to_vec()),
            _ => {}
        }
        // A header the client named in Connection is hop-by-hop too,
        // unless Spillway writes it itself.
        let own = matches!(
            name.as_str(),
            "x-request-id"
                | "x-forwarded-for"
                | "x-forwarded-proto"
                | "x-forwarded-host"
                | "content-length"
                | "connection"
                | "upgrade"
                | "te"
        );
        if !own {
            assert!(
                !listed.iter().any(|l| l.as_str() == name),
                "header {name}, named in Connection, forwarded: {head:?}"
            );
        }
    }
    assert_eq!(proto, 1, "x-forwarded-proto once: {head:?}");
    if let Some(b) = &body {
        assert_eq!(
            lengths,
            vec![b.len().to_string().into_bytes()],
            "Spillway's content-length only: {head:?}"
        );
    }
}

/// Names listed in every `Connection` header, read as bytes (RFC 9110
/// §7.6.1: comma-separated tokens, the header may repeat), minus the tokens
/// that are not header names.
fn connection_tokens(h: &HeaderMap) -> Vec<HeaderName> {
    let upgrade = headers::is_upgrade_request(h);
    h.get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.eq_ignore_ascii_case(b"close") && !t.eq_ignore_ascii_case(b"keep-alive"))
        .filter(|t| !(upgrade && t.eq_ignore_ascii_case(b"upgrade")))
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .filter(|n| *n != TE && *n != UPGRADE)
        .collect()
}

/// The bytes (lossily UTF-8) as a config file: parsed and validated, `Ok`
/// or `Err`, and a loaded config renders as JSON and as a summary.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match crate::config::load_str(&text, "fuzz.yaml") {
        Ok(loaded) => {
            let _ = loaded.config.to_json();
            let _ = loaded.config.summary();
        }
        Err(e) => {
            assert!(!e.issues.is_empty(), "an error without an issue");
            let _ = e.to_string();
        }
    }
}

/// The bytes as a `grpc-timeout` value. A value that parses formats back
/// (as Spillway sends what remains upstream) to a value that parses to the
/// same duration, rounded down to the unit used, or to the largest value
/// the format can carry.
pub fn grpc_timeout(data: &[u8]) {
    let Ok(v) = HeaderValue::from_bytes(data) else {
        return;
    };
    let mut h = HeaderMap::new();
    h.insert(&timeout::GRPC_TIMEOUT, v);
    let Some(d) = timeout::parse_grpc_timeout(&h) else {
        return;
    };
    let formatted = timeout::format_grpc_timeout(d);
    let text = formatted.to_str().unwrap_or("");
    assert!(
        (2..=9).contains(&text.len()),
        "grpc-timeout {text:?} is not 1-8 digits and a unit"
    );
    h.insert(&timeout::GRPC_TIMEOUT, formatted.clone());
    let back = timeout::parse_grpc_timeout(&h)
        .unwrap_or_else(|| panic!("{formatted:?} (formatted from {d:?}) does not parse"));
    let largest = Duration::from_secs(99_999_999);
    let unit = match text.as_bytes().last() {
        Some(b'u') => Duration::from_micros(1),
        Some(b'm') => Duration::from_millis(1),
        _ => Duration::from_secs(1),
    };
    assert!(back <= d, "{d:?} formatted as {text} reads back larger");
    assert!(
        d - back < unit || (d >= largest && back == largest),
        "{d:?} formatted as {text} reads back as {back:?}"
    );
}

/// The bytes as a DER certificate (inspected, rendered as the client
/// identity header) and as PEM text (a certificate chain and key, a CA
/// bundle). A certificate that inspects renders an identity value, and it
/// is printable ASCII.
pub fn certificate(data: &[u8]) {
    let info = inspect::cert_info(data);
    let identity = inspect::identity_value(data);
    assert_eq!(
        info.is_some(),
        identity.is_some(),
        "cert_info and identity_value disagree on whether the certificate parses"
    );
    if let Some(v) = identity {
        assert!(
            v.as_bytes().iter().all(|b| (0x20..0x7f).contains(b)),
            "identity value not printable ASCII: {v:?}"
        );
    }
    if let Some(info) = info {
        let _ = inspect::validity(&info, inspect::now_unix());
        let _ = inspect::fmt_serial(&info.serial);
        let _ = inspect::fmt_time(info.not_before);
        let _ = inspect::fmt_time(info.not_after);
    }
    let (cert, key) = (Path::new("fuzz-cert.pem"), Path::new("fuzz-key.pem"));
    let _ = inspect::pair_from_pem(cert, data, key, data).map_err(|e| e.into_message());
    let _ = inspect::roots_from_pem(cert, data);
    // A chain and a key as two texts, split where a PEM block ends.
    if let Some(at) = find(data, b"-----END") {
        let (c, k) = data.split_at(at + 8);
        let _ = inspect::pair_from_pem(cert, c, key, k).map_err(|e| e.into_message());
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The bytes as what a client sends to the HTTP/1.1 fast path (see
/// `server::fast`): whole, and split in two at an offset taken from the
/// data. However they arrive, the outcome is the same; a declined head
/// leaves the bytes exactly as they were; a taken head is HTTP/1.1 with an
/// origin-form target and none of the headers the fast path leaves to
/// hyper. A response head made from the request's headers is framed so
/// that httparse reads it back with the same status.
pub fn server_head(data: &[u8]) {
    use crate::server::fast::{self, Step};
    let whole = outcome(data);
    let cut = data
        .first()
        .map_or(0, |&b| usize::from(b) % (data.len() + 1));
    let mut buf = bytes::BytesMut::from(&data[..cut]);
    let first = fast::take_request(&mut buf);
    if !matches!(first, Step::Partial) {
        // A prefix already decides: the rest cannot change that (a taken
        // head does not depend on later bytes; a declined one is declined).
        return;
    }
    buf.extend_from_slice(&data[cut..]);
    let split = fast::take_request(&mut buf);
    assert_eq!(summary(&split, &buf), whole, "split at {cut}");

    fn outcome(data: &[u8]) -> String {
        let mut buf = bytes::BytesMut::from(data);
        let step = fast::take_request(&mut buf);
        if let Step::Request(req, head) = &step {
            assert_eq!(req.version(), http::Version::HTTP_11);
            assert!(req.uri().path().starts_with('/'));
            assert_ne!(req.method(), Method::CONNECT);
            for banned in [
                "content-length",
                "transfer-encoding",
                "expect",
                "upgrade",
                "te",
            ] {
                assert!(!req.headers().contains_key(banned), "{banned} taken");
            }
            assert!(data.ends_with(&buf) && buf.len() < data.len());
            assert_eq!(head.head_method, req.method() == Method::HEAD);
            let mut out = bytes::BytesMut::new();
            let status = http::StatusCode::from_u16(200 + (data.len() % 400) as u16)
                .unwrap_or(http::StatusCode::OK);
            let mut headers = req.headers().clone();
            headers.remove(http::header::CONNECTION);
            if fast::encode_head(&mut out, status, &headers, Some(Some(4)), false, head.close)
                .is_ok()
            {
                let mut slots = [httparse::EMPTY_HEADER; 128];
                let mut resp = httparse::Response::new(&mut slots);
                let parsed = resp.parse(&out);
                assert!(
                    matches!(parsed, Ok(httparse::Status::Complete(n)) if n == out.len()),
                    "encoded head does not parse: {parsed:?}"
                );
                assert_eq!(resp.code, Some(status.as_u16()));
            }
        } else if matches!(step, Step::Decline) {
            assert_eq!(&buf[..], data, "declined bytes changed");
        }
        summary(&step, &buf)
    }

    fn summary(step: &Step, rest: &[u8]) -> String {
        match step {
            Step::Request(req, head) => format!(
                "request {} {} {:?} {head:?} rest {}",
                req.method(),
                req.uri(),
                req.headers(),
                rest.len()
            ),
            Step::Partial => "partial".into(),
            Step::Decline => "decline".into(),
        }
    }
}
