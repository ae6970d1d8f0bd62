//! Chaos scenarios: a fault-injecting relay (`support::chaos::ChaosRelay`)
//! between Spillway and the upstream, or between the client and Spillway.
//! After every scenario the invariants hold: nothing left in flight or
//! queued, no socket left open, no non-idempotent request sent twice, every
//! response complete or visibly cut short (never a wrong body), and the
//! blame where the fault was: upstream-side faults count against the upstream
//! and open its breaker, client-side faults never do (docs/architecture.md,
//! "Failures and blame").
//!
//! The scenarios run one at a time (a process-wide lock): the socket count
//! of this process is one of the invariants.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use support::chaos::{ChaosRelay, Dir, Faults};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Faults per scenario: more than the breaker's threshold (3).
const REPEAT: usize = 5;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Open sockets of this process (runtimes' epoll and event fds excluded, so
/// the count is not disturbed by the other tests' runtimes waiting on `SERIAL`).
fn open_sockets() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}

/// The upstream `app` (breaker after `threshold` failures, `pool` lines) and
/// one route `all` with `route_extra` lines (indented 4 spaces).
fn config(upstream: SocketAddr, threshold: u32, pool: &str, route_extra: &str) -> String {
    let ups = upstream_yaml(
        "app",
        upstream,
        &format!(
            "{pool}    circuit_breaker:\n      failure_threshold: {threshold}\n      recovery_timeout: 30s\n"
        ),
    );
    let routes = route_yaml("all", "      path_prefix: /", "app", route_extra);
    yaml_with("", &ups, &routes)
}

/// Pooling off: every upstream connection closes after its exchange, so the
/// socket count after a scenario is the count before it.
const NO_POOL: &str = "    pool:\n      max_idle_per_endpoint: 0\n";

/// A started scenario: the baseline to come back to.
struct Baseline {
    sockets: usize,
}

impl Baseline {
    /// Takes the baseline once the proxy, upstream and relays are up (and
    /// the harness' admin connection is open).
    async fn take(h: &ProxyHarness) -> Baseline {
        let _ = h.metrics().await;
        Baseline {
            sockets: open_sockets(),
        }
    }

    /// Waits until nothing is in flight or queued and every socket opened
    /// since the baseline is closed again.
    async fn settle(&self, h: &ProxyHarness, relays: &[&ChaosRelay]) {
        for r in relays {
            within(30, "relay connections closed", r.wait_idle()).await;
        }
        within(30, "in-flight and queue depth back to 0", async {
            loop {
                let m = h.metrics().await;
                let in_flight = m.value("spillway_in_flight", &[("route", "all")]);
                let queued = m.value("spillway_queue_depth", &[("route", "all")]);
                let global = m.value("spillway_global_in_flight", &[]);
                if in_flight == Some(0.0) && queued == Some(0.0) && global == Some(0.0) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let now = open_sockets();
            if now <= self.sockets {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "sockets leaked: {} before the scenario, {now} after",
                    self.sockets
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Requests the route has answered (every status and reason).
async fn answered(h: &ProxyHarness) -> usize {
    metric(h, "spillway_requests_total", &[("route", "all")]).await as usize
}

async fn wait_answered(h: &ProxyHarness, n: usize) {
    within(30, &format!("{n} requests answered"), async {
        while answered(h).await < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

async fn assert_breaker_open(h: &ProxyHarness, client: &HttpClient, base: &str) {
    let resp = client
        .request(
            Request::get(format!("{base}/after"))
                .body(empty())
                .expect("req"),
        )
        .await
        .expect("request");
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        header_str(resp.headers(), "x-spillway-reason"),
        Some("breaker_open")
    );
    let _ = resp.into_body().collect().await;
    assert_eq!(
        metric(
            h,
            "spillway_circuit_state",
            &[("upstream", "app"), ("state", "open")]
        )
        .await,
        1.0
    );
}

/// Status and reason of a GET.
async fn get(client: &HttpClient, url: String) -> (StatusCode, Option<String>) {
    let resp = within(
        30,
        "response",
        client.request(Request::get(url).body(empty()).expect("req")),
    )
    .await
    .expect("request through the proxy");
    let status = resp.status();
    let reason = header_str(resp.headers(), "x-spillway-reason").map(str::to_owned);
    let _ = resp.into_body().collect().await;
    (status, reason)
}

/// Status and reason of a request with method `method`, id `id` and a small body.
async fn send_with_id(
    client: &HttpClient,
    method: &str,
    url: String,
    id: &str,
    extra: Option<(&str, &str)>,
) -> (StatusCode, Option<String>) {
    let mut b = Request::builder()
        .method(method)
        .uri(url)
        .header("x-request-id", id);
    if let Some((k, v)) = extra {
        b = b.header(k, v);
    }
    let req = b.body(full(Bytes::from_static(b"payload"))).expect("req");
    let resp = within(30, "response", client.request(req))
        .await
        .expect("request through the proxy");
    let status = resp.status();
    let reason = header_str(resp.headers(), "x-spillway-reason").map(str::to_owned);
    let _ = resp.into_body().collect().await;
    (status, reason)
}

// ===========================================================================
// Faults on the upstream side
// ===========================================================================

#[tokio::test]
async fn upstream_resets_inside_the_response_head_open_the_breaker() {
    let _serial = SERIAL.lock().await;
    let up = FakeUpstream::ok().await;
    let relay = ChaosRelay::start(up.addr()).await;
    // "HTTP/1.1 200" and then a reset.
    relay.set(Dir::Down, Faults::reset_after(12));
    let h = ProxyHarness::start(&config(relay.addr(), 3, NO_POOL, "")).await;
    let base = Baseline::take(&h).await;
    let client = h1_client();
    for _ in 0..3 {
        let (status, reason) = get(&client, h.url("/x")).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(reason.as_deref(), Some("upstream_reset"));
    }
    assert_breaker_open(&h, &client, &format!("http://{}", h.addr())).await;
    assert_eq!(up.hits(), 3, "the breaker let more requests through");
    assert_eq!(
        metric(
            &h,
            "spillway_upstream_requests_total",
            &[("upstream", "app"), ("outcome", "reset")]
        )
        .await,
        3.0
    );
    drop(client);
    base.settle(&h, &[&relay]).await;
    up.assert_healthy();
}

#[tokio::test]
async fn a_blackholed_upstream_times_out_and_opens_the_breaker() {
    let _serial = SERIAL.lock().await;
    let up = FakeUpstream::ok().await;
    let relay = ChaosRelay::start(up.addr()).await;
    // Accepted, read, never forwarded, never answered.
    relay.set(Dir::Up, Faults::blackhole());
    let h = ProxyHarness::start(&config(
        relay.addr(),
        3,
        NO_POOL,
        "    timeouts:\n      per_try: 200ms\n",
    ))
    .await;
    let base = Baseline::take(&h).await;
    let client = h1_client();
    for _ in 0..3 {
        let (status, reason) = get(&client, h.url("/x")).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(reason.as_deref(), Some("upstream_timeout"));
    }
    assert_breaker_open(&h, &client, &format!("http://{}", h.addr())).await;
    assert_eq!(up.hits(), 0);
    assert!(relay.dropped(Dir::Up) > 0, "the relay saw no request bytes");
    drop(client);
    base.settle(&h, &[&relay]).await;
}

/// Retries on (every cause), the breaker out of the way: requests whose
/// response is reset or never comes are retried only when that is safe.
#[tokio::test]
async fn non_idempotent_requests_are_never_sent_twice() {
    let _serial = SERIAL.lock().await;
    let up = FakeUpstream::ok().await;
    let relay = ChaosRelay::start(up.addr()).await;
    let h = ProxyHarness::start(&config(
        relay.addr(),
        1000,
        NO_POOL,
        "    timeouts:\n      per_try: 300ms\n    retries:\n      max_attempts: 3\n      on: [connect, reset, timeout, 5xx]\n      backoff: { base: 1ms, max: 5ms }\n      budget: { ratio: 1.0, min_per_second: 100 }\n      idempotency_key_header: idempotency-key\n",
    ))
    .await;
    let base = Baseline::take(&h).await;
    let client = h1_client();
    for (fault, name) in [
        (Faults::reset_after(12), "reset"),
        (Faults::blackhole(), "blackhole"),
    ] {
        // The request reaches the upstream, its response breaks or never comes.
        relay.set(Dir::Down, fault);
        for i in 0..REPEAT {
            let id = format!("{name}-post-{i}");
            let (status, _) = send_with_id(&client, "POST", h.url("/p"), &id, None).await;
            assert!(status.is_server_error(), "{id}: {status}");
            up.wait_until(&id, |u| u.hits_for_request_id(&id) >= 1)
                .await;
            assert_eq!(up.hits_for_request_id(&id), 1, "{id} was sent twice");
        }
        // The controls: safe requests are retried through the same fault.
        for (method, key) in [
            ("GET", None),
            ("PUT", None),
            ("POST", Some(("idempotency-key", "k"))),
        ] {
            let id = format!("{name}-{method}-{}", key.is_some());
            let (status, _) = send_with_id(&client, method, h.url("/p"), &id, key).await;
            assert!(status.is_server_error(), "{id}: {status}");
            assert_eq!(up.hits_for_request_id(&id), 3, "{id}: not retried");
        }
    }
    relay.heal();
    let (status, _) = send_with_id(&client, "POST", h.url("/p"), "healed", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(up.hits_for_request_id("healed"), 1);
    drop(client);
    base.settle(&h, &[&relay]).await;
    up.assert_healthy();
}

#[tokio::test]
async fn connections_reset_with_requests_at_the_upstream_retry_only_safe_ones() {
    let _serial = SERIAL.lock().await;
    let up = FakeUpstream::builder()
        .delay(Duration::from_millis(500))
        .start()
        .await;
    let relay = ChaosRelay::start(up.addr()).await;
    let h = ProxyHarness::start(&config(
        relay.addr(),
        1000,
        NO_POOL,
        "    retries:\n      max_attempts: 2\n      on: [reset]\n      backoff: { base: 1ms, max: 5ms }\n      budget: { ratio: 1.0, min_per_second: 100 }\n",
    ))
    .await;
    let base = Baseline::take(&h).await;
    let client = h1_client();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (client, url) = (client.clone(), h.url("/slow"));
        let (method, id) = if i % 2 == 0 {
            ("GET", format!("get-{i}"))
        } else {
            ("POST", format!("post-{i}"))
        };
        tasks.push(tokio::spawn(async move {
            let seen = send_with_id(&client, method, url, &id, None).await;
            (id, seen)
        }));
    }
    // All eight are at the upstream, waiting for their response.
    up.wait_until("8 requests at the upstream", |u| u.current() == 8)
        .await;
    relay.reset_all();
    for t in tasks {
        let (id, (status, reason)) = within(30, "a client", t).await.expect("client task");
        if id.starts_with("post") {
            assert_eq!(status, StatusCode::BAD_GATEWAY, "{id}");
            assert_eq!(reason.as_deref(), Some("upstream_reset"), "{id}");
            assert_eq!(up.hits_for_request_id(&id), 1, "{id} was sent twice");
        } else {
            assert_eq!(status, StatusCode::OK, "{id}: {reason:?}");
            assert_eq!(up.hits_for_request_id(&id), 2, "{id}: not retried once");
        }
    }
    assert_eq!(
        metric(&h, "spillway_retries_total", &[("route", "all")]).await,
        4.0
    );
    drop(client);
    base.settle(&h, &[&relay]).await;
    up.assert_healthy();
}

#[tokio::test]
async fn pooled_connections_reset_by_the_network_are_never_a_failure() {
    let _serial = SERIAL.lock().await;
    let up = FakeUpstream::ok().await;
    let relay = ChaosRelay::start(up.addr()).await;
    // Pooled, closed by the reaper a second after their last use.
    let pool = "    pool:\n      idle_timeout: 1s\n";
    let h = ProxyHarness::start(&config(relay.addr(), 3, pool, "")).await;
    let base = Baseline::take(&h).await;
    let client = h1_client();
    for round in 0..REPEAT {
        for i in 0..3 {
            let (status, _) = get(&client, h.url(&format!("/warm/{round}/{i}"))).await;
            assert_eq!(status, StatusCode::OK);
        }
        assert!(relay.open() >= 1, "no pooled upstream connection");
        relay.reset_all();
        relay.wait_idle().await;
        // The pooled connection is dead: a POST (not retryable once sent)
        // must still get through, exactly once.
        let id = format!("after-reset-{round}");
        let (status, reason) = send_with_id(&client, "POST", h.url("/p"), &id, None).await;
        assert_eq!(status, StatusCode::OK, "{id}: {reason:?}");
        assert_eq!(up.hits_for_request_id(&id), 1);
    }
    assert_not_blamed_on_the_upstream(&h).await;
    drop(client);
    base.settle(&h, &[&relay]).await;
    up.assert_healthy();
}

/// Reads a response body, checking it against the pattern; returns the
/// bytes verified and whether the body ended cleanly.
async fn read_pattern(resp: http::Response<hyper::body::Incoming>) -> (u64, bool) {
    let mut body = resp.into_body();
    let mut v = PatternVerifier::new(false);
    loop {
        match within(30, "response body", body.frame()).await {
            None => return (v.len(), true),
            Some(Err(_)) => return (v.len(), false),
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    v.feed(data);
                }
            }
        }
    }
}

#[tokio::test]
async fn upstream_bodies_cut_short_are_visibly_truncated() {
    let _serial = SERIAL.lock().await;
    const LEN: u64 = 512 * 1024;
    let up = FakeUpstream::with_handler(|req, _ctx| async move {
        let body = if req.uri().path() == "/sized" {
            PatternBody::sized(LEN)
        } else {
            PatternBody::chunked(LEN)
        };
        Ok(http::Response::new(body.boxed()))
    })
    .await;
    let relay = ChaosRelay::start(up.addr()).await;
    let h = ProxyHarness::start(&config(
        relay.addr(),
        3,
        NO_POOL,
        "    timeouts:\n      response_body_idle: 2s\n",
    ))
    .await;
    let base = Baseline::take(&h).await;
    let (h1, h2) = (h1_client(), h2c_client());
    for fault in [
        Faults::reset_after(100_000),
        Faults::half_close_after(100_000),
    ] {
        relay.set(Dir::Down, fault);
        for path in ["/sized", "/chunked"] {
            for (client, version) in [(&h1, http::Version::HTTP_11), (&h2, http::Version::HTTP_2)] {
                let what = format!("{fault:?} {path} {version:?}");
                let mut req = Request::get(h.url(path)).body(empty()).expect("req");
                *req.version_mut() = version;
                let resp = match within(30, "response head", client.request(req)).await {
                    Ok(resp) => resp,
                    // HTTP/2: a stream reset that arrives with the head
                    // fails the response at once; visible all the same.
                    Err(e) if version == http::Version::HTTP_2 => {
                        eprintln!("{what}: {e}");
                        continue;
                    }
                    Err(e) => panic!("{what}: {e}"),
                };
                assert_eq!(resp.status(), StatusCode::OK, "{what}");
                if let Some(cl) = header_str(resp.headers(), "content-length") {
                    assert_eq!(cl, LEN.to_string(), "{what}: Content-Length changed");
                }
                let (got, clean) = read_pattern(resp).await;
                assert!(got < LEN, "{what}: {got} bytes of a body cut at 100000");
                assert!(!clean, "{what}: a truncated body ended as if complete");
            }
        }
    }
    // And healed, the same bodies arrive whole.
    relay.heal();
    for path in ["/sized", "/chunked"] {
        for client in [&h1, &h2] {
            let resp = client
                .request(Request::get(h.url(path)).body(empty()).expect("req"))
                .await
                .expect("response");
            assert_eq!(read_pattern(resp).await, (LEN, true), "{path}");
        }
    }
    drop((h1, h2));
    base.settle(&h, &[&relay]).await;
    up.assert_healthy();
}

// ===========================================================================
// Faults on the client side
// ===========================================================================

/// An upstream that reads the whole request body, then answers 200.
async fn reading_upstream() -> FakeUpstream {
    FakeUpstream::with_handler(|req, _ctx| async move {
        let _ = req.into_body().collect().await;
        Ok(reply::ok())
    })
    .await
}

const UPLOAD: usize = 1024 * 1024;

/// Writes a POST head announcing `UPLOAD` bytes and as much of the body as
/// the connection takes, then waits for the connection to end.
async fn upload_through(relay: &ChaosRelay, id: &str) {
    let mut s = TcpStream::connect(relay.addr()).await.expect("connect");
    let head = format!(
        "POST /up HTTP/1.1\r\nhost: test\r\nx-request-id: {id}\r\ncontent-length: {UPLOAD}\r\n\r\n"
    );
    if s.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let chunk = vec![b'u'; 16 * 1024];
    for _ in 0..UPLOAD / chunk.len() {
        if s.write_all(&chunk).await.is_err() {
            break;
        }
    }
    let mut raw = RawConn::from_stream(s);
    within(30, "the connection to end", raw.closed()).await;
}

#[tokio::test]
async fn clients_reset_mid_upload_are_never_the_upstreams_fault() {
    let _serial = SERIAL.lock().await;
    let up = reading_upstream().await;
    let h = ProxyHarness::start(&config(up.addr(), 3, NO_POOL, "")).await;
    let relay = ChaosRelay::start(h.addr()).await;
    relay.set(Dir::Up, Faults::reset_after(256 * 1024));
    let base = Baseline::take(&h).await;
    for i in 0..REPEAT {
        upload_through(&relay, &format!("h1-{i}")).await;
        wait_answered(&h, i + 1).await;
    }
    // HTTP/2: the client's connection is reset while a stream uploads.
    for i in 0..REPEAT {
        let tcp = TcpStream::connect(relay.addr()).await.expect("connect");
        let (mut client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
        let driver = tokio::spawn(conn);
        let req = Request::post(format!("http://{}/up", h.addr()))
            .header("content-length", UPLOAD.to_string())
            .header("x-request-id", format!("h2-{i}"))
            .body(())
            .expect("request");
        let (resp, mut body) = client.send_request(req, false).expect("send_request");
        let chunk = Bytes::from(vec![b'v'; 16 * 1024]);
        for _ in 0..UPLOAD / chunk.len() {
            body.reserve_capacity(chunk.len());
            let cap = within(
                30,
                "send capacity",
                std::future::poll_fn(|cx| body.poll_capacity(cx)),
            )
            .await;
            if !matches!(cap, Some(Ok(_))) || body.send_data(chunk.clone(), false).is_err() {
                break;
            }
        }
        let _ = within(30, "h2 response or error", resp).await;
        let _ = within(30, "h2 connection end", driver).await;
        wait_answered(&h, REPEAT + i + 1).await;
    }
    assert!(up.hits() <= 2 * REPEAT as u64);
    assert_not_blamed_on_the_upstream(&h).await;
    base.settle(&h, &[&relay]).await;
    up.assert_healthy();
}

#[tokio::test]
async fn clients_half_closing_are_never_the_upstreams_fault() {
    let _serial = SERIAL.lock().await;
    let up = reading_upstream().await;
    let h = ProxyHarness::start(&config(up.addr(), 3, NO_POOL, "")).await;
    let relay = ChaosRelay::start(h.addr()).await;
    let base = Baseline::take(&h).await;
    // The client's FIN arrives in the middle of its body.
    relay.set(Dir::Up, Faults::half_close_after(256 * 1024));
    for i in 0..REPEAT {
        upload_through(&relay, &format!("mid-{i}")).await;
        wait_answered(&h, i + 1).await;
    }
    // ... or right after a complete request: it is answered in full, or
    // not at all, never with a wrong body.
    let request = b"GET /whole HTTP/1.1\r\nhost: test\r\n\r\n";
    relay.set(Dir::Up, Faults::half_close_after(request.len() as u64));
    for _ in 0..REPEAT {
        let mut raw = RawConn::connect(relay.addr()).await;
        raw.send(request).await;
        match within(30, "response or close", raw.read_outcome()).await {
            RawOutcome::Response(resp) => {
                assert_eq!(resp.status, 200);
                assert_eq!(raw.read_body(&resp).await, b"ok");
            }
            RawOutcome::Closed { partial, .. } => {
                assert!(partial.is_empty(), "half a response head: {partial:?}")
            }
        }
        within(30, "close", raw.closed()).await;
    }
    assert_not_blamed_on_the_upstream(&h).await;
    base.settle(&h, &[&relay]).await;
    up.assert_healthy();
}

#[tokio::test]
async fn starved_clients_and_slow_links_are_served_whole_and_never_blamed() {
    let _serial = SERIAL.lock().await;
    const LEN: u64 = 160 * 1024;
    let up = FakeUpstream::echo().await;
    let up_relay = ChaosRelay::start(up.addr()).await;
    up_relay.set(Dir::Up, Faults::latency(Duration::from_millis(5)));
    up_relay.set(Dir::Down, Faults::latency(Duration::from_millis(5)));
    let h = ProxyHarness::start(&config(
        up_relay.addr(),
        3,
        NO_POOL,
        "    timeouts:\n      per_try: 2s\n      response_body_idle: 1s\n",
    ))
    .await;
    let relay = ChaosRelay::start(h.addr()).await;
    // About a second each way; data moves every 20 ms, so nothing is idle.
    relay.set(Dir::Up, Faults::bandwidth(160 * 1024));
    relay.set(Dir::Down, Faults::bandwidth(160 * 1024));
    let base = Baseline::take(&h).await;
    let (h1, h2) = (h1_client(), h2c_client());
    for (client, version) in [(&h1, http::Version::HTTP_11), (&h2, http::Version::HTTP_2)] {
        for sized in [true, false] {
            let body = if sized {
                PatternBody::sized(LEN)
            } else {
                PatternBody::chunked(LEN)
            };
            let mut req = Request::post(format!("http://{}/echo", relay.addr()))
                .body(body.boxed())
                .expect("req");
            *req.version_mut() = version;
            let resp = within(60, "echo head", client.request(req))
                .await
                .expect("echo");
            assert_eq!(resp.status(), StatusCode::OK, "{version:?} sized={sized}");
            assert_eq!(
                within(60, "echo body", read_pattern(resp)).await,
                (LEN, true),
                "{version:?} sized={sized}"
            );
        }
    }
    assert!(relay.bytes(Dir::Down) >= 4 * LEN);
    assert_not_blamed_on_the_upstream(&h).await;
    drop((h1, h2));
    base.settle(&h, &[&relay, &up_relay]).await;
    up.assert_healthy();
}
