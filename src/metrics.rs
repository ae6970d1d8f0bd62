//! Every metric Spillway exports: names and help texts in one place, one
//! non-global `prometheus::Registry` (global statics break test isolation).
//! Per-route handles are resolved when a route is built; the families whose
//! label values are only known once they happen (outcomes, reasons, timeout
//! stages, retry causes) go through [`LabelCounters`] / [`PairCounters`],
//! which resolve each label value on its first use and keep the handle, so
//! `with_label_values` runs at most once per value, not on every request.

use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

mod histogram;

pub(crate) use histogram::{Histogram, HistogramFamily};

/// 0.5 ms .. 30 s, as docs/guide.md documents for every histogram.
pub(crate) const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// All metric families.
pub(crate) struct Metrics {
    pub registry: Registry,
    pub requests_total: IntCounterVec,
    pub request_duration: Arc<HistogramFamily>,
    pub stage_duration: Arc<HistogramFamily>,
    pub in_flight: IntGaugeVec,
    pub concurrency_limit: IntGaugeVec,
    pub queue_depth: IntGaugeVec,
    pub queue_depth_peak: IntGaugeVec,
    pub queue_capacity: IntGaugeVec,
    pub queue_wait: Arc<HistogramFamily>,
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
    pub priority_requests_total: IntCounterVec,
    pub priority_in_flight: IntGaugeVec,
    pub fairness_keys: IntGaugeVec,
    pub shadow_decisions_total: IntCounterVec,
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

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Arc<HistogramFamily> {
    let h = Arc::new(
        HistogramFamily::new(name, help, labels).unwrap_or_else(|e| panic!("metric {name}: {e}")),
    );
    r.register(Box::new(histogram::Registered(h.clone())))
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
            concurrency_limit: gauge(&r, "spillway_concurrency_limit", "The route's concurrency limit in force: concurrency.max_in_flight, or the adaptive limit's current value.", &["route"]),
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
            priority_requests_total: counter(&r, "spillway_priority_requests_total", "Requests of a priority class admitted or shed.", &["route", "class", "outcome"]),
            priority_in_flight: gauge(&r, "spillway_priority_in_flight", "Route permits held per priority class.", &["route", "class"]),
            fairness_keys: gauge(&r, "spillway_fairness_keys", "Fairness keys with requests in flight or waiting.", &["route"]),
            shadow_decisions_total: counter(&r, "spillway_shadow_decisions_total", "Decisions shadow mode would have taken (the request went through).", &["route", "decision"]),
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

/// A closed set of metric label values: an enum whose variants are the only
/// values one label can take. Declared with [`label_enum!`], which derives
/// `ALL`, `as_str` and `index` from one list of variants, so a counter array
/// sized by `ALL` always has a slot for every variant.
pub(crate) trait Label: Copy + Eq + std::fmt::Debug + 'static {
    /// Every variant, in declaration order.
    const ALL: &'static [Self];
    /// The label value as exported.
    fn as_str(self) -> &'static str;
    /// Position in [`Label::ALL`].
    fn index(self) -> usize;
}

/// Declares a [`Label`] enum: `Variant => "label value"` per line.
macro_rules! label_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $label:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $crate::metrics::Label for $name {
            const ALL: &'static [Self] = &[$($name::$variant),+];

            fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $label, )+
                }
            }

            fn index(self) -> usize {
                // Fieldless enum with implicit discriminants: 0, 1, 2, ... in
                // declaration order, which is the order of `ALL`.
                self as usize
            }
        }
    };
}
pub(crate) use label_enum;

label_enum! {
    /// `status_class` of `spillway_requests_total`.
    pub(crate) enum StatusClass {
        Informational => "1xx",
        Success => "2xx",
        Redirection => "3xx",
        ClientError => "4xx",
        ServerError => "5xx",
    }
}

impl StatusClass {
    /// The class of an HTTP status; out-of-range codes fold into the nearest class.
    pub(crate) fn of(status: u16) -> Self {
        match status / 100 {
            0 | 1 => StatusClass::Informational,
            2 => StatusClass::Success,
            3 => StatusClass::Redirection,
            4 => StatusClass::ClientError,
            _ => StatusClass::ServerError,
        }
    }
}

/// Lazily resolved counters of one family, one per slot: `with_label_values`
/// runs at most once per slot, and slots never incremented export no series.
struct Slots(Box<[OnceLock<IntCounter>]>);

impl Slots {
    fn new(n: usize) -> Self {
        Slots((0..n).map(|_| OnceLock::new()).collect())
    }

    /// Increments slot `i`; callers prove `i` is in range (see the types below).
    fn inc(&self, i: usize, labels: impl FnOnce() -> IntCounter) {
        self.0[i].get_or_init(labels).inc();
    }

    fn get(&self, i: usize) -> u64 {
        self.0[i].get().map_or(0, IntCounter::get)
    }

    fn total(&self) -> u64 {
        self.0
            .iter()
            .filter_map(OnceLock::get)
            .map(IntCounter::get)
            .sum()
    }
}

/// One counter per variant of `L`, for one counter family whose other
/// labels (route, upstream, ...) are fixed.
pub(crate) struct LabelCounters<L: Label> {
    slots: Slots,
    _label: PhantomData<L>,
}

impl<L: Label> LabelCounters<L> {
    /// Starts with no counter resolved: each is created on its first increment.
    pub(crate) fn new() -> Self {
        LabelCounters {
            slots: Slots::new(L::ALL.len()),
            _label: PhantomData,
        }
    }

    /// Increments the counter of `label`; `fixed` are the family's other
    /// label values, in order, followed by `label`'s value.
    pub(crate) fn inc(&self, label: L, vec: &IntCounterVec, fixed: &[&str]) {
        // In range by construction: one slot per `L::ALL`, and `index()` is a
        // position in it (see `label_enum!`).
        self.slots
            .inc(label.index(), || resolve(vec, fixed, &[label.as_str()]));
    }

    /// Current value for `label` (0 if never incremented).
    pub(crate) fn get(&self, label: L) -> u64 {
        self.slots.get(label.index())
    }

    /// Sum over every variant.
    pub(crate) fn total(&self) -> u64 {
        self.slots.total()
    }
}

/// Like [`LabelCounters`] for two enum labels (`status_class` x `reason`).
pub(crate) struct PairCounters<A: Label, B: Label> {
    slots: Slots,
    _labels: PhantomData<(A, B)>,
}

impl<A: Label, B: Label> PairCounters<A, B> {
    /// Starts with no counter resolved: each pair's is created on its first increment.
    pub(crate) fn new() -> Self {
        PairCounters {
            slots: Slots::new(A::ALL.len() * B::ALL.len()),
            _labels: PhantomData,
        }
    }

    /// In range: a < |A| and b < |B|, so a * |B| + b < |A| * |B|.
    fn slot(a: A, b: B) -> usize {
        a.index() * B::ALL.len() + b.index()
    }

    /// Increments the counter of `(a, b)` after the `fixed` label values.
    pub(crate) fn inc(&self, a: A, b: B, vec: &IntCounterVec, fixed: &[&str]) {
        self.slots.inc(Self::slot(a, b), || {
            resolve(vec, fixed, &[a.as_str(), b.as_str()])
        });
    }

    /// Current value of `(a, b)`.
    pub(crate) fn get(&self, a: A, b: B) -> u64 {
        self.slots.get(Self::slot(a, b))
    }

    /// Sum over every pair.
    pub(crate) fn total(&self) -> u64 {
        self.slots.total()
    }
}

fn resolve(vec: &IntCounterVec, fixed: &[&str], tail: &[&str]) -> IntCounter {
    let labels: Vec<&str> = fixed.iter().chain(tail).copied().collect();
    vec.with_label_values(&labels)
}

/// Histogram handles of one route. The request's duration is also its
/// `total` stage, and its queue wait its `queue` stage: one histogram each,
/// exported under both names, so each is observed once per request.
pub(crate) struct RouteHistograms {
    /// `spillway_request_duration_seconds` and stage `total`.
    pub duration: Arc<Histogram>,
    /// `spillway_queue_wait_seconds` and stage `queue`.
    pub queue_wait: Arc<Histogram>,
    pub connect: Arc<Histogram>,
    pub upstream_headers: Arc<Histogram>,
}

impl RouteHistograms {
    /// Resolves the histograms of `route` once, so the data path does no label lookups.
    pub(crate) fn new(m: &Metrics, route: &str) -> Self {
        let duration = m.request_duration.with_label_values(&[route]);
        let duration = m.stage_duration.share(&[route, "total"], &duration);
        let queue_wait = m.queue_wait.with_label_values(&[route]);
        let queue_wait = m.stage_duration.share(&[route, "queue"], &queue_wait);
        RouteHistograms {
            duration,
            queue_wait,
            connect: m.stage_duration.with_label_values(&[route, "connect"]),
            upstream_headers: m
                .stage_duration
                .with_label_values(&[route, "upstream_headers"]),
        }
    }
}
