//! State that outlives a reload, keyed by name (CONTRIBUTING.md, rule 3).
//!
//! A route keeps its admission controller (in-flight count, queue, waiters),
//! retry budget and metric handles under its name; an upstream keeps its pool
//! and breaker unless its endpoints, protocol or TLS changed. A reload builds a
//! new [`Snapshot`] from the new config, reusing entries by name, and the caller
//! publishes it atomically.
//!
//! A removed route is dropped from the registry's view at once but lives on in
//! every request that still holds the snapshot it started with (queued
//! requests) or its `Arc<RouteState>` (the response body guard), so those
//! finish normally. When the last of them ends, the state is dropped and its
//! metric series are removed, so renaming routes does not leak series. The
//! same holds for upstreams: a removed or renamed upstream's series, and a
//! removed endpoint's, go with the last request that used them.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use prometheus::IntCounter;

use crate::config::Mode;
use crate::config::{Config, QueueDiscipline, RouteConfig};
use crate::error::Reason;
use crate::metrics::{LabelCounters, Metrics, PairCounters, RouteHistograms, StatusClass};
use crate::proxy::adaptive::{self, AdaptiveLimit};
use crate::proxy::admission::{Admission, AdmissionLimits, Discipline, GlobalLimit, Policy};
use crate::proxy::outcome::ShadowLabel;
use crate::proxy::outcome::TimeoutStage;
use crate::proxy::retry::RetryLabel;
use crate::proxy::retry::{Backoff, BudgetConfig, RetryBudget, RetryOn};
use crate::proxy::router::Router;
use crate::proxy::upstream::Upstream;
use crate::series::{claim_key, release_key, remove_route_series, SeriesOwners, UpstreamSeries};

/// Per-route state that survives reloads.
pub(crate) struct RouteState {
    pub name: String,
    pub admission: Arc<Admission>,
    /// With `max_in_flight: auto`: the limiter that sets `admission`'s cap.
    /// Kept across reloads while the `adaptive` settings stay the same.
    pub adaptive: ArcSwapOption<AdaptiveLimit>,
    pub budget: RetryBudget,
    pub hist: RouteHistograms,
    /// spillway_requests_total by (status class, reason).
    pub requests: PairCounters<StatusClass, Reason>,
    pub rejections: LabelCounters<Reason>,
    /// spillway_timeouts_total by stage: queue, per_try, request, body.
    pub timeouts: LabelCounters<TimeoutStage>,
    /// spillway_retries_total by cause label index (see `retry_cause_index`).
    pub retries: LabelCounters<RetryLabel>,
    pub budget_exhausted: IntCounter,
    /// spillway_shadow_decisions_total by decision.
    pub shadow: LabelCounters<ShadowLabel>,
    pub metrics: Arc<Metrics>,
    /// Who else uses this route name's metric series (see [`SeriesOwners`]).
    owners: Arc<SeriesOwners>,
}

/// `spillway_priority_requests_total` handles of one class, resolved when
/// the route is built (class names come from the config).
pub(crate) struct ClassCounters {
    pub admitted: IntCounter,
    pub shed: IntCounter,
}

/// A route as one config generation sees it.
pub(crate) struct Route {
    pub config: RouteConfig,
    pub state: Arc<RouteState>,
    pub upstream: Arc<Upstream>,
    pub retry_on: RetryOn,
    pub backoff: Backoff,
    /// Per priority class, in class order (empty without priority).
    pub classes: Vec<ClassCounters>,
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
    series: Arc<SeriesOwners>,
}

#[derive(Default)]
struct Inner {
    routes: HashMap<String, Weak<RouteState>>,
    upstreams: HashMap<String, Weak<Upstream>>,
}

/// What a reload changed, for the one-line log.
#[derive(Debug, Default)]
pub(crate) struct Diff {
    /// Routes added, removed (they drain) and changed in any field.
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub upstreams_added: Vec<String>,
    pub upstreams_removed: Vec<String>,
    /// Upstreams rebuilt because their endpoints, protocol, TLS, connect
    /// timeout, pool or breaker presence changed: new pool, breaker closed.
    pub upstreams_rebuilt: Vec<String>,
}

// === impl Registry ===

impl Registry {
    /// Starts with no route or upstream state; `max_in_flight` is `limits.max_in_flight`.
    pub(crate) fn new(metrics: Arc<Metrics>, max_in_flight: usize) -> Self {
        Registry {
            metrics,
            global: GlobalLimit::new(max_in_flight),
            inner: Mutex::new(Inner::default()),
            series: Arc::new(SeriesOwners::default()),
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
        let mut rebuilt = Vec::new();
        for uc in &config.upstreams {
            let existing = inner.upstreams.get(&uc.name).and_then(Weak::upgrade);
            let up = match existing {
                Some(u) if u.compatible(uc) => {
                    u.update(uc);
                    u
                }
                old => {
                    if old.is_some() {
                        rebuilt.push(uc.name.clone());
                    }
                    // Claimed first: a dying upstream of the same name then
                    // keeps the series this one is about to write.
                    let series = UpstreamSeries::claim(&self.series, &self.metrics, uc);
                    let u = Arc::new(Upstream::new(uc, &self.metrics, series)?);
                    inner.upstreams.insert(uc.name.clone(), Arc::downgrade(&u));
                    u
                }
            };
            upstreams.push(up);
        }

        let mut routes = Vec::with_capacity(config.routes.len());
        for rc in &config.routes {
            let mut limits = admission_limits(rc);
            let policy = admission_policy(rc);
            let budget = BudgetConfig {
                ratio: rc.retries.budget.ratio,
                min_per_second: rc.retries.budget.min_per_second,
            };
            let state = match inner.routes.get(&rc.name).and_then(Weak::upgrade) {
                Some(s) => {
                    s.update_adaptive(rc);
                    if let Some(a) = s.adaptive.load().as_ref() {
                        limits.max_in_flight = a.limit();
                    }
                    s.admission.set_limits(limits);
                    s.admission.set_policy(policy);
                    s.budget.set_config(budget);
                    s
                }
                None => {
                    let s = Arc::new(RouteState::new(
                        &rc.name,
                        limits,
                        policy,
                        budget,
                        &self.metrics,
                        &self.series,
                    ));
                    s.update_adaptive(rc);
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
                classes: class_counters(&self.metrics, rc),
            });
        }
        drop(inner);

        let mut diff = diff(previous, &routes, &upstreams);
        diff.upstreams_rebuilt = rebuilt;
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

fn diff(previous: Option<&Snapshot>, routes: &[Route], upstreams: &[Arc<Upstream>]) -> Diff {
    let mut d = Diff::default();
    let Some(prev) = previous else { return d };
    for u in upstreams {
        if !prev.upstreams.iter().any(|p| p.name == u.name) {
            d.upstreams_added.push(u.name.clone());
        }
    }
    for p in &prev.upstreams {
        if !upstreams.iter().any(|u| u.name == p.name) {
            d.upstreams_removed.push(p.name.clone());
        }
    }
    for r in routes {
        match prev.routes.iter().find(|p| p.config.name == r.config.name) {
            None => d.added.push(r.config.name.clone()),
            Some(p) => {
                if p.config != r.config {
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
/// The route's classes, fairness and mode as the admission controller takes them.
pub(crate) fn admission_policy(rc: &RouteConfig) -> Policy {
    Policy {
        reserved: rc
            .priority
            .as_ref()
            .map_or_else(|| vec![0.0], |p| p.reserved.clone()),
        max_keys: rc.fairness.as_ref().map(|f| f.max_keys),
        shadow: rc.mode == Mode::Shadow,
    }
}

fn class_counters(m: &Metrics, rc: &RouteConfig) -> Vec<ClassCounters> {
    let Some(p) = &rc.priority else {
        return Vec::new();
    };
    p.classes
        .iter()
        .map(|class| ClassCounters {
            admitted: m.priority_requests_total.with_label_values(&[
                rc.name.as_str(),
                class,
                "admitted",
            ]),
            shed: m
                .priority_requests_total
                .with_label_values(&[rc.name.as_str(), class, "shed"]),
        })
        .collect()
}

/// A route's admission limits from `concurrency:` and `queue:`, with fixed CoDel timings.
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
        policy: Policy,
        budget: BudgetConfig,
        metrics: &Arc<Metrics>,
        owners: &Arc<SeriesOwners>,
    ) -> Self {
        // Registered, and handles resolved, under the owners lock: a dying
        // state of the same name removes its series either before this (and
        // these handles are fresh) or not at all (we are counted).
        let mut live = owners.0.lock();
        claim_key(&mut live, name);
        let state = RouteState {
            name: name.to_string(),
            admission: Admission::with_policy(limits, policy),
            adaptive: ArcSwapOption::empty(),
            budget: RetryBudget::new(budget),
            hist: RouteHistograms::new(metrics, name),
            requests: PairCounters::new(),
            rejections: LabelCounters::new(),
            timeouts: LabelCounters::new(),
            retries: LabelCounters::new(),
            budget_exhausted: metrics
                .retry_budget_exhausted_total
                .with_label_values(&[name]),
            shadow: LabelCounters::new(),
            metrics: metrics.clone(),
            owners: owners.clone(),
        };
        drop(live);
        state
    }

    /// Installs, keeps or removes the adaptive limiter for `rc`. A limiter
    /// whose settings did not change keeps its limit and what it learned; a
    /// new one starts at `initial`. Admission (in-flight, queue) is never
    /// replaced: a switch between a number and `auto` only moves the cap.
    fn update_adaptive(&self, rc: &RouteConfig) {
        let Some(cfg) = &rc.concurrency.adaptive else {
            self.adaptive.store(None);
            return;
        };
        let settings = adaptive::Settings::from(cfg);
        let current = self.adaptive.load_full();
        if current.as_ref().is_some_and(|a| a.settings() == settings) {
            return;
        }
        self.adaptive.store(Some(Arc::new(AdaptiveLimit::new(
            settings,
            tokio::time::Instant::now(),
        ))));
    }

    /// Counts one answered request.
    pub(crate) fn count_request(&self, status: u16, reason: Reason) {
        self.requests.inc(
            StatusClass::of(status),
            reason,
            &self.metrics.requests_total,
            &[&self.name],
        );
    }

    /// Counts one local rejection.
    pub(crate) fn count_rejection(&self, reason: Reason) {
        self.rejections
            .inc(reason, &self.metrics.rejections_total, &[&self.name]);
    }

    /// Counts a timeout at a stage.
    pub(crate) fn count_timeout(&self, stage: TimeoutStage) {
        self.timeouts
            .inc(stage, &self.metrics.timeouts_total, &[&self.name]);
    }

    /// Counts a retry by its cause.
    pub(crate) fn count_retry(&self, cause: RetryLabel) {
        self.retries
            .inc(cause, &self.metrics.retries_total, &[&self.name]);
    }

    /// Publishes the admission gauges (called when /metrics is scraped, so the
    /// data path never touches them). The caller holds a snapshot containing
    /// this route, so it is alive and its series are not being removed.
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

impl Route {
    /// The route state's gauges, plus those that need the route's config
    /// (class names, whether fairness is on). Called on scrape.
    pub(crate) fn publish_gauges(&self) {
        self.state.publish_gauges();
        let m = &self.state.metrics;
        let name = self.state.name.as_str();
        if self.config.priority.is_none() && self.config.fairness.is_none() {
            return;
        }
        let s = self.state.admission.stats();
        if let Some(p) = &self.config.priority {
            for (i, class) in p.classes.iter().enumerate() {
                let n = s.class_in_flight.get(i).copied().unwrap_or(0);
                m.priority_in_flight
                    .with_label_values(&[name, class])
                    .set(n as i64);
            }
        }
        if self.config.fairness.is_some() {
            m.fairness_keys
                .with_label_values(&[name])
                .set(s.keys as i64);
        }
    }
}

/// The last state of a route name is gone (the route was removed or renamed
/// and every request that used it has finished): remove the name's series
/// so they do not linger in /metrics.
impl Drop for RouteState {
    fn drop(&mut self) {
        let mut live = self.owners.0.lock();
        if !release_key(&mut live, &self.name) {
            return;
        }
        let m = &self.metrics;
        let route = self.name.as_str();
        remove_route_series(&m.requests_total, route);
        remove_route_series(&m.rejections_total, route);
        remove_route_series(&m.timeouts_total, route);
        remove_route_series(&m.retries_total, route);
        remove_route_series(&m.retry_budget_exhausted_total, route);
        m.request_duration.remove_where("route", route);
        m.stage_duration.remove_where("route", route);
        m.queue_wait.remove_where("route", route);
        remove_route_series(&m.in_flight, route);
        remove_route_series(&m.concurrency_limit, route);
        remove_route_series(&m.queue_depth, route);
        remove_route_series(&m.queue_depth_peak, route);
        remove_route_series(&m.queue_capacity, route);
        remove_route_series(&m.priority_requests_total, route);
        remove_route_series(&m.priority_in_flight, route);
        remove_route_series(&m.fairness_keys, route);
        remove_route_series(&m.shadow_decisions_total, route);
        drop(live);
        tracing::debug!(route, "route drained; its state and metric series are gone");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(upstream_ep: &str, routes: &[&str]) -> Arc<Config> {
        let mut yaml = format!(
            "version: 1\nlisteners:\n  - name: inbound\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\nupstreams:\n  app:\n    endpoints: [\"{upstream_ep}\"]\nroutes:\n"
        );
        for (i, r) in routes.iter().enumerate() {
            yaml.push_str(&format!(
                "  - name: {r}\n    match:\n      path_prefix: /{i}\n    upstream: app\n"
            ));
        }
        let loaded = crate::config::load_str(&yaml, "t.yaml").expect("valid test config");
        Arc::new(loaded.config)
    }

    fn series(m: &Metrics, route: &str) -> usize {
        let needle = format!("route=\"{route}\"");
        m.render().lines().filter(|l| l.contains(&needle)).count()
    }

    fn route<'a>(snap: &'a Snapshot, name: &str) -> &'a Route {
        snap.routes
            .iter()
            .find(|r| r.config.name == name)
            .expect("route in snapshot")
    }

    #[test]
    fn state_is_reused_by_name_and_upstreams_by_compatibility() {
        let m = Arc::new(Metrics::new());
        let reg = Registry::new(m.clone(), 100);
        let (s1, _) = reg
            .build(config("127.0.0.1:1", &["a", "b"]), 1, None)
            .unwrap();
        let (s2, d2) = reg
            .build(config("127.0.0.1:1", &["b", "c"]), 2, Some(&s1))
            .unwrap();
        assert!(Arc::ptr_eq(&route(&s1, "b").state, &route(&s2, "b").state));
        assert!(Arc::ptr_eq(&s1.upstreams[0], &s2.upstreams[0]));
        assert_eq!(d2.added, ["c"]);
        assert_eq!(d2.removed, ["a"]);
        assert!(d2.upstreams_rebuilt.is_empty());
        let (s3, d3) = reg
            .build(config("127.0.0.1:2", &["b", "c"]), 3, Some(&s2))
            .unwrap();
        assert!(!Arc::ptr_eq(&s2.upstreams[0], &s3.upstreams[0]));
        assert_eq!(d3.upstreams_rebuilt, ["app"]);
        assert!(Arc::ptr_eq(&route(&s2, "c").state, &route(&s3, "c").state));
    }

    fn concurrency_config(concurrency: &str) -> Arc<Config> {
        let yaml = format!(
            "version: 1\nlisteners:\n  - name: inbound\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\nupstreams:\n  app:\n    endpoints: [\"127.0.0.1:1\"]\nroutes:\n  - name: r\n    upstream: app\n    concurrency:\n{concurrency}"
        );
        Arc::new(
            crate::config::load_str(&yaml, "t.yaml")
                .expect("valid")
                .config,
        )
    }

    #[test]
    fn adaptive_limit_survives_reloads_and_switches_keep_admission() {
        let m = Arc::new(Metrics::new());
        let reg = Registry::new(m.clone(), 100);
        let fixed = "      max_in_flight: 4\n";
        let auto = "      max_in_flight: auto\n      adaptive:\n        initial: 6\n";
        let (s1, _) = reg.build(concurrency_config(fixed), 1, None).unwrap();
        let state = route(&s1, "r").state.clone();
        assert!(state.adaptive.load().is_none());
        assert_eq!(state.admission.stats().max_in_flight, 4);
        let held = state.admission.clone();

        let (s2, _) = reg.build(concurrency_config(auto), 2, Some(&s1)).unwrap();
        let same = &route(&s2, "r").state;
        assert!(Arc::ptr_eq(&held, &same.admission), "admission replaced");
        let limiter = same.adaptive.load_full().expect("limiter installed");
        assert_eq!(same.admission.stats().max_in_flight, 6);
        // The limiter moved the cap; a reload with the same settings keeps
        // both the limiter and the cap it set.
        same.admission.set_max_in_flight(9);
        let (s3, _) = reg.build(concurrency_config(auto), 3, Some(&s2)).unwrap();
        let kept = route(&s3, "r").state.adaptive.load_full().expect("limiter");
        assert!(Arc::ptr_eq(&limiter, &kept), "limiter rebuilt");
        assert_eq!(held.stats().max_in_flight, limiter.limit());

        let (s4, _) = reg.build(concurrency_config(fixed), 4, Some(&s3)).unwrap();
        assert!(route(&s4, "r").state.adaptive.load().is_none());
        assert_eq!(held.stats().max_in_flight, 4);
        route(&s4, "r").state.publish_gauges();
        assert!(m
            .render()
            .contains("spillway_concurrency_limit{route=\"r\"} 4"));
    }

    #[test]
    fn removed_route_keeps_series_until_it_drains() {
        let m = Arc::new(Metrics::new());
        let reg = Registry::new(m.clone(), 100);
        let (s1, _) = reg
            .build(config("127.0.0.1:1", &["a", "b"]), 1, None)
            .unwrap();
        for r in &s1.routes {
            r.state.count_request(200, Reason::Upstream);
            r.state.count_rejection(Reason::QueueFull);
            r.state.count_timeout(TimeoutStage::PerTry);
            r.state.count_retry(RetryLabel::Unavailable);
            r.state.hist.duration.observe(0.01);
            r.publish_gauges();
        }
        assert!(series(&m, "b") > 0);
        // An in-flight request on `b` holds its state.
        let in_flight = route(&s1, "b").state.clone();
        let (s2, _) = reg
            .build(config("127.0.0.1:1", &["a"]), 2, Some(&s1))
            .unwrap();
        drop(s1);
        assert!(
            series(&m, "b") > 0,
            "series gone while a request still runs"
        );
        drop(in_flight);
        assert_eq!(series(&m, "b"), 0, "{}", m.render());
        assert!(series(&m, "a") > 0, "the kept route lost its series");
        drop(s2);
    }

    fn upstream_config(name: &str, endpoint: &str) -> Arc<Config> {
        let yaml = format!(
            "version: 1\nlisteners:\n  - name: inbound\n    bind: 127.0.0.1:0\nadmin:\n  bind: 127.0.0.1:0\nupstreams:\n  {name}:\n    endpoints: [\"{endpoint}\"]\n    circuit_breaker:\n      failure_threshold: 5\nroutes:\n  - name: r\n    match:\n      path_prefix: /\n    upstream: {name}\n"
        );
        let loaded = crate::config::load_str(&yaml, "t.yaml").expect("valid test config");
        Arc::new(loaded.config)
    }

    fn upstream_series(m: &Metrics, needle: &str) -> usize {
        m.render()
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains(needle))
            .count()
    }

    #[test]
    fn upstream_series_go_with_the_last_user_of_name_and_endpoint() {
        let m = Arc::new(Metrics::new());
        let reg = Registry::new(m.clone(), 100);
        let (s1, _) = reg
            .build(upstream_config("app", "127.0.0.1:1"), 1, None)
            .unwrap();
        let count = |s: &Snapshot| {
            let u = &s.upstreams[0];
            u.count(
                &u.pick_avoiding(None),
                crate::proxy::outcome::AttemptOutcome::Timeout,
            );
        };
        count(&s1);
        assert_eq!(upstream_series(&m, "upstream=\"app\""), 4, "{}", m.render());

        // Renamed: the old name's series stay while a request holds it.
        let (s2, _) = reg
            .build(upstream_config("svc", "127.0.0.1:1"), 2, Some(&s1))
            .unwrap();
        count(&s2);
        let in_flight = s1.upstreams[0].clone();
        drop(s1);
        assert_eq!(upstream_series(&m, "upstream=\"app\""), 4);
        drop(in_flight);
        assert_eq!(upstream_series(&m, "upstream=\"app\""), 0, "{}", m.render());
        assert_eq!(upstream_series(&m, "upstream=\"svc\""), 4);

        // Same name, new endpoint: only the old endpoint's counters go.
        let (s3, d3) = reg
            .build(upstream_config("svc", "127.0.0.1:2"), 3, Some(&s2))
            .unwrap();
        assert_eq!(d3.upstreams_rebuilt, ["svc"]);
        count(&s3);
        drop(s2);
        assert_eq!(
            upstream_series(&m, "endpoint=\"127.0.0.1:1\""),
            0,
            "{}",
            m.render()
        );
        assert_eq!(upstream_series(&m, "endpoint=\"127.0.0.1:2\""), 1);
        assert_eq!(
            upstream_series(&m, "spillway_circuit_state{"),
            3,
            "the rebuilt upstream's breaker lost its series: {}",
            m.render()
        );
        drop(s3);
        assert_eq!(upstream_series(&m, "upstream=\"svc\""), 0, "{}", m.render());
    }

    #[test]
    fn readded_name_keeps_its_series_when_the_old_state_dies_late() {
        let m = Arc::new(Metrics::new());
        let owners = Arc::new(SeriesOwners::default());
        let limits = admission_limits(&config("127.0.0.1:1", &["r"]).routes[0]);
        let budget = BudgetConfig {
            ratio: 0.2,
            min_per_second: 10,
        };
        let old = RouteState::new("r", limits, Policy::default(), budget, &m, &owners);
        old.count_request(200, Reason::Upstream);
        let new = RouteState::new("r", limits, Policy::default(), budget, &m, &owners);
        drop(old);
        new.count_request(200, Reason::Upstream);
        new.budget_exhausted.inc();
        let text = m.render();
        assert!(
            text.contains(
                "spillway_requests_total{reason=\"upstream\",route=\"r\",status_class=\"2xx\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("spillway_retry_budget_exhausted_total{route=\"r\"} 1"));
        drop(new);
        assert_eq!(series(&m, "r"), 0);
    }
}
