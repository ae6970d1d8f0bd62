//! Admission controller cost: the uncontended fast path (plain, and with
//! priority classes and fairness configured), and two threads contending for
//! the same route.

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use spillway::bench_api::admission::{Admission, AdmissionLimits, Discipline, Policy, Ticket};
// tokio's Instant: `.clippy.toml` forbids std's; outside a paused runtime it
// is the same clock.
use tokio::time::Instant;

fn limits(max_in_flight: usize) -> AdmissionLimits {
    AdmissionLimits {
        max_in_flight,
        max_depth: 1024,
        max_wait: Duration::from_secs(10),
        discipline: Discipline::Fifo,
        codel_target: Duration::from_millis(5),
        codel_interval: Duration::from_millis(100),
    }
}

/// Acquire + release with a free permit: one poll, no runtime, no timer.
fn uncontended(c: &mut Criterion) {
    let adm = Admission::new(limits(64));
    let mut cx = Context::from_waker(Waker::noop());
    c.bench_function("admission/uncontended_acquire_release", |b| {
        b.iter(|| {
            let fut = pin!(adm.acquire(black_box(None)));
            match fut.poll(&mut cx) {
                Poll::Ready(Ok(admitted)) => drop(black_box(admitted)),
                _ => unreachable!("a permit is free"),
            }
        })
    });
}

/// Two OS threads, each on its own current-thread runtime, acquiring and
/// releasing in a loop, `iters` operations in all. Reports wall time divided
/// by the total: the aggregate cost per acquire+release (a single thread's
/// latency per op is twice that).
fn contended(c: &mut Criterion) {
    let mut group = c.benchmark_group("admission/contended_2_threads");
    // cap 2: both always fit, so this is contention on the atomic word.
    // cap 1: every other acquire queues and is handed a permit across threads.
    for cap in [2usize, 1] {
        group.bench_function(format!("cap_{cap}"), |b| {
            b.iter_custom(|iters| {
                let adm = Admission::new(limits(cap));
                let per_thread = iters.div_ceil(2);
                let barrier = Barrier::new(3);
                std::thread::scope(|scope| {
                    for _ in 0..2 {
                        let (adm, barrier) = (Arc::clone(&adm), &barrier);
                        scope.spawn(move || {
                            let rt = tokio::runtime::Builder::new_current_thread()
                                .enable_time()
                                .build()
                                .expect("runtime");
                            barrier.wait();
                            rt.block_on(async {
                                for _ in 0..per_thread {
                                    let admitted = adm.acquire(None).await.expect("admitted");
                                    drop(black_box(admitted));
                                }
                            });
                        });
                    }
                    barrier.wait();
                    let start = Instant::now();
                    // Leaving the scope joins both threads.
                    start
                })
                .elapsed()
            })
        });
    }
    group.finish();
}

/// Acquire + release with a free permit on a route with priority classes
/// and/or fairness configured. Priority keeps the lock-free path (one more
/// threshold and a per-class count); fairness takes the route's lock on every
/// acquire and release to track the key.
fn uncontended_policy(c: &mut Criterion) {
    // 3 classes [critical, default, sheddable] with `reserved: {critical: 25%}`.
    let classes = vec![0.25, 0.0, 0.0];
    let cases = [
        (
            "priority",
            Policy {
                reserved: classes.clone(),
                ..Policy::default()
            },
        ),
        (
            "fairness",
            Policy {
                max_keys: Some(1024),
                ..Policy::default()
            },
        ),
        (
            "priority_fairness",
            Policy {
                reserved: classes,
                max_keys: Some(1024),
                shadow: false,
            },
        ),
    ];
    for (name, policy) in cases {
        let fair = policy.max_keys.is_some();
        let adm = Admission::with_policy(limits(64), policy);
        // The lowest class (the one the reserved share applies to) and, with
        // fairness, one caller's key hash.
        let ticket = Ticket {
            class: if name == "fairness" { 0 } else { 2 },
            key: if fair { 0x9e37_79b9_7f4a_7c15 } else { 0 },
        };
        let mut cx = Context::from_waker(Waker::noop());
        c.bench_function(
            &format!("admission/uncontended_acquire_release_{name}"),
            |b| {
                b.iter(|| {
                    let fut = pin!(adm.acquire_as(black_box(ticket), black_box(None)));
                    match fut.poll(&mut cx) {
                        Poll::Ready(Ok(admitted)) => drop(black_box(admitted)),
                        _ => unreachable!("a permit is free"),
                    }
                })
            },
        );
    }
}

criterion_group!(benches, uncontended, uncontended_policy, contended);
criterion_main!(benches);
