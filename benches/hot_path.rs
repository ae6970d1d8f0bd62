//! Per-request hot paths: route matching on a 50-route table and the header
//! rewriting every forwarded request gets.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderValue, Request};
use spillway::bench_api::headers::{add_forwarding, ip_header_value, strip_hop_by_hop};
use spillway::bench_api::router::Router;

fn table(n: usize) -> Router {
    let mut y = String::from(
        "version: 1\nlisteners: [{name: l, bind: \"127.0.0.1:0\"}]\nupstreams: {app: {endpoints: [\"127.0.0.1:1\"]}}\nroutes:\n",
    );
    for i in 0..n {
        // A realistic mix: prefixes with methods, exact paths, hosts, headers, a few regexes.
        let m = match i % 5 {
            0 => format!("{{path_prefix: /svc{i}/, methods: [GET, POST]}}"),
            1 => format!("{{path_exact: /exact/{i}}}"),
            2 => format!("{{path_prefix: /h{i}, host: \"*.tenant{i}.example.com\"}}"),
            3 => format!("{{path_prefix: /x{i}, headers: {{x-tenant: t{i}}}}}"),
            _ => format!("{{path_regex: \"/re{i}/[0-9]+\"}}"),
        };
        y.push_str(&format!("  - {{name: r{i}, match: {m}, upstream: app}}\n"));
    }
    let loaded = spillway::config::load_str(&y, "bench.yaml").unwrap_or_else(|e| panic!("{e}"));
    Router::new(&loaded.config.routes)
}

fn routing(c: &mut Criterion) {
    let router = table(50);
    let first = Request::get("/svc0/items?q=1")
        .header("host", "a")
        .body(())
        .unwrap();
    let last = Request::get("/re49/12345")
        .header("host", "a")
        .body(())
        .unwrap();
    let miss = Request::get("/nothing/here")
        .header("host", "a")
        .body(())
        .unwrap();
    let mut g = c.benchmark_group("route_match_50");
    g.bench_function("first", |b| {
        b.iter(|| black_box(router.route(black_box(&first))))
    });
    g.bench_function("last_regex", |b| {
        b.iter(|| black_box(router.route(black_box(&last))))
    });
    g.bench_function("no_match", |b| {
        b.iter(|| black_box(router.route(black_box(&miss))))
    });
    g.finish();
}

fn headers(c: &mut Criterion) {
    let req = Request::get("/api")
        .header("host", "svc.local")
        .header("user-agent", "bench/1.0")
        .header("accept", "*/*")
        .header("connection", "keep-alive")
        .header("x-forwarded-for", "10.1.2.3")
        .body(())
        .unwrap();
    let ip = ip_header_value("127.0.0.1".parse().unwrap());
    let host = HeaderValue::from_static("svc.local");
    c.bench_function("rewrite_request_headers", |b| {
        b.iter_batched(
            || req.headers().clone(),
            |mut h| {
                strip_hop_by_hop(&mut h, false);
                add_forwarding(&mut h, &ip, false, Some(host.clone()));
                black_box(h)
            },
            criterion::BatchSize::SmallInput,
        )
    });
    let mut with_id = req.headers().clone();
    with_id.insert("x-request-id", HeaderValue::from_static("abc"));
    c.bench_function("rewrite_request_headers_with_id", |b| {
        b.iter_batched(
            || with_id.clone(),
            |mut h| {
                strip_hop_by_hop(&mut h, false);
                add_forwarding(&mut h, &ip, false, Some(host.clone()));
                black_box(h)
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, routing, headers);
criterion_main!(benches);
