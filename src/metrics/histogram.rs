//! Latency histograms for the data path, exported as Prometheus histograms.
//!
//! `prometheus::Histogram::observe` costs four locked read-modify-write
//! instructions (its hot/cold shard switch, the bucket, the sum's
//! compare-exchange loop, the count), and the request path observes several
//! per request: on a loaded proxy that was several per cent of the CPU it
//! spends per request. Here each thread that observes gets a shard of its
//! own, which only it writes: an observation is a plain load and store of
//! one bucket and of the sum, with no locked instruction and no cache line
//! shared between threads. Threads beyond [`SHARDS`] share one more shard,
//! written with atomic read-modify-writes. A scrape adds the shards up.
//!
//! Exported exactly like a `prometheus::HistogramVec` with the same name,
//! help, labels and buckets. The count is the sum of the buckets, so a scrape
//! always sees `+Inf` equal to `_count`; `_sum` may lag an observation that
//! is being recorded while the scrape reads it.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto;

use super::BUCKETS;

/// Threads with a shard of their own; later ones share [`Histogram::shared`].
/// A runtime's worker threads are the ones that observe, and they start first.
pub(crate) const SHARDS: usize = 16;

/// Buckets per shard: one per bound, and `+Inf`.
const SLOTS: usize = BUCKETS.len() + 1;

/// The counts and sum one thread writes (or, for `shared`, every thread past
/// [`SHARDS`]). Aligned so that two threads' shards never share a cache line.
#[repr(align(64))]
#[derive(Default)]
struct Shard {
    counts: [AtomicU64; SLOTS],
    /// `f64` bits.
    sum: AtomicU64,
}

/// One histogram (one label set). Shards are allocated on a thread's first
/// observation, so a single-threaded runtime pays for one.
#[derive(Default)]
pub(crate) struct Histogram {
    shards: [OnceLock<Box<Shard>>; SHARDS],
    shared: Shard,
}

/// This thread's shard index, assigned on its first observation and never
/// given to another thread.
fn slot() -> usize {
    thread_local! {
        static SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    SLOT.with(|s| {
        let v = s.get();
        if v != usize::MAX {
            return v;
        }
        let v = NEXT.fetch_add(1, Ordering::Relaxed);
        s.set(v);
        v
    })
}

/// The bucket `v` falls in: the first bound at or above it, else `+Inf`.
fn bucket_of(v: f64) -> usize {
    BUCKETS
        .iter()
        .position(|&b| v <= b)
        .unwrap_or(BUCKETS.len())
}

impl Histogram {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Records one observation (seconds).
    pub(crate) fn observe(&self, v: f64) {
        let i = bucket_of(v);
        match self.shards.get(slot()) {
            Some(cell) => {
                let s = cell.get_or_init(Box::default);
                // This thread is the shard's only writer: load and store
                // cannot lose an update, and readers see whole values.
                let c = &s.counts[i];
                c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                let sum = f64::from_bits(s.sum.load(Ordering::Relaxed)) + v;
                s.sum.store(sum.to_bits(), Ordering::Relaxed);
            }
            None => {
                let s = &self.shared;
                s.counts[i].fetch_add(1, Ordering::Relaxed);
                // `fetch_update` only fails when the closure returns None.
                let _ = s
                    .sum
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                        Some((f64::from_bits(bits) + v).to_bits())
                    });
            }
        }
    }

    /// Cumulative counts per bound (`+Inf` last, which is the count) and the sum.
    pub(crate) fn snapshot(&self) -> ([u64; SLOTS], f64) {
        let mut counts = [0u64; SLOTS];
        let mut sum = 0.0;
        let shards = self.shards.iter().filter_map(|c| c.get().map(|b| &**b));
        for s in shards.chain(std::iter::once(&self.shared)) {
            for (acc, c) in counts.iter_mut().zip(&s.counts) {
                *acc += c.load(Ordering::Relaxed);
            }
            sum += f64::from_bits(s.sum.load(Ordering::Relaxed));
        }
        let mut running = 0;
        for c in &mut counts {
            running += *c;
            *c = running;
        }
        (counts, sum)
    }

    fn proto(&self) -> proto::Histogram {
        let (counts, sum) = self.snapshot();
        let mut h = proto::Histogram::default();
        h.set_sample_sum(sum);
        h.set_sample_count(counts[SLOTS - 1]);
        let buckets = BUCKETS
            .iter()
            .zip(counts)
            .map(|(&bound, cum)| {
                let mut b = proto::Bucket::default();
                b.set_cumulative_count(cum);
                b.set_upper_bound(bound);
                b
            })
            .collect();
        h.set_bucket(buckets);
        h
    }
}

/// A family of [`Histogram`]s by label values, registered with the
/// `prometheus::Registry` as a collector. Two families may export the same
/// histogram (see [`HistogramFamily::share`]).
pub(crate) struct HistogramFamily {
    desc: Desc,
    members: Mutex<BTreeMap<Vec<String>, Arc<Histogram>>>,
}

impl HistogramFamily {
    /// A family named `name` with `labels`; `Err` for a name or label
    /// Prometheus does not accept (a programming error, never input).
    pub(crate) fn new(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<Self> {
        let labels = labels.iter().map(|l| l.to_string()).collect();
        Ok(HistogramFamily {
            desc: Desc::new(name.to_string(), help.to_string(), labels, HashMap::new())?,
            members: Mutex::new(BTreeMap::new()),
        })
    }

    /// The histogram of `values` (one per label), created on first use.
    pub(crate) fn with_label_values(&self, values: &[&str]) -> Arc<Histogram> {
        let key = values.iter().map(|v| v.to_string()).collect();
        self.members
            .lock()
            .entry(key)
            .or_insert_with(|| Arc::new(Histogram::new()))
            .clone()
    }

    /// Exports `h` under `values` too, unless that series exists already:
    /// then the existing one is returned, so every holder of `values` writes
    /// the same histogram.
    pub(crate) fn share(&self, values: &[&str], h: &Arc<Histogram>) -> Arc<Histogram> {
        let key = values.iter().map(|v| v.to_string()).collect();
        self.members
            .lock()
            .entry(key)
            .or_insert_with(|| h.clone())
            .clone()
    }

    /// Removes every series whose label `name` is `value`.
    pub(crate) fn remove_where(&self, name: &str, value: &str) {
        let Some(i) = self.desc.variable_labels.iter().position(|l| l == name) else {
            return;
        };
        self.members.lock().retain(|k, _| k[i] != value);
    }
}

impl Collector for HistogramFamily {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        // The handles first, the reading without the lock.
        let members: Vec<(Vec<String>, Arc<Histogram>)> = self
            .members
            .lock()
            .iter()
            .map(|(k, h)| (k.clone(), h.clone()))
            .collect();
        let metrics = members
            .into_iter()
            .map(|(values, h)| {
                let labels = self
                    .desc
                    .variable_labels
                    .iter()
                    .zip(values)
                    .map(|(name, value)| {
                        let mut p = proto::LabelPair::default();
                        p.set_name(name.clone());
                        p.set_value(value);
                        p
                    })
                    .collect();
                let mut m = proto::Metric::default();
                m.set_label(labels);
                m.set_histogram(h.proto());
                m
            })
            .collect();
        let mut mf = proto::MetricFamily::default();
        mf.set_name(self.desc.fq_name.clone());
        mf.set_help(self.desc.help.clone());
        mf.set_field_type(proto::MetricType::HISTOGRAM);
        mf.set_metric(metrics);
        vec![mf]
    }
}

/// A family shared with the data path, as the registry holds it.
pub(crate) struct Registered(pub Arc<HistogramFamily>);

impl Collector for Registered {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        self.0.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, HistogramOpts, HistogramVec, Registry, TextEncoder};

    fn text(r: &Registry) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&r.gather(), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// Values on, between and beyond the bounds (exact in binary, so the
    /// sums agree to the last digit).
    const VALUES: &[f64] = &[0.0, 0.0005, 0.25, 0.375, 1.0, 2.0, 30.0, 64.0, 0.125];

    #[test]
    fn exports_what_prometheus_histogram_vec_exports() {
        let ours = Registry::new();
        let fam = HistogramFamily::new("t_seconds", "help text", &["route", "stage"]).unwrap();
        let a = fam.with_label_values(&["r1", "queue"]);
        let b = fam.with_label_values(&["r0", "total"]);
        let reference = Registry::new();
        let vec = HistogramVec::new(
            HistogramOpts::new("t_seconds", "help text").buckets(BUCKETS.to_vec()),
            &["route", "stage"],
        )
        .unwrap();
        reference.register(Box::new(vec.clone())).unwrap();
        for (i, &v) in VALUES.iter().enumerate() {
            a.observe(v);
            vec.with_label_values(&["r1", "queue"]).observe(v);
            if i % 2 == 0 {
                b.observe(v);
                vec.with_label_values(&["r0", "total"]).observe(v);
            }
        }
        ours.register(Box::new(fam)).unwrap();
        assert_eq!(text(&ours), text(&reference));
    }

    #[test]
    fn a_shared_histogram_shows_under_both_families_and_removal_is_per_family() {
        let r = Registry::new();
        let duration = Arc::new(HistogramFamily::new("d_seconds", "d", &["route"]).unwrap());
        let stage = Arc::new(HistogramFamily::new("s_seconds", "s", &["route", "stage"]).unwrap());
        let h = duration.with_label_values(&["a"]);
        let total = stage.share(&["a", "total"], &h);
        assert!(Arc::ptr_eq(&h, &total));
        // A second holder of the same names gets the same histograms.
        let again = duration.with_label_values(&["a"]);
        assert!(Arc::ptr_eq(&h, &stage.share(&["a", "total"], &again)));
        h.observe(0.01);
        r.register(Box::new(Registered(duration.clone()))).unwrap();
        r.register(Box::new(Registered(stage.clone()))).unwrap();
        let t = text(&r);
        assert!(t.contains("d_seconds_count{route=\"a\"} 1"), "{t}");
        assert!(
            t.contains("s_seconds_count{route=\"a\",stage=\"total\"} 1"),
            "{t}"
        );
        stage.with_label_values(&["b", "queue"]).observe(1.0);
        stage.remove_where("route", "a");
        duration.remove_where("route", "a");
        let t = text(&r);
        assert!(!t.contains("route=\"a\""), "{t}");
        assert!(
            t.contains("s_seconds_count{route=\"b\",stage=\"queue\"} 1"),
            "{t}"
        );
    }

    /// More threads than shards, all at once: every observation is counted,
    /// in its bucket, and in the sum.
    #[test]
    fn concurrent_threads_beyond_the_shards_lose_nothing() {
        let h = Arc::new(Histogram::new());
        let threads = SHARDS + 8;
        let per = 20_000u64;
        let start = Arc::new(std::sync::Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (h, start) = (h.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    // 0.5 ms (first bucket) or 64 s (+Inf): exact sums.
                    let v = if t % 2 == 0 { 0.0005 } else { 64.0 };
                    for _ in 0..per {
                        h.observe(v);
                    }
                })
            })
            .collect();
        for t in handles {
            t.join().unwrap();
        }
        let (counts, sum) = h.snapshot();
        let total = threads as u64 * per;
        assert_eq!(counts[SLOTS - 1], total);
        assert_eq!(counts[0], total / 2);
        assert_eq!(
            counts[SLOTS - 2],
            total / 2,
            "nothing but 0.5 ms below +Inf"
        );
        let want = (total / 2) as f64 * (0.0005 + 64.0);
        assert!((sum - want).abs() <= want * 1e-9, "sum {sum}, want {want}");
    }

    #[test]
    fn buckets_are_upper_inclusive() {
        assert_eq!(bucket_of(0.0), 0);
        assert_eq!(bucket_of(0.0005), 0);
        assert_eq!(bucket_of(0.00051), 1);
        assert_eq!(bucket_of(30.0), BUCKETS.len() - 1);
        assert_eq!(bucket_of(30.5), BUCKETS.len());
        assert_eq!(bucket_of(f64::INFINITY), BUCKETS.len());
    }
}
