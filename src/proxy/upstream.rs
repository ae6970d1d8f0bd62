//! One upstream: its pooled client, its endpoints with least-loaded
//! power-of-two-choices selection, and its breaker. HTTP/1.1 goes through
//! Spillway's own client and per-endpoint connection pool (`h1.rs`); HTTP/2
//! (h2c, or h2 over TLS) through hyper-util's client, one multiplexed
//! connection per endpoint. Either may run over TLS.
//! An `Upstream` outlives reloads that do not change its endpoints or protocol,
//! so its pool and breaker state survive.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::{Instant, Sleep};
use tower::Service;

use super::body::{RespBody, UpstreamBody};
use super::breaker::{Breaker, BreakerConfig, BreakerState, FailureRate};
use super::h1;
use super::headers::Forwarded;
pub(crate) use super::io::UpstreamIo;
use super::outcome::{AttemptError, AttemptErrorKind, AttemptOutcome};
use crate::config::{UpstreamConfig, UpstreamProtocol};
use crate::metrics::{Histogram, LabelCounters, Metrics};
use crate::tls::{ClientTlsSettings, TlsClient};

tokio::task_local! {
    /// The route's `connect` stage histogram, set around an upstream call so the
    /// connector (which knows nothing of routes) can time the TCP connect.
    pub(crate) static CONNECT_STAGE: Arc<Histogram>;
}

/// An upstream and its state.
pub(crate) struct Upstream {
    pub name: String,
    pub config: UpstreamConfig,
    /// HTTP/2 upstreams: hyper-util's client (one multiplexed connection).
    /// HTTP/1.1 upstreams use Spillway's own client ([`h1`]) and the
    /// endpoints' pools.
    client: Option<Client<Connector, UpstreamBody>>,
    connector: Connector,
    endpoints: Vec<Arc<Endpoint>>,
    pub breaker: Option<Arc<Breaker>>,
    /// The breaker runs in shadow mode: it opens and closes, but lets
    /// requests through (reloadable, so not read from `config`).
    breaker_shadow: std::sync::atomic::AtomicBool,
    metrics: Arc<Metrics>,
    /// Removes this upstream's metric series when it is the last user.
    _series: crate::series::UpstreamSeries,
    /// Closes the endpoints' expired idle HTTP/1.1 connections; stops with
    /// this upstream.
    _reaper: Option<h1::Reaper>,
}

/// One `host:port` of an upstream.
pub(crate) struct Endpoint {
    authority: Authority,
    pub label: String,
    /// Idle HTTP/1.1 connections.
    pool: Arc<h1::Pool>,
    in_flight: AtomicUsize,
    outcomes: LabelCounters<AttemptOutcome>,
}

/// One attempt in flight ([`Upstream::send`]), bounded by its deadline.
pub(crate) struct Call<'a> {
    upstream: &'a Upstream,
    ep: &'a EndpointLoad,
    connect_stage: &'a Histogram,
    state: CallState<'a>,
    deadline: Instant,
    // Armed when the call first has to wait, unless the call is on a
    // pooled connection, whose own timer is used. Boxed: only a new
    // connection needs it.
    sleep: Option<Pin<Box<Sleep>>>,
}

/// The attempt's deadline passed before the response head came.
#[derive(Debug)]
pub(crate) struct TimedOut;

/// What a [`Call`] is doing. The exchange is not boxed: it is the common
/// case, and a box would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum CallState<'a> {
    /// HTTP/1.1 on a pooled connection; the head and method are kept for a
    /// resend on a new connection, should the pooled one turn out closed.
    Pooled {
        exchange: h1::ExchangeFuture,
        method: Method,
    },
    /// HTTP/1.1 on a new connection, or HTTP/2.
    Boxed(Pin<Box<dyn Future<Output = Result<Response<RespBody>, AttemptError>> + Send + 'a>>),
    /// Answered.
    Done,
}

/// Held while an attempt (and then its response body) is using an endpoint.
/// The second field says whether it counts in the endpoint's `in_flight`,
/// which only the choice between endpoints reads: an upstream with one
/// endpoint (a sidecar's usual case) skips two atomic read-modify-writes per
/// attempt.
pub(crate) struct EndpointLoad(Arc<Endpoint>, bool);

/// TCP connector, plus a TLS handshake when the upstream has `tls:`; times
/// the connect (handshake included) for the route that triggered it. A
/// handshake or verification failure is a connect error: nothing of the
/// request was sent, so it is `upstream_connect` and a breaker failure.
#[derive(Clone)]
pub(crate) struct Connector {
    http: HttpConnector,
    tls: Option<Arc<TlsClient>>,
}

// === impl Upstream ===

impl Upstream {
    /// Builds the client and endpoints. The only I/O is reading TLS files.
    pub(crate) fn new(
        config: &UpstreamConfig,
        metrics: &Arc<Metrics>,
        series: crate::series::UpstreamSeries,
    ) -> Result<Self, String> {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(config.connect_timeout.0));
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(60)));
        // The only I/O: reading the TLS files (validated already, a few KiB).
        let tls = match &config.tls {
            Some(t) => {
                // Requests to a TLS upstream carry the `https` scheme.
                http.enforce_http(false);
                let settings = ClientTlsSettings {
                    server_name: t.server_name.clone(),
                    ca: t.ca.clone(),
                    client_cert: t.client_cert.clone(),
                    client_key: t.client_key.clone(),
                    alpn_h2: config.protocol == UpstreamProtocol::Http2,
                    handshake_timeout: config.connect_timeout.0,
                };
                Some(Arc::new(TlsClient::new(&config.name, settings, metrics)?))
            }
            None => None,
        };
        let connector = Connector { http, tls };
        let client = (config.protocol == UpstreamProtocol::Http2).then(|| {
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .pool_idle_timeout(config.pool.idle_timeout.0)
                .pool_max_idle_per_host(config.pool.max_idle_per_endpoint)
                .http2_only(true)
                .build(connector.clone())
        });
        let endpoints = config
            .endpoints
            .iter()
            .map(|ep| {
                let authority = ep
                    .parse::<Authority>()
                    .map_err(|e| format!("endpoint `{ep}`: {e}"))?;
                Ok(Arc::new(Endpoint {
                    authority,
                    label: ep.clone(),
                    pool: Arc::new(h1::Pool::new(
                        config.pool.max_idle_per_endpoint,
                        config.pool.idle_timeout.0,
                    )),
                    in_flight: AtomicUsize::new(0),
                    outcomes: LabelCounters::new(),
                }))
            })
            .collect::<Result<Vec<_>, String>>()?;
        if endpoints.is_empty() {
            return Err(format!("upstream `{}` has no endpoints", config.name));
        }
        let breaker = config.circuit_breaker.as_ref().map(|b| {
            let name = config.name.clone();
            let m = metrics.clone();
            for state in ["closed", "open", "half_open"] {
                m.circuit_state
                    .with_label_values(&[name.as_str(), state])
                    .set(i64::from(state == "closed"));
            }
            Breaker::new(
                breaker_config(b),
                Box::new(move |from: BreakerState, to: BreakerState| {
                    m.circuit_state.with_label_values(&[name.as_str(), from.as_str()]).set(0);
                    m.circuit_state.with_label_values(&[name.as_str(), to.as_str()]).set(1);
                    m.circuit_transitions_total
                        .with_label_values(&[name.as_str(), to.as_str()])
                        .inc();
                    match to {
                        BreakerState::Open => tracing::warn!(upstream = %name, from = from.as_str(), "circuit breaker opened"),
                        _ => tracing::info!(upstream = %name, from = from.as_str(), to = to.as_str(), "circuit breaker transition"),
                    }
                }),
            )
        });
        // One task per upstream (not per connection), only where a pool can
        // hold connections, and only inside a runtime (config checks build
        // upstreams without one).
        let reaper = (client.is_none()
            && config.pool.max_idle_per_endpoint > 0
            && tokio::runtime::Handle::try_current().is_ok())
        .then(|| {
            let pools = endpoints.iter().map(|e| Arc::downgrade(&e.pool)).collect();
            h1::Reaper::spawn(&config.name, pools)
        });
        Ok(Upstream {
            name: config.name.clone(),
            config: config.clone(),
            client,
            connector,
            endpoints,
            breaker,
            breaker_shadow: std::sync::atomic::AtomicBool::new(breaker_shadow(config)),
            metrics: metrics.clone(),
            _series: series,
            _reaper: reaper,
        })
    }

    /// Can this upstream be kept across a reload to `new`? Pool and breaker
    /// survive unless what they are about (endpoints, protocol, TLS) changed.
    pub(crate) fn compatible(&self, new: &UpstreamConfig) -> bool {
        self.config.endpoints == new.endpoints
            && self.config.protocol == new.protocol
            && self.config.tls == new.tls
            && self.config.connect_timeout == new.connect_timeout
            && self.config.pool == new.pool
            && self.config.circuit_breaker.is_some() == new.circuit_breaker.is_some()
    }

    /// Applies breaker settings in place (reload).
    pub(crate) fn update(&self, new: &UpstreamConfig) {
        if let (Some(b), Some(cfg)) = (&self.breaker, &new.circuit_breaker) {
            b.set_config(breaker_config(cfg));
        }
        self.breaker_shadow
            .store(breaker_shadow(new), Ordering::Relaxed);
    }

    /// The breaker is in shadow mode (`circuit_breaker.mode: shadow`).
    pub(crate) fn breaker_is_shadow(&self) -> bool {
        self.breaker_shadow.load(Ordering::Relaxed)
    }

    /// Number of endpoints.
    pub(crate) fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// Least-loaded of two random endpoints (power of two choices); a retry avoids the endpoint that just
    /// failed when there is another one.
    pub(crate) fn pick_avoiding(&self, avoid: Option<&str>) -> EndpointLoad {
        let n = self.endpoints.len();
        if let (Some(bad), true) = (avoid, n == 2) {
            // Two endpoints: the other one, deterministically.
            if let Some(ep) = self.endpoints.iter().find(|e| e.label != bad) {
                ep.in_flight.fetch_add(1, Ordering::Relaxed);
                return EndpointLoad(ep.clone(), true);
            }
        }
        let ep = if n <= 1 {
            return EndpointLoad(self.endpoints[0].clone(), false);
        } else {
            let a = fastrand::usize(..n);
            let mut b = fastrand::usize(..n - 1);
            if b >= a {
                b += 1;
            }
            let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
            let b_lighter =
                eb.in_flight.load(Ordering::Relaxed) < ea.in_flight.load(Ordering::Relaxed);
            let (first, second) = if b_lighter { (eb, ea) } else { (ea, eb) };
            if avoid == Some(first.label.as_str()) {
                second
            } else {
                first
            }
        };
        ep.in_flight.fetch_add(1, Ordering::Relaxed);
        EndpointLoad(ep.clone(), true)
    }

    /// Sends one attempt to `ep`, started at `now`: the request's path and
    /// query go to the endpoint, whatever authority the client named. The
    /// call ends with [`TimedOut`] at `deadline` if no response head came
    /// by then.
    ///
    /// Not an `async fn`: the request is turned into what the wire needs
    /// (an encoded head for HTTP/1.1) before the future is made, so the
    /// future does not carry the request's parts for its whole life (it is
    /// held per client connection); and an HTTP/1.1 request on a pooled
    /// connection is its exchange, polled in place, with no future of its
    /// own around it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn send<'a>(
        &'a self,
        ep: &'a EndpointLoad,
        mut parts: http::request::Parts,
        body: UpstreamBody,
        fwd: &Forwarded,
        connect_stage: &'a Arc<Histogram>,
        now: Instant,
        deadline: Instant,
    ) -> Call<'a> {
        let state = match &self.client {
            Some(client) => {
                fwd.apply(&mut parts.headers);
                never_index_request_id(&mut parts.headers);
                let call = self.send_h2(client, ep, Request::from_parts(parts, body));
                // hyper-util's pool connects out of sight: the connector
                // finds the route's histogram in a task-local.
                CallState::Boxed(Box::pin(CONNECT_STAGE.scope(connect_stage.clone(), call)))
            }
            None => {
                let target = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
                let pool = &ep.0.pool;
                let mut pooled = pool.checkout_at(now);
                // A pooled connection encodes into its own head buffer.
                let head = match &mut pooled {
                    Some(conn) => {
                        conn.encode_head(&parts.method, target, &parts.headers, Some(fwd), &body)
                    }
                    None => {
                        h1::encode_head(&parts.method, target, &parts.headers, Some(fwd), &body)
                            .freeze()
                    }
                };
                let method = parts.method;
                // The request's headers and URI share the client connection's
                // read buffer; dropping them here lets hyper reuse that buffer
                // for its next read instead of allocating a new one while this
                // request is in flight.
                drop(parts.headers);
                drop(parts.uri);
                match pooled {
                    Some(conn) => CallState::Pooled {
                        exchange: h1::exchange(conn, true, head, body, &method, pool.clone()),
                        method,
                    },
                    // Boxed: a new connection is the rare case (pool hits are not).
                    None => CallState::Boxed(Box::pin(self.send_fresh(
                        ep,
                        head,
                        method,
                        body,
                        connect_stage,
                    ))),
                }
            }
        };
        Call {
            upstream: self,
            ep,
            connect_stage,
            state,
            deadline,
            sleep: None,
        }
    }

    /// HTTP/1.1 on a new connection.
    async fn send_fresh(
        &self,
        ep: &EndpointLoad,
        head: Bytes,
        method: Method,
        body: UpstreamBody,
        connect_stage: &Histogram,
    ) -> Result<Response<RespBody>, AttemptError> {
        let conn = h1::Conn::new(self.connect(ep, connect_stage).await?);
        h1_result(h1::exchange(conn, false, head, body, &method, ep.0.pool.clone()).await)
    }

    /// A new connection to `ep` (TCP, then TLS when configured).
    async fn connect(
        &self,
        ep: &EndpointLoad,
        connect_stage: &Histogram,
    ) -> Result<UpstreamIo, AttemptError> {
        let start = Instant::now();
        let scheme = if self.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let uri: Uri = format!("{scheme}://{}/", ep.0.authority)
            .parse()
            .map_err(AttemptError::connect)?;
        let mut connector = self.connector.clone();
        let result = connector.call(uri).await;
        connect_stage.observe(start.elapsed().as_secs_f64());
        match result {
            Ok(io) => Ok(io.into_inner()),
            Err(e) => Err(AttemptError::connect(e)),
        }
    }

    /// HTTP/2: hyper-util's client multiplexes on its connection.
    async fn send_h2(
        &self,
        client: &Client<Connector, UpstreamBody>,
        ep: &EndpointLoad,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<RespBody>, AttemptError> {
        let path = req.uri().path_and_query().cloned();
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(if self.config.tls.is_some() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        });
        parts.authority = Some(ep.0.authority.clone());
        parts.path_and_query = Some(path.unwrap_or_else(|| PathAndQuery::from_static("/")));
        *req.uri_mut() = Uri::from_parts(parts).map_err(AttemptError::connect)?;
        match client.request(req).await {
            Ok(resp) => Ok(resp.map(RespBody::Hyper)),
            Err(e) => {
                // A client body failure travels inside hyper's error chain.
                let otherwise = if e.is_connect() {
                    AttemptErrorKind::Connect
                } else {
                    AttemptErrorKind::Reset
                };
                Err(AttemptError::classify(Box::new(e), otherwise))
            }
        }
    }

    /// Counts how an attempt at an endpoint ended.
    pub(crate) fn count(&self, ep: &EndpointLoad, outcome: AttemptOutcome) {
        ep.0.outcomes.inc(
            outcome,
            &self.metrics.upstream_requests_total,
            &[&self.name, &ep.0.label],
        );
    }
}

impl EndpointLoad {
    /// The endpoint as configured (`host:port`), also its metric label value.
    pub(crate) fn label(&self) -> &str {
        &self.0.label
    }
}

impl Drop for EndpointLoad {
    fn drop(&mut self) {
        if self.1 {
            self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn breaker_shadow(config: &UpstreamConfig) -> bool {
    config
        .circuit_breaker
        .as_ref()
        .is_some_and(|b| b.mode == crate::config::Mode::Shadow)
}

fn breaker_config(b: &crate::config::BreakerSettings) -> BreakerConfig {
    BreakerConfig {
        failure_threshold: b.failure_threshold,
        failure_rate: b.failure_rate.as_ref().map(|r| FailureRate {
            threshold: r.threshold,
            window: r.window.0,
            min_requests: r.min_requests,
        }),
        recovery_timeout: b.recovery_timeout.0,
        half_open_calls: b.half_open_calls,
    }
}

/// Marks the request's `x-request-id` as never indexed for HPACK. The value
/// is unique per request, so indexing it only costs: every request inserted
/// one more entry into the connection's dynamic table (4 KiB by default),
/// evicting the constant headers (which then had to be inserted again), and
/// the encoder walked the ever-longer chain of `x-request-id` entries
/// comparing values. As a never-indexed literal it costs a few bytes on the
/// wire and no table work on either side.
fn never_index_request_id(h: &mut http::HeaderMap) {
    if let Some(v) = h.get_mut(&super::headers::X_REQUEST_ID) {
        v.set_sensitive(true);
    }
}

/// "a: b: c" from an error and its sources, for logs.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

// === impl Call ===

impl Future for Call<'_> {
    type Output = Result<Result<Response<RespBody>, AttemptError>, TimedOut>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let had_budget_before = tokio::task::coop::has_budget_remaining();
        if let Poll::Ready(r) = this
            .state
            .poll(this.upstream, this.ep, this.connect_stage, cx)
        {
            return Poll::Ready(Ok(r));
        }
        let deadline = this.deadline;
        let pooled_timer = match &mut this.state {
            CallState::Pooled { exchange, .. } => exchange.deadline_timer(deadline),
            _ => None,
        };
        let mut sleep = match pooled_timer {
            Some(t) => t,
            None => this
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)))
                .as_mut(),
        };
        // As tokio's `Timeout` does: when the call used up the task's budget,
        // the deadline is still looked at.
        let exhausted = had_budget_before && !tokio::task::coop::has_budget_remaining();
        loop {
            let fired = if exhausted {
                std::pin::pin!(tokio::task::coop::unconstrained(sleep.as_mut())).poll(cx)
            } else {
                sleep.as_mut().poll(cx)
            };
            match fired {
                // A pooled connection's timer was due at an earlier
                // deadline: now it waits for this one.
                Poll::Ready(()) if sleep.deadline() < deadline => sleep.as_mut().reset(deadline),
                fired => return fired.map(|()| Err(TimedOut)),
            }
        }
    }
}

impl<'a> CallState<'a> {
    fn poll(
        &mut self,
        upstream: &'a Upstream,
        ep: &'a EndpointLoad,
        connect_stage: &'a Histogram,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<RespBody>, AttemptError>> {
        loop {
            match self {
                CallState::Pooled { exchange, method } => {
                    match std::task::ready!(Pin::new(exchange).poll(cx)) {
                        Err(h1::Error::Stale(msg, head, body)) => {
                            // A pooled connection the upstream closed meanwhile
                            // costs one more try, on a new connection.
                            tracing::debug!(endpoint = ep.label(), error = %msg, "pooled connection was closed; sending again on a new one");
                            let call =
                                upstream.send_fresh(ep, head, method.clone(), body, connect_stage);
                            *self = CallState::Boxed(Box::pin(call));
                        }
                        r => {
                            *self = CallState::Done;
                            return Poll::Ready(h1_result(r));
                        }
                    }
                }
                CallState::Boxed(call) => {
                    let r = std::task::ready!(call.as_mut().poll(cx));
                    *self = CallState::Done;
                    return Poll::Ready(r);
                }
                CallState::Done => {
                    return Poll::Ready(Err(AttemptError::reset("attempt polled after it ended")))
                }
            }
        }
    }
}

/// An HTTP/1.1 exchange's result as an attempt's.
fn h1_result(
    r: Result<Response<h1::H1Body>, h1::Error>,
) -> Result<Response<RespBody>, AttemptError> {
    match r {
        Ok(resp) => Ok(resp.map(RespBody::H1)),
        Err(h1::Error::Reset(msg)) => Err(AttemptError::reset(msg)),
        // Only a reused connection is ever stale, and that one is resent
        // before it gets here.
        Err(h1::Error::Stale(msg, ..)) => Err(AttemptError::reset(msg)),
        // The request body is only ever the client's (or replay bytes,
        // which cannot fail): classified by the error it carries.
        Err(h1::Error::Body(e)) => Err(AttemptError::classify(e, AttemptErrorKind::Reset)),
    }
}

// === impl Connector ===

impl Service<Uri> for Connector {
    type Response = TokioIo<UpstreamIo>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        let host = uri.host().unwrap_or_default().to_string();
        let fut = self.http.call(uri);
        Box::pin(async move {
            let start = Instant::now();
            let res = async {
                let tcp = fut.await?.into_inner();
                let io = match tls {
                    None => UpstreamIo::Plain(tcp),
                    Some(tls) => UpstreamIo::Tls(Box::new(tls.connect(&host, tcp).await?)),
                };
                Ok::<_, Self::Error>(TokioIo::new(io))
            }
            .await;
            // Outside a request's scope (a background connect) there is no route to charge.
            let _ = CONNECT_STAGE.try_with(|h| h.observe(start.elapsed().as_secs_f64()));
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_is_never_indexed_and_other_headers_are_left_alone() {
        let mut h = http::HeaderMap::new();
        h.insert("x-request-id", http::HeaderValue::from_static("abc"));
        h.insert("x-forwarded-proto", http::HeaderValue::from_static("http"));
        never_index_request_id(&mut h);
        assert!(h["x-request-id"].is_sensitive());
        assert_eq!(h["x-request-id"], "abc");
        assert!(!h["x-forwarded-proto"].is_sensitive());
        // No request id: nothing is added.
        let mut empty = http::HeaderMap::new();
        never_index_request_id(&mut empty);
        assert!(empty.is_empty());
    }
}
