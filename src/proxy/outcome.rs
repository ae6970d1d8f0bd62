//! The failure model: where a failure came from, and what follows from it.
//!
//! Every failure on the data path is typed by its side:
//!
//! * **Downstream** — the client: its request body was malformed, stalled,
//!   too large, or the client left. [`ClientBodyError`] carries it, wherever
//!   it surfaces: while a body is read for replay, inside the HTTP/1.1 client
//!   while it streams the body upstream, inside hyper's HTTP/2 client, or in
//!   the response body of a full-duplex exchange.
//! * **Upstream** — the upstream or the network to it: no connection
//!   ([`AttemptErrorKind::Connect`], nothing was sent), a broken exchange
//!   ([`AttemptErrorKind::Reset`]), no headers in time.
//!
//! [`decide`] is the one classification table: for each way an attempt can
//! end it says what the client sees, what the breaker is told, whether the
//! retry loop may try again, which upstream outcome is counted and which
//! timeout stage. A downstream failure never reaches the breaker and is
//! never retried; its upstream attempt is counted `cancelled`.
//! docs/architecture.md shows the same table for operators.

use std::error::Error as StdError;
use std::fmt;
use std::io;

use crate::config::FailureOn;
use crate::error::Reason;
use crate::metrics::label_enum;

use super::retry::RetryCause;

/// The error type of bodies on both legs, and of the errors they carry.
pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;

/// Which side of the proxy a failure came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// The client (downstream): never the upstream's fault.
    Downstream,
    /// The upstream, or the path to it.
    Upstream,
}

label_enum! {
    /// `stage` of `spillway_timeouts_total`.
    pub(crate) enum TimeoutStage {
        /// Waited `queue.max_wait` (or the deadline) for a route permit.
        Queue => "queue",
        /// One attempt had no response headers within `timeouts.per_try`.
        PerTry => "per_try",
        /// The request deadline (`timeouts.request`, capped by `grpc-timeout`).
        Request => "request",
        /// A body (either direction) was idle longer than `response_body_idle`.
        Body => "body",
    }
}

label_enum! {
    /// `outcome` of `spillway_upstream_requests_total`: how one attempt at
    /// an endpoint ended.
    pub(crate) enum AttemptOutcome {
        Informational => "1xx",
        Success => "2xx",
        Redirection => "3xx",
        ClientError => "4xx",
        ServerError => "5xx",
        /// No connection could be made.
        Connect => "connect_error",
        /// The connection broke, or the upstream broke the protocol.
        Reset => "reset",
        /// No response headers in time.
        Timeout => "timeout",
        /// Spillway gave the attempt up because of the client: it left, or
        /// its request body failed. Not the upstream's doing.
        Cancelled => "cancelled",
    }
}

label_enum! {
    /// `decision` of `spillway_shadow_decisions_total`: what enforcement
    /// would have done with a request that shadow mode let through.
    pub(crate) enum ShadowLabel {
        /// It would have waited in the queue.
        Queue => "queue",
        QueueFull => "queue_full",
        /// It would have been displaced by a higher-priority request.
        Priority => "priority",
        /// It would have been displaced by a caller holding fewer requests.
        FairShare => "fair_share",
        GlobalLimit => "global_limit",
        /// An open breaker would have refused it.
        BreakerOpen => "breaker_open",
    }
}

impl AttemptOutcome {
    /// The outcome of a response with this status.
    pub(crate) fn of_status(status: u16) -> Self {
        match status / 100 {
            0 | 1 => AttemptOutcome::Informational,
            2 => AttemptOutcome::Success,
            3 => AttemptOutcome::Redirection,
            4 => AttemptOutcome::ClientError,
            _ => AttemptOutcome::ServerError,
        }
    }
}

// === ClientBodyError ===

/// What was wrong with the client's request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClientFault {
    /// Malformed: bad chunk framing, more or fewer bytes than declared, an
    /// HTTP/2 protocol error on the stream.
    Malformed,
    /// No bytes for `response_body_idle` (or for the rest of an attempt's time).
    Stalled,
    /// Over the route's `max_request_body`.
    TooLarge,
    /// The client left: closed or reset its connection, reset its stream.
    Gone,
}

impl ClientFault {
    /// The local reason a request with this fault is answered and counted with.
    pub(crate) fn reason(self) -> Reason {
        match self {
            ClientFault::Malformed => Reason::BadRequest,
            ClientFault::Stalled => Reason::ClientTimeout,
            ClientFault::TooLarge => Reason::BodyTooLarge,
            ClientFault::Gone => Reason::ClientAbort,
        }
    }
}

/// A failure of the client's request body. Raised by `RequestBody`, the only
/// reader of the client's body, so finding one anywhere in an error's source
/// chain ([`find_client_fault`]) proves the failure was the client's.
#[derive(Debug)]
pub(crate) struct ClientBodyError {
    pub fault: ClientFault,
    source: Option<BoxError>,
}

impl ClientBodyError {
    /// A fault Spillway detected itself (limit, idle timer).
    pub(crate) fn new(fault: ClientFault) -> Self {
        ClientBodyError {
            fault,
            source: None,
        }
    }

    /// Classifies an error of hyper's server-side body (the client's bytes).
    pub(crate) fn from_incoming(e: hyper::Error) -> Self {
        ClientBodyError {
            fault: classify_incoming(&e),
            source: Some(Box::new(e)),
        }
    }
}

impl fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.fault {
            ClientFault::Malformed => "client sent a malformed request body",
            ClientFault::Stalled => "client stalled its request body",
            ClientFault::TooLarge => "request body exceeds max_request_body",
            ClientFault::Gone => "client went away while sending its request body",
        })
    }
}

impl StdError for ClientBodyError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

/// How hyper reports a broken request body, by cause: hyper's HTTP/1 decoder
/// raises `InvalidData` / `InvalidInput` for bad framing and `UnexpectedEof`
/// for a body cut short; h2 reports a stream reset by the peer (the client
/// cancelled) or a protocol error it raised itself (e.g. DATA beyond the
/// declared content-length).
fn classify_incoming(e: &hyper::Error) -> ClientFault {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h2e) = err.downcast_ref::<h2::Error>() {
            let protocol = h2e.reason() == Some(h2::Reason::PROTOCOL_ERROR);
            return if protocol && !h2e.is_remote() {
                ClientFault::Malformed
            } else {
                ClientFault::Gone
            };
        }
        if let Some(ioe) = err.downcast_ref::<io::Error>() {
            return match ioe.kind() {
                io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput => ClientFault::Malformed,
                io::ErrorKind::TimedOut => ClientFault::Stalled,
                _ => ClientFault::Gone,
            };
        }
        cur = err.source();
    }
    if e.is_parse() {
        ClientFault::Malformed
    } else {
        // Incomplete message, connection closed, canceled: the client left.
        ClientFault::Gone
    }
}

/// The client fault anywhere in an error's source chain, if it was the client's.
pub(crate) fn find_client_fault(e: &(dyn StdError + 'static)) -> Option<ClientFault> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(c) = err.downcast_ref::<ClientBodyError>() {
            return Some(c.fault);
        }
        cur = err.source();
    }
    None
}

// === AttemptError ===

/// Why an attempt failed before response headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AttemptErrorKind {
    /// No connection could be made (TCP or TLS): nothing reached the upstream.
    Connect,
    /// The connection broke, or the upstream broke the protocol.
    Reset,
    /// The client's request body failed while it was being sent.
    Client(ClientFault),
}

/// An attempt's failure: its kind, whether any byte of the request reached
/// the upstream, and the error it came from (kept as `source()`).
#[derive(Debug)]
pub(crate) struct AttemptError {
    pub kind: AttemptErrorKind,
    /// Whether any byte of the request may have reached the upstream.
    pub sent: bool,
    source: BoxError,
}

impl AttemptError {
    /// Could not connect: nothing was sent.
    pub(crate) fn connect(source: impl Into<BoxError>) -> Self {
        AttemptError {
            kind: AttemptErrorKind::Connect,
            sent: false,
            source: source.into(),
        }
    }

    /// The exchange broke after (part of) the request may have been sent.
    pub(crate) fn reset(source: impl Into<BoxError>) -> Self {
        AttemptError {
            kind: AttemptErrorKind::Reset,
            sent: true,
            source: source.into(),
        }
    }

    /// Classifies an error that may carry a client body failure: the
    /// client's if a [`ClientBodyError`] is in its chain, else `otherwise`.
    pub(crate) fn classify(source: BoxError, otherwise: AttemptErrorKind) -> Self {
        let kind = match find_client_fault(source.as_ref()) {
            Some(fault) => AttemptErrorKind::Client(fault),
            None => otherwise,
        };
        AttemptError {
            kind,
            sent: kind != AttemptErrorKind::Connect,
            source,
        }
    }

    /// Which side failed.
    pub(crate) fn side(&self) -> Side {
        match self.kind {
            AttemptErrorKind::Client(_) => Side::Downstream,
            _ => Side::Upstream,
        }
    }

    /// Whether another attempt could not duplicate a side effect, whatever
    /// the method: nothing of this one reached the upstream.
    pub(crate) fn unsent(&self) -> bool {
        !self.sent
    }
}

impl fmt::Display for AttemptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            AttemptErrorKind::Connect => "upstream connect failed",
            AttemptErrorKind::Reset => "upstream exchange failed",
            AttemptErrorKind::Client(_) => "client request body failed",
        };
        write!(f, "{what}: {}", self.source)
    }
}

impl StdError for AttemptError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(self.source.as_ref())
    }
}

// === decide ===

/// How one attempt ended, as far as classification goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tried {
    /// Response headers arrived with this status.
    Response(u16),
    /// The attempt failed before response headers.
    Failed(AttemptErrorKind),
    /// No headers before the attempt's deadline. `request`: that deadline
    /// was the request's own (no time left for another attempt).
    /// `client_stalled`: the request body was still waiting for the client's
    /// bytes, so the upstream was not the one being slow.
    TimedOut { request: bool, client_stalled: bool },
}

/// What the breaker is told about an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Success,
    Failure,
    /// Nothing: the ticket is released without counting (probe slot freed).
    Neutral,
}

/// What the client is sent if no retry follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    /// The upstream's response, untouched.
    Upstream,
    /// A local reply with this reason.
    Local(Reason),
}

/// Everything that follows from how an attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Decision {
    pub side: Side,
    pub reply: Reply,
    pub breaker: Verdict,
    /// The retry cause when this kind of ending may be retried at all; the
    /// route's `retries.on`, method safety, replayability, budget and
    /// deadline decide whether it is.
    pub retry: Option<RetryCause>,
    pub outcome: AttemptOutcome,
    pub timeout: Option<TimeoutStage>,
}

/// The classification table (docs/architecture.md, "Failures and blame").
/// `failure_on` is the upstream breaker's setting (`None`: no breaker).
pub(crate) fn decide(tried: Tried, failure_on: Option<FailureOn>) -> Decision {
    let counts = |pick: fn(&FailureOn) -> bool| match failure_on {
        Some(f) if pick(&f) => Verdict::Failure,
        _ => Verdict::Neutral,
    };
    let client = |fault: ClientFault, timeout: Option<TimeoutStage>| Decision {
        side: Side::Downstream,
        reply: Reply::Local(fault.reason()),
        breaker: Verdict::Neutral,
        retry: None,
        outcome: AttemptOutcome::Cancelled,
        timeout,
    };
    match tried {
        Tried::Response(status) => Decision {
            side: Side::Upstream,
            reply: Reply::Upstream,
            breaker: if (500..600).contains(&status) && failure_on.is_some_and(|f| f.status_5xx) {
                Verdict::Failure
            } else {
                Verdict::Success
            },
            retry: Some(RetryCause::Status(status)),
            outcome: AttemptOutcome::of_status(status),
            timeout: None,
        },
        Tried::Failed(AttemptErrorKind::Connect) => Decision {
            side: Side::Upstream,
            reply: Reply::Local(Reason::UpstreamConnect),
            breaker: counts(|f| f.connect),
            retry: Some(RetryCause::Connect),
            outcome: AttemptOutcome::Connect,
            timeout: None,
        },
        // A broken exchange is the upstream answering badly: `5xx` governs it.
        Tried::Failed(AttemptErrorKind::Reset) => Decision {
            side: Side::Upstream,
            reply: Reply::Local(Reason::UpstreamReset),
            breaker: counts(|f| f.status_5xx),
            retry: Some(RetryCause::Reset),
            outcome: AttemptOutcome::Reset,
            timeout: None,
        },
        Tried::Failed(AttemptErrorKind::Client(fault)) => client(
            fault,
            (fault == ClientFault::Stalled).then_some(TimeoutStage::Body),
        ),
        Tried::TimedOut {
            client_stalled: true,
            ..
        } => client(ClientFault::Stalled, Some(TimeoutStage::Body)),
        Tried::TimedOut { request, .. } => Decision {
            side: Side::Upstream,
            reply: Reply::Local(Reason::UpstreamTimeout),
            breaker: counts(|f| f.timeout),
            retry: (!request).then_some(RetryCause::Timeout),
            outcome: AttemptOutcome::Timeout,
            timeout: Some(if request {
                TimeoutStage::Request
            } else {
                TimeoutStage::PerTry
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Label;

    const ALL_ON: FailureOn = FailureOn {
        connect: true,
        timeout: true,
        status_5xx: true,
    };
    const NONE_ON: FailureOn = FailureOn {
        connect: false,
        timeout: false,
        status_5xx: false,
    };

    /// Shorthand for one row of the table.
    fn row(
        side: Side,
        reply: Reply,
        breaker: Verdict,
        retry: Option<RetryCause>,
        outcome: AttemptOutcome,
        timeout: Option<TimeoutStage>,
    ) -> Decision {
        Decision {
            side,
            reply,
            breaker,
            retry,
            outcome,
            timeout,
        }
    }

    #[test]
    fn upstream_responses_pass_through_and_5xx_counts_only_when_configured() {
        use AttemptOutcome as O;
        for (status, outcome) in [
            (101, O::Informational),
            (200, O::Success),
            (304, O::Redirection),
            (404, O::ClientError),
            (429, O::ClientError),
        ] {
            let expect = row(
                Side::Upstream,
                Reply::Upstream,
                Verdict::Success,
                Some(RetryCause::Status(status)),
                outcome,
                None,
            );
            assert_eq!(decide(Tried::Response(status), Some(ALL_ON)), expect);
            assert_eq!(decide(Tried::Response(status), None), expect);
        }
        for status in [500, 502, 503, 504] {
            let d = decide(Tried::Response(status), Some(ALL_ON));
            assert_eq!(
                d,
                row(
                    Side::Upstream,
                    Reply::Upstream,
                    Verdict::Failure,
                    Some(RetryCause::Status(status)),
                    O::ServerError,
                    None
                )
            );
            assert_eq!(
                decide(Tried::Response(status), Some(NONE_ON)).breaker,
                Verdict::Success
            );
            assert_eq!(
                decide(Tried::Response(status), None).breaker,
                Verdict::Success
            );
        }
    }

    #[test]
    fn connect_failures_are_the_upstreams_and_retryable() {
        let t = Tried::Failed(AttemptErrorKind::Connect);
        assert_eq!(
            decide(t, Some(ALL_ON)),
            row(
                Side::Upstream,
                Reply::Local(Reason::UpstreamConnect),
                Verdict::Failure,
                Some(RetryCause::Connect),
                AttemptOutcome::Connect,
                None
            )
        );
        assert_eq!(decide(t, Some(NONE_ON)).breaker, Verdict::Neutral);
        assert_eq!(decide(t, None).breaker, Verdict::Neutral);
    }

    #[test]
    fn resets_from_the_upstream_count_under_5xx() {
        let t = Tried::Failed(AttemptErrorKind::Reset);
        assert_eq!(
            decide(t, Some(ALL_ON)),
            row(
                Side::Upstream,
                Reply::Local(Reason::UpstreamReset),
                Verdict::Failure,
                Some(RetryCause::Reset),
                AttemptOutcome::Reset,
                None
            )
        );
        let only_5xx = FailureOn {
            status_5xx: true,
            ..NONE_ON
        };
        assert_eq!(decide(t, Some(only_5xx)).breaker, Verdict::Failure);
        let no_5xx = FailureOn {
            status_5xx: false,
            ..ALL_ON
        };
        assert_eq!(decide(t, Some(no_5xx)).breaker, Verdict::Neutral);
    }

    #[test]
    fn timeouts_per_try_retry_and_at_the_deadline_do_not() {
        let per_try = Tried::TimedOut {
            request: false,
            client_stalled: false,
        };
        assert_eq!(
            decide(per_try, Some(ALL_ON)),
            row(
                Side::Upstream,
                Reply::Local(Reason::UpstreamTimeout),
                Verdict::Failure,
                Some(RetryCause::Timeout),
                AttemptOutcome::Timeout,
                Some(TimeoutStage::PerTry)
            )
        );
        let request = Tried::TimedOut {
            request: true,
            client_stalled: false,
        };
        assert_eq!(
            decide(request, Some(ALL_ON)),
            row(
                Side::Upstream,
                Reply::Local(Reason::UpstreamTimeout),
                Verdict::Failure,
                None,
                AttemptOutcome::Timeout,
                Some(TimeoutStage::Request)
            )
        );
        let no_timeout = FailureOn {
            timeout: false,
            ..ALL_ON
        };
        assert_eq!(decide(request, Some(no_timeout)).breaker, Verdict::Neutral);
    }

    #[test]
    fn client_faults_never_reach_the_breaker_nor_the_retry_loop() {
        let cases = [
            (ClientFault::Malformed, Reason::BadRequest, None),
            (
                ClientFault::Stalled,
                Reason::ClientTimeout,
                Some(TimeoutStage::Body),
            ),
            (ClientFault::TooLarge, Reason::BodyTooLarge, None),
            (ClientFault::Gone, Reason::ClientAbort, None),
        ];
        for (fault, reason, timeout) in cases {
            for failure_on in [Some(ALL_ON), Some(NONE_ON), None] {
                assert_eq!(
                    decide(Tried::Failed(AttemptErrorKind::Client(fault)), failure_on),
                    row(
                        Side::Downstream,
                        Reply::Local(reason),
                        Verdict::Neutral,
                        None,
                        AttemptOutcome::Cancelled,
                        timeout
                    ),
                    "{fault:?}"
                );
            }
        }
        // A timeout while the body waited for the client's bytes is the client's.
        for request in [false, true] {
            let t = Tried::TimedOut {
                request,
                client_stalled: true,
            };
            assert_eq!(
                decide(t, Some(ALL_ON)),
                row(
                    Side::Downstream,
                    Reply::Local(Reason::ClientTimeout),
                    Verdict::Neutral,
                    None,
                    AttemptOutcome::Cancelled,
                    Some(TimeoutStage::Body)
                )
            );
        }
    }

    #[test]
    fn attempt_errors_find_a_client_fault_anywhere_in_the_chain() {
        #[derive(Debug)]
        struct Wrap(BoxError);
        impl fmt::Display for Wrap {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("wrapped")
            }
        }
        impl StdError for Wrap {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(self.0.as_ref())
            }
        }
        let deep: BoxError = Box::new(Wrap(Box::new(Wrap(Box::new(ClientBodyError::new(
            ClientFault::Malformed,
        ))))));
        let e = AttemptError::classify(deep, AttemptErrorKind::Reset);
        assert_eq!(e.kind, AttemptErrorKind::Client(ClientFault::Malformed));
        assert_eq!(e.side(), Side::Downstream);
        assert!(e.source().is_some());

        let upstream: BoxError = Box::new(io::Error::new(io::ErrorKind::ConnectionReset, "rst"));
        let e = AttemptError::classify(upstream, AttemptErrorKind::Reset);
        assert_eq!(e.kind, AttemptErrorKind::Reset);
        assert_eq!(e.side(), Side::Upstream);
        assert!(e.sent);
        assert!(AttemptError::connect("refused").unsent());
    }

    #[test]
    fn label_indexes_are_positions() {
        fn check<L: Label>() {
            for (i, l) in L::ALL.iter().enumerate() {
                assert_eq!(l.index(), i, "{l:?}");
            }
        }
        check::<TimeoutStage>();
        check::<AttemptOutcome>();
        check::<Reason>();
        check::<crate::metrics::StatusClass>();
        check::<super::super::retry::RetryLabel>();
        check::<ShadowLabel>();
    }
}
