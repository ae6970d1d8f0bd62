//! The request pipeline. [`handle`] runs a request through its stages, each
//! a function with a typed result, over one request context ([`Ctx`]):
//!
//! ```text
//! listener -> router -> admit    deadline, size, route cap + queue, global cap
//!                    -> prepare  headers, body replay buffer or stream
//!                 +-> -> attempt  breaker ticket, per-try timeout, upstream call
//!                 |   -> decide   outcome::decide: reply, breaker verdict, retry,
//!                 +----           counters; retry_plan: policy, safety, budget
//!                    -> respond  body guard holds the permits to the last byte
//! ```
//!
//! Failures are typed by the side they came from (see [`outcome`]): a
//! client's fault never reaches the breaker and is never retried. Every
//! local reply is a [`ProxyError`], rendered and counted in one place
//! ([`Ledger::reply`]); a request whose client leaves first is counted
//! `client_abort` when its future is dropped.

pub(crate) mod adaptive;
pub mod admission;
pub(crate) mod body;
pub(crate) mod breaker;
pub(crate) mod h1;
pub(crate) mod headers;
pub(crate) mod io;
pub(crate) mod outcome;
pub(crate) mod request_body;
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
use http::header::HOST;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus::IntCounter;
use tokio::time::Instant;

use crate::config::FairKey;
use crate::error::{ProxyError, Reason};
use crate::metrics::{Label, Metrics};
use crate::registry::{ClassCounters, Route, RouteState, Snapshot};
use crate::shutdown::{Phase, Shutdown, Tracker};
use admission::{GlobalPermit, Permit, Rejected, ShadowDecision, Ticket};
use body::{BodyGuard, BodyOutcome, ClientWait, ProxyBody, RequestBody, RespBody, UpstreamBody};
use breaker::BreakerTicket;
use outcome::{
    find_client_fault, AttemptError, AttemptErrorKind, AttemptOutcome, ClientFault, Decision,
    Reply, ShadowLabel, TimeoutStage, Tried, Verdict,
};
use retry::safe_to_retry;
use upstream::EndpointLoad;

/// Everything the data path reads, shared by all connections.
pub(crate) struct Shared {
    /// The config generation in effect; loaded once per request.
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Arc<Metrics>,
    pub shutdown: Arc<Shutdown>,
    /// Upgraded (WebSocket) tunnels in progress.
    pub tunnels: Arc<Tracker>,
    /// Changes whenever a request arrives (the memory janitor watches for a
    /// pause); not an exact count.
    pub requests: AtomicU64,
    no_route: IntCounter,
    no_route_rejections: IntCounter,
}

/// What a connection knows about itself.
pub(crate) struct ConnInfo {
    /// The peer's address as a header value (x-forwarded-for), made once.
    pub remote_ip: HeaderValue,
    pub https: bool,
    /// Fairness key of the verified mTLS client identity, if any.
    pub identity_key: Option<u64>,
}

impl ConnInfo {
    /// A fresh connection from `remote`: its address, whether it is TLS, no client identity yet.
    pub(crate) fn new(remote: SocketAddr, https: bool) -> Self {
        ConnInfo {
            remote_ip: headers::ip_header_value(remote.ip()),
            https,
            identity_key: None,
        }
    }

    /// The connection's verified client identity (mTLS), as a fairness key.
    pub(crate) fn with_identity(mut self, identity: Option<&[u8]>) -> Self {
        self.identity_key = identity.map(admission::key_hash);
        self
    }
}

impl Shared {
    /// The data path's shared state, starting at `snapshot`, with no tunnels and no requests seen.
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

/// `?` for the stages in [`handle`]: an error leaves the labelled block.
macro_rules! tri {
    ($stages:lifetime, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => break $stages Err(e),
        }
    };
}

/// Serves one request. Never fails: every failure is a local reply.
///
/// An `async` block rather than an `async fn`: an `async fn` moves its
/// arguments into locals of its own on the first poll, so the request (the
/// largest of them) would be copied once more and kept twice in the future.
#[allow(clippy::manual_async_fn)] // deliberately not an `async fn`: see above
pub(crate) fn handle<'a>(
    req: Request<Option<Incoming>>,
    conn: &'a ConnInfo,
    shared: &'a Shared,
) -> impl std::future::Future<Output = Response<ProxyBody>> + 'a {
    async move {
        let arrival = Instant::now();
        // An activity signal for the memory janitor, not a count: a plain load
        // and store instead of a locked read-modify-write on every request. An
        // increment lost to a racing worker still changes the value.
        let seen = shared.requests.load(Ordering::Relaxed);
        shared
            .requests
            .store(seen.wrapping_add(1), Ordering::Relaxed);
        let snap = shared.snapshot.load_full();
        let scan = headers::Scan::of(req.headers());
        let grpc = scan.grpc;
        // CONNECT never matches a route: Spillway is not a forward proxy.
        let idx = if req.method() == Method::CONNECT {
            None
        } else {
            snap.router.route(&req)
        };
        let Some(route) = idx.and_then(|i| snap.routes.get(i)) else {
            shared.no_route.inc();
            shared.no_route_rejections.inc();
            return local_body(ProxyError::new(Reason::NoRoute).into_response(grpc, None));
        };
        // From here the request is answered exactly once: by a local reply, by
        // the upstream's response (its body guard), or as `client_abort` when
        // the client leaves first and this future is dropped.
        let mut ledger = Ledger {
            state: &route.state,
            arrival,
            open: true,
        };
        if shared.shutdown.phase() >= Phase::Stopping {
            return ledger.reply(ProxyError::new(Reason::Draining), grpc, route);
        }
        let ctx = &Ctx::new(shared, &snap, route, conn, arrival, scan.grpc_timeout);
        let ledger = &mut ledger;
        // The stages in order; a retry goes round attempt and decide again. In
        // line, not a function of their own: its future would be one more level
        // for the request to be moved into.
        let staged: Result<Response<ProxyBody>, ProxyError> = 'stages: {
            // Something was awaited since arrival (a queue, a body).
            let mut waited = false;
            let admitted = match tri!('stages, admit(ctx, req.headers(), scan.content_length)) {
                Admit::Now(a) => a,
                // Boxed: only a request that has to queue builds the wait's future,
                // which would otherwise enlarge (and be moved within) every request's.
                Admit::Wait(ticket, class) => {
                    waited = true;
                    tri!('stages, Box::pin(admit_queued(ctx, ticket, class)).await)
                }
            };
            let (mut prep, unread) = prepare(ctx, req, scan);
            if let Some(body) = unread {
                waited = true;
                // Boxed: a rare path whose future would otherwise enlarge every request's.
                match Box::pin(read_body(body, ctx.deadline)).await {
                    Ok(b) => prep.body = UpstreamBody::Replay(Some(b)),
                    Err(fault) => break 'stages Err(client_fault(ctx, fault)),
                }
            }
            if ctx.route.config.retries.max_attempts > 1 && prep.client_upgrade.is_none() {
                ctx.state().budget.deposit();
            }
            let upstream = &ctx.route.upstream;
            let failure_on = upstream
                .config
                .circuit_breaker
                .as_ref()
                .map(|b| b.failure_on);
            // Seeded only if a retry needs a backoff.
            let mut rng = None;
            let mut n: u32 = 0;
            loop {
                n += 1;
                // Attempt: a breaker ticket, an endpoint, the per-try deadline, the
                // call. Inline rather than a function of its own, whose future
                // would be one more level to build, move and poll. The first
                // attempt starts at the request's arrival when nothing was
                // awaited in between (a few microseconds of routing and
                // admission): one clock read fewer per request.
                let now = if n == 1 && !waited {
                    arrival
                } else {
                    Instant::now()
                };
                if now >= ctx.deadline {
                    ctx.state().count_timeout(TimeoutStage::Request);
                    break 'stages Err(ProxyError::new(Reason::UpstreamTimeout));
                }
                let ticket = tri!('stages, breaker_ticket(ctx));
                // A retry prefers an endpoint other than the one that just failed.
                let ep = upstream.pick_avoiding(prep.last_endpoint.as_deref());
                let (call, attempt_deadline) =
                    tri!('stages, start_call(ctx, &mut prep, n, now, &ep));
                // Dropped mid-call (the client left): the attempt counts as cancelled.
                let watch = CancelWatch {
                    upstream,
                    ep: &ep,
                    armed: true,
                };
                // A route with a fixed cap has no adaptive limiter: its config says
                // so, without a load of the shared one per attempt.
                let adaptive = ctx.route.config.concurrency.adaptive.is_some();
                // The load this attempt meets, for the adaptive limit (one atomic load).
                let in_flight = if adaptive {
                    ctx.state().admission.in_flight()
                } else {
                    0
                };
                let result = call.await;
                watch.disarm();
                // A timeout while the body waited for the client says nothing about the
                // upstream's latency: no sample.
                let client_stalled =
                    result.is_err() && prep.client_wait.as_ref().is_some_and(|w| w.waiting());
                if adaptive && !client_stalled {
                    adaptive::observe(ctx.state(), now, in_flight, &result);
                }
                ctx.state()
                    .hist
                    .upstream_headers
                    .observe(now.elapsed().as_secs_f64());
                if upstream.endpoint_count() > 1 {
                    prep.last_endpoint = Some(ep.label().to_string());
                }

                // Decide: the table's verdict, the breaker, the counters.
                let last_chance = attempt_deadline >= ctx.deadline;
                let d = outcome::decide(tried(&result, last_chance, client_stalled), failure_on);
                if let Some(t) = ticket {
                    match d.breaker {
                        Verdict::Success => t.success(),
                        Verdict::Failure => t.failure(),
                        Verdict::Neutral => drop(t),
                    }
                }
                upstream.count(&ep, d.outcome);
                if let Some(stage) = d.timeout {
                    ctx.state().count_timeout(stage);
                }
                // The response stays where the call left it until it is answered
                // with: it is moved once, into the client's response.
                let (answered, unsent) = match &result {
                    Ok(Ok(resp)) => (Some(resp.headers()), false),
                    Ok(Err(e)) => {
                        tracing::debug!(route = %ctx.state().name, endpoint = ep.label(), side = ?e.side(), error = %upstream::error_chain(e), attempt = n, "attempt failed");
                        (None, e.unsent())
                    }
                    Err(upstream::TimedOut) => (None, false),
                };
                match retry_plan(ctx, &prep, &d, n, answered, unsent, &mut rng) {
                    Some(delay) => {
                        drop(result);
                        if !delay.is_zero() {
                            Box::pin(tokio::time::sleep(delay)).await;
                        }
                    }
                    None => {
                        let Ok(Ok(resp)) = result else {
                            break 'stages Err(local(d));
                        };
                        break 'stages Ok(respond(ctx, resp, admitted, ep, &mut prep, ledger));
                    }
                }
            }
        };
        match staged {
            Ok(resp) => resp,
            Err(e) => ledger.reply(e, grpc, route),
        }
    }
}

// === the request context ===

/// What every stage of one request reads.
struct Ctx<'a> {
    shared: &'a Shared,
    snap: &'a Snapshot,
    route: &'a Route,
    conn: &'a ConnInfo,
    /// The request deadline, computed once: `timeouts.request` capped by the
    /// caller's `grpc-timeout`.
    deadline: Instant,
    /// The caller's `grpc-timeout` shortened the deadline: the upstream is
    /// told what remains of it.
    deadline_from_caller: bool,
}

impl<'a> Ctx<'a> {
    fn new(
        shared: &'a Shared,
        snap: &'a Snapshot,
        route: &'a Route,
        conn: &'a ConnInfo,
        arrival: Instant,
        grpc_timeout: Option<Duration>,
    ) -> Self {
        let configured = route.config.timeouts.request.0;
        let budget = match grpc_timeout {
            Some(g) => configured.min(g),
            None => configured,
        };
        Ctx {
            shared,
            snap,
            route,
            conn,
            deadline: arrival + budget,
            deadline_from_caller: budget < configured,
        }
    }

    fn state(&self) -> &Arc<RouteState> {
        &self.route.state
    }

    /// Who is asking, for admission: the priority class named by the
    /// class header, and the fairness key.
    fn ticket(&self, headers: &http::HeaderMap) -> Ticket {
        let cfg = &self.route.config;
        let class = cfg.priority.as_ref().map_or(0, |p| {
            p.class_of(headers.get(&p.header).map(HeaderValue::as_bytes))
        });
        let key = match cfg.fairness.as_ref().map(|f| &f.key) {
            None => 0,
            Some(FairKey::Header(h)) => {
                admission::key_hash(headers.get(h).map_or(&b""[..], HeaderValue::as_bytes))
            }
            Some(FairKey::ClientIp) => admission::key_hash(self.conn.remote_ip.as_bytes()),
            Some(FairKey::ClientIdentity) => self
                .conn
                .identity_key
                .unwrap_or_else(|| admission::key_hash(b"")),
        };
        Ticket { class, key }
    }

    /// Counts (and logs at debug) what shadow mode let through.
    fn shadow(&self, decision: ShadowLabel) {
        let state = self.state();
        state.shadow.inc(
            decision,
            &state.metrics.shadow_decisions_total,
            &[&state.name],
        );
        tracing::debug!(route = %state.name, decision = decision.as_str(), "shadow mode: enforcement would have acted");
    }

    /// A shed reply with the route's `shed` settings.
    fn shed(&self, reason: Reason) -> ProxyError {
        let shed = &self.route.config.shed;
        ProxyError::shed(reason, shed.status, shed.retry_after.0)
    }
}

/// The request's accounting, answered exactly once (see [`handle`]).
struct Ledger<'r> {
    /// Borrowed from the snapshot the request holds: no reference count
    /// taken unless the response body's guard takes over.
    state: &'r Arc<RouteState>,
    arrival: Instant,
    /// Not answered yet: dropping it now means the client left.
    open: bool,
}

impl Ledger<'_> {
    /// Renders and counts a local reply: the one place where that happens.
    fn reply(&mut self, e: ProxyError, grpc: bool, route: &Route) -> Response<ProxyBody> {
        self.open = false;
        let reason = e.reason;
        let resp = e.into_response(grpc, route.config.fallback.as_ref());
        self.record(resp.status().as_u16(), reason);
        local_body(resp)
    }

    /// The response body's guard takes over the accounting.
    fn hand_over(&mut self) -> (Arc<RouteState>, Instant) {
        self.open = false;
        (self.state.clone(), self.arrival)
    }

    fn record(&self, status: u16, reason: Reason) {
        record(self.state, self.arrival, status, reason, Instant::now());
    }
}

impl Drop for Ledger<'_> {
    fn drop(&mut self) {
        if self.open {
            // The client left (closed its connection, reset its stream) while
            // the request was queued or at the upstream.
            let (status, _, _) = ProxyError::new(Reason::ClientAbort).parts();
            self.record(status.as_u16(), Reason::ClientAbort);
        }
    }
}

/// Counts one answered request and its duration, which ended at `now`.
fn record(state: &RouteState, arrival: Instant, status: u16, reason: Reason, now: Instant) {
    state.count_request(status, reason);
    if reason.is_rejection() {
        state.count_rejection(reason);
    }
    let el = now.saturating_duration_since(arrival).as_secs_f64();
    state.hist.duration.observe(el);
}

/// A local reply's bytes as the client's body.
fn local_body(resp: Response<Bytes>) -> Response<ProxyBody> {
    resp.map(|b| {
        if b.is_empty() {
            ProxyBody::empty()
        } else {
            ProxyBody::full(b)
        }
    })
}

// === the stages ===

/// The local reply a decision names (only called for failed attempts).
fn local(d: Decision) -> ProxyError {
    match d.reply {
        Reply::Local(reason) => ProxyError::new(reason),
        // A failed attempt always decides a local reply; stay total anyway.
        Reply::Upstream => ProxyError::new(Reason::UpstreamReset),
    }
}

/// What admission grants: the route permit and the process-wide one (none
/// when shadow mode let the request past a full process).
struct Admitted {
    permit: Permit,
    global: Option<GlobalPermit>,
}

/// Admit: size check by declaration, the route's cap and queue (with its
/// classes and fairness keys), then the process-wide cap. The global cap
/// counts requests at upstreams only: an overloaded route's queue must not
/// fill it and shed other routes. In shadow mode nothing waits and nothing
/// is refused; what would have been is counted. Not an `async fn`: a free
/// permit is taken at once, and only a request that must queue (or that
/// shadow mode judges) goes on to [`admit_queued`].
fn admit<'c>(
    ctx: &'c Ctx<'_>,
    headers: &http::HeaderMap,
    declared: Option<u64>,
) -> Result<Admit<'c>, ProxyError> {
    let cfg = &ctx.route.config;
    // Too large by declaration: refuse before any queueing or upstream work.
    if declared.is_some_and(|n| n > cfg.max_request_body.0) {
        return Err(ProxyError::new(Reason::BodyTooLarge));
    }
    let ticket = ctx.ticket(headers);
    let class = ctx.route.classes.get(ticket.class);
    match ctx.state().admission.try_acquire_now(ticket) {
        Some(granted) => admitted(ctx, class, granted).map(Admit::Now),
        None => Ok(Admit::Wait(ticket, class)),
    }
}

/// What [`admit`] decided without waiting.
enum Admit<'c> {
    /// A free permit (and the process-wide one): go on.
    Now(Admitted),
    /// The request queues, or shadow mode decides: [`admit_queued`].
    Wait(Ticket, Option<&'c ClassCounters>),
}

/// Admit, for a request that found no free permit: the route's queue, with
/// its classes and fairness keys (or shadow mode's verdict), then the rest
/// of [`admitted`].
async fn admit_queued(
    ctx: &Ctx<'_>,
    ticket: Ticket,
    class: Option<&ClassCounters>,
) -> Result<Admitted, ProxyError> {
    let state = ctx.state();
    match state.admission.acquire_as(ticket, Some(ctx.deadline)).await {
        Ok(granted) => admitted(ctx, class, granted),
        Err(rejected) => {
            if rejected == Rejected::QueueTimeout {
                state.count_timeout(TimeoutStage::Queue);
            }
            Err(shed(
                ctx,
                class,
                match rejected {
                    Rejected::QueueFull => Reason::QueueFull,
                    Rejected::QueueTimeout => Reason::QueueTimeout,
                    Rejected::Priority => Reason::Priority,
                    Rejected::FairShare => Reason::FairShare,
                },
            ))
        }
    }
}

/// A shed reply, counted against the request's priority class.
fn shed(ctx: &Ctx<'_>, class: Option<&ClassCounters>, reason: Reason) -> ProxyError {
    if let Some(c) = class {
        c.shed.inc();
    }
    ctx.shed(reason)
}

/// A route permit granted: what shadow mode would have done is counted, the
/// process-wide permit taken, the queue wait observed.
fn admitted(
    ctx: &Ctx<'_>,
    class: Option<&ClassCounters>,
    granted: admission::Admitted,
) -> Result<Admitted, ProxyError> {
    let state = ctx.state();
    let shadow = granted.shadow.is_some();
    if let Some(decision) = granted.shadow {
        match decision {
            ShadowDecision::Admit => {}
            ShadowDecision::Queue | ShadowDecision::Reject(Rejected::QueueTimeout) => {
                ctx.shadow(ShadowLabel::Queue)
            }
            ShadowDecision::Reject(Rejected::QueueFull) => ctx.shadow(ShadowLabel::QueueFull),
            ShadowDecision::Reject(Rejected::Priority) => ctx.shadow(ShadowLabel::Priority),
            ShadowDecision::Reject(Rejected::FairShare) => ctx.shadow(ShadowLabel::FairShare),
        }
        // A virtual waiter this request displaced would have been shed.
        match granted.displaced {
            Some(Rejected::Priority) => ctx.shadow(ShadowLabel::Priority),
            Some(Rejected::FairShare) => ctx.shadow(ShadowLabel::FairShare),
            _ => {}
        }
    }
    let global = match ctx.snap.global.try_acquire() {
        Some(g) => Some(g),
        None if shadow => {
            ctx.shadow(ShadowLabel::GlobalLimit);
            None
        }
        None => return Err(shed(ctx, class, Reason::GlobalLimit)),
    };
    if let Some(c) = class {
        c.admitted.inc();
    }
    let waited = granted.waited.as_secs_f64();
    state.hist.queue_wait.observe(waited);
    Ok(Admitted {
        permit: granted.permit,
        global,
    })
}

/// A request made ready for its attempts.
struct Prepared {
    /// Head of the request as the upstream gets it (taken by the last attempt).
    parts: Option<http::request::Parts>,
    body: UpstreamBody,
    fwd: headers::Forwarded,
    /// The request carries the route's idempotency key header.
    has_key: bool,
    /// Every attempt can send the whole request again.
    replayable: bool,
    /// The request carries a `grpc-timeout` (each attempt rewrites it).
    has_grpc_timeout: bool,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// Set for a streamed body: whether it waits for the client's bytes.
    client_wait: Option<Arc<ClientWait>>,
    /// The endpoint of the previous attempt (with several endpoints).
    last_endpoint: Option<String>,
}

/// Prepare: hop-by-hop and forwarding headers, and the body — buffered for
/// replay when retries are possible and it is small enough (returned
/// unread, for the caller to read), else streamed. Not an `async fn`: the
/// request would be moved into, and the result out of, one more future.
fn prepare(
    ctx: &Ctx<'_>,
    mut req: Request<Option<Incoming>>,
    mut scan: headers::Scan,
) -> (Prepared, Option<RequestBody>) {
    let cfg = &ctx.route.config;
    let upgrade = req.version() <= Version::HTTP_11 && scan.upgrade;
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let declared = scan.content_length;
    let (mut parts, body) = req.into_parts();
    let original_host = match scan.host.take() {
        Some(h) => Some(h),
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
    headers::strip_scanned(&mut parts.headers, upgrade, &scan);
    let fwd = headers::forwarded_scanned(
        &parts.headers,
        &scan,
        &ctx.conn.remote_ip,
        ctx.conn.https,
        original_host,
    );
    // Stripping can only have removed it when there was something to strip.
    let has_grpc_timeout = if scan.hop_by_hop {
        parts.headers.contains_key(&timeout::GRPC_TIMEOUT)
    } else {
        scan.has_grpc_timeout
    };
    parts.version = match ctx.route.upstream.config.protocol {
        crate::config::UpstreamProtocol::Http1 => Version::HTTP_11,
        crate::config::UpstreamProtocol::Http2 => Version::HTTP_2,
    };
    parts.extensions = http::Extensions::new();
    let has_key = cfg
        .retries
        .idempotency_key_header
        .as_ref()
        .is_some_and(|h| parts.headers.contains_key(h));

    let retries_on = cfg.retries.max_attempts > 1 && !upgrade;
    let mut client_wait = None;
    let mut unread = None;
    let body = match body.filter(|b| !b.is_end_stream()) {
        None => UpstreamBody::Replay(None),
        Some(body) => {
            let mut body = RequestBody::new(
                body,
                cfg.max_request_body.0,
                cfg.timeouts.response_body_idle.0,
            );
            if retries_on && declared.is_some_and(|n| n <= cfg.retries.max_buffered_body.0) {
                // Replaced by the bytes once the caller has read them.
                unread = Some(body);
                UpstreamBody::Replay(None)
            } else {
                client_wait = Some(body.client_wait());
                UpstreamBody::Stream(body)
            }
        }
    };
    let prep = Prepared {
        replayable: matches!(body, UpstreamBody::Replay(_)),
        has_grpc_timeout,
        parts: Some(parts),
        body,
        fwd,
        has_key,
        client_upgrade,
        client_wait,
        last_endpoint: None,
    };
    (prep, unread)
}

/// A client body failure found before any attempt: through the same table.
fn client_fault(ctx: &Ctx<'_>, fault: ClientFault) -> ProxyError {
    let d = outcome::decide(Tried::Failed(AttemptErrorKind::Client(fault)), None);
    if let Some(stage) = d.timeout {
        ctx.state().count_timeout(stage);
    }
    local(d)
}

/// What an attempt's call ends with.
type CallResult = Result<Result<hyper::Response<RespBody>, AttemptError>, upstream::TimedOut>;

/// The view of an attempt the classification table reads. `last_chance`:
/// the attempt's deadline was the request's; `client_stalled`: at the
/// timeout, the streamed body was waiting for the client.
fn tried(result: &CallResult, last_chance: bool, client_stalled: bool) -> Tried {
    match result {
        Ok(Ok(r)) => Tried::Response(r.status().as_u16()),
        Ok(Err(e)) => Tried::Failed(e.kind),
        Err(upstream::TimedOut) => Tried::TimedOut {
            request: last_chance,
            client_stalled,
        },
    }
}

/// The breaker's ticket for one more attempt, if the upstream has a breaker.
fn breaker_ticket(ctx: &Ctx<'_>) -> Result<Option<BreakerTicket>, ProxyError> {
    let upstream = &ctx.route.upstream;
    let Some(b) = &upstream.breaker else {
        return Ok(None);
    };
    match b.try_acquire() {
        Ok(t) => Ok(Some(t)),
        // Shadow breaker: its state machine runs, the request goes on.
        Err(_) if upstream.breaker_is_shadow() => {
            ctx.shadow(ShadowLabel::BreakerOpen);
            Ok(None)
        }
        Err(open) => Err(ProxyError::new(Reason::BreakerOpen).retry_after(open.retry_after)),
    }
}

/// Starts attempt `n` at `ep`: its copy of the request (the last one takes
/// the request itself), what remains of the deadline for the upstream, and
/// the call, bounded by the per-try deadline (returned too).
fn start_call<'e>(
    ctx: &'e Ctx<'_>,
    prep: &mut Prepared,
    n: u32,
    now: Instant,
    ep: &'e EndpointLoad,
) -> Result<(upstream::Call<'e>, Instant), ProxyError> {
    let cfg = &ctx.route.config;
    let more_to_come = prep.replayable && n < cfg.retries.max_attempts;
    let body = match &prep.body {
        UpstreamBody::Replay(b) => UpstreamBody::Replay(b.clone()),
        _ => std::mem::replace(&mut prep.body, UpstreamBody::Empty),
    };
    let parts = if more_to_come {
        prep.parts.as_ref().map(clone_parts)
    } else {
        prep.parts.take()
    };
    // Every attempt before the last one leaves the parts in place.
    let Some(mut parts) = parts else {
        return Err(ProxyError::new(Reason::UpstreamReset));
    };
    if ctx.deadline_from_caller || prep.has_grpc_timeout {
        parts.headers.insert(
            timeout::GRPC_TIMEOUT.clone(),
            timeout::format_grpc_timeout(ctx.deadline - now),
        );
    }
    let attempt_deadline = match cfg.timeouts.per_try {
        Some(pt) => (now + pt.0).min(ctx.deadline),
        None => ctx.deadline,
    };
    let call = ctx.route.upstream.send(
        ep,
        parts,
        body,
        &prep.fwd,
        &ctx.state().hist.connect,
        now,
        attempt_deadline,
    );
    Ok((call, attempt_deadline))
}

/// Counts an attempt as `cancelled` if it is dropped before it ends.
struct CancelWatch<'a> {
    upstream: &'a upstream::Upstream,
    ep: &'a EndpointLoad,
    armed: bool,
}

impl CancelWatch<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for CancelWatch<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.upstream.count(self.ep, AttemptOutcome::Cancelled);
        }
    }
}

/// Decide (retry half): the delay before another attempt, or `None` to
/// answer with this one. Only when the table allows it, the route retries
/// this cause, a retry cannot duplicate a side effect (an idempotent method,
/// an idempotency key, or nothing of the request `unsent` upstream), the
/// body can be sent again, the backoff fits the deadline, the breaker is not
/// open and the budget allows it. `answered`: the headers of the response
/// the attempt got, if any (for its Retry-After).
#[allow(clippy::too_many_arguments)]
fn retry_plan(
    ctx: &Ctx<'_>,
    prep: &Prepared,
    d: &Decision,
    n: u32,
    answered: Option<&http::HeaderMap>,
    unsent: bool,
    rng: &mut Option<fastrand::Rng>,
) -> Option<Duration> {
    let cause = d.retry?;
    let route = ctx.route;
    if n >= route.config.retries.max_attempts
        || !route.retry_on.matches(cause)
        || !prep.replayable
        || !(unsent
            || prep
                .parts
                .as_ref()
                .is_some_and(|p| safe_to_retry(&p.method, cause, prep.has_key)))
    {
        return None;
    }
    // The upstream's Retry-After, read only now that a retry is possible.
    let hint = answered.and_then(retry_after);
    let delay = route
        .backoff
        .delay(n - 1, hint, rng.get_or_insert_with(fastrand::Rng::new));
    if Instant::now() + delay >= ctx.deadline {
        return None;
    }
    let breaker_open = !route.upstream.breaker_is_shadow()
        && route
            .upstream
            .breaker
            .as_ref()
            .is_some_and(|b| b.state() == breaker::BreakerState::Open);
    if breaker_open {
        return None;
    }
    let state = ctx.state();
    if !state.budget.try_withdraw() {
        state.budget_exhausted.inc();
        return None;
    }
    state.count_retry(cause.label());
    tracing::debug!(route = %state.name, request_id = ?prep.fwd.request_id().or_else(|| prep.parts.as_ref()?.headers.get(&headers::X_REQUEST_ID)?.to_str().ok()), cause = cause.label().as_str(), ?delay, "retrying");
    Some(delay)
}

/// Respond: the client's response around the upstream's; the guard holds the
/// permits until the body ends. A `101` hands both sides to a tunnel task.
fn respond(
    ctx: &Ctx<'_>,
    mut resp: hyper::Response<RespBody>,
    admitted: Admitted,
    ep: EndpointLoad,
    prep: &mut Prepared,
    ledger: &mut Ledger<'_>,
) -> Response<ProxyBody> {
    let status = resp.status();
    let (state, arrival) = ledger.hand_over();
    let guard = RequestGuard {
        state,
        _permit: admitted.permit,
        _global: admitted.global,
        _endpoint: ep,
        arrival,
        status: status.as_u16(),
    };
    let idle = ctx.route.config.timeouts.response_body_idle.0;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_side = match resp.body_mut() {
            RespBody::H1(b) => b.take_upgraded(),
            RespBody::Hyper(_) => None,
        };
        if let (Some(client), Some(upstream_side)) = (prep.client_upgrade.take(), upstream_side) {
            let tracked = ctx.shared.tunnels.track();
            let shutdown = ctx.shared.shutdown.clone();
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
                guard.finish(BodyOutcome::Complete, Instant::now());
            });
            return Response::from_parts(parts, ProxyBody::empty());
        }
    }
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, false);
    Response::from_parts(parts, ProxyBody::upstream(body, guard, idle, ctx.deadline))
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
pub(crate) struct RequestGuard {
    state: Arc<RouteState>,
    _permit: Permit,
    _global: Option<GlobalPermit>,
    _endpoint: EndpointLoad,
    arrival: Instant,
    status: u16,
}

impl BodyGuard for RequestGuard {
    fn finish(self, outcome: BodyOutcome, now: Instant) {
        let (status, reason) = match outcome {
            BodyOutcome::Complete | BodyOutcome::Error => (self.status, Reason::Upstream),
            BodyOutcome::IdleTimeout => {
                self.state.count_timeout(TimeoutStage::Body);
                (self.status, Reason::Upstream)
            }
            BodyOutcome::RequestTimeout => {
                self.state.count_timeout(TimeoutStage::Request);
                (self.status, Reason::Upstream)
            }
            // The client's body failed while the response streamed, or the
            // client left before the end: the client's, whatever the status.
            BodyOutcome::Client(fault) => {
                if fault == ClientFault::Stalled {
                    self.state.count_timeout(TimeoutStage::Body);
                }
                let reason = fault.reason();
                (ProxyError::new(reason).parts().0.as_u16(), reason)
            }
            BodyOutcome::Dropped => {
                let reason = Reason::ClientAbort;
                (ProxyError::new(reason).parts().0.as_u16(), reason)
            }
        };
        record(&self.state, self.arrival, status, reason, now);
    }
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
async fn read_body(body: RequestBody, deadline: Instant) -> Result<Bytes, ClientFault> {
    match tokio::time::timeout_at(deadline, body.collect()).await {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        // Every error of a RequestBody is the client's.
        Ok(Err(e)) => Err(find_client_fault(e.as_ref()).unwrap_or(ClientFault::Gone)),
        Err(_) => Err(ClientFault::Stalled),
    }
}
