//! Circuit breaker, one per upstream.
//!
//! ```text
//!            failure_threshold consecutive failures,
//!            or failure_rate over the window
//!   Closed ───────────────────────────────────────► Open
//!     ▲                                             │  ▲
//!     │ half_open_calls probes                      │  │ any probe fails
//!     │ all succeed              recovery_timeout   ▼  │
//!     └──────────────────────────────────────── HalfOpen
//! ```
//!
//! The data path calls [`Breaker::try_acquire`] before the retry loop and
//! settles the returned [`BreakerTicket`] with the final outcome. Outcomes are
//! tagged with the epoch (one per state entered) in which the ticket was
//! issued, so a slow request that started before a transition cannot move the
//! breaker after it: its evidence is about a state that no longer exists.
//!
//! The breaker lives in the registry under its upstream's name, so a reload
//! swaps its config with [`Breaker::set_config`] and keeps its state.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// Retry-After given while half-open and every probe slot is taken.
///
/// The probes in flight decide within about one upstream round trip whether
/// the breaker closes or reopens, so a short hint is accurate; a full
/// `recovery_timeout` would keep clients away long after the upstream is back.
const HALF_OPEN_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Buckets in the failure-rate window: bounded memory, and the window slides
/// in steps of a tenth of its length.
const WINDOW_BUCKETS: usize = 10;

/// Trip on the failure ratio over a sliding window, in addition to the
/// consecutive-failure rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct FailureRate {
    /// Failure ratio (0.0..=1.0) that opens the breaker once reached.
    pub threshold: f64,
    /// Length of the sliding window.
    pub window: Duration,
    /// Fewer requests than this in the window never trip the breaker.
    pub min_requests: u32,
}

/// A breaker's settings; replaceable in place with [`Breaker::set_config`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct BreakerConfig {
    /// Consecutive failures that open the breaker (0 is treated as 1).
    pub failure_threshold: u32,
    /// Optional ratio-based trip.
    pub failure_rate: Option<FailureRate>,
    /// Time spent open before probes are let through.
    pub recovery_timeout: Duration,
    /// Concurrent probes while half-open; all must succeed to close (0 is
    /// treated as 1).
    pub half_open_calls: u32,
}

/// The externally visible state of a breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum BreakerState {
    /// Requests flow; outcomes are counted.
    Closed,
    /// Requests are refused until `recovery_timeout` has passed.
    Open,
    /// A limited number of probe requests decide between closed and open.
    HalfOpen,
}

/// Called with `(from, to)` on every transition, in order, while the
/// breaker's lock is held: it must be quick (count a metric, log a line) and
/// must not call back into the same breaker (that would deadlock).
pub(crate) type TransitionHook = Box<dyn Fn(BreakerState, BreakerState) + Send + Sync>;

/// A circuit breaker; shared as `Arc<Breaker>`.
pub(crate) struct Breaker {
    inner: Mutex<Inner>,
    on_transition: TransitionHook,
}

/// Refusal from [`Breaker::try_acquire`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct BreakerOpen {
    /// How long the client should wait before trying again (Retry-After).
    pub retry_after: Duration,
}

/// Permission to send one request through the breaker.
///
/// Settle it with [`success`](Self::success) or [`failure`](Self::failure)
/// once the outcome is known. Dropping it unsettled (client went away,
/// request cancelled) is neutral: a probe slot is released, nothing is
/// counted.
pub(crate) struct BreakerTicket {
    breaker: Arc<Breaker>,
    epoch: u64,
    kind: TicketKind,
    settled: bool,
}

/// Everything behind the lock.
struct Inner {
    config: BreakerConfig,
    phase: Phase,
    /// Bumped on every transition; tickets from an older epoch are ignored.
    epoch: u64,
    consecutive_failures: u32,
    window: Window,
}

#[derive(Clone, Copy, Debug)]
enum Phase {
    Closed,
    /// `since` rather than a deadline, so a reload that changes
    /// `recovery_timeout` applies to a breaker that is already open.
    Open {
        since: Instant,
    },
    HalfOpen {
        in_flight: u32,
        successes: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TicketKind {
    /// Issued while closed.
    Normal,
    /// Issued while half-open; holds a probe slot.
    Probe,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Success,
    Failure,
    Neutral,
}

/// Ring of time buckets over the failure-rate window.
struct Window {
    origin: Instant,
    /// Bucket width in nanoseconds, at least 1.
    width_nanos: u128,
    buckets: [Bucket; WINDOW_BUCKETS],
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// Which slot (time / width since origin) the counts belong to.
    slot: u64,
    requests: u64,
    failures: u64,
}

// === impl BreakerState ===

impl BreakerState {
    /// Label used in metrics and logs.
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Breaker ===

impl Breaker {
    /// A closed breaker; `on_transition` sees every later state change.
    pub(crate) fn new(config: BreakerConfig, on_transition: TransitionHook) -> Arc<Self> {
        let now = Instant::now();
        Arc::new(Breaker {
            inner: Mutex::new(Inner {
                config,
                phase: Phase::Closed,
                epoch: 0,
                consecutive_failures: 0,
                window: Window::new(now, config.failure_rate.map(|r| r.window)),
            }),
            on_transition,
        })
    }

    /// Replace the config (hot reload) without resetting the state.
    ///
    /// The failure-rate window's counts are kept unless its length changes
    /// (old buckets would mean different spans of time). A lower
    /// `failure_threshold` takes effect at the next failure, not at once. An
    /// open breaker measures the new `recovery_timeout` from when it opened.
    pub(crate) fn set_config(&self, config: BreakerConfig) {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        let old_window = inner.config.failure_rate.map(|r| r.window);
        let new_window = config.failure_rate.map(|r| r.window);
        inner.config = config;
        if old_window != new_window {
            inner.window = Window::new(now, new_window);
        }
        inner.poll(now, &self.on_transition);
        // Lowering half_open_calls to what has already succeeded would leave
        // no slot for the probe that closes the breaker.
        if let Phase::HalfOpen { successes, .. } = inner.phase {
            if successes >= inner.half_open_calls() {
                inner.set_phase(Phase::Closed, &self.on_transition);
            }
        }
    }

    /// Ask to send one request: a ticket, or a refusal with the time to wait.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Result<BreakerTicket, BreakerOpen> {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        inner.poll(now, &self.on_transition);
        let kind = match inner.phase {
            Phase::Closed => TicketKind::Normal,
            Phase::Open { since } => {
                let elapsed = now.saturating_duration_since(since);
                return Err(BreakerOpen {
                    retry_after: inner.config.recovery_timeout.saturating_sub(elapsed),
                });
            }
            Phase::HalfOpen {
                in_flight,
                successes,
            } => {
                if in_flight.saturating_add(successes) >= inner.half_open_calls() {
                    return Err(BreakerOpen {
                        retry_after: HALF_OPEN_RETRY_AFTER,
                    });
                }
                inner.phase = Phase::HalfOpen {
                    in_flight: in_flight + 1,
                    successes,
                };
                TicketKind::Probe
            }
        };
        Ok(BreakerTicket {
            breaker: Arc::clone(self),
            epoch: inner.epoch,
            kind,
            settled: false,
        })
    }

    /// The state as of now: an open breaker whose `recovery_timeout` has
    /// passed is reported (and becomes) half-open.
    pub(crate) fn state(&self) -> BreakerState {
        let mut inner = self.inner.lock();
        inner.poll(Instant::now(), &self.on_transition);
        inner.phase.state()
    }

    fn record(&self, epoch: u64, kind: TicketKind, outcome: Outcome) {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        inner.poll(now, &self.on_transition);
        if inner.epoch != epoch {
            // Issued before the last transition: stale evidence.
            return;
        }
        match (inner.phase, kind) {
            (Phase::Closed, TicketKind::Normal) => match outcome {
                Outcome::Success => {
                    inner.consecutive_failures = 0;
                    inner.window.record(now, false);
                }
                Outcome::Failure => {
                    inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
                    inner.window.record(now, true);
                    if inner.should_trip(now) {
                        inner.set_phase(Phase::Open { since: now }, &self.on_transition);
                    }
                }
                Outcome::Neutral => {}
            },
            (
                Phase::HalfOpen {
                    in_flight,
                    successes,
                },
                TicketKind::Probe,
            ) => {
                let in_flight = in_flight.saturating_sub(1);
                match outcome {
                    Outcome::Success => {
                        let successes = successes.saturating_add(1);
                        if successes >= inner.half_open_calls() {
                            inner.set_phase(Phase::Closed, &self.on_transition);
                        } else {
                            inner.phase = Phase::HalfOpen {
                                in_flight,
                                successes,
                            };
                        }
                    }
                    Outcome::Failure => {
                        inner.set_phase(Phase::Open { since: now }, &self.on_transition);
                    }
                    Outcome::Neutral => {
                        inner.phase = Phase::HalfOpen {
                            in_flight,
                            successes,
                        };
                    }
                }
            }
            // A ticket's kind always matches the phase of its epoch, and the
            // open phase issues no tickets.
            _ => {}
        }
    }
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.inner.lock();
        f.debug_struct("Breaker")
            .field("config", &inner.config)
            .field("phase", &inner.phase)
            .field("consecutive_failures", &inner.consecutive_failures)
            .finish_non_exhaustive()
    }
}

// === impl BreakerTicket ===

impl BreakerTicket {
    /// The request succeeded (as far as the breaker's `failure_on` goes).
    pub(crate) fn success(mut self) {
        self.settle(Outcome::Success);
    }

    /// The request failed in a way the breaker counts.
    pub(crate) fn failure(mut self) {
        self.settle(Outcome::Failure);
    }

    fn settle(&mut self, outcome: Outcome) {
        if !self.settled {
            self.settled = true;
            self.breaker.record(self.epoch, self.kind, outcome);
        }
    }
}

impl Drop for BreakerTicket {
    fn drop(&mut self) {
        self.settle(Outcome::Neutral);
    }
}

impl fmt::Debug for BreakerTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerTicket")
            .field("epoch", &self.epoch)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

// === impl Inner ===

impl Inner {
    fn half_open_calls(&self) -> u32 {
        self.config.half_open_calls.max(1)
    }

    /// Apply the transition that time alone causes: open -> half-open.
    fn poll(&mut self, now: Instant, hook: &TransitionHook) {
        if let Phase::Open { since } = self.phase {
            if now.saturating_duration_since(since) >= self.config.recovery_timeout {
                self.set_phase(
                    Phase::HalfOpen {
                        in_flight: 0,
                        successes: 0,
                    },
                    hook,
                );
            }
        }
    }

    fn should_trip(&self, now: Instant) -> bool {
        if self.consecutive_failures >= self.config.failure_threshold.max(1) {
            return true;
        }
        let Some(rate) = self.config.failure_rate else {
            return false;
        };
        let (requests, failures) = self.window.totals(now);
        // A NaN threshold compares false and never trips.
        requests >= u64::from(rate.min_requests.max(1))
            && failures as f64 >= rate.threshold * requests as f64
    }

    fn set_phase(&mut self, phase: Phase, hook: &TransitionHook) {
        let from = self.phase.state();
        self.phase = phase;
        self.epoch = self.epoch.wrapping_add(1);
        // Counts from before the breaker opened would trip it again at once.
        self.consecutive_failures = 0;
        if let Phase::Closed = phase {
            self.window.clear();
        }
        hook(from, phase.state());
    }
}

// === impl Phase ===

impl Phase {
    fn state(&self) -> BreakerState {
        match self {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

// === impl Window ===

impl Window {
    /// `window: None` (no failure_rate) still builds a valid ring; it is
    /// simply never consulted.
    fn new(now: Instant, window: Option<Duration>) -> Self {
        let total = window.unwrap_or(Duration::from_secs(10)).as_nanos();
        Window {
            origin: now,
            width_nanos: (total / WINDOW_BUCKETS as u128).max(1),
            buckets: [Bucket::default(); WINDOW_BUCKETS],
        }
    }

    fn slot(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(elapsed / self.width_nanos).unwrap_or(u64::MAX)
    }

    fn record(&mut self, now: Instant, failure: bool) {
        let slot = self.slot(now);
        let bucket = &mut self.buckets[(slot % WINDOW_BUCKETS as u64) as usize];
        if bucket.slot != slot {
            *bucket = Bucket {
                slot,
                ..Bucket::default()
            };
        }
        bucket.requests += 1;
        if failure {
            bucket.failures += 1;
        }
    }

    /// `(requests, failures)` in the buckets still inside the window.
    fn totals(&self, now: Instant) -> (u64, u64) {
        let slot = self.slot(now);
        self.buckets
            .iter()
            .filter(|b| b.slot <= slot && slot - b.slot < WINDOW_BUCKETS as u64)
            .fold((0, 0), |(r, f), b| (r + b.requests, f + b.failures))
    }

    fn clear(&mut self) {
        self.buckets = [Bucket::default(); WINDOW_BUCKETS];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    use BreakerState::{Closed, HalfOpen, Open};

    type Log = Arc<Mutex<Vec<(BreakerState, BreakerState)>>>;

    fn config() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 3,
            failure_rate: None,
            recovery_timeout: Duration::from_secs(30),
            half_open_calls: 3,
        }
    }

    fn breaker(config: BreakerConfig) -> (Arc<Breaker>, Log) {
        let log: Log = Arc::default();
        let sink = Arc::clone(&log);
        let b = Breaker::new(
            config,
            Box::new(move |from, to| sink.lock().push((from, to))),
        );
        (b, log)
    }

    fn fail(b: &Arc<Breaker>, n: usize) {
        for _ in 0..n {
            b.try_acquire().expect("closed").failure();
        }
    }

    fn succeed(b: &Arc<Breaker>, n: usize) {
        for _ in 0..n {
            b.try_acquire().expect("closed").success();
        }
    }

    fn retry_after(b: &Arc<Breaker>) -> Duration {
        b.try_acquire().expect_err("should refuse").retry_after
    }

    async fn open_then_half_open(b: &Arc<Breaker>) {
        fail(b, 3);
        assert_eq!(b.state(), Open);
        advance(Duration::from_secs(30)).await;
        assert_eq!(b.state(), HalfOpen);
    }

    #[test]
    fn ticket_is_send_and_static() {
        fn check<T: Send + 'static>() {}
        check::<BreakerTicket>();
        check::<Arc<Breaker>>();
    }

    #[test]
    fn state_labels() {
        assert_eq!(Closed.as_str(), "closed");
        assert_eq!(Open.as_str(), "open");
        assert_eq!(HalfOpen.as_str(), "half_open");
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_open() {
        let (b, log) = breaker(config());
        fail(&b, 2);
        assert_eq!(b.state(), Closed);
        fail(&b, 1);
        assert_eq!(b.state(), Open);
        assert_eq!(*log.lock(), vec![(Closed, Open)]);
    }

    #[tokio::test(start_paused = true)]
    async fn success_resets_consecutive_counter() {
        let (b, _) = breaker(config());
        fail(&b, 2);
        succeed(&b, 1);
        fail(&b, 2);
        assert_eq!(b.state(), Closed);
        fail(&b, 1);
        assert_eq!(b.state(), Open);
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_ticket_while_closed_is_neutral() {
        let (b, _) = breaker(config());
        fail(&b, 2);
        drop(b.try_acquire().expect("closed"));
        fail(&b, 1);
        assert_eq!(b.state(), Open, "the drop neither reset nor added");
    }

    #[tokio::test(start_paused = true)]
    async fn open_fails_fast_with_decreasing_retry_after() {
        let (b, _) = breaker(config());
        fail(&b, 3);
        assert_eq!(retry_after(&b), Duration::from_secs(30));
        advance(Duration::from_secs(10)).await;
        assert_eq!(retry_after(&b), Duration::from_secs(20));
        advance(Duration::from_millis(19_500)).await;
        assert_eq!(retry_after(&b), Duration::from_millis(500));
        assert_eq!(b.state(), Open);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_after_recovery_timeout_without_traffic() {
        let (b, log) = breaker(config());
        fail(&b, 3);
        advance(Duration::from_millis(29_999)).await;
        assert_eq!(b.state(), Open);
        advance(Duration::from_millis(1)).await;
        // state() alone reports the truth by time.
        assert_eq!(b.state(), HalfOpen);
        assert_eq!(*log.lock(), vec![(Closed, Open), (Open, HalfOpen)]);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_exactly_half_open_calls() {
        let (b, _) = breaker(config());
        open_then_half_open(&b).await;
        let probes: Vec<_> = (0..3).map(|_| b.try_acquire().expect("probe")).collect();
        assert_eq!(retry_after(&b), HALF_OPEN_RETRY_AFTER);
        assert_eq!(b.state(), HalfOpen);
        drop(probes);
    }

    #[tokio::test(start_paused = true)]
    async fn all_probes_succeed_closes() {
        let (b, log) = breaker(config());
        open_then_half_open(&b).await;
        let probes: Vec<_> = (0..3).map(|_| b.try_acquire().expect("probe")).collect();
        let mut probes = probes.into_iter();
        probes.next().expect("probe").success();
        probes.next().expect("probe").success();
        assert_eq!(b.state(), HalfOpen);
        // A succeeded probe does not free its slot: exactly 3 in total.
        assert!(b.try_acquire().is_err());
        probes.next().expect("probe").success();
        assert_eq!(b.state(), Closed);
        assert_eq!(
            *log.lock(),
            vec![(Closed, Open), (Open, HalfOpen), (HalfOpen, Closed)]
        );
        // Closed again with a fresh counter.
        fail(&b, 2);
        assert_eq!(b.state(), Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn one_probe_failure_reopens_with_fresh_timeout() {
        let (b, log) = breaker(config());
        open_then_half_open(&b).await;
        let p1 = b.try_acquire().expect("probe");
        let p2 = b.try_acquire().expect("probe");
        let p3 = b.try_acquire().expect("probe");
        p1.success();
        advance(Duration::from_secs(2)).await;
        p2.failure();
        assert_eq!(b.state(), Open);
        assert_eq!(retry_after(&b), Duration::from_secs(30));
        // The last probe's verdict is stale: it cannot close the breaker.
        p3.success();
        assert_eq!(b.state(), Open);
        assert_eq!(
            *log.lock(),
            vec![(Closed, Open), (Open, HalfOpen), (HalfOpen, Open)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_probe_frees_its_slot() {
        let (b, _) = breaker(config());
        open_then_half_open(&b).await;
        let p1 = b.try_acquire().expect("probe");
        let p2 = b.try_acquire().expect("probe");
        let p3 = b.try_acquire().expect("probe");
        assert!(b.try_acquire().is_err());
        drop(p2);
        let p4 = b.try_acquire().expect("slot freed by the drop");
        assert!(b.try_acquire().is_err());
        p1.success();
        p3.success();
        assert_eq!(b.state(), HalfOpen, "the dropped probe did not count");
        p4.success();
        assert_eq!(b.state(), Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_needs_min_requests() {
        let (b, _) = breaker(BreakerConfig {
            failure_threshold: 100,
            failure_rate: Some(FailureRate {
                threshold: 0.5,
                window: Duration::from_secs(10),
                min_requests: 10,
            }),
            ..config()
        });
        // 9 requests, 5 failed (56 %): below min_requests.
        for _ in 0..4 {
            fail(&b, 1);
            succeed(&b, 1);
        }
        fail(&b, 1);
        assert_eq!(b.state(), Closed);
        // 10 requests, 6 failed (60 %).
        fail(&b, 1);
        assert_eq!(b.state(), Open);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_below_threshold_does_not_trip() {
        let (b, _) = breaker(BreakerConfig {
            failure_threshold: 100,
            failure_rate: Some(FailureRate {
                threshold: 0.5,
                window: Duration::from_secs(10),
                min_requests: 10,
            }),
            ..config()
        });
        for _ in 0..20 {
            succeed(&b, 2);
            fail(&b, 1);
        }
        assert_eq!(b.state(), Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_window_slides() {
        let rate = BreakerConfig {
            failure_threshold: 100,
            failure_rate: Some(FailureRate {
                threshold: 0.5,
                window: Duration::from_secs(10),
                min_requests: 10,
            }),
            ..config()
        };
        // 6 successes then 4 failures, tolerating a trip part-way.
        let pattern = |b: &Arc<Breaker>| {
            for ok in [true; 6].into_iter().chain([false; 4]) {
                match b.try_acquire() {
                    Ok(t) if ok => t.success(),
                    Ok(t) => t.failure(),
                    Err(_) => {}
                }
            }
        };

        // Old failures still in the window: 9 of 15 failed.
        let (b, _) = breaker(rate);
        fail(&b, 5);
        advance(Duration::from_secs(9)).await;
        pattern(&b);
        assert_eq!(b.state(), Open);

        // The same failures expired: 4 of 10 failed.
        let (b, _) = breaker(rate);
        fail(&b, 5);
        advance(Duration::from_secs(10)).await;
        pattern(&b);
        assert_eq!(b.state(), Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn set_config_keeps_state() {
        let (b, log) = breaker(config());
        fail(&b, 2);
        b.set_config(BreakerConfig {
            half_open_calls: 1,
            ..config()
        });
        fail(&b, 1);
        assert_eq!(b.state(), Open, "consecutive count kept");

        advance(Duration::from_secs(10)).await;
        b.set_config(BreakerConfig {
            recovery_timeout: Duration::from_secs(60),
            half_open_calls: 1,
            ..config()
        });
        assert_eq!(b.state(), Open);
        assert_eq!(
            retry_after(&b),
            Duration::from_secs(50),
            "measured from opening"
        );

        advance(Duration::from_secs(50)).await;
        let probe = b.try_acquire().expect("probe");
        assert!(b.try_acquire().is_err(), "half_open_calls: 1");
        probe.success();
        assert_eq!(b.state(), Closed);
        assert_eq!(
            *log.lock(),
            vec![(Closed, Open), (Open, HalfOpen), (HalfOpen, Closed)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn set_config_keeps_failure_rate_window() {
        let rate = FailureRate {
            threshold: 0.5,
            window: Duration::from_secs(10),
            min_requests: 4,
        };
        let (b, _) = breaker(BreakerConfig {
            failure_threshold: 100,
            failure_rate: Some(rate),
            ..config()
        });
        succeed(&b, 1);
        fail(&b, 1);
        succeed(&b, 1);
        b.set_config(BreakerConfig {
            failure_threshold: 50,
            failure_rate: Some(FailureRate {
                threshold: 0.4,
                ..rate
            }),
            ..config()
        });
        fail(&b, 1);
        assert_eq!(b.state(), Open, "2 of 4 over the kept window");
    }

    #[tokio::test(start_paused = true)]
    async fn lowering_half_open_calls_below_successes_closes() {
        let (b, log) = breaker(config());
        open_then_half_open(&b).await;
        b.try_acquire().expect("probe").success();
        b.try_acquire().expect("probe").success();
        b.set_config(BreakerConfig {
            half_open_calls: 2,
            ..config()
        });
        assert_eq!(b.state(), Closed);
        assert_eq!(log.lock().last(), Some(&(HalfOpen, Closed)));
    }

    #[tokio::test(start_paused = true)]
    async fn hook_sees_every_transition_once_in_order() {
        let (b, log) = breaker(config());
        let stale = b.try_acquire().expect("closed");
        fail(&b, 3);
        // Issued before the breaker opened: ignored.
        stale.failure();
        advance(Duration::from_secs(30)).await;
        assert_eq!(b.state(), HalfOpen);
        assert_eq!(b.state(), HalfOpen);
        b.try_acquire().expect("probe").failure();
        advance(Duration::from_secs(30)).await;
        let probes: Vec<_> = (0..3).map(|_| b.try_acquire().expect("probe")).collect();
        for p in probes {
            p.success();
        }
        fail(&b, 3);
        assert_eq!(
            *log.lock(),
            vec![
                (Closed, Open),
                (Open, HalfOpen),
                (HalfOpen, Open),
                (Open, HalfOpen),
                (HalfOpen, Closed),
                (Closed, Open),
            ]
        );
    }
}
