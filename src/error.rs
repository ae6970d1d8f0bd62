//! Every response Spillway makes itself. Status, headers and the metric's
//! `reason` label come from ONE match ([`ProxyError::parts`]), so a reply and its
//! accounting can never disagree. Which failure becomes which reason is decided
//! in one table too: `proxy::outcome::decide`.
//!
//! The reply is rendered as plain bytes; the proxy wraps it in its body type,
//! so this module depends on nothing of the data path.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::config::FallbackConfig;

/// The header naming why Spillway answered locally.
pub const REASON_HEADER: &str = "x-spillway-reason";

crate::metrics::label_enum! {
    /// Why a request was answered the way it was: `upstream` or a local reason.
    /// The string forms are metric label values and the `x-spillway-reason` header.
    pub enum Reason {
        /// The upstream's own response, passed through.
        Upstream => "upstream",
        QueueFull => "queue_full",
        QueueTimeout => "queue_timeout",
        GlobalLimit => "global_limit",
        BreakerOpen => "breaker_open",
        UpstreamTimeout => "upstream_timeout",
        UpstreamConnect => "upstream_connect",
        UpstreamReset => "upstream_reset",
        NoRoute => "no_route",
        BodyTooLarge => "body_too_large",
        Draining => "draining",
        /// The client sent a malformed request body (bad chunk framing, a
        /// length other than declared).
        BadRequest => "bad_request",
        /// The client stalled sending its request body for `response_body_idle`.
        ClientTimeout => "client_timeout",
        /// The client left (closed or reset its connection or stream) before
        /// the response was complete. Nobody is left to answer; counted with
        /// status class 4xx.
        ClientAbort => "client_abort",
        /// Displaced from a full queue by a higher-priority request.
        Priority => "priority",
        /// Displaced from a full queue by a caller holding fewer requests.
        FairShare => "fair_share",
    }
}

impl Reason {
    /// The label value (also the `x-spillway-reason` header value).
    pub fn as_str(self) -> &'static str {
        <Self as crate::metrics::Label>::as_str(self)
    }

    /// Shed reasons take the route's `shed.status` and may be replaced by a fallback.
    pub(crate) fn is_shed(self) -> bool {
        matches!(
            self,
            Reason::QueueFull
                | Reason::QueueTimeout
                | Reason::GlobalLimit
                | Reason::Priority
                | Reason::FairShare
        )
    }

    /// Counted in `spillway_rejections_total`: Spillway refused the request
    /// itself. Upstream failures are answered locally but were not refused;
    /// a client that left was not refused either.
    pub(crate) fn is_rejection(self) -> bool {
        !matches!(
            self,
            Reason::Upstream
                | Reason::UpstreamTimeout
                | Reason::UpstreamConnect
                | Reason::UpstreamReset
                | Reason::ClientAbort
        )
    }

    /// The request's connection cannot carry another request after this
    /// reply: its request body was left unread or unreadable.
    pub(crate) fn closes_connection(self) -> bool {
        matches!(
            self,
            Reason::Draining | Reason::ClientTimeout | Reason::BadRequest | Reason::ClientAbort
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
    /// A reply for `reason`, no `Retry-After`, shed status 429 (see [`ProxyError::shed`]).
    pub(crate) fn new(reason: Reason) -> Self {
        ProxyError {
            reason,
            shed_status: 429,
            retry_after: None,
        }
    }

    /// Sets the `Retry-After` to send (e.g. a breaker's time left open).
    pub(crate) fn retry_after(mut self, d: Duration) -> Self {
        self.retry_after = Some(d);
        self
    }

    /// A shed reply with the route's `shed.status` and `shed.retry_after`.
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
            Reason::Priority => (shed, 8, "displaced by a higher-priority request"),
            Reason::FairShare => (shed, 8, "displaced by a caller holding fewer requests"),
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
            Reason::BadRequest => (StatusCode::BAD_REQUEST, 13, "malformed request body"),
            Reason::ClientTimeout => (StatusCode::REQUEST_TIMEOUT, 4, "request body stalled"),
            // Nobody reads it; 499 (as nginx logs it) keeps the status class 4xx.
            Reason::ClientAbort => (
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
                1,
                "client closed the request",
            ),
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
    ) -> Response<Bytes> {
        let reason = HeaderValue::from_static(self.reason.as_str());
        if let Some(fb) =
            fallback.filter(|_| self.reason.is_shed() || self.reason == Reason::BreakerOpen)
        {
            let mut resp = Response::new(Bytes::from(fb.body.clone()));
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
            let mut r = Response::new(Bytes::new());
            let h = r.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from(u16::from(grpc_status)));
            h.insert("grpc-message", HeaderValue::from_static(message));
            r
        } else {
            let mut r = Response::new(Bytes::from_static(message.as_bytes()));
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
        if self.reason.closes_connection() {
            h.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// Does a request's `content-type` value say gRPC (`application/grpc*`)?
pub(crate) fn is_grpc_content_type(v: &http::HeaderValue) -> bool {
    v.as_bytes().starts_with(b"application/grpc")
}
