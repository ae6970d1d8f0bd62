//! Every response Spillway makes itself. Status, headers and the metric's
//! `reason` label come from ONE match ([`ProxyError::parts`]), so a reply and its
//! accounting can never disagree.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::config::FallbackConfig;
use crate::proxy::body::ProxyBody;

/// The header naming why Spillway answered locally.
pub const REASON_HEADER: &str = "x-spillway-reason";

/// Why a request was answered the way it was: `upstream` or a local reason.
/// The string forms are metric label values and the `x-spillway-reason` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    Upstream,
    QueueFull,
    QueueTimeout,
    GlobalLimit,
    BreakerOpen,
    UpstreamTimeout,
    UpstreamConnect,
    UpstreamReset,
    NoRoute,
    BodyTooLarge,
    Draining,
    /// The client stalled sending its request body for `response_body_idle`.
    ClientTimeout,
}

impl Reason {
    /// Number of reasons (array sizes for per-reason handles).
    pub(crate) const COUNT: usize = 12;

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Upstream => "upstream",
            Reason::QueueFull => "queue_full",
            Reason::QueueTimeout => "queue_timeout",
            Reason::GlobalLimit => "global_limit",
            Reason::BreakerOpen => "breaker_open",
            Reason::UpstreamTimeout => "upstream_timeout",
            Reason::UpstreamConnect => "upstream_connect",
            Reason::UpstreamReset => "upstream_reset",
            Reason::NoRoute => "no_route",
            Reason::BodyTooLarge => "body_too_large",
            Reason::Draining => "draining",
            Reason::ClientTimeout => "client_timeout",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// Shed reasons take the route's `shed.status` and may be replaced by a fallback.
    pub(crate) fn is_shed(self) -> bool {
        matches!(
            self,
            Reason::QueueFull | Reason::QueueTimeout | Reason::GlobalLimit
        )
    }
}

/// A local reply: what went wrong, and what the route says about answering it.
#[derive(Clone, Debug)]
pub(crate) struct ProxyError {
    pub reason: Reason,
    /// For shed reasons: the route's `shed.status`.
    pub shed_status: u16,
    /// Retry-After to send (shed: `shed.retry_after`; breaker: time left open).
    pub retry_after: Option<Duration>,
}

impl ProxyError {
    pub(crate) fn new(reason: Reason) -> Self {
        ProxyError {
            reason,
            shed_status: 429,
            retry_after: None,
        }
    }

    pub(crate) fn retry_after(mut self, d: Duration) -> Self {
        self.retry_after = Some(d);
        self
    }

    pub(crate) fn shed(reason: Reason, status: u16, retry_after: Duration) -> Self {
        ProxyError {
            reason,
            shed_status: status,
            retry_after: Some(retry_after),
        }
    }

    /// HTTP status, gRPC status and message: the one table of local replies.
    pub(crate) fn parts(&self) -> (StatusCode, u8, &'static str) {
        let shed = StatusCode::from_u16(self.shed_status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
        match self.reason {
            Reason::QueueFull => (shed, 8, "route queue is full"),
            Reason::QueueTimeout => (shed, 8, "waited too long in the route queue"),
            Reason::GlobalLimit => (shed, 8, "proxy-wide in-flight limit reached"),
            Reason::BreakerOpen => (
                StatusCode::SERVICE_UNAVAILABLE,
                14,
                "circuit breaker is open",
            ),
            Reason::UpstreamTimeout => (StatusCode::GATEWAY_TIMEOUT, 4, "upstream timed out"),
            Reason::UpstreamConnect => {
                (StatusCode::BAD_GATEWAY, 14, "could not connect to upstream")
            }
            Reason::UpstreamReset => (StatusCode::BAD_GATEWAY, 14, "upstream connection broke"),
            Reason::NoRoute => (StatusCode::NOT_FOUND, 12, "no route matches"),
            Reason::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, 8, "request body too large"),
            Reason::Draining => (
                StatusCode::SERVICE_UNAVAILABLE,
                14,
                "proxy is shutting down",
            ),
            Reason::ClientTimeout => (StatusCode::REQUEST_TIMEOUT, 4, "request body stalled"),
            // Never a local reply; kept total so the table has no holes.
            Reason::Upstream => (StatusCode::BAD_GATEWAY, 13, "upstream"),
        }
    }

    /// The response sent to the client. `grpc`: the request was gRPC, so reply in
    /// its shape (HTTP 200 + grpc-status). A fallback replaces shed and breaker replies.
    pub(crate) fn into_response(
        self,
        grpc: bool,
        fallback: Option<&FallbackConfig>,
    ) -> Response<ProxyBody> {
        let reason = HeaderValue::from_static(self.reason.as_str());
        if let Some(fb) =
            fallback.filter(|_| self.reason.is_shed() || self.reason == Reason::BreakerOpen)
        {
            let mut resp = Response::new(ProxyBody::full(Bytes::from(fb.body.clone())));
            *resp.status_mut() = StatusCode::from_u16(fb.status).unwrap_or(StatusCode::OK);
            let h = resp.headers_mut();
            for (k, v) in &fb.headers {
                h.append(k.clone(), v.clone());
            }
            h.insert(REASON_HEADER, reason);
            return resp;
        }
        let (status, grpc_status, message) = self.parts();
        let mut resp = if grpc {
            let mut r = Response::new(ProxyBody::empty());
            let h = r.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from(u16::from(grpc_status)));
            h.insert("grpc-message", HeaderValue::from_static(message));
            r
        } else {
            let mut r = Response::new(ProxyBody::full(Bytes::from_static(message.as_bytes())));
            *r.status_mut() = status;
            let h = r.headers_mut();
            h.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            h.insert(CONTENT_LENGTH, HeaderValue::from(message.len()));
            r
        };
        let h = resp.headers_mut();
        h.insert(REASON_HEADER, reason);
        if let Some(ra) = self.retry_after {
            // Whole seconds, rounded up: "0" would invite an immediate retry storm.
            let secs = ra.as_secs() + u64::from(ra.subsec_nanos() > 0);
            h.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if matches!(self.reason, Reason::Draining | Reason::ClientTimeout) {
            h.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// Is this a gRPC request (`content-type: application/grpc*`)?
pub(crate) fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}
