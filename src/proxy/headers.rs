//! Per-hop header handling: hop-by-hop headers are stripped on both legs
//! (RFC 9110 §7.6.1), forwarding headers are added on the way up.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `x-request-id`: kept when present, generated when absent.
pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Is `n` one of the hop-by-hop headers [`strip_hop_by_hop`] handles?
fn is_hop_by_hop(n: &HeaderName) -> bool {
    n == header::CONNECTION
        || n == header::TRANSFER_ENCODING
        || n == header::TE
        || n == header::UPGRADE
        || n == header::PROXY_AUTHENTICATE
        || n == KEEP_ALIVE
        || n == PROXY_CONNECTION
}

/// Removes hop-by-hop headers. With `upgrade`, `Connection: upgrade` and
/// `Upgrade` are kept because the next hop must see them to switch protocols.
pub fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none of them: one pass over the names instead of a
    // hashed lookup per hop-by-hop header.
    let any = h.keys().any(is_hop_by_hop);
    strip_found(h, upgrade, any);
}

/// [`strip_hop_by_hop`] when a [`Scan`] already told whether there are any.
pub(crate) fn strip_scanned(h: &mut HeaderMap, upgrade: bool, scan: &Scan) {
    strip_found(h, upgrade, scan.hop_by_hop);
}

fn strip_found(h: &mut HeaderMap, upgrade: bool, any: bool) {
    if !any {
        if upgrade {
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        return;
    }
    // Headers named by Connection are hop-by-hop too, in every Connection
    // header (it may repeat) and read as bytes (one token that is not UTF-8
    // must not hide the others). Collect names first: the map cannot be
    // mutated while borrowed. Only allocates when Connection lists something
    // other than the usual tokens.
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case(b"close")
                && !t.eq_ignore_ascii_case(b"keep-alive")
                && (!upgrade || !t.eq_ignore_ascii_case(b"upgrade"))
        })
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .collect();
    for name in listed {
        h.remove(&name);
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
    h.remove(&KEEP_ALIVE);
    h.remove(&PROXY_CONNECTION);
    h.remove(header::TRANSFER_ENCODING);
    h.remove(header::PROXY_AUTHENTICATE);
    if let Some(te) = h.get(header::TE) {
        let wants_trailers = te
            .to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
        if wants_trailers {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            h.remove(header::TE);
        }
    }
}

/// Is this an HTTP/1.1 protocol upgrade request (WebSocket and friends)?
pub(crate) fn is_upgrade_request(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE) && h.get_all(header::CONNECTION).iter().any(lists_upgrade)
}

fn lists_upgrade(v: &HeaderValue) -> bool {
    v.to_str()
        .unwrap_or("")
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// What the pipeline reads from a client request's headers, found in one
/// pass over them. A request carries a few headers; a hashed lookup for
/// each name the stages ask about (about eight) cost more than one walk
/// comparing names. Each field is what the lookup it replaces would give:
/// the first value of a name, or whether the name is there.
#[derive(Default)]
pub(crate) struct Scan {
    /// The first `content-type` names gRPC.
    pub grpc: bool,
    /// The first `grpc-timeout`, parsed (none when malformed).
    pub grpc_timeout: Option<std::time::Duration>,
    /// A `grpc-timeout` header is there, well-formed or not.
    pub has_grpc_timeout: bool,
    /// The first `content-length`, parsed (none when malformed).
    pub content_length: Option<u64>,
    /// The first `host`.
    pub host: Option<HeaderValue>,
    /// `Upgrade` is there and a `Connection` lists `upgrade` (as
    /// [`is_upgrade_request`]).
    pub upgrade: bool,
    pub has_request_id: bool,
    pub has_forwarded_for: bool,
    /// An `x-forwarded-for`, `-proto` or `-host` header is there: one the
    /// forwarding headers replace.
    pub has_forwarding: bool,
    /// A hop-by-hop header is there: stripping may remove any header (those
    /// a `Connection` names), so what it leaves must be looked up again.
    pub hop_by_hop: bool,
}

impl Scan {
    /// Reads `h` once.
    pub(crate) fn of(h: &HeaderMap) -> Self {
        let mut s = Scan::default();
        let (mut content_type, mut length, mut upgrade, mut lists) = (false, false, false, false);
        for (name, value) in h {
            // Matched as text: most names are none of these, and a string
            // match rules them out by length, mostly.
            match name.as_str() {
                "host" if s.host.is_none() => s.host = Some(value.clone()),
                "content-type" if !content_type => {
                    content_type = true;
                    s.grpc = crate::error::is_grpc_content_type(value);
                }
                "content-length" if !length => {
                    length = true;
                    s.content_length = content_length_value(value);
                }
                "x-request-id" => s.has_request_id = true,
                "x-forwarded-for" => {
                    s.has_forwarded_for = true;
                    s.has_forwarding = true;
                }
                "x-forwarded-proto" | "x-forwarded-host" => s.has_forwarding = true,
                "grpc-timeout" if !s.has_grpc_timeout => {
                    s.has_grpc_timeout = true;
                    s.grpc_timeout = crate::proxy::timeout::parse_grpc_timeout_value(value);
                }
                "upgrade" => {
                    s.hop_by_hop = true;
                    upgrade = true;
                }
                "connection" => {
                    s.hop_by_hop = true;
                    lists = lists || lists_upgrade(value);
                }
                "transfer-encoding" | "te" | "proxy-authenticate" | "keep-alive"
                | "proxy-connection" => s.hop_by_hop = true,
                _ => {}
            }
        }
        s.upgrade = upgrade && lists;
        s
    }
}

/// A `content-length` value as a number: the first value of the header,
/// trimmed; `None` when it is not one.
pub(crate) fn content_length_value(v: &HeaderValue) -> Option<u64> {
    v.to_str().ok()?.trim().parse().ok()
}

/// The forwarding headers of one request: x-request-id (when the client
/// sent none), x-forwarded-for (the client's chain with the peer appended),
/// x-forwarded-proto and x-forwarded-host (set). Computed once per request;
/// the HTTP/1.1 client writes them while encoding the head (no insertion
/// into, and no growth of, the request's header map), the HTTP/2 path
/// inserts them ([`Forwarded::apply`]).
#[derive(Clone, Debug)]
pub struct Forwarded {
    /// A generated id, kept as its digits: the HTTP/1.1 client copies them
    /// into the head, so a request costs no allocation for its id.
    request_id: Option<RequestId>,
    xff: Option<HeaderValue>,
    https: bool,
    host: Option<HeaderValue>,
    /// The request carries a header these replace ([`Forwarded::replaces`]
    /// can be true): most do not, and the encoder then skips the check.
    replaces_some: bool,
}

/// Computes the forwarding headers for a request with headers `h`.
/// `client_ip` is the connection's peer address as a header value (made
/// once per connection, so the common case costs no allocation).
pub fn forwarded(
    h: &HeaderMap,
    client_ip: &HeaderValue,
    https: bool,
    original_host: Option<HeaderValue>,
) -> Forwarded {
    let has_forwarded_for = h.contains_key(&X_FORWARDED_FOR);
    let present = Present {
        request_id: h.contains_key(&X_REQUEST_ID),
        forwarded_for: has_forwarded_for,
        forwarding: has_forwarded_for
            || h.contains_key(&X_FORWARDED_PROTO)
            || h.contains_key(&X_FORWARDED_HOST),
    };
    forwarded_known(h, present, client_ip, https, original_host)
}

/// [`forwarded`] for headers read by `scan` and then stripped: what the scan
/// found holds unless stripping had anything to remove.
pub(crate) fn forwarded_scanned(
    h: &HeaderMap,
    scan: &Scan,
    client_ip: &HeaderValue,
    https: bool,
    original_host: Option<HeaderValue>,
) -> Forwarded {
    if scan.hop_by_hop {
        forwarded(h, client_ip, https, original_host)
    } else {
        let present = Present {
            request_id: scan.has_request_id,
            forwarded_for: scan.has_forwarded_for,
            forwarding: scan.has_forwarding,
        };
        forwarded_known(h, present, client_ip, https, original_host)
    }
}

/// Which of the headers [`forwarded`] looks for a request carries.
#[derive(Clone, Copy)]
pub(crate) struct Present {
    pub request_id: bool,
    pub forwarded_for: bool,
    /// `x-forwarded-for`, `-proto` or `-host`.
    pub forwarding: bool,
}

/// [`forwarded`] when which of its headers `h` has is known already.
pub(crate) fn forwarded_known(
    h: &HeaderMap,
    present: Present,
    client_ip: &HeaderValue,
    https: bool,
    original_host: Option<HeaderValue>,
) -> Forwarded {
    let request_id = (!present.request_id).then(new_request_id);
    // Append to any existing chain (several headers fold into one, in order).
    let xff = if present.forwarded_for {
        let mut chain = Vec::with_capacity(64);
        for v in h.get_all(&X_FORWARDED_FOR) {
            chain.extend_from_slice(v.as_bytes());
            chain.extend_from_slice(b", ");
        }
        chain.extend_from_slice(client_ip.as_bytes());
        HeaderValue::from_maybe_shared(bytes::Bytes::from(chain)).ok()
    } else {
        Some(client_ip.clone())
    };
    Forwarded {
        request_id,
        xff,
        https,
        host: original_host,
        replaces_some: present.forwarding,
    }
}

impl Forwarded {
    /// Can [`Forwarded::replaces`] be true for any of the request's headers?
    pub(crate) fn replaces_some(&self) -> bool {
        self.replaces_some
    }

    /// Does one of these headers replace the request's own `name`?
    pub(crate) fn replaces(&self, name: &HeaderName) -> bool {
        (name == X_FORWARDED_FOR && self.xff.is_some())
            || name == X_FORWARDED_PROTO
            || (name == X_FORWARDED_HOST && self.host.is_some())
    }

    /// How many bytes [`Forwarded::encode`] writes.
    pub(crate) fn encoded_len(&self) -> usize {
        let mut len = if self.request_id.is_some() {
            REQUEST_ID_LINE
        } else {
            0
        };
        self.each_value(|n, v| len += n.as_str().len() + v.len() + 4);
        len
    }

    /// Writes the headers as HTTP/1.1 header lines (lower-case names), in order.
    pub(crate) fn encode(&self, out: &mut bytes::BytesMut) {
        if let Some(id) = &self.request_id {
            // One copy of a fixed size, which the compiler does inline.
            let mut line = [0u8; REQUEST_ID_LINE];
            line[..14].copy_from_slice(b"x-request-id: ");
            line[14..46].copy_from_slice(&id.0);
            line[46..].copy_from_slice(b"\r\n");
            out.extend_from_slice(&line);
        }
        if let Some(v) = &self.xff {
            out.extend_from_slice(b"x-forwarded-for: ");
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if self.https {
            out.extend_from_slice(b"x-forwarded-proto: https\r\n");
        } else {
            out.extend_from_slice(b"x-forwarded-proto: http\r\n");
        }
        if let Some(v) = &self.host {
            out.extend_from_slice(b"x-forwarded-host: ");
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The headers to add, in order, as name and value bytes.
    #[cfg(test)]
    pub(crate) fn each(&self, mut f: impl FnMut(&HeaderName, &[u8])) {
        if let Some(id) = &self.request_id {
            f(&X_REQUEST_ID, &id.0);
        }
        self.each_value(|n, v| f(n, v.as_bytes()));
    }

    /// The headers other than a generated request id, in order.
    fn each_value(&self, mut f: impl FnMut(&HeaderName, &HeaderValue)) {
        if let Some(v) = &self.xff {
            f(&X_FORWARDED_FOR, v);
        }
        let proto = HeaderValue::from_static(if self.https { "https" } else { "http" });
        f(&X_FORWARDED_PROTO, &proto);
        if let Some(v) = &self.host {
            f(&X_FORWARDED_HOST, v);
        }
    }

    /// Inserts the headers into `h` (replacing what they replace).
    pub fn apply(&self, h: &mut HeaderMap) {
        h.reserve(4);
        if let Some(id) = &self.request_id {
            // 32 ASCII hex digits are always a valid header value.
            if let Ok(v) = HeaderValue::from_bytes(&id.0) {
                h.insert(X_REQUEST_ID.clone(), v);
            }
        }
        self.each_value(|n, v| {
            h.insert(n.clone(), v.clone());
        });
    }

    /// The request id the upstream sees, when Spillway made it.
    pub(crate) fn request_id(&self) -> Option<&str> {
        self.request_id
            .as_ref()
            .and_then(|id| std::str::from_utf8(&id.0).ok())
    }
}

/// A generated request id: 32 lower-case hex digits.
#[derive(Clone, Copy)]
struct RequestId([u8; 32]);

/// `x-request-id: ` (14 bytes), 32 digits, CRLF.
const REQUEST_ID_LINE: usize = 48;

impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(s) => std::fmt::Debug::fmt(s, f),
            Err(_) => f.write_str("RequestId(?)"),
        }
    }
}

/// Adds the forwarding headers to `h` (see [`forwarded`]).
pub fn add_forwarding(
    h: &mut HeaderMap,
    client_ip: &HeaderValue,
    https: bool,
    original_host: Option<HeaderValue>,
) {
    forwarded(h, client_ip, https, original_host).apply(h);
}

/// A peer address as a header value, shareable without copying.
pub fn ip_header_value(ip: IpAddr) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(ip.to_string()))
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// 128 random bits as 32 hex digits.
fn new_request_id() -> RequestId {
    let n = fastrand::u128(..);
    let mut buf = [0u8; 32];
    for (out, i) in buf.chunks_exact_mut(8).zip(0..) {
        out.copy_from_slice(&hex8((n >> (32 * i)) as u32));
    }
    RequestId(buf)
}

/// The 8 nibbles of `x` as lower-case hex digits (in some fixed order: the
/// id only has to be random), computed on all eight at once.
fn hex8(x: u32) -> [u8; 8] {
    // One nibble per byte.
    let mut v = u64::from(x);
    v = (v | (v << 16)) & 0x0000_FFFF_0000_FFFF;
    v = (v | (v << 8)) & 0x00FF_00FF_00FF_00FF;
    v = (v | (v << 4)) & 0x0F0F_0F0F_0F0F_0F0F;
    // 1 in each byte whose nibble is 10 or more (adding 6 carries into bit 4).
    let letters = ((v + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    // '0' + nibble, and past '9' on to 'a' (39 = 'a' - '0' - 10).
    (v + 0x3030_3030_3030_3030 + letters * 39).to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_named() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("te", HeaderValue::from_static("gzip, trailers"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h, false);
        for gone in [
            "connection",
            "x-secret",
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "upgrade",
        ] {
            assert!(!h.contains_key(gone), "{gone} should be stripped");
        }
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-end-to-end"], "kept");
    }

    #[test]
    fn every_connection_header_names_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("upgrade"));
        h.append("connection", HeaderValue::from_static("x-one"));
        h.append(
            "connection",
            HeaderValue::from_bytes(b"x-two, caf\xc3\xa9").unwrap(),
        );
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-one", HeaderValue::from_static("1"));
        h.insert("x-two", HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut h, true);
        assert!(!h.contains_key("x-one"), "named in the second Connection");
        assert!(!h.contains_key("x-two"), "named next to a non-UTF-8 token");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
    }

    /// Every field of a scan is what the lookup it stands for gives.
    #[test]
    fn a_scan_reads_what_lookups_would() {
        let cases: &[&[(&str, &[u8])]] = &[
            &[("host", b"svc"), ("user-agent", b"x"), ("accept", b"*/*")],
            &[],
            &[
                ("content-type", b"application/grpc+proto"),
                ("content-type", b"text/plain"),
                ("grpc-timeout", b"250m"),
                ("grpc-timeout", b"1S"),
                ("content-length", b" 12 "),
                ("content-length", b"13"),
                ("host", b"a"),
                ("host", b"b"),
            ],
            &[
                ("content-type", b"text/plain"),
                ("content-type", b"application/grpc"),
                ("grpc-timeout", b"bad"),
                ("content-length", b"x"),
                ("x-request-id", b"abc"),
                ("x-forwarded-for", b"10.0.0.1"),
            ],
            &[
                ("upgrade", b"websocket"),
                ("connection", b"keep-alive"),
                ("connection", b"Upgrade"),
            ],
            &[("connection", b"upgrade")],
            &[("upgrade", b"h2c")],
            &[("te", b"trailers"), ("keep-alive", b"5")],
            &[
                ("proxy-connection", b"keep-alive"),
                ("transfer-encoding", b"chunked"),
            ],
            &[
                ("proxy-authenticate", b"basic"),
                ("content-length", b"caf\xc3\xa9"),
            ],
        ];
        let alone: Vec<[(&str, &[u8]); 1]> = [
            "connection",
            "transfer-encoding",
            "te",
            "upgrade",
            "proxy-authenticate",
            "keep-alive",
            "proxy-connection",
            "x-request-id",
            "x-forwarded-for",
            "grpc-timeout",
            "content-type",
            "content-length",
            "host",
        ]
        .iter()
        .map(|n| [(*n, &b"1"[..])])
        .collect();
        for case in cases.iter().copied().chain(alone.iter().map(|c| &c[..])) {
            let mut h = HeaderMap::new();
            for (n, v) in case.iter() {
                h.append(
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_bytes(v).unwrap(),
                );
            }
            let s = Scan::of(&h);
            let ct = h.get(header::CONTENT_TYPE);
            assert_eq!(
                s.grpc,
                ct.is_some_and(crate::error::is_grpc_content_type),
                "{case:?}"
            );
            assert_eq!(
                s.grpc_timeout,
                crate::proxy::timeout::parse_grpc_timeout(&h),
                "{case:?}"
            );
            assert_eq!(
                s.has_grpc_timeout,
                h.contains_key(&crate::proxy::timeout::GRPC_TIMEOUT)
            );
            assert_eq!(
                s.content_length,
                h.get(header::CONTENT_LENGTH).and_then(content_length_value),
                "{case:?}"
            );
            assert_eq!(s.host.as_ref(), h.get(header::HOST), "{case:?}");
            assert_eq!(s.upgrade, is_upgrade_request(&h), "{case:?}");
            assert_eq!(s.has_request_id, h.contains_key(&X_REQUEST_ID));
            assert_eq!(s.has_forwarded_for, h.contains_key(&X_FORWARDED_FOR));
            assert_eq!(s.hop_by_hop, h.keys().any(is_hop_by_hop), "{case:?}");
        }
    }

    #[test]
    fn scanned_forwarding_headers_match_looked_up_ones_after_stripping() {
        let ip = ip_header_value("127.0.0.1".parse().unwrap());
        for connection in [None, Some("x-request-id, x-forwarded-for"), Some("close")] {
            let mut h = HeaderMap::new();
            h.insert("x-request-id", HeaderValue::from_static("abc"));
            h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
            if let Some(c) = connection {
                h.insert("connection", HeaderValue::from_str(c).unwrap());
            }
            let scan = Scan::of(&h);
            let mut looked_up = h.clone();
            strip_hop_by_hop(&mut looked_up, false);
            strip_scanned(&mut h, false, &scan);
            assert_eq!(h, looked_up);
            let a = forwarded_scanned(&h, &scan, &ip, false, None);
            let b = forwarded(&looked_up, &ip, false, None);
            assert_eq!(
                a.request_id.is_some(),
                b.request_id.is_some(),
                "{connection:?}"
            );
            assert_eq!(a.xff, b.xff, "{connection:?}");
        }
    }

    #[test]
    fn only_requests_with_a_forwarding_header_can_have_one_replaced() {
        let ip = ip_header_value("127.0.0.1".parse().unwrap());
        for name in [
            None,
            Some("x-forwarded-for"),
            Some("x-forwarded-proto"),
            Some("x-forwarded-host"),
            Some("x-forwarded-port"),
        ] {
            let mut h = HeaderMap::new();
            h.insert("host", HeaderValue::from_static("svc"));
            if let Some(n) = name {
                h.insert(n, HeaderValue::from_static("x"));
            }
            let host = Some(HeaderValue::from_static("svc"));
            let scanned = forwarded_scanned(&h, &Scan::of(&h), &ip, false, host.clone());
            let looked_up = forwarded(&h, &ip, false, host);
            let any = h.keys().any(|n| looked_up.replaces(n));
            assert_eq!(looked_up.replaces_some(), any, "{name:?}");
            assert_eq!(scanned.replaces_some(), any, "{name:?}");
        }
    }

    #[test]
    fn request_ids_are_32_lower_case_hex_digits_and_every_digit_occurs() {
        let mut seen = [false; 16];
        for x in [0u32, 0xffff_ffff, 0x0123_4567, 0x89ab_cdef] {
            for d in hex8(x) {
                let v = (d as char).to_digit(16).unwrap();
                assert_eq!(d, b"0123456789abcdef"[v as usize]);
                seen[v as usize] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
        let mut digits: Vec<u8> = hex8(0x0123_4567).to_vec();
        digits.sort_unstable();
        assert_eq!(digits, b"01234567");
        for _ in 0..100 {
            let id = new_request_id();
            assert!(id
                .0
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)));
        }
    }

    #[test]
    fn encoded_forwarding_headers_are_the_headers_each_names() {
        let ip = ip_header_value("127.0.0.1".parse().unwrap());
        for (https, host, xff) in [(false, None, false), (true, Some("svc"), true)] {
            let mut h = HeaderMap::new();
            if xff {
                h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
            }
            let fwd = forwarded(&h, &ip, https, host.map(HeaderValue::from_static));
            let mut want = Vec::new();
            fwd.each(|n, v| {
                want.extend_from_slice(n.as_str().as_bytes());
                want.extend_from_slice(b": ");
                want.extend_from_slice(v);
                want.extend_from_slice(b"\r\n");
            });
            let mut out = bytes::BytesMut::new();
            fwd.encode(&mut out);
            assert_eq!(&out[..], &want[..]);
            assert_eq!(fwd.encoded_len(), want.len());
        }
    }

    #[test]
    fn forwarding_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        add_forwarding(
            &mut h,
            &ip_header_value("127.0.0.1".parse().unwrap()),
            false,
            Some(HeaderValue::from_static("svc.local")),
        );
        assert_eq!(h["x-request-id"].len(), 32);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "svc.local");
        let mut h2 = HeaderMap::new();
        h2.insert("x-request-id", HeaderValue::from_static("abc"));
        add_forwarding(
            &mut h2,
            &ip_header_value("::1".parse().unwrap()),
            true,
            None,
        );
        assert_eq!(h2["x-request-id"], "abc");
        assert_eq!(h2["x-forwarded-for"], "::1");
        assert_eq!(h2["x-forwarded-proto"], "https");
    }
}
