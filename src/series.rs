//! Who owns which metric series. Routes (by name) and upstreams (by name and
//! endpoint) outlive single reloads and can be replaced while the old one is
//! still finishing requests; a series is removed when its last owner goes,
//! so renamed or removed routes, upstreams and endpoints leave nothing
//! behind in /metrics. A leaf module: the registry and the upstreams use it.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use prometheus::core::{Collector, MetricVec, MetricVecBuilder};

use crate::config::UpstreamConfig;
use crate::metrics::Metrics;

/// Live owners of metric series by key: the route states per route name
/// (`RouteState`s), and upstreams' claims ([`UpstreamSeries`]).
/// For routes: live `RouteState`s per route name. Two can exist at once: a reload that
/// re-adds a name whose old state is being dropped on another thread builds
/// a new one. Both share the name's metric series, which are removed only
/// when the last one goes; the lock orders that removal before a new state
/// resolves its handles, so no new handle is left detached from the registry.
#[derive(Default)]
pub(crate) struct SeriesOwners(pub(crate) Mutex<HashMap<String, usize>>);

/// One more owner of `key`'s series.
pub(crate) fn claim_key(live: &mut HashMap<String, usize>, key: &str) {
    *live.entry(key.to_string()).or_insert(0) += 1;
}

/// One owner of `key`'s series fewer; true when it was the last, so the
/// caller removes the series (still holding the lock).
pub(crate) fn release_key(live: &mut HashMap<String, usize>, key: &str) -> bool {
    match live.get_mut(key) {
        Some(n) if *n > 1 => {
            *n -= 1;
            false
        }
        Some(_) => {
            live.remove(key);
            true
        }
        None => false,
    }
}

/// Removes every series of `vec` whose `route` label is `route`.
pub(crate) fn remove_route_series<T: MetricVecBuilder>(vec: &MetricVec<T>, route: &str) {
    remove_series(vec, &[("route", route)]);
}

/// Removes every series of `vec` carrying all of `labels`. Lazily resolved
/// counters created only some of them, so the vec itself says which exist;
/// a series that vanished meanwhile is not an error worth reporting.
pub(crate) fn remove_series<T: MetricVecBuilder>(vec: &MetricVec<T>, labels: &[(&str, &str)]) {
    for family in vec.collect() {
        for metric in family.get_metric() {
            let all: HashMap<&str, &str> = metric
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            if labels.iter().all(|(k, v)| all.get(k) == Some(v)) {
                let _ = vec.remove(&all);
            }
        }
    }
}

/// An upstream's claim on its metric series: the breaker's (by upstream
/// name) and the attempt counters (by name and endpoint). Held by the
/// `Upstream`, so it ends when the last snapshot and request using that
/// upstream are gone; the last claim of a key removes its series, so
/// renamed upstreams and removed endpoints do not leak series. Keys share
/// [`SeriesOwners`] with routes, prefixed with a NUL no route name contains.
pub(crate) struct UpstreamSeries {
    owners: Arc<SeriesOwners>,
    metrics: Arc<Metrics>,
    name: String,
    endpoints: Vec<String>,
    breaker: bool,
}

impl UpstreamSeries {
    /// Claims the series of upstream `uc`: its breaker's, if it has one, and one per endpoint.
    pub(crate) fn claim(
        owners: &Arc<SeriesOwners>,
        metrics: &Arc<Metrics>,
        uc: &UpstreamConfig,
    ) -> Self {
        let claim = UpstreamSeries {
            owners: owners.clone(),
            metrics: metrics.clone(),
            name: uc.name.clone(),
            endpoints: uc.endpoints.clone(),
            breaker: uc.circuit_breaker.is_some(),
        };
        let mut live = owners.0.lock();
        if claim.breaker {
            claim_key(&mut live, &claim.breaker_key());
        }
        for ep in &claim.endpoints {
            claim_key(&mut live, &claim.endpoint_key(ep));
        }
        claim
    }

    fn breaker_key(&self) -> String {
        format!("\0breaker\0{}", self.name)
    }

    fn endpoint_key(&self, ep: &str) -> String {
        format!("\0endpoint\0{}\0{ep}", self.name)
    }
}

impl Drop for UpstreamSeries {
    fn drop(&mut self) {
        // Held through the removal, as for routes: a new claim waits for it.
        let mut live = self.owners.0.lock();
        let m = &self.metrics;
        let name = self.name.as_str();
        if self.breaker && release_key(&mut live, &self.breaker_key()) {
            remove_series(&m.circuit_state, &[("upstream", name)]);
            remove_series(&m.circuit_transitions_total, &[("upstream", name)]);
        }
        for ep in &self.endpoints {
            if release_key(&mut live, &self.endpoint_key(ep)) {
                remove_series(
                    &m.upstream_requests_total,
                    &[("upstream", name), ("endpoint", ep.as_str())],
                );
            }
        }
    }
}
