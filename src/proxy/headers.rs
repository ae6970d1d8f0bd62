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

/// Removes hop-by-hop headers. With `upgrade`, `Connection: upgrade` and
/// `Upgrade` are kept because the next hop must see them to switch protocols.
pub fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none of them: one pass over the names instead of a
    // hashed lookup per hop-by-hop header.
    let any = h.keys().any(|n| {
        n == header::CONNECTION
            || n == header::TRANSFER_ENCODING
            || n == header::TE
            || n == header::UPGRADE
            || n == header::PROXY_AUTHENTICATE
            || n == KEEP_ALIVE
            || n == PROXY_CONNECTION
    });
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
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .unwrap_or("")
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
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
    proto: HeaderValue,
    host: Option<HeaderValue>,
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
    let request_id = (!h.contains_key(&X_REQUEST_ID)).then(new_request_id);
    // Append to any existing chain (several headers fold into one, in order).
    let xff = if h.contains_key(&X_FORWARDED_FOR) {
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
        proto: HeaderValue::from_static(if https { "https" } else { "http" }),
        host: original_host,
    }
}

impl Forwarded {
    /// Does one of these headers replace the request's own `name`?
    pub(crate) fn replaces(&self, name: &HeaderName) -> bool {
        (name == X_FORWARDED_FOR && self.xff.is_some())
            || name == X_FORWARDED_PROTO
            || (name == X_FORWARDED_HOST && self.host.is_some())
    }

    /// The headers to add, in order, as name and value bytes.
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
        f(&X_FORWARDED_PROTO, &self.proto);
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
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = fastrand::u128(..);
    let mut buf = [0u8; 32];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = HEX[((n >> (i * 4)) & 0xf) as usize];
    }
    RequestId(buf)
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
