//! Per-route admission control: a resizable concurrency cap with a bounded,
//! cancellation-safe wait queue, priority classes, per-caller fairness and a
//! shadow mode, plus a process-wide cap ([`GlobalLimit`]).
//!
//! # Admission
//!
//! A route admits at most `max_in_flight` requests at once. A request that
//! finds every permit taken joins a bounded queue of up to `max_depth` waiters
//! (`0` means no queue), or is refused at once with `QueueFull` when the queue
//! is full. A queued request leaves with a permit, when one is released and
//! handed to it, or with `QueueTimeout` once it has waited `max_wait`, or
//! earlier if the request's own deadline comes first.
//!
//! A permit is released when the [`Permit`] is dropped (the response body
//! guard owns it, so a slot is held until the body ends). Release hands the
//! slot straight to the next waiter, so a newcomer cannot barge past the queue.
//!
//! # Priority classes ([`Policy::reserved`])
//!
//! Classes are ranked, 0 the highest. A request of class `c` is admitted only
//! while in-flight is below the limit minus the reserved shares of the
//! classes above it (each share of the limit rounded down): with limit 10 and
//! 20% reserved for class 0, classes 1 and 2 stop at 8 in flight while class
//! 0 can take 9 and 10. A freed permit goes to a waiter of the highest waiting
//! class. A full queue makes room for an arrival by displacing the newest
//! waiter of the lowest class strictly below the arrival's (`Priority`).
//!
//! # Fairness ([`Policy::max_keys`])
//!
//! Each request carries a key (a hash of the caller's identity). A key alone
//! may use the whole limit. When several keys wait in a class, a freed permit
//! goes to the waiting key holding the fewest permits (ties: the key whose
//! oldest waiter has waited longest). A full queue makes room for an arrival
//! of a key with fewer waiters (in its class) than the key with the most by
//! displacing that key's newest waiter (`FairShare`). A key is tracked only
//! while it has requests in flight or waiting, and at most `max_keys` at
//! once; further keys share one overflow key. Priority comes first: fairness
//! orders requests within a class.
//!
//! # Discipline
//!
//! Within a key's queue:
//! - `fifo`: first come, first served.
//! - `adaptive_lifo`: Facebook's adaptive LIFO with CoDel ("Fail at Scale",
//!   ACM Queue 2015; Wangle's `Codel`). While the queue drains quickly it is
//!   FIFO. Once the queue has been *standing* (non-empty without a break) for
//!   longer than `codel_interval` (default 100 ms), the route is overloaded
//!   and switches to LIFO: the newest waiter is served first, because it is the
//!   one whose client is most likely still waiting, and waiters are held to the
//!   short `codel_target` (default 5 ms) instead of `max_wait`. This is
//!   enforced when a permit is handed out: the waiters at the old end of the
//!   queues that have waited longer than `codel_target` are first rejected
//!   with `QueueTimeout`, lowest class first, and then the newest is admitted
//!   (if every waiter is stale, all are shed and the permit goes back to the
//!   pool). A new arrival that finds the queue full in this mode also sheds
//!   stale waiters, lowest class first, to make room before it would be
//!   refused. While no permit frees up, waiters still leave at `max_wait` or
//!   their deadline. The route returns to FIFO as soon as the queue is empty.
//!
//! # Shadow mode ([`Policy::shadow`])
//!
//! Every request is let through at once, and the same state machine runs on
//! the side in virtual time, as enforcement would have run it: a request
//! admitted virtually holds its virtual permit for as long as it really
//! runs; one that would have queued keeps its virtual queue place until a
//! virtual permit frees for it (then holds it for as long as it really ran,
//! from that moment), until it would have given up at `max_wait`, or until
//! it is displaced — whether or not its real request has ended meanwhile.
//! Virtual releases that fall due after the real request ended wait in a
//! heap (one entry per virtual permit, so bounded by the limit) and are
//! applied, in time order and each as of its own time, at the route's next
//! shadow-mode acquire or release; virtual waiters past `max_wait` are
//! dropped when they would make an arrival find the queue full. So the
//! decisions enforcement would have taken — queue, queue full, displaced by
//! priority or fairness — are reported in [`Admitted::shadow`] and counted by
//! the caller. The real in-flight count is kept apart and may exceed the limit.
//!
//! # Resizing (hot reload)
//!
//! [`Admission::set_limits`] changes the limits in place. Raising
//! `max_in_flight` admits waiters at once; lowering it revokes no permit, and
//! admits no one until in-flight falls below the new cap. Lowering
//! `max_depth` sheds nobody already queued: only new arrivals see the new
//! bound. The queue's state (waiters, peak) survives the change.
//! [`Admission::set_policy`] changes classes, fairness and mode the same way:
//! waiters and permits keep their places (class indices are clamped to the
//! new class count).
//!
//! # Implementation
//!
//! One atomic word holds the (enforced) in-flight count and a "waiters
//! queued" bit. With no waiter queued and neither fairness nor shadow mode,
//! acquire and release are a single compare-and-swap on that word (no lock,
//! no allocation); the admission threshold of each class is precomputed in
//! an atomic. Once anyone is queued the bit forces every acquire and release
//! through a short `parking_lot` critical section, which keeps hand-off
//! strictly ordered; fairness and shadow mode always take it (they count per
//! key). Each waiter owns a small shared slot (its state and `Waker`); the
//! queues are `VecDeque`s of slots, one per class and key. A waiter whose
//! future is dropped marks its slot dead and leaves it in place; dead slots
//! are skipped when popping and compacted away once they outnumber the live
//! ones, so a deque never holds more than `2 * depth + 16` slots. No lock is
//! held across `.await`, no task is spawned, and wakers are woken after the
//! lock is released.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::future::{poll_fn, Future};
use std::hash::{BuildHasherDefault, Hasher};
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::{sleep_until, Instant};

/// Set in [`Admission::word`] while at least one live waiter is queued.
const WAITERS: usize = 1 << (usize::BITS - 1);
/// The in-flight count: the low bits of [`Admission::word`].
const COUNT: usize = WAITERS - 1;
/// Dead slots tolerated beyond the live ones before a queue is compacted.
const COMPACT_SLACK: usize = 16;
/// Wakers collected under the lock before they must be woken inline.
/// Most priority classes.
pub(crate) const MAX_CLASSES: usize = 8;
/// The key further keys share once `max_keys` are tracked.
pub(crate) const OVERFLOW_KEY: u64 = u64::MAX;

/// A fairness key from the bytes that identify a caller: keyed SipHash with
/// a per-process random key, so callers cannot aim their keys at one
/// another's; never [`OVERFLOW_KEY`].
pub(crate) fn key_hash(bytes: &[u8]) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static STATE: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    let mut h = STATE
        .get_or_init(std::hash::RandomState::new)
        .build_hasher();
    h.write(bytes);
    h.finish().min(OVERFLOW_KEY - 1)
}

/// Maps keyed by [`key_hash`] values, which are keyed SipHash already:
/// hashing them a second time buys nothing (and costs on every acquire and
/// release with fairness).
type KeyMap<V> = HashMap<u64, V, BuildHasherDefault<KeyHasher>>;

/// Passes a `u64` key through as its own hash.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; fold anything else in anyway.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Order in which queued requests are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Discipline {
    /// First in, first out.
    Fifo,
    /// FIFO until the queue stands for `codel_interval`, then LIFO with CoDel
    /// shedding of waiters older than `codel_target` (see the module docs).
    AdaptiveLifo,
}

/// A route's admission limits, as validated from config.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdmissionLimits {
    /// Requests admitted at once.
    pub max_in_flight: usize,
    /// Requests that may wait for a permit; `0` disables the queue.
    pub max_depth: usize,
    /// Longest a request waits in the queue (its deadline may cut it shorter).
    pub max_wait: Duration,
    /// Order in which waiters are served.
    pub discipline: Discipline,
    /// `AdaptiveLifo`: once overloaded, waiters older than this are shed
    /// (conventionally 5 ms).
    pub codel_target: Duration,
    /// `AdaptiveLifo`: how long the queue must stand before switching to LIFO
    /// (conventionally 100 ms).
    pub codel_interval: Duration,
}

/// Classes, fairness and mode of a route (config section "priority",
/// "fairness" and `mode`). The default is one class, no fairness, enforced.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Reserved share of the limit per class, highest class first; its
    /// length is the number of classes (1 without priority).
    pub reserved: Vec<f64>,
    /// Fairness: most keys tracked at once; `None` without fairness.
    pub max_keys: Option<usize>,
    /// Shadow mode: admit everyone, report what enforcement would have done.
    pub shadow: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            reserved: vec![0.0],
            max_keys: None,
            shadow: false,
        }
    }
}

/// Who is asking: the request's priority class and fairness key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket {
    /// 0 is the highest class.
    pub class: usize,
    /// A hash of the caller's key (0 without fairness).
    pub key: u64,
}

/// The per-route admission controller, shared as `Arc<Admission>` and kept in
/// the registry so it survives a reload.
pub struct Admission {
    /// In-flight count (`COUNT` bits) and the `WAITERS` bit. Lock-free paths
    /// only change it while `WAITERS` is clear; with it set, only holders of
    /// `state` do, which is what makes hand-off race-free.
    word: AtomicUsize,
    /// Per class, the in-flight count below which it is admitted, for the
    /// lock-free acquire (`limit - reserved shares above`).
    thresholds: [AtomicUsize; MAX_CLASSES],
    /// Fairness or shadow mode: every acquire and release takes the lock.
    locked: std::sync::atomic::AtomicBool,
    /// Permits held per class (only counted with more than one class).
    class_in_flight: [AtomicUsize; MAX_CLASSES],
    /// Mirror of "more than one class" for the lock-free paths.
    count_classes: std::sync::atomic::AtomicBool,
    /// Requests really in flight (differs from the word in shadow mode).
    real_in_flight: AtomicUsize,
    /// Mirror of `State::epoch` for `Permit::drop`.
    epoch_mirror: std::sync::atomic::AtomicU64,
    state: Mutex<State>,
}

/// Everything behind the lock.
struct State {
    limits: AdmissionLimits,
    policy: Policy,
    /// Waiters per class (index 0 highest), then per key.
    classes: Vec<ClassQueue>,
    /// Live (still waiting) entries in all queues: the queue depth.
    live: usize,
    /// Largest `live` ever seen.
    peak: usize,
    /// When the queue last went from empty to non-empty; `None` while empty.
    standing_since: Option<Instant>,
    /// Fairness: keys with requests in flight or waiting.
    keys: KeyMap<KeyCount>,
    /// Bumped by every switch from shadow to enforce (see `Permit::drop`).
    epoch: u64,
    /// Shadow mode: virtual permits to release at a time already known
    /// (their real requests ended; enforcement would have run them later).
    /// At most one entry per virtual permit, so bounded by the limit.
    virtual_releases: BinaryHeap<Reverse<(Instant, u64, Ticket)>>,
    /// Tie-break for `virtual_releases`.
    virtual_seq: u64,
}

#[derive(Default)]
struct ClassQueue {
    /// Per key (one key, 0, without fairness).
    keys: KeyMap<KeyQueue>,
    live: usize,
}

#[derive(Default)]
struct KeyQueue {
    entries: VecDeque<Entry>,
    live: usize,
}

#[derive(Default, Clone, Copy)]
struct KeyCount {
    in_flight: usize,
    waiting: usize,
}

/// One queued request.
struct Entry {
    slot: Arc<Slot>,
    enqueued_at: Instant,
}

/// Shared between a queued future and the queue. Transitions out of
/// `Waiting` happen only under the `Admission` lock; the future's own poll
/// only moves `Granted`/`Shed`/`Displaced` to `Done`.
struct Slot(Mutex<SlotInner>);

struct SlotInner {
    state: SlotState,
    waker: Option<Waker>,
    /// Where the entry is queued (kept current across policy changes).
    ticket: Ticket,
    /// Shadow mode: when the virtual waiter arrived.
    arrived: Instant,
    /// Shadow mode: when it was granted a virtual permit.
    granted_at: Option<Instant>,
    /// Shadow mode: how long the real request ran, once it ended while its
    /// virtual place was still queued. Its virtual permit, when granted, is
    /// held that long.
    ran: Option<Duration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    /// In the queue, live.
    Waiting,
    /// Handed a permit (already counted in flight) that the future has not
    /// yet taken.
    Granted,
    /// Rejected by CoDel shedding or a virtual timeout.
    Shed,
    /// Displaced from a full queue.
    Displaced(Rejected),
    /// Finished: permit taken, rejection seen, or future gone (a dead entry).
    Done,
}

/// Outcome of the locked slow path of `acquire`, with the ticket as queued
/// and the waiter the arrival displaced, if any.
enum Enqueued {
    Admitted(Ticket, Option<Rejected>),
    /// Queued at the `Instant`, for at most the `Duration`.
    Queued(Arc<Slot>, Instant, Duration, Option<Rejected>),
    /// Shadow mode: let through, holding this virtual place.
    Shadow(Ticket, ShadowHold, ShadowDecision, Option<Rejected>),
}

/// The queued part of an `acquire` future; its `Drop` is the cancellation path.
struct Waiter<'a> {
    admission: &'a Admission,
    slot: Arc<Slot>,
    finished: bool,
}

/// Wakers gathered under the lock and woken after it is released.
struct WakeList {
    /// The one waiter most hand-offs wake.
    first: Option<Waker>,
    /// Any further ones (a CoDel shed, a reload admitting several): allocated
    /// only then.
    more: Vec<Waker>,
}

/// A successful admission.
pub struct Admitted {
    /// The slot; dropping it releases the slot to the next waiter.
    pub permit: Permit,
    /// Time spent queued; `Duration::ZERO` when admitted without queueing.
    pub waited: Duration,
    /// A waiter this arrival displaced from the full queue, and why.
    pub displaced: Option<Rejected>,
    /// Shadow mode: what enforcement would have done with this request.
    pub shadow: Option<ShadowDecision>,
}

/// What enforcement would have done with a request let through in shadow mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowDecision {
    /// Admitted at once.
    Admit,
    /// Would have waited in the queue.
    Queue,
    /// Would have been refused.
    Reject(Rejected),
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// The queue already held `max_depth` waiters (or `max_depth` is 0).
    QueueFull,
    /// Waited `max_wait`, reached the request deadline, or was shed by CoDel.
    QueueTimeout,
    /// Displaced from a full queue by a higher-priority arrival.
    Priority,
    /// Displaced from a full queue by an arrival of a key with fewer waiters.
    FairShare,
}

/// One admitted request's slot. Dropping it releases the slot.
pub struct Permit {
    admission: Arc<Admission>,
    ticket: Ticket,
    /// Counted in `class_in_flight` when granted.
    class_counted: bool,
    /// Shadow mode: the virtual place this request holds (a queue entry, or
    /// a virtual permit once granted), released with the request.
    shadow: Option<ShadowHold>,
    /// The admission's epoch when this permit was made.
    epoch: u64,
}

enum ShadowHold {
    /// Holds a virtual permit (counted in the word).
    Permit,
    /// Holds a virtual queue entry, maybe granted meanwhile.
    Queued(Arc<Slot>),
    /// Was refused virtually: holds nothing.
    Nothing,
}

/// A snapshot for `/status` and metrics.
#[derive(Debug, Clone, Default)]
pub(crate) struct AdmissionStats {
    /// Requests really in flight, including granted permits not yet picked up.
    pub in_flight: usize,
    /// Requests waiting now (virtually, in shadow mode).
    pub queue_depth: usize,
    /// Largest queue depth since the controller was created.
    pub queue_depth_peak: usize,
    /// Current cap.
    pub max_in_flight: usize,
    /// Current queue bound.
    pub max_depth: usize,
    /// `AdaptiveLifo` is currently serving LIFO with CoDel shedding.
    pub lifo_active: bool,
    /// Permits held per class (with more than one class).
    pub class_in_flight: Vec<usize>,
    /// Fairness keys with requests in flight or waiting.
    pub keys: usize,
}

/// A process-wide cap on requests in flight: no queue, reject at once.
pub(crate) struct GlobalLimit {
    in_flight: AtomicUsize,
    max: AtomicUsize,
}

/// One request's share of the [`GlobalLimit`]; dropping it releases it.
pub(crate) struct GlobalPermit {
    limit: Arc<GlobalLimit>,
}

// === impl Admission ===

impl Admission {
    /// A controller with no request in flight, one class, enforced.
    pub fn new(limits: AdmissionLimits) -> Arc<Self> {
        Self::with_policy(limits, Policy::default())
    }

    /// A controller with classes, fairness or shadow mode.
    pub fn with_policy(limits: AdmissionLimits, policy: Policy) -> Arc<Self> {
        let limits = clamp(limits);
        let policy = clamp_policy(policy);
        let classes = (0..policy.reserved.len())
            .map(|_| ClassQueue::default())
            .collect();
        let adm = Arc::new(Self {
            word: AtomicUsize::new(0),
            thresholds: std::array::from_fn(|_| AtomicUsize::new(0)),
            locked: std::sync::atomic::AtomicBool::new(false),
            class_in_flight: std::array::from_fn(|_| AtomicUsize::new(0)),
            count_classes: std::sync::atomic::AtomicBool::new(false),
            real_in_flight: AtomicUsize::new(0),
            epoch_mirror: std::sync::atomic::AtomicU64::new(0),
            state: Mutex::new(State {
                limits,
                policy,
                classes,
                live: 0,
                peak: 0,
                standing_since: None,
                keys: KeyMap::default(),
                epoch: 0,
                virtual_releases: BinaryHeap::new(),
                virtual_seq: 0,
            }),
        });
        adm.publish(&adm.state.lock());
        adm
    }

    /// Mirrors the thresholds and the lock-only flag for the lock-free paths.
    fn publish(&self, st: &State) {
        for (c, t) in self.thresholds.iter().enumerate() {
            t.store(st.threshold(c), Ordering::Release);
        }
        let locked = st.policy.max_keys.is_some() || st.policy.shadow;
        self.locked.store(locked, Ordering::Release);
        self.count_classes
            .store(st.policy.reserved.len() > 1, Ordering::Release);
    }

    /// Changes the limits in place (hot reload). Raising the cap admits
    /// waiters at once; no permit is revoked and no waiter is shed.
    pub(crate) fn set_limits(&self, limits: AdmissionLimits) {
        let limits = clamp(limits);
        let mut wakes = WakeList::new();
        let mut st = self.state.lock();
        st.limits = limits;
        self.publish(&st);
        self.admit_waiters(&mut st, Instant::now(), &mut wakes);
        drop(st);
        wakes.wake_all();
    }

    /// Changes classes, fairness and mode in place (hot reload). Waiters keep
    /// their places (class clamped to the new count); switching to shadow lets
    /// every waiter through; switching from shadow to enforce counts every
    /// request really in flight, so new ones queue until in-flight falls
    /// below the limit.
    pub(crate) fn set_policy(&self, policy: Policy) {
        let policy = clamp_policy(policy);
        let mut wakes = WakeList::new();
        let mut st = self.state.lock();
        if st.policy == policy {
            return;
        }
        let was_shadow = st.policy.shadow;
        let rebucket = st.policy.reserved.len() != policy.reserved.len()
            || st.policy.max_keys.is_some() != policy.max_keys.is_some();
        if policy.max_keys.is_none() {
            st.keys.clear();
        }
        st.policy = policy;
        if rebucket {
            st.rebucket();
        }
        if was_shadow && !st.policy.shadow {
            // Virtual waiters are real requests in flight: every request
            // really in flight now holds an enforced permit.
            st.clear_queues(SlotState::Done, &mut wakes);
            st.virtual_releases.clear();
            self.settle(&mut st);
            let real = self.real_in_flight.load(Ordering::Acquire).min(COUNT);
            self.word.store(real, Ordering::Release);
            st.epoch += 1;
            self.epoch_mirror.store(st.epoch, Ordering::Release);
        } else if !was_shadow && st.policy.shadow {
            // Shadow mode never queues: everyone waiting goes through.
            while st.live > 0 {
                let Some(c) = st.highest_waiting() else { break };
                let Some((ticket, entry)) = self.pop_next(&mut st, c, Instant::now(), &mut wakes)
                else {
                    continue;
                };
                self.grant(&mut st, ticket, entry, Instant::now(), &mut wakes);
            }
            self.settle(&mut st);
        }
        self.publish(&st);
        self.admit_waiters(&mut st, Instant::now(), &mut wakes);
        drop(st);
        wakes.wake_all();
    }

    /// Changes only `max_in_flight` (the adaptive limit), with the same
    /// effect as [`Admission::set_limits`]: raising admits waiters at once,
    /// lowering revokes no permit. Also returns nothing to await: cheap enough
    /// to call whenever the limit moves.
    pub(crate) fn set_max_in_flight(&self, max_in_flight: usize) {
        let mut wakes = WakeList::new();
        let mut st = self.state.lock();
        let max_in_flight = max_in_flight.clamp(1, COUNT);
        st.limits.max_in_flight = max_in_flight;
        self.publish(&st);
        self.admit_waiters(&mut st, Instant::now(), &mut wakes);
        drop(st);
        wakes.wake_all();
    }

    /// Requests holding an (enforced, or in shadow mode virtual) permit now:
    /// one atomic load, no lock.
    pub(crate) fn in_flight(&self) -> usize {
        self.word.load(Ordering::Acquire) & COUNT
    }

    /// The limits in force.
    #[cfg(test)]
    pub(crate) fn limits(&self) -> AdmissionLimits {
        self.state.lock().limits
    }

    /// Waits for a permit as the default class and key; see [`Self::acquire_as`].
    pub async fn acquire(
        self: &Arc<Self>,
        deadline: Option<Instant>,
    ) -> Result<Admitted, Rejected> {
        self.acquire_as(Ticket::default(), deadline).await
    }

    /// A free permit, taken without waiting: what [`Self::acquire_as`] grants
    /// at once when nobody queues and a permit is free (and nothing in shadow
    /// mode). `None` means the caller must go through `acquire_as`.
    pub(crate) fn try_acquire_now(self: &Arc<Self>, ticket: Ticket) -> Option<Admitted> {
        if !self.locked.load(Ordering::Acquire) && self.try_acquire_fast(ticket.class) {
            Some(self.admitted(ticket, Duration::ZERO, None, None))
        } else {
            None
        }
    }

    /// Waits for a permit. `deadline` is the request's overall deadline: the
    /// queue wait ends at `min(enqueue + max_wait, deadline)`. A free permit is
    /// granted even past the deadline (later stages enforce it); a request that
    /// would have to queue with no time left (deadline passed, or `max_wait`
    /// zero) gets `QueueTimeout` at once. In shadow mode it returns at once,
    /// with what enforcement would have done in [`Admitted::shadow`].
    ///
    /// Cancellation-safe: dropping the future leaves the queue, and a permit
    /// granted to it but not yet taken passes to the next waiter.
    pub async fn acquire_as(
        self: &Arc<Self>,
        ticket: Ticket,
        deadline: Option<Instant>,
    ) -> Result<Admitted, Rejected> {
        if let Some(a) = self.try_acquire_now(ticket) {
            return Ok(a);
        }
        let (slot, enqueued_at, max_wait, displaced) = match self.enqueue(ticket, deadline)? {
            Enqueued::Admitted(ticket, displaced) => {
                return Ok(self.admitted(ticket, Duration::ZERO, displaced, None))
            }
            Enqueued::Shadow(ticket, hold, decision, displaced) => {
                let mut a = self.admitted(ticket, Duration::ZERO, displaced, Some(decision));
                a.permit.shadow = Some(hold);
                return Ok(a);
            }
            Enqueued::Queued(slot, at, max_wait, displaced) => (slot, at, max_wait, displaced),
        };
        let mut waiter = Waiter {
            admission: self,
            slot,
            finished: false,
        };
        // An overflowing `max_wait` means "no limit" rather than a panic.
        let give_up = match (enqueued_at.checked_add(max_wait), deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut sleep = pin!(give_up.map(sleep_until));
        let ticket = poll_fn(|cx| {
            if let Poll::Ready(outcome) = waiter.poll_slot(cx) {
                return Poll::Ready(outcome);
            }
            let expired = sleep
                .as_mut()
                .as_pin_mut()
                .is_some_and(|sleep| sleep.poll(cx).is_ready());
            if expired {
                Poll::Ready(waiter.expire())
            } else {
                Poll::Pending
            }
        })
        .await?;
        Ok(self.admitted(ticket, enqueued_at.elapsed(), displaced, None))
    }

    /// A snapshot of the counters.
    pub(crate) fn stats(&self) -> AdmissionStats {
        let st = self.state.lock();
        let classes = st.policy.reserved.len();
        AdmissionStats {
            in_flight: if st.policy.shadow {
                self.real_in_flight.load(Ordering::Acquire)
            } else {
                self.word.load(Ordering::Acquire) & COUNT
            },
            queue_depth: st.live,
            queue_depth_peak: st.peak,
            max_in_flight: st.limits.max_in_flight,
            max_depth: st.limits.max_depth,
            lifo_active: st.lifo_active(Instant::now()),
            class_in_flight: if classes > 1 {
                self.class_in_flight[..classes]
                    .iter()
                    .map(|c| c.load(Ordering::Relaxed))
                    .collect()
            } else {
                Vec::new()
            },
            keys: st.keys.len(),
        }
    }

    fn admitted(
        self: &Arc<Self>,
        ticket: Ticket,
        waited: Duration,
        displaced: Option<Rejected>,
        shadow: Option<ShadowDecision>,
    ) -> Admitted {
        self.real_in_flight.fetch_add(1, Ordering::AcqRel);
        // With one class there is nothing to count per class: two atomic
        // read-modify-writes fewer per request. The permit remembers
        // whether it counted, so a reload that changes the classes
        // meanwhile leaves the counts right.
        let class_counted = ticket.class > 0 || self.count_classes.load(Ordering::Relaxed);
        if class_counted {
            self.class_in_flight[ticket.class.min(MAX_CLASSES - 1)].fetch_add(1, Ordering::Relaxed);
        }
        Admitted {
            permit: Permit {
                admission: Arc::clone(self),
                ticket,
                class_counted,
                shadow: None,
                epoch: self.epoch(),
            },
            waited,
            displaced,
            shadow,
        }
    }

    fn epoch(&self) -> u64 {
        self.epoch_mirror.load(Ordering::Acquire)
    }

    /// Takes a permit with one CAS when nobody is queued and the class's
    /// threshold allows it.
    fn try_acquire_fast(&self, class: usize) -> bool {
        let cap = self.thresholds[class.min(MAX_CLASSES - 1)].load(Ordering::Acquire);
        let mut cur = self.word.load(Ordering::Acquire);
        // `cur < cap` also fails when WAITERS is set (it exceeds any cap).
        while cur < cap {
            match self
                .word
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
        false
    }

    /// Locked slow path: admit if the class's threshold allows, else make
    /// room (CoDel, displacement) and queue, or refuse. In shadow mode the
    /// same decision is taken for a virtual place and the caller goes on.
    fn enqueue(&self, mut ticket: Ticket, deadline: Option<Instant>) -> Result<Enqueued, Rejected> {
        // The clock is read only if the arrival cannot be admitted at once:
        // an uncontended acquire with fairness or shadow mode takes this
        // path every time.
        let mut clock = None;
        let mut now = || *clock.get_or_insert_with(Instant::now);
        let mut wakes = WakeList::new();
        let mut st = self.state.lock();
        ticket = st.intern(ticket);
        let shadow = st.policy.shadow;
        if shadow && !st.virtual_releases.is_empty() {
            self.run_virtual(&mut st, now(), &mut wakes);
        }
        let mut expired = false;
        let max_wait = st.limits.max_wait;
        // Published by every change of limits or policy, under this lock.
        let threshold = self.thresholds[ticket.class.min(MAX_CLASSES - 1)].load(Ordering::Acquire);
        let mut displaced = None;
        let mut shed = false;
        let mut cur = self.word.load(Ordering::Acquire);
        loop {
            // Every class with a live waiter is at or over its threshold
            // (`admit_waiters` keeps it so), so an arrival under its own
            // threshold passes nobody of its class or above.
            if cur & COUNT < threshold {
                match self
                    .word
                    .compare_exchange(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => {
                        st.count_key_admitted(ticket);
                        return Ok(if shadow {
                            Enqueued::Shadow(
                                ticket,
                                ShadowHold::Permit,
                                ShadowDecision::Admit,
                                displaced,
                            )
                        } else {
                            Enqueued::Admitted(ticket, displaced)
                        });
                    }
                    Err(actual) => {
                        cur = actual;
                        continue;
                    }
                }
            }
            if st.live >= st.limits.max_depth && displaced.is_none() {
                // Shadow mode: virtual waiters past `max_wait` would have
                // left by now (nothing wakes them: they go when they count).
                if shadow && !expired {
                    expired = true;
                    let bound = st.limits.max_wait;
                    self.shed_older_than(&mut st, now(), bound, &mut wakes);
                    cur = self.word.load(Ordering::Acquire);
                    continue;
                }
                // Overloaded: stale waiters are worth less than this fresh one.
                if !shed && st.lifo_active(now()) {
                    shed = true;
                    self.shed_stale(&mut st, now(), &mut wakes);
                    cur = self.word.load(Ordering::Acquire);
                    continue;
                }
                match st.displace(ticket, &mut wakes) {
                    Some(reason) => displaced = Some(reason),
                    None => {
                        self.settle(&mut st);
                        drop(st);
                        wakes.wake_all();
                        return refuse(shadow, ticket, Rejected::QueueFull);
                    }
                }
                self.settle(&mut st);
                cur = self.word.load(Ordering::Acquire);
                continue;
            }
            if max_wait.is_zero() || deadline.is_some_and(|d| d <= now()) {
                drop(st);
                wakes.wake_all();
                return refuse(shadow, ticket, Rejected::QueueTimeout).map(|e| match e {
                    Enqueued::Shadow(t, h, _, _) => {
                        Enqueued::Shadow(t, h, ShadowDecision::Queue, displaced)
                    }
                    other => other,
                });
            }
            if cur & WAITERS != 0 {
                break;
            }
            // Setting the bit stops the lock-free paths; the CAS makes the
            // "no permit free" decision above atomic with it.
            match self.word.compare_exchange(
                cur,
                cur | WAITERS,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        let now = now();
        let slot = Arc::new(Slot(Mutex::new(SlotInner {
            state: SlotState::Waiting,
            waker: None,
            ticket,
            arrived: now,
            granted_at: None,
            ran: None,
        })));
        st.push(ticket, Arc::clone(&slot), now);
        drop(st);
        wakes.wake_all();
        Ok(if shadow {
            Enqueued::Shadow(
                ticket,
                ShadowHold::Queued(slot),
                ShadowDecision::Queue,
                displaced,
            )
        } else {
            Enqueued::Queued(slot, now, max_wait, displaced)
        })
    }

    /// Releases one permit: a CAS when nobody waits and no key is counted,
    /// else a locked hand-off.
    fn release(&self, ticket: Ticket) {
        if !self.locked.load(Ordering::Acquire) {
            let mut cur = self.word.load(Ordering::Acquire);
            while cur & WAITERS == 0 {
                match self.word.compare_exchange_weak(
                    cur,
                    cur - 1,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return,
                    Err(actual) => cur = actual,
                }
            }
        }
        let mut wakes = WakeList::new();
        let mut st = self.state.lock();
        self.release_locked(&mut st, ticket, &mut wakes);
        drop(st);
        wakes.wake_all();
    }

    fn release_locked(&self, st: &mut State, ticket: Ticket, wakes: &mut WakeList) {
        self.release_locked_at(st, ticket, None, wakes);
    }

    /// [`Self::release_locked`] at a given time (a virtual release that fell
    /// due earlier), or now.
    fn release_locked_at(
        &self,
        st: &mut State,
        ticket: Ticket,
        at: Option<Instant>,
        wakes: &mut WakeList,
    ) {
        // Atomic even under the lock: if WAITERS was cleared meanwhile, the
        // lock-free paths may be touching the count too. Never below zero:
        // a shadow-to-enforce switch may have recounted.
        let _ = self
            .word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w & COUNT > 0).then(|| w - 1)
            });
        st.count_key_released(ticket);
        if st.live > 0 {
            self.admit_waiters(st, at.unwrap_or_else(Instant::now), wakes);
        } else {
            // Nobody to hand the permit to: no clock read.
            self.settle(st);
        }
    }

    /// The real request behind a shadow-mode place ended: releases its
    /// virtual place as enforcement would have. Enforcement would have run
    /// the request only once it got a permit, for as long as it really ran:
    /// a virtual permit granted at `g` to a request that arrived at `a` and
    /// ran for `d` is released at `g + d`, and a virtual waiter whose request
    /// already ended stays queued until it is granted (then held for `d`),
    /// times out at `max_wait`, or is displaced.
    fn release_shadow(&self, ticket: Ticket, hold: ShadowHold) {
        let mut wakes = WakeList::new();
        let mut st = self.state.lock();
        let now = Instant::now();
        self.run_virtual(&mut st, now, &mut wakes);
        match hold {
            ShadowHold::Permit => self.release_locked_at(&mut st, ticket, Some(now), &mut wakes),
            ShadowHold::Queued(slot) => {
                let mut inner = slot.0.lock();
                let ran = now.saturating_duration_since(inner.arrived);
                match inner.state {
                    SlotState::Waiting => inner.ran = Some(ran),
                    SlotState::Granted => {
                        inner.state = SlotState::Done;
                        let due = inner.granted_at.unwrap_or(inner.arrived) + ran;
                        let ticket = inner.ticket;
                        drop(inner);
                        if due <= now {
                            self.release_locked_at(&mut st, ticket, Some(now), &mut wakes);
                        } else {
                            st.schedule_virtual_release(due, ticket);
                        }
                    }
                    // Shed or displaced virtually: it held nothing any more.
                    _ => {}
                }
            }
            ShadowHold::Nothing => {}
        }
        // A grant just made may be due at once (a request that ran for no
        // time): settle it now rather than at the next arrival.
        self.run_virtual(&mut st, now, &mut wakes);
        drop(st);
        wakes.wake_all();
    }

    /// Shadow mode: releases the virtual permits that fell due by `now`, in
    /// time order, each handing its permit on as of its own time.
    fn run_virtual(&self, st: &mut State, now: Instant, wakes: &mut WakeList) {
        while let Some(&Reverse((due, _, ticket))) = st.virtual_releases.peek() {
            if due > now {
                break;
            }
            st.virtual_releases.pop();
            self.release_locked_at(st, ticket, Some(due), wakes);
        }
    }

    /// Grants permits to waiters, highest class first, while thresholds allow.
    fn admit_waiters(&self, st: &mut State, now: Instant, wakes: &mut WakeList) {
        while st.live > 0 {
            let Some(c) = st.highest_waiting() else {
                break;
            };
            if self.word.load(Ordering::Acquire) & COUNT >= st.threshold(c) {
                break;
            }
            let Some((ticket, entry)) = self.pop_next(st, c, now, wakes) else {
                continue;
            };
            self.grant(st, ticket, entry, now, wakes);
        }
        self.settle(st);
    }

    fn grant(
        &self,
        st: &mut State,
        ticket: Ticket,
        entry: Entry,
        now: Instant,
        wakes: &mut WakeList,
    ) {
        // WAITERS is still set, so nothing else changes the count now.
        self.word.fetch_add(1, Ordering::AcqRel);
        st.count_key_granted(ticket);
        let mut inner = entry.slot.0.lock();
        if let Some(ran) = inner.ran {
            // Shadow mode, the real request already ended: enforcement
            // would have run it from now for as long as it really ran.
            inner.state = SlotState::Done;
            drop(inner);
            st.schedule_virtual_release(now + ran, ticket);
            return;
        }
        inner.granted_at = Some(now);
        drop(inner);
        entry.slot.finish(SlotState::Granted, wakes);
    }

    /// Removes the next live waiter of class `c` per fairness and discipline
    /// (not yet granted); CoDel sheds stale waiters first when LIFO is on.
    fn pop_next(
        &self,
        st: &mut State,
        c: usize,
        now: Instant,
        wakes: &mut WakeList,
    ) -> Option<(Ticket, Entry)> {
        let lifo = st.lifo_active(now);
        if lifo {
            self.shed_stale(st, now, wakes);
        }
        let shadow_wait = st.policy.shadow.then_some(st.limits.max_wait);
        loop {
            let key = st.next_key(c)?;
            let kq = st.classes[c].keys.get_mut(&key)?;
            let entry = if lifo {
                kq.entries.pop_back()
            } else {
                kq.entries.pop_front()
            };
            let Some(entry) = entry else {
                // Live count says otherwise: repair rather than spin.
                let live = kq.live;
                st.classes[c].keys.remove(&key);
                st.classes[c].live -= live;
                st.live -= live;
                continue;
            };
            if !entry.slot.is_waiting() {
                continue;
            }
            let ticket = Ticket { class: c, key };
            st.unqueue(ticket);
            // Shadow mode: a virtual waiter past max_wait would have left.
            if shadow_wait.is_some_and(|w| now.saturating_duration_since(entry.enqueued_at) > w) {
                entry.slot.finish(SlotState::Shed, wakes);
                continue;
            }
            return Some((ticket, entry));
        }
    }

    /// CoDel: rejects waiters at the old end of each queue that waited
    /// beyond the target, lowest class first.
    fn shed_stale(&self, st: &mut State, now: Instant, wakes: &mut WakeList) {
        let target = st.limits.codel_target;
        self.shed_older_than(st, now, target, wakes);
    }

    /// Rejects waiters at the old end of each queue that waited beyond
    /// `target`, lowest class first.
    fn shed_older_than(
        &self,
        st: &mut State,
        now: Instant,
        target: Duration,
        wakes: &mut WakeList,
    ) {
        let mut shed: Vec<(Ticket, Entry)> = Vec::new();
        for c in (0..st.classes.len()).rev() {
            for (&key, kq) in st.classes[c].keys.iter_mut() {
                while let Some(front) = kq.entries.front() {
                    let live = front.slot.is_waiting();
                    if live && now.saturating_duration_since(front.enqueued_at) <= target {
                        break;
                    }
                    if let Some(entry) = kq.entries.pop_front() {
                        if live {
                            shed.push((Ticket { class: c, key }, entry));
                        }
                    }
                }
            }
        }
        for (ticket, entry) in shed {
            st.unqueue(ticket);
            entry.slot.finish(SlotState::Shed, wakes);
        }
        self.settle(st);
    }

    /// Restores the invariants once the queue has no live waiter: FIFO mode,
    /// no dead slots kept, lock-free paths re-enabled.
    fn settle(&self, st: &mut State) {
        if st.live == 0 {
            st.standing_since = None;
            for class in &mut st.classes {
                // Clearing an empty table that once grew still rewrites
                // its control bytes: skip it on the uncontended path.
                if !class.keys.is_empty() {
                    class.keys.clear();
                }
                class.live = 0;
            }
            if self.word.load(Ordering::Acquire) & WAITERS != 0 {
                self.word.fetch_and(!WAITERS, Ordering::AcqRel);
            }
        }
    }

    /// A live waiter left on its own (cancelled or timed out).
    fn leave(&self, st: &mut State, ticket: Ticket) {
        st.unqueue(ticket);
        self.settle(st);
    }

    /// Queue slots (live and dead) and their capacity, to check that memory
    /// stays bounded.
    #[cfg(test)]
    fn queue_slots(&self) -> (usize, usize) {
        let st = self.state.lock();
        st.classes
            .iter()
            .flat_map(|c| c.keys.values())
            .fold((0, 0), |(l, c), kq| {
                (l + kq.entries.len(), c + kq.entries.capacity())
            })
    }
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("stats", &self.stats())
            .finish()
    }
}

/// A refusal, or in shadow mode a virtual one the caller goes on past.
fn refuse(shadow: bool, ticket: Ticket, why: Rejected) -> Result<Enqueued, Rejected> {
    if shadow {
        Ok(Enqueued::Shadow(
            ticket,
            ShadowHold::Nothing,
            ShadowDecision::Reject(why),
            None,
        ))
    } else {
        Err(why)
    }
}

/// The atomic word cannot count to `usize::MAX`; no real cap comes close.
fn clamp(mut limits: AdmissionLimits) -> AdmissionLimits {
    limits.max_in_flight = limits.max_in_flight.min(COUNT);
    limits
}

/// One to [`MAX_CLASSES`] classes, shares within [0, 1].
fn clamp_policy(mut policy: Policy) -> Policy {
    if policy.reserved.is_empty() {
        policy.reserved.push(0.0);
    }
    policy.reserved.truncate(MAX_CLASSES);
    for r in &mut policy.reserved {
        *r = r.clamp(0.0, 1.0);
    }
    policy
}

// === impl State ===

impl State {
    /// The queue has stood longer than `codel_interval` under `AdaptiveLifo`.
    fn lifo_active(&self, now: Instant) -> bool {
        self.limits.discipline == Discipline::AdaptiveLifo
            && self.standing_since.is_some_and(|since| {
                now.saturating_duration_since(since) > self.limits.codel_interval
            })
    }

    /// In-flight count below which class `c` is admitted: the limit minus
    /// the reserved shares of the classes above it, rounded down.
    fn threshold(&self, c: usize) -> usize {
        let limit = self.limits.max_in_flight;
        let above: f64 = self.policy.reserved.iter().take(c).sum();
        // The epsilon keeps 0.2 x 10 at 2 whatever the float rounding.
        let reserved = (limit as f64 * above + 1e-9).floor() as usize;
        limit.saturating_sub(reserved)
    }

    /// The ticket as queued: class clamped, key tracked or folded into the
    /// overflow key (fairness), or 0 (no fairness).
    fn intern(&mut self, mut ticket: Ticket) -> Ticket {
        ticket.class = ticket.class.min(self.classes.len() - 1);
        ticket.key = match self.policy.max_keys {
            None => 0,
            Some(max) if !self.keys.contains_key(&ticket.key) && self.keys.len() >= max => {
                OVERFLOW_KEY
            }
            Some(_) => ticket.key,
        };
        ticket
    }

    fn highest_waiting(&self) -> Option<usize> {
        self.classes.iter().position(|c| c.live > 0)
    }

    /// Fairness: the waiting key of class `c` holding the fewest permits
    /// (ties: the oldest waiter); without fairness the one key.
    fn next_key(&mut self, c: usize) -> Option<u64> {
        let class = &mut self.classes[c];
        let keys = &self.keys;
        let mut best: Option<(usize, Instant, u64)> = None;
        for (&key, kq) in class.keys.iter_mut() {
            if kq.live == 0 {
                continue;
            }
            // Dead entries at the front say nothing about age.
            while kq.entries.front().is_some_and(|e| !e.slot.is_waiting()) {
                kq.entries.pop_front();
            }
            let oldest = kq.entries.front().map_or(Instant::now(), |e| e.enqueued_at);
            let held = keys.get(&key).map_or(0, |k| k.in_flight);
            if best.is_none_or(|(h, o, _)| (held, oldest) < (h, o)) {
                best = Some((held, oldest, key));
            }
        }
        best.map(|(_, _, key)| key)
    }

    /// Queues a live entry.
    fn push(&mut self, ticket: Ticket, slot: Arc<Slot>, now: Instant) {
        let class = &mut self.classes[ticket.class];
        let kq = class.keys.entry(ticket.key).or_default();
        kq.entries.push_back(Entry {
            slot,
            enqueued_at: now,
        });
        kq.live += 1;
        class.live += 1;
        self.live += 1;
        self.peak = self.peak.max(self.live);
        if self.standing_since.is_none() {
            self.standing_since = Some(now);
        }
        if self.policy.max_keys.is_some() {
            self.keys.entry(ticket.key).or_default().waiting += 1;
        }
    }

    /// One live entry of `ticket`'s queue is gone (granted, shed, displaced
    /// or left): the counts follow, and an empty queue is dropped. Amortised
    /// O(1): a compaction pass over a queue happens only after about half of
    /// it has departed, and bounds it at `2 * live + slack`.
    fn unqueue(&mut self, ticket: Ticket) {
        let c = ticket.class.min(self.classes.len() - 1);
        let class = &mut self.classes[c];
        if let Some(kq) = class.keys.get_mut(&ticket.key) {
            kq.live = kq.live.saturating_sub(1);
            class.live = class.live.saturating_sub(1);
            self.live = self.live.saturating_sub(1);
            if kq.live == 0 {
                class.keys.remove(&ticket.key);
            } else if kq.entries.len() > 2 * kq.live + COMPACT_SLACK {
                kq.entries.retain(|entry| entry.slot.is_waiting());
            }
        }
        if let Some(k) = self.keys.get_mut(&ticket.key) {
            k.waiting = k.waiting.saturating_sub(1);
            if k.in_flight == 0 && k.waiting == 0 {
                self.keys.remove(&ticket.key);
            }
        }
    }

    /// Shadow mode: a virtual permit whose real request has ended, to be
    /// released at `due`.
    fn schedule_virtual_release(&mut self, due: Instant, ticket: Ticket) {
        self.virtual_seq += 1;
        self.virtual_releases
            .push(Reverse((due, self.virtual_seq, ticket)));
    }

    /// Fairness: a permit taken at once.
    fn count_key_admitted(&mut self, ticket: Ticket) {
        if self.policy.max_keys.is_some() {
            self.keys.entry(ticket.key).or_default().in_flight += 1;
        }
    }

    /// Fairness: a waiter granted (its waiting count went with `unqueue`).
    fn count_key_granted(&mut self, ticket: Ticket) {
        // `unqueue` may just have forgotten the key (nothing in flight, its
        // last waiter gone): it is tracked again while it holds this permit.
        if self.policy.max_keys.is_some() {
            self.keys.entry(ticket.key).or_default().in_flight += 1;
        }
    }

    /// Fairness: a permit released or a waiter gone; a key with nothing in
    /// flight or waiting is forgotten.
    fn count_key_released(&mut self, ticket: Ticket) {
        if let Some(k) = self.keys.get_mut(&ticket.key) {
            k.in_flight = k.in_flight.saturating_sub(1);
            if k.in_flight == 0 && k.waiting == 0 {
                self.keys.remove(&ticket.key);
            }
        }
    }

    /// A full queue makes room for `ticket`: the newest waiter of the lowest
    /// class below it, else (fairness) the newest waiter of the key with the
    /// most waiters in its class, if the arrival's key has fewer.
    fn displace(&mut self, ticket: Ticket, wakes: &mut WakeList) -> Option<Rejected> {
        let lower = (ticket.class + 1..self.classes.len())
            .rev()
            .find(|&c| self.classes[c].live > 0);
        let (class, key, reason) = match lower {
            Some(c) => {
                // The newest waiter across the class's keys.
                let key = self.classes[c]
                    .keys
                    .iter()
                    .filter(|(_, kq)| kq.live > 0)
                    .filter_map(|(&k, kq)| newest(kq).map(|at| (at, k)))
                    .max()
                    .map(|(_, k)| k)?;
                (c, key, Rejected::Priority)
            }
            None if self.policy.max_keys.is_some() => {
                let class = &self.classes[ticket.class];
                let mine = class.keys.get(&ticket.key).map_or(0, |kq| kq.live);
                let (most, key) = class.keys.iter().map(|(&k, kq)| (kq.live, k)).max()?;
                if mine + 1 > most || key == ticket.key {
                    return None;
                }
                (ticket.class, key, Rejected::FairShare)
            }
            None => return None,
        };
        let kq = self.classes[class].keys.get_mut(&key)?;
        while let Some(entry) = kq.entries.pop_back() {
            if entry.slot.is_waiting() {
                self.unqueue(Ticket { class, key });
                entry.slot.finish(SlotState::Displaced(reason), wakes);
                return Some(reason);
            }
        }
        None
    }

    /// Re-files every live waiter after the class count or fairness changed.
    fn rebucket(&mut self) {
        let n = self.policy.reserved.len();
        let fair = self.policy.max_keys.is_some();
        let old = std::mem::take(&mut self.classes);
        self.classes = (0..n).map(|_| ClassQueue::default()).collect();
        self.live = 0;
        let mut entries: Vec<(Ticket, Entry)> = Vec::new();
        for (c, class) in old.into_iter().enumerate() {
            for (key, kq) in class.keys {
                for e in kq.entries {
                    if e.slot.is_waiting() {
                        let t = Ticket {
                            class: c.min(n - 1),
                            key: if fair { key } else { 0 },
                        };
                        entries.push((t, e));
                    }
                }
            }
        }
        entries.sort_by_key(|(_, e)| e.enqueued_at);
        // `push` counts each waiter under its key again.
        for k in self.keys.values_mut() {
            k.waiting = 0;
        }
        let peak = self.peak;
        let standing = self.standing_since;
        for (t, e) in entries {
            e.slot.set_ticket(t);
            // `push` counts the waiter under its key again.
            self.push(t, e.slot, e.enqueued_at);
        }
        self.peak = peak.max(self.live);
        self.standing_since = standing.or(self.standing_since);
    }

    /// Finishes every live waiter with `state` (shadow to enforce).
    fn clear_queues(&mut self, state: SlotState, wakes: &mut WakeList) {
        for class in &mut self.classes {
            for kq in class.keys.values_mut() {
                for e in kq.entries.drain(..) {
                    if e.slot.is_waiting() {
                        e.slot.finish(state, wakes);
                    }
                }
            }
            class.keys.clear();
            class.live = 0;
        }
        self.live = 0;
        for k in self.keys.values_mut() {
            k.waiting = 0;
        }
        self.keys.retain(|_, k| k.in_flight > 0);
    }
}

/// When a key queue's newest live waiter arrived.
fn newest(kq: &KeyQueue) -> Option<Instant> {
    kq.entries
        .iter()
        .rev()
        .find(|e| e.slot.is_waiting())
        .map(|e| e.enqueued_at)
}

// === impl Slot ===

impl Slot {
    fn is_waiting(&self) -> bool {
        self.0.lock().state == SlotState::Waiting
    }

    fn ticket(&self) -> Ticket {
        self.0.lock().ticket
    }

    fn set_ticket(&self, ticket: Ticket) {
        self.0.lock().ticket = ticket;
    }

    /// Moves a waiting slot to `state` and queues its waker.
    fn finish(&self, state: SlotState, wakes: &mut WakeList) {
        let mut inner = self.0.lock();
        inner.state = state;
        if let Some(waker) = inner.waker.take() {
            wakes.push(waker);
        }
    }

    /// Marks the slot `Done`, returning what it was.
    fn take_state(&self) -> SlotState {
        std::mem::replace(&mut self.0.lock().state, SlotState::Done)
    }
}

// === impl Waiter ===

impl Waiter<'_> {
    /// Ready once the slot is granted, shed or displaced; registers the
    /// waker otherwise.
    fn poll_slot(&mut self, cx: &mut Context<'_>) -> Poll<Result<Ticket, Rejected>> {
        let mut inner = self.slot.0.lock();
        let outcome = match inner.state {
            SlotState::Waiting => {
                match &mut inner.waker {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    other => *other = Some(cx.waker().clone()),
                }
                return Poll::Pending;
            }
            SlotState::Granted => Ok(inner.ticket),
            SlotState::Displaced(why) => Err(why),
            SlotState::Shed | SlotState::Done => Err(Rejected::QueueTimeout),
        };
        inner.state = SlotState::Done;
        self.finished = true;
        Poll::Ready(outcome)
    }

    /// The wait timer fired. A grant that raced with it wins.
    fn expire(&mut self) -> Result<Ticket, Rejected> {
        self.finished = true;
        let mut st = self.admission.state.lock();
        match self.slot.take_state() {
            SlotState::Waiting => {
                self.admission.leave(&mut st, self.slot.ticket());
                Err(Rejected::QueueTimeout)
            }
            SlotState::Granted => Ok(self.slot.ticket()),
            SlotState::Displaced(why) => Err(why),
            SlotState::Shed | SlotState::Done => Err(Rejected::QueueTimeout),
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut wakes = WakeList::new();
        let mut st = self.admission.state.lock();
        match self.slot.take_state() {
            SlotState::Waiting => self.admission.leave(&mut st, self.slot.ticket()),
            // Granted but never observed: the permit is ours to pass on.
            SlotState::Granted => {
                self.admission
                    .release_locked(&mut st, self.slot.ticket(), &mut wakes)
            }
            SlotState::Shed | SlotState::Displaced(_) | SlotState::Done => {}
        }
        drop(st);
        wakes.wake_all();
    }
}

// === impl WakeList ===

impl WakeList {
    fn new() -> Self {
        Self {
            first: None,
            more: Vec::new(),
        }
    }

    fn push(&mut self, waker: Waker) {
        if self.first.is_none() {
            self.first = Some(waker);
        } else {
            self.more.push(waker);
        }
    }

    fn wake_all(&mut self) {
        // `more` fills only once `first` is taken.
        let Some(first) = self.first.take() else {
            return;
        };
        first.wake();
        if !self.more.is_empty() {
            for waker in self.more.drain(..) {
                waker.wake();
            }
        }
    }
}

impl Drop for WakeList {
    /// A safety net for early returns: wakers must never be lost.
    fn drop(&mut self) {
        self.wake_all();
    }
}

// === impl Admitted ===

impl fmt::Debug for Admitted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admitted")
            .field("waited", &self.waited)
            .field("displaced", &self.displaced)
            .field("shadow", &self.shadow)
            .finish_non_exhaustive()
    }
}

// === impl Permit ===

impl Drop for Permit {
    fn drop(&mut self) {
        let adm = &self.admission;
        adm.real_in_flight.fetch_sub(1, Ordering::AcqRel);
        if self.class_counted {
            let _ = adm.class_in_flight[self.ticket.class.min(MAX_CLASSES - 1)].fetch_update(
                Ordering::Relaxed,
                Ordering::Relaxed,
                |n| n.checked_sub(1),
            );
        }
        if self.epoch != adm.epoch() {
            // A shadow-to-enforce switch counted this request as enforced.
            let mut wakes = WakeList::new();
            let mut st = adm.state.lock();
            adm.release_locked(&mut st, self.ticket, &mut wakes);
            drop(st);
            wakes.wake_all();
            return;
        }
        match self.shadow.take() {
            Some(hold) => adm.release_shadow(self.ticket, hold),
            None => adm.release(self.ticket),
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("ticket", &self.ticket)
            .finish_non_exhaustive()
    }
}

// === impl GlobalLimit ===

impl GlobalLimit {
    /// A cap of `max` requests in flight process-wide.
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        })
    }

    /// Changes the cap; permits already held are kept.
    pub(crate) fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Release);
    }

    /// A permit if fewer than `max` are held, else `None` at once.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<GlobalPermit> {
        let max = self.max.load(Ordering::Acquire);
        let mut cur = self.in_flight.load(Ordering::Acquire);
        while cur < max {
            match self.in_flight.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Some(GlobalPermit {
                        limit: Arc::clone(self),
                    })
                }
                Err(actual) => cur = actual,
            }
        }
        None
    }

    /// Permits held now.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

impl fmt::Debug for GlobalLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GlobalLimit")
            .field("in_flight", &self.in_flight())
            .field("max", &self.max.load(Ordering::Relaxed))
            .finish()
    }
}

// === impl GlobalPermit ===

impl Drop for GlobalPermit {
    fn drop(&mut self) {
        self.limit.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl fmt::Debug for GlobalPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GlobalPermit").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::sync::atomic::AtomicBool;
    use tokio::time::advance;

    type AcquireFuture = Pin<Box<dyn Future<Output = Result<Admitted, Rejected>> + Send>>;

    fn limits(max_in_flight: usize, max_depth: usize, max_wait_ms: u64) -> AdmissionLimits {
        AdmissionLimits {
            max_in_flight,
            max_depth,
            max_wait: Duration::from_millis(max_wait_ms),
            discipline: Discipline::Fifo,
            codel_target: Duration::from_millis(5),
            codel_interval: Duration::from_millis(100),
        }
    }

    fn lifo(max_in_flight: usize, max_depth: usize) -> AdmissionLimits {
        AdmissionLimits {
            discipline: Discipline::AdaptiveLifo,
            ..limits(max_in_flight, max_depth, 10_000)
        }
    }

    /// An acquire future, polled by hand so the test controls every step.
    fn start(adm: &Arc<Admission>) -> AcquireFuture {
        let adm = Arc::clone(adm);
        Box::pin(async move { adm.acquire(None).await })
    }

    fn poll(fut: &mut AcquireFuture) -> Poll<Result<Admitted, Rejected>> {
        fut.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    }

    /// Starts an acquire that must queue.
    fn queued(adm: &Arc<Admission>) -> AcquireFuture {
        let mut fut = start(adm);
        assert!(poll(&mut fut).is_pending(), "expected to queue");
        fut
    }

    fn admitted(fut: &mut AcquireFuture) -> Admitted {
        match poll(fut) {
            Poll::Ready(Ok(admitted)) => admitted,
            other => panic!("expected admission, got {other:?}"),
        }
    }

    fn rejected(fut: &mut AcquireFuture) -> Rejected {
        match poll(fut) {
            Poll::Ready(Err(rejected)) => rejected,
            other => panic!("expected rejection, got {other:?}"),
        }
    }

    async fn now_admitted(adm: &Arc<Admission>) -> Admitted {
        adm.acquire(None).await.expect("admitted")
    }

    #[test]
    fn futures_and_permits_are_send() {
        fn send<T: Send>(_: &T) {}
        fn send_sync_static<T: Send + Sync + 'static>() {}
        send_sync_static::<Permit>();
        send_sync_static::<GlobalPermit>();
        send_sync_static::<Arc<Admission>>();
        let adm = Admission::new(limits(1, 1, 1));
        send(&adm.acquire(None));
    }

    #[tokio::test(start_paused = true)]
    async fn try_acquire_now_takes_only_a_free_permit_with_nobody_queued() {
        let adm = Admission::new(limits(1, 4, 60_000));
        let first = adm
            .try_acquire_now(Ticket::default())
            .expect("a free permit");
        assert_eq!(adm.in_flight(), 1);
        assert!(
            adm.try_acquire_now(Ticket::default()).is_none(),
            "cap reached"
        );
        // A waiter queues; the permit freed goes to it, not to a new caller.
        let waiting = queued_as(&adm, 0, 0);
        drop(first);
        assert!(
            adm.try_acquire_now(Ticket::default()).is_none(),
            "the waiter's permit"
        );
        let second = waiting.await.expect("the waiter is admitted");
        assert_eq!(adm.in_flight(), 1);
        drop(second);
        assert!(adm.try_acquire_now(Ticket::default()).is_some());
        // Shadow mode always judges through the queue, never at once.
        let shadow = Admission::with_policy(limits(2, 2, 10_000), policy(&[0.0], None, true));
        assert!(shadow.try_acquire_now(Ticket::default()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn cap_respected_under_many_concurrent_acquirers() {
        let adm = Admission::new(limits(4, 100, 60_000));
        let holders = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..100u64)
            .map(|i| {
                let (adm, holders, most) = (adm.clone(), holders.clone(), most.clone());
                tokio::spawn(async move {
                    let admitted = adm.acquire(None).await.expect("admitted");
                    let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    // Simulated work of varying length, in paused time.
                    tokio::time::sleep(Duration::from_millis(1 + i % 7)).await;
                    holders.fetch_sub(1, Ordering::SeqCst);
                    drop(admitted);
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        assert_eq!(most.load(Ordering::SeqCst), 4);
        let stats = adm.stats();
        assert_eq!((stats.in_flight, stats.queue_depth), (0, 0));
        assert_eq!(stats.queue_depth_peak, 96);
    }

    #[tokio::test(start_paused = true)]
    async fn fifo_order() {
        let adm = Admission::new(limits(1, 10, 10_000));
        let mut holder = now_admitted(&adm).await;
        let mut waiters: Vec<_> = (0..5).map(|_| queued(&adm)).collect();
        for i in 0..5 {
            drop(holder);
            for later in &mut waiters[i + 1..] {
                assert!(poll(later).is_pending(), "waiter after {i} jumped ahead");
            }
            holder = admitted(&mut waiters[i]);
            assert_eq!(adm.stats().queue_depth, 4 - i);
        }
        drop(holder);
        assert_eq!(adm.stats().in_flight, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn max_wait_expiry_is_queue_timeout() {
        let adm = Admission::new(limits(1, 10, 250));
        let _holder = now_admitted(&adm).await;
        let began = Instant::now();
        assert_eq!(adm.acquire(None).await.err(), Some(Rejected::QueueTimeout));
        assert_eq!(began.elapsed(), Duration::from_millis(250));
        let stats = adm.stats();
        assert_eq!((stats.in_flight, stats.queue_depth), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn waited_reports_queue_time() {
        let adm = Admission::new(limits(1, 10, 1_000));
        let holder = now_admitted(&adm).await;
        assert_eq!(holder.waited, Duration::ZERO);
        let releaser = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(40)).await;
            drop(holder);
        });
        let admitted = now_admitted(&adm).await;
        assert_eq!(admitted.waited, Duration::from_millis(40));
        releaser.await.expect("releaser");
    }

    #[tokio::test(start_paused = true)]
    async fn request_deadline_earlier_than_max_wait() {
        let adm = Admission::new(limits(1, 10, 1_000));
        let _holder = now_admitted(&adm).await;
        let began = Instant::now();
        let deadline = began + Duration::from_millis(100);
        assert_eq!(
            adm.acquire(Some(deadline)).await.err(),
            Some(Rejected::QueueTimeout)
        );
        assert_eq!(began.elapsed(), Duration::from_millis(100));
        // A deadline already past is refused without queueing.
        assert_eq!(
            adm.acquire(Some(began)).await.err(),
            Some(Rejected::QueueTimeout)
        );
        assert_eq!(adm.stats().queue_depth_peak, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_full_when_depth_reached() {
        let adm = Admission::new(limits(1, 2, 1_000));
        let _holder = now_admitted(&adm).await;
        let _a = queued(&adm);
        let _b = queued(&adm);
        assert_eq!(rejected(&mut start(&adm)), Rejected::QueueFull);
        assert_eq!(adm.stats().queue_depth, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn max_depth_zero_refuses_at_once() {
        let adm = Admission::new(limits(1, 0, 1_000));
        let holder = now_admitted(&adm).await;
        assert_eq!(rejected(&mut start(&adm)), Rejected::QueueFull);
        drop(holder);
        let _again = now_admitted(&adm).await;
        assert_eq!(adm.stats().queue_depth_peak, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_while_queued_leaks_nothing() {
        let adm = Admission::new(limits(1, 2, 1_000));
        let holder = now_admitted(&adm).await;
        let waiter = queued(&adm);
        assert_eq!(adm.stats().queue_depth, 1);
        drop(waiter);
        assert_eq!(adm.stats().queue_depth, 0);
        // The queue slot is free again: two more fit.
        let a = queued(&adm);
        let b = queued(&adm);
        drop((a, b));
        drop(holder);
        let stats = adm.stats();
        assert_eq!((stats.in_flight, stats.queue_depth), (0, 0));
        // And the permit slot too: the lock-free path is back and the cap holds.
        let _first = now_admitted(&adm).await;
        let _second = queued(&adm);
        assert_eq!(adm.stats().in_flight, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_after_grant_passes_the_permit_on() {
        let adm = Admission::new(limits(1, 10, 1_000));
        let holder = now_admitted(&adm).await;
        let granted = queued(&adm);
        let mut next = queued(&adm);
        drop(holder);
        // `granted` holds the permit now but never looks at it.
        assert!(poll(&mut next).is_pending());
        drop(granted);
        let admitted = admitted(&mut next);
        assert_eq!(adm.stats().in_flight, 1);
        drop(admitted);

        // With nobody behind it, the permit simply returns.
        let holder = now_admitted(&adm).await;
        let granted = queued(&adm);
        drop(holder);
        assert_eq!(adm.stats().in_flight, 1);
        drop(granted);
        let stats = adm.stats();
        assert_eq!((stats.in_flight, stats.queue_depth), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn grant_racing_the_timer_wins() {
        let adm = Admission::new(limits(1, 10, 100));
        let holder = now_admitted(&adm).await;
        let mut waiter = queued(&adm);
        advance(Duration::from_millis(100)).await;
        // Timer due and permit handed over before the waiter runs again.
        drop(holder);
        let admitted = admitted(&mut waiter);
        assert_eq!(admitted.waited, Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn resize_up_admits_waiters_at_once() {
        let adm = Admission::new(limits(1, 10, 1_000));
        let _holder = now_admitted(&adm).await;
        let mut waiters: Vec<_> = (0..3).map(|_| queued(&adm)).collect();
        adm.set_limits(limits(3, 10, 1_000));
        let _a = admitted(&mut waiters[0]);
        let _b = admitted(&mut waiters[1]);
        assert!(poll(&mut waiters[2]).is_pending());
        let stats = adm.stats();
        assert_eq!((stats.in_flight, stats.queue_depth), (3, 1));
        assert_eq!(stats.max_in_flight, 3);
        assert_eq!(adm.limits(), limits(3, 10, 1_000));
    }

    #[tokio::test(start_paused = true)]
    async fn resize_down_admits_no_one_until_below_new_cap() {
        let adm = Admission::new(limits(3, 10, 1_000));
        let mut held = vec![
            now_admitted(&adm).await,
            now_admitted(&adm).await,
            now_admitted(&adm).await,
        ];
        adm.set_limits(limits(1, 10, 1_000));
        assert_eq!(adm.stats().in_flight, 3, "no permit is revoked");
        let mut waiter = queued(&adm);
        held.pop();
        assert!(poll(&mut waiter).is_pending());
        held.pop();
        assert!(
            poll(&mut waiter).is_pending(),
            "in_flight 1 is not below cap 1"
        );
        held.pop();
        let admitted = admitted(&mut waiter);
        assert_eq!(adm.stats().in_flight, 1);
        drop(admitted);
        // Without a queue, the lock-free path obeys the new cap as well.
        let _one = now_admitted(&adm).await;
        let _two = queued(&adm);
    }

    #[tokio::test(start_paused = true)]
    async fn shrinking_the_queue_sheds_nobody() {
        let adm = Admission::new(limits(1, 3, 1_000));
        let mut holder = now_admitted(&adm).await;
        let mut waiters: Vec<_> = (0..3).map(|_| queued(&adm)).collect();
        adm.set_limits(limits(1, 1, 1_000));
        assert_eq!(adm.stats().queue_depth, 3);
        assert_eq!(rejected(&mut start(&adm)), Rejected::QueueFull);
        for waiter in &mut waiters {
            drop(holder);
            holder = admitted(waiter);
        }
        drop(holder);
        assert_eq!(adm.stats().queue_depth_peak, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_lifo_is_fifo_while_draining_fast() {
        let adm = Admission::new(lifo(1, 10));
        let mut holder = now_admitted(&adm).await;
        for _ in 0..20 {
            let mut first = queued(&adm);
            let mut second = queued(&adm);
            advance(Duration::from_millis(10)).await;
            drop(holder);
            holder = admitted(&mut first);
            assert!(poll(&mut second).is_pending());
            drop(holder);
            holder = admitted(&mut second);
            // The queue emptied, so the standing clock restarts.
            assert!(!adm.stats().lifo_active);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_lifo_switches_sheds_and_returns_to_fifo() {
        let adm = Admission::new(lifo(1, 10));
        let holder = now_admitted(&adm).await;
        let mut old = queued(&adm);
        advance(Duration::from_millis(100)).await;
        assert!(!adm.stats().lifo_active, "standing exactly the interval");
        advance(Duration::from_millis(1)).await;
        assert!(adm.stats().lifo_active);
        let mut mid = queued(&adm);
        let mut newest = queued(&adm);
        advance(Duration::from_millis(2)).await;

        // Overloaded: the stale waiter is shed, then the newest goes first.
        drop(holder);
        assert_eq!(rejected(&mut old), Rejected::QueueTimeout);
        let holder = admitted(&mut newest);
        assert_eq!(holder.waited, Duration::from_millis(2));
        assert!(poll(&mut mid).is_pending());
        assert!(adm.stats().lifo_active);

        drop(holder);
        let holder = admitted(&mut mid);
        assert!(!adm.stats().lifo_active, "queue emptied");

        // Back to FIFO.
        let mut first = queued(&adm);
        let mut second = queued(&adm);
        drop(holder);
        let _holder = admitted(&mut first);
        assert!(poll(&mut second).is_pending());
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_lifo_sheds_everyone_stale_and_returns_the_permit() {
        let adm = Admission::new(lifo(1, 10));
        let holder = now_admitted(&adm).await;
        let mut waiters: Vec<_> = (0..3).map(|_| queued(&adm)).collect();
        advance(Duration::from_millis(150)).await;
        drop(holder);
        for waiter in &mut waiters {
            assert_eq!(rejected(waiter), Rejected::QueueTimeout);
        }
        let stats = adm.stats();
        assert_eq!((stats.in_flight, stats.queue_depth), (0, 0));
        assert!(!stats.lifo_active);
        let _fast = now_admitted(&adm).await;
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_lifo_full_queue_sheds_stale_for_a_new_arrival() {
        let adm = Admission::new(lifo(1, 2));
        let _holder = now_admitted(&adm).await;
        let mut a = queued(&adm);
        let mut b = queued(&adm);
        advance(Duration::from_millis(101)).await;
        let _fresh = queued(&adm);
        assert_eq!(rejected(&mut a), Rejected::QueueTimeout);
        assert_eq!(rejected(&mut b), Rejected::QueueTimeout);
        assert_eq!(adm.stats().queue_depth, 1);
        // In FIFO mode a full queue refuses instead.
        let fifo = Admission::new(limits(1, 1, 10_000));
        let _holder = now_admitted(&fifo).await;
        let _waiting = queued(&fifo);
        advance(Duration::from_millis(500)).await;
        assert_eq!(rejected(&mut start(&fifo)), Rejected::QueueFull);
    }

    #[tokio::test(start_paused = true)]
    async fn peak_depth_is_kept() {
        let adm = Admission::new(limits(1, 10, 1_000));
        let _holder = now_admitted(&adm).await;
        let waiters: Vec<_> = (0..3).map(|_| queued(&adm)).collect();
        drop(waiters);
        let stats = adm.stats();
        assert_eq!((stats.queue_depth, stats.queue_depth_peak), (0, 3));
        let _one = queued(&adm);
        assert_eq!(adm.stats().queue_depth_peak, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn compaction_keeps_memory_bounded() {
        let depth = 8;
        let adm = Admission::new(limits(1, depth, 10_000));
        let mut holder = now_admitted(&adm).await;
        let mut keep: Vec<_> = (0..4).map(|_| queued(&adm)).collect();
        let bound = 2 * depth + COMPACT_SLACK;
        for _ in 0..10_000 {
            drop(queued(&adm));
            let (len, capacity) = adm.queue_slots();
            assert!(len <= bound, "deque grew to {len}");
            assert!(capacity <= 2 * bound, "capacity grew to {capacity}");
        }
        assert_eq!(adm.stats().queue_depth, 4);
        // The survivors are still served in order.
        for waiter in &mut keep {
            drop(holder);
            holder = admitted(waiter);
        }
        drop(holder);
        assert_eq!(adm.queue_slots().0, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn queued_waiter_is_woken() {
        let adm = Admission::new(limits(1, 10, 10_000));
        let holder = now_admitted(&adm).await;
        let done = Arc::new(AtomicBool::new(false));
        let task = {
            let (adm, done) = (adm.clone(), done.clone());
            tokio::spawn(async move {
                let admitted = adm.acquire(None).await;
                done.store(true, Ordering::SeqCst);
                admitted.map(|a| a.waited)
            })
        };
        while adm.stats().queue_depth == 0 {
            tokio::task::yield_now().await;
        }
        assert!(!done.load(Ordering::SeqCst));
        drop(holder);
        assert_eq!(task.await.expect("task"), Ok(Duration::ZERO));
    }

    #[test]
    fn global_limit() {
        let global = GlobalLimit::new(2);
        let a = global.try_acquire().expect("first");
        let b = global.try_acquire().expect("second");
        assert!(global.try_acquire().is_none());
        assert_eq!(global.in_flight(), 2);
        drop(a);
        let c = global.try_acquire().expect("freed");
        global.set_max(1);
        drop(b);
        assert!(global.try_acquire().is_none(), "1 in flight, cap 1");
        drop(c);
        let _d = global.try_acquire().expect("below the new cap");
        global.set_max(3);
        let _e = global.try_acquire().expect("raised");
        assert_eq!(global.in_flight(), 2);
    }

    /// Real threads and real time: hammers the lock-free/locked boundary with
    /// cancellations and checks that nothing leaks and the cap always holds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stress_with_cancellation_on_threads() {
        let adm = Admission::new(limits(2, 4, 50));
        let holders = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..6)
            .map(|t| {
                let (adm, holders) = (adm.clone(), holders.clone());
                tokio::spawn(async move {
                    for i in 0..2_000u32 {
                        tokio::select! {
                            admitted = adm.acquire(None) => {
                                if let Ok(admitted) = admitted {
                                    let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
                                    assert!(now <= 2, "{now} holders");
                                    if (i + t) % 3 == 0 {
                                        tokio::task::yield_now().await;
                                    }
                                    holders.fetch_sub(1, Ordering::SeqCst);
                                    drop(admitted);
                                }
                            }
                            () = tokio::task::yield_now(), if (i + t) % 5 == 0 => {}
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        let stats = adm.stats();
        assert_eq!((stats.in_flight, stats.queue_depth), (0, 0));
        assert_eq!(adm.word.load(Ordering::SeqCst), 0, "waiters bit cleared");
        assert!(stats.queue_depth_peak > 0, "the queue was exercised");
    }

    // === classes, keys, shadow ===

    fn policy(reserved: &[f64], max_keys: Option<usize>, shadow: bool) -> Policy {
        Policy {
            reserved: reserved.to_vec(),
            max_keys,
            shadow,
        }
    }

    fn start_as(adm: &Arc<Admission>, class: usize, key: u64) -> AcquireFuture {
        let adm = Arc::clone(adm);
        Box::pin(async move { adm.acquire_as(Ticket { class, key }, None).await })
    }

    fn queued_as(adm: &Arc<Admission>, class: usize, key: u64) -> AcquireFuture {
        let mut fut = start_as(adm, class, key);
        assert!(
            poll(&mut fut).is_pending(),
            "expected class {class} key {key} to queue"
        );
        fut
    }

    async fn now_as(adm: &Arc<Admission>, class: usize, key: u64) -> Admitted {
        adm.acquire_as(Ticket { class, key }, None)
            .await
            .expect("admitted")
    }

    /// One class counts nothing per class; a reload to three classes while
    /// such a permit is held counts only what was granted after it, so the
    /// early permit's release takes nothing from a later one's class.
    #[tokio::test(start_paused = true)]
    async fn class_counts_follow_the_classes_a_permit_was_granted_under() {
        let adm = Admission::with_policy(limits(10, 10, 10_000), policy(&[0.0], None, false));
        let early = now_as(&adm, 0, 0).await;
        assert!(!early.permit.class_counted);
        adm.set_policy(policy(&[0.2, 0.0, 0.0], None, false));
        let later = now_as(&adm, 0, 0).await;
        let other = now_as(&adm, 2, 0).await;
        assert_eq!(adm.stats().class_in_flight, vec![1, 0, 1]);
        drop(early);
        assert_eq!(adm.stats().class_in_flight, vec![1, 0, 1]);
        drop(later);
        drop(other);
        assert_eq!(adm.stats().class_in_flight, vec![0, 0, 0]);
        assert_eq!(adm.stats().in_flight, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn reserved_share_holds_exactly_at_the_boundary() {
        // Limit 10, 20% for class 0: classes 1 and 2 stop at 8 in flight.
        let adm = Admission::with_policy(
            limits(10, 10, 10_000),
            policy(&[0.2, 0.0, 0.0], None, false),
        );
        let mut held = Vec::new();
        for i in 0..8 {
            held.push(now_as(&adm, 1 + i % 2, 0).await);
        }
        let mut lower = queued_as(&adm, 1, 0);
        let mut lowest = queued_as(&adm, 2, 0);
        // Class 0 can still take the 9th and 10th.
        held.push(now_as(&adm, 0, 0).await);
        held.push(now_as(&adm, 0, 0).await);
        let mut top = queued_as(&adm, 0, 0);
        assert_eq!(adm.stats().in_flight, 10);
        assert_eq!(adm.stats().class_in_flight, vec![2, 4, 4]);
        // A freed permit goes to class 0 first, though it came last.
        drop(held.pop());
        let top_admitted = admitted(&mut top);
        assert!(poll(&mut lower).is_pending());
        // At 9 in flight class 1 is still over its threshold (8).
        drop(top_admitted);
        assert!(poll(&mut lower).is_pending());
        drop(held.pop());
        // 8 in flight: still at the class 1 threshold.
        assert!(poll(&mut lower).is_pending());
        drop(held.pop());
        let a = admitted(&mut lower);
        assert!(poll(&mut lowest).is_pending());
        drop(held.pop());
        let _b = admitted(&mut lowest);
        drop(a);
    }

    #[tokio::test(start_paused = true)]
    async fn a_higher_class_displaces_the_newest_lowest_waiter() {
        let adm =
            Admission::with_policy(limits(1, 3, 10_000), policy(&[0.0, 0.0, 0.0], None, false));
        let _holder = now_as(&adm, 1, 0).await;
        let mut old_low = queued_as(&adm, 2, 0);
        let mut new_low = queued_as(&adm, 2, 0);
        let mut mid = queued_as(&adm, 1, 0);
        // Full. A class-0 arrival displaces the newest class-2 waiter.
        let _top = queued_as(&adm, 0, 0);
        assert_eq!(rejected(&mut new_low), Rejected::Priority);
        assert!(poll(&mut old_low).is_pending());
        // A class-1 arrival displaces the remaining class-2 waiter.
        let _mid2 = queued_as(&adm, 1, 0);
        assert_eq!(rejected(&mut old_low), Rejected::Priority);
        // Nothing below class 1 waits now: another class-1 arrival is refused.
        assert_eq!(rejected(&mut start_as(&adm, 1, 0)), Rejected::QueueFull);
        // And a class-2 arrival never displaces anyone.
        assert_eq!(rejected(&mut start_as(&adm, 2, 0)), Rejected::QueueFull);
        assert!(poll(&mut mid).is_pending());
        assert_eq!(adm.stats().queue_depth, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_freed_permit_goes_to_the_key_holding_fewest() {
        let adm = Admission::with_policy(limits(4, 10, 10_000), policy(&[0.0], Some(16), false));
        // A key alone may use the whole limit.
        let mut a_held: Vec<_> = Vec::new();
        for _ in 0..3 {
            a_held.push(now_as(&adm, 0, 1).await);
        }
        let b_held = now_as(&adm, 0, 2).await;
        let mut a_wait = queued_as(&adm, 0, 1);
        let mut b_wait = queued_as(&adm, 0, 2);
        assert_eq!(adm.stats().keys, 2);
        // A holds 3, B holds 1: B's waiter goes first though it came later.
        drop(a_held.pop());
        let b2 = admitted(&mut b_wait);
        assert!(poll(&mut a_wait).is_pending());
        // A holds 2, B holds 2: A's is the only one left.
        drop(b_held);
        let _a3 = admitted(&mut a_wait);
        drop((a_held, b2));
        drop(_a3);
        let stats = adm.stats();
        assert_eq!((stats.in_flight, stats.queue_depth, stats.keys), (0, 0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_with_fewer_waiters_displaces_the_busiest_key() {
        let adm = Admission::with_policy(limits(1, 3, 10_000), policy(&[0.0], Some(16), false));
        let _holder = now_as(&adm, 0, 1).await;
        let mut a1 = queued_as(&adm, 0, 1);
        let mut a2 = queued_as(&adm, 0, 1);
        let mut a3 = queued_as(&adm, 0, 1);
        // Full of A. B has no waiter: it displaces A's newest.
        let mut b = queued_as(&adm, 0, 2);
        assert_eq!(rejected(&mut a3), Rejected::FairShare);
        // A again: A has the most waiters, so it gets queue_full.
        assert_eq!(rejected(&mut start_as(&adm, 0, 1)), Rejected::QueueFull);
        // B again: 1 waiter against A's 2 — displaces A's newest.
        let _b2 = queued_as(&adm, 0, 2);
        assert_eq!(rejected(&mut a2), Rejected::FairShare);
        // Now A 1, B 2: a third B is refused, C displaces B's newest.
        assert_eq!(rejected(&mut start_as(&adm, 0, 2)), Rejected::QueueFull);
        assert!(poll(&mut a1).is_pending());
        assert!(poll(&mut b).is_pending());
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_bounded_and_forgotten_when_idle() {
        let adm = Admission::with_policy(limits(8, 8, 10_000), policy(&[0.0], Some(2), false));
        let held: Vec<_> =
            futures_util::future::join_all((0..6u64).map(|k| now_as(&adm, 0, 100 + k))).await;
        // Two keys tracked, the rest share the overflow key.
        assert_eq!(adm.stats().keys, 3);
        assert!(held
            .iter()
            .skip(2)
            .all(|a| a.permit.ticket.key == OVERFLOW_KEY));
        drop(held);
        assert_eq!(adm.stats().keys, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn shadow_mode_lets_everyone_through_and_reports_what_would_have_happened() {
        let adm = Admission::with_policy(limits(2, 2, 10_000), policy(&[0.0], None, true));
        let mut held = Vec::new();
        let mut decisions = Vec::new();
        for _ in 0..6 {
            let a = now_as(&adm, 0, 0).await;
            decisions.push(a.shadow);
            held.push(a);
        }
        use ShadowDecision::*;
        assert_eq!(
            decisions,
            vec![
                Some(Admit),
                Some(Admit),
                Some(Queue),
                Some(Queue),
                Some(Reject(Rejected::QueueFull)),
                Some(Reject(Rejected::QueueFull)),
            ]
        );
        let stats = adm.stats();
        assert_eq!((stats.in_flight, stats.queue_depth), (6, 2));
        // A virtual permit freed: the oldest virtual waiter takes it, so a
        // new arrival would still have to queue.
        drop(held.remove(0));
        assert_eq!(adm.stats().queue_depth, 1);
        assert_eq!(now_as(&adm, 0, 0).await.shadow, Some(Queue));
        drop(held);
        let stats = adm.stats();
        assert_eq!((stats.in_flight, stats.queue_depth), (0, 0));
        assert_eq!(adm.word.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn shadow_mode_runs_a_virtual_waiter_after_its_wait_not_when_its_real_request_ends() {
        use ShadowDecision::*;
        let ms = Duration::from_millis;
        let adm = Admission::with_policy(limits(1, 4, 10_000), policy(&[0.0], None, true));
        // t = 0: A takes the only (virtual) permit; it really runs 10 ms.
        let a = now_as(&adm, 0, 0).await;
        assert_eq!(a.shadow, Some(Admit));
        // t = 1: B would have queued; it really runs 4 ms and ends at t = 5,
        // while enforcement would still have kept it waiting.
        tokio::time::advance(ms(1)).await;
        let b = now_as(&adm, 0, 0).await;
        assert_eq!(b.shadow, Some(Queue));
        tokio::time::advance(ms(4)).await;
        drop(b);
        assert_eq!(adm.stats().queue_depth, 1, "B still waits virtually");
        // t = 10: A ends; B would have run from here for its 4 ms.
        tokio::time::advance(ms(5)).await;
        drop(a);
        // t = 12: C finds B's virtual permit taken: it would have queued.
        tokio::time::advance(ms(2)).await;
        let c = now_as(&adm, 0, 0).await;
        assert_eq!(c.shadow, Some(Queue));
        // t = 15: B's virtual run ended at 14 and handed the permit to C.
        tokio::time::advance(ms(3)).await;
        let d = now_as(&adm, 0, 0).await;
        assert_eq!(d.shadow, Some(Queue), "C holds the virtual permit now");
        drop(c);
        drop(d);
        tokio::time::advance(ms(100)).await;
        let e = now_as(&adm, 0, 0).await;
        assert_eq!(e.shadow, Some(Admit), "everything virtual has run");
        drop(e);
        assert_eq!(adm.stats().in_flight, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn shadow_mode_virtual_waiters_leave_at_max_wait() {
        use ShadowDecision::*;
        let ms = Duration::from_millis;
        let adm = Admission::with_policy(limits(1, 1, 50), policy(&[0.0], None, true));
        let a = now_as(&adm, 0, 0).await;
        assert_eq!(a.shadow, Some(Admit));
        // B would have queued; its real request ends at once.
        let b = now_as(&adm, 0, 0).await;
        assert_eq!(b.shadow, Some(Queue));
        drop(b);
        tokio::time::advance(ms(10)).await;
        assert_eq!(
            now_as(&adm, 0, 0).await.shadow,
            Some(Reject(Rejected::QueueFull)),
            "B still holds the one virtual queue place"
        );
        // Past max_wait B would have given up: the place is free again.
        tokio::time::advance(ms(50)).await;
        assert_eq!(now_as(&adm, 0, 0).await.shadow, Some(Queue));
        drop(a);
    }

    #[tokio::test(start_paused = true)]
    async fn shadow_to_enforce_keeps_in_flight_and_queues_new_requests() {
        let adm = Admission::with_policy(limits(2, 4, 10_000), policy(&[0.0], None, true));
        let mut held: Vec<_> = Vec::new();
        for _ in 0..5 {
            held.push(now_as(&adm, 0, 0).await);
        }
        adm.set_policy(policy(&[0.0], None, false));
        assert_eq!(adm.stats().in_flight, 5);
        let mut next = queued(&adm);
        for _ in 0..3 {
            drop(held.pop());
            assert!(poll(&mut next).is_pending(), "admitted above the limit");
        }
        drop(held.pop());
        let a = admitted(&mut next);
        drop((a, held));
        let stats = adm.stats();
        assert_eq!((stats.in_flight, stats.queue_depth), (0, 0));
        assert_eq!(adm.word.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn enforce_to_shadow_lets_the_queue_through() {
        let adm = Admission::new(limits(1, 4, 10_000));
        let holder = now_admitted(&adm).await;
        let mut a = queued(&adm);
        let mut b = queued(&adm);
        adm.set_policy(policy(&[0.0], None, true));
        let a = admitted(&mut a);
        let b = admitted(&mut b);
        assert_eq!(adm.stats().in_flight, 3);
        drop((holder, a, b));
        assert_eq!(adm.stats().in_flight, 0);
        assert_eq!(adm.word.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn policy_changes_keep_waiters_in_place() {
        let adm = Admission::with_policy(
            limits(1, 8, 10_000),
            policy(&[0.0, 0.0, 0.0], Some(8), false),
        );
        let holder = now_as(&adm, 0, 1).await;
        let mut low = queued_as(&adm, 2, 1);
        advance(Duration::from_millis(1)).await;
        let mut high = queued_as(&adm, 0, 2);
        // Down to one class, no fairness: both stay queued, in arrival order.
        adm.set_policy(Policy::default());
        assert_eq!(adm.stats().queue_depth, 2);
        drop(holder);
        let first = admitted(&mut low);
        assert!(poll(&mut high).is_pending());
        drop(first);
        let _second = admitted(&mut high);
    }

    #[tokio::test(start_paused = true)]
    async fn a_displaced_waiter_does_not_lower_its_keys_permit_count() {
        // Regression: displacement used to count the displaced waiter as a
        // released permit of its key, so the busy key looked idle.
        let adm = Admission::with_policy(limits(2, 2, 10_000), policy(&[0.0], Some(16), false));
        let a1 = now_as(&adm, 0, 1).await;
        let _a1b = now_as(&adm, 0, 1).await;
        let mut a2 = queued_as(&adm, 0, 1);
        let mut a3 = queued_as(&adm, 0, 1);
        let mut b1 = queued_as(&adm, 0, 2);
        assert_eq!(rejected(&mut a3), Rejected::FairShare);
        drop(a1);
        let _b = admitted(&mut b1);
        assert!(poll(&mut a2).is_pending());
    }
}
