//! Black-box tests of admission control (docs/guide.md): per-route caps,
//! bounded queues with wait timeouts, shedding, the process-wide cap, fallbacks,
//! gRPC-shaped shed replies, adaptive LIFO and their metrics.
//!
//! Every test runs against real sockets on 127.0.0.1:0 and is bounded in time.
//! Nothing sleeps hoping for a state: upstream requests are held at a [`Gate`]
//! until the test opens it, and proxy state is awaited through `/status.json`
//! or `/metrics` with bounded polling.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use support::*;
use tokio::sync::mpsc;
use tokio::time::Instant;

// ---------------------------------------------------------------------------
// Helpers (this file's own; tests/support is shared and owned elsewhere)
// ---------------------------------------------------------------------------

/// A fake upstream that answers 200 "ok", holding requests to `held_prefix`
/// at `gate` first.
async fn gated_upstream(gate: &Gate, held_prefix: &'static str) -> FakeUpstream {
    let gate = gate.clone();
    FakeUpstream::with_handler(move |req, _ctx| {
        let gate = gate.clone();
        async move {
            if req.uri().path().starts_with(held_prefix) {
                gate.pass().await;
            }
            Ok(reply::ok())
        }
    })
    .await
}

/// One listener, one upstream `app`, and the given routes block.
fn config(upstream: std::net::SocketAddr, routes: &str) -> String {
    yaml_with("", &upstream_yaml("app", upstream, ""), routes)
}

/// A route `name` on `path_prefix` to `app` with `extra` lines (indented 4).
fn route(name: &str, prefix: &str, extra: &str) -> String {
    route_yaml(name, &format!("      path_prefix: {prefix}"), "app", extra)
}

/// `/status.json` entry of a route.
async fn route_status(h: &ProxyHarness, name: &str) -> serde_json::Value {
    let (status, _, text) = h.admin_get("/status.json").await;
    assert_eq!(status, StatusCode::OK, "/status.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("status.json is JSON");
    v["routes"]
        .as_array()
        .expect("routes array")
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("route {name} not in /status.json: {text}"))
        .clone()
}

/// Polls the route's `/status.json` entry until `pred` holds (bounded at 20 s).
async fn wait_route(
    h: &ProxyHarness,
    name: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = route_status(h, name).await;
        if pred(&r) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "route {name}: never saw {what}; last status: {r}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_queue_depth(h: &ProxyHarness, route: &str, depth: u64) {
    wait_route(h, route, &format!("queue_depth == {depth}"), |r| {
        r["queue_depth"] == depth
    })
    .await;
}

fn median(mut v: Vec<Duration>) -> Duration {
    assert!(!v.is_empty(), "median of nothing");
    v.sort();
    v[v.len() / 2]
}

// ---------------------------------------------------------------------------
// The cap
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_concurrency_never_exceeds_the_cap() {
    within(120, "test", async {
        let fake = FakeUpstream::builder()
            .delay(Duration::from_millis(40))
            .start()
            .await;
        let routes = route(
            "capped",
            "/",
            "    concurrency: {max_in_flight: 4}\n    queue: {max_depth: 200, max_wait: 20s}\n    timeouts: {request: 60s}\n",
        );
        let h = ProxyHarness::start(&config(fake.addr(), &routes)).await;

        // 48 clients at once, over HTTP/1.1 and HTTP/2, twice over.
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..96 {
            let (client, url) = if i % 2 == 0 {
                (h.h1().clone(), h.url(&format!("/work/{i}")))
            } else {
                (h.h2().clone(), h.url(&format!("/work/{i}")))
            };
            tasks.spawn(get_seen(client, url));
        }
        while let Some(seen) = tasks.join_next().await {
            let seen = seen.expect("client task");
            assert_eq!(seen.status, StatusCode::OK, "{seen:?}");
            assert_eq!(seen.reason, None);
        }
        assert_eq!(fake.hits(), 96);
        assert!(
            fake.peak() <= 4,
            "upstream saw {} requests at once; the cap is 4",
            fake.peak()
        );
        assert_eq!(fake.peak(), 4, "96 concurrent clients should fill the cap");

        // Everything is back to idle, and the queue was used.
        wait_route(&h, "capped", "idle", |r| {
            r["in_flight"] == 0 && r["queue_depth"] == 0
        })
        .await;
        let m = h.metrics().await;
        let peak = m
            .value("spillway_queue_depth_peak", &[("route", "capped")])
            .unwrap_or(0.0);
        assert!(peak >= 1.0, "queue was never used? peak {peak}");
        assert_eq!(
            m.value("spillway_concurrency_limit", &[("route", "capped")]),
            Some(4.0)
        );
        assert_eq!(
            m.value("spillway_queue_capacity", &[("route", "capped")]),
            Some(200.0)
        );
        assert_eq!(
            m.value("spillway_in_flight", &[("route", "capped")]),
            Some(0.0)
        );
        assert_eq!(
            m.value(
                "spillway_requests_total",
                &[("route", "capped"), ("reason", "upstream")]
            ),
            Some(96.0)
        );
        // Every admitted request observed its queue wait.
        assert_eq!(
            m.value(
                "spillway_queue_wait_seconds_count",
                &[("route", "capped")]
            ),
            Some(96.0)
        );
        assert_eq!(
            m.value(
                "spillway_stage_duration_seconds_count",
                &[("route", "capped"), ("stage", "queue")]
            ),
            Some(96.0)
        );
        assert_eq!(metric(&h, "spillway_rejections_total", &[("route", "capped")]).await, 0.0);
        fake.assert_healthy();
    })
    .await
}

// ---------------------------------------------------------------------------
// Shedding: queue_full and queue_timeout
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_full_and_queue_timeout_are_429_with_retry_after_and_reason() {
    within(60, "test", async {
        let gate = Gate::new();
        let fake = gated_upstream(&gate, "/hold").await;
        let routes = route(
            "r",
            "/",
            "    concurrency: {max_in_flight: 1}\n    queue: {max_depth: 1, max_wait: 400ms}\n    shed: {retry_after: 3s}\n",
        );
        let h = ProxyHarness::start(&config(fake.addr(), &routes)).await;
        let (tx, mut rx) = mpsc::unbounded_channel();

        // A holds the only slot.
        spawn_get(&h, "/hold/a", &tx);
        fake.wait_path_hits("/hold/a", 1).await;
        // B queues.
        let b_sent = Instant::now();
        spawn_get(&h, "/b", &tx);
        wait_queue_depth(&h, "r", 1).await;

        // C finds the queue full: refused at once.
        let c = get_seen(h.h1().clone(), h.url("/c")).await;
        assert_eq!(c.status, StatusCode::TOO_MANY_REQUESTS, "{c:?}");
        assert_eq!(c.reason.as_deref(), Some("queue_full"));
        assert_eq!(c.retry_after.as_deref(), Some("3"));
        assert!(
            c.elapsed < Duration::from_secs(2),
            "queue_full must not wait: {:?}",
            c.elapsed
        );

        // B leaves the queue after max_wait with queue_timeout.
        let b = recv(&mut rx).await;
        let b_waited = b_sent.elapsed();
        assert_eq!(b.status, StatusCode::TOO_MANY_REQUESTS, "{b:?}");
        assert_eq!(b.reason.as_deref(), Some("queue_timeout"));
        assert_eq!(b.retry_after.as_deref(), Some("3"));
        assert!(
            b_waited >= Duration::from_millis(400),
            "left the queue before max_wait: {b_waited:?}"
        );
        assert!(
            b_waited < Duration::from_secs(10),
            "stayed queued far past max_wait: {b_waited:?}"
        );

        // A completes once released; neither B nor C ever reached the upstream.
        gate.open();
        let a = recv(&mut rx).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.reason, None);
        assert_eq!(fake.hits(), 1, "shed requests must not reach the upstream");
        assert_eq!(fake.hits_for_path("/b") + fake.hits_for_path("/c"), 0);

        // Counted once each, under the route and reason.
        let m = h.metrics().await;
        let v = |name: &str, labels: &[(&str, &str)]| m.value(name, labels).unwrap_or(0.0);
        assert_eq!(
            v(
                "spillway_rejections_total",
                &[("route", "r"), ("reason", "queue_full")]
            ),
            1.0
        );
        assert_eq!(
            v(
                "spillway_rejections_total",
                &[("route", "r"), ("reason", "queue_timeout")]
            ),
            1.0
        );
        assert_eq!(
            v(
                "spillway_requests_total",
                &[
                    ("route", "r"),
                    ("status_class", "4xx"),
                    ("reason", "queue_full")
                ]
            ),
            1.0
        );
        assert_eq!(
            v(
                "spillway_requests_total",
                &[
                    ("route", "r"),
                    ("status_class", "4xx"),
                    ("reason", "queue_timeout")
                ]
            ),
            1.0
        );
        assert_eq!(
            v(
                "spillway_timeouts_total",
                &[("route", "r"), ("stage", "queue")]
            ),
            1.0
        );
        assert_eq!(v("spillway_queue_depth_peak", &[("route", "r")]), 1.0);
        fake.assert_healthy();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejection_metrics_equal_what_clients_saw() {
    within(60, "test", async {
        let gate = Gate::new();
        let fake = gated_upstream(&gate, "/").await;
        // A custom shed status and Retry-After, to see that both are used.
        let routes = route(
            "burst",
            "/",
            "    concurrency: {max_in_flight: 2}\n    queue: {max_depth: 3, max_wait: 300ms}\n    shed: {status: 503, retry_after: 2s}\n",
        );
        let h = ProxyHarness::start(&config(fake.addr(), &routes)).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        const N: usize = 20;
        for i in 0..N {
            spawn_get(&h, &format!("/burst/{i}"), &tx);
        }
        // With the upstream held: 2 admitted, 3 queued then timed out, 15 refused.
        let mut by_reason: HashMap<String, usize> = HashMap::new();
        for _ in 0..N - 2 {
            let s = recv(&mut rx).await;
            assert_eq!(s.status, StatusCode::SERVICE_UNAVAILABLE, "{s:?}");
            assert_eq!(s.retry_after.as_deref(), Some("2"), "{s:?}");
            *by_reason
                .entry(s.reason.clone().expect("shed replies carry a reason"))
                .or_default() += 1;
        }
        gate.open();
        let mut ok = 0;
        for _ in 0..2 {
            let s = recv(&mut rx).await;
            assert_eq!(s.status, StatusCode::OK, "{s:?}");
            ok += 1;
        }
        assert_eq!(by_reason.get("queue_full").copied().unwrap_or(0), 15, "{by_reason:?}");
        assert_eq!(by_reason.get("queue_timeout").copied().unwrap_or(0), 3, "{by_reason:?}");
        assert_eq!(by_reason.len(), 2, "unexpected reasons: {by_reason:?}");
        assert_eq!(fake.hits(), 2);

        wait_route(&h, "burst", "idle", |r| r["in_flight"] == 0).await;
        let m = h.metrics().await;
        for (reason, n) in &by_reason {
            assert_eq!(
                m.value(
                    "spillway_rejections_total",
                    &[("route", "burst"), ("reason", reason)]
                ),
                Some(*n as f64),
                "spillway_rejections_total{{reason={reason}}}"
            );
            assert_eq!(
                m.value(
                    "spillway_requests_total",
                    &[
                        ("route", "burst"),
                        ("status_class", "5xx"),
                        ("reason", reason)
                    ]
                ),
                Some(*n as f64),
                "spillway_requests_total{{reason={reason}}}"
            );
        }
        assert_eq!(
            m.value("spillway_rejections_total", &[("route", "burst")]),
            Some((N - ok) as f64),
            "total rejections"
        );
        assert_eq!(
            m.value(
                "spillway_requests_total",
                &[("route", "burst"), ("reason", "upstream")]
            ),
            Some(ok as f64)
        );
        assert_eq!(
            m.value("spillway_requests_total", &[("route", "burst")]),
            Some(N as f64),
            "every request counted exactly once"
        );
        // /status.json agrees.
        let r = route_status(&h, "burst").await;
        assert_eq!(r["rejections"]["queue_full"], 15, "{r}");
        assert_eq!(r["rejections"]["queue_timeout"], 3, "{r}");
        assert_eq!(r["queue_depth_peak"], 3, "{r}");
    })
    .await
}

// ---------------------------------------------------------------------------
// Permits live until the last byte; cancellation while queued
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_response_holds_its_slot_until_the_last_byte() {
    within(60, "test", async {
        let (senders_tx, mut senders_rx) = mpsc::unbounded_channel::<BodySender>();
        let fake = FakeUpstream::with_handler(move |req, _ctx| {
            let senders_tx = senders_tx.clone();
            async move {
                if req.uri().path() == "/stream" {
                    let (tx, body) = body_channel();
                    senders_tx.send(tx).expect("test alive");
                    Ok(Response::new(body))
                } else {
                    Ok(reply::ok())
                }
            }
        })
        .await;
        let routes = route(
            "s",
            "/",
            "    concurrency: {max_in_flight: 1}\n    queue: {max_depth: 10, max_wait: 20s}\n    timeouts: {request: 60s}\n",
        );
        let h = ProxyHarness::start(&config(fake.addr(), &routes)).await;

        // The first response's headers and first chunk arrive...
        let resp = h.get("/stream").await;
        assert_eq!(resp.status(), StatusCode::OK);
        let sender = within(10, "stream handler", senders_rx.recv())
            .await
            .expect("sender");
        assert!(sender.data("first ").await);
        let mut body = resp.into_body();
        let frame = within(10, "first chunk", body.frame())
            .await
            .expect("a frame")
            .expect("frame ok");
        assert_eq!(frame.into_data().expect("data"), Bytes::from("first "));

        // ...and a second request must queue while the body is still open.
        let (tx, mut rx) = mpsc::unbounded_channel();
        spawn_get(&h, "/next", &tx);
        let r = wait_route(&h, "s", "the second request queued", |r| {
            r["queue_depth"] == 1
        })
        .await;
        assert_eq!(r["in_flight"], 1, "{r}");
        assert_eq!(fake.hits_for_path("/next"), 0);
        assert!(rx.try_recv().is_err(), "the second request was answered early");

        // The last byte frees the slot.
        assert!(sender.data("last").await);
        drop(sender);
        let mut rest = Vec::new();
        while let Some(frame) = within(10, "rest of body", body.frame()).await {
            if let Ok(d) = frame.expect("frame ok").into_data() {
                rest.extend_from_slice(&d);
            }
        }
        assert_eq!(rest, b"last");
        let next = recv(&mut rx).await;
        assert_eq!(next.status, StatusCode::OK, "{next:?}");
        assert_eq!(fake.hits_for_path("/next"), 1);
        wait_route(&h, "s", "idle", |r| {
            r["in_flight"] == 0 && r["queue_depth"] == 0
        })
        .await;
        fake.assert_healthy();
    })
    .await
}

/// A body that ends early also frees the slot: the client dropping a
/// half-read response, or the upstream breaking its body mid-way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_streaming_responses_release_their_slot() {
    within(60, "test", async {
        let (senders_tx, mut senders_rx) = mpsc::unbounded_channel::<BodySender>();
        let fake = FakeUpstream::with_handler(move |_req, _ctx| {
            let senders_tx = senders_tx.clone();
            async move {
                let (tx, body) = body_channel();
                senders_tx.send(tx).expect("test alive");
                Ok(Response::new(body))
            }
        })
        .await;
        let routes = route(
            "s",
            "/",
            "    concurrency: {max_in_flight: 1}\n    queue: {max_depth: 10, max_wait: 20s}\n    timeouts: {request: 60s}\n",
        );
        let h = ProxyHarness::start(&config(fake.addr(), &routes)).await;

        // 1. The client reads one chunk and goes away.
        let resp = h.get("/client-drops").await;
        let sender = within(10, "handler", senders_rx.recv()).await.expect("sender");
        assert!(sender.data("chunk").await);
        let mut body = resp.into_body();
        let _ = within(10, "first chunk", body.frame()).await;
        assert_eq!(route_status(&h, "s").await["in_flight"], 1);
        drop(body);
        within(20, "upstream body dropped", sender.closed()).await;
        wait_route(&h, "s", "slot released after the client left", |r| {
            r["in_flight"] == 0
        })
        .await;

        // 2. The upstream breaks its body mid-way.
        let resp = h.get("/upstream-breaks").await;
        let sender = within(10, "handler", senders_rx.recv()).await.expect("sender");
        assert!(sender.data("chunk").await);
        assert!(sender.abort().await);
        let got = within(20, "broken body", resp.into_body().collect()).await;
        assert!(got.is_err(), "a broken upstream body must not end cleanly");
        wait_route(&h, "s", "slot released after the upstream broke", |r| {
            r["in_flight"] == 0
        })
        .await;

        // The single slot is free: another request is served at once.
        let resp = h.get("/after").await;
        let sender = within(10, "handler", senders_rx.recv()).await.expect("sender");
        drop(sender);
        assert_eq!(resp.status(), StatusCode::OK);
        let _ = collect_body(resp.into_body()).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hanging_up_while_queued_frees_its_place() {
    within(60, "test", async {
        let gate = Gate::new();
        let fake = gated_upstream(&gate, "/hold").await;
        let routes = route(
            "q",
            "/",
            "    concurrency: {max_in_flight: 1}\n    queue: {max_depth: 4, max_wait: 20s}\n    timeouts: {request: 60s}\n",
        );
        let h = ProxyHarness::start(&config(fake.addr(), &routes)).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        spawn_get(&h, "/hold", &tx);
        fake.wait_path_hits("/hold", 1).await;

        // HTTP/1.1: a raw client queues, then closes its socket.
        let mut raw = RawConn::connect(h.addr()).await;
        raw.send(b"GET /gone-h1 HTTP/1.1\r\nhost: test\r\n\r\n").await;
        wait_queue_depth(&h, "q", 1).await;
        drop(raw);
        wait_queue_depth(&h, "q", 0).await;

        // HTTP/2: a stream cancelled while queued (the connection stays up).
        let (client, url) = (h.h2().clone(), h.url("/gone-h2"));
        let task = tokio::spawn(async move {
            let req = Request::get(url).body(empty()).expect("request");
            let _ = client.request(req).await;
        });
        wait_queue_depth(&h, "q", 1).await;
        task.abort();
        let _ = task.await;
        wait_queue_depth(&h, "q", 0).await;

        // The holder finishes; in-flight and queue are back to 0.
        gate.open();
        assert_eq!(recv(&mut rx).await.status, StatusCode::OK);
        wait_route(&h, "q", "idle", |r| {
            r["in_flight"] == 0 && r["queue_depth"] == 0
        })
        .await;
        let m = h.metrics().await;
        assert_eq!(m.value("spillway_in_flight", &[("route", "q")]), Some(0.0));
        assert_eq!(m.value("spillway_queue_depth", &[("route", "q")]), Some(0.0));
        // The process-wide permits of the departed requests were returned too.
        let (_, _, text) = h.admin_get("/status.json").await;
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["global_in_flight"], 0, "{v}");

        // No slot leaked: with a cap of 1, two more requests pass one after the other.
        for _ in 0..2 {
            let s = get_seen(h.h1().clone(), h.url("/after")).await;
            assert_eq!(s.status, StatusCode::OK, "{s:?}");
        }
        assert_eq!(fake.hits_for_path("/gone-h1"), 0);
        assert_eq!(fake.hits_for_path("/gone-h2"), 0);
        fake.assert_healthy();
    })
    .await
}

// ---------------------------------------------------------------------------
// Process-wide cap
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_limit_sheds_across_routes() {
    within(60, "test", async {
        let gate = Gate::new();
        let fake = gated_upstream(&gate, "/a").await;
        let routes = format!(
            "{}{}",
            route(
                "a",
                "/a",
                "    concurrency: {max_in_flight: 10}\n    shed: {retry_after: 4s}\n"
            ),
            route("b", "/b", "    concurrency: {max_in_flight: 10}\n")
        );
        let yaml = config(fake.addr(), &routes)
            .replace("admin:\n", "limits:\n  max_in_flight: 2\nadmin:\n");
        assert!(yaml.contains("limits:"), "{yaml}");
        let h = ProxyHarness::start(&yaml).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        spawn_get(&h, "/a/1", &tx);
        spawn_get(&h, "/a/2", &tx);
        fake.wait_until("two held requests", |f| f.hits() == 2)
            .await;

        // Another route, with room of its own, is refused by the global cap.
        let b = get_seen(h.h1().clone(), h.url("/b/1")).await;
        assert_eq!(b.status, StatusCode::TOO_MANY_REQUESTS, "{b:?}");
        assert_eq!(b.reason.as_deref(), Some("global_limit"));
        assert!(b.retry_after.is_some(), "global_limit carries Retry-After");
        // And so is the route holding the permits (its own shed settings apply).
        let a = get_seen(h.h1().clone(), h.url("/a/3")).await;
        assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{a:?}");
        assert_eq!(a.reason.as_deref(), Some("global_limit"));
        assert_eq!(a.retry_after.as_deref(), Some("4"));
        assert_eq!(fake.hits(), 2);

        gate.open();
        for _ in 0..2 {
            assert_eq!(recv(&mut rx).await.status, StatusCode::OK);
        }
        // Permits were returned: both routes serve again.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (s, _, text) = h.admin_get("/status.json").await;
            assert_eq!(s, StatusCode::OK);
            let v: serde_json::Value = serde_json::from_str(&text).expect("json");
            if v["global_in_flight"] == 0 {
                assert_eq!(v["global_limit"], 2, "{v}");
                break;
            }
            assert!(Instant::now() < deadline, "global in-flight stuck: {v}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            get_seen(h.h1().clone(), h.url("/b/2")).await.status,
            StatusCode::OK
        );
        assert_eq!(
            get_seen(h.h1().clone(), h.url("/a/4")).await.status,
            StatusCode::OK
        );

        let m = h.metrics().await;
        assert_eq!(
            m.value(
                "spillway_rejections_total",
                &[("route", "b"), ("reason", "global_limit")]
            ),
            Some(1.0)
        );
        assert_eq!(
            m.value(
                "spillway_rejections_total",
                &[("route", "a"), ("reason", "global_limit")]
            ),
            Some(1.0)
        );
        fake.assert_healthy();
    })
    .await
}

// ---------------------------------------------------------------------------
// Fallback and gRPC-shaped replies
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_replaces_shed_replies() {
    within(60, "test", async {
        let gate = Gate::new();
        let fake = gated_upstream(&gate, "/").await;
        let fallback = "    fallback:\n      status: 203\n      headers: {content-type: application/json, x-degraded: \"yes\"}\n      body: '{\"items\":[],\"cached\":true}'\n";
        let routes = format!(
            "{}{}",
            route(
                "full",
                "/full",
                &format!("    concurrency: {{max_in_flight: 1}}\n    queue: {{max_depth: 0}}\n{fallback}")
            ),
            route(
                "slow",
                "/slow",
                &format!("    concurrency: {{max_in_flight: 1}}\n    queue: {{max_depth: 1, max_wait: 200ms}}\n{fallback}")
            )
        );
        let h = ProxyHarness::start(&config(fake.addr(), &routes)).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        spawn_get(&h, "/full/hold", &tx);
        spawn_get(&h, "/slow/hold", &tx);
        fake.wait_until("two held requests", |f| f.hits() == 2).await;

        for (path, reason) in [("/full/x", "queue_full"), ("/slow/x", "queue_timeout")] {
            let s = get_seen(h.h1().clone(), h.url(path)).await;
            assert_eq!(s.status.as_u16(), 203, "{path}: {s:?}");
            assert_eq!(s.reason.as_deref(), Some(reason), "{path}");
            assert_eq!(
                header_str(&s.headers, "content-type"),
                Some("application/json")
            );
            assert_eq!(header_str(&s.headers, "x-degraded"), Some("yes"));
            assert_eq!(&s.body[..], br#"{"items":[],"cached":true}"#);
        }
        assert_eq!(fake.hits(), 2, "fallbacks never reach the upstream");
        gate.open();
        for _ in 0..2 {
            assert_eq!(recv(&mut rx).await.status, StatusCode::OK);
        }
        // Still counted as rejections.
        assert_eq!(
            metric(
                &h,
                "spillway_rejections_total",
                &[("route", "full"), ("reason", "queue_full")]
            )
            .await,
            1.0
        );
        assert_eq!(
            metric(
                &h,
                "spillway_rejections_total",
                &[("route", "slow"), ("reason", "queue_timeout")]
            )
            .await,
            1.0
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_request_gets_a_grpc_shaped_shed_reply() {
    within(60, "test", async {
        let gate = Gate::new();
        let fake = gated_upstream(&gate, "/").await;
        let routes = route(
            "grpc",
            "/",
            "    concurrency: {max_in_flight: 1}\n    queue: {max_depth: 0}\n",
        );
        let h = ProxyHarness::start(&config(fake.addr(), &routes)).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        spawn_get(&h, "/hold", &tx);
        fake.wait_hits(1).await;

        for content_type in ["application/grpc", "application/grpc+proto"] {
            let req = Request::post("/pkg.Service/Method")
                .header("content-type", content_type)
                .header("te", "trailers")
                .body(full(Bytes::from_static(b"\0\0\0\0\0")))
                .expect("request");
            let resp = h.send_h2(req).await;
            assert_eq!(resp.status(), StatusCode::OK, "gRPC replies are HTTP 200");
            let headers = resp.headers().clone();
            assert_eq!(
                header_str(&headers, "grpc-status"),
                Some("8"),
                "{headers:?}"
            );
            assert!(
                header_str(&headers, "content-type")
                    .is_some_and(|c| c.starts_with("application/grpc")),
                "{headers:?}"
            );
            assert!(headers.contains_key("grpc-message"), "{headers:?}");
            assert_eq!(
                header_str(&headers, "x-spillway-reason"),
                Some("queue_full")
            );
            let _ = collect_body(resp.into_body()).await;
        }
        // A plain request on the same route still gets the HTTP shape.
        let s = get_seen(h.h1().clone(), h.url("/plain")).await;
        assert_eq!(s.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(!s.headers.contains_key("grpc-status"));
        assert_eq!(fake.hits(), 1);
        gate.open();
        assert_eq!(recv(&mut rx).await.status, StatusCode::OK);
        assert_eq!(
            metric(
                &h,
                "spillway_rejections_total",
                &[("route", "grpc"), ("reason", "queue_full")]
            )
            .await,
            3.0
        );
    })
    .await
}

// ---------------------------------------------------------------------------
// adaptive_lifo
// ---------------------------------------------------------------------------

/// Once the queue has been standing longer than the CoDel interval, a waiter
/// older than the target is shed with `queue_timeout` when a slot frees,
/// long before its `max_wait`; the route then returns to plain FIFO.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_lifo_sheds_stale_waiters_once_the_queue_stands() {
    within(60, "test", async {
        let gate = Gate::new();
        let fake = gated_upstream(&gate, "/hold").await;
        let routes = route(
            "lifo",
            "/",
            "    concurrency: {max_in_flight: 1}\n    queue: {max_depth: 10, max_wait: 10s, discipline: adaptive_lifo}\n    timeouts: {request: 60s}\n",
        );
        let h = ProxyHarness::start(&config(fake.addr(), &routes)).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        spawn_get(&h, "/hold", &tx);
        fake.wait_path_hits("/hold", 1).await;
        let stale_sent = Instant::now();
        spawn_get(&h, "/stale", &tx);
        wait_queue_depth(&h, "lifo", 1).await;
        // The queue stands: LIFO with CoDel shedding takes over.
        wait_route(&h, "lifo", "lifo_active", |r| r["lifo_active"] == true).await;

        gate.release(1);
        let mut got = [recv(&mut rx).await, recv(&mut rx).await];
        got.sort_by_key(|s| s.status);
        let (ok, stale) = (&got[0], &got[1]);
        assert_eq!(ok.status, StatusCode::OK, "{ok:?}");
        assert_eq!(stale.status, StatusCode::TOO_MANY_REQUESTS, "{stale:?}");
        assert_eq!(stale.reason.as_deref(), Some("queue_timeout"));
        assert!(
            stale_sent.elapsed() < Duration::from_secs(8),
            "a stale waiter must be shed when the slot frees, not at max_wait (10s)"
        );
        assert_eq!(fake.hits_for_path("/stale"), 0);

        // Back to FIFO with an empty queue: the next request is served.
        wait_route(&h, "lifo", "FIFO again", |r| {
            r["lifo_active"] == false && r["queue_depth"] == 0 && r["in_flight"] == 0
        })
        .await;
        let s = get_seen(h.h1().clone(), h.url("/fresh")).await;
        assert_eq!(s.status, StatusCode::OK, "{s:?}");
        assert_eq!(
            metric(
                &h,
                "spillway_rejections_total",
                &[("route", "lifo"), ("reason", "queue_timeout")]
            )
            .await,
            1.0
        );
        fake.assert_healthy();
    })
    .await
}

/// Sustained overload (10 closed-loop clients on a cap of 1, 50 ms per
/// request): FIFO would serve every request after ~500 ms in the queue;
/// adaptive LIFO serves fresh requests and sheds stale ones with
/// `queue_timeout`, so the requests that are served wait little.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_lifo_under_sustained_overload_serves_fresh_requests() {
    within(90, "test", async {
        const SERVICE: Duration = Duration::from_millis(50);
        const CLIENTS: usize = 10;
        let fake = FakeUpstream::builder().delay(SERVICE).start().await;
        let routes = route(
            "lifo",
            "/",
            "    concurrency: {max_in_flight: 1}\n    queue: {max_depth: 50, max_wait: 10s, discipline: adaptive_lifo}\n    timeouts: {request: 60s}\n",
        );
        let h = ProxyHarness::start(&config(fake.addr(), &routes)).await;
        let stop_at = Instant::now() + Duration::from_secs(3);
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..CLIENTS {
            let (client, url) = (h.h1().clone(), h.url(&format!("/load/{c}")));
            tasks.spawn(async move {
                let mut seen = Vec::new();
                while Instant::now() < stop_at {
                    seen.push(get_seen(client.clone(), url.clone()).await);
                }
                seen
            });
        }
        let mut ok_latency = Vec::new();
        let mut by_reason: HashMap<String, u64> = HashMap::new();
        while let Some(seen) = tasks.join_next().await {
            for s in seen.expect("client task") {
                match s.status {
                    StatusCode::OK => ok_latency.push(s.elapsed),
                    StatusCode::TOO_MANY_REQUESTS => {
                        *by_reason.entry(s.reason.clone().unwrap_or_default()).or_default() += 1
                    }
                    other => panic!("unexpected status {other}: {s:?}"),
                }
            }
        }
        let shed = by_reason.get("queue_timeout").copied().unwrap_or(0);
        assert!(shed >= 1, "adaptive LIFO never shed: {by_reason:?}");
        assert_eq!(by_reason.len(), 1, "only queue_timeout expected: {by_reason:?}");
        assert!(ok_latency.len() >= 5, "served only {}", ok_latency.len());
        let med = median(ok_latency.clone());
        assert!(
            med < Duration::from_millis(300),
            "median latency of served requests {med:?}: FIFO would be ~{:?}",
            SERVICE * CLIENTS as u32
        );
        assert!(fake.peak() <= 1, "cap exceeded: {}", fake.peak());
        assert_eq!(fake.hits(), ok_latency.len() as u64);
        // Metrics agree with the clients.
        wait_route(&h, "lifo", "idle", |r| r["in_flight"] == 0).await;
        assert_eq!(
            metric(
                &h,
                "spillway_rejections_total",
                &[("route", "lifo"), ("reason", "queue_timeout")]
            )
            .await,
            shed as f64
        );
        assert_eq!(
            metric(
                &h,
                "spillway_requests_total",
                &[("route", "lifo"), ("reason", "upstream")]
            )
            .await,
            ok_latency.len() as f64
        );
    })
    .await
}
