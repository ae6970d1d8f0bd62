//! Admin endpoints, metrics and graceful drain (docs/guide.md, "Admin
//! endpoints and metrics"; docs/kubernetes.md for the drain).

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use support::*;
use tokio::sync::Notify;

/// Polls /metrics until the summed samples satisfy `pred` (bounded at 15 s):
/// metrics are recorded when a response body ends, just after the client
/// has read it.
async fn wait_metric(
    h: &ProxyHarness,
    name: &str,
    labels: &[(&str, &str)],
    pred: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let m = h.metrics().await;
        if let Some(v) = m.value(name, labels) {
            if pred(v) {
                return v;
            }
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "metric {name}{labels:?} never satisfied the expectation; samples: {:#?}",
                m.find(name, &[])
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls an admin path until it answers `status` (bounded at 15 s).
async fn wait_admin_status(h: &ProxyHarness, path: &str, status: StatusCode) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (s, _, _) = h.admin_get(path).await;
        if s == status {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} stayed {s}, expected {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn api_yaml(fake: &FakeUpstream, drain: &str) -> String {
    let yaml = yaml_with(
        "",
        &upstream_yaml("app", fake.addr(), ""),
        &route_yaml("api", "      path_prefix: /api", "app", ""),
    );
    yaml.replace("drain:\n  grace: 0s\n  timeout: 5s\n", drain)
}

// ---------------------------------------------------------------------------
// /live, /ready, /config
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_and_ready_answer_200_when_running() {
    within(30, "test", async {
        let fake = FakeUpstream::ok().await;
        let h = ProxyHarness::start(&basic_yaml(fake.addr())).await;
        let (s, _, _) = h.admin_get("/live").await;
        assert_eq!(s, StatusCode::OK, "/live");
        let (s, _, _) = h.admin_get("/ready").await;
        assert_eq!(
            s,
            StatusCode::OK,
            "/ready once listeners are bound and config loaded"
        );
        let (s, _, _) = h.admin_get("/no-such-admin-page").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_endpoint_shows_effective_config_with_generation_and_load_time() {
    within(30, "test", async {
        let fake = FakeUpstream::ok().await;
        let h = ProxyHarness::start(&api_yaml(&fake, "drain:\n  grace: 0s\n  timeout: 5s\n")).await;
        let (s, headers, body) = h.admin_get("/config").await;
        assert_eq!(s, StatusCode::OK);
        assert!(
            header_str(&headers, "content-type")
                .unwrap_or("")
                .starts_with("application/json"),
            "{headers:?}"
        );
        let json: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("/config is not JSON ({e}): {body}"));
        let obj = json.as_object().expect("/config is a JSON object");
        let generation = obj
            .get("generation")
            .and_then(|g| g.as_u64())
            .unwrap_or_else(|| panic!("/config has a numeric `generation`: {body}"));
        assert!(generation >= 1, "{body}");
        assert!(
            obj.keys().any(|k| k.contains("load")),
            "/config carries its load time (a key like `loaded_at`): {body}"
        );
        // The effective config: names, endpoints and defaults filled in.
        assert!(body.contains("\"api\""), "route name: {body}");
        assert!(body.contains("\"inbound\""), "listener name: {body}");
        assert!(body.contains(&fake.addr().to_string()), "endpoint: {body}");
        assert!(
            body.contains("max_request_body"),
            "defaults are shown: {body}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_endpoint_redacts_key_paths() {
    within(30, "test", async {
        let fake = FakeUpstream::ok().await;
        let dir = TempDir::new("redact");
        let cert =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
        let cert_path = dir.write("tls.crt", &cert.cert.pem());
        let key_path = dir.write("secret-tls.key", &cert.signing_key.serialize_pem());
        let yaml = format!(
            r#"version: 1
listeners:
  - name: inbound
    bind: 127.0.0.1:0
  - name: secure
    bind: 127.0.0.1:0
    tls:
      cert: {}
      key: {}
admin:
  bind: 127.0.0.1:0
drain:
  grace: 0s
  timeout: 5s
upstreams:
  app:
    endpoints: ["{}"]
routes:
  - name: all
    match:
      path_prefix: /
    upstream: app
"#,
            cert_path.display(),
            key_path.display(),
            fake.addr()
        );
        let h = ProxyHarness::start(&yaml).await;
        let (s, _, body) = h.admin_get("/config").await;
        assert_eq!(s, StatusCode::OK);
        assert!(
            !body.contains("secret-tls.key"),
            "key path must be redacted: {body}"
        );
        assert!(body.contains("secure"), "{body}");
    })
    .await
}

// ---------------------------------------------------------------------------
// /metrics
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_requests_upstreams_connections_and_process() {
    within(60, "test", async {
        let fake = FakeUpstream::ok().await;
        let h = ProxyHarness::start(&api_yaml(&fake, "drain:\n  grace: 0s\n  timeout: 5s\n")).await;
        for i in 0..3 {
            let resp = h.get(&format!("/api/item-{i}")).await;
            assert_eq!(resp.status(), StatusCode::OK);
            let _ = collect_body(resp.into_body()).await;
        }
        let resp = h.get("/nope-unmatched-path-7f3a").await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        let _ = collect_body(resp.into_body()).await;

        let ok = wait_metric(
            &h,
            "spillway_requests_total",
            &[
                ("route", "api"),
                ("status_class", "2xx"),
                ("reason", "upstream"),
            ],
            |v| v >= 3.0,
        )
        .await;
        assert_eq!(ok, 3.0, "exactly the 3 successful requests");
        wait_metric(
            &h,
            "spillway_requests_total",
            &[("status_class", "4xx"), ("reason", "no_route")],
            |v| v >= 1.0,
        )
        .await;

        let m = h.metrics().await;
        assert!(m.has_type("spillway_requests_total", "counter"));
        let up = m
            .value("spillway_upstream_requests_total", &[("upstream", "app")])
            .unwrap_or_else(|| {
                panic!(
                    "spillway_upstream_requests_total{{upstream=\"app\"}}:\n{}",
                    m.text
                )
            });
        assert!(up >= 3.0, "upstream requests {up}");
        let endpoint = fake.addr().to_string();
        assert!(
            !m.find(
                "spillway_upstream_requests_total",
                &[("upstream", "app"), ("endpoint", &endpoint)]
            )
            .is_empty(),
            "endpoint label is the configured endpoint: {:#?}",
            m.find("spillway_upstream_requests_total", &[])
        );
        assert!(
            m.find("spillway_upstream_requests_total", &[("upstream", "app")])
                .iter()
                .all(|s| s.label("outcome").is_some()),
            "outcome label"
        );

        assert!(m.has_type("spillway_request_duration_seconds", "histogram"));
        let count = m
            .value(
                "spillway_request_duration_seconds_count",
                &[("route", "api")],
            )
            .expect("duration count");
        assert!(count >= 3.0);
        // Buckets from 0.5 ms to 30 s.
        assert!(!m
            .find(
                "spillway_request_duration_seconds_bucket",
                &[("route", "api"), ("le", "0.0005")]
            )
            .is_empty());
        assert!(!m
            .find(
                "spillway_request_duration_seconds_bucket",
                &[("route", "api"), ("le", "30")]
            )
            .is_empty());
        for stage in ["connect", "upstream_headers", "total"] {
            assert!(
                m.value(
                    "spillway_stage_duration_seconds_count",
                    &[("route", "api"), ("stage", stage)]
                )
                .is_some(),
                "stage {stage}: {:#?}",
                m.find("spillway_stage_duration_seconds_count", &[])
            );
        }
        let total = m
            .value(
                "spillway_stage_duration_seconds_count",
                &[("route", "api"), ("stage", "total")],
            )
            .unwrap();
        assert!(total >= 3.0);

        assert!(
            m.value("spillway_connections", &[("listener", "inbound")])
                .is_some(),
            "spillway_connections gauge"
        );
        let generation = m
            .value("spillway_config_generation", &[])
            .expect("spillway_config_generation");
        assert!(generation >= 1.0);
        let rss = m
            .value("process_resident_memory_bytes", &[])
            .expect("process metrics");
        assert!(rss > 0.0);
        assert!(
            m.value("process_open_fds", &[]).unwrap_or(0.0) > 0.0,
            "process_open_fds"
        );
        assert!(
            m.value("process_cpu_seconds_total", &[]).is_some(),
            "process_cpu_seconds_total"
        );

        // Label values come from config names, never from request data.
        assert!(
            !m.text.contains("nope-unmatched"),
            "request path leaked into metrics"
        );
        assert!(
            !m.text.contains("item-1"),
            "request path leaked into metrics"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_gauge_counts_open_connections() {
    within(60, "test", async {
        let fake = FakeUpstream::ok().await;
        let h = ProxyHarness::start(&basic_yaml(fake.addr())).await;
        let mut conns = Vec::new();
        for _ in 0..3 {
            let mut c = RawConn::connect(h.addr()).await;
            c.send(b"GET /c HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
            assert_eq!(c.read_response().await.status, 200);
            conns.push(c);
        }
        wait_metric(
            &h,
            "spillway_connections",
            &[("listener", "inbound")],
            |v| v == 3.0,
        )
        .await;
        drop(conns);
        wait_metric(
            &h,
            "spillway_connections",
            &[("listener", "inbound")],
            |v| v == 0.0,
        )
        .await;
    })
    .await
}

// ---------------------------------------------------------------------------
// Drain
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_serves_during_grace_finishes_in_flight_then_stops() {
    within(90, "test", async {
        let release = Arc::new(Notify::new());
        let r = release.clone();
        let fake = FakeUpstream::with_handler(move |req, _| {
            let r = r.clone();
            async move {
                if req.uri().path() == "/api/slow" {
                    r.notified().await;
                    Ok(reply::status_body(200, "slow-done"))
                } else {
                    Ok(reply::ok())
                }
            }
        })
        .await;
        let mut h =
            ProxyHarness::start(&api_yaml(&fake, "drain:\n  grace: 4s\n  timeout: 30s\n")).await;
        let addr = h.addr();
        let (s, _, _) = h.admin_get("/ready").await;
        assert_eq!(s, StatusCode::OK);

        // A slow request in flight.
        let client = h1_client();
        let url = h.url("/api/slow");
        let slow = tokio::spawn(async move {
            let resp = client
                .request(Request::get(url).body(empty()).unwrap())
                .await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>((status, body))
        });
        fake.wait_path_hits("/api/slow", 1).await;

        h.drain();
        wait_admin_status(&h, "/ready", StatusCode::SERVICE_UNAVAILABLE).await;
        let (s, _, _) = h.admin_get("/live").await;
        assert_eq!(s, StatusCode::OK, "/live stays 200 while draining");

        // During grace new requests, on new connections, are still served.
        let fresh = h1_client();
        let resp = fresh
            .request(
                Request::get(h.url("/api/during-grace"))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .expect("served during grace");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_no_spillway_headers(resp.headers());

        let proxy = h.take_proxy();
        let stopped = tokio::spawn(proxy.stopped());

        // After grace the listener stops accepting.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::net::TcpStream::connect(addr).await {
                Err(_) => break,
                Ok(_) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "listener still accepting 30 s after drain"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        assert!(
            !stopped.is_finished(),
            "stopped while a request was still in flight"
        );

        // The in-flight request completes, then the proxy stops.
        release.notify_one();
        let (status, body) = within(15, "in-flight request to complete", slow)
            .await
            .unwrap()
            .expect("slow request");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"slow-done");
        within(20, "proxy to stop after the last request", stopped)
            .await
            .unwrap();
        fake.assert_healthy();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_bounds_the_wait_for_stuck_requests() {
    within(60, "test", async {
        let fake = FakeUpstream::with_handler(|_req, _| async {
            // Never answers.
            std::future::pending::<()>().await;
            Ok(reply::ok())
        })
        .await;
        // The route's request timeout is far longer than drain.timeout, so
        // only the drain deadline can end the stuck request in time.
        let yaml = yaml_with(
            "",
            &upstream_yaml("app", fake.addr(), ""),
            &route_yaml(
                "api",
                "      path_prefix: /api",
                "app",
                "    timeouts:\n      request: 300s",
            ),
        )
        .replace(
            "drain:\n  grace: 0s\n  timeout: 5s\n",
            "drain:\n  grace: 0s\n  timeout: 1s\n",
        );
        let mut h = ProxyHarness::start(&yaml).await;
        let client = h1_client();
        let url = h.url("/api/stuck");
        let stuck = tokio::spawn(async move {
            client
                .request(Request::get(url).body(empty()).unwrap())
                .await
        });
        fake.wait_hits(1).await;
        h.drain();
        let proxy = h.take_proxy();
        // drain.timeout is 1 s; 15 s is a generous bound for a loaded machine.
        within(
            15,
            "proxy to stop once drain.timeout (1s) expired despite a stuck request",
            proxy.stopped(),
        )
        .await;
        // The stuck client is not left hanging forever.
        let _ = within(15, "stuck client to be released", stuck).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_idle_keep_alive_connections() {
    within(60, "test", async {
        let fake = FakeUpstream::ok().await;
        let h = ProxyHarness::start(&basic_yaml(fake.addr())).await;
        let mut c = RawConn::connect(h.addr()).await;
        c.send(b"GET /a HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
        let resp = c.read_response().await;
        assert_eq!(resp.status, 200);
        assert_eq!(c.read_body(&resp).await, b"ok");
        h.drain();
        assert!(
            within(
                20,
                "idle keep-alive connection to be closed on drain",
                c.closed()
            )
            .await
        );
        within(20, "proxy to stop", h.stopped()).await;
    })
    .await
}
