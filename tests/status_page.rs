//! The admin port's /status page in a real browser: headless Chromium from
//! Debian's `chromium` package loads it while load is running, and the rows it
//! renders (after its script has refreshed them from /status.json) are checked
//! against the live state, which /status.json reports too. Load is shed long
//! enough for the once-a-second sampler to record it: its series in
//! /status.json, the recent rejections per second and the inline SVG charts
//! must all show the shedding. A screenshot is kept as a test artifact:
//! `target/status.png`.
//!
//! Chromium is required: without it this test fails and says how to install
//! it (`apt-get install -y chromium`); set `SPILLWAY_CHROMIUM` to use another
//! binary.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use regex::Regex;
use support::*;
use tokio::sync::watch;

/// Route `api` admits 4 and queues 2; the upstream holds every request until
/// released, so under load the page must show exactly 4 / 4 and 2 / 2.
const CAP: u64 = 4;
const QUEUE: u64 = 2;

fn config(app: std::net::SocketAddr, down: std::net::SocketAddr) -> String {
    format!(
        r#"version: 1
listeners:
  - name: inbound
    bind: 127.0.0.1:0
admin:
  bind: 127.0.0.1:0
drain:
  grace: 0s
  timeout: 5s
upstreams:
  app:
    endpoints: ["{app}"]
    circuit_breaker:
      failure_threshold: 5
      recovery_timeout: 30s
      half_open_calls: 3
  down:
    endpoints: ["{down}"]
    connect_timeout: 200ms
    circuit_breaker:
      failure_threshold: 1
      recovery_timeout: 5m
      half_open_calls: 1
routes:
  - name: api
    match: {{ path_prefix: /api }}
    upstream: app
    concurrency: {{ max_in_flight: {CAP} }}
    queue: {{ max_depth: {QUEUE}, max_wait: 50s }}
    timeouts: {{ request: 60s }}
  - name: search
    match: {{ path_prefix: /search }}
    upstream: app
    concurrency: {{ max_in_flight: 16 }}
  - name: legacy
    match: {{ path_prefix: /legacy }}
    upstream: down
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renders_live_routes_in_headless_chromium() {
    // Fail first, and loudly, if the browser is missing: never a silent pass.
    let chromium = find_chromium();

    let (release_tx, release_rx) = watch::channel(false);
    let fake = FakeUpstream::with_handler(move |_req, _ctx| {
        let mut rx = release_rx.clone();
        async move {
            // Held until the test releases it: in-flight stays at the cap.
            while !*rx.borrow_and_update() {
                if rx.changed().await.is_err() {
                    break;
                }
            }
            Ok(reply::ok())
        }
    })
    .await;
    let down = closed_port_addr().await;
    let h = Arc::new(ProxyHarness::start(&config(fake.addr(), down)).await);

    // Fill the cap and the queue with requests that stay in flight.
    let mut held = Vec::new();
    for i in 0..(CAP + QUEUE) {
        let h = h.clone();
        held.push(tokio::spawn(async move {
            let resp = h.get(&format!("/api/held/{i}")).await;
            let status = resp.status();
            body_string(resp).await;
            status
        }));
    }
    within(
        15,
        "the cap to fill",
        fake.wait_until("4 held", |f| f.current() as u64 == CAP),
    )
    .await;
    let route = wait_route(&h, "api", |r| r["queue_depth"] == QUEUE).await;
    assert_eq!(route["in_flight"], CAP, "{route:#}");

    // Load keeps running while the browser looks: every request beyond cap and
    // queue is shed at once with 429 queue_full.
    let running = Arc::new(AtomicBool::new(true));
    let shed = Arc::new(AtomicU64::new(0));
    let load = {
        let (h, running, shed) = (h.clone(), running.clone(), shed.clone());
        tokio::spawn(async move {
            while running.load(Ordering::SeqCst) {
                let resp = h.get("/api/extra").await;
                assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
                assert_eq!(
                    header_str(resp.headers(), "x-spillway-reason"),
                    Some("queue_full")
                );
                body_string(resp).await;
                shed.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    // One connect failure opens `down`'s breaker (failure_threshold 1).
    let resp = h.get("/legacy/x").await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    body_string(resp).await;
    wait_route(&h, "api", |r| {
        r["rejections"]["queue_full"].as_u64() >= Some(3)
    })
    .await;

    // --- the per-second series while shedding ----------------------------
    // The sampler takes one sample a second: wait (bounded) until the last
    // three samples of `api` all saw rejections.
    let api = wait_route_within(&h, "api", 60, |r| {
        let rej = series(r, "rejections_per_s");
        rej.len() >= 3 && rej[rej.len() - 3..].iter().all(|v| *v > Some(0.0))
    })
    .await;
    let len = series(&api, "rejections_per_s").len();
    assert!(len <= 300, "five minutes at most: {len}");
    for key in [
        "requests_per_s",
        "p99_ms",
        "queue_depth",
        "concurrency_limit",
    ] {
        assert_eq!(series(&api, key).len(), len, "series {key}: {api:#}");
    }
    let last = |key: &str| *series(&api, key).last().expect("a sample");
    assert!(last("rejections_per_s") > Some(0.0), "{api:#}");
    // The shed requests are answered (429) and timed, so they show up too.
    assert!(last("requests_per_s") > Some(0.0), "{api:#}");
    assert!(last("p99_ms") > Some(0.0), "p99 of the 429s: {api:#}");
    assert_eq!(last("queue_depth"), Some(QUEUE as f64), "{api:#}");
    assert_eq!(last("concurrency_limit"), Some(CAP as f64), "{api:#}");
    let recent = api["rejections_per_s_recent"].as_f64();
    assert!(recent > Some(0.0), "recent rej/s while shedding: {api:#}");
    // `search` takes no traffic: samples of zeros, no p99.
    let search = wait_route(&h, "search", |r| !series(r, "requests_per_s").is_empty()).await;
    assert_eq!(series(&search, "requests_per_s").last(), Some(&Some(0.0)));
    assert_eq!(series(&search, "p99_ms").last(), Some(&None));
    assert_eq!(search["rejections_per_s_recent"], 0.0);

    // --- /status.json against live state --------------------------------
    let status = status_json(&h).await;
    assert_eq!(status["generation"], 1);
    assert_eq!(status["phase"], "running");
    assert!(
        status["global_in_flight"].as_u64() >= Some(CAP),
        "{status:#}"
    );
    let api = find(&status["routes"], "api");
    assert_eq!(api["upstream"], "app");
    assert_eq!(api["in_flight"], CAP, "api under load: {api:#}");
    assert_eq!(api["max_in_flight"], CAP);
    assert_eq!(api["queue_depth"], QUEUE);
    assert_eq!(api["queue_capacity"], QUEUE);
    assert_eq!(api["queue_depth_peak"], QUEUE);
    assert_eq!(api["breaker"], "closed");
    assert_eq!(api["max_wait"], "50s");
    assert!(api["rejections_total"].as_u64() >= Some(3), "{api:#}");
    assert_eq!(fake.current() as u64, CAP, "the upstream sees the cap");
    let search = find(&status["routes"], "search");
    assert_eq!(search["in_flight"], 0);
    assert_eq!(search["max_in_flight"], 16);
    let legacy = find(&status["routes"], "legacy");
    assert_eq!(legacy["breaker"], "open", "{legacy:#}");
    let app = find(&status["upstreams"], "app");
    assert_eq!(app["in_flight"], CAP);
    assert_eq!(app["breaker"], "closed");
    assert_eq!(app["breaker_settings"]["failure_threshold"], 5);
    assert_eq!(app["breaker_settings"]["recovery_timeout"], "30s");
    assert_eq!(app["routes"], serde_json::json!(["api", "search"]));
    assert_eq!(find(&status["upstreams"], "down")["breaker"], "open");

    // --- the page as served: self-contained, rows rendered server-side ---
    let (code, headers, html) = h.admin_get("/status").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        header_str(&headers, "content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(header_str(&headers, "cache-control"), Some("no-store"));
    assert_self_contained(&html);
    let served = route_rows(&html);
    assert_eq!(served["api"].attrs["data-in-flight"], CAP.to_string());
    assert_rate_shown(&served["api"], "served page");
    assert_charts(&html, "served page");

    // --- the page in Chromium, after its script refreshed it -------------
    let tmp = TempDir::new("chromium");
    let url = h.admin_url("/status");
    let dom = run_chromium(
        &chromium,
        &tmp,
        &["--dump-dom", "--virtual-time-budget=5000", &url],
        "dump-dom",
    )
    .await;
    let refreshes: u64 = Regex::new(r#"<body[^>]*data-refreshes="(\d+)""#)
        .expect("regex")
        .captures(&dom)
        .and_then(|c| c[1].parse().ok())
        .unwrap_or_else(|| panic!("no data-refreshes on <body>:\n{dom}"));
    assert!(
        refreshes >= 1,
        "the page's script never refreshed from status.json:\n{dom}"
    );
    assert!(
        dom.contains("live · updated"),
        "live marker missing:\n{dom}"
    );
    let rows = route_rows(&dom);
    let mut names: Vec<&str> = rows.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["api", "legacy", "search"], "route rows:\n{dom}");
    let api = &rows["api"];
    assert_eq!(api.attrs["data-in-flight"], CAP.to_string(), "{dom}");
    assert_eq!(api.cells["inflight"], format!("{CAP} / {CAP}"));
    assert!(
        api.cells["queue"].starts_with(&format!("{QUEUE} / {QUEUE}")),
        "queue cell: {}",
        api.cells["queue"]
    );
    assert_eq!(api.cells["peak"], QUEUE.to_string());
    assert!(
        api.cells["rej"].contains("queue_full"),
        "{}",
        api.cells["rej"]
    );
    assert_eq!(api.cells["breaker"], "closed");
    assert!(api.cells["req"].contains("4xx"), "{}", api.cells["req"]);
    assert_eq!(rows["search"].cells["inflight"], "0 / 16");
    assert_eq!(rows["legacy"].cells["breaker"], "open");
    assert!(dom.contains(r#"data-upstream="down" data-breaker="open""#));
    assert_rate_shown(api, "page in Chromium");
    assert_charts(&dom, "page in Chromium");
    // The script re-renders exactly what the server rendered (cells that
    // cannot change while the load is held).
    let (served_up, dom_up) = (upstream_rows(&html), upstream_rows(&dom));
    for name in ["app", "down"] {
        assert_eq!(served_up[name].cells, dom_up[name].cells, "upstream {name}");
    }
    assert_eq!(
        dom_up["app"].cells["settings"],
        "opens after 5 failures in a row · recovery 30s · 3 half-open probes"
    );
    for name in ["api", "search", "legacy"] {
        for cell in ["name", "upstream", "inflight", "queue", "peak", "breaker"] {
            assert_eq!(
                served[name].cells[cell], rows[name].cells[cell],
                "route {name}, cell {cell}: server and script disagree"
            );
        }
    }

    // --- screenshot artifact ---------------------------------------------
    let png = artifact_path("status.png");
    let _ = std::fs::remove_file(&png);
    let shot = format!("--screenshot={}", png.display());
    run_chromium(
        &chromium,
        &tmp,
        &[
            &shot,
            "--window-size=1200,800",
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
            &url,
        ],
        "screenshot",
    )
    .await;
    let bytes = std::fs::read(&png)
        .unwrap_or_else(|e| panic!("screenshot {} not written: {e}", png.display()));
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "screenshot {} is not a real PNG ({} bytes)",
        png.display(),
        bytes.len()
    );
    eprintln!("status page screenshot: {}", png.display());

    // --- release the load: every held request completes --------------------
    running.store(false, Ordering::SeqCst);
    within(15, "the load task to stop", load)
        .await
        .expect("load task");
    assert!(shed.load(Ordering::SeqCst) >= 1);
    release_tx.send(true).expect("release");
    for t in held {
        let status = within(15, "held request", t).await.expect("held task");
        assert_eq!(status, StatusCode::OK);
    }
    wait_route(&h, "api", |r| r["in_flight"] == 0 && r["queue_depth"] == 0).await;
    fake.assert_healthy();
}

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

async fn status_json(h: &ProxyHarness) -> serde_json::Value {
    let (code, headers, body) = h.admin_get("/status.json").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        header_str(&headers, "content-type"),
        Some("application/json")
    );
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status.json: {e}\n{body}"))
}

fn find<'a>(list: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    list.as_array()
        .into_iter()
        .flatten()
        .find(|x| x["name"] == name)
        .unwrap_or_else(|| panic!("no `{name}` in {list:#}"))
}

/// Polls /status.json until route `name` satisfies `pred` (bounded at 15 s).
async fn wait_route(
    h: &ProxyHarness,
    name: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_route_within(h, name, 15, pred).await
}

/// Polls /status.json until route `name` satisfies `pred`, for at most `secs`.
async fn wait_route_within(
    h: &ProxyHarness,
    name: &str,
    secs: u64,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let status = status_json(h).await;
        let route = find(&status["routes"], name).clone();
        if pred(&route) {
            return route;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "route {name} never reached the expected state: {route:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One series of a route in /status.json (`None` for a null sample).
fn series(route: &serde_json::Value, key: &str) -> Vec<Option<f64>> {
    route["series"][key]
        .as_array()
        .unwrap_or_else(|| panic!("no series {key}: {route:#}"))
        .iter()
        .map(serde_json::Value::as_f64)
        .collect()
}

/// The "recent rej/s" cell shows a rate above zero, not a dash.
fn assert_rate_shown(row: &Row, what: &str) {
    let rate: f64 = row.cells["rate"]
        .parse()
        .unwrap_or_else(|_| panic!("{what}: recent rej/s is `{}`", row.cells["rate"]));
    assert!(rate > 0.0, "{what}: recent rej/s {rate} while shedding");
}

/// Every route has its row of five inline SVG charts, and `api`'s charts of
/// answered and rejected requests draw a line.
fn assert_charts(html: &str, what: &str) {
    let row =
        Regex::new(r#"(?s)<tr class="chart" data-chart="([a-z]+)">(.*?)</tr>"#).expect("regex");
    let svg = Regex::new(r#"(?s)<svg class="spark s-([a-z0-9]+)"[^>]*>\s*<path d="([^"]*)""#)
        .expect("regex");
    let mut seen = Vec::new();
    for m in row.captures_iter(html) {
        let charts: HashMap<String, String> = svg
            .captures_iter(&m[2])
            .map(|c| (c[1].to_string(), c[2].to_string()))
            .collect();
        let mut kinds: Vec<&str> = charts.keys().map(String::as_str).collect();
        kinds.sort_unstable();
        assert_eq!(
            kinds,
            ["depth", "limit", "p99", "rej", "req"],
            "{what}: charts of route {}:\n{}",
            &m[1],
            &m[0]
        );
        if &m[1] == "api" {
            for kind in ["req", "rej", "depth", "limit"] {
                assert!(
                    charts[kind].matches('L').count() >= 2,
                    "{what}: api's {kind} chart draws no line: {}",
                    charts[kind]
                );
            }
        }
        seen.push(m[1].to_string());
    }
    seen.sort_unstable();
    assert_eq!(seen, ["api", "legacy", "search"], "{what}: chart rows");
}

/// A `<tr class="route">` of the page: its attributes and the text of its
/// cells by class.
struct Row {
    attrs: HashMap<String, String>,
    cells: HashMap<String, String>,
}

fn route_rows(html: &str) -> HashMap<String, Row> {
    rows(html, "route")
}

fn upstream_rows(html: &str) -> HashMap<String, Row> {
    rows(html, "upstream")
}

/// Rows `<tr class="{kind}" data-{kind}="name" ...>` by name.
fn rows(html: &str, kind: &str) -> HashMap<String, Row> {
    let row = Regex::new(&format!(r#"(?s)<tr class="{kind}"([^>]*)>(.*?)</tr>"#)).expect("regex");
    let attr = Regex::new(r#"([a-z-]+)="([^"]*)""#).expect("regex");
    let cell = Regex::new(r#"(?s)<td class="([a-z]+)">(.*?)</td>"#).expect("regex");
    let tag = Regex::new(r"<[^>]*>").expect("regex");
    let mut rows = HashMap::new();
    for m in row.captures_iter(html) {
        let attrs: HashMap<String, String> = attr
            .captures_iter(&m[1])
            .map(|a| (a[1].to_string(), a[2].to_string()))
            .collect();
        let cells: HashMap<String, String> = cell
            .captures_iter(&m[2])
            .map(|c| {
                let text = tag.replace_all(&c[2], "");
                let text = text
                    .replace("&middot;", "·")
                    .replace("&ndash;", "–")
                    .replace("&le;", "≤")
                    .replace("&amp;", "&");
                (
                    c[1].to_string(),
                    text.split_whitespace().collect::<Vec<_>>().join(" "),
                )
            })
            .collect();
        let name = attrs
            .get(&format!("data-{kind}"))
            .unwrap_or_else(|| panic!("{kind} row without data-{kind}: {}", &m[0]))
            .clone();
        rows.insert(name, Row { attrs, cells });
    }
    assert!(!rows.is_empty(), "no {kind} rows in:\n{html}");
    rows
}

/// The admin port may be the only thing reachable: nothing may be fetched
/// from elsewhere.
fn assert_self_contained(html: &str) {
    for needle in [
        "src=\"http",
        "href=\"http",
        "src=\"//",
        "href=\"//",
        "<link",
        "@import",
        "url(",
        "<script src",
    ] {
        assert!(
            !html.contains(needle),
            "/status must be self-contained, found `{needle}`"
        );
    }
    assert!(html.contains("<script>"), "the refresh script is inline");
}

/// `$SPILLWAY_CHROMIUM`, else `chromium` / `chromium-browser` on PATH; panics
/// with install instructions when there is none.
fn find_chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("SPILLWAY_CHROMIUM") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "SPILLWAY_CHROMIUM={} does not exist",
            p.display()
        );
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "headless Chromium is required by this test and was not found \
         (looked for $SPILLWAY_CHROMIUM, then `chromium` and `chromium-browser` on PATH). \
         Install Debian's package: `apt-get install -y chromium` (CI does)."
    );
}

/// Runs Chromium headless with the flags a sandboxed, offline CI machine needs
/// (no sandbox as root, no GPU, no background networking), bounded at 90 s.
/// Returns its stdout.
async fn run_chromium(chromium: &Path, tmp: &TempDir, args: &[&str], what: &str) -> String {
    let profile = tmp.path().join(format!("profile-{what}"));
    let out_path = tmp.path().join(format!("{what}.stdout"));
    let err_path = tmp.path().join(format!("{what}.stderr"));
    let out = std::fs::File::create(&out_path).expect("stdout file");
    let err = std::fs::File::create(&err_path).expect("stderr file");
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromium.display()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for chromium") {
            break s;
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium ({what}) did not finish within 90 s; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(
        status.success(),
        "chromium ({what}) failed with {status}; stderr:\n{}",
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );
    stdout
}

/// `target/<name>` (or under `$CARGO_TARGET_DIR`), where CI keeps artifacts.
fn artifact_path(name: &str) -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    std::fs::create_dir_all(&dir).expect("create target dir");
    dir.join(name)
}
