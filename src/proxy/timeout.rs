//! Deadlines. A request's deadline is computed once at arrival: the route's
//! `timeouts.request`, capped by the caller's `grpc-timeout`; every later stage
//! (queue wait, each attempt, backoff) gets only what remains of it, and the
//! upstream is told what remains after queueing.

use std::time::Duration;

use http::{HeaderMap, HeaderValue};

/// The `grpc-timeout` header.
pub(crate) static GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// Parses `grpc-timeout` (`<1-8 digits><H|M|S|m|u|n>`); None when absent or malformed.
pub(crate) fn parse_grpc_timeout(h: &HeaderMap) -> Option<Duration> {
    parse_grpc_timeout_value(h.get(&GRPC_TIMEOUT)?)
}

/// One `grpc-timeout` value, as [`parse_grpc_timeout`] reads it.
pub(crate) fn parse_grpc_timeout_value(v: &HeaderValue) -> Option<Duration> {
    let v = v.as_bytes();
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit[0] {
        b'H' => Duration::from_secs(n.saturating_mul(3600)),
        b'M' => Duration::from_secs(n.saturating_mul(60)),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats a remaining budget as `grpc-timeout`: milliseconds, or microseconds
/// under 100 ms for precision; at most 8 digits, as gRPC's HTTP/2 protocol
/// spec demands.
pub(crate) fn format_grpc_timeout(d: Duration) -> HeaderValue {
    let ms = d.as_millis();
    let s = if ms < 100 {
        format!("{}u", d.as_micros().min(99_999_999))
    } else if ms <= 99_999_999 {
        format!("{ms}m")
    } else {
        format!("{}S", d.as_secs().min(99_999_999))
    };
    // Digits and a unit letter are always a valid header value.
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("1m"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_roundtrip() {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", HeaderValue::from_static("250m"));
        assert_eq!(parse_grpc_timeout(&h), Some(Duration::from_millis(250)));
        h.insert("grpc-timeout", HeaderValue::from_static("2S"));
        assert_eq!(parse_grpc_timeout(&h), Some(Duration::from_secs(2)));
        h.insert("grpc-timeout", HeaderValue::from_static("123456789m"));
        assert_eq!(parse_grpc_timeout(&h), None);
        h.insert("grpc-timeout", HeaderValue::from_static("5x"));
        assert_eq!(parse_grpc_timeout(&h), None);
        assert_eq!(format_grpc_timeout(Duration::from_millis(1500)), "1500m");
        assert_eq!(format_grpc_timeout(Duration::from_micros(2500)), "2500u");
    }
}
