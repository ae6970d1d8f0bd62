//! Retry policy pieces: backoff, the retry budget, and which failures may be
//! retried.
//!
//! The retry loop in `proxy/mod.rs` asks, for each failed attempt:
//! 1. `RetryOn::matches` — is this cause configured as retryable?
//! 2. `safe_to_retry` — could a retry duplicate a side effect?
//! 3. `RetryBudget::try_withdraw` — would a retry add more load than allowed?
//!
//! and then sleeps `Backoff::delay` (within the request deadline).

use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// Buckets in the budget's window; one second each.
const BUDGET_BUCKETS: usize = 10;
/// Width of one budget bucket.
const BUDGET_BUCKET_WIDTH: Duration = Duration::from_secs(1);
/// Slack for float rounding in the budget: 0.7 * 90 is 62.99999999999999,
/// which must still allow the 63rd retry.
const BUDGET_EPSILON: f64 = 1e-9;

/// Exponential backoff with full jitter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Backoff {
    /// Upper bound of the first retry's delay.
    pub base: Duration,
    /// No delay exceeds this, Retry-After included.
    pub max: Duration,
}

/// Retry budget settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct BudgetConfig {
    /// Retries allowed per original request (0.2 = at most 20 % extra load).
    pub ratio: f64,
    /// Retries allowed per second regardless of traffic, so that a quiet
    /// route can still retry.
    pub min_per_second: u32,
}

/// Retry budget: a ratio of recent traffic plus a per-second floor.
///
/// * Ratio part, sliding window (10 s, 10 one-second buckets), Finagle/linkerd
///   style: `ratio * requests_in_window - ratio_retries_in_window`.
/// * Floor: a token bucket refilled at `min_per_second` (burst of one second's
///   worth), so a quiet route can still retry but never more than
///   `min_per_second` per second from the floor. (A floor of
///   `min_per_second * window` granted up front, as tower's `TpsBudget` does,
///   lets a quiet route fire ten seconds' worth of retries in one burst.)
///
/// Over any span of T seconds, retries <= ratio * requests + min_per_second * (T + 1).
///
/// Shared as `Arc` per route; lives in the registry so a reload keeps counts.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    inner: Mutex<BudgetInner>,
}

/// Why an attempt failed, as far as retry policy is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RetryCause {
    /// No connection could be made: nothing reached the upstream.
    Connect,
    /// The connection broke after the request (or part of it) was sent.
    Reset,
    /// The per-try timeout fired before response headers arrived.
    Timeout,
    /// The upstream answered with this status.
    Status(u16),
}

/// Which failures a route retries; parsed from a config list like
/// `[connect, reset, timeout, 502, 503, 504]`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RetryOn {
    /// Retry connect failures.
    pub connect: bool,
    /// Retry connections that broke mid-exchange.
    pub reset: bool,
    /// Retry per-try timeouts.
    pub timeout: bool,
    /// Retry these response statuses (sorted, no duplicates).
    pub statuses: Vec<u16>,
}

#[derive(Debug)]
struct BudgetInner {
    config: BudgetConfig,
    origin: Instant,
    buckets: [BudgetBucket; BUDGET_BUCKETS],
    /// Floor tokens available and when they were last refilled.
    floor_tokens: f64,
    floor_at: Instant,
}

#[derive(Clone, Copy, Debug, Default)]
struct BudgetBucket {
    /// Seconds since origin that the counts belong to.
    slot: u64,
    deposits: u64,
    withdrawals: u64,
}

// === impl Backoff ===

impl Backoff {
    /// Full jitter: uniform in [0, min(max, base * 2^retry)] where retry = 0 for the first retry. If the upstream sent Retry-After, wait that long, capped at max (no jitter).
    pub(crate) fn delay(
        &self,
        retry: u32,
        retry_after: Option<Duration>,
        rng: &mut fastrand::Rng,
    ) -> Duration {
        if let Some(wait) = retry_after {
            return wait.min(self.max);
        }
        // Overflow of the shift (retry >= 32) or of the product means the
        // ceiling is far above max.
        let ceiling = 1u32
            .checked_shl(retry)
            .and_then(|factor| self.base.checked_mul(factor))
            .map_or(self.max, |d| d.min(self.max));
        let ceiling_nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.u64(0..=ceiling_nanos))
    }
}

// === impl RetryBudget ===

impl RetryBudget {
    /// A budget with an empty window.
    pub(crate) fn new(config: BudgetConfig) -> Self {
        let now = Instant::now();
        RetryBudget {
            inner: Mutex::new(BudgetInner {
                config,
                origin: now,
                buckets: [BudgetBucket::default(); BUDGET_BUCKETS],
                floor_tokens: f64::from(config.min_per_second),
                floor_at: now,
            }),
        }
    }

    /// Replace the config (hot reload); the window's counts are kept.
    pub(crate) fn set_config(&self, config: BudgetConfig) {
        self.inner.lock().config = config;
    }

    /// Count one original request (not a retry).
    pub(crate) fn deposit(&self) {
        let mut inner = self.inner.lock();
        inner.bucket(Instant::now()).deposits += 1;
    }

    /// Take one retry from the budget; `false` when it is exhausted (and
    /// then nothing is taken).
    pub(crate) fn try_withdraw(&self) -> bool {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        let (deposits, withdrawals) = inner.totals(now);
        let config = inner.config;
        // Negative or NaN ratios (validation rejects them) add nothing.
        let ratio = if config.ratio > 0.0 {
            config.ratio
        } else {
            0.0
        };
        if ratio * deposits as f64 - withdrawals as f64 + BUDGET_EPSILON >= 1.0 {
            inner.bucket(now).withdrawals += 1;
            return true;
        }
        // The floor: refill at min_per_second, at most one second's worth.
        let rate = f64::from(config.min_per_second);
        let elapsed = now.saturating_duration_since(inner.floor_at).as_secs_f64();
        inner.floor_tokens = (inner.floor_tokens + elapsed * rate).min(rate);
        inner.floor_at = now;
        if inner.floor_tokens + BUDGET_EPSILON >= 1.0 {
            inner.floor_tokens -= 1.0;
            return true;
        }
        false
    }
}

// === impl BudgetInner ===

impl BudgetInner {
    fn slot(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs() / BUDGET_BUCKET_WIDTH.as_secs()
    }

    /// The current bucket, emptied first if it still holds an older second.
    fn bucket(&mut self, now: Instant) -> &mut BudgetBucket {
        let slot = self.slot(now);
        let bucket = &mut self.buckets[(slot % BUDGET_BUCKETS as u64) as usize];
        if bucket.slot != slot {
            *bucket = BudgetBucket {
                slot,
                ..BudgetBucket::default()
            };
        }
        bucket
    }

    /// `(deposits, withdrawals)` in the buckets still inside the window.
    fn totals(&self, now: Instant) -> (u64, u64) {
        let slot = self.slot(now);
        self.buckets
            .iter()
            .filter(|b| b.slot <= slot && slot - b.slot < BUDGET_BUCKETS as u64)
            .fold((0, 0), |(d, w), b| (d + b.deposits, w + b.withdrawals))
    }
}

// === impl RetryCause ===

crate::metrics::label_enum! {
    /// `cause` of `spillway_retries_total`: statuses other than 502/503/504
    /// fold into `5xx` or `status` so the label set stays bounded.
    pub(crate) enum RetryLabel {
        Connect => "connect",
        Reset => "reset",
        Timeout => "timeout",
        BadGateway => "502",
        Unavailable => "503",
        GatewayTimeout => "504",
        OtherServerError => "5xx",
        OtherStatus => "status",
    }
}

impl RetryCause {
    /// The metric label of this cause.
    pub(crate) fn label(&self) -> RetryLabel {
        match self {
            RetryCause::Connect => RetryLabel::Connect,
            RetryCause::Reset => RetryLabel::Reset,
            RetryCause::Timeout => RetryLabel::Timeout,
            RetryCause::Status(502) => RetryLabel::BadGateway,
            RetryCause::Status(503) => RetryLabel::Unavailable,
            RetryCause::Status(504) => RetryLabel::GatewayTimeout,
            RetryCause::Status(500..=599) => RetryLabel::OtherServerError,
            RetryCause::Status(_) => RetryLabel::OtherStatus,
        }
    }
}

// === impl RetryOn ===

impl RetryOn {
    /// Is this cause configured as retryable?
    pub(crate) fn matches(&self, cause: RetryCause) -> bool {
        match cause {
            RetryCause::Connect => self.connect,
            RetryCause::Reset => self.reset,
            RetryCause::Timeout => self.timeout,
            RetryCause::Status(status) => self.statuses.binary_search(&status).is_ok(),
        }
    }
}

/// Methods that RFC 9110 defines as idempotent: GET HEAD OPTIONS TRACE PUT DELETE.
pub(crate) fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    // http::Method cannot be used as a match pattern.
    *method == Method::GET
        || *method == Method::HEAD
        || *method == Method::OPTIONS
        || *method == Method::TRACE
        || *method == Method::PUT
        || *method == Method::DELETE
}

/// May this failed attempt be retried as far as safety goes? Idempotent methods: yes. Others: only when nothing reached the upstream (Connect) or the request carries the idempotency key header.
pub(crate) fn safe_to_retry(
    method: &http::Method,
    cause: RetryCause,
    has_idempotency_key: bool,
) -> bool {
    is_idempotent(method) || cause == RetryCause::Connect || has_idempotency_key
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Label;
    use http::Method;
    use tokio::time::advance;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_never_exceeds_ceiling() {
        let backoff = Backoff {
            base: 10 * MS,
            max: Duration::from_secs(1),
        };
        let mut rng = fastrand::Rng::with_seed(7);
        for retry in 0..70 {
            let ceiling = if retry < 7 {
                10 * MS * (1 << retry)
            } else {
                Duration::from_secs(1)
            };
            for _ in 0..1000 {
                let d = backoff.delay(retry, None, &mut rng);
                assert!(d <= ceiling, "retry {retry}: {d:?} > {ceiling:?}");
            }
        }
        assert!(backoff.delay(u32::MAX, None, &mut rng) <= backoff.max);
    }

    #[test]
    fn backoff_jitter_spans_the_range() {
        let backoff = Backoff {
            base: 10 * MS,
            max: Duration::from_secs(1),
        };
        let mut rng = fastrand::Rng::with_seed(42);
        let ceiling = 80 * MS; // retry 3: 10ms * 2^3
        let draws: Vec<Duration> = (0..1000)
            .map(|_| backoff.delay(3, None, &mut rng))
            .collect();
        // Every tenth of the range is hit (expected ~100 each).
        let mut deciles = [0u32; 10];
        for d in &draws {
            let i = (d.as_nanos() * 10 / ceiling.as_nanos()).min(9) as usize;
            deciles[i] += 1;
        }
        assert!(
            deciles.iter().all(|&n| (50..=150).contains(&n)),
            "{deciles:?}"
        );
        let mean = draws.iter().sum::<Duration>() / 1000;
        assert!(
            (36 * MS..=44 * MS).contains(&mean),
            "mean {mean:?} should be near 40ms"
        );
    }

    #[test]
    fn backoff_degenerate_inputs() {
        let mut rng = fastrand::Rng::with_seed(1);
        let zero = Backoff {
            base: Duration::ZERO,
            max: Duration::from_secs(1),
        };
        assert_eq!(zero.delay(5, None, &mut rng), Duration::ZERO);
        let huge = Backoff {
            base: Duration::MAX,
            max: Duration::MAX,
        };
        // No overflow at any retry count.
        let _ = huge.delay(0, None, &mut rng);
        let _ = huge.delay(u32::MAX, None, &mut rng);
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        let backoff = Backoff {
            base: 25 * MS,
            max: Duration::from_secs(1),
        };
        let mut rng = fastrand::Rng::with_seed(3);
        assert_eq!(backoff.delay(0, Some(200 * MS), &mut rng), 200 * MS);
        assert_eq!(backoff.delay(4, Some(200 * MS), &mut rng), 200 * MS);
        assert_eq!(
            backoff.delay(0, Some(Duration::from_secs(120)), &mut rng),
            Duration::from_secs(1)
        );
        assert_eq!(
            backoff.delay(0, Some(Duration::ZERO), &mut rng),
            Duration::ZERO
        );
    }

    #[tokio::test(start_paused = true)]
    async fn budget_min_per_second_alone() {
        let budget = RetryBudget::new(BudgetConfig {
            ratio: 0.0,
            min_per_second: 2,
        });
        assert!(budget.try_withdraw());
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw(), "one second's worth, not ten");
        assert!(
            !budget.try_withdraw(),
            "a refusal takes nothing, stays refused"
        );
        advance(Duration::from_millis(500)).await;
        assert!(budget.try_withdraw(), "refilled at 2/s: one after 500ms");
        assert!(!budget.try_withdraw());
        advance(Duration::from_secs(10)).await;
        assert!(budget.try_withdraw());
        assert!(budget.try_withdraw());
        assert!(
            !budget.try_withdraw(),
            "the floor never holds more than one second's worth"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn budget_ratio_adds_per_deposit() {
        let budget = RetryBudget::new(BudgetConfig {
            ratio: 0.2,
            min_per_second: 0,
        });
        assert!(!budget.try_withdraw(), "no traffic, no reserve");
        for _ in 0..10 {
            budget.deposit();
        }
        assert!(budget.try_withdraw());
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw());
        for _ in 0..4 {
            budget.deposit();
        }
        assert!(!budget.try_withdraw(), "0.2 * 14 - 2 = 0.8");
        budget.deposit();
        assert!(budget.try_withdraw(), "0.2 * 15 - 2 = 1");
    }

    #[tokio::test(start_paused = true)]
    async fn budget_window_slides() {
        let budget = RetryBudget::new(BudgetConfig {
            ratio: 0.5,
            min_per_second: 1,
        });
        for _ in 0..4 {
            budget.deposit();
        }
        // 0.5 * 4 from the ratio, then 1 from the floor.
        for _ in 0..3 {
            assert!(budget.try_withdraw());
        }
        assert!(!budget.try_withdraw());
        advance(Duration::from_millis(9_999)).await;
        // The floor refilled (one token); the ratio part is still spent.
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw(), "still inside the window");
        advance(MS).await;
        for _ in 0..4 {
            budget.deposit();
        }
        // Second 0's deposits and ratio withdrawals expired: 0.5 * 4 again.
        assert!(budget.try_withdraw());
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn budget_floor_bounds_retries_per_second() {
        let budget = RetryBudget::new(BudgetConfig {
            ratio: 0.0,
            min_per_second: 5,
        });
        // Asking constantly for 3 s yields at most 5 * (3 + 1).
        let mut granted = 0;
        for _ in 0..300 {
            if budget.try_withdraw() {
                granted += 1;
            }
            advance(Duration::from_millis(10)).await;
        }
        assert!((15..=20).contains(&granted), "granted {granted}");
    }

    #[tokio::test(start_paused = true)]
    async fn budget_set_config_keeps_counts() {
        let budget = RetryBudget::new(BudgetConfig {
            ratio: 0.5,
            min_per_second: 0,
        });
        for _ in 0..4 {
            budget.deposit();
        }
        assert!(budget.try_withdraw());
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw());
        budget.set_config(BudgetConfig {
            ratio: 1.0,
            min_per_second: 0,
        });
        assert!(budget.try_withdraw());
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw(), "1.0 * 4 - 4 = 0");
    }

    #[test]
    fn budget_float_rounding() {
        // 0.1 * 30 = 3.0000000000000004 and 0.7 * 90 = 62.99999999999999:
        // whichever way the product rounds, the whole number of retries.
        for (ratio, deposits, retries) in [(0.1, 30, 3), (0.7, 90, 63)] {
            let budget = RetryBudget::new(BudgetConfig {
                ratio,
                min_per_second: 0,
            });
            for _ in 0..deposits {
                budget.deposit();
            }
            for i in 0..retries {
                assert!(budget.try_withdraw(), "ratio {ratio}: retry {i}");
            }
            assert!(!budget.try_withdraw(), "ratio {ratio}");
        }
    }

    #[test]
    fn retry_on_matches_configured_causes() {
        // Statuses are sorted and deduplicated by config validation.
        let on = RetryOn {
            connect: true,
            reset: false,
            timeout: true,
            statuses: vec![502, 503, 504],
        };
        assert!(on.matches(RetryCause::Connect));
        assert!(!on.matches(RetryCause::Reset));
        assert!(on.matches(RetryCause::Timeout));
        assert!(on.matches(RetryCause::Status(503)));
        assert!(!on.matches(RetryCause::Status(500)));
    }

    #[test]
    fn cause_labels() {
        assert_eq!(RetryCause::Connect.label().as_str(), "connect");
        assert_eq!(RetryCause::Reset.label().as_str(), "reset");
        assert_eq!(RetryCause::Timeout.label().as_str(), "timeout");
        assert_eq!(RetryCause::Status(502).label().as_str(), "502");
        assert_eq!(RetryCause::Status(503).label().as_str(), "503");
        assert_eq!(RetryCause::Status(504).label().as_str(), "504");
        assert_eq!(RetryCause::Status(500).label().as_str(), "5xx");
        assert_eq!(RetryCause::Status(429).label().as_str(), "status");
    }

    #[test]
    fn safe_to_retry_matrix() {
        let causes = [
            RetryCause::Connect,
            RetryCause::Reset,
            RetryCause::Timeout,
            RetryCause::Status(503),
        ];
        let idempotent = [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::TRACE,
            Method::PUT,
            Method::DELETE,
        ];
        let unsafe_methods = [
            Method::POST,
            Method::PATCH,
            Method::CONNECT,
            Method::from_bytes(b"PURGE").expect("valid token"),
        ];
        for method in &idempotent {
            assert!(is_idempotent(method));
            for cause in causes {
                assert!(safe_to_retry(method, cause, false), "{method} {cause:?}");
                assert!(safe_to_retry(method, cause, true), "{method} {cause:?}");
            }
        }
        for method in &unsafe_methods {
            assert!(!is_idempotent(method));
            for cause in causes {
                let expected = cause == RetryCause::Connect;
                assert_eq!(
                    safe_to_retry(method, cause, false),
                    expected,
                    "{method} {cause:?}"
                );
                assert!(
                    safe_to_retry(method, cause, true),
                    "{method} {cause:?} with key"
                );
            }
        }
    }
}
