//! The last five minutes of every route, for the charts on /status: one
//! sample per second of requests answered, p99 latency, rejections, queue
//! depth and concurrency limit. The sampler reads counters the data path
//! keeps anyway (request and rejection counters, the duration histogram's
//! buckets, the admission controller's gauges), so sampling costs the data
//! path nothing; memory is [`SAMPLES`] per route in the config in effect.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::metrics::BUCKETS;
use crate::proxy::Shared;
use crate::registry::Route;

/// Time between samples.
pub(crate) const INTERVAL: Duration = Duration::from_secs(1);

/// Samples kept per route: five minutes at one per second.
pub(crate) const SAMPLES: usize = 300;

/// Samples the "recent rej/s" figure averages over (about 5 s).
const RECENT: usize = 5;

/// Cumulative counters of one route at one instant.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Reading {
    /// Requests answered (every status class and reason).
    pub requests: u64,
    /// Requests refused locally (every reason).
    pub rejections: u64,
    /// Cumulative counts of the request duration histogram, one per
    /// [`BUCKETS`] bound, then the total count (the `+Inf` bucket).
    pub duration_buckets: Vec<u64>,
    /// Requests waiting now.
    pub queue_depth: u64,
    /// The concurrency limit in effect now.
    pub limit: u64,
}

/// One second of one route.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Sample {
    /// Requests answered per second over the interval.
    pub requests_per_s: f64,
    /// p99 request duration over the interval in milliseconds; `None` when
    /// nothing was answered.
    pub p99_ms: Option<f64>,
    /// Rejections per second over the interval.
    pub rejections_per_s: f64,
    /// Queue depth when sampled.
    pub queue_depth: u64,
    /// Concurrency limit when sampled.
    pub limit: u64,
    /// Length of the interval (the sampler may be late under load).
    secs: f64,
}

/// One route's ring of samples and the reading they are measured from.
struct RouteSeries {
    samples: VecDeque<Sample>,
    last: Reading,
    last_at: Instant,
}

/// Every route's series, keyed by route name so they survive reloads that
/// keep the name.
#[derive(Default)]
pub(crate) struct StatusSeries {
    routes: Mutex<HashMap<String, RouteSeries>>,
    /// Unix time of the latest sample, for the charts' time axis.
    last_unix: Mutex<f64>,
}

/// What /status.json shows of one route's series.
pub(crate) struct View {
    pub samples: Vec<Sample>,
    /// Rejections per second over the last few samples; `None` before the
    /// first sample.
    pub recent_rejections_per_s: Option<f64>,
}

// === impl StatusSeries ===

impl StatusSeries {
    /// Records one reading per route; series of routes that are no longer in
    /// `routes` are dropped. A route seen for the first time gets its baseline
    /// here and its first sample on the next call.
    pub(crate) fn record(&self, routes: Vec<(String, Reading)>, now: Instant, unix: f64) {
        let live: HashSet<&str> = routes.iter().map(|(n, _)| n.as_str()).collect();
        let mut map = self.routes.lock();
        map.retain(|name, _| live.contains(name.as_str()));
        drop(live);
        for (name, reading) in routes {
            match map.get_mut(&name) {
                Some(s) => s.push(reading, now),
                None => {
                    map.insert(
                        name,
                        RouteSeries {
                            samples: VecDeque::with_capacity(SAMPLES),
                            last: reading,
                            last_at: now,
                        },
                    );
                }
            }
        }
        *self.last_unix.lock() = unix;
    }

    /// The samples of route `name`, oldest first.
    pub(crate) fn view(&self, name: &str) -> View {
        let map = self.routes.lock();
        let Some(s) = map.get(name) else {
            return View {
                samples: Vec::new(),
                recent_rejections_per_s: None,
            };
        };
        View {
            samples: s.samples.iter().copied().collect(),
            recent_rejections_per_s: s.recent_rejections_per_s(),
        }
    }

    /// Unix time of the latest sample (0 before the first).
    pub(crate) fn last_unix(&self) -> f64 {
        *self.last_unix.lock()
    }
}

// === impl RouteSeries ===

impl RouteSeries {
    fn push(&mut self, now_reading: Reading, now: Instant) {
        let secs = now.saturating_duration_since(self.last_at).as_secs_f64();
        if secs <= 0.0 {
            return;
        }
        let last = &self.last;
        // Counters only grow while a route's state lives; a route renamed back
        // and forth gets new state, so a smaller value starts again from 0.
        let delta = |now: u64, before: u64| now.checked_sub(before).unwrap_or(now);
        let sample = Sample {
            requests_per_s: delta(now_reading.requests, last.requests) as f64 / secs,
            p99_ms: p99_seconds(&last.duration_buckets, &now_reading.duration_buckets)
                .map(|s| s * 1000.0),
            rejections_per_s: delta(now_reading.rejections, last.rejections) as f64 / secs,
            queue_depth: now_reading.queue_depth,
            limit: now_reading.limit,
            secs,
        };
        if self.samples.len() == SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
        self.last = now_reading;
        self.last_at = now;
    }

    fn recent_rejections_per_s(&self) -> Option<f64> {
        let recent = self.samples.iter().rev().take(RECENT);
        let (n, secs) = recent.fold((0.0, 0.0), |(n, t), s| {
            (n + s.rejections_per_s * s.secs, t + s.secs)
        });
        (secs > 0.0).then(|| n / secs)
    }
}

/// The p99 of the requests observed between two readings of a duration
/// histogram (cumulative counts per [`BUCKETS`] bound, then the total),
/// interpolated linearly inside the bucket it falls in, as Prometheus'
/// `histogram_quantile` does; in the `+Inf` bucket it is the highest bound.
/// `None` when nothing was observed in between.
pub(crate) fn p99_seconds(before: &[u64], now: &[u64]) -> Option<f64> {
    let delta: Vec<u64> = now
        .iter()
        .enumerate()
        .map(|(i, n)| n.saturating_sub(before.get(i).copied().unwrap_or(0)))
        .collect();
    let total = *delta.last()?;
    if total == 0 {
        return None;
    }
    let rank = 0.99 * total as f64;
    let mut below = 0u64;
    let mut lower = 0.0;
    for (i, &cum) in delta.iter().enumerate() {
        let Some(&upper) = BUCKETS.get(i) else {
            // The +Inf bucket: the highest finite bound is all we know.
            return Some(lower);
        };
        if cum as f64 >= rank && cum > below {
            let within = (rank - below as f64) / (cum - below) as f64;
            return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
        }
        below = cum;
        lower = upper;
    }
    Some(lower)
}

/// One route's counters now. Counts are totals over every slot, so they stay
/// right whichever reasons and status classes exist.
pub(crate) fn read(route: &Route) -> Reading {
    let st = &route.state;
    let stats = st.admission.stats();
    let duration_buckets = st.hist.duration.snapshot().0.to_vec();
    Reading {
        requests: st.requests.total(),
        rejections: st.rejections.total(),
        duration_buckets,
        queue_depth: stats.queue_depth as u64,
        limit: stats.max_in_flight as u64,
    }
}

/// Samples every route of the config in effect each [`INTERVAL`] until the
/// task is aborted at shutdown.
pub(crate) async fn run(shared: Arc<Shared>, series: Arc<StatusSeries>) {
    let mut tick = tokio::time::interval(INTERVAL);
    // Late under load: one sample when the runtime gets to it, measured over
    // the time that actually passed, instead of a burst of catch-up samples.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snap = shared.snapshot.load_full();
        let readings = snap
            .routes
            .iter()
            .map(|r| (r.config.name.clone(), read(r)))
            .collect();
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        series.record(readings, Instant::now(), unix);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cumulative counts for `per_bucket` observations per bucket (one entry
    /// per BUCKETS bound, then +Inf).
    fn cumulative(per_bucket: &[u64]) -> Vec<u64> {
        let mut out = Vec::new();
        let mut sum = 0;
        for i in 0..=BUCKETS.len() {
            sum += per_bucket.get(i).copied().unwrap_or(0);
            out.push(sum);
        }
        out
    }

    #[test]
    fn p99_interpolates_within_the_bucket_of_the_delta() {
        let zero = cumulative(&[]);
        assert_eq!(p99_seconds(&zero, &zero), None);
        // 100 requests all in (0.0005, 0.001]: p99 at 99% of that bucket.
        let mut now = [0u64; 16];
        now[1] = 100;
        let p = p99_seconds(&zero, &cumulative(&now)).unwrap();
        assert!((p - (0.0005 + 0.0005 * 0.99)).abs() < 1e-9, "{p}");
        // Only the delta counts: earlier slow requests do not.
        let mut before = [0u64; 16];
        before[12] = 1000; // (2.5, 5]
        let mut later = before;
        later[1] += 100;
        let p = p99_seconds(&cumulative(&before), &cumulative(&later)).unwrap();
        assert!(p <= 0.001, "{p}");
        // 98 fast, 2 in (0.1, 0.25]: rank 99 is half-way into that bucket.
        let mut mixed = [0u64; 16];
        mixed[0] = 98;
        mixed[8] = 2;
        let p = p99_seconds(&zero, &cumulative(&mixed)).unwrap();
        assert!((p - 0.175).abs() < 1e-9, "{p}");
        // Beyond the last bound: the last bound.
        let mut slow = [0u64; 16];
        slow[15] = 10;
        assert_eq!(p99_seconds(&zero, &cumulative(&slow)), Some(30.0));
    }

    fn reading(requests: u64, rejections: u64) -> Reading {
        Reading {
            requests,
            rejections,
            duration_buckets: cumulative(&[requests]),
            queue_depth: 2,
            limit: 4,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn series_are_bounded_rated_and_follow_the_routes() {
        let s = StatusSeries::default();
        let t0 = Instant::now();
        s.record(vec![("a".into(), reading(0, 0))], t0, 0.0);
        assert!(s.view("a").samples.is_empty());
        assert_eq!(s.view("a").recent_rejections_per_s, None);
        for i in 1..=(SAMPLES as u64 + 20) {
            let at = t0 + INTERVAL * i as u32;
            s.record(
                vec![
                    ("a".into(), reading(10 * i, 100 * i)),
                    ("b".into(), reading(i, 0)),
                ],
                at,
                i as f64,
            );
        }
        let a = s.view("a");
        assert_eq!(a.samples.len(), SAMPLES, "a fixed ring");
        let last = a.samples.last().unwrap();
        assert_eq!(last.requests_per_s, 10.0);
        assert_eq!(last.rejections_per_s, 100.0);
        assert_eq!((last.queue_depth, last.limit), (2, 4));
        assert!(last.p99_ms.is_some());
        assert_eq!(a.recent_rejections_per_s, Some(100.0));
        assert_eq!(s.view("b").samples.len(), SAMPLES);
        // A late tick is measured over the time that passed.
        let late = t0 + INTERVAL * (SAMPLES as u32 + 22);
        let n = SAMPLES as u64 + 20;
        s.record(vec![("b".into(), reading(n + 10, 0))], late, 0.0);
        assert_eq!(s.view("b").samples.last().unwrap().requests_per_s, 5.0);
        let p99 = s.view("b").samples.last().unwrap().p99_ms.unwrap();
        assert!((p99 - 0.5 * 0.99).abs() < 1e-9, "{p99}");
        // `a` left the config: its series went with it.
        assert!(s.view("a").samples.is_empty());
        assert_eq!(s.routes.lock().len(), 1);
    }
}
