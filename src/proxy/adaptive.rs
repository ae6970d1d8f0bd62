//! The adaptive concurrency limit behind `concurrency.max_in_flight: auto`.
//!
//! A state machine without I/O: [`AdaptiveLimit::on_sample`] takes one
//! upstream latency sample and, now and then, moves the limit. The request
//! pipeline feeds it through [`observe`], which also applies a changed limit
//! to the route's admission controller.
//!
//! # Samples
//!
//! A sample is the time from the start of an upstream attempt to its response
//! headers, with the route's in-flight count when the attempt started: the
//! load that request met, so a queueing upstream's latency pairs with the
//! count that caused it (the count when the headers arrive lags it by one
//! latency, and under saturation that lag can make a full upstream look as
//! if its latency did not depend on load). A
//! timed-out attempt is a sample as slow as its timeout. Attempts that never
//! reached the upstream or broke (connect, reset, client body failures) and
//! `5xx` answers say nothing about queueing in the upstream and are not
//! samples. Samples of attempts that started before the last limit change
//! are dropped: they measured the old limit.
//!
//! # Intervals
//!
//! Samples are collected into an interval that closes once it holds at least
//! `clamp(limit, 8, 64)` samples and lasted at least `max(100 ms, 2 x the
//! no-load latency)`. An interval is summarised by the trimmed mean latency
//! of its last 64 samples (the fastest and slowest eighth dropped, so one slow
//! request does not move it, while it still follows latencies that cluster
//! at a few values, which a median would not), the mean in-flight count, and
//! whether in-flight reached the limit ("saturated"). After a decrease,
//! samples count again only from when in-flight has fallen to the new limit.
//!
//! # The no-load latency
//!
//! The limit is judged against the upstream's latency when nothing queues in
//! it, estimated two ways:
//!
//! - The first interval sets it; an interval whose latency is below the
//!   estimate lowers it (the upstream got faster, or the estimate came from a
//!   loaded interval).
//! - **Flat response.** When the mean in-flight count changed by at least 10%
//!   between two intervals and the latency moved by less than a quarter of
//!   that, latency does not depend on load there: nothing queues, and that
//!   latency *is* the no-load latency, higher or lower than the estimate.
//!   Only a flat response seen while the load fell may raise it: while the
//!   limit climbs over a full upstream, latency can trail the load for an
//!   interval and look flat. This
//!   is how the limiter re-learns an upstream that got slower, without
//!   dropping to `min`: as the limit falls below the upstream's capacity the
//!   latency stops falling with it, and the estimate is reset right there.
//!
//! An estimate taken from an upstream that was already queueing (at start,
//! under overload) would be too high, and the limit would grow with it. So an
//! estimate not confirmed by a flat response for 30 s while the limit is
//! saturated starts a **probe**: the limit steps down by 15% per interval
//! until a flat response confirms the estimate. Above the upstream's capacity
//! this costs nothing (the queue moves from the upstream into Spillway's
//! queue and the upstream stays busy); the first step below capacity is
//! where latency stops falling, so a probe ends within 15% under capacity
//! instead of at `min`, and only under sustained saturation.
//!
//! # Moving the limit
//!
//! At the end of each interval, with `threshold = tolerance x no-load`:
//!
//! - latency above `threshold`: multiplicative decrease to
//!   `limit x max(0.5, threshold / latency)` (at least -1). When the interval
//!   was not saturated, no lower than the peak in-flight count: a limit below
//!   current use cannot relieve anything.
//! - probing and saturated: `limit x 0.85` (at least -1).
//! - latency at or below `threshold` and saturated: `+max(1, limit / 16)`,
//!   unless that step would take latency past `threshold` if the upstream
//!   were already full (latency grows by `latency / limit` per request above
//!   its capacity); then unchanged. The limit then stops one step below the
//!   threshold instead of oscillating across it, which keeps the tail
//!   latency within `(tolerance + 1) x` the no-load latency.
//! - otherwise (the limit was not reached): unchanged, so an idle or lightly
//!   used route never creeps up.
//!
//! The result is clamped to `[min, max]`; admission uses its integer part.
//!
//! # Cost
//!
//! One short `parking_lot` critical section per sample (store a `u32`, add
//! to two counters); the interval's trimmed mean is selected in place
//! (linear time), amortised over at least 8 samples. No allocation.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::config::AdaptiveConfig;
use crate::proxy::outcome::AttemptError;
use crate::registry::RouteState;

/// Latencies kept per interval (the most recent ones).
const RING: usize = 64;
/// Fewest samples an interval needs before it may close.
const MIN_SAMPLES: usize = 8;
/// Shortest interval.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// An unconfirmed no-load estimate older than this starts a probe.
const BASE_TTL: Duration = Duration::from_secs(30);
/// Factor by which a probe lowers the limit per interval.
const PROBE_STEP: f64 = 0.85;
/// Smallest relative in-flight change that makes a flat-response test.
const FLAT_MIN_CHANGE: f64 = 0.1;
/// A response is flat when latency moved by less than this share of the
/// relative in-flight change.
const FLAT_SHARE: f64 = 0.25;

/// The `adaptive` settings of a route, as validated from config.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    /// Lowest limit.
    pub min: usize,
    /// Highest limit.
    pub max: usize,
    /// Limit before the first decision.
    pub initial: usize,
    /// Latency up to `tolerance` x the no-load latency is healthy (> 1).
    pub tolerance: f64,
}

/// Feeds one finished upstream attempt of `state`'s route to its adaptive
/// limit (a no-op for a fixed cap) and applies a changed limit to admission.
/// `started` is when the attempt began, with `in_flight` requests holding a
/// permit then (this one included); `result` is what the per-try timeout
/// around the call returned.
pub(crate) fn observe<B, E>(
    state: &RouteState,
    started: Instant,
    in_flight: usize,
    result: &Result<Result<http::Response<B>, AttemptError>, E>,
) {
    let guard = state.adaptive.load();
    let Some(limiter) = guard.as_ref() else {
        return;
    };
    match result {
        Ok(Ok(resp)) if resp.status().is_server_error() => return,
        Ok(Ok(_)) | Err(_) => {}
        Ok(Err(_)) => return,
    }
    let now = Instant::now();
    if limiter
        .on_sample(
            now,
            started,
            now.saturating_duration_since(started),
            in_flight,
        )
        .is_some()
    {
        // The latest limit, not the one this sample computed: two samples
        // closing intervals at once apply in either order, the last wins.
        state.admission.set_max_in_flight(limiter.limit());
    }
}

/// One route's adaptive limit; shared by the route state and every request.
pub struct AdaptiveLimit {
    settings: Settings,
    /// The integer limit in force, readable without the lock.
    current: AtomicUsize,
    state: Mutex<State>,
}

/// Everything behind the lock.
struct State {
    /// The limit, fractional so that small multiplicative steps accumulate.
    limit: f64,
    /// No-load latency estimate in microseconds; `None` before any interval.
    base: Option<u32>,
    /// When a flat response last confirmed `base`.
    confirmed_at: Option<Instant>,
    /// Stepping the limit down to confirm `base`.
    probing: bool,
    /// Samples of attempts begun earlier are dropped: the limit changed, and
    /// (after a decrease) in-flight had not yet fallen to it.
    changed_at: Instant,
    /// After a decrease, in-flight has fallen to the new limit.
    settled: bool,
    window: Window,
    /// The previous interval, for the flat-response test.
    prev: Option<Summary>,
}

/// The open interval.
struct Window {
    started: Instant,
    latencies: [u32; RING],
    count: usize,
    in_flight_sum: u64,
    peak_in_flight: usize,
    saturated: bool,
}

/// A closed interval.
#[derive(Clone, Copy, Debug)]
struct Summary {
    /// Trimmed mean latency, microseconds.
    latency: u32,
    in_flight: f64,
}

// === impl Settings ===

impl From<&AdaptiveConfig> for Settings {
    fn from(c: &AdaptiveConfig) -> Self {
        Settings {
            min: c.min,
            max: c.max,
            initial: c.initial,
            tolerance: c.tolerance,
        }
    }
}

// === impl AdaptiveLimit ===

impl AdaptiveLimit {
    /// A limiter at `settings.initial` (clamped to `[min, max]`).
    pub fn new(settings: Settings, now: Instant) -> Self {
        let initial = settings.initial.clamp(settings.min, settings.max.max(1));
        AdaptiveLimit {
            settings,
            current: AtomicUsize::new(initial),
            state: Mutex::new(State {
                limit: initial as f64,
                base: None,
                confirmed_at: None,
                probing: false,
                changed_at: now,
                settled: true,
                window: Window::new(now),
                prev: None,
            }),
        }
    }

    /// The settings it was built with (a reload keeps the limiter while they
    /// stay the same).
    pub(crate) fn settings(&self) -> Settings {
        self.settings
    }

    /// The limit in force.
    pub fn limit(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }

    /// Records one sample: an attempt that `started` and got its answer at
    /// `now` after `latency`, with `in_flight` requests holding a permit when
    /// it started. Returns the new limit when this sample closed an interval
    /// that changed it.
    pub fn on_sample(
        &self,
        now: Instant,
        started: Instant,
        latency: Duration,
        in_flight: usize,
    ) -> Option<usize> {
        let mut st = self.state.lock();
        if started < st.changed_at {
            return None;
        }
        let limit = st.limit as usize;
        if !st.settled {
            // Still above a lowered limit: the upstream's queue holds
            // requests admitted under the old one. Measure from when it
            // drains.
            if in_flight <= limit {
                st.settled = true;
                st.changed_at = now;
                st.window = Window::new(now);
            }
            return None;
        }
        let w = &mut st.window;
        w.latencies[w.count % RING] = micros(latency);
        w.count += 1;
        w.in_flight_sum += in_flight as u64;
        w.peak_in_flight = w.peak_in_flight.max(in_flight);
        w.saturated |= in_flight >= limit;
        let need = limit.clamp(MIN_SAMPLES, RING);
        let min_len = MIN_INTERVAL.max(Duration::from_micros(u64::from(st.base.unwrap_or(0)) * 2));
        if st.window.count < need || now.saturating_duration_since(st.window.started) < min_len {
            return None;
        }
        let changed = st.close(now, &self.settings);
        drop(st);
        let new = changed?;
        self.current.store(new, Ordering::Relaxed);
        Some(new)
    }
}

// === impl State ===

impl State {
    /// Ends the interval and decides; returns the new integer limit if it
    /// changed.
    fn close(&mut self, now: Instant, s: &Settings) -> Option<usize> {
        let w = &mut self.window;
        let n = w.count.min(RING);
        let cur = Summary {
            latency: trimmed_mean(&mut w.latencies[..n]),
            in_flight: w.in_flight_sum as f64 / w.count as f64,
        };
        let saturated = w.saturated;
        let peak = w.peak_in_flight;
        self.window = Window::new(now);

        let first = self.base.is_none();
        match self.base {
            Some(b) if cur.latency >= b => {}
            _ => self.base = Some(cur.latency),
        }
        if let Some(prev) = self.prev {
            let flat_at = cur.latency.min(prev.latency);
            // Raising the estimate takes a flat response while the load
            // fell (a cut or a probe step): while the limit climbs, a
            // saturated upstream's latency can trail the load for an
            // interval and look flat.
            let raises = self.base.is_some_and(|b| flat_at > b);
            if flat(prev, cur) && (!raises || cur.in_flight < prev.in_flight) {
                self.base = Some(flat_at);
                self.confirmed_at = Some(now);
                self.probing = false;
            }
        }
        // The first interval starts from an empty upstream: a transient, not
        // a point to compare with.
        self.prev = (!first).then_some(cur);
        let stale = self
            .confirmed_at
            .is_none_or(|t| now.saturating_duration_since(t) >= BASE_TTL);
        if saturated && stale {
            self.probing = true;
        }

        let base = f64::from(self.base.unwrap_or(cur.latency));
        let threshold = s.tolerance * base;
        let latency = f64::from(cur.latency);
        let old = self.limit;
        let mut next = if latency > threshold {
            let cut = (old * (threshold / latency).max(0.5)).min(old - 1.0);
            if saturated {
                cut
            } else {
                cut.max(peak as f64).min(old)
            }
        } else if self.probing && saturated {
            (old * PROBE_STEP).min(old - 1.0)
        } else if saturated {
            // Grow only if the step would keep latency within the threshold
            // should the upstream already be full (each request above its
            // capacity adds latency / limit): growing into the threshold
            // and being cut back would put the tail above it.
            let step = (old / 16.0).max(1.0);
            if latency * (old + step) / old <= threshold {
                old + step
            } else {
                old
            }
        } else {
            old
        };
        next = next.clamp(s.min as f64, s.max as f64);
        if self.probing && next <= s.min as f64 {
            // Nothing lower to learn from: what is measured here is no-load.
            self.probing = false;
            self.confirmed_at = Some(now);
        }
        self.limit = next;
        if next as usize == old as usize {
            return None;
        }
        self.changed_at = now;
        self.settled = next >= old;
        Some(next as usize)
    }
}

// === impl Window ===

impl Window {
    fn new(now: Instant) -> Self {
        Window {
            started: now,
            latencies: [0; RING],
            count: 0,
            in_flight_sum: 0,
            peak_in_flight: 0,
            saturated: false,
        }
    }
}

/// Latency did not follow a clear change of load: nothing queues there.
fn flat(prev: Summary, cur: Summary) -> bool {
    if prev.in_flight <= 0.0 || prev.latency == 0 {
        return false;
    }
    let load = cur.in_flight / prev.in_flight - 1.0;
    let latency = f64::from(cur.latency) / f64::from(prev.latency) - 1.0;
    load.abs() >= FLAT_MIN_CHANGE && latency.abs() <= FLAT_SHARE * load.abs()
}

/// The mean of the middle 3/4 of `samples` (the fastest and the slowest
/// eighth dropped): one slow request does not move it, and unlike a median
/// it still moves smoothly when latencies cluster at a few values.
fn trimmed_mean(samples: &mut [u32]) -> u32 {
    let n = samples.len();
    let cut = n / 8;
    if n > 2 * cut + 1 && cut > 0 {
        samples.select_nth_unstable(cut);
        samples[cut..].select_nth_unstable(n - 2 * cut - 1);
    }
    let middle = &samples[cut..n - cut];
    let sum: u64 = middle.iter().map(|&v| u64::from(v)).sum();
    (sum / middle.len().max(1) as u64) as u32
}

/// Whole microseconds, at least 1, saturating at ~71 minutes.
fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX).max(1)
}

#[cfg(test)]
mod tests {
    //! The limiter in front of a simulated service: `C` servers with service
    //! time `S` and an unbounded FIFO queue beyond them, behind a Spillway-
    //! like admission (the limit, a bounded queue with a wait limit), driven
    //! by open-loop arrivals. A discrete-event simulation on explicit
    //! instants: deterministic, no sleeping.

    use std::cmp::Reverse;
    use std::collections::{BinaryHeap, VecDeque};

    use super::*;

    const S: Duration = Duration::from_millis(20);

    #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    enum Ev {
        Arrival,
        Done { started: Duration, in_flight: usize },
        Capacity,
    }

    struct Sim {
        t0: Instant,
        now: Duration,
        lim: AdaptiveLimit,
        /// Servers from a time on, ascending.
        capacity: Vec<(Duration, usize)>,
        /// Arrival interval from a time on, ascending.
        load: Vec<(Duration, Duration)>,
        service: Vec<(Duration, Duration)>,
        in_flight: usize,
        waiting: VecDeque<Duration>,
        busy: usize,
        /// (sent at, in-flight then)
        upstream_q: VecDeque<(Duration, usize)>,
        events: BinaryHeap<Reverse<(Duration, u64, Ev)>>,
        seq: u64,
        /// (done at, upstream latency)
        done: Vec<(Duration, Duration)>,
        /// (at, limit) after every change.
        limits: Vec<(Duration, usize)>,
        peak_in_flight: usize,
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn at<T: Copy>(sched: &[(Duration, T)], t: Duration) -> T {
        sched
            .iter()
            .rev()
            .find(|(from, _)| *from <= t)
            .map(|(_, v)| *v)
            .unwrap_or(sched[0].1)
    }

    fn settings() -> Settings {
        Settings {
            min: 1,
            max: 1024,
            initial: 16,
            tolerance: 2.0,
        }
    }

    impl Sim {
        fn new(
            settings: Settings,
            capacity: &[(Duration, usize)],
            load: &[(Duration, Duration)],
        ) -> Self {
            let t0 = Instant::now();
            let mut sim = Sim {
                t0,
                now: Duration::ZERO,
                lim: AdaptiveLimit::new(settings, t0),
                capacity: capacity.to_vec(),
                load: load.to_vec(),
                service: vec![(Duration::ZERO, S)],
                in_flight: 0,
                waiting: VecDeque::new(),
                busy: 0,
                upstream_q: VecDeque::new(),
                events: BinaryHeap::new(),
                seq: 0,
                done: Vec::new(),
                limits: vec![(Duration::ZERO, settings.initial)],
                peak_in_flight: 0,
            };
            sim.push(Duration::ZERO, Ev::Arrival);
            for (t, _) in capacity.iter().skip(1) {
                sim.push(*t, Ev::Capacity);
            }
            sim
        }

        fn push(&mut self, t: Duration, ev: Ev) {
            self.seq += 1;
            self.events.push(Reverse((t, self.seq, ev)));
        }

        fn cap(&self) -> usize {
            at(&self.capacity, self.now)
        }

        fn run_until(&mut self, end: Duration) {
            while let Some(Reverse((t, _, ev))) = self.events.peek().copied() {
                if t > end {
                    break;
                }
                self.events.pop();
                self.now = t;
                match ev {
                    Ev::Arrival => {
                        let gap = at(&self.load, t);
                        self.push(t + gap, Ev::Arrival);
                        if self.in_flight < self.lim.limit() {
                            self.dispatch();
                        } else if self.waiting.len() < 64 {
                            self.waiting.push_back(t);
                        }
                    }
                    Ev::Done { started, in_flight } => {
                        let latency = t - started;
                        let changed =
                            self.lim
                                .on_sample(self.t0 + t, self.t0 + started, latency, in_flight);
                        if let Some(l) = changed {
                            self.limits.push((t, l));
                        }
                        self.done.push((t, latency));
                        self.in_flight -= 1;
                        self.busy -= 1;
                        self.start_upstream();
                        self.admit();
                    }
                    Ev::Capacity => self.start_upstream(),
                }
            }
            self.now = end;
        }

        fn dispatch(&mut self) {
            self.in_flight += 1;
            self.peak_in_flight = self.peak_in_flight.max(self.in_flight);
            self.upstream_q.push_back((self.now, self.in_flight));
            self.start_upstream();
        }

        fn start_upstream(&mut self) {
            while self.busy < self.cap() {
                let Some((started, in_flight)) = self.upstream_q.pop_front() else {
                    break;
                };
                self.busy += 1;
                let service = at(&self.service, self.now);
                self.push(self.now + service, Ev::Done { started, in_flight });
            }
        }

        fn admit(&mut self) {
            // Waiters older than 1 s have timed out.
            while self
                .waiting
                .front()
                .is_some_and(|a| self.now - *a > secs(1))
            {
                self.waiting.pop_front();
            }
            while self.in_flight < self.lim.limit() {
                if self.waiting.pop_front().is_none() {
                    break;
                }
                self.dispatch();
            }
        }

        /// Limits in force during `[from, to]`: (lowest, highest).
        fn limit_range(&self, from: Duration, to: Duration) -> (usize, usize) {
            let before = at(&self.limits, from);
            let inside = self
                .limits
                .iter()
                .filter(|(t, _)| *t >= from && *t <= to)
                .map(|(_, l)| *l);
            let all: Vec<usize> = std::iter::once(before).chain(inside).collect();
            (
                *all.iter().min().unwrap_or(&0),
                *all.iter().max().unwrap_or(&0),
            )
        }

        /// Completions per second in `[from, to]` over the capacity `c / S`.
        fn goodput_share(&self, from: Duration, to: Duration, c: usize) -> f64 {
            let n = self
                .done
                .iter()
                .filter(|(t, _)| *t >= from && *t < to)
                .count() as f64;
            let capacity = c as f64 / S.as_secs_f64() * (to - from).as_secs_f64();
            n / capacity
        }

        fn latency_p99(&self, from: Duration, to: Duration) -> Duration {
            let mut l: Vec<Duration> = self
                .done
                .iter()
                .filter(|(t, _)| *t >= from && *t < to)
                .map(|(_, l)| *l)
                .collect();
            l.sort();
            l[(l.len() * 99 / 100).min(l.len() - 1)]
        }

        /// First time from `from` on at which the limit satisfies `ok`.
        fn first(&self, from: Duration, ok: impl Fn(usize) -> bool) -> Option<Duration> {
            if ok(at(&self.limits, from)) {
                return Some(Duration::ZERO);
            }
            self.limits
                .iter()
                .find(|(t, l)| *t >= from && ok(*l))
                .map(|(t, _)| *t - from)
        }
    }

    /// Arrivals at `x` times the capacity of `c` servers.
    fn overload(c: usize, x: f64) -> Duration {
        S.div_f64(c as f64 * x)
    }

    #[test]
    fn settles_under_sustained_overload() {
        let c = 8;
        let mut sim = Sim::new(
            settings(),
            &[(Duration::ZERO, c)],
            &[(Duration::ZERO, overload(c, 2.0))],
        );
        sim.run_until(secs(60));
        let (lo, hi) = sim.limit_range(secs(10), secs(60));
        assert!(
            lo * 4 >= c * 3,
            "limit fell to {lo} (C = {c}): {:?}",
            sim.limits
        );
        assert!(
            hi <= 2 * c + 2,
            "limit rose to {hi} (C = {c}): {:?}",
            sim.limits
        );
        let share = sim.goodput_share(secs(10), secs(60), c);
        assert!(share >= 0.95, "goodput {share:.3} of capacity");
        let p99 = sim.latency_p99(secs(10), secs(60));
        assert!(p99 <= S * 3, "upstream p99 {p99:?}");
    }

    #[test]
    fn settles_from_an_initial_limit_far_above_capacity() {
        let c = 4;
        let mut sim = Sim::new(
            settings(),
            &[(Duration::ZERO, c)],
            &[(Duration::ZERO, overload(c, 3.0))],
        );
        sim.run_until(secs(40));
        let (lo, hi) = sim.limit_range(secs(10), secs(40));
        assert!(
            lo * 4 >= c * 3 && hi <= 2 * c + 2,
            "{lo}..{hi}: {:?}",
            sim.limits
        );
        assert!(sim.goodput_share(secs(10), secs(40), c) >= 0.95);
    }

    #[test]
    fn follows_capacity_up_and_down() {
        let sched = [(Duration::ZERO, 8), (secs(20), 16), (secs(50), 4)];
        // Twice the largest capacity throughout.
        let mut sim = Sim::new(settings(), &sched, &[(Duration::ZERO, overload(16, 2.0))]);
        sim.run_until(secs(70));
        let up15 = sim
            .first(secs(20), |l| l >= 12)
            .expect("limit reached 1.5 x old C");
        assert!(
            up15 <= secs(15),
            "1.5 x old C after {up15:?}: {:?}",
            sim.limits
        );
        let up = sim
            .first(secs(20), |l| l >= 16)
            .expect("limit reached new C");
        assert!(up <= secs(30), "new C after {up:?}");
        let down = sim.first(secs(50), |l| l <= 2 * 4 + 2).expect("limit fell");
        assert!(
            down <= secs(5),
            "tolerance x new C + 2 after {down:?}: {:?}",
            sim.limits
        );
        let (lo, hi) = sim.limit_range(secs(60), secs(70));
        assert!(lo >= 3 && hi <= 10, "{lo}..{hi}");
    }

    #[test]
    fn the_benchmark_schedule_settles_in_every_phase() {
        // benches/load/adaptive.sh: a constant 2 x the first capacity while
        // it goes 8 -> 16 -> 4, 20 s each.
        let sched = [(Duration::ZERO, 8), (secs(20), 16), (secs(40), 4)];
        let mut sim = Sim::new(settings(), &sched, &[(Duration::ZERO, overload(8, 2.0))]);
        sim.run_until(secs(60));
        for (from, to, c) in [(10, 20, 8), (30, 40, 16), (50, 60, 4)] {
            let (lo, hi) = sim.limit_range(secs(from), secs(to));
            assert!(
                lo * 4 >= c * 3 && hi <= 2 * c + 2,
                "capacity {c}: limit {lo}..{hi}: {:?}",
                sim.limits
            );
            let p99 = sim.latency_p99(secs(from), secs(to));
            assert!(p99 <= 3 * S, "capacity {c}: upstream p99 {p99:?}");
            if c < 16 {
                assert!(sim.goodput_share(secs(from), secs(to), c) >= 0.95);
            }
        }
    }

    #[test]
    fn does_not_creep_when_not_filled() {
        // In flight about 4 of 16: never more than half the limit.
        let c = 64;
        let mut sim = Sim::new(
            settings(),
            &[(Duration::ZERO, c)],
            &[(Duration::ZERO, S / 4)],
        );
        sim.run_until(secs(120));
        assert!(sim.peak_in_flight <= 8, "peak {}", sim.peak_in_flight);
        let (_, hi) = sim.limit_range(Duration::ZERO, secs(120));
        assert!(
            hi <= 16.max(2 * sim.peak_in_flight),
            "limit crept to {hi}: {:?}",
            sim.limits
        );
    }

    #[test]
    fn one_slow_request_does_not_halve_it() {
        let lim = AdaptiveLimit::new(settings(), Instant::now());
        let t0 = Instant::now();
        let mut t = t0;
        // Healthy intervals at the limit, then one 50 x slow sample among
        // normal ones.
        for i in 0..400u32 {
            t += ms(2);
            let latency = if i == 300 { S * 50 } else { S };
            lim.on_sample(t, t - latency, latency, lim.limit());
        }
        assert!(lim.limit() >= 16, "limit {}", lim.limit());
        let before = lim.limit();
        for i in 0..64u32 {
            t += ms(2);
            let latency = if i == 10 { S * 50 } else { S };
            lim.on_sample(t, t - latency, latency, lim.limit());
        }
        assert!(lim.limit() * 2 > before, "{before} -> {}", lim.limit());
        assert!(lim.limit() >= before * 3 / 4, "{before} -> {}", lim.limit());
    }

    #[test]
    fn relearns_a_slower_upstream_without_collapsing_to_min() {
        let c = 8;
        let mut sim = Sim::new(
            settings(),
            &[(Duration::ZERO, c)],
            &[(Duration::ZERO, overload(c, 2.0))],
        );
        sim.run_until(secs(20));
        // The service becomes 3 x slower (beyond tolerance) for good.
        sim.service.push((secs(20), S * 3));
        sim.run_until(secs(60));
        let (lo, _) = sim.limit_range(secs(20), secs(60));
        assert!(lo >= 4, "limit collapsed to {lo}: {:?}", sim.limits);
        let (lo, hi) = sim.limit_range(secs(40), secs(60));
        assert!(
            lo * 4 >= c * 3 && hi <= 2 * c + 2,
            "{lo}..{hi}: {:?}",
            sim.limits
        );
    }

    #[test]
    fn relearns_a_faster_upstream_under_sustained_overload() {
        let c = 8;
        let mut sim = Sim::new(
            settings(),
            &[(Duration::ZERO, c)],
            &[(Duration::ZERO, overload(c, 4.0))],
        );
        sim.run_until(secs(20));
        // Twice as fast: capacity doubles at the same concurrency, so the
        // right limit is unchanged; a stale no-load estimate would let it
        // grow to 4 x C.
        sim.service.push((secs(20), S / 2));
        sim.run_until(secs(90));
        let (lo, hi) = sim.limit_range(secs(70), secs(90));
        assert!(
            lo * 4 >= c * 3 && hi <= 2 * c + 2,
            "{lo}..{hi}: {:?}",
            sim.limits
        );
        // Probing never drops far below capacity.
        let (lo, _) = sim.limit_range(secs(10), secs(90));
        assert!(lo >= 6, "{lo}: {:?}", sim.limits);
    }

    #[test]
    fn timeouts_count_as_slow_samples() {
        let lim = AdaptiveLimit::new(settings(), Instant::now());
        let mut t = Instant::now();
        for _ in 0..64 {
            t += ms(5);
            lim.on_sample(t, t - S, S, 16);
        }
        let before = lim.limit();
        for _ in 0..400 {
            t += ms(5);
            lim.on_sample(t, t - secs(1), secs(1), before);
        }
        assert!(lim.limit() < before, "{before} -> {}", lim.limit());
        assert!(lim.limit() >= 1);
    }

    #[test]
    fn stays_within_min_and_max() {
        let s = Settings {
            min: 4,
            max: 10,
            initial: 6,
            tolerance: 1.5,
        };
        let lim = AdaptiveLimit::new(s, Instant::now());
        let mut t = Instant::now();
        for _ in 0..2000 {
            t += ms(1);
            lim.on_sample(t, t - S, S, lim.limit());
        }
        assert_eq!(lim.limit(), 10);
        // Latency grows with load (queueing): it keeps falling with the
        // limit, down to `min`.
        for _ in 0..30_000 {
            t += ms(1);
            let l = lim.limit();
            let latency = S * 10 * l as u32;
            lim.on_sample(t, t - latency, latency, l);
        }
        assert_eq!(lim.limit(), 4);
    }
}
