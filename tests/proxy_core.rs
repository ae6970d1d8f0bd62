//! Black-box tests of the proxy core: forwarding, streaming,
//! protocols, header handling, routing, limits and local replies.
//!
//! Every test runs against real sockets on 127.0.0.1:0 and is bounded in time.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use support::*;
use tokio::sync::Notify;

const MIB: usize = 1024 * 1024;

/// (method, path, request headers, expected upstream body)
type RouteCase = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
);

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn reason(resp: &Response<hyper::body::Incoming>) -> Option<&str> {
    header_str(resp.headers(), "x-spillway-reason")
}

// ---------------------------------------------------------------------------
// Bodies and streaming
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_post_bodies_arrive_intact() {
    within(120, "test", async {
        let download = Bytes::from(random_bytes(3 * MIB + 17, 1));
        let download_sha = sha256_hex(&download);
        let dl = download.clone();
        let fake = FakeUpstream::with_handler(move |req, _ctx| {
            let dl = dl.clone();
            async move {
                if req.method() == http::Method::GET {
                    Ok(Response::new(full(dl)))
                } else {
                    Ok(reply::echo(req))
                }
            }
        })
        .await;
        let h = ProxyHarness::start(&basic_yaml(fake.addr())).await;

        // GET: a 3 MiB response body.
        let resp = h.get("/files/blob?version=3").await;
        assert_eq!(resp.status(), StatusCode::OK);
        let got = collect_body(resp.into_body()).await;
        assert_eq!(got.len(), download.len(), "GET body length");
        assert_eq!(sha256_hex(&got), download_sha, "GET body hash");
        let seen = fake.last_request();
        assert_eq!(seen.method, http::Method::GET);
        assert_eq!(seen.uri.path(), "/files/blob");
        assert_eq!(seen.uri.query(), Some("version=3"));

        // POST: a 4 MiB request body, echoed back.
        let upload = random_bytes(4 * MIB + 3, 2);
        let upload_sha = sha256_hex(&upload);
        let req = Request::post("/upload?kind=raw")
            .header("content-type", "application/octet-stream")
            .body(full(upload))
            .unwrap();
        let resp = h.send(req).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header_str(resp.headers(), "x-echo-method"), Some("POST"));
        assert_eq!(
            header_str(resp.headers(), "x-echo-uri"),
            Some("/upload?kind=raw")
        );
        let got = collect_body(resp.into_body()).await;
        assert_eq!(
            sha256_hex(&got),
            upload_sha,
            "POST body hash (as the upstream saw it)"
        );
        fake.assert_healthy();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_path_and_query_pass_unchanged() {
    within(60, "test", async {
        let fake = FakeUpstream::echo().await;
        let h = ProxyHarness::start(&basic_yaml(fake.addr())).await;
        let cases = [
            ("PUT", "/a%20b/c;p=1?q=x%2Fy&z=&z=2"),
            ("DELETE", "/items/42?force=true"),
            ("PATCH", "/items/42"),
            ("OPTIONS", "/cors/preflight"),
            ("GET", "/unicode/%E2%9C%93?emoji=%F0%9F%98%80"),
        ];
        for (method, pq) in cases {
            let req = Request::builder()
                .method(method)
                .uri(pq)
                .body(full(format!("body of {method}")))
                .unwrap();
            let resp = h.send(req).await;
            assert_eq!(resp.status(), StatusCode::OK, "{method} {pq}");
            assert_eq!(header_str(resp.headers(), "x-echo-method"), Some(method));
            assert_eq!(header_str(resp.headers(), "x-echo-uri"), Some(pq));
            let body = collect_body(resp.into_body()).await;
            assert_eq!(&body[..], format!("body of {method}").as_bytes());
        }
        // HEAD: no body, status and headers from the upstream.
        let req = Request::head("/head/me").body(empty()).unwrap();
        let resp = h.send(req).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(header_str(resp.headers(), "x-echo-method"), Some("HEAD"));
        assert_eq!(fake.hits(), cases.len() as u64 + 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_response_arrives_incrementally() {
    within(60, "test", async {
        let release = Arc::new(Notify::new());
        let r = release.clone();
        let fake = FakeUpstream::with_handler(move |_req, ctx| {
            let r = r.clone();
            async move {
                let (tx, body) = body_channel();
                ctx.spawn(async move {
                    tx.data("first-chunk;").await;
                    // The last chunk is held back until the client has the first.
                    r.notified().await;
                    tx.data("last-chunk").await;
                });
                Ok(Response::new(body))
            }
        })
        .await;
        let h = ProxyHarness::start(&basic_yaml(fake.addr())).await;

        let resp = within(
            20,
            "response headers while the body is still open",
            h.get("/stream"),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut got = Vec::new();
        within(
            20,
            "the first chunk to reach the client before the upstream sent the last",
            async {
                while !contains(&got, b"first-chunk;") {
                    let frame = body
                        .frame()
                        .await
                        .expect("body ended early")
                        .expect("body error");
                    if let Ok(d) = frame.into_data() {
                        got.extend_from_slice(&d);
                    }
                }
            },
        )
        .await;
        assert!(!contains(&got, b"last-chunk"));
        release.notify_one();
        let rest = collect_body(body).await;
        got.extend_from_slice(&rest);
        assert_eq!(got, b"first-chunk;last-chunk");
        fake.assert_healthy();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_request_arrives_incrementally() {
    within(60, "test", async {
        let got_first = Arc::new(Notify::new());
        let g = got_first.clone();
        let fake = FakeUpstream::with_handler(move |req, _ctx| {
            let g = g.clone();
            async move {
                let mut body = req.into_body();
                let mut all = Vec::new();
                let mut signalled = false;
                while let Some(frame) = body.frame().await {
                    let Ok(frame) = frame else { return Err(Reset) };
                    if let Ok(d) = frame.into_data() {
                        all.extend_from_slice(&d);
                    }
                    if !signalled && contains(&all, b"part-1;") {
                        signalled = true;
                        g.notify_one();
                    }
                }
                Ok(reply::status_body(200, all))
            }
        })
        .await;
        let h = ProxyHarness::start(&basic_yaml(fake.addr())).await;

        let (tx, body) = body_channel();
        let client = h.h1().clone();
        let req = Request::post(h.url("/ingest")).body(body).unwrap();
        let pending = tokio::spawn(async move { client.request(req).await });
        assert!(tx.data("part-1;").await);
        within(
            20,
            "the upstream to receive the first part before the client sent the rest",
            got_first.notified(),
        )
        .await;
        assert!(tx.data("part-2").await);
        drop(tx);
        let resp = pending.await.unwrap().expect("request failed");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(&collect_body(resp.into_body()).await[..], b"part-1;part-2");
    })
    .await
}

/// Full duplex over HTTP/1.1 on both legs: the upstream answers at once and
/// echoes each part of the request body as it arrives, so the client sends
/// its second part only after the first came back through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_bodies_stream_at_the_same_time() {
    within(60, "test", async {
        let fake = FakeUpstream::echo().await;
        let h = ProxyHarness::start(&basic_yaml(fake.addr())).await;
        let (tx, body) = body_channel();
        let req = Request::post(h.url("/duplex")).body(body).unwrap();
        let client = h.h1().clone();
        let pending = tokio::spawn(async move { client.request(req).await });
        assert!(tx.data("ping-1;").await);
        let resp = within(20, "response head while the request streams", pending)
            .await
            .unwrap()
            .expect("request failed");
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut got = Vec::new();
        while !contains(&got, b"ping-1;") {
            let frame = within(20, "the first part echoed back", body.frame())
                .await
                .expect("body ended early")
                .expect("body failed");
            if let Ok(d) = frame.into_data() {
                got.extend_from_slice(&d);
            }
        }
        assert!(tx.data("ping-2").await);
        drop(tx);
        while let Some(frame) = within(20, "the rest of the echo", body.frame()).await {
            if let Ok(d) = frame.expect("body failed").into_data() {
                got.extend_from_slice(&d);
            }
        }
        assert_eq!(&got[..], b"ping-1;ping-2");
    })
    .await
}

const LARGE: u64 = 256 * 1024 * 1024;
/// Resident memory may grow by less than this while LARGE bytes stream
/// through (the proxy, the fake upstream and the client share this process).
const RSS_BUDGET: u64 = 160 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_streams_with_bounded_memory() {
    within(300, "256 MiB upload", async {
        let peak_rss = Arc::new(AtomicU64::new(0));
        let p = peak_rss.clone();
        let fake = FakeUpstream::with_handler(move |req, _ctx| {
            let p = p.clone();
            async move {
                let mut body = req.into_body();
                let mut verifier = PatternVerifier::new(false);
                let mut next_sample = 0;
                while let Some(frame) = body.frame().await {
                    let Ok(frame) = frame else { return Err(Reset) };
                    if let Ok(d) = frame.into_data() {
                        verifier.feed(&d);
                    }
                    if verifier.len() >= next_sample {
                        p.fetch_max(rss_bytes(), Ordering::SeqCst);
                        next_sample += 4 * MIB as u64;
                    }
                }
                Ok(reply::status_body(200, verifier.len().to_string()))
            }
        })
        .await;
        let yaml = yaml_with(
            "",
            &upstream_yaml("app", fake.addr(), ""),
            &route_yaml(
                "all",
                "      path_prefix: /",
                "app",
                "    max_request_body: 1GiB",
            ),
        );
        let h = ProxyHarness::start(&yaml).await;
        let baseline = rss_bytes();
        let req = Request::post("/upload")
            .body(PatternBody::sized(LARGE).boxed())
            .unwrap();
        let resp = h.send(req).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let body = collect_body(resp.into_body()).await;
        assert_eq!(
            String::from_utf8_lossy(&body),
            LARGE.to_string(),
            "bytes verified upstream"
        );
        let growth = peak_rss.load(Ordering::SeqCst).saturating_sub(baseline);
        assert!(
            growth < RSS_BUDGET,
            "memory grew by {} MiB while streaming {} MiB (must stay bounded)",
            growth >> 20,
            LARGE >> 20
        );
        fake.assert_healthy();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_download_streams_with_bounded_memory() {
    within(300, "256 MiB download", async {
        let fake = FakeUpstream::with_handler(|_req, _ctx| async {
            Ok(Response::new(PatternBody::chunked(LARGE).boxed()))
        })
        .await;
        let h = ProxyHarness::start(&basic_yaml(fake.addr())).await;
        let baseline = rss_bytes();
        let mut peak = baseline;
        let resp = h.get("/download").await;
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut verifier = PatternVerifier::new(false);
        let mut next_sample = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("download body error");
            if let Ok(d) = frame.into_data() {
                verifier.feed(&d);
            }
            if verifier.len() >= next_sample {
                peak = peak.max(rss_bytes());
                next_sample += 4 * MIB as u64;
            }
        }
        assert_eq!(verifier.len(), LARGE, "complete download");
        let growth = peak.saturating_sub(baseline);
        assert!(
            growth < RSS_BUDGET,
            "memory grew by {} MiB while streaming {} MiB (must stay bounded)",
            growth >> 20,
            LARGE >> 20
        );
    })
    .await
}

// ---------------------------------------------------------------------------
// Trailers, upgrades, protocols
// ---------------------------------------------------------------------------

fn h2_upstream_yaml(addr: SocketAddr) -> String {
    yaml_with(
        "",
        &upstream_yaml("app", addr, "    protocol: http2"),
        &route_yaml("all", "      path_prefix: /", "app", ""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_trailers_pass_through_h2() {
    within(60, "test", async {
        let fake = FakeUpstream::builder()
            .trailers("payload", &[("grpc-status", "0"), ("x-checksum", "abc123")])
            .start()
            .await;
        let h = ProxyHarness::start(&h2_upstream_yaml(fake.addr())).await;
        let req = Request::post("/svc/Method")
            .header("te", "trailers")
            .body(full("request"))
            .unwrap();
        let resp = h.send_h2(req).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), Version::HTTP_2);
        let collected = resp.into_body().collect().await.expect("body");
        let trailers = collected
            .trailers()
            .cloned()
            .expect("trailers must pass through");
        assert_eq!(header_str(&trailers, "x-checksum"), Some("abc123"));
        assert_eq!(header_str(&trailers, "grpc-status"), Some("0"));
        assert_eq!(&collected.to_bytes()[..], b"payload");
        assert_eq!(fake.last_request().version, Version::HTTP_2);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_trailers_pass_through_h2() {
    within(60, "test", async {
        let fake = FakeUpstream::with_handler(|req, _ctx| async move {
            let collected = match req.into_body().collect().await {
                Ok(c) => c,
                Err(_) => return Err(Reset),
            };
            let trailer = collected
                .trailers()
                .and_then(|t| t.get("x-request-checksum"))
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_else(|| "<none>".into());
            Ok(Response::builder()
                .header("x-got-trailer", trailer)
                .body(full(collected.to_bytes()))
                .unwrap())
        })
        .await;
        let h = ProxyHarness::start(&h2_upstream_yaml(fake.addr())).await;
        let (tx, body) = body_channel();
        let client = h.h2().clone();
        let mut req = Request::post(h.url("/upload")).body(body).unwrap();
        *req.version_mut() = Version::HTTP_2;
        let pending = tokio::spawn(async move { client.request(req).await });
        assert!(tx.data("streamed").await);
        let mut t = http::HeaderMap::new();
        t.insert("x-request-checksum", "feedbeef".parse().unwrap());
        assert!(tx.trailers(t).await);
        drop(tx);
        let resp = pending.await.unwrap().expect("request failed");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            header_str(resp.headers(), "x-got-trailer"),
            Some("feedbeef")
        );
        assert_eq!(&collect_body(resp.into_body()).await[..], b"streamed");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_trailers_pass_through_h1_chunked() {
    within(60, "test", async {
        let fake = FakeUpstream::builder()
            .trailers("chunked payload", &[("x-checksum", "h1trailer")])
            .start()
            .await;
        let h = ProxyHarness::start(&basic_yaml(fake.addr())).await;
        // HTTP/1.1 trailers are only sent to a client that accepts them.
        let req = Request::get("/h1-trailers")
            .header("te", "trailers")
            .body(empty())
            .unwrap();
        let resp = h.send(req).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            fake.last_request().header("te"),
            Some("trailers"),
            "`TE: trailers` is end-to-end and must reach the upstream"
        );
        let collected = resp.into_body().collect().await.expect("body");
        let trailers = collected
            .trailers()
            .cloned()
            .expect("HTTP/1.1 chunked trailers must pass through");
        assert_eq!(header_str(&trailers, "x-checksum"), Some("h1trailer"));
        assert_eq!(&collected.to_bytes()[..], b"chunked payload");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_tunnelled() {
    within(60, "test", async {
        let fake = FakeUpstream::builder().upgrade_echo().start().await;
        let h = ProxyHarness::start(&basic_yaml(fake.addr())).await;
        let mut c = RawConn::connect(h.addr()).await;
        c.send(
            b"GET /ws/chat HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await;
        let resp = c.read_response().await;
        assert_eq!(resp.status, 101, "{resp:?}");
        assert!(resp.header("upgrade").unwrap_or("").eq_ignore_ascii_case("websocket"), "{resp:?}");
        assert!(c.take_buffered().is_empty(), "no bytes before the tunnel");
        let seen = fake.last_request();
        assert_eq!(seen.uri.path(), "/ws/chat");
        assert!(seen.header("upgrade").unwrap_or("").eq_ignore_ascii_case("websocket"));
        assert_eq!(seen.header("sec-websocket-key"), Some("dGhlIHNhbXBsZSBub25jZQ=="));

        // Bytes flow both ways through the tunnel.
        for round in 0..8u64 {
            let msg = random_bytes(16 * 1024, 100 + round);
            c.send(&msg).await;
            let echoed = c.read_exact_buffered(msg.len()).await;
            assert!(echoed == msg, "round {round}: tunnelled bytes differ");
        }
        fake.assert_healthy();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_and_h2c_work_on_both_sides_in_every_combination() {
    within(120, "test", async {
        let up1 = FakeUpstream::echo().await;
        let up2 = FakeUpstream::echo().await;
        let upstreams = format!(
            "{}\n{}",
            upstream_yaml("h1app", up1.addr(), "    protocol: http1"),
            upstream_yaml("h2app", up2.addr(), "    protocol: http2")
        );
        let routes = format!(
            "{}\n{}",
            route_yaml("to-h1", "      path_prefix: /h1", "h1app", ""),
            route_yaml("to-h2", "      path_prefix: /h2", "h2app", "")
        );
        let h = ProxyHarness::start(&yaml_with("    protocol: auto", &upstreams, &routes)).await;
        for client_h2 in [false, true] {
            for (prefix, fake, up_version) in [
                ("/h1", &up1, Version::HTTP_11),
                ("/h2", &up2, Version::HTTP_2),
            ] {
                let path = format!("{prefix}/from-{}", if client_h2 { "h2c" } else { "h1" });
                let data = random_bytes(MIB + 5, path.len() as u64);
                let req = Request::post(path.as_str())
                    .body(full(data.clone()))
                    .unwrap();
                let resp = if client_h2 {
                    h.send_h2(req).await
                } else {
                    h.send(req).await
                };
                assert_eq!(resp.status(), StatusCode::OK, "{path}");
                let client_version = if client_h2 {
                    Version::HTTP_2
                } else {
                    Version::HTTP_11
                };
                assert_eq!(
                    resp.version(),
                    client_version,
                    "{path}: client side protocol"
                );
                let got = collect_body(resp.into_body()).await;
                assert_eq!(sha256_hex(&got), sha256_hex(&data), "{path}: body");
                let seen = fake
                    .requests()
                    .into_iter()
                    .find(|r| r.uri.path() == path)
                    .unwrap_or_else(|| panic!("{path} never reached its upstream"));
                assert_eq!(seen.version, up_version, "{path}: upstream side protocol");
            }
        }
        // A chunked HTTP/1.1 upload: Transfer-Encoding is hop-by-hop, the body
        // arrives intact on either upstream protocol.
        for (path, fake) in [("/h1/chunked", &up1), ("/h2/chunked", &up2)] {
            let mut c = RawConn::connect(h.addr()).await;
            c.send(
                format!(
                    "POST {path} HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n\
                     5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
                )
                .as_bytes(),
            )
            .await;
            let resp = c.read_response().await;
            assert_eq!(resp.status, 200, "{path}: {resp:?}");
            assert_eq!(c.read_body(&resp).await, b"hello world", "{path}");
            let seen = fake
                .requests()
                .into_iter()
                .find(|r| r.uri.path() == path)
                .unwrap_or_else(|| panic!("{path} never reached its upstream"));
            if seen.version == Version::HTTP_2 {
                assert_eq!(seen.header("transfer-encoding"), None, "{path}");
            }
        }
    })
    .await
}

// ---------------------------------------------------------------------------
// Headers
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_request_headers_are_stripped_and_end_to_end_kept() {
    within(60, "test", async {
        let fake = FakeUpstream::ok().await;
        let h = ProxyHarness::start(&basic_yaml(fake.addr())).await;
        let mut c = RawConn::connect(h.addr()).await;
        c.send(
            b"GET /hop HTTP/1.1\r\n\
              Host: app.example\r\n\
              Connection: keep-alive, X-Hop-Named\r\n\
              X-Hop-Named: secret\r\n\
              Keep-Alive: timeout=5, max=100\r\n\
              Proxy-Connection: keep-alive\r\n\
              TE: trailers\r\n\
              X-End-To-End: kept\r\n\
              Cache-Control: no-cache\r\n\
              Accept: */*\r\n\
              X-Multi: a\r\n\
              X-Multi: b\r\n\
              \r\n",
        )
        .await;
        let resp = c.read_response().await;
        assert_eq!(resp.status, 200);
        let seen = fake.last_request();
        assert_eq!(
            seen.header("x-hop-named"),
            None,
            "header named by Connection must be stripped"
        );
        assert_eq!(
            seen.header("keep-alive"),
            None,
            "Keep-Alive must be stripped"
        );
        assert_eq!(
            seen.header("proxy-connection"),
            None,
            "Proxy-Connection must be stripped"
        );
        if let Some(conn) = seen.header_joined("connection") {
            assert!(
                !conn.to_ascii_lowercase().contains("x-hop-named"),
                "client's Connection header forwarded: {conn}"
            );
        }
        assert_eq!(seen.header("te"), Some("trailers"), "TE: trailers is kept");
        assert_eq!(seen.header("x-end-to-end"), Some("kept"));
        assert_eq!(seen.header("cache-control"), Some("no-cache"));
        assert_eq!(seen.header("accept"), Some("*/*"));
        assert_eq!(
            seen.header_joined("x-multi").as_deref(),
            Some("a, b"),
            "repeated header kept in order"
        );

        // TE with codings other than trailers is hop-by-hop.
        let mut c = RawConn::connect(h.addr()).await;
        c.send(b"GET /hop2 HTTP/1.1\r\nHost: app.example\r\nTE: gzip, deflate\r\n\r\n")
            .await;
        assert_eq!(c.read_response().await.status, 200);
        let seen = fake.last_request();
        assert_eq!(seen.uri.path(), "/hop2");
        let te = seen.header_joined("te").unwrap_or_default();
        assert!(
            !te.contains("gzip") && !te.contains("deflate"),
            "TE codings forwarded: {te}"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_header_is_stripped_when_not_upgrading() {
    within(60, "test", async {
        let fake = FakeUpstream::ok().await;
        let h = ProxyHarness::start(&basic_yaml(fake.addr())).await;
        let mut c = RawConn::connect(h.addr()).await;
        // Upgrade without `Connection: upgrade` is not an upgrade request.
        c.send(b"GET /plain HTTP/1.1\r\nHost: app.example\r\nUpgrade: websocket\r\n\r\n")
            .await;
        let resp = c.read_response().await;
        assert_eq!(resp.status, 200);
        assert_eq!(c.read_body(&resp).await, b"ok");
        let seen = fake.last_request();
        assert_eq!(seen.uri.path(), "/plain");
        assert_eq!(
            seen.header("upgrade"),
            None,
            "Upgrade forwarded although not upgrading"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_headers_are_stripped_and_end_to_end_kept() {
    within(60, "test", async {
        let fake = FakeUpstream::builder()
            .header("connection", "x-resp-hop")
            .header("x-resp-hop", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("x-e2e", "kept")
            .header("cache-control", "max-age=60")
            .body("hello")
            .start()
            .await;
        let h = ProxyHarness::start(&basic_yaml(fake.addr())).await;
        for h2 in [false, true] {
            let req = Request::get("/resp-hop").body(empty()).unwrap();
            let resp = if h2 {
                h.send_h2(req).await
            } else {
                h.send(req).await
            };
            assert_eq!(resp.status(), StatusCode::OK, "h2={h2}");
            let hd = resp.headers();
            assert_eq!(
                header_str(hd, "x-resp-hop"),
                None,
                "h2={h2}: named by Connection"
            );
            assert_eq!(header_str(hd, "keep-alive"), None, "h2={h2}: Keep-Alive");
            assert_eq!(
                header_str(hd, "proxy-connection"),
                None,
                "h2={h2}: Proxy-Connection"
            );
            if let Some(conn) = header_joined(hd, "connection") {
                assert!(
                    !conn.contains("x-resp-hop"),
                    "h2={h2}: upstream Connection forwarded: {conn}"
                );
            }
            assert_eq!(header_str(hd, "x-e2e"), Some("kept"), "h2={h2}");
            assert_eq!(
                header_str(hd, "cache-control"),
                Some("max-age=60"),
                "h2={h2}"
            );
            assert_eq!(&collect_body(resp.into_body()).await[..], b"hello");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_request_id_is_added_when_absent_and_kept_when_present() {
    within(60, "test", async {
        let fake = FakeUpstream::ok().await;
        let h = ProxyHarness::start(&basic_yaml(fake.addr())).await;

        assert_eq!(h.get("/one").await.status(), StatusCode::OK);
        let id1 = fake
            .last_request()
            .header("x-request-id")
            .map(str::to_string);
        assert_eq!(h.get("/two").await.status(), StatusCode::OK);
        let id2 = fake
            .last_request()
            .header("x-request-id")
            .map(str::to_string);
        let id1 = id1.expect("x-request-id added when absent");
        let id2 = id2.expect("x-request-id added when absent");
        assert!(!id1.is_empty());
        assert_ne!(id1, id2, "request ids must be unique");

        let req = Request::get("/three")
            .header("x-request-id", "client-id-42")
            .body(empty())
            .unwrap();
        assert_eq!(h.send(req).await.status(), StatusCode::OK);
        assert_eq!(fake.hits_for_request_id("client-id-42"), 1);
        assert_eq!(
            fake.last_request().header_joined("x-request-id").as_deref(),
            Some("client-id-42"),
            "a client's x-request-id is kept, not replaced or duplicated"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_are_appended_and_set() {
    within(60, "test", async {
        let fake = FakeUpstream::ok().await;
        let h = ProxyHarness::start(&basic_yaml(fake.addr())).await;

        let req = Request::get("/fwd")
            .header("host", "api.example.test")
            .header("x-forwarded-for", "203.0.113.7")
            .body(empty())
            .unwrap();
        assert_eq!(h.send(req).await.status(), StatusCode::OK);
        let seen = fake.last_request();
        assert_eq!(
            seen.header_joined("x-forwarded-for").as_deref(),
            Some("203.0.113.7, 127.0.0.1")
        );
        assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
        assert_eq!(seen.header("x-forwarded-host"), Some("api.example.test"));

        let req = Request::get("/fwd2")
            .header("host", "other.example.test")
            .body(empty())
            .unwrap();
        assert_eq!(h.send(req).await.status(), StatusCode::OK);
        let seen = fake.last_request();
        assert_eq!(
            seen.header_joined("x-forwarded-for").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(seen.header("x-forwarded-host"), Some("other.example.test"));

        // HTTP/2: the host comes from :authority.
        let req = Request::get("/fwd3").body(empty()).unwrap();
        assert_eq!(h.send_h2(req).await.status(), StatusCode::OK);
        let seen = fake.last_request();
        assert_eq!(
            seen.header("x-forwarded-host"),
            Some(h.addr().to_string().as_str())
        );
        assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
        assert_eq!(
            seen.header_joined("x-forwarded-for").as_deref(),
            Some("127.0.0.1")
        );
    })
    .await
}

// ---------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_first_wins_by_prefix_exact_regex_method_host_and_headers() {
    within(60, "test", async {
        let a = FakeUpstream::builder().body("A").start().await;
        let b = FakeUpstream::builder().body("B").start().await;
        let upstreams = format!(
            "{}\n{}",
            upstream_yaml("a", a.addr(), ""),
            upstream_yaml("b", b.addr(), "")
        );
        let routes = [
            route_yaml("first", "      path_prefix: /first", "a", ""),
            route_yaml("shadowed", "      path_prefix: /first/sub", "b", ""),
            route_yaml("exact", "      path_exact: /exact", "b", ""),
            route_yaml("regex", "      path_regex: \"^/items/[0-9]+$\"", "b", ""),
            route_yaml(
                "deletes",
                "      path_prefix: /m\n      methods: [DELETE]",
                "b",
                "",
            ),
            route_yaml(
                "by-host",
                "      path_prefix: /\n      host: \"*.b.test\"",
                "b",
                "",
            ),
            route_yaml(
                "exact-host",
                "      path_prefix: /\n      host: exact.test",
                "b",
                "",
            ),
            route_yaml(
                "by-header",
                "      path_prefix: /\n      headers:\n        x-backend: b",
                "b",
                "",
            ),
            route_yaml("rest", "      path_prefix: /", "a", ""),
        ]
        .join("\n");
        let h = ProxyHarness::start(&yaml_with("", &upstreams, &routes)).await;

        let cases: &[RouteCase] = &[
            ("GET", "/first/sub/x", &[], "A"),
            ("GET", "/exact", &[], "B"),
            ("GET", "/exact/more", &[], "A"),
            ("GET", "/items/123", &[], "B"),
            ("GET", "/items/abc", &[], "A"),
            ("DELETE", "/m/1", &[], "B"),
            ("GET", "/m/1", &[], "A"),
            ("GET", "/h", &[("host", "api.b.test")], "B"),
            ("GET", "/h", &[("host", "b.test.evil")], "A"),
            ("GET", "/h", &[("host", "exact.test")], "B"),
            ("GET", "/hd", &[("x-backend", "b")], "B"),
            ("GET", "/hd", &[("x-backend", "c")], "A"),
        ];
        for (method, path, headers, want) in cases {
            let mut req = Request::builder().method(*method).uri(*path);
            for (k, v) in headers.iter() {
                req = req.header(*k, *v);
            }
            let resp = h.send(req.body(empty()).unwrap()).await;
            assert_eq!(resp.status(), StatusCode::OK, "{method} {path} {headers:?}");
            let body = collect_body(resp.into_body()).await;
            assert_eq!(
                String::from_utf8_lossy(&body),
                *want,
                "{method} {path} {headers:?} went to the wrong upstream"
            );
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_matching_route_is_404_no_route() {
    within(60, "test", async {
        let fake = FakeUpstream::ok().await;
        let routes = route_yaml(
            "api",
            "      path_prefix: /api\n      methods: [GET]",
            "app",
            "",
        );
        let h = ProxyHarness::start(&yaml_with(
            "",
            &upstream_yaml("app", fake.addr(), ""),
            &routes,
        ))
        .await;

        let resp = h.get("/other").await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(reason(&resp), Some("no_route"));

        let resp = h
            .send(Request::post("/api/x").body(full("x")).unwrap())
            .await;
        assert_eq!(
            resp.status(),
            StatusCode::NOT_FOUND,
            "method not in the route"
        );
        assert_eq!(reason(&resp), Some("no_route"));

        let resp = h
            .send_h2(Request::get("/elsewhere").body(empty()).unwrap())
            .await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(reason(&resp), Some("no_route"));

        assert_eq!(fake.hits(), 0, "nothing reaches the upstream");
        assert_eq!(h.get("/api/ok").await.status(), StatusCode::OK);
        assert_eq!(fake.hits(), 1);
    })
    .await
}

// ---------------------------------------------------------------------------
// Limits: body size, header size, slow headers, connections, idle
// ---------------------------------------------------------------------------

fn small_body_yaml(addr: SocketAddr) -> String {
    yaml_with(
        "",
        &upstream_yaml("app", addr, ""),
        &route_yaml(
            "all",
            "      path_prefix: /",
            "app",
            "    max_request_body: 1KiB",
        ),
    )
}

/// A handler that reads the whole request body before answering.
async fn consume_then_ok(req: Request<hyper::body::Incoming>) -> HandlerResult {
    match req.into_body().collect().await {
        Ok(b) => Ok(reply::status_body(200, b.to_bytes().len().to_string())),
        Err(_) => Err(Reset),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_limit_by_content_length_is_413_up_front() {
    within(60, "test", async {
        let fake = FakeUpstream::with_handler(|req, _| consume_then_ok(req)).await;
        let h = ProxyHarness::start(&small_body_yaml(fake.addr())).await;

        // Headers only: the proxy must answer from Content-Length alone.
        let mut c = RawConn::connect(h.addr()).await;
        c.send(b"POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 4096\r\n\r\n")
            .await;
        let resp = within(15, "413 before the body was sent", c.read_response()).await;
        assert_eq!(resp.status, 413);
        assert_eq!(resp.header("x-spillway-reason"), Some("body_too_large"));
        assert_eq!(fake.hits(), 0, "an oversized request is not forwarded");

        // Within the limit: forwarded.
        let resp = h
            .send(
                Request::post("/upload")
                    .body(full(vec![7u8; 1000]))
                    .unwrap(),
            )
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(&collect_body(resp.into_body()).await[..], b"1000");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chunked_body_crossing_limit_is_413() {
    within(60, "test", async {
        let fake = FakeUpstream::with_handler(|req, _| consume_then_ok(req)).await;
        let h = ProxyHarness::start(&small_body_yaml(fake.addr())).await;

        let mut c = RawConn::connect(h.addr()).await;
        c.send(b"POST /upload HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await;
        // 3 x 600 bytes = 1800 > 1 KiB; the body is never finished.
        for _ in 0..3 {
            let mut chunk = b"258\r\n".to_vec();
            chunk.extend(std::iter::repeat_n(b'x', 600));
            chunk.extend_from_slice(b"\r\n");
            if c.try_send(&chunk).await.is_err() {
                break;
            }
        }
        let resp = within(
            15,
            "413 once the streamed body crossed the limit",
            c.read_response(),
        )
        .await;
        assert_eq!(resp.status, 413);
        assert_eq!(resp.header("x-spillway-reason"), Some("body_too_large"));
        fake.assert_healthy();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431() {
    within(60, "test", async {
        let fake = FakeUpstream::ok().await;
        let yaml = yaml_with(
            "    max_header_bytes: 16KiB",
            &upstream_yaml("app", fake.addr(), ""),
            &route_yaml("all", "      path_prefix: /", "app", ""),
        );
        let h = ProxyHarness::start(&yaml).await;

        // Well under the limit: served.
        let mut c = RawConn::connect(h.addr()).await;
        let big = "a".repeat(6 * 1024);
        c.send(format!("GET /ok HTTP/1.1\r\nHost: app.test\r\nX-Big: {big}\r\n\r\n").as_bytes())
            .await;
        assert_eq!(c.read_response().await.status, 200);

        // Over the limit: 431.
        let mut c = RawConn::connect(h.addr()).await;
        let huge = "b".repeat(20 * 1024);
        let _ = c
            .try_send(
                format!("GET /big HTTP/1.1\r\nHost: app.test\r\nX-Huge: {huge}\r\n\r\n").as_bytes(),
            )
            .await;
        let resp = within(15, "431", c.read_response()).await;
        assert_eq!(resp.status, 431);
        assert_eq!(fake.hits_for_path("/big"), 0);
    })
    .await
}

/// GET `path` on a raw keep-alive connection: 200 with the fake's `ok`.
async fn get_ok(c: &mut RawConn, path: &str) {
    c.send(format!("GET {path} HTTP/1.1\r\nHost: app.test\r\n\r\n").as_bytes())
        .await;
    let resp = c.read_response().await;
    assert_eq!(resp.status, 200, "GET {path}: {resp:?}");
    assert_eq!(c.read_body(&resp).await, b"ok");
}

/// Requests of every kind pipelined on one connection in one write: plain
/// GETs and HEADs (the HTTP/1.1 fast path), requests with bodies and
/// `Connection: close` (hyper) are answered in order, each with its own
/// body, and the upstream sees each once. The same with the fast path off
/// (`http1_fast_path: false`), where hyper serves them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_plain_and_body_requests_are_answered_in_order() {
    for listener in ["", "    http1_fast_path: false"] {
        pipelined_requests_answered_in_order(listener).await;
    }
}

async fn pipelined_requests_answered_in_order(listener: &str) {
    within(60, "test", async {
        let fake = FakeUpstream::with_handler(|req: Request<hyper::body::Incoming>, _| async move {
            let label = format!("{} {}", req.method(), req.uri().path());
            match req.into_body().collect().await {
                Ok(b) => Ok(reply::status_body(200, format!("{label} {}", b.to_bytes().len()))),
                Err(_) => Err(Reset),
            }
        })
        .await;
        let h = one_route_proxy(&fake, listener).await;
        let mut c = RawConn::connect(h.addr()).await;
        c.send(
            b"GET /1 HTTP/1.1\r\nHost: app.test\r\n\r\n\
              POST /2 HTTP/1.1\r\nHost: app.test\r\ncontent-length: 3\r\n\r\nabc\
              GET /3 HTTP/1.1\r\nHost: app.test\r\n\r\n\
              HEAD /4 HTTP/1.1\r\nHost: app.test\r\n\r\n\
              PUT /5 HTTP/1.1\r\nHost: app.test\r\ntransfer-encoding: chunked\r\n\r\n2\r\nxy\r\n0\r\n\r\n\
              GET /6 HTTP/1.1\r\nHost: app.test\r\nconnection: close\r\n\r\n",
        )
        .await;
        for expected in ["GET /1 0", "POST /2 3", "GET /3 0", "", "PUT /5 2", "GET /6 0"] {
            let resp = c.read_response().await;
            assert_eq!(resp.status, 200, "{expected}: {resp:?}");
            if expected.is_empty() {
                // HEAD: the length of the GET's body, and no body.
                assert_eq!(resp.header("content-length"), Some("9"), "{resp:?}");
                continue;
            }
            assert_eq!(c.read_body(&resp).await, expected.as_bytes());
        }
        match within(10, "the close after /6", c.read_outcome()).await {
            RawOutcome::Closed { partial, .. } => assert!(partial.is_empty(), "{partial:?}"),
            RawOutcome::Response(r) => panic!("a response after connection: close: {r:?}"),
        }
        let paths: Vec<String> = fake.requests().iter().map(|r| r.uri.path().to_string()).collect();
        assert_eq!(paths, ["/1", "/2", "/3", "/4", "/5", "/6"]);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_get_408_or_close() {
    within(60, "test", async {
        let fake = FakeUpstream::ok().await;
        let h = one_route_proxy(&fake, "    request_header_timeout: 300ms").await;
        let mut c = RawConn::connect(h.addr()).await;
        c.send(b"GET /slow HTTP/1.1\r\nHost: app.test\r\nX-Slow: ")
            .await;
        // The header block is never finished.
        match within(
            10,
            "slow-header connection to be answered or closed",
            c.read_outcome(),
        )
        .await
        {
            RawOutcome::Response(resp) => assert_eq!(resp.status, 408, "{resp:?}"),
            RawOutcome::Closed { partial, .. } => assert!(
                partial.is_empty() || partial.starts_with(b"HTTP/1.1 408"),
                "unexpected bytes: {:?}",
                String::from_utf8_lossy(&partial)
            ),
        }
        assert_eq!(fake.hits(), 0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_outlives_the_header_timeout_and_a_slow_next_head_gets_408() {
    within(60, "test", async {
        let fake = FakeUpstream::ok().await;
        // Idle timeout stays at its 60 s default.
        let h = one_route_proxy(&fake, "    request_header_timeout: 300ms").await;
        let mut c = RawConn::connect(h.addr()).await;
        get_ok(&mut c, "/a").await;
        // Idle well past the header timeout: idleness is not a slow head.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        get_ok(&mut c, "/b").await;
        // A head that starts and stalls on the same connection: 408.
        c.send(b"GET /slow HTTP/1.1\r\nHost: app.test\r\nX-Slow: ")
            .await;
        match within(10, "slow head to be answered", c.read_outcome()).await {
            RawOutcome::Response(resp) => assert_eq!(resp.status, 408, "{resp:?}"),
            RawOutcome::Closed { partial, .. } => panic!(
                "closed without a 408: {:?}",
                String::from_utf8_lossy(&partial)
            ),
        }
        assert_eq!(fake.hits(), 2);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_h2c_connection_outlives_the_header_timeout() {
    within(60, "test", async {
        let fake = FakeUpstream::ok().await;
        let h = one_route_proxy(&fake, "    request_header_timeout: 300ms").await;
        // One h2c connection (prior knowledge on the `auto` listener), so a
        // close cannot hide behind a client pool's reconnect.
        let tcp = tokio::net::TcpStream::connect(h.addr())
            .await
            .expect("connect");
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .expect("h2c handshake");
        let driver = tokio::spawn(conn);
        let get = |path: &str| {
            Request::get(format!("http://app.test{path}"))
                .version(Version::HTTP_2)
                .body(empty())
                .expect("req")
        };
        let resp = sender.send_request(get("/a")).await.expect("first request");
        assert_eq!(resp.status(), StatusCode::OK);
        // Idle past the header timeout (settings and pings may flow meanwhile).
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let resp = sender
            .send_request(get("/b"))
            .await
            .expect("idle h2c connection was closed");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(fake.hits(), 2);
        drop(sender);
        let _ = driver.await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_pauses_accept() {
    within(90, "test", async {
        let fake = FakeUpstream::ok().await;
        let yaml = yaml_with(
            "    max_connections: 2",
            &upstream_yaml("app", fake.addr(), ""),
            &route_yaml("all", "      path_prefix: /", "app", ""),
        );
        let h = ProxyHarness::start(&yaml).await;
        let req = b"GET /c HTTP/1.1\r\nHost: app.test\r\n\r\n";
        let mut c1 = RawConn::connect(h.addr()).await;
        c1.send(req).await;
        assert_eq!(c1.read_response().await.status, 200);
        let mut c2 = RawConn::connect(h.addr()).await;
        c2.send(req).await;
        assert_eq!(c2.read_response().await.status, 200);

        // The third connection completes in the kernel backlog but is not served.
        let mut c3 = RawConn::connect(h.addr()).await;
        c3.send(req).await;
        let early = tokio::time::timeout(Duration::from_millis(500), c3.read_outcome()).await;
        assert!(
            early.is_err(),
            "third connection served above max_connections: {early:?}"
        );

        // One closes: the third is accepted and served.
        drop(c1);
        let resp = within(
            15,
            "third connection served once one closed",
            c3.read_response(),
        )
        .await;
        assert_eq!(resp.status, 200);
        assert_eq!(fake.hits(), 3);
        drop(c2);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connection_is_closed_after_idle_timeout() {
    within(60, "test", async {
        let fake = FakeUpstream::ok().await;
        let h = one_route_proxy(&fake, "    idle_timeout: 300ms").await;
        let mut c = RawConn::connect(h.addr()).await;
        get_ok(&mut c, "/a").await;
        // Keep-alive: a second request on the same connection works.
        get_ok(&mut c, "/b").await;
        assert!(within(10, "idle connection to be closed", c.closed()).await);
    })
    .await
}

// ---------------------------------------------------------------------------
// Never an open proxy
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_and_foreign_host_only_reach_the_configured_upstream() {
    within(60, "test", async {
        let fake = FakeUpstream::ok().await;
        let decoy = FakeUpstream::builder().body("decoy").start().await;
        let h = ProxyHarness::start(&basic_yaml(fake.addr())).await;
        let decoy_addr = decoy.addr();

        let mut c = RawConn::connect(h.addr()).await;
        c.send(
            format!("GET http://{decoy_addr}/steal?x=1 HTTP/1.1\r\nHost: {decoy_addr}\r\n\r\n")
                .as_bytes(),
        )
        .await;
        let resp = c.read_response().await;
        assert_eq!(resp.status, 200);
        assert_eq!(c.read_body(&resp).await, b"ok");
        assert_eq!(fake.hits(), 1);
        let seen = fake.last_request();
        assert_eq!(seen.uri.path(), "/steal");
        assert_eq!(seen.uri.query(), Some("x=1"));

        let mut c = RawConn::connect(h.addr()).await;
        c.send(b"GET http://evil.example/steal2 HTTP/1.1\r\nHost: evil.example\r\n\r\n")
            .await;
        assert_eq!(c.read_response().await.status, 200);
        assert_eq!(fake.hits_for_path("/steal2"), 1);

        let mut c = RawConn::connect(h.addr()).await;
        c.send(format!("GET /foreign HTTP/1.1\r\nHost: {decoy_addr}\r\n\r\n").as_bytes())
            .await;
        assert_eq!(c.read_response().await.status, 200);
        assert_eq!(fake.hits_for_path("/foreign"), 1);

        // HTTP/2 with a foreign :authority.
        let client = h2c_client();
        let mut req = Request::get(format!("http://{}/h2-foreign", h.addr()))
            .body(empty())
            .unwrap();
        *req.version_mut() = Version::HTTP_2;
        req.headers_mut()
            .insert("host", decoy_addr.to_string().parse().unwrap());
        let resp = client.request(req).await.expect("h2 request");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(fake.hits_for_path("/h2-foreign"), 1);

        assert_eq!(
            decoy.hits(),
            0,
            "the decoy named in URIs and Host headers must never be contacted"
        );
        assert_eq!(decoy.connections(), 0);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_method_is_refused() {
    within(60, "test", async {
        let fake = FakeUpstream::ok().await;
        let decoy = FakeUpstream::ok().await;
        let h = ProxyHarness::start(&basic_yaml(fake.addr())).await;
        let decoy_addr = decoy.addr();
        let mut c = RawConn::connect(h.addr()).await;
        c.send(format!("CONNECT {decoy_addr} HTTP/1.1\r\nHost: {decoy_addr}\r\n\r\n").as_bytes())
            .await;
        match within(15, "CONNECT to be answered", c.read_outcome()).await {
            RawOutcome::Response(resp) => {
                assert!(resp.status >= 400, "CONNECT must be refused, got {resp:?}");
                let _ = c.read_body(&resp).await;
                // No tunnel exists: what follows on the connection is HTTP
                // again (served by the configured upstream) or nothing.
                if c.try_send(b"GET /after-connect HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await
                    .is_ok()
                {
                    if let RawOutcome::Response(next) =
                        within(15, "request after CONNECT", c.read_outcome()).await
                    {
                        assert_eq!(next.status, 200, "{next:?}");
                        assert_eq!(c.read_body(&next).await, b"ok");
                        assert_eq!(fake.hits_for_path("/after-connect"), 1);
                    }
                }
            }
            RawOutcome::Closed { .. } => {}
        }
        assert_eq!(
            decoy.connections(),
            0,
            "CONNECT opened a connection to its target"
        );
        assert_eq!(decoy.hits(), 0);
        assert_eq!(
            fake.requests()
                .iter()
                .filter(|r| r.method == http::Method::CONNECT)
                .count(),
            0
        );
    })
    .await
}

// ---------------------------------------------------------------------------
// Upstream failures and local replies
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_is_502_upstream_connect() {
    within(60, "test", async {
        let dead = closed_port_addr().await;
        let h = ProxyHarness::start(&basic_yaml(dead)).await;
        let resp = h.get("/x").await;
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(reason(&resp), Some("upstream_connect"));
        let resp = h.send_h2(Request::get("/y").body(empty()).unwrap()).await;
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(reason(&resp), Some("upstream_connect"));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_is_502_upstream_connect() {
    within(60, "test", async {
        // A listener whose accept queue is full: further SYNs are dropped, so
        // connecting hangs until the proxy's connect_timeout fires.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut fillers = Vec::new();
        let mut full = false;
        for _ in 0..32 {
            match tokio::time::timeout(
                Duration::from_millis(300),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                Ok(Ok(s)) => fillers.push(s),
                Ok(Err(e)) => panic!("filling the backlog: {e}"),
                Err(_) => {
                    full = true;
                    break;
                }
            }
        }
        assert!(full, "could not fill the accept queue of a test listener");

        let yaml = yaml_with(
            "",
            &upstream_yaml("app", addr, "    connect_timeout: 300ms"),
            &route_yaml("all", "      path_prefix: /", "app", ""),
        );
        let h = ProxyHarness::start(&yaml).await;
        let resp = within(15, "connect_timeout to produce a reply", h.get("/x")).await;
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(reason(&resp), Some("upstream_connect"));
        drop(fillers);
        drop(listener);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_is_502_upstream_reset() {
    within(60, "test", async {
        let fake = FakeUpstream::builder().reset().start().await;
        let h = ProxyHarness::start(&basic_yaml(fake.addr())).await;
        let resp = h.get("/x").await;
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(reason(&resp), Some("upstream_reset"));
        assert!(
            fake.hits() >= 1,
            "the request reached the upstream before the reset"
        );

        let fake2 = FakeUpstream::builder().reset().start().await;
        let h2 = ProxyHarness::start(&h2_upstream_yaml(fake2.addr())).await;
        let resp = h2.get("/x").await;
        assert_eq!(
            resp.status(),
            StatusCode::BAD_GATEWAY,
            "h2 upstream stream reset"
        );
        assert_eq!(reason(&resp), Some("upstream_reset"));
    })
    .await
}

fn grpc_status(headers: &http::HeaderMap, trailers: Option<&http::HeaderMap>) -> Option<String> {
    header_str(headers, "grpc-status")
        .map(str::to_string)
        .or_else(|| {
            trailers
                .and_then(|t| header_str(t, "grpc-status"))
                .map(str::to_string)
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_requests_get_grpc_shaped_local_replies() {
    within(60, "test", async {
        let dead = closed_port_addr().await;
        let routes = route_yaml("grpc-dead", "      path_prefix: /pkg.Dead/", "dead", "");
        let h =
            ProxyHarness::start(&yaml_with("", &upstream_yaml("dead", dead, ""), &routes)).await;
        let grpc_frame = {
            let mut f = vec![0u8, 0, 0, 0, 3];
            f.extend_from_slice(b"abc");
            f
        };
        for (path, want_reason, want_status) in [
            ("/pkg.Missing/Call", "no_route", None),
            ("/pkg.Dead/Call", "upstream_connect", Some("14")),
        ] {
            for content_type in ["application/grpc", "application/grpc+proto"] {
                let req = Request::post(path)
                    .header("content-type", content_type)
                    .header("te", "trailers")
                    .body(full(grpc_frame.clone()))
                    .unwrap();
                let resp = h.send_h2(req).await;
                assert_eq!(
                    resp.status(),
                    StatusCode::OK,
                    "{path} {content_type}: gRPC replies are HTTP 200"
                );
                assert_eq!(reason(&resp), Some(want_reason), "{path}");
                let headers = resp.headers().clone();
                assert!(
                    header_str(&headers, "content-type")
                        .unwrap_or("")
                        .starts_with("application/grpc"),
                    "{path}: content-type {headers:?}"
                );
                let collected = resp.into_body().collect().await.expect("body");
                let status = grpc_status(&headers, collected.trailers())
                    .unwrap_or_else(|| panic!("{path}: no grpc-status in headers or trailers"));
                assert_ne!(status, "0", "{path}: a local error must not be grpc OK");
                if let Some(want) = want_status {
                    assert_eq!(status, want, "{path}: grpc-status");
                }
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_responses_pass_untouched() {
    within(60, "test", async {
        let fake = FakeUpstream::with_handler(|req, _| async move {
            let (status, body) = match req.uri().path() {
                "/busy" => (503, "busy"),
                "/missing" => (404, "not here"),
                "/broken" => (500, "boom"),
                "/bad-gateway" => (502, "upstream's own 502"),
                _ => (200, "fine"),
            };
            Ok(Response::builder()
                .status(status)
                .header("x-upstream", "yes")
                .header("retry-after", "7")
                .header("set-cookie", "a=1")
                .header("set-cookie", "b=2")
                .body(full(body))
                .unwrap())
        })
        .await;
        let h = ProxyHarness::start(&basic_yaml(fake.addr())).await;
        for (path, status, body) in [
            ("/busy", 503, "busy"),
            ("/missing", 404, "not here"),
            ("/broken", 500, "boom"),
            ("/bad-gateway", 502, "upstream's own 502"),
            ("/ok", 200, "fine"),
        ] {
            for h2 in [false, true] {
                let req = Request::get(path).body(empty()).unwrap();
                let resp = if h2 {
                    h.send_h2(req).await
                } else {
                    h.send(req).await
                };
                assert_eq!(resp.status().as_u16(), status, "{path} h2={h2}");
                assert_no_spillway_headers(resp.headers());
                assert_eq!(header_str(resp.headers(), "x-upstream"), Some("yes"));
                assert_eq!(header_str(resp.headers(), "retry-after"), Some("7"));
                assert_eq!(
                    header_joined(resp.headers(), "set-cookie").as_deref(),
                    Some("a=1, b=2")
                );
                let got = collect_body(resp.into_body()).await;
                assert_eq!(String::from_utf8_lossy(&got), body, "{path}");
            }
        }
    })
    .await
}

/// Bodiless responses (204, 304 with a Content-Length, HEAD) and a chunked
/// one leave the pooled connection in a clean state for the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_and_chunked_responses_keep_the_upstream_connection_reusable() {
    within(60, "test", async {
        let fake = FakeUpstream::with_handler(|req, ctx| {
            let path = req.uri().path().to_string();
            let ctx = ctx.clone();
            async move {
                Ok(match path.as_str() {
                    "/204" => reply::status_body(204, ""),
                    "/304" => {
                        let mut r = reply::status_body(304, "");
                        r.headers_mut()
                            .insert("content-length", http::HeaderValue::from_static("10"));
                        r
                    }
                    "/chunked" => reply::chunks(
                        &ctx,
                        vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")],
                        Duration::ZERO,
                    ),
                    _ => reply::status_body(200, "hello"),
                })
            }
        })
        .await;
        let h = ProxyHarness::start(&basic_yaml(fake.addr())).await;
        for round in 0..3 {
            for (path, status, body) in [
                ("/204", 204, &b""[..]),
                ("/304", 304, b""),
                ("/chunked", 200, b"abcd"),
                ("/plain", 200, b"hello"),
            ] {
                let resp = h.get(path).await;
                assert_eq!(resp.status().as_u16(), status, "round {round} {path}");
                assert_eq!(&collect_body(resp.into_body()).await[..], body, "{path}");
            }
            let req = Request::head(h.url("/plain")).body(empty()).unwrap();
            let resp = h.send(req).await;
            assert_eq!(resp.status(), StatusCode::OK);
            assert!(
                collect_body(resp.into_body()).await.is_empty(),
                "HEAD has no body"
            );
        }
        assert_eq!(fake.hits(), 15);
        assert!(
            fake.connections() <= 2,
            "15 sequential requests opened {} upstream connections",
            fake.connections()
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_pooled() {
    within(60, "test", async {
        let fake = FakeUpstream::ok().await;
        let h = ProxyHarness::start(&basic_yaml(fake.addr())).await;
        for i in 0..10 {
            let resp = h.get(&format!("/p{i}")).await;
            assert_eq!(resp.status(), StatusCode::OK);
            let _ = collect_body(resp.into_body()).await;
        }
        assert_eq!(fake.hits(), 10);
        assert!(
            fake.connections() <= 3,
            "10 sequential requests opened {} upstream connections (no pooling)",
            fake.connections()
        );
    })
    .await
}

/// A proxy with extra listeners `h1only` (protocol http1) and `h2only` (http2).
async fn protocol_listeners(fake: &FakeUpstream) -> ProxyHarness {
    let yaml = basic_yaml(fake.addr()).replace(
        "admin:",
        "  - name: h1only\n    bind: 127.0.0.1:0\n    protocol: http1\n  - name: h2only\n    bind: 127.0.0.1:0\n    protocol: http2\nadmin:",
    );
    ProxyHarness::start(&yaml).await
}

async fn get_via(addr: SocketAddr, h2: bool) -> Result<Response<hyper::body::Incoming>, String> {
    let mut req = Request::get(format!("http://{addr}/p"))
        .body(empty())
        .unwrap();
    if h2 {
        *req.version_mut() = Version::HTTP_2;
    }
    let client = if h2 { h2c_client() } else { h1_client() };
    client.request(req).await.map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_protocol_http1_refuses_h2c() {
    within(60, "test", async {
        let fake = FakeUpstream::ok().await;
        let h = protocol_listeners(&fake).await;
        let addr = h.listener("h1only").expect("listener h1only");
        let resp = get_via(addr, false)
            .await
            .expect("HTTP/1.1 on an http1 listener");
        assert_eq!(resp.status(), StatusCode::OK);
        let h2 = within(15, "h2c on an http1 listener", get_via(addr, true)).await;
        assert!(
            h2.is_err(),
            "h2c served on a `protocol: http1` listener: {:?}",
            h2.map(|r| (r.status(), r.version()))
        );
        assert_eq!(fake.hits(), 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_protocol_http2_refuses_http1() {
    within(60, "test", async {
        let fake = FakeUpstream::ok().await;
        let h = protocol_listeners(&fake).await;
        let addr = h.listener("h2only").expect("listener h2only");
        let resp = get_via(addr, true).await.expect("h2c on an http2 listener");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), Version::HTTP_2);
        let mut c = RawConn::connect(addr).await;
        let _ = c.try_send(b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n").await;
        match within(15, "HTTP/1.1 on an http2 listener", c.read_outcome()).await {
            RawOutcome::Response(r) => {
                panic!("HTTP/1.1 served on a `protocol: http2` listener: {r:?}")
            }
            RawOutcome::Closed { .. } => {}
        }
        assert_eq!(fake.hits(), 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_endpoints_are_balanced_by_least_in_flight() {
    within(60, "test", async {
        // Handlers report their arrival and hold until released.
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        let (arrived_tx, mut arrived_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let make = || {
            let release = release_rx.clone();
            let arrived = arrived_tx.clone();
            FakeUpstream::with_handler(move |_req, _| {
                let mut release = release.clone();
                let arrived = arrived.clone();
                async move {
                    let _ = arrived.send(());
                    let _ = release.wait_for(|go| *go).await;
                    Ok(reply::ok())
                }
            })
        };
        let a = make().await;
        let b = make().await;
        let upstreams = format!(
            "  app:\n    endpoints: [\"{}\", \"{}\"]\n",
            a.addr(),
            b.addr()
        );
        let h = ProxyHarness::start(&yaml_with(
            "",
            &upstreams,
            &route_yaml("all", "      path_prefix: /", "app", ""),
        ))
        .await;
        let client = h1_client();
        let mut pending = Vec::new();
        for i in 1..=6u64 {
            let c = client.clone();
            let url = h.url(&format!("/held/{i}"));
            pending.push(tokio::spawn(async move {
                c.request(Request::get(url).body(empty()).unwrap()).await
            }));
            // One at a time, so each choice sees the previous ones in flight.
            within(15, "held request to reach an endpoint", arrived_rx.recv())
                .await
                .expect("arrival channel open");
            if i == 2 {
                assert_eq!(
                    (a.hits(), b.hits()),
                    (1, 1),
                    "with one request in flight on an endpoint, the next goes to the idle one"
                );
            }
        }
        let (ha, hb) = (a.hits(), b.hits());
        assert!(
            (2..=4).contains(&ha) && (2..=4).contains(&hb),
            "least-loaded balancing: {ha} vs {hb}"
        );
        release_tx.send(true).unwrap();
        for p in pending {
            let resp = within(15, "held request to finish", p)
                .await
                .unwrap()
                .expect("held request");
            assert_eq!(resp.status(), StatusCode::OK);
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_upstream_failures_pass_through_without_retry() {
    within(60, "test", async {
        // 25% of requests get 503 (exactly requests 4 and 8 of 8).
        let fake = FakeUpstream::builder()
            .failure_rate(0.25, 503)
            .start()
            .await;
        let h = ProxyHarness::start(&basic_yaml(fake.addr())).await;
        let mut statuses = Vec::new();
        for i in 0..8 {
            let resp = h.get(&format!("/f{i}")).await;
            assert_no_spillway_headers(resp.headers());
            statuses.push(resp.status().as_u16());
            let _ = collect_body(resp.into_body()).await;
        }
        assert_eq!(statuses, [200, 200, 200, 503, 200, 200, 200, 503]);
        assert_eq!(fake.hits(), 8, "max_attempts defaults to 1: no retries");

        // A reset, then a healthy answer on a fresh upstream connection.
        let flaky = FakeUpstream::builder().reset_first(1).start().await;
        let h = ProxyHarness::start(&basic_yaml(flaky.addr())).await;
        let resp = h.get("/r1").await;
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(reason(&resp), Some("upstream_reset"));
        let resp = h.get("/r2").await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(flaky.hits(), 2);
    })
    .await
}

/// A client that sends `Expect: 100-continue` waits for `100` before its
/// body: the proxy must answer it (when the request body is first read) and
/// pass the header on, whether the body is buffered or streamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_gets_a_100_and_the_body_goes_through() {
    within(60, "test", async {
        // Like most servers, it reads the whole body before answering.
        let fake = FakeUpstream::builder()
            .handler(|req: Request<hyper::body::Incoming>, _ctx| async move {
                let body = req.into_body().collect().await.map_err(|_| Reset)?;
                Ok(Response::new(full(body.to_bytes())))
            })
            .start()
            .await;
        let h = one_route_proxy(&fake, "").await;
        for (framing, body) in [
            ("Content-Length: 5", &b"hello"[..]),
            ("Transfer-Encoding: chunked", &b"5\r\nhello\r\n0\r\n\r\n"[..]),
        ] {
            let mut c = RawConn::connect(h.addr()).await;
            c.send(
                format!(
                    "POST /expect HTTP/1.1\r\nHost: app.test\r\n{framing}\r\nExpect: 100-continue\r\n\r\n"
                )
                .as_bytes(),
            )
            .await;
            // Read the interim head raw: `read_response` skips 1xx heads.
            let first = within(10, "100 Continue before the body", async {
                use tokio::io::AsyncReadExt;
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    let n = c.stream().read(&mut byte).await.expect("read");
                    assert_eq!(n, 1, "closed before a 100: {:?}", String::from_utf8_lossy(&head));
                    head.push(byte[0]);
                }
                String::from_utf8_lossy(&head).into_owned()
            })
            .await;
            assert!(first.starts_with("HTTP/1.1 100"), "{framing}: {first:?}");
            c.send(body).await;
            let resp = within(10, "the final response", c.read_response()).await;
            assert_eq!(resp.status, 200, "{framing}: {resp:?}");
            assert_eq!(c.read_body(&resp).await, b"hello", "{framing}");
            assert_eq!(fake.last_request().header("expect"), Some("100-continue"));
        }
    })
    .await
}
