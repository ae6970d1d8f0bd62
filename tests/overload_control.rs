//! Priority classes, per-caller fairness and shadow mode, black-box through
//! real sockets: dispatch order, reserved shares at the boundary,
//! displacement both ways, the key bound, shadow counts without local
//! replies, shadow -> enforce by reload, and a breaker in shadow mode.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http::Request;
use support::*;
use tokio::sync::mpsc;

/// An upstream whose requests wait at `gate`.
async fn gated(gate: &Gate) -> FakeUpstream {
    let gate = gate.clone();
    FakeUpstream::with_handler(move |_req, _ctx| {
        let gate = gate.clone();
        async move {
            gate.pass().await;
            Ok(reply::ok())
        }
    })
    .await
}

fn yaml(upstream: SocketAddr, route_extra: &str) -> String {
    yaml_with(
        "",
        &upstream_yaml("app", upstream, ""),
        &route_yaml("api", "      path_prefix: /", "app", route_extra),
    )
}

/// Sends a GET with `headers` in a task; its outcome arrives on `tx`.
fn spawn_req(
    h: &ProxyHarness,
    path: &str,
    headers: &[(&str, &str)],
    tx: &mpsc::UnboundedSender<(String, Seen)>,
) {
    let mut b = Request::get(h.url(path));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(empty()).expect("request");
    let (client, tx, path) = (h.h1().clone(), tx.clone(), path.to_string());
    tokio::spawn(async move {
        let began = tokio::time::Instant::now();
        let resp = client.request(req).await.expect("request through proxy");
        let _ = tx.send((path, Seen::read(resp, began).await));
    });
}

async fn next(rx: &mut mpsc::UnboundedReceiver<(String, Seen)>) -> (String, Seen) {
    within(30, "a response", rx.recv())
        .await
        .expect("sender gone")
}

/// Waits until the route's queue holds `n`.
async fn queued(h: &ProxyHarness, n: f64) {
    within(30, &format!("queue depth {n}"), async {
        while metric(h, "spillway_queue_depth", &[("route", "api")]).await != n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

const CLASSES: &str =
    "    priority:\n      classes: [critical, default, sheddable]\n      default: default\n";

#[tokio::test]
async fn reserved_share_and_highest_class_first() {
    let gate = Gate::new();
    let up = gated(&gate).await;
    // Limit 4, 50% for critical: default and sheddable stop at 2 in flight.
    let extra = format!(
        "    concurrency:\n      max_in_flight: 4\n    queue:\n      max_depth: 8\n      max_wait: 20s\n    timeouts:\n      request: 30s\n{CLASSES}      reserved: {{ critical: 50% }}\n"
    );
    let h = ProxyHarness::start(&yaml(up.addr(), &extra)).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    spawn_req(&h, "/d1", &[], &tx);
    spawn_req(&h, "/d2", &[("x-spillway-priority", "default")], &tx);
    up.wait_hits(2).await;
    // The third non-critical request waits although two permits are free.
    spawn_req(&h, "/s1", &[("x-spillway-priority", "sheddable")], &tx);
    queued(&h, 1.0).await;
    // Critical takes the reserved two.
    spawn_req(&h, "/c1", &[("x-spillway-priority", "critical")], &tx);
    spawn_req(&h, "/c2", &[("x-spillway-priority", "critical")], &tx);
    up.wait_hits(4).await;
    assert_eq!(up.hits_for_path("/s1"), 0);
    assert_eq!(
        metric(
            &h,
            "spillway_priority_in_flight",
            &[("route", "api"), ("class", "critical")]
        )
        .await,
        2.0
    );
    // A critical arrival now waits too; when a permit frees it goes first.
    spawn_req(&h, "/c3", &[("x-spillway-priority", "critical")], &tx);
    queued(&h, 2.0).await;
    gate.release(1);
    let _ = next(&mut rx).await;
    up.wait_path_hits("/c3", 1).await;
    assert_eq!(
        up.hits_for_path("/s1"),
        0,
        "a sheddable request passed a critical one"
    );
    gate.open();
    for _ in 0..5 {
        let (path, seen) = next(&mut rx).await;
        assert_eq!(seen.status, 200, "{path}");
    }
    assert_eq!(
        metric(
            &h,
            "spillway_priority_requests_total",
            &[
                ("route", "api"),
                ("class", "critical"),
                ("outcome", "admitted")
            ]
        )
        .await,
        3.0
    );
    assert_eq!(
        metric(
            &h,
            "spillway_priority_requests_total",
            &[
                ("route", "api"),
                ("class", "default"),
                ("outcome", "admitted")
            ]
        )
        .await,
        2.0
    );
}

/// Headroom instead of a queue (`max_depth: 0`): lower classes are refused on
/// arrival at the unreserved part of the limit, critical requests take the
/// reserved rest, and nothing ever waits in the proxy.
#[tokio::test]
async fn with_no_queue_the_reserved_headroom_admits_critical_and_refuses_the_rest_at_once() {
    let gate = Gate::new();
    let up = gated(&gate).await;
    let extra = format!(
        "    concurrency:\n      max_in_flight: 4\n    queue:\n      max_depth: 0\n    timeouts:\n      request: 30s\n{CLASSES}      reserved: {{ critical: 50% }}\n"
    );
    let h = ProxyHarness::start(&yaml(up.addr(), &extra)).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    spawn_req(&h, "/d1", &[], &tx);
    spawn_req(&h, "/s1", &[("x-spillway-priority", "sheddable")], &tx);
    up.wait_hits(2).await;
    // Two permits are free, but only for critical: the others get 429 now.
    for (path, class) in [("/s2", "sheddable"), ("/d2", "default")] {
        spawn_req(&h, path, &[("x-spillway-priority", class)], &tx);
        let (got, seen) = next(&mut rx).await;
        assert_eq!(got, path);
        assert_eq!(seen.status, 429, "{path}");
        assert_eq!(seen.reason.as_deref(), Some("queue_full"), "{path}");
    }
    spawn_req(&h, "/c1", &[("x-spillway-priority", "critical")], &tx);
    spawn_req(&h, "/c2", &[("x-spillway-priority", "critical")], &tx);
    up.wait_hits(4).await;
    // At the limit, a critical arrival is refused too: nothing queues.
    spawn_req(&h, "/c3", &[("x-spillway-priority", "critical")], &tx);
    let (got, seen) = next(&mut rx).await;
    assert_eq!((got.as_str(), seen.status.as_u16()), ("/c3", 429));
    assert_eq!(seen.reason.as_deref(), Some("queue_full"));
    assert_eq!(
        metric(&h, "spillway_queue_depth", &[("route", "api")]).await,
        0.0
    );
    gate.open();
    for _ in 0..4 {
        let (path, seen) = next(&mut rx).await;
        assert_eq!(seen.status, 200, "{path}");
    }
    assert_eq!(up.hits_for_path("/s2") + up.hits_for_path("/d2"), 0);
    assert_eq!(
        metric(
            &h,
            "spillway_rejections_total",
            &[("route", "api"), ("reason", "queue_full")]
        )
        .await,
        3.0
    );
    for (class, admitted, shed) in [
        ("critical", 2.0, 1.0),
        ("default", 1.0, 1.0),
        ("sheddable", 1.0, 1.0),
    ] {
        for (outcome, want) in [("admitted", admitted), ("shed", shed)] {
            let labels = [("route", "api"), ("class", class), ("outcome", outcome)];
            assert_eq!(
                metric(&h, "spillway_priority_requests_total", &labels).await,
                want,
                "{class} {outcome}"
            );
        }
    }
}

/// A route with one permit, one queue place and the three classes, whose
/// one permit is taken by a request held at the upstream.
async fn one_slot_held() -> (
    Gate,
    FakeUpstream,
    ProxyHarness,
    mpsc::UnboundedSender<(String, Seen)>,
    mpsc::UnboundedReceiver<(String, Seen)>,
) {
    let gate = Gate::new();
    let up = gated(&gate).await;
    let extra = format!(
        "    concurrency:\n      max_in_flight: 1\n    queue:\n      max_depth: 1\n      max_wait: 20s\n    timeouts:\n      request: 30s\n{CLASSES}"
    );
    let h = ProxyHarness::start(&yaml(up.addr(), &extra)).await;
    let (tx, rx) = mpsc::unbounded_channel();
    spawn_req(&h, "/hold", &[], &tx);
    up.wait_hits(1).await;
    (gate, up, h, tx, rx)
}

#[tokio::test]
async fn a_full_queue_sheds_the_lowest_class_first() {
    let (gate, up, h, tx, mut rx) = one_slot_held().await;
    spawn_req(&h, "/batch", &[("x-spillway-priority", "sheddable")], &tx);
    queued(&h, 1.0).await;
    // Critical displaces the sheddable waiter.
    spawn_req(&h, "/login", &[("x-spillway-priority", "critical")], &tx);
    let (path, seen) = next(&mut rx).await;
    assert_eq!(path, "/batch");
    assert_eq!(seen.status, 429);
    assert_eq!(seen.reason.as_deref(), Some("priority"));
    assert!(seen.retry_after.is_some());
    // Another critical finds no lower waiter: queue_full.
    spawn_req(&h, "/login2", &[("x-spillway-priority", "critical")], &tx);
    let (path, seen) = next(&mut rx).await;
    assert_eq!(
        (path.as_str(), seen.reason.as_deref()),
        ("/login2", Some("queue_full"))
    );
    gate.open();
    for _ in 0..2 {
        assert_eq!(next(&mut rx).await.1.status, 200);
    }
    assert_eq!(up.hits_for_path("/batch"), 0);
    assert_eq!(
        metric(
            &h,
            "spillway_rejections_total",
            &[("route", "api"), ("reason", "priority")]
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &h,
            "spillway_priority_requests_total",
            &[
                ("route", "api"),
                ("class", "sheddable"),
                ("outcome", "shed")
            ]
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn a_displaced_grpc_request_gets_resource_exhausted() {
    let (gate, _up, h, tx, mut rx) = one_slot_held().await;
    spawn_req(
        &h,
        "/svc.Batch/Run",
        &[
            ("x-spillway-priority", "sheddable"),
            ("content-type", "application/grpc"),
        ],
        &tx,
    );
    queued(&h, 1.0).await;
    spawn_req(
        &h,
        "/svc.Chat/Turn",
        &[("x-spillway-priority", "critical")],
        &tx,
    );
    let (path, seen) = next(&mut rx).await;
    assert_eq!(path, "/svc.Batch/Run");
    assert_eq!(seen.status, 200);
    assert_eq!(header_str(&seen.headers, "grpc-status"), Some("8"));
    assert_eq!(seen.reason.as_deref(), Some("priority"));
    gate.open();
}

#[tokio::test]
async fn fairness_serves_the_key_holding_fewest_and_displaces_the_busiest() {
    let gate = Gate::new();
    let up = gated(&gate).await;
    let extra = "    concurrency:\n      max_in_flight: 2\n    queue:\n      max_depth: 2\n      max_wait: 20s\n    timeouts:\n      request: 30s\n    fairness:\n      key: { header: x-tenant-id }\n";
    let h = ProxyHarness::start(&yaml(up.addr(), extra)).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let a = [("x-tenant-id", "a")];
    // One tenant alone may use the whole limit.
    spawn_req(&h, "/a1", &a, &tx);
    spawn_req(&h, "/a1", &a, &tx);
    up.wait_hits(2).await;
    spawn_req(&h, "/a2", &a, &tx);
    queued(&h, 1.0).await;
    spawn_req(&h, "/a3", &a, &tx);
    queued(&h, 2.0).await;
    // Queue full of tenant a: tenant b displaces a's newest waiter.
    spawn_req(&h, "/b1", &[("x-tenant-id", "b")], &tx);
    let (path, seen) = next(&mut rx).await;
    assert_eq!(
        (path.as_str(), seen.reason.as_deref()),
        ("/a3", Some("fair_share"))
    );
    assert_eq!(seen.status, 429);
    // Tenant a again: it has the most waiters, so queue_full.
    spawn_req(&h, "/a4", &a, &tx);
    let (path, seen) = next(&mut rx).await;
    assert_eq!(
        (path.as_str(), seen.reason.as_deref()),
        ("/a4", Some("queue_full"))
    );
    assert_eq!(
        metric(&h, "spillway_fairness_keys", &[("route", "api")]).await,
        2.0
    );
    // A permit frees: a still holds one, b holds none, so b is served
    // first although a's waiter is older.
    gate.release(1);
    let (path, _) = next(&mut rx).await;
    assert_eq!(path, "/a1");
    up.wait_path_hits("/b1", 1).await;
    assert_eq!(
        up.hits_for_path("/a2"),
        0,
        "tenant a was served before tenant b"
    );
    gate.open();
    for _ in 0..3 {
        assert_eq!(next(&mut rx).await.1.status, 200);
    }
    within(30, "keys forgotten", async {
        while metric(&h, "spillway_fairness_keys", &[("route", "api")]).await != 0.0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn fairness_keys_are_bounded_by_max_keys() {
    let gate = Gate::new();
    let up = gated(&gate).await;
    let extra = "    concurrency:\n      max_in_flight: 16\n    fairness:\n      key: { header: x-tenant-id }\n      max_keys: 3\n";
    let h = ProxyHarness::start(&yaml(up.addr(), extra)).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    for i in 0..10 {
        spawn_req(
            &h,
            &format!("/t{i}"),
            &[("x-tenant-id", &format!("tenant-{i}"))],
            &tx,
        );
    }
    up.wait_hits(10).await;
    // Three keys tracked, the other seven share one overflow key.
    assert_eq!(
        metric(&h, "spillway_fairness_keys", &[("route", "api")]).await,
        4.0
    );
    let text = h.metrics_text().await;
    assert!(!text.contains("tenant-"), "a key became a label value");
    gate.open();
    for _ in 0..10 {
        assert_eq!(next(&mut rx).await.1.status, 200);
    }
}

#[tokio::test]
async fn shadow_mode_counts_instead_of_acting_and_switches_to_enforce_by_reload() {
    let gate = Gate::new();
    let up = gated(&gate).await;
    let limits = "    concurrency:\n      max_in_flight: 1\n    queue:\n      max_depth: 1\n      max_wait: 20s\n    timeouts:\n      request: 30s\n";
    let shadow = yaml(up.addr(), &format!("{limits}    mode: shadow\n"));
    let h = ProxyHarness::start(&shadow).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    for i in 0..4 {
        spawn_req(&h, &format!("/r{i}"), &[], &tx);
        up.wait_hits(i + 1).await;
    }
    // Everything reached the upstream; in-flight is the real count.
    assert_eq!(up.current(), 4);
    assert_eq!(
        metric(&h, "spillway_in_flight", &[("route", "api")]).await,
        4.0
    );
    let m = h.metrics().await;
    let decision = |d: &str| {
        m.value(
            "spillway_shadow_decisions_total",
            &[("route", "api"), ("decision", d)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(decision("queue"), 1.0);
    assert_eq!(decision("queue_full"), 2.0);
    assert_eq!(
        m.value("spillway_rejections_total", &[("route", "api")])
            .unwrap_or(0.0),
        0.0
    );

    // Enforce from now on: the four keep running, new requests queue until
    // in-flight is below the limit.
    h.reload(&yaml(up.addr(), limits));
    spawn_req(&h, "/after", &[], &tx);
    queued(&h, 1.0).await;
    gate.release(3);
    for _ in 0..3 {
        let (_, seen) = next(&mut rx).await;
        assert_eq!(seen.status, 200);
        assert!(
            seen.reason.is_none(),
            "a shadow-mode response carried a reason"
        );
    }
    assert_eq!(
        up.hits_for_path("/after"),
        0,
        "admitted above the limit after the switch"
    );
    gate.open();
    for _ in 0..2 {
        let (_, seen) = next(&mut rx).await;
        assert_eq!(seen.status, 200);
        assert!(seen.reason.is_none());
    }
    assert_eq!(up.hits_for_path("/after"), 1);
}

#[tokio::test]
async fn a_shadow_breaker_opens_but_lets_requests_through() {
    let up = FakeUpstream::status(503).await;
    let ups = upstream_yaml(
        "app",
        up.addr(),
        "    circuit_breaker:\n      failure_threshold: 2\n      recovery_timeout: 30s\n      mode: shadow\n",
    );
    let h = ProxyHarness::start(&yaml_with(
        "",
        &ups,
        &route_yaml("api", "      path_prefix: /", "app", ""),
    ))
    .await;
    for _ in 0..5 {
        let resp = h.get("/x").await;
        assert_eq!(resp.status(), 503);
        assert_no_spillway_headers(resp.headers());
    }
    assert_eq!(up.hits(), 5);
    assert_eq!(
        metric(
            &h,
            "spillway_circuit_state",
            &[("upstream", "app"), ("state", "open")]
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &h,
            "spillway_shadow_decisions_total",
            &[("route", "api"), ("decision", "breaker_open")]
        )
        .await,
        3.0
    );
}
