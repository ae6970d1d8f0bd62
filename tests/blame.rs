//! Blame goes where the fault is: client faults (aborted, reset, malformed or
//! stalled uploads; clients leaving while their request is at the upstream)
//! are the client's. Repeated more often than the breaker's threshold, none
//! of them may open the breaker, count an `upstream_*` reason, retry, or
//! leave anything in flight; the upstream attempt counts `cancelled`. The
//! control: real upstream failures still open it.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Faults per scenario: more than the breaker's threshold (3).
const REPEAT: usize = 5;

/// An upstream that reads the whole request body, then answers 200.
async fn reading_upstream() -> FakeUpstream {
    FakeUpstream::with_handler(|req, _ctx| async move {
        let _ = req.into_body().collect().await;
        Ok(reply::ok())
    })
    .await
}

/// Two routes to one upstream whose breaker opens after 3 failures:
/// `/stream` streams bodies (no retries), `/replay` buffers small bodies for
/// retries (3 attempts, every retryable cause).
fn config(upstream: SocketAddr, extra_route: &str) -> String {
    let ups = upstream_yaml(
        "app",
        upstream,
        "    circuit_breaker:\n      failure_threshold: 3\n      recovery_timeout: 30s\n",
    );
    let routes = format!(
        "{}{}",
        route_yaml(
            "stream",
            "      path_prefix: /stream",
            "app",
            &format!("    timeouts:\n      response_body_idle: 400ms\n{extra_route}"),
        ),
        route_yaml(
            "replay",
            "      path_prefix: /replay",
            "app",
            "    timeouts:\n      response_body_idle: 400ms\n    retries:\n      max_attempts: 3\n      backoff: { base: 1ms, max: 5ms }\n      budget: { ratio: 1.0, min_per_second: 100 }\n",
        ),
    );
    yaml_with("", &ups, &routes)
}

/// Waits until the route has answered `n` requests with `reason`.
async fn wait_reason(h: &ProxyHarness, route: &str, reason: &str, n: usize) {
    within(30, &format!("{n} x {reason} on {route}"), async {
        loop {
            let v = metric(
                h,
                "spillway_requests_total",
                &[("route", route), ("reason", reason)],
            )
            .await;
            if v as usize >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// The invariants after a client-fault scenario.
async fn assert_clients_blamed(h: &ProxyHarness, route: &str, attempts_cancelled: usize) {
    assert_not_blamed_on_the_upstream(h).await;
    let m = h.metrics().await;
    assert_eq!(
        m.value(
            "spillway_upstream_requests_total",
            &[("upstream", "app"), ("outcome", "cancelled")]
        )
        .unwrap_or(0.0) as usize,
        attempts_cancelled,
        "cancelled attempts:\n{}",
        m.text
    );
    assert_eq!(
        m.value("spillway_in_flight", &[("route", route)]),
        Some(0.0),
        "requests left in flight"
    );
    let resp = h.get("/stream/after").await;
    assert_eq!(resp.status(), StatusCode::OK);
}

/// Opens a raw connection and writes a request head plus `body`.
async fn upload(h: &ProxyHarness, head: &str, body: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(h.addr()).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("head");
    s.write_all(body).await.expect("body");
    s.flush().await.expect("flush");
    s
}

/// Closes with a TCP reset instead of a FIN.
fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

fn post_head(path: &str, framing: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nhost: test\r\n{framing}\r\n")
}

/// Sends `REPEAT` requests (`head` + `body`) that each reach the upstream,
/// then closes each connection, with a FIN and with a reset in turn, and
/// waits for each to be counted `client_abort`.
async fn leave_repeatedly(h: &ProxyHarness, up: &FakeUpstream, head: &str, body: &[u8]) {
    for i in 0..REPEAT {
        let s = upload(h, head, body).await;
        up.wait_hits(i as u64 + 1).await;
        if i % 2 == 0 {
            drop(s);
        } else {
            reset(s);
        }
        wait_reason(h, "stream", "client_abort", i + 1).await;
    }
}

#[tokio::test]
async fn aborted_large_uploads_are_the_clients() {
    let up = reading_upstream().await;
    let h = ProxyHarness::start(&config(up.addr(), "")).await;
    let head = post_head("/stream/up", "content-length: 4194304\r\n");
    leave_repeatedly(&h, &up, &head, &vec![b'x'; 256 * 1024]).await;
    assert_clients_blamed(&h, "stream", REPEAT).await;
}

#[tokio::test]
async fn aborted_chunked_uploads_are_the_clients() {
    let up = reading_upstream().await;
    let h = ProxyHarness::start(&config(up.addr(), "")).await;
    let mut chunks = Vec::new();
    for _ in 0..16 {
        chunks.extend_from_slice(b"4000\r\n");
        chunks.extend_from_slice(&[b'y'; 0x4000]);
        chunks.extend_from_slice(b"\r\n");
    }
    let head = post_head("/stream/up", "transfer-encoding: chunked\r\n");
    leave_repeatedly(&h, &up, &head, &chunks).await;
    assert_clients_blamed(&h, "stream", REPEAT).await;
}

#[tokio::test]
async fn malformed_chunk_sizes_are_bad_requests() {
    let up = reading_upstream().await;
    let h = ProxyHarness::start(&config(up.addr(), "")).await;
    for i in 0..REPEAT {
        let bad = if i % 2 == 0 {
            "zz\r\n"
        } else {
            "10000000000000000\r\n"
        };
        let head = post_head("/stream/up", "transfer-encoding: chunked\r\n");
        let mut body = b"5\r\nhello\r\n".to_vec();
        body.extend_from_slice(bad.as_bytes());
        let s = upload(&h, &head, &body).await;
        let mut raw = RawConn::from_stream(s);
        // The connection is still open for writing: the client is answered.
        let resp = within(30, "400", raw.read_response()).await;
        assert_eq!(resp.status, 400);
        assert_eq!(resp.header("x-spillway-reason"), Some("bad_request"));
        assert_eq!(resp.header("connection"), Some("close"));
        wait_reason(&h, "stream", "bad_request", i + 1).await;
    }
    assert_clients_blamed(&h, "stream", REPEAT).await;
}

#[tokio::test]
async fn short_bodies_then_close_are_client_aborts_streamed_and_buffered() {
    let up = reading_upstream().await;
    let h = ProxyHarness::start(&config(up.addr(), "")).await;
    let head = post_head("/stream/short", "content-length: 1000\r\n");
    leave_repeatedly(&h, &up, &head, b"0123456789").await;
    // Buffered for replay: the body is read before any attempt, so there is
    // no upstream attempt at all.
    for i in 0..REPEAT {
        let s = upload(
            &h,
            &post_head("/replay/short", "content-length: 1000\r\n"),
            b"0123456789",
        )
        .await;
        // The buffering read is in progress once the route has the request.
        within(30, "replay request admitted", async {
            loop {
                if metric(&h, "spillway_in_flight", &[("route", "replay")]).await >= 1.0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        drop(s);
        wait_reason(&h, "replay", "client_abort", i + 1).await;
    }
    assert_eq!(
        up.hits(),
        REPEAT as u64,
        "a short buffered body reached the upstream"
    );
    assert_clients_blamed(&h, "stream", REPEAT).await;
    assert_clients_blamed(&h, "replay", REPEAT).await;
}

fn route_of(path: &str) -> &'static str {
    if path.starts_with("/stream") {
        "stream"
    } else {
        "replay"
    }
}

#[tokio::test]
async fn stalled_bodies_are_client_timeouts() {
    let up = reading_upstream().await;
    let h = ProxyHarness::start(&config(up.addr(), "")).await;
    for (i, path) in ["/stream/stall", "/replay/stall"]
        .iter()
        .cycle()
        .take(REPEAT)
        .enumerate()
    {
        let s = upload(
            &h,
            &post_head(path, "content-length: 1000\r\n"),
            b"0123456789",
        )
        .await;
        let mut raw = RawConn::from_stream(s);
        let resp = within(30, "408", raw.read_response()).await;
        assert_eq!(resp.status, 408, "{path}");
        assert_eq!(resp.header("x-spillway-reason"), Some("client_timeout"));
        wait_reason(&h, route_of(path), "client_timeout", i / 2 + 1).await;
    }
    let stream_n = REPEAT.div_ceil(2);
    wait_reason(&h, "stream", "client_timeout", stream_n).await;
    wait_reason(&h, "replay", "client_timeout", REPEAT - stream_n).await;
    assert_eq!(
        metric(&h, "spillway_timeouts_total", &[("stage", "body")]).await as usize,
        REPEAT
    );
    assert_clients_blamed(&h, "stream", stream_n).await;
    assert_clients_blamed(&h, "replay", stream_n).await;
}

#[tokio::test]
async fn a_trickling_upload_past_the_per_try_timeout_is_the_clients() {
    // The upstream waits for the body; the client sends it too slowly for the
    // attempt's time. The upstream was never the slow one.
    let up = reading_upstream().await;
    let yaml = config(up.addr(), "").replace(
        "response_body_idle: 400ms\n",
        "response_body_idle: 10s\n      per_try: 300ms\n      request: 20s\n",
    );
    let h = ProxyHarness::start(&yaml).await;
    for i in 0..REPEAT {
        let s = upload(
            &h,
            &post_head("/stream/trickle", "content-length: 1000\r\n"),
            b"0123456789",
        )
        .await;
        let mut raw = RawConn::from_stream(s);
        let resp = within(30, "408", raw.read_response()).await;
        assert_eq!(resp.status, 408);
        assert_eq!(resp.header("x-spillway-reason"), Some("client_timeout"));
        wait_reason(&h, "stream", "client_timeout", i + 1).await;
    }
    assert_clients_blamed(&h, "stream", REPEAT).await;
}

#[tokio::test]
async fn clients_leaving_while_the_upstream_works_are_client_aborts() {
    let up = FakeUpstream::builder()
        .delay(Duration::from_secs(3))
        .start()
        .await;
    let h = ProxyHarness::start(&config(up.addr(), "")).await;
    leave_repeatedly(
        &h,
        &up,
        "GET /stream/slow HTTP/1.1\r\nhost: test\r\n\r\n",
        b"",
    )
    .await;
    assert_clients_blamed(&h, "stream", REPEAT).await;
}

#[tokio::test]
async fn http2_streams_reset_mid_upload_are_client_aborts() {
    let up = reading_upstream().await;
    let h = ProxyHarness::start(&config(up.addr(), "")).await;
    let tcp = TcpStream::connect(h.addr()).await.expect("connect");
    let (mut client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    for i in 0..REPEAT {
        let req = Request::post(format!("http://{}/stream/h2", h.addr()))
            .header("content-length", "4194304")
            .body(())
            .expect("request");
        let (resp, mut body) = client.send_request(req, false).expect("send_request");
        body.send_data(Bytes::from(vec![b'z'; 16 * 1024]), false)
            .expect("data");
        up.wait_hits(i as u64 + 1).await;
        body.send_reset(h2::Reason::CANCEL);
        drop(resp);
        wait_reason(&h, "stream", "client_abort", i + 1).await;
    }
    drop(client);
    driver.abort();
    assert_clients_blamed(&h, "stream", REPEAT).await;
}

// === the control: the upstream's own failures still count ===

async fn assert_breaker_opens(h: &ProxyHarness, path: &str) {
    for _ in 0..3 {
        let _ = h.get(path).await.into_body().collect().await;
    }
    let resp = h.get(path).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        header_str(resp.headers(), "x-spillway-reason"),
        Some("breaker_open")
    );
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

#[tokio::test]
async fn upstream_5xx_still_opens_the_breaker() {
    let up = FakeUpstream::status(503).await;
    let h = ProxyHarness::start(&config(up.addr(), "")).await;
    assert_breaker_opens(&h, "/stream/x").await;
}

#[tokio::test]
async fn upstream_resets_still_open_the_breaker() {
    let up = FakeUpstream::builder().reset().start().await;
    let h = ProxyHarness::start(&config(up.addr(), "")).await;
    assert_breaker_opens(&h, "/stream/x").await;
    assert!(
        metric(
            &h,
            "spillway_requests_total",
            &[("route", "stream"), ("reason", "upstream_reset")]
        )
        .await
            >= 3.0
    );
}

#[tokio::test]
async fn upstream_timeouts_still_open_the_breaker() {
    let up = FakeUpstream::builder()
        .delay(Duration::from_secs(5))
        .start()
        .await;
    let yaml = config(up.addr(), "").replace(
        "response_body_idle: 400ms\n",
        "response_body_idle: 400ms\n      per_try: 150ms\n",
    );
    let h = ProxyHarness::start(&yaml).await;
    assert_breaker_opens(&h, "/stream/x").await;
    assert!(
        metric(
            &h,
            "spillway_requests_total",
            &[("route", "stream"), ("reason", "upstream_timeout")]
        )
        .await
            >= 3.0
    );
}
