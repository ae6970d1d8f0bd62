//! `concurrency.max_in_flight: auto`: its validation, and the adaptive limit
//! in front of a service of fixed capacity, through real sockets.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use spillway::config::{load_str, ConfigIssue};
use support::{empty, route_yaml, upstream_yaml, yaml_with, FakeUpstream, ProxyHarness};
use tokio::sync::Semaphore;
use tokio::time::{Instant, MissedTickBehavior};

const FILE: &str = "t.yaml";

fn yaml(concurrency: &str) -> String {
    format!(
        "version: 1\nlisteners:\n  - name: inbound\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\nupstreams:\n  app:\n    endpoints: [\"127.0.0.1:3000\"]\nroutes:\n  - name: api\n    upstream: app\n    concurrency:\n{concurrency}"
    )
}

fn issues(text: &str) -> Vec<ConfigIssue> {
    match load_str(text, FILE) {
        Ok(_) => panic!("config should be rejected:\n{text}"),
        Err(e) => e.issues,
    }
}

/// The issue at `path`, with a line, whose message contains `needle`.
fn expect(all: &[ConfigIssue], path: &str, needle: &str) {
    let issue = all
        .iter()
        .find(|i| i.path == path)
        .unwrap_or_else(|| panic!("no issue for `{path}` in {all:#?}"));
    assert!(issue.line.is_some(), "no line: {issue}");
    assert!(
        issue.message.contains(needle),
        "message lacks `{needle}`: {issue}"
    );
}

#[test]
fn auto_with_defaults_is_valid_and_shown_as_auto() {
    let loaded = load_str(&yaml("      max_in_flight: auto\n"), FILE).expect("valid");
    let c = &loaded.config.routes[0].concurrency;
    let a = c.adaptive.expect("adaptive");
    assert_eq!((a.min, a.max, a.initial, a.tolerance), (1, 1024, 16, 2.0));
    assert_eq!(c.max_in_flight, 16);
    let json = loaded.config.to_json();
    let shown = &json["routes"][0]["concurrency"];
    assert_eq!(shown["max_in_flight"], "auto", "{shown}");
    assert_eq!(shown["adaptive"]["initial"], 16, "{shown}");

    let loaded = load_str(
        &yaml("      max_in_flight: auto\n      adaptive:\n        min: 2\n        max: 8\n        tolerance: 1.5\n"),
        FILE,
    )
    .expect("valid");
    let a = loaded.config.routes[0]
        .concurrency
        .adaptive
        .expect("adaptive");
    // `initial` defaults to 16 clamped into [min, max].
    assert_eq!((a.min, a.max, a.initial, a.tolerance), (2, 8, 8, 1.5));

    let loaded = load_str(&yaml("      max_in_flight: 12\n"), FILE).expect("valid");
    let c = &loaded.config.routes[0].concurrency;
    assert_eq!((c.max_in_flight, c.adaptive), (12, None));
    assert_eq!(
        loaded.config.to_json()["routes"][0]["concurrency"]["max_in_flight"],
        12
    );
}

#[test]
fn adaptive_needs_auto() {
    let all = issues(&yaml(
        "      max_in_flight: 8\n      adaptive:\n        min: 2\n",
    ));
    expect(
        &all,
        "routes[0].concurrency.adaptive",
        "only with `max_in_flight: auto`",
    );
    let all = issues(&yaml("      adaptive:\n        min: 2\n"));
    expect(
        &all,
        "routes[0].concurrency.adaptive",
        "only with `max_in_flight: auto`",
    );
}

#[test]
fn max_in_flight_is_a_number_or_auto() {
    let all = issues(&yaml("      max_in_flight: automatic\n"));
    expect(
        &all,
        "routes[0].concurrency.max_in_flight",
        "expected a number or `auto`",
    );
    let all = issues(&yaml("      max_in_flight: 0\n"));
    expect(&all, "routes[0].concurrency.max_in_flight", "at least 1");
}

#[test]
fn adaptive_bounds_are_ordered_and_tolerance_above_one() {
    let all = issues(&yaml(
        "      max_in_flight: auto\n      adaptive:\n        min: 10\n        max: 4\n        tolerance: 1.0\n",
    ));
    expect(
        &all,
        "routes[0].concurrency.adaptive.min",
        "must not exceed max",
    );
    expect(
        &all,
        "routes[0].concurrency.adaptive.tolerance",
        "greater than 1",
    );
    let all = issues(&yaml(
        "      max_in_flight: auto\n      adaptive:\n        min: 4\n        max: 64\n        initial: 2\n",
    ));
    expect(
        &all,
        "routes[0].concurrency.adaptive.initial",
        "between min (4) and max (64)",
    );
    let all = issues(&yaml(
        "      max_in_flight: auto\n      adaptive:\n        min: 0\n",
    ));
    expect(&all, "routes[0].concurrency.adaptive.min", "at least 1");
    let all = issues(&yaml(
        "      max_in_flight: auto\n      adaptive:\n        minimum: 3\n",
    ));
    assert!(
        all.iter().any(|i| i.message.contains("minimum")),
        "unknown field reported: {all:#?}"
    );
}

#[test]
fn adaptive_in_defaults_serves_routes_that_say_auto() {
    let text = "version: 1\nlisteners:\n  - name: inbound\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\nupstreams:\n  app:\n    endpoints: [\"127.0.0.1:3000\"]\ndefaults:\n  concurrency:\n    adaptive:\n      max: 64\nroutes:\n  - name: fixed\n    match:\n      path_prefix: /a\n    upstream: app\n    concurrency:\n      max_in_flight: 8\n  - name: auto\n    upstream: app\n    concurrency:\n      max_in_flight: auto\n";
    let loaded = load_str(text, FILE).expect("valid");
    assert_eq!(loaded.config.routes[0].concurrency.adaptive, None);
    let a = loaded.config.routes[1]
        .concurrency
        .adaptive
        .expect("adaptive");
    assert_eq!(a.max, 64);
}

/// A service that serves `C` requests at once in `S` each and queues the
/// rest (a semaphore), behind `max_in_flight: auto`, offered about twice
/// its capacity for 8 s: the limit ends near C and the service stays busy.
/// Timing is proven exactly by the limiter's unit tests; this proves the
/// wiring (samples from real attempts, the admission cap, the gauge).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_follows_a_service_of_fixed_capacity() {
    const C: usize = 8;
    const S: Duration = Duration::from_millis(20);
    let servers = Arc::new(Semaphore::new(C));
    let served = Arc::new(AtomicU64::new(0));
    // Time actually spent serving, in µs: on a busy machine a 20 ms sleep
    // takes longer, and the capacity to compare with is the real one.
    let busy_us = Arc::new(AtomicU64::new(0));
    let up = {
        let (servers, served, busy_us) = (servers.clone(), served.clone(), busy_us.clone());
        FakeUpstream::with_handler(move |_req, _ctx| {
            let (servers, served, busy_us) = (servers.clone(), served.clone(), busy_us.clone());
            async move {
                let _server = servers.acquire().await.expect("semaphore never closed");
                let began = Instant::now();
                tokio::time::sleep(S).await;
                busy_us.fetch_add(began.elapsed().as_micros() as u64, Ordering::Relaxed);
                served.fetch_add(1, Ordering::Relaxed);
                Ok(support::reply::ok())
            }
        })
        .await
    };
    let yaml = yaml_with(
        "",
        &upstream_yaml("app", up.addr(), ""),
        &route_yaml(
            "api",
            "      path_prefix: /",
            "app",
            "    concurrency:\n      max_in_flight: auto\n    queue:\n      max_depth: 64\n      max_wait: 500ms\n    timeouts:\n      request: 5s\n",
        ),
    );
    let proxy = ProxyHarness::start(&yaml).await;
    let limit = || async {
        proxy
            .metric_value("spillway_concurrency_limit", &[("route", "api")])
            .await
            .expect("limit gauge")
    };
    assert_eq!(limit().await, 16.0, "starts at `initial`");

    // Open loop: one request every 1.25 ms (800/s, twice the 400/s the
    // service can do), each on its own task, for 8 s.
    let start = Instant::now();
    let nominal = C as f64 / S.as_secs_f64();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(0.5 / nominal));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut tasks = tokio::task::JoinSet::new();
    let mut measured_from = None;
    while start.elapsed() < Duration::from_secs(8) {
        tick.tick().await;
        if measured_from.is_none() && start.elapsed() >= Duration::from_secs(4) {
            measured_from = Some((Instant::now(), served.load(Ordering::Relaxed)));
        }
        let client = proxy.h1().clone();
        let url = proxy.url("/work");
        tasks.spawn(async move {
            let req = Request::get(url).body(empty()).expect("request");
            match client.request(req).await {
                Ok(resp) => resp.status().as_u16(),
                Err(_) => 0,
            }
        });
        // Reap finished tasks so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    let (from, served_before) = measured_from.expect("ran past 4 s");
    let goodput =
        (served.load(Ordering::Relaxed) - served_before) as f64 / from.elapsed().as_secs_f64();
    let final_limit = limit().await;
    let mean_service =
        busy_us.load(Ordering::Relaxed) as f64 / 1e6 / served.load(Ordering::Relaxed).max(1) as f64;
    let capacity = C as f64 / mean_service;
    support::within(30, "load tasks finish", async {
        while tasks.join_next().await.is_some() {}
    })
    .await;

    let lo = 0.75 * C as f64;
    let hi = 2.0 * C as f64 + 2.0;
    assert!(
        (lo..=hi).contains(&final_limit),
        "limit {final_limit} not within [{lo}, {hi}]"
    );
    assert!(
        goodput >= 0.9 * capacity,
        "goodput {goodput:.0}/s of {capacity:.0}/s"
    );
    up.assert_healthy();
}
