//! `Router::route` with one route against the 200-route table of the load
//! benchmark's `routes` part (benches/load/protocols.py): 199 routes in turn
//! `path_prefix /svcN/`, `path_regex /api/vN/items/[0-9]+(/.*)?`,
//! `path_prefix /orders/` with an `x-bench-route: tN` header match,
//! `path_regex /orders/[0-9]+/items/N`, and last the only one the request
//! `GET /orders/12345/items` with `x-bench-route: last` matches.
//!
//! `*_linear` are the same tables tried route by route (the reference
//! matcher the index is tested against).
//!
//! `SPILLWAY_ROUTE_ITERS=N SPILLWAY_ROUTE_TABLE=1|1_linear|200|200_linear` skips
//! criterion and routes the request N times with that table, for instruction
//! counts that do not depend on load (the difference between two runs over
//! the difference in N):
//!
//! ```text
//! cargo bench --bench router --no-run
//! for t in 1 1_linear 200 200_linear; do for n in 0 10000; do
//!   SPILLWAY_ROUTE_ITERS=$n SPILLWAY_ROUTE_TABLE=$t valgrind --tool=callgrind \
//!     --callgrind-out-file=/dev/null target/release/deps/router-* 2>&1 | grep refs
//! done; done
//! ```

use std::hint::black_box;

use criterion::Criterion;
use http::Request;
use spillway::bench_api::router::Router;

/// The routes of the load benchmark: `n - 1` that the request does not match, then one that it does.
fn routes(n: usize) -> Vec<spillway::config::RouteConfig> {
    let mut y = String::from(
        "version: 1\nlisteners: [{name: l, bind: \"127.0.0.1:0\"}]\nupstreams: {app: {endpoints: [\"127.0.0.1:1\"]}}\nroutes:\n",
    );
    for i in 0..n - 1 {
        let m = match i % 4 {
            0 => format!("{{path_prefix: /svc{i}/}}"),
            1 => format!("{{path_regex: '/api/v{i}/items/[0-9]+(/.*)?'}}"),
            2 => format!("{{path_prefix: /orders/, headers: {{x-bench-route: t{i}}}}}"),
            _ => format!("{{path_regex: '/orders/[0-9]+/items/{i}'}}"),
        };
        y.push_str(&format!("  - {{name: r{i}, match: {m}, upstream: app}}\n"));
    }
    y.push_str("  - {name: last, match: {path_regex: '/orders/[0-9]+/items', headers: {x-bench-route: last}, methods: [GET]}, upstream: app}\n");
    let loaded = spillway::config::load_str(&y, "bench.yaml").unwrap_or_else(|e| panic!("{e}"));
    loaded.config.routes
}

fn request() -> Request<()> {
    Request::get("/orders/12345/items")
        .header("host", "127.0.0.1:8080")
        .header("user-agent", "wrk")
        .header("x-bench-route", "last")
        .body(())
        .unwrap()
}

fn main() {
    let table = routes(200);
    let one = Router::new(&routes(1));
    let many = Router::new(&table);
    let req = request();
    assert_eq!(one.route(&req), Some(0));
    assert_eq!(many.route(&req), Some(199));
    assert_eq!(many.route_linear(&req), Some(199));
    if let Ok(n) = std::env::var("SPILLWAY_ROUTE_ITERS") {
        let n: usize = n
            .parse()
            .unwrap_or_else(|e| panic!("SPILLWAY_ROUTE_ITERS: {e}"));
        let which = std::env::var("SPILLWAY_ROUTE_TABLE").unwrap_or_default();
        for _ in 0..n {
            black_box(match which.as_str() {
                "1" => one.route(black_box(&req)),
                "1_linear" => one.route_linear(black_box(&req)),
                "200_linear" => many.route_linear(black_box(&req)),
                _ => many.route(black_box(&req)),
            });
        }
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("route_last_of");
    g.bench_function("1", |b| b.iter(|| black_box(one.route(black_box(&req)))));
    g.bench_function("1_linear", |b| {
        b.iter(|| black_box(one.route_linear(black_box(&req))))
    });
    g.bench_function("200", |b| b.iter(|| black_box(many.route(black_box(&req)))));
    g.bench_function("200_linear", |b| {
        b.iter(|| black_box(many.route_linear(black_box(&req))))
    });
    g.finish();
    // What a reload pays to build the table: with the same `path_regex`es
    // the combined regex is reused; with one changed (two tables in turn)
    // it is compiled again.
    c.bench_function("route_table_build/200_same_regexes", |b| {
        b.iter(|| black_box(Router::new(black_box(&table))))
    });
    let mut other = routes(200);
    if let Some(r) = other.first_mut() {
        r.matcher = table[1].matcher.clone();
    }
    let mut flip = false;
    c.bench_function("route_table_build/200_regexes_changed", |b| {
        b.iter(|| {
            flip = !flip;
            black_box(Router::new(black_box(if flip { &table } else { &other })))
        })
    });
    c.final_summary();
}
