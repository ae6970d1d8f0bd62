//! Black-box tests of resilience: stage timeouts, deadline
//! propagation, safe retries with budgets and backoff, circuit breakers with
//! half-open probes, fallbacks, and their metrics.
//!
//! Every test runs against real sockets on 127.0.0.1:0 and is bounded in time.
//! Where timing is the thing tested, bounds are generous (a loaded 2-core CI
//! machine); everything else awaits counters, gates and bounded polling.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use parking_lot::Mutex;
use support::*;
use tokio::sync::mpsc;
use tokio::time::Instant;

// ---------------------------------------------------------------------------
// Helpers (this file's own; tests/support is shared and owned elsewhere)
// ---------------------------------------------------------------------------

/// A route `name` on `prefix` to `upstream` with `extra` lines (indented 4).
fn route(name: &str, prefix: &str, upstream: &str, extra: &str) -> String {
    route_yaml(
        name,
        &format!("      path_prefix: {prefix}"),
        upstream,
        extra,
    )
}

/// An upstream entry with several endpoints.
fn upstream_many(name: &str, endpoints: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!("  {name}:\n    endpoints: [{}]\n{extra}", list.join(", "))
}

/// Sends `req` over HTTP/1.1 and reads the whole answer.
async fn send(h: &ProxyHarness, req: Request<Body>) -> Seen {
    let began = Instant::now();
    let resp = h.send(req).await;
    Seen::read(resp, began).await
}

/// GET `path` with an `x-request-id`.
async fn get_id(h: &ProxyHarness, path: &str, id: &str) -> Seen {
    send(
        h,
        Request::get(path)
            .header("x-request-id", id)
            .body(empty())
            .expect("request"),
    )
    .await
}

async fn get(h: &ProxyHarness, path: &str) -> Seen {
    send(h, Request::get(path).body(empty()).expect("request")).await
}

/// Polls /metrics until `pred` holds for the value (bounded at 20 s).
async fn wait_metric(
    h: &ProxyHarness,
    name: &str,
    labels: &[(&str, &str)],
    pred: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = metric(h, name, labels).await;
        if pred(v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "metric {name}{labels:?} stuck at {v}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The breaker state of `upstream` from /status.json.
async fn breaker_state(h: &ProxyHarness, upstream: &str) -> String {
    let (status, _, text) = h.admin_get("/status.json").await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&text).expect("status.json is JSON");
    v["upstreams"]
        .as_array()
        .expect("upstreams array")
        .iter()
        .find(|u| u["name"] == upstream)
        .unwrap_or_else(|| panic!("upstream {upstream} not in /status.json: {text}"))["breaker"]
        .as_str()
        .unwrap_or("none")
        .to_string()
}

/// Polls until the breaker of `upstream` is in `state` (bounded at 20 s).
async fn wait_breaker(h: &ProxyHarness, upstream: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = breaker_state(h, upstream).await;
        if s == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "breaker of {upstream} stayed {s}, expected {state}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `/status.json` entry of a route.
async fn wait_route_idle(h: &ProxyHarness, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, _, text) = h.admin_get("/status.json").await;
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        let r = v["routes"]
            .as_array()
            .expect("routes")
            .iter()
            .find(|r| r["name"] == name)
            .cloned()
            .expect("route");
        if r["in_flight"] == 0 && r["queue_depth"] == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "route {name} never idle: {r}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Parses a `grpc-timeout` value.
fn parse_grpc_timeout(v: &str) -> Duration {
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n
        .parse()
        .unwrap_or_else(|_| panic!("bad grpc-timeout {v:?}"));
    match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => panic!("bad grpc-timeout unit in {v:?}"),
    }
}

/// Counts attempts per `x-request-id` inside a handler.
#[derive(Clone, Default)]
struct Attempts(Arc<Mutex<HashMap<String, u64>>>);

impl Attempts {
    /// Records an attempt of `req`; returns its 1-based number.
    fn next(&self, req: &Request<Incoming>) -> u64 {
        let id = header_str(req.headers(), "x-request-id")
            .unwrap_or("")
            .to_string();
        let mut m = self.0.lock();
        let n = m.entry(id).or_insert(0);
        *n += 1;
        *n
    }
}

/// Reads a request body fully, answering with `status` and its length and hash.
async fn digest_reply(req: Request<Incoming>, status: u16) -> Response<Body> {
    let body = collect_body(req.into_body()).await;
    Response::builder()
        .status(status)
        .header("x-len", body.len().to_string())
        .header("x-sha", sha256_hex(&body))
        .body(full("digested"))
        .expect("response")
}

// ---------------------------------------------------------------------------
// Timeouts
// ---------------------------------------------------------------------------

/// A pooled connection keeps its per-try timer from one attempt to the
/// next: an attempt with a shorter deadline than the one before it on the
/// same connection still times out at its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_fires_on_a_connection_a_longer_deadline_used_before() {
    within(60, "test", async {
        let fake = FakeUpstream::with_handler(|req, _ctx| async move {
            if req.uri().path() == "/slow" {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            Ok(reply::status_body(200, "fast"))
        })
        .await;
        let routes = format!(
            "{}{}",
            route(
                "slow",
                "/slow",
                "app",
                "    timeouts: {request: 20s, per_try: 300ms}\n"
            ),
            route(
                "fast",
                "/",
                "app",
                "    timeouts: {request: 20s, per_try: 15s}\n"
            ),
        );
        let h = ProxyHarness::start(&yaml_with(
            "",
            &upstream_yaml("app", fake.addr(), ""),
            &routes,
        ))
        .await;
        // The first on a new connection, the second on it pooled, each with
        // a later deadline than the one before.
        for _ in 0..2 {
            let s = get(&h, "/fast").await;
            assert_eq!(s.status, StatusCode::OK, "{s:?}");
        }
        assert_eq!(fake.connections(), 1, "the connection was pooled");
        let s = get(&h, "/slow").await;
        assert_eq!(s.status, StatusCode::GATEWAY_TIMEOUT, "{s:?}");
        assert_eq!(s.reason.as_deref(), Some("upstream_timeout"), "{s:?}");
        assert!(
            s.elapsed >= Duration::from_millis(300),
            "before per_try: {:?}",
            s.elapsed
        );
        assert!(
            s.elapsed < Duration::from_secs(10),
            "at the earlier attempt's deadline, not the later one: {:?}",
            s.elapsed
        );
        assert_eq!(fake.connections(), 1, "the slow attempt reused it");
        assert_eq!(
            metric(
                &h,
                "spillway_timeouts_total",
                &[("route", "slow"), ("stage", "per_try")]
            )
            .await,
            1.0
        );
        // The connection the attempt timed out on is closed; the next
        // attempt gets a new one and its own deadline.
        let s = get(&h, "/fast").await;
        assert_eq!(s.status, StatusCode::OK, "{s:?}");
    })
    .await
}

/// The other way round: an attempt with a later deadline than the one
/// before it on the same connection is not cut off at the earlier one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_attempts_deadline_does_not_time_out_the_next_on_its_connection() {
    within(60, "test", async {
        let fake = FakeUpstream::with_handler(|req, _ctx| async move {
            if req.uri().path() == "/unhurried" {
                // Past the first route's per_try, well within the second's.
                tokio::time::sleep(Duration::from_millis(900)).await;
            }
            Ok(reply::status_body(200, "answered"))
        })
        .await;
        let routes = format!(
            "{}{}",
            route(
                "brisk",
                "/brisk",
                "app",
                "    timeouts: {request: 20s, per_try: 300ms}\n"
            ),
            route(
                "patient",
                "/",
                "app",
                "    timeouts: {request: 20s, per_try: 15s}\n"
            ),
        );
        let h = ProxyHarness::start(&yaml_with(
            "",
            &upstream_yaml("app", fake.addr(), ""),
            &routes,
        ))
        .await;
        // The first on a new connection, the second on it pooled.
        for _ in 0..2 {
            let s = get(&h, "/brisk").await;
            assert_eq!(s.status, StatusCode::OK, "{s:?}");
        }
        let s = get(&h, "/unhurried").await;
        assert_eq!(s.status, StatusCode::OK, "{s:?}");
        assert_eq!(&s.body[..], b"answered");
        assert!(s.elapsed >= Duration::from_millis(900), "{:?}", s.elapsed);
        assert_eq!(fake.connections(), 1, "both on one pooled connection");
        for route in ["brisk", "patient"] {
            assert_eq!(
                metric(
                    &h,
                    "spillway_timeouts_total",
                    &[("route", route), ("stage", "per_try")]
                )
                .await,
                0.0,
                "{route}"
            );
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_then_a_successful_retry() {
    within(60, "test", async {
        let attempts = Attempts::default();
        let a = attempts.clone();
        let fake = FakeUpstream::with_handler(move |req, _ctx| {
            let n = a.next(&req);
            async move {
                if n == 1 {
                    // Far past per_try: only a retry can answer in time.
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                Ok(reply::status_body(200, format!("attempt {n}")))
            }
        })
        .await;
        let routes = route(
            "pt",
            "/",
            "app",
            "    timeouts: {request: 20s, per_try: 300ms}\n    retries: {max_attempts: 3, on: [timeout], backoff: {base: 1ms, max: 10ms}}\n",
        );
        let h = ProxyHarness::start(&yaml_with(
            "",
            &upstream_yaml("app", fake.addr(), ""),
            &routes,
        ))
        .await;
        let s = get_id(&h, "/thing", "rid-per-try-1").await;
        assert_eq!(s.status, StatusCode::OK, "{s:?}");
        assert_eq!(&s.body[..], b"attempt 2");
        assert_eq!(s.reason, None);
        assert_eq!(fake.hits_for_request_id("rid-per-try-1"), 2);
        assert!(
            s.elapsed >= Duration::from_millis(300),
            "answered before per_try could fire: {:?}",
            s.elapsed
        );
        assert!(s.elapsed < Duration::from_secs(10), "{:?}", s.elapsed);
        assert_eq!(
            metric(
                &h,
                "spillway_retries_total",
                &[("route", "pt"), ("cause", "timeout")]
            )
            .await,
            1.0
        );
        assert_eq!(
            metric(
                &h,
                "spillway_timeouts_total",
                &[("route", "pt"), ("stage", "per_try")]
            )
            .await,
            1.0
        );
        assert_eq!(
            metric(
                &h,
                "spillway_timeouts_total",
                &[("route", "pt"), ("stage", "request")]
            )
            .await,
            0.0
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_bounds_total_time_with_retries_and_backoff() {
    within(60, "test", async {
        let fake = FakeUpstream::builder()
            .delay(Duration::from_secs(60))
            .start()
            .await;
        // Without the request timeout: 10 tries x 600 ms + backoff > 6 s.
        let routes = format!(
            "{}{}",
            route(
                "retrying",
                "/retrying",
                "app",
                "    timeouts: {request: 1200ms, per_try: 600ms}\n    queue: {max_wait: 100ms}\n    retries: {max_attempts: 10, on: [timeout], backoff: {base: 50ms, max: 100ms}}\n",
            ),
            route(
                "single",
                "/single",
                "app",
                "    timeouts: {request: 500ms}\n    queue: {max_wait: 100ms}\n",
            )
        );
        let h = ProxyHarness::start(&yaml_with(
            "",
            &upstream_yaml("app", fake.addr(), ""),
            &routes,
        ))
        .await;

        let s = get_id(&h, "/retrying", "rid-deadline").await;
        assert_eq!(s.status, StatusCode::GATEWAY_TIMEOUT, "{s:?}");
        assert_eq!(s.reason.as_deref(), Some("upstream_timeout"));
        assert!(
            s.elapsed < Duration::from_secs(4),
            "request timeout is 1.2s, total took {:?}",
            s.elapsed
        );
        let tries = fake.hits_for_request_id("rid-deadline");
        assert!((2..=3).contains(&tries), "{tries} attempts within 1.2s");
        let per_try = metric(
            &h,
            "spillway_timeouts_total",
            &[("route", "retrying"), ("stage", "per_try")],
        )
        .await;
        let request = metric(
            &h,
            "spillway_timeouts_total",
            &[("route", "retrying"), ("stage", "request")],
        )
        .await;
        assert!(per_try >= 1.0, "per_try timeouts {per_try}");
        assert!(per_try + request >= tries as f64, "every attempt's timeout counted");
        assert_eq!(
            metric(
                &h,
                "spillway_retries_total",
                &[("route", "retrying"), ("cause", "timeout")]
            )
            .await,
            (tries - 1) as f64
        );

        // No per_try: the request timeout alone ends the only attempt.
        let s = get(&h, "/single").await;
        assert_eq!(s.status, StatusCode::GATEWAY_TIMEOUT, "{s:?}");
        assert_eq!(s.reason.as_deref(), Some("upstream_timeout"));
        assert!(
            s.elapsed >= Duration::from_millis(500),
            "504 before the deadline: {:?}",
            s.elapsed
        );
        assert!(s.elapsed < Duration::from_secs(4), "{:?}", s.elapsed);
        assert_eq!(
            metric(
                &h,
                "spillway_timeouts_total",
                &[("route", "single"), ("stage", "request")]
            )
            .await,
            1.0
        );
        assert_eq!(
            metric(
                &h,
                "spillway_requests_total",
                &[
                    ("route", "single"),
                    ("status_class", "5xx"),
                    ("reason", "upstream_timeout")
                ]
            )
            .await,
            1.0
        );
    })
    .await
}

/// The upstream sends headers and a first chunk, then stalls longer than
/// `response_body_idle`: the client must see a broken body, never a clean end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_idle_timeout_after_headers_aborts_the_connection() {
    within(60, "test", async {
        let fake = FakeUpstream::with_handler(|req, ctx| async move {
            let (tx, body) = if req.uri().path() == "/sized" {
                body_channel_sized(1000)
            } else {
                body_channel()
            };
            ctx.spawn(async move {
                tx.data(Bytes::from_static(b"0123456789")).await;
                // Stall, holding the body open.
                tokio::time::sleep(Duration::from_secs(60)).await;
                drop(tx);
            });
            Ok(Response::new(body))
        })
        .await;
        let routes = route(
            "stall",
            "/",
            "app",
            "    timeouts: {request: 30s, response_body_idle: 300ms}\n",
        );
        let h = ProxyHarness::start(&yaml_with(
            "",
            &upstream_yaml("app", fake.addr(), ""),
            &routes,
        ))
        .await;

        for (i, path) in ["/chunked", "/sized"].into_iter().enumerate() {
            let began = Instant::now();
            let resp = h.get(path).await;
            assert_eq!(resp.status(), StatusCode::OK, "{path}");
            assert_no_spillway_headers(resp.headers());
            let got = within(20, "stalled body", resp.into_body().collect()).await;
            assert!(
                got.is_err(),
                "{path}: a truncated body must not end cleanly (got {:?})",
                got.map(|c| c.to_bytes())
            );
            assert!(
                began.elapsed() < Duration::from_secs(15),
                "{path}: the idle timeout (300ms) did not fire: {:?}",
                began.elapsed()
            );
            wait_metric(
                &h,
                "spillway_timeouts_total",
                &[("route", "stall"), ("stage", "body")],
                |v| v == (i + 1) as f64,
            )
            .await;
        }
        // A raw look: the chunked stream is cut without its terminating chunk.
        let mut raw = RawConn::connect(h.addr()).await;
        raw.send(b"GET /chunked HTTP/1.1\r\nhost: t\r\n\r\n").await;
        let head = raw.read_response().await;
        assert_eq!(head.status, 200);
        let rest = within(20, "raw stalled body", raw.read_to_end()).await;
        assert!(
            !rest.ends_with(b"0\r\n\r\n"),
            "stream ended cleanly: {:?}",
            String::from_utf8_lossy(&rest)
        );
        wait_route_idle(&h, "stall").await;
    })
    .await
}

/// `timeouts.request` covers the whole exchange: an upstream that keeps
/// trickling bytes (never idle) past the request deadline has its response
/// aborted, and the timeout is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_after_headers_aborts_a_trickling_body() {
    within(60, "test", async {
        let fake = FakeUpstream::builder()
            .chunks(
                (0..50)
                    .map(|i| Bytes::from(format!("chunk {i}\n")))
                    .collect(),
                Duration::from_millis(100),
            )
            .start()
            .await;
        let routes = route(
            "trickle",
            "/",
            "app",
            "    timeouts: {request: 1s, response_body_idle: 2s}\n    queue: {max_wait: 100ms}\n",
        );
        let h = ProxyHarness::start(&yaml_with(
            "",
            &upstream_yaml("app", fake.addr(), ""),
            &routes,
        ))
        .await;
        let began = Instant::now();
        let resp = h.get("/trickle").await;
        assert_eq!(resp.status(), StatusCode::OK);
        let got = within(20, "trickling body", resp.into_body().collect()).await;
        let took = began.elapsed();
        assert!(
            got.is_err(),
            "the body outlived timeouts.request (1s) and ended cleanly after {took:?}"
        );
        assert!(took < Duration::from_secs(4), "aborted only after {took:?}");
        wait_metric(
            &h,
            "spillway_timeouts_total",
            &[("route", "trickle"), ("stage", "request")],
            |v| v == 1.0,
        )
        .await;
    })
    .await
}

/// `response_body_idle` applies to both directions: a client that stops
/// sending its request body mid-way is cut off after the idle gap, and the
/// timeout is counted under stage `body`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_idle_timeout_is_enforced_and_counted() {
    within(60, "test", async {
        let fake = FakeUpstream::with_handler(|req, _ctx| async move {
            // Waits for the whole body; answers only if it arrives complete.
            match req.into_body().collect().await {
                Ok(b) => Ok(reply::status_body(
                    200,
                    format!("got {}", b.to_bytes().len()),
                )),
                Err(_) => Err(Reset),
            }
        })
        .await;
        let routes = route(
            "upload",
            "/",
            "app",
            "    timeouts: {request: 30s, response_body_idle: 300ms}\n",
        );
        let h = ProxyHarness::start(&yaml_with(
            "",
            &upstream_yaml("app", fake.addr(), ""),
            &routes,
        ))
        .await;
        let began = Instant::now();
        let mut raw = RawConn::connect(h.addr()).await;
        raw.send(b"POST /upload HTTP/1.1\r\nhost: t\r\ncontent-length: 1000\r\n\r\n0123456789")
            .await;
        // The client now stalls with 990 bytes owed.
        let outcome = within(20, "stalled upload", raw.read_outcome()).await;
        let took = began.elapsed();
        if let RawOutcome::Response(r) = &outcome {
            assert!(
                !(200..300).contains(&r.status),
                "a truncated upload cannot succeed: {r:?}"
            );
        }
        assert!(
            took < Duration::from_secs(15),
            "idle gap of 300ms enforced only after {took:?}"
        );
        wait_metric(
            &h,
            "spillway_timeouts_total",
            &[("route", "upload"), ("stage", "body")],
            |v| v == 1.0,
        )
        .await;
        drop(raw);
        wait_route_idle(&h, "upload").await;
    })
    .await
}

// ---------------------------------------------------------------------------
// Deadline propagation
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_forwarded_minus_queue_time() {
    within(60, "test", async {
        let gate = Gate::new();
        let g = gate.clone();
        let seen_at: Arc<Mutex<Option<Instant>>> = Arc::default();
        let s = seen_at.clone();
        let fake = FakeUpstream::with_handler(move |req, _ctx| {
            let (g, s) = (g.clone(), s.clone());
            async move {
                if req.uri().path() == "/hold" {
                    g.pass().await;
                    return Ok(reply::ok());
                }
                *s.lock() = Some(Instant::now());
                Ok(Response::builder()
                    .status(200)
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "0")
                    .body(empty())
                    .expect("response"))
            }
        })
        .await;
        let routes = route(
            "grpc",
            "/",
            "app",
            "    concurrency: {max_in_flight: 1}\n    queue: {max_depth: 5, max_wait: 10s}\n    timeouts: {request: 30s}\n",
        );
        let h = ProxyHarness::start(&yaml_with(
            "",
            &upstream_yaml("app", fake.addr(), ""),
            &routes,
        ))
        .await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        spawn_get(&h, "/hold", &tx);
        fake.wait_path_hits("/hold", 1).await;

        // A gRPC call with 2 s to live queues behind the holder.
        let client = h.h2().clone();
        let url = h.url("/pkg.Svc/Call");
        let sent = Instant::now();
        let call = tokio::spawn(async move {
            let req = Request::post(url)
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .header("grpc-timeout", "2S")
                .body(full(Bytes::from_static(b"\0\0\0\0\0")))
                .expect("request");
            let resp = client.request(req).await.expect("gRPC call");
            let status = resp.status();
            let headers = resp.headers().clone();
            let _ = collect_body(resp.into_body()).await;
            (status, headers)
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, _, text) = h.admin_get("/status.json").await;
            let v: serde_json::Value = serde_json::from_str(&text).expect("json");
            if v["routes"][0]["queue_depth"] == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "gRPC call never queued: {v}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let queued_confirmed = Instant::now();
        // Let it stand in the queue for a while (the thing measured).
        tokio::time::sleep(Duration::from_millis(600)).await;
        let min_queued = queued_confirmed.elapsed();
        gate.open();
        let (status, headers) = within(20, "gRPC call", call).await.expect("call task");
        assert_eq!(status, StatusCode::OK, "{headers:?}");
        assert_eq!(header_str(&headers, "grpc-status"), Some("0"), "{headers:?}");
        assert_eq!(recv(&mut rx).await.status, StatusCode::OK);

        let upstream_saw = seen_at.lock().expect("the call reached the upstream");
        let req = fake
            .requests()
            .into_iter()
            .find(|r| r.uri.path() == "/pkg.Svc/Call")
            .expect("recorded");
        let forwarded = parse_grpc_timeout(
            req.header("grpc-timeout")
                .expect("grpc-timeout forwarded to the upstream"),
        );
        // Queued at least `min_queued`: that much is gone from the budget.
        assert!(
            forwarded <= Duration::from_secs(2) - min_queued,
            "forwarded grpc-timeout {forwarded:?} ignores {min_queued:?} spent queued"
        );
        // And no more than what the test itself saw elapse.
        let elapsed = upstream_saw.duration_since(sent);
        assert!(
            forwarded + elapsed + Duration::from_millis(5) >= Duration::from_secs(2),
            "forwarded {forwarded:?} but only {elapsed:?} had passed"
        );
    })
    .await
}

// ---------------------------------------------------------------------------
// Retries: which requests, which bodies
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_to_a_503_upstream_is_sent_exactly_once() {
    within(60, "test", async {
        let fake = FakeUpstream::status(503).await;
        let routes = route(
            "r",
            "/",
            "app",
            "    retries: {max_attempts: 3, on: [503], backoff: {base: 1ms, max: 5ms}}\n",
        );
        let h = ProxyHarness::start(&yaml_with(
            "",
            &upstream_yaml("app", fake.addr(), ""),
            &routes,
        ))
        .await;
        for method in ["POST", "PATCH"] {
            let id = format!("rid-{method}");
            let s = send(
                &h,
                Request::builder()
                    .method(method)
                    .uri("/orders")
                    .header("x-request-id", &id)
                    .body(full("create an order"))
                    .expect("request"),
            )
            .await;
            assert_eq!(s.status, StatusCode::SERVICE_UNAVAILABLE, "{s:?}");
            assert_eq!(s.reason, None, "the upstream's own 503 passes through");
            assert_eq!(
                fake.hits_for_request_id(&id),
                1,
                "{method} sent more than once"
            );
        }
        assert_eq!(
            metric(&h, "spillway_retries_total", &[("route", "r")]).await,
            0.0
        );
        // The same route does retry a GET: retries are configured.
        let s = get_id(&h, "/orders", "rid-get").await;
        assert_eq!(s.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(fake.hits_for_request_id("rid-get"), 3);
        assert_eq!(
            metric(
                &h,
                "spillway_retries_total",
                &[("route", "r"), ("cause", "503")]
            )
            .await,
            2.0
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_with_the_idempotency_key_header_is_retried() {
    within(60, "test", async {
        let attempts = Attempts::default();
        let a = attempts.clone();
        // Every request's first attempt fails; later ones succeed.
        let fake = FakeUpstream::with_handler(move |req, _ctx| {
            let n = a.next(&req);
            async move {
                if n == 1 {
                    Ok(digest_reply(req, 503).await)
                } else {
                    Ok(digest_reply(req, 200).await)
                }
            }
        })
        .await;
        let routes = route(
            "r",
            "/",
            "app",
            "    retries: {max_attempts: 3, on: [503], backoff: {base: 1ms, max: 5ms}, idempotency_key_header: Idempotency-Key}\n",
        );
        let h = ProxyHarness::start(&yaml_with(
            "",
            &upstream_yaml("app", fake.addr(), ""),
            &routes,
        ))
        .await;
        let payload = random_bytes(3000, 7);
        let sha = sha256_hex(&payload);

        let s = send(
            &h,
            Request::post("/payments")
                .header("x-request-id", "rid-no-key")
                .body(full(payload.clone()))
                .expect("request"),
        )
        .await;
        assert_eq!(s.status, StatusCode::SERVICE_UNAVAILABLE, "{s:?}");
        assert_eq!(fake.hits_for_request_id("rid-no-key"), 1);

        let s = send(
            &h,
            Request::post("/payments")
                .header("x-request-id", "rid-key")
                .header("idempotency-key", "pay-42")
                .body(full(payload.clone()))
                .expect("request"),
        )
        .await;
        assert_eq!(s.status, StatusCode::OK, "{s:?}");
        assert_eq!(fake.hits_for_request_id("rid-key"), 2);
        assert_eq!(header_str(&s.headers, "x-sha"), Some(sha.as_str()), "replayed body intact");
        let key_seen: Vec<_> = fake
            .requests()
            .into_iter()
            .filter(|r| r.header("x-request-id") == Some("rid-key"))
            .map(|r| r.header("idempotency-key").map(str::to_owned))
            .collect();
        assert_eq!(key_seen, vec![Some("pay-42".to_string()); 2]);
        assert_eq!(
            metric(
                &h,
                "spillway_retries_total",
                &[("route", "r"), ("cause", "503")]
            )
            .await,
            1.0
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_to_a_refused_port_is_retried() {
    within(90, "test", async {
        let fake = FakeUpstream::echo().await;
        let dead = closed_port_addr().await;
        let upstreams = format!(
            "{}{}",
            upstream_many("dead", &[dead], "    connect_timeout: 2s\n"),
            upstream_many("mixed", &[dead, fake.addr()], "    connect_timeout: 2s\n"),
        );
        let routes = format!(
            "{}{}",
            route(
                "dead",
                "/dead",
                "dead",
                "    retries: {max_attempts: 3, on: [connect], backoff: {base: 1ms, max: 5ms}}\n",
            ),
            route(
                "mixed",
                "/mixed",
                "mixed",
                "    retries: {max_attempts: 10, on: [connect], backoff: {base: 1ms, max: 5ms}, budget: {ratio: 1.0, min_per_second: 100}}\n",
            )
        );
        let h = ProxyHarness::start(&yaml_with("", &upstreams, &routes)).await;

        // Only a refused port: every attempt is a connect failure, all retried.
        let s = send(
            &h,
            Request::post("/dead/x")
                .body(full("nothing was sent"))
                .expect("request"),
        )
        .await;
        assert_eq!(s.status, StatusCode::BAD_GATEWAY, "{s:?}");
        assert_eq!(s.reason.as_deref(), Some("upstream_connect"));
        assert_eq!(
            metric(
                &h,
                "spillway_retries_total",
                &[("route", "dead"), ("cause", "connect")]
            )
            .await,
            2.0
        );
        assert_eq!(
            metric(
                &h,
                "spillway_upstream_requests_total",
                &[("upstream", "dead"), ("outcome", "connect_error")]
            )
            .await,
            3.0
        );

        // One refused and one working endpoint: POSTs are sent until one has
        // met the refused endpoint (p2c picks either at random); every POST
        // gets through, exactly once. A POST fails only if 10 picks in a row
        // are the refused endpoint: about 2^-9 over the whole loop.
        let mut sent = 0u64;
        let mut connect_retries = 0.0;
        while connect_retries < 1.0 {
            assert!(sent < 40, "p2c never chose the refused endpoint in {sent} requests?");
            let body = format!("order {sent}");
            let id = format!("rid-mixed-{sent}");
            let s = send(
                &h,
                Request::post("/mixed/orders")
                    .header("x-request-id", &id)
                    .body(full(body.clone()))
                    .expect("request"),
            )
            .await;
            assert_eq!(s.status, StatusCode::OK, "POST {sent}: {s:?}");
            assert_eq!(&s.body[..], body.as_bytes(), "POST {sent} body");
            assert_eq!(fake.hits_for_request_id(&id), 1);
            sent += 1;
            connect_retries = metric(
                &h,
                "spillway_retries_total",
                &[("route", "mixed"), ("cause", "connect")],
            )
            .await;
        }
        assert_eq!(fake.hits(), sent);
        assert_eq!(
            connect_retries,
            metric(
                &h,
                "spillway_upstream_requests_total",
                &[("upstream", "mixed"), ("outcome", "connect_error")]
            )
            .await
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_larger_than_max_buffered_body_is_not_retried_and_arrives_intact() {
    within(60, "test", async {
        let fake =
            FakeUpstream::with_handler(|req, _ctx| async move { Ok(digest_reply(req, 503).await) })
                .await;
        let routes = route(
            "r",
            "/",
            "app",
            "    retries: {max_attempts: 3, on: [503], backoff: {base: 1ms, max: 5ms}, max_buffered_body: 1KiB}\n",
        );
        let h = ProxyHarness::start(&yaml_with(
            "",
            &upstream_yaml("app", fake.addr(), ""),
            &routes,
        ))
        .await;

        // 256 KiB PUT: streamed, not replayable, sent once, intact.
        let big = random_bytes(256 * 1024 + 5, 11);
        let s = send(
            &h,
            Request::put("/blob")
                .header("x-request-id", "rid-big")
                .body(full(big.clone()))
                .expect("request"),
        )
        .await;
        assert_eq!(s.status, StatusCode::SERVICE_UNAVAILABLE, "{s:?}");
        assert_eq!(fake.hits_for_request_id("rid-big"), 1, "a large body was retried");
        assert_eq!(header_str(&s.headers, "x-len"), Some(big.len().to_string().as_str()));
        assert_eq!(
            header_str(&s.headers, "x-sha"),
            Some(sha256_hex(&big).as_str())
        );

        // A small PUT on the same route is retried, intact every time.
        let small = random_bytes(1000, 12);
        let s = send(
            &h,
            Request::put("/blob")
                .header("x-request-id", "rid-small")
                .body(full(small.clone()))
                .expect("request"),
        )
        .await;
        assert_eq!(s.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(fake.hits_for_request_id("rid-small"), 3);
        assert_eq!(
            header_str(&s.headers, "x-sha"),
            Some(sha256_hex(&small).as_str())
        );
    })
    .await
}

/// Attempts that fail by reset, timeout and status are each retried and
/// counted under their cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_counted_by_cause() {
    within(60, "test", async {
        let attempts = Attempts::default();
        let a = attempts.clone();
        let fake = FakeUpstream::with_handler(move |req, _ctx| {
            let n = a.next(&req);
            let path = req.uri().path().to_string();
            async move {
                match (path.as_str(), n) {
                    ("/reset", 1) => Err(Reset),
                    ("/502", 1) => Ok(reply::status_body(502, "bad")),
                    ("/504", 1) => Ok(reply::status_body(504, "slow")),
                    _ => Ok(reply::ok()),
                }
            }
        })
        .await;
        let routes = route(
            "r",
            "/",
            "app",
            "    retries: {max_attempts: 2, backoff: {base: 1ms, max: 5ms}}\n",
        );
        let h = ProxyHarness::start(&yaml_with(
            "",
            &upstream_yaml("app", fake.addr(), ""),
            &routes,
        ))
        .await;
        for (path, cause) in [("/reset", "reset"), ("/502", "502"), ("/504", "504")] {
            let id = format!("rid{path}");
            let s = get_id(&h, path, &id).await;
            assert_eq!(s.status, StatusCode::OK, "{path}: {s:?}");
            assert_eq!(fake.hits_for_request_id(&id), 2, "{path}");
            assert_eq!(
                metric(
                    &h,
                    "spillway_retries_total",
                    &[("route", "r"), ("cause", cause)]
                )
                .await,
                1.0,
                "retries_total{{cause={cause}}}"
            );
        }
    })
    .await
}

/// The upstream's Retry-After is honoured as the backoff, capped at
/// `backoff.max`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_retry_after_is_honoured_up_to_backoff_max() {
    within(60, "test", async {
        let attempts = Attempts::default();
        let a = attempts.clone();
        let fake = FakeUpstream::with_handler(move |req, _ctx| {
            let n = a.next(&req);
            async move {
                if n == 1 {
                    let wait = if req.uri().path() == "/short" { "1" } else { "30" };
                    Ok(Response::builder()
                        .status(503)
                        .header("retry-after", wait)
                        .body(full("busy"))
                        .expect("response"))
                } else {
                    Ok(reply::ok())
                }
            }
        })
        .await;
        // Jitter alone would wait at most 1 ms.
        let routes = format!(
            "{}{}",
            route(
                "short",
                "/short",
                "app",
                "    retries: {max_attempts: 2, on: [503], backoff: {base: 1ms, max: 5s}}\n",
            ),
            route(
                "capped",
                "/capped",
                "app",
                "    retries: {max_attempts: 2, on: [503], backoff: {base: 1ms, max: 300ms}}\n    timeouts: {request: 60s}\n",
            )
        );
        let h = ProxyHarness::start(&yaml_with(
            "",
            &upstream_yaml("app", fake.addr(), ""),
            &routes,
        ))
        .await;
        let s = get_id(&h, "/short", "rid-ra-short").await;
        assert_eq!(s.status, StatusCode::OK, "{s:?}");
        assert_eq!(fake.hits_for_request_id("rid-ra-short"), 2);
        assert!(
            s.elapsed >= Duration::from_secs(1),
            "Retry-After: 1 not honoured: retried after {:?}",
            s.elapsed
        );
        let s = get_id(&h, "/capped", "rid-ra-capped").await;
        assert_eq!(s.status, StatusCode::OK, "{s:?}");
        assert_eq!(fake.hits_for_request_id("rid-ra-capped"), 2);
        assert!(
            s.elapsed >= Duration::from_millis(300),
            "retried before backoff.max although Retry-After asked for more: {:?}",
            s.elapsed
        );
        assert!(
            s.elapsed < Duration::from_secs(15),
            "Retry-After: 30 not capped at backoff.max (300ms): {:?}",
            s.elapsed
        );
    })
    .await
}

// ---------------------------------------------------------------------------
// Retry budget
// ---------------------------------------------------------------------------

/// With no per-second floor, retries add at most `ratio` extra load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_caps_extra_load_at_the_ratio() {
    within(90, "test", async {
        let fake = FakeUpstream::status(503).await;
        let routes = route(
            "r",
            "/",
            "app",
            "    retries: {max_attempts: 3, on: [503], backoff: {base: 1ms, max: 2ms}, budget: {ratio: 0.5, min_per_second: 0}}\n",
        );
        let h = ProxyHarness::start(&yaml_with(
            "",
            &upstream_yaml("app", fake.addr(), ""),
            &routes,
        ))
        .await;
        const N: u64 = 40;
        for _ in 0..N {
            assert_eq!(get(&h, "/x").await.status, StatusCode::SERVICE_UNAVAILABLE);
        }
        let hits = fake.hits();
        assert!(
            hits <= N + N / 2,
            "{hits} upstream hits for {N} requests: more than {N} x (1 + 0.5)"
        );
        assert!(
            hits >= N + N / 2 - 2,
            "the budget should have allowed ~{} retries, saw {}",
            N / 2,
            hits - N
        );
        assert_eq!(
            metric(
                &h,
                "spillway_retries_total",
                &[("route", "r"), ("cause", "503")]
            )
            .await,
            (hits - N) as f64
        );
        assert!(
            metric(&h, "spillway_retry_budget_exhausted_total", &[("route", "r")]).await >= 1.0,
            "budget exhaustion not counted"
        );
    })
    .await
}

/// The issue's bound: against an always-failing upstream, total upstream hits
/// <= requests x (1 + ratio) + min_per_second x seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_bounds_hits_by_ratio_plus_min_per_second() {
    within(90, "test", async {
        let fake = FakeUpstream::status(503).await;
        let routes = route(
            "r",
            "/",
            "app",
            "    retries: {max_attempts: 3, on: [503], backoff: {base: 1ms, max: 2ms}, budget: {ratio: 0.2, min_per_second: 5}}\n",
        );
        let h = ProxyHarness::start(&yaml_with(
            "",
            &upstream_yaml("app", fake.addr(), ""),
            &routes,
        ))
        .await;
        const N: u64 = 100;
        let began = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..4 {
            let (client, url) = (h.h1().clone(), h.url(&format!("/w{w}")));
            tasks.spawn(async move {
                for _ in 0..N / 4 {
                    let s = get_seen(client.clone(), url.clone()).await;
                    assert_eq!(s.status, StatusCode::SERVICE_UNAVAILABLE);
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.expect("worker");
        }
        // Whole seconds, rounded up, plus one for a bucket boundary.
        let seconds = began.elapsed().as_secs() + 2;
        let hits = fake.hits();
        let bound = (N as f64 * 1.2 + 5.0 * seconds as f64).floor() as u64;
        assert!(
            hits > N,
            "no retry at all: the budget should allow some ({hits} hits)"
        );
        assert!(
            hits <= bound,
            "{hits} upstream hits for {N} requests over ~{seconds}s: more than \
             {N} x 1.2 + 5/s x {seconds}s = {bound} (retries: {})",
            hits - N
        );
    })
    .await
}

// ---------------------------------------------------------------------------
// Circuit breaker
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_after_threshold_and_fails_fast() {
    within(60, "test", async {
        let fake = FakeUpstream::status(503).await;
        let upstreams = upstream_yaml(
            "app",
            fake.addr(),
            "    circuit_breaker: {failure_threshold: 3, recovery_timeout: 30s, half_open_calls: 1}\n",
        );
        let h = ProxyHarness::start(&yaml_with(
            "",
            &upstreams,
            &route("r", "/", "app", ""),
        ))
        .await;
        for i in 0..3 {
            let s = get(&h, "/x").await;
            assert_eq!(s.status, StatusCode::SERVICE_UNAVAILABLE, "{i}");
            assert_eq!(s.reason, None, "attempt {i} must reach the upstream");
        }
        assert_eq!(fake.hits(), 3);
        wait_breaker(&h, "app", "open").await;

        let mut latencies = Vec::new();
        for _ in 0..20 {
            let s = get(&h, "/x").await;
            assert_eq!(s.status, StatusCode::SERVICE_UNAVAILABLE, "{s:?}");
            assert_eq!(s.reason.as_deref(), Some("breaker_open"));
            let ra: u64 = s
                .retry_after
                .as_deref()
                .expect("Retry-After")
                .parse()
                .expect("Retry-After in seconds");
            assert!((1..=30).contains(&ra), "Retry-After {ra}: time left open");
            latencies.push(s.elapsed);
        }
        assert_eq!(fake.hits(), 3, "no request may reach an open breaker's upstream");
        latencies.sort();
        assert!(
            latencies[latencies.len() / 2] < Duration::from_millis(100),
            "fail-fast replies are slow: {latencies:?}"
        );

        let m = h.metrics().await;
        assert_eq!(
            m.value(
                "spillway_circuit_state",
                &[("upstream", "app"), ("state", "open")]
            ),
            Some(1.0)
        );
        assert_eq!(
            m.value(
                "spillway_circuit_state",
                &[("upstream", "app"), ("state", "closed")]
            ),
            Some(0.0)
        );
        assert_eq!(
            m.value(
                "spillway_circuit_transitions_total",
                &[("upstream", "app"), ("to", "open")]
            ),
            Some(1.0)
        );
        assert_eq!(
            m.value(
                "spillway_rejections_total",
                &[("route", "r"), ("reason", "breaker_open")]
            ),
            Some(20.0)
        );
        assert_eq!(
            m.value(
                "spillway_requests_total",
                &[
                    ("route", "r"),
                    ("status_class", "5xx"),
                    ("reason", "breaker_open")
                ]
            ),
            Some(20.0)
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_half_open_allows_exactly_the_probes_then_closes() {
    within(90, "test", async {
        let failing = Arc::new(AtomicBool::new(true));
        let gate = Gate::new();
        let (f, g) = (failing.clone(), gate.clone());
        let fake = FakeUpstream::with_handler(move |_req, _ctx| {
            let (f, g) = (f.clone(), g.clone());
            async move {
                if f.load(Ordering::SeqCst) {
                    return Ok(reply::status_body(503, "down"));
                }
                g.pass().await;
                Ok(reply::ok())
            }
        })
        .await;
        let upstreams = upstream_yaml(
            "app",
            fake.addr(),
            "    circuit_breaker: {failure_threshold: 2, recovery_timeout: 300ms, half_open_calls: 2}\n",
        );
        let h = ProxyHarness::start(&yaml_with(
            "",
            &upstreams,
            &route("r", "/", "app", ""),
        ))
        .await;
        for _ in 0..2 {
            assert_eq!(get(&h, "/x").await.status, StatusCode::SERVICE_UNAVAILABLE);
        }
        let s = get(&h, "/x").await;
        assert_eq!(s.reason.as_deref(), Some("breaker_open"), "{s:?}");
        assert_eq!(fake.hits(), 2);

        // The upstream recovers (but holds requests, so probes stay in flight).
        failing.store(false, Ordering::SeqCst);
        wait_breaker(&h, "app", "half_open").await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        for i in 0..6 {
            spawn_get(&h, &format!("/probe/{i}"), &tx);
        }
        // Exactly two probes get through; the other four fail fast.
        for _ in 0..4 {
            let s = recv(&mut rx).await;
            assert_eq!(s.status, StatusCode::SERVICE_UNAVAILABLE, "{s:?}");
            assert_eq!(s.reason.as_deref(), Some("breaker_open"));
            assert!(s.retry_after.is_some());
        }
        fake.wait_until("two probes", |f| f.hits() == 4).await;
        assert_eq!(fake.hits(), 4, "half_open_calls is 2");
        assert_eq!(breaker_state(&h, "app").await, "half_open");

        // Both probes succeed: closed.
        gate.open();
        for _ in 0..2 {
            let s = recv(&mut rx).await;
            assert_eq!(s.status, StatusCode::OK, "{s:?}");
        }
        wait_breaker(&h, "app", "closed").await;
        for _ in 0..5 {
            assert_eq!(get(&h, "/after").await.status, StatusCode::OK);
        }
        assert_eq!(fake.hits(), 9);
        let m = h.metrics().await;
        for (to, n) in [("open", 1.0), ("half_open", 1.0), ("closed", 1.0)] {
            assert_eq!(
                m.value(
                    "spillway_circuit_transitions_total",
                    &[("upstream", "app"), ("to", to)]
                ),
                Some(n),
                "transitions to {to}"
            );
        }
        assert_eq!(
            m.value(
                "spillway_circuit_state",
                &[("upstream", "app"), ("state", "closed")]
            ),
            Some(1.0)
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_failed_probe_reopens() {
    within(60, "test", async {
        let fake = FakeUpstream::status(500).await;
        let upstreams = upstream_yaml(
            "app",
            fake.addr(),
            "    circuit_breaker: {failure_threshold: 1, recovery_timeout: 300ms, half_open_calls: 1}\n",
        );
        let h = ProxyHarness::start(&yaml_with(
            "",
            &upstreams,
            &route("r", "/", "app", ""),
        ))
        .await;
        assert_eq!(get(&h, "/x").await.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(get(&h, "/x").await.reason.as_deref(), Some("breaker_open"));
        wait_breaker(&h, "app", "half_open").await;
        // The probe fails: open again at once.
        let probe = get(&h, "/x").await;
        assert_eq!(probe.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(probe.reason, None, "the probe reached the upstream");
        let s = get(&h, "/x").await;
        assert_eq!(s.reason.as_deref(), Some("breaker_open"), "{s:?}");
        assert_eq!(fake.hits(), 2);
        assert_eq!(
            metric(
                &h,
                "spillway_circuit_transitions_total",
                &[("upstream", "app"), ("to", "open")]
            )
            .await,
            2.0
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_is_served_while_the_breaker_is_open() {
    within(60, "test", async {
        let fake = FakeUpstream::status(500).await;
        let upstreams = upstream_yaml(
            "app",
            fake.addr(),
            "    circuit_breaker: {failure_threshold: 1, recovery_timeout: 30s}\n",
        );
        let routes = route(
            "r",
            "/",
            "app",
            "    fallback:\n      status: 200\n      headers: {x-mode: degraded}\n      body: \"cached answer\"\n",
        );
        let h = ProxyHarness::start(&yaml_with("", &upstreams, &routes)).await;
        // The upstream's own failure passes through (fallbacks replace local replies only).
        let s = get(&h, "/x").await;
        assert_eq!(s.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(s.reason, None);
        for _ in 0..3 {
            let s = get(&h, "/x").await;
            assert_eq!(s.status, StatusCode::OK, "{s:?}");
            assert_eq!(s.reason.as_deref(), Some("breaker_open"));
            assert_eq!(header_str(&s.headers, "x-mode"), Some("degraded"));
            assert_eq!(&s.body[..], b"cached answer");
        }
        assert_eq!(fake.hits(), 1);
        assert_eq!(
            metric(
                &h,
                "spillway_rejections_total",
                &[("route", "r"), ("reason", "breaker_open")]
            )
            .await,
            3.0
        );
    })
    .await
}

/// Retries never go to an upstream whose breaker is open: a retrying route
/// stops at the attempt that opened it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_when_the_breaker_opens() {
    within(60, "test", async {
        let fake = FakeUpstream::status(503).await;
        let upstreams = upstream_yaml(
            "app",
            fake.addr(),
            "    circuit_breaker: {failure_threshold: 2, recovery_timeout: 30s}\n",
        );
        let routes = route(
            "r",
            "/",
            "app",
            "    retries: {max_attempts: 5, on: [503], backoff: {base: 1ms, max: 5ms}}\n",
        );
        let h = ProxyHarness::start(&yaml_with("", &upstreams, &routes)).await;
        let s = get(&h, "/x").await;
        assert_eq!(s.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            fake.hits(),
            2,
            "attempts after the breaker opened reached the upstream"
        );
        wait_breaker(&h, "app", "open").await;
    })
    .await
}
