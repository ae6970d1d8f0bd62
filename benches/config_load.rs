//! Config load cost for a 200-route file: parse + validate (what `spillway
//! check` and every reload pay on the blocking pool), the same from a file,
//! and a whole reload of a running proxy (build the generation, reuse state
//! by name, swap).

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

const ROUTES: usize = 200;
const UPSTREAMS: usize = 8;

/// A 200-route file shaped like a real one: a mix of prefix, exact and regex
/// matches, method and header matches, queues, timeouts, retries, breakers.
fn config_text() -> String {
    let mut y = String::from(
        "version: 1\nlisteners:\n  - name: inbound\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\nlimits:\n  max_in_flight: 4096\nupstreams:\n",
    );
    for u in 0..UPSTREAMS {
        y.push_str(&format!(
            "  svc{u}:\n    endpoints: [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n    connect_timeout: 250ms\n    circuit_breaker:\n      failure_threshold: 5\n      recovery_timeout: 30s\n      half_open_calls: 3\n",
            20000 + 2 * u,
            20001 + 2 * u
        ));
    }
    y.push_str("routes:\n");
    for r in 0..ROUTES {
        let matcher = match r % 4 {
            0 => format!("      path_prefix: /api/v{}/items{r}/\n", r % 3),
            1 => format!("      path_exact: /exact/{r}\n      methods: [GET, HEAD]\n"),
            2 => format!("      path_regex: \"^/users/[0-9]+/orders{r}(/.*)?$\"\n"),
            _ => format!("      path_prefix: /hdr{r}/\n      headers:\n        x-tenant: t{r}\n"),
        };
        y.push_str(&format!(
            "  - name: route{r}\n    match:\n{matcher}    upstream: svc{}\n    concurrency:\n      max_in_flight: {}\n    queue:\n      max_depth: 64\n      max_wait: 500ms\n      discipline: {}\n    timeouts:\n      request: 3s\n      per_try: 800ms\n    retries:\n      max_attempts: 3\n      on: [connect, reset, 503]\n      budget: {{ ratio: 0.2, min_per_second: 10 }}\n",
            r % UPSTREAMS,
            8 + r % 32,
            if r % 2 == 0 { "fifo" } else { "adaptive_lifo" }
        ));
    }
    y
}

fn load(c: &mut Criterion) {
    let text = config_text();
    let loaded = spillway::config::load_str(&text, "bench.yaml").expect("valid bench config");
    assert_eq!(loaded.config.routes.len(), ROUTES);
    // A clean file, as nearly every reload is: no warnings to locate.
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);

    c.bench_function("config/load_str_200_routes", |b| {
        b.iter(|| spillway::config::load_str(black_box(&text), "bench.yaml").expect("valid"))
    });

    let path: PathBuf =
        std::env::temp_dir().join(format!("spillway-bench-{}.yaml", std::process::id()));
    std::fs::write(&path, &text).expect("write bench config");
    c.bench_function("config/load_file_200_routes", |b| {
        b.iter(|| spillway::config::load_file(black_box(&path)).expect("valid"))
    });
    let _ = std::fs::remove_file(&path);
}

/// `RunningProxy::reload` of an unchanged 200-route config: every route and
/// upstream is reused by name, the router is rebuilt, the snapshot swapped.
fn reload(c: &mut Criterion) {
    let config = spillway::config::load_str(&config_text(), "bench.yaml")
        .expect("valid bench config")
        .config;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let proxy = rt
        .block_on(spillway::start(config.clone()))
        .expect("start proxy");
    c.bench_function("config/reload_200_routes", |b| {
        b.iter_batched(
            || config.clone(),
            |cfg| proxy.reload(cfg).expect("reload"),
            BatchSize::SmallInput,
        )
    });
    proxy.drain();
    drop(proxy);
    drop(rt);
}

criterion_group!(benches, load, reload);
criterion_main!(benches);
