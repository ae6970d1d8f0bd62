//! Adaptive limit cost per sample: the uncontended update, interval closes
//! (every 8-64 samples) included in the average.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use spillway::bench_api::adaptive::{AdaptiveLimit, Settings};
// tokio's Instant: `.clippy.toml` forbids std's.
use tokio::time::Instant;

fn per_sample(c: &mut Criterion) {
    let settings = Settings {
        min: 1,
        max: 1024,
        initial: 16,
        tolerance: 2.0,
    };
    let t0 = Instant::now();
    let lim = AdaptiveLimit::new(settings, t0);
    let mut n: u64 = 0;
    c.bench_function("adaptive/on_sample", |b| {
        b.iter(|| {
            n += 1;
            // Virtual time: 1 ms per sample, so intervals close as in service.
            let now = t0 + Duration::from_millis(n) + Duration::from_secs(1);
            let latency = Duration::from_micros(20_000 + (n % 7) * 100);
            black_box(lim.on_sample(now, now - latency, latency, lim.limit()));
        })
    });
}

criterion_group!(benches, per_sample);
criterion_main!(benches);
