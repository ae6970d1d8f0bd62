//! The request pipeline. Stages, in the order [`forward`] applies them:
//!
//! ```text
//! listener -> router -> global cap -> admission (cap + bounded queue) -> breaker
//!          -> retry loop [ per-try timeout -> upstream client (pool, p2c) ]
//!          -> response body guard (holds permits until the last byte)
//! ```
//!
//! Every local reply is a [`ProxyError`], counted and rendered in one place
//! ([`local_reply`]). The request deadline is computed once at arrival.

pub mod admission;
pub(crate) mod body;
pub(crate) mod breaker;
pub(crate) mod h1;
pub(crate) mod headers;
pub(crate) mod retry;
pub(crate) mod router;
pub(crate) mod timeout;
pub(crate) mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus::IntCounter;
use tokio::time::Instant;

use crate::error::{is_grpc, ProxyError, Reason};
use crate::metrics::Metrics;
use crate::registry::{Route, RouteState, Snapshot};
use crate::shutdown::{Phase, Shutdown, Tracker};
use admission::{GlobalPermit, Permit, Rejected};
use body::{BodyGuard, BodyOutcome, ProxyBody, RequestBody, RespBody, UpstreamBody};
use retry::{safe_to_retry, RetryCause};
use upstream::{EndpointLoad, UpstreamError, OUTCOME_TIMEOUT};

/// Everything the data path reads, shared by all connections.
pub(crate) struct Shared {
    /// The config generation in effect; loaded once per request.
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Arc<Metrics>,
    pub shutdown: Arc<Shutdown>,
    /// Upgraded (WebSocket) tunnels in progress.
    pub tunnels: Arc<Tracker>,
    /// Requests received so far (the memory janitor watches for a pause).
    pub requests: AtomicU64,
    no_route: IntCounter,
    no_route_rejections: IntCounter,
}

/// What a connection knows about itself.
pub(crate) struct ConnInfo {
    /// The peer's address as a header value (x-forwarded-for), made once.
    pub remote_ip: HeaderValue,
    pub https: bool,
}

impl ConnInfo {
    pub(crate) fn new(remote: SocketAddr, https: bool) -> Self {
        ConnInfo {
            remote_ip: headers::ip_header_value(remote.ip()),
            https,
        }
    }
}

impl Shared {
    pub(crate) fn new(snapshot: Snapshot, metrics: Arc<Metrics>, shutdown: Arc<Shutdown>) -> Self {
        Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            no_route: metrics
                .requests_total
                .with_label_values(&["", "4xx", "no_route"]),
            no_route_rejections: metrics
                .rejections_total
                .with_label_values(&["", "no_route"]),
            metrics,
            shutdown,
            tunnels: Arc::new(Tracker::default()),
            requests: AtomicU64::new(0),
        }
    }
}

/// Serves one request. Never fails: every failure is a local reply.
pub(crate) async fn handle(
    req: Request<Incoming>,
    conn: &ConnInfo,
    shared: &Shared,
) -> Response<ProxyBody> {
    let arrival = Instant::now();
    shared.requests.fetch_add(1, Ordering::Relaxed);
    let snap = shared.snapshot.load_full();
    let grpc = is_grpc(req.headers());
    // CONNECT never matches a route: Spillway is not a forward proxy.
    let idx = if req.method() == Method::CONNECT {
        None
    } else {
        snap.router.route(&req)
    };
    let Some(route) = idx.and_then(|i| snap.routes.get(i)) else {
        shared.no_route.inc();
        shared.no_route_rejections.inc();
        return ProxyError::new(Reason::NoRoute).into_response(grpc, None);
    };
    if shared.shutdown.phase() >= Phase::Stopping {
        return local_reply(route, ProxyError::new(Reason::Draining), grpc, arrival);
    }
    match forward(req, conn, shared, &snap, route, arrival).await {
        Ok(resp) => resp,
        Err(e) => local_reply(route, e, grpc, arrival),
    }
}

/// Renders and counts a local reply: the one place where that happens.
fn local_reply(route: &Route, e: ProxyError, grpc: bool, arrival: Instant) -> Response<ProxyBody> {
    let state = &route.state;
    let reason = e.reason;
    let resp = e.into_response(grpc, route.config.fallback.as_ref());
    state.count_request(resp.status().as_u16(), reason);
    if !matches!(
        reason,
        Reason::UpstreamTimeout | Reason::UpstreamConnect | Reason::UpstreamReset
    ) {
        state.count_rejection(reason);
    }
    let el = arrival.elapsed().as_secs_f64();
    state.hist.duration.observe(el);
    state.hist.total.observe(el);
    resp
}

/// The stages, in order. Returns the upstream's response or a local reply.
async fn forward(
    mut req: Request<Incoming>,
    conn: &ConnInfo,
    shared: &Shared,
    snap: &Snapshot,
    route: &Route,
    arrival: Instant,
) -> Result<Response<ProxyBody>, ProxyError> {
    let cfg = &route.config;
    let state = &route.state;
    let shed = |reason| ProxyError::shed(reason, cfg.shed.status, cfg.shed.retry_after.0);

    // Deadline, once: the route's request timeout capped by the caller's grpc-timeout.
    let mut budget = cfg.timeouts.request.0;
    if let Some(g) = timeout::parse_grpc_timeout(req.headers()) {
        budget = budget.min(g);
    }
    let deadline = arrival + budget;

    // Too large by declaration: refuse before any queueing or upstream work.
    let declared = content_length(req.headers());
    if declared.is_some_and(|n| n > cfg.max_request_body.0) {
        return Err(ProxyError::new(Reason::BodyTooLarge));
    }

    // The route's cap and queue, then the process-wide cap. The global cap
    // counts requests at upstreams only: an overloaded route's queue must not
    // fill it and shed other routes (no cascade).
    let admitted = match state.admission.acquire(Some(deadline)).await {
        Ok(a) => a,
        Err(Rejected::QueueFull) => return Err(shed(Reason::QueueFull)),
        Err(Rejected::QueueTimeout) => {
            state.count_timeout(0);
            return Err(shed(Reason::QueueTimeout));
        }
    };
    let global = snap
        .global
        .try_acquire()
        .ok_or_else(|| shed(Reason::GlobalLimit))?;
    let waited = admitted.waited.as_secs_f64();
    state.hist.queue_wait.observe(waited);
    state.hist.queue.observe(waited);

    // Prepare the upstream request (hop-by-hop headers, forwarding headers).
    let upgrade = req.version() <= Version::HTTP_11 && headers::is_upgrade_request(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let original_host = match parts.headers.get(HOST) {
        Some(h) => Some(h.clone()),
        None => {
            let auth = parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
            if let Some(a) = &auth {
                parts.headers.insert(HOST, a.clone());
            }
            auth
        }
    };
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    let fwd = headers::forwarded(&parts.headers, &conn.remote_ip, conn.https, original_host);
    parts.version = match route.upstream.config.protocol {
        crate::config::UpstreamProtocol::Http1 => Version::HTTP_11,
        crate::config::UpstreamProtocol::Http2 => Version::HTTP_2,
    };
    parts.extensions = http::Extensions::new();
    let has_key = cfg
        .retries
        .idempotency_key_header
        .as_ref()
        .is_some_and(|h| parts.headers.contains_key(h));

    // Body: replayable when retries are possible and it is small enough; else streamed.
    let retries_on = cfg.retries.max_attempts > 1 && !upgrade;
    let mut body = if body.is_end_stream() {
        UpstreamBody::Replay(None)
    } else if retries_on && declared.is_some_and(|n| n <= cfg.retries.max_buffered_body.0) {
        // Boxed: a rare path whose future would otherwise enlarge every request's.
        match Box::pin(read_body(
            RequestBody::new(
                body,
                cfg.max_request_body.0,
                cfg.timeouts.response_body_idle.0,
            ),
            deadline,
        ))
        .await
        {
            Ok(b) => UpstreamBody::Replay(Some(b)),
            Err(e) => {
                if e.reason == Reason::ClientTimeout {
                    state.count_timeout(3);
                }
                return Err(e);
            }
        }
    } else {
        UpstreamBody::Stream(RequestBody::new(
            body,
            cfg.max_request_body.0,
            cfg.timeouts.response_body_idle.0,
        ))
    };
    if retries_on {
        state.budget.deposit();
    }

    let upstream = &route.upstream;
    let mut attempt: u32 = 0;
    let mut rng = fastrand::Rng::new();
    // The endpoint of the last failed attempt: a retry prefers another one.
    let mut failed_endpoint: Option<String> = None;
    loop {
        attempt += 1;
        let now = Instant::now();
        if now >= deadline {
            state.count_timeout(2);
            return Err(ProxyError::new(Reason::UpstreamTimeout));
        }
        let ticket = match &upstream.breaker {
            None => None,
            Some(b) => match b.try_acquire() {
                Ok(t) => Some(t),
                Err(open) => {
                    return Err(ProxyError::new(Reason::BreakerOpen).retry_after(open.retry_after))
                }
            },
        };
        let replayable = matches!(body, UpstreamBody::Replay(_));
        let this_body = match &body {
            UpstreamBody::Replay(b) => UpstreamBody::Replay(b.clone()),
            _ => std::mem::replace(&mut body, UpstreamBody::Empty),
        };
        let mut up_parts = if replayable && attempt < cfg.retries.max_attempts {
            clone_parts(&parts)
        } else {
            std::mem::replace(&mut parts, Request::new(()).into_parts().0)
        };
        if budget < cfg.timeouts.request.0 || up_parts.headers.contains_key(&timeout::GRPC_TIMEOUT)
        {
            up_parts.headers.insert(
                timeout::GRPC_TIMEOUT.clone(),
                timeout::format_grpc_timeout(deadline - now),
            );
        }
        let attempt_deadline = match cfg.timeouts.per_try {
            Some(pt) => (now + pt.0).min(deadline),
            None => deadline,
        };
        let ep = upstream.pick_avoiding(failed_endpoint.as_deref());
        if upstream.endpoint_count() > 1 {
            failed_endpoint = Some(ep.label().to_string());
        }
        let call = upstream.send(
            &ep,
            Request::from_parts(up_parts, this_body),
            &fwd,
            &state.hist.connect,
        );
        let result = tokio::time::timeout_at(attempt_deadline, call).await;
        state
            .hist
            .upstream_headers
            .observe(now.elapsed().as_secs_f64());
        let failure_on = upstream
            .config
            .circuit_breaker
            .as_ref()
            .map(|b| b.failure_on);

        let (cause, last): (
            RetryCause,
            Result<(hyper::Response<RespBody>, EndpointLoad), ProxyError>,
        ) = match result {
            Ok(Ok(mut resp)) => {
                let status = resp.status();
                let failed = status.is_server_error() && failure_on.is_some_and(|f| f.status_5xx);
                if let Some(t) = ticket {
                    if failed {
                        t.failure()
                    } else {
                        t.success()
                    }
                }
                let cause = RetryCause::Status(status.as_u16());
                if !route.retry_on.matches(cause) || attempt >= cfg.retries.max_attempts {
                    return Ok(respond(
                        resp,
                        state,
                        admitted.permit,
                        global,
                        ep,
                        arrival,
                        deadline,
                        cfg.timeouts.response_body_idle.0,
                        client_upgrade,
                        shared,
                    ));
                }
                let retry_after = retry_after(resp.headers());
                // Keep the response: if no retry happens it is returned as is.
                resp.extensions_mut().insert(RetryAfterHint(retry_after));
                (cause, Ok((resp, ep)))
            }
            Ok(Err(UpstreamError::Connect(msg))) => {
                tracing::debug!(route = %state.name, endpoint = ep.label(), error = %msg, %attempt, "upstream connect failed");
                if let Some(t) = ticket {
                    if failure_on.is_some_and(|f| f.connect) {
                        t.failure()
                    } else {
                        drop(t)
                    }
                }
                (
                    RetryCause::Connect,
                    Err(ProxyError::new(Reason::UpstreamConnect)),
                )
            }
            Ok(Err(UpstreamError::Reset(msg))) => {
                tracing::debug!(route = %state.name, endpoint = ep.label(), error = %msg, %attempt, "upstream exchange failed");
                if let Some(t) = ticket {
                    if failure_on.is_some_and(|f| f.status_5xx) {
                        t.failure()
                    } else {
                        drop(t)
                    }
                }
                (
                    RetryCause::Reset,
                    Err(ProxyError::new(Reason::UpstreamReset)),
                )
            }
            Ok(Err(UpstreamError::BodyTooLarge)) => {
                return Err(ProxyError::new(Reason::BodyTooLarge))
            }
            Ok(Err(UpstreamError::ClientBody(msg))) => {
                // The client stalled: its fault, not the upstream's.
                tracing::debug!(route = %state.name, error = %msg, "client request body stalled");
                state.count_timeout(3);
                return Err(ProxyError::new(Reason::ClientTimeout));
            }
            Err(_elapsed) => {
                upstream.count(&ep, OUTCOME_TIMEOUT);
                if let Some(t) = ticket {
                    if failure_on.is_some_and(|f| f.timeout) {
                        t.failure()
                    } else {
                        drop(t)
                    }
                }
                if attempt_deadline >= deadline {
                    state.count_timeout(2);
                    return Err(ProxyError::new(Reason::UpstreamTimeout));
                }
                state.count_timeout(1);
                (
                    RetryCause::Timeout,
                    Err(ProxyError::new(Reason::UpstreamTimeout)),
                )
            }
        };
        // Retry? Only when configured, safe, replayable, within budget and deadline.
        let method = &parts.method;
        let can = attempt < cfg.retries.max_attempts
            && route.retry_on.matches(cause)
            && replayable
            && safe_to_retry(method, cause, has_key);
        let hint = match &last {
            Ok((r, _)) => r.extensions().get::<RetryAfterHint>().and_then(|h| h.0),
            Err(_) => None,
        };
        let delay = route.backoff.delay(attempt - 1, hint, &mut rng);
        let in_time = Instant::now() + delay < deadline;
        let breaker_open = upstream
            .breaker
            .as_ref()
            .is_some_and(|b| b.state() == breaker::BreakerState::Open);
        if !can || !in_time || breaker_open {
            return finish_last(
                last,
                state,
                admitted.permit,
                global,
                arrival,
                deadline,
                cfg.timeouts.response_body_idle.0,
                shared,
            );
        }
        if !state.budget.try_withdraw() {
            state.budget_exhausted.inc();
            return finish_last(
                last,
                state,
                admitted.permit,
                global,
                arrival,
                deadline,
                cfg.timeouts.response_body_idle.0,
                shared,
            );
        }
        drop(last);
        state.count_retry(cause.label());
        tracing::debug!(route = %state.name, request_id = ?fwd.request_id().or(parts.headers.get(&headers::X_REQUEST_ID)), cause = cause.label(), ?delay, "retrying");
        if !delay.is_zero() {
            Box::pin(tokio::time::sleep(delay)).await;
        }
    }
}

/// The last attempt's outcome when no retry follows.
#[allow(clippy::too_many_arguments)]
fn finish_last(
    last: Result<(hyper::Response<RespBody>, EndpointLoad), ProxyError>,
    state: &Arc<RouteState>,
    permit: Permit,
    global: GlobalPermit,
    arrival: Instant,
    deadline: Instant,
    idle: Duration,
    shared: &Shared,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (resp, ep) = last?;
    Ok(respond(
        resp, state, permit, global, ep, arrival, deadline, idle, None, shared,
    ))
}

/// Retry-After of a retryable response, carried to the backoff.
#[derive(Clone, Copy)]
struct RetryAfterHint(Option<Duration>);

/// Builds the client's response around the upstream's; the guard holds the
/// permits until the body ends. A `101` hands both sides to a tunnel task.
#[allow(clippy::too_many_arguments)]
fn respond(
    mut resp: hyper::Response<RespBody>,
    state: &Arc<RouteState>,
    permit: Permit,
    global: GlobalPermit,
    ep: EndpointLoad,
    arrival: Instant,
    deadline: Instant,
    idle: Duration,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    shared: &Shared,
) -> Response<ProxyBody> {
    let status = resp.status();
    let guard = RequestGuard {
        state: state.clone(),
        _permit: permit,
        _global: global,
        _endpoint: ep,
        arrival,
        status: status.as_u16(),
    };
    resp.extensions_mut().remove::<RetryAfterHint>();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_side = match resp.body_mut() {
            RespBody::H1(b) => b.take_upgraded(),
            RespBody::Hyper(_) => None,
        };
        if let (Some(client), Some(upstream_side)) = (client_upgrade, upstream_side) {
            let tracked = shared.tunnels.track();
            let shutdown = shared.shutdown.clone();
            let (mut parts, _) = resp.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers, true);
            // Owned by the tunnel tracker (drain waits for it); ends when either
            // side closes, or when the drain timeout has run out.
            tokio::spawn(async move {
                let _tracked = tracked;
                tokio::select! {
                    res = tunnel(client, upstream_side) => match res {
                        Ok((up, down)) => {
                            tracing::debug!(bytes_up = up, bytes_down = down, "tunnel closed")
                        }
                        Err(e) => tracing::debug!(error = %e, "tunnel ended with an error"),
                    },
                    _ = shutdown.reached(Phase::Stopped) => {
                        tracing::debug!("tunnel closed at the end of the drain");
                    }
                }
                Box::new(guard).finish(BodyOutcome::Complete);
            });
            return Response::from_parts(parts, ProxyBody::empty());
        }
    }
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, false);
    Response::from_parts(
        parts,
        ProxyBody::upstream(body, Box::new(guard), idle, deadline),
    )
}

/// Copies both ways between the client's upgraded connection and the
/// upstream's, starting with what the upstream sent after its `101` head.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    mut upstream: h1::Upgraded,
) -> Result<(u64, u64), Box<dyn std::error::Error + Send + Sync>> {
    use tokio::io::AsyncWriteExt;
    let mut c = hyper_util::rt::TokioIo::new(client.await?);
    let early = upstream.read_ahead.len() as u64;
    if early > 0 {
        c.write_all(&upstream.read_ahead).await?;
    }
    let (up, down) = tokio::io::copy_bidirectional(&mut c, &mut upstream.io).await?;
    Ok((up, down + early))
}

/// Lives as long as the response body; releases permits and records the request.
struct RequestGuard {
    state: Arc<RouteState>,
    _permit: Permit,
    _global: GlobalPermit,
    _endpoint: EndpointLoad,
    arrival: Instant,
    status: u16,
}

impl BodyGuard for RequestGuard {
    fn finish(self: Box<Self>, outcome: BodyOutcome) {
        let el = self.arrival.elapsed().as_secs_f64();
        self.state.hist.duration.observe(el);
        self.state.hist.total.observe(el);
        self.state.count_request(self.status, Reason::Upstream);
        match outcome {
            BodyOutcome::IdleTimeout => self.state.count_timeout(3),
            BodyOutcome::RequestTimeout => self.state.count_timeout(2),
            _ => {}
        }
    }
}

fn content_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

fn retry_after(h: &http::HeaderMap) -> Option<Duration> {
    let v = h.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Copies request parts for a replayable attempt (extensions are not needed upstream).
fn clone_parts(p: &http::request::Parts) -> http::request::Parts {
    let mut b = Request::builder()
        .method(p.method.clone())
        .uri(p.uri.clone())
        .version(p.version);
    if let Some(h) = b.headers_mut() {
        *h = p.headers.clone();
    }
    // The builder only fails on invalid parts, and these came from a valid request.
    b.body(())
        .map(|r| r.into_parts().0)
        .unwrap_or_else(|_| Request::new(()).into_parts().0)
}

/// Reads a small declared-length body for replay, within the request deadline.
async fn read_body(body: RequestBody, deadline: Instant) -> Result<Bytes, ProxyError> {
    match tokio::time::timeout_at(deadline, body.collect()).await {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) => Err(match body::find_body_error(e.as_ref()) {
            Some(body::BodyError::TooLarge) => ProxyError::new(Reason::BodyTooLarge),
            // Stalled, or its connection broke while sending: the client's side.
            _ => ProxyError::new(Reason::ClientTimeout),
        }),
        Err(_) => Err(ProxyError::new(Reason::ClientTimeout)),
    }
}
