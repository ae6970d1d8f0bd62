//! Every metric Spillway exports: names and help texts in one place, one
//! non-global `prometheus::Registry` (global statics break test isolation).
//! Per-route handles are resolved when a route is built, never per request.

use std::sync::OnceLock;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// 0.5 ms .. 30 s, as the contract asks.
pub(crate) const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// All metric families.
pub(crate) struct Metrics {
    pub registry: Registry,
    pub requests_total: IntCounterVec,
    pub request_duration: HistogramVec,
    pub stage_duration: HistogramVec,
    pub in_flight: IntGaugeVec,
    pub concurrency_limit: IntGaugeVec,
    pub queue_depth: IntGaugeVec,
    pub queue_depth_peak: IntGaugeVec,
    pub queue_capacity: IntGaugeVec,
    pub queue_wait: HistogramVec,
    pub rejections_total: IntCounterVec,
    pub timeouts_total: IntCounterVec,
    pub retries_total: IntCounterVec,
    pub retry_budget_exhausted_total: IntCounterVec,
    pub upstream_requests_total: IntCounterVec,
    pub circuit_state: IntGaugeVec,
    pub circuit_transitions_total: IntCounterVec,
    pub connections: IntGaugeVec,
    pub config_reloads_total: IntCounterVec,
    pub config_generation: IntGauge,
    pub config_last_reload_success: IntGauge,
    pub global_in_flight: IntGauge,
    pub tls_reloads_total: IntCounterVec,
    pub tls_cert_expiry: IntGaugeVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    // Registration only fails on a duplicate name, which is a programming error
    // caught by every test that builds Metrics.
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    g
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
        labels,
    )
    .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(h.clone()))
        .unwrap_or_else(|e| panic!("register {name}: {e}"));
    h
}

// === impl Metrics ===

impl Metrics {
    /// Builds the registry. Panics only on a duplicate metric name (a bug, not input).
    pub(crate) fn new() -> Self {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = r.register(Box::new(pc));
        }
        let g = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric {name}: {e}"));
            r.register(Box::new(g.clone()))
                .unwrap_or_else(|e| panic!("register {name}: {e}"));
            g
        };
        Metrics {
            requests_total: counter(&r, "spillway_requests_total", "Requests answered, by route, status class and reason (`upstream` or a local reason).", &["route", "status_class", "reason"]),
            request_duration: histogram(&r, "spillway_request_duration_seconds", "Time from arrival to the end of the response body.", &["route"]),
            stage_duration: histogram(&r, "spillway_stage_duration_seconds", "Time spent per stage: queue, connect, upstream_headers, total.", &["route", "stage"]),
            in_flight: gauge(&r, "spillway_in_flight", "Requests holding a route permit (until their response body ends).", &["route"]),
            concurrency_limit: gauge(&r, "spillway_concurrency_limit", "The route's concurrency.max_in_flight.", &["route"]),
            queue_depth: gauge(&r, "spillway_queue_depth", "Requests waiting for a route permit.", &["route"]),
            queue_depth_peak: gauge(&r, "spillway_queue_depth_peak", "Highest queue depth since start.", &["route"]),
            queue_capacity: gauge(&r, "spillway_queue_capacity", "The route's queue.max_depth.", &["route"]),
            queue_wait: histogram(&r, "spillway_queue_wait_seconds", "Time admitted requests waited in the queue.", &["route"]),
            rejections_total: counter(&r, "spillway_rejections_total", "Requests refused locally, by reason.", &["route", "reason"]),
            timeouts_total: counter(&r, "spillway_timeouts_total", "Timeouts by stage: queue, per_try, request, body.", &["route", "stage"]),
            retries_total: counter(&r, "spillway_retries_total", "Retries sent, by the cause of the failed attempt.", &["route", "cause"]),
            retry_budget_exhausted_total: counter(&r, "spillway_retry_budget_exhausted_total", "Retries not sent because the route's retry budget was spent.", &["route"]),
            upstream_requests_total: counter(&r, "spillway_upstream_requests_total", "Attempts sent to upstream endpoints, by outcome.", &["upstream", "endpoint", "outcome"]),
            circuit_state: gauge(&r, "spillway_circuit_state", "Breaker state per upstream (1 for the current state).", &["upstream", "state"]),
            circuit_transitions_total: counter(&r, "spillway_circuit_transitions_total", "Breaker transitions, by the state entered.", &["upstream", "to"]),
            connections: gauge(&r, "spillway_connections", "Open client connections per listener.", &["listener"]),
            config_reloads_total: counter(&r, "spillway_config_reloads_total", "Config reloads by result.", &["result"]),
            config_generation: g("spillway_config_generation", "Generation of the config in effect (1 at start)."),
            config_last_reload_success: g("spillway_config_last_reload_success", "1 if the last reload succeeded, else 0."),
            global_in_flight: g("spillway_global_in_flight", "Requests holding a process-wide permit (limits.max_in_flight)."),
            tls_reloads_total: counter(&r, "spillway_tls_reloads_total", "Certificate rotations (listener and upstream TLS files) by result; a failure leaves the previous certificate in use.", &["result"]),
            tls_cert_expiry: gauge(&r, "spillway_tls_cert_expiry_timestamp_seconds", "Unix time at which the certificate a listener serves expires.", &["listener"]),
            registry: r,
        }
    }

    /// Prometheus text format.
    pub(crate) fn render(&self) -> String {
        let families = self.registry.gather();
        let mut buf = String::with_capacity(16 * 1024);
        let enc = prometheus::TextEncoder::new();
        if let Err(e) = enc.encode_utf8(&families, &mut buf) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        buf
    }
}

/// A counter family with one label tuple resolved lazily per slot, so a route
/// resolves `with_label_values` at most once per (slot) and exports no zero series
/// for outcomes that never happened.
pub(crate) struct LazyCounters<const N: usize> {
    slots: [OnceLock<IntCounter>; N],
}

impl<const N: usize> LazyCounters<N> {
    pub(crate) fn new() -> Self {
        LazyCounters {
            slots: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    /// Current value of slot `i` (0 if never incremented).
    pub(crate) fn get(&self, i: usize) -> u64 {
        self.slots
            .get(i)
            .and_then(OnceLock::get)
            .map_or(0, IntCounter::get)
    }

    /// Sum over every slot: the family's total for this route, whatever the
    /// slots stand for.
    pub(crate) fn total(&self) -> u64 {
        self.slots
            .iter()
            .filter_map(OnceLock::get)
            .map(IntCounter::get)
            .sum()
    }

    /// Increments slot `i`, resolving its labels on first use.
    pub(crate) fn inc(&self, i: usize, vec: &IntCounterVec, labels: impl FnOnce() -> Vec<String>) {
        if let Some(slot) = self.slots.get(i) {
            slot.get_or_init(|| {
                let l = labels();
                let refs: Vec<&str> = l.iter().map(String::as_str).collect();
                vec.with_label_values(&refs)
            })
            .inc();
        }
    }
}

/// Histogram handles of one route.
pub(crate) struct RouteHistograms {
    pub duration: Histogram,
    pub queue: Histogram,
    pub connect: Histogram,
    pub upstream_headers: Histogram,
    pub total: Histogram,
    pub queue_wait: Histogram,
}

impl RouteHistograms {
    pub(crate) fn new(m: &Metrics, route: &str) -> Self {
        RouteHistograms {
            duration: m.request_duration.with_label_values(&[route]),
            queue: m.stage_duration.with_label_values(&[route, "queue"]),
            connect: m.stage_duration.with_label_values(&[route, "connect"]),
            upstream_headers: m
                .stage_duration
                .with_label_values(&[route, "upstream_headers"]),
            total: m.stage_duration.with_label_values(&[route, "total"]),
            queue_wait: m.queue_wait.with_label_values(&[route]),
        }
    }
}
