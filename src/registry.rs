//! State that outlives a reload, keyed by name (STYLE rule 3).
//!
//! A route keeps its admission controller (in-flight count, queue, waiters),
//! retry budget and metric handles under its name; an upstream keeps its pool
//! and breaker unless its endpoints, protocol or TLS changed. A reload builds a
//! new [`Snapshot`] from the new config, reusing entries by name, and the caller
//! publishes it atomically.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use prometheus::IntCounter;

use crate::config::{Config, QueueDiscipline, RouteConfig};
use crate::error::Reason;
use crate::metrics::{LazyCounters, Metrics, RouteHistograms};
use crate::proxy::admission::{Admission, AdmissionLimits, Discipline, GlobalLimit};
use crate::proxy::retry::{Backoff, BudgetConfig, RetryBudget, RetryOn};
use crate::proxy::router::Router;
use crate::proxy::upstream::Upstream;

/// Per-route state that survives reloads.
pub(crate) struct RouteState {
    pub name: String,
    pub admission: Arc<Admission>,
    pub budget: RetryBudget,
    pub hist: RouteHistograms,
    /// spillway_requests_total by (status class, reason).
    pub requests: LazyCounters<{ 5 * Reason::COUNT }>,
    pub rejections: LazyCounters<{ Reason::COUNT }>,
    /// spillway_timeouts_total by stage: queue, per_try, request, body.
    pub timeouts: LazyCounters<4>,
    /// spillway_retries_total by cause label index (see `retry_cause_index`).
    pub retries: LazyCounters<8>,
    pub budget_exhausted: IntCounter,
    pub metrics: Arc<Metrics>,
}

/// Timeout stages, in `RouteState::timeouts` order.
pub(crate) const TIMEOUT_STAGES: [&str; 4] = ["queue", "per_try", "request", "body"];

/// A route as one config generation sees it.
pub(crate) struct Route {
    pub config: RouteConfig,
    pub state: Arc<RouteState>,
    pub upstream: Arc<Upstream>,
    pub retry_on: RetryOn,
    pub backoff: Backoff,
}

/// One config generation, published with arc-swap and loaded once per request.
pub(crate) struct Snapshot {
    pub config: Arc<Config>,
    pub generation: u64,
    pub loaded_at: SystemTime,
    pub router: Router,
    pub routes: Vec<Route>,
    pub upstreams: Vec<Arc<Upstream>>,
    pub global: Arc<GlobalLimit>,
}

/// Name-keyed state across generations. Weak references: state is dropped
/// once no snapshot and no in-flight request holds it (removed routes drain).
pub(crate) struct Registry {
    metrics: Arc<Metrics>,
    global: Arc<GlobalLimit>,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    routes: HashMap<String, Weak<RouteState>>,
    upstreams: HashMap<String, Weak<Upstream>>,
}

/// What a reload changed, for the one-line log.
#[derive(Debug, Default)]
pub(crate) struct Diff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

// === impl Registry ===

impl Registry {
    pub(crate) fn new(metrics: Arc<Metrics>, max_in_flight: usize) -> Self {
        Registry {
            metrics,
            global: GlobalLimit::new(max_in_flight),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Builds a snapshot for `config`, reusing state by name. No I/O; the lock
    /// is held only for map lookups (never across `.await`: this is sync).
    pub(crate) fn build(
        &self,
        config: Arc<Config>,
        generation: u64,
        previous: Option<&Snapshot>,
    ) -> Result<(Snapshot, Diff), String> {
        let mut inner = self.inner.lock();
        inner.routes.retain(|_, w| w.strong_count() > 0);
        inner.upstreams.retain(|_, w| w.strong_count() > 0);
        self.global.set_max(config.limits.max_in_flight);

        let mut upstreams = Vec::with_capacity(config.upstreams.len());
        for uc in &config.upstreams {
            let reuse = inner
                .upstreams
                .get(&uc.name)
                .and_then(Weak::upgrade)
                .filter(|u| u.compatible(uc));
            let up = match reuse {
                Some(u) => {
                    u.update(uc);
                    u
                }
                None => {
                    let u = Arc::new(Upstream::new(uc, &self.metrics)?);
                    inner.upstreams.insert(uc.name.clone(), Arc::downgrade(&u));
                    u
                }
            };
            upstreams.push(up);
        }

        let mut routes = Vec::with_capacity(config.routes.len());
        for rc in &config.routes {
            let limits = admission_limits(rc);
            let budget = BudgetConfig {
                ratio: rc.retries.budget.ratio,
                min_per_second: rc.retries.budget.min_per_second,
            };
            let state = match inner.routes.get(&rc.name).and_then(Weak::upgrade) {
                Some(s) => {
                    s.admission.set_limits(limits);
                    s.budget.set_config(budget);
                    s
                }
                None => {
                    let s = Arc::new(RouteState::new(&rc.name, limits, budget, &self.metrics));
                    inner.routes.insert(rc.name.clone(), Arc::downgrade(&s));
                    s
                }
            };
            let Some(upstream) = upstreams.iter().find(|u| u.name == rc.upstream).cloned() else {
                return Err(format!(
                    "route `{}` names unknown upstream `{}`",
                    rc.name, rc.upstream
                ));
            };
            routes.push(Route {
                config: rc.clone(),
                state,
                upstream,
                retry_on: RetryOn {
                    connect: rc.retries.on.connect,
                    reset: rc.retries.on.reset,
                    timeout: rc.retries.on.timeout,
                    statuses: rc.retries.on.statuses.clone(),
                },
                backoff: Backoff {
                    base: rc.retries.backoff.base.0,
                    max: rc.retries.backoff.max.0,
                },
            });
        }
        drop(inner);

        let diff = diff(previous, &routes);
        let snapshot = Snapshot {
            router: Router::new(&config.routes),
            config,
            generation,
            loaded_at: SystemTime::now(),
            routes,
            upstreams,
            global: self.global.clone(),
        };
        Ok((snapshot, diff))
    }
}

fn diff(previous: Option<&Snapshot>, routes: &[Route]) -> Diff {
    let mut d = Diff::default();
    let Some(prev) = previous else { return d };
    for r in routes {
        match prev.routes.iter().find(|p| p.config.name == r.config.name) {
            None => d.added.push(r.config.name.clone()),
            Some(p) => {
                let a = serde_json::to_string(&p.config).unwrap_or_default();
                let b = serde_json::to_string(&r.config).unwrap_or_default();
                if a != b {
                    d.changed.push(r.config.name.clone());
                }
            }
        }
    }
    for p in &prev.routes {
        if !routes.iter().any(|r| r.config.name == p.config.name) {
            d.removed.push(p.config.name.clone());
        }
    }
    d
}

/// Admission parameters of a route.
pub(crate) fn admission_limits(rc: &RouteConfig) -> AdmissionLimits {
    AdmissionLimits {
        max_in_flight: rc.concurrency.max_in_flight,
        max_depth: rc.queue.max_depth,
        max_wait: rc.queue.max_wait.0,
        discipline: match rc.queue.discipline {
            QueueDiscipline::Fifo => Discipline::Fifo,
            QueueDiscipline::AdaptiveLifo => Discipline::AdaptiveLifo,
        },
        codel_target: Duration::from_millis(5),
        codel_interval: Duration::from_millis(100),
    }
}

// === impl RouteState ===

impl RouteState {
    fn new(
        name: &str,
        limits: AdmissionLimits,
        budget: BudgetConfig,
        metrics: &Arc<Metrics>,
    ) -> Self {
        RouteState {
            name: name.to_string(),
            admission: Admission::new(limits),
            budget: RetryBudget::new(budget),
            hist: RouteHistograms::new(metrics, name),
            requests: LazyCounters::new(),
            rejections: LazyCounters::new(),
            timeouts: LazyCounters::new(),
            retries: LazyCounters::new(),
            budget_exhausted: metrics
                .retry_budget_exhausted_total
                .with_label_values(&[name]),
            metrics: metrics.clone(),
        }
    }

    /// Counts one answered request.
    pub(crate) fn count_request(&self, status: u16, reason: Reason) {
        let class = (status / 100).clamp(1, 5) as usize;
        let idx = (class - 1) * Reason::COUNT + reason.index();
        self.requests.inc(idx, &self.metrics.requests_total, || {
            vec![
                self.name.clone(),
                format!("{class}xx"),
                reason.as_str().to_string(),
            ]
        });
    }

    /// Counts one local rejection.
    pub(crate) fn count_rejection(&self, reason: Reason) {
        self.rejections
            .inc(reason.index(), &self.metrics.rejections_total, || {
                vec![self.name.clone(), reason.as_str().to_string()]
            });
    }

    /// Counts a timeout at a stage index of [`TIMEOUT_STAGES`].
    pub(crate) fn count_timeout(&self, stage: usize) {
        self.timeouts.inc(stage, &self.metrics.timeouts_total, || {
            vec![self.name.clone(), TIMEOUT_STAGES[stage].to_string()]
        });
    }

    /// Counts a retry by its cause label.
    pub(crate) fn count_retry(&self, cause: &'static str) {
        let idx = match cause {
            "connect" => 0,
            "reset" => 1,
            "timeout" => 2,
            "502" => 3,
            "503" => 4,
            "504" => 5,
            "5xx" => 6,
            _ => 7,
        };
        self.retries.inc(idx, &self.metrics.retries_total, || {
            vec![self.name.clone(), cause.to_string()]
        });
    }

    /// Publishes the admission gauges (called when /metrics is scraped, so the
    /// data path never touches them).
    pub(crate) fn publish_gauges(&self) {
        let s = self.admission.stats();
        let m = &self.metrics;
        let l = [self.name.as_str()];
        m.in_flight.with_label_values(&l).set(s.in_flight as i64);
        m.concurrency_limit
            .with_label_values(&l)
            .set(s.max_in_flight as i64);
        m.queue_depth
            .with_label_values(&l)
            .set(s.queue_depth as i64);
        m.queue_depth_peak
            .with_label_values(&l)
            .set(s.queue_depth_peak as i64);
        m.queue_capacity
            .with_label_values(&l)
            .set(s.max_depth as i64);
    }
}
