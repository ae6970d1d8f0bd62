//! Per-route admission control: a resizable concurrency cap with a bounded,
//! cancellation-safe wait queue, plus a process-wide cap ([`GlobalLimit`]).
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
//! # Discipline
//!
//! - `fifo`: first come, first served.
//! - `adaptive_lifo`: Facebook's adaptive LIFO with CoDel ("Fail at Scale",
//!   ACM Queue 2015; Wangle's `Codel`). While the queue drains quickly it is
//!   FIFO. Once the queue has been *standing* (non-empty without a break) for
//!   longer than `codel_interval` (default 100 ms), the route is overloaded
//!   and switches to LIFO: the newest waiter is served first, because it is the
//!   one whose client is most likely still waiting, and waiters are held to the
//!   short `codel_target` (default 5 ms) instead of `max_wait`. This is
//!   enforced when a permit is handed out: the waiters at the old end of the
//!   queue that have waited longer than `codel_target` are first rejected with
//!   `QueueTimeout`, and then the newest is admitted (if every waiter is stale,
//!   all are shed and the permit goes back to the pool). A new arrival that
//!   finds the queue full in this mode also sheds those stale waiters to make
//!   room before it would be refused. While no permit frees up, waiters still
//!   leave at `max_wait` or their deadline. The route returns to FIFO as soon
//!   as the queue is empty.
//!
//! # Resizing (hot reload)
//!
//! [`Admission::set_limits`] changes the limits in place. Raising
//! `max_in_flight` admits waiters at once; lowering it revokes no permit, and
//! admits no one until in-flight falls below the new cap. Lowering
//! `max_depth` sheds nobody already queued: only new arrivals see the new
//! bound. The queue's state (waiters, peak) survives the change.
//!
//! # Implementation
//!
//! One atomic word holds the in-flight count and a "waiters queued" bit. With
//! no waiter queued, acquire and release are a single compare-and-swap on that
//! word (no lock, no allocation). Once anyone is queued the bit forces every
//! acquire and release through a short `parking_lot` critical section, which
//! keeps hand-off strictly ordered. Each waiter owns a small shared slot (its
//! state and `Waker`); the queue is a `VecDeque` of slots. A waiter whose future
//! is dropped marks its slot dead and leaves it in place; dead slots are
//! skipped when popping and compacted away once they outnumber the live ones,
//! so the deque never holds more than `2 * depth + 16` slots. No lock is held
//! across `.await`, no task is spawned, and wakers are woken after the lock is
//! released.

use std::collections::VecDeque;
use std::fmt;
use std::future::{poll_fn, Future};
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
/// Dead slots tolerated beyond the live ones before the queue is compacted.
const COMPACT_SLACK: usize = 16;
/// Wakers collected under the lock before they must be woken inline.
const WAKE_BATCH: usize = 16;

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

/// The per-route admission controller, shared as `Arc<Admission>` and kept in
/// the registry so it survives a reload.
pub struct Admission {
    /// In-flight count (`COUNT` bits) and the `WAITERS` bit. Lock-free paths
    /// only change it while `WAITERS` is clear; with it set, only holders of
    /// `state` do, which is what makes hand-off race-free.
    word: AtomicUsize,
    /// Mirror of `limits.max_in_flight` for the lock-free acquire.
    cap: AtomicUsize,
    state: Mutex<State>,
}

/// Everything behind the lock.
struct State {
    limits: AdmissionLimits,
    /// Waiters in arrival order; may hold dead slots (cancelled or timed out).
    queue: VecDeque<Entry>,
    /// Live (still waiting) entries in `queue`: the queue depth.
    live: usize,
    /// Largest `live` ever seen.
    peak: usize,
    /// When the queue last went from empty to non-empty; `None` while empty.
    standing_since: Option<Instant>,
}

/// One queued request.
struct Entry {
    slot: Arc<Slot>,
    enqueued_at: Instant,
}

/// Shared between a queued future and the queue. Transitions out of
/// `Waiting` happen only under the `Admission` lock; the future's own poll
/// only moves `Granted`/`Shed` to `Done`.
struct Slot(Mutex<SlotInner>);

struct SlotInner {
    state: SlotState,
    waker: Option<Waker>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    /// In the queue, live.
    Waiting,
    /// Handed a permit (already counted in flight) that the future has not
    /// yet taken.
    Granted,
    /// Rejected by CoDel shedding.
    Shed,
    /// Finished: permit taken, rejection seen, or future gone (a dead entry).
    Done,
}

/// Outcome of the locked slow path of `acquire`.
enum Enqueued {
    Admitted,
    Queued(Arc<Slot>),
}

/// The queued part of an `acquire` future; its `Drop` is the cancellation path.
struct Waiter<'a> {
    admission: &'a Admission,
    slot: Arc<Slot>,
    finished: bool,
}

/// Wakers gathered under the lock and woken after it is released.
struct WakeList {
    wakers: [Option<Waker>; WAKE_BATCH],
    len: usize,
}

/// A successful admission.
pub struct Admitted {
    /// The slot; dropping it releases the slot to the next waiter.
    pub permit: Permit,
    /// Time spent queued; `Duration::ZERO` when admitted without queueing.
    pub waited: Duration,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// The queue already held `max_depth` waiters (or `max_depth` is 0).
    QueueFull,
    /// Waited `max_wait`, reached the request deadline, or was shed by CoDel.
    QueueTimeout,
}

/// One admitted request's slot. Dropping it releases the slot.
pub struct Permit {
    admission: Arc<Admission>,
}

/// A snapshot for `/status` and metrics.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct AdmissionStats {
    /// Permits held, including granted ones not yet picked up.
    pub in_flight: usize,
    /// Requests waiting now.
    pub queue_depth: usize,
    /// Largest queue depth since the controller was created.
    pub queue_depth_peak: usize,
    /// Current cap.
    pub max_in_flight: usize,
    /// Current queue bound.
    pub max_depth: usize,
    /// `AdaptiveLifo` is currently serving LIFO with CoDel shedding.
    pub lifo_active: bool,
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
    /// A controller with no request in flight.
    pub fn new(limits: AdmissionLimits) -> Arc<Self> {
        let limits = clamp(limits);
        Arc::new(Self {
            word: AtomicUsize::new(0),
            cap: AtomicUsize::new(limits.max_in_flight),
            state: Mutex::new(State {
                limits,
                queue: VecDeque::new(),
                live: 0,
                peak: 0,
                standing_since: None,
            }),
        })
    }

    /// Changes the limits in place (hot reload). Raising the cap admits
    /// waiters at once; no permit is revoked and no waiter is shed.
    pub(crate) fn set_limits(&self, limits: AdmissionLimits) {
        let limits = clamp(limits);
        let mut wakes = WakeList::new();
        let mut st = self.state.lock();
        st.limits = limits;
        self.cap.store(limits.max_in_flight, Ordering::Release);
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
        self.cap.store(max_in_flight, Ordering::Release);
        self.admit_waiters(&mut st, Instant::now(), &mut wakes);
        drop(st);
        wakes.wake_all();
    }

    /// Requests holding a permit now (one atomic load, no lock).
    pub(crate) fn in_flight(&self) -> usize {
        self.word.load(Ordering::Acquire) & COUNT
    }

    /// The limits in force.
    #[cfg(test)]
    pub(crate) fn limits(&self) -> AdmissionLimits {
        self.state.lock().limits
    }

    /// Waits for a permit. `deadline` is the request's overall deadline: the
    /// queue wait ends at `min(enqueue + max_wait, deadline)`. A free permit is
    /// granted even past the deadline (later stages enforce it); a request that
    /// would have to queue with no time left (deadline passed, or `max_wait`
    /// zero) gets `QueueTimeout` at once.
    ///
    /// Cancellation-safe: dropping the future leaves the queue, and a permit
    /// granted to it but not yet taken passes to the next waiter.
    pub async fn acquire(
        self: &Arc<Self>,
        deadline: Option<Instant>,
    ) -> Result<Admitted, Rejected> {
        if self.try_acquire_fast() {
            return Ok(self.admitted(Duration::ZERO));
        }
        let enqueued_at = Instant::now();
        let (slot, max_wait) = match self.enqueue(enqueued_at, deadline)? {
            (Enqueued::Admitted, _) => return Ok(self.admitted(Duration::ZERO)),
            (Enqueued::Queued(slot), max_wait) => (slot, max_wait),
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
        poll_fn(|cx| {
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
        Ok(self.admitted(enqueued_at.elapsed()))
    }

    /// A snapshot of the counters.
    pub(crate) fn stats(&self) -> AdmissionStats {
        let st = self.state.lock();
        AdmissionStats {
            in_flight: self.word.load(Ordering::Acquire) & COUNT,
            queue_depth: st.live,
            queue_depth_peak: st.peak,
            max_in_flight: st.limits.max_in_flight,
            max_depth: st.limits.max_depth,
            lifo_active: st.lifo_active(Instant::now()),
        }
    }

    fn admitted(self: &Arc<Self>, waited: Duration) -> Admitted {
        Admitted {
            permit: Permit {
                admission: Arc::clone(self),
            },
            waited,
        }
    }

    /// Takes a permit with one CAS when nobody is queued and one is free.
    fn try_acquire_fast(&self) -> bool {
        let cap = self.cap.load(Ordering::Acquire);
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

    /// Locked slow path: admit if a permit is free after all, else queue or
    /// refuse. Also returns the `max_wait` read under the same lock.
    fn enqueue(
        &self,
        now: Instant,
        deadline: Option<Instant>,
    ) -> Result<(Enqueued, Duration), Rejected> {
        let mut wakes = WakeList::new();
        let mut st = self.state.lock();
        let max_wait = st.limits.max_wait;
        let mut shed = false;
        let mut cur = self.word.load(Ordering::Acquire);
        loop {
            if cur & WAITERS == 0 && cur < st.limits.max_in_flight {
                match self
                    .word
                    .compare_exchange(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => return Ok((Enqueued::Admitted, max_wait)),
                    Err(actual) => {
                        cur = actual;
                        continue;
                    }
                }
            }
            if st.live >= st.limits.max_depth {
                // Overloaded: stale waiters are worth less than this fresh one.
                if !shed && st.lifo_active(now) {
                    shed = true;
                    self.shed_stale(&mut st, now, &mut wakes);
                    cur = self.word.load(Ordering::Acquire);
                    continue;
                }
                drop(st);
                wakes.wake_all();
                return Err(Rejected::QueueFull);
            }
            if max_wait.is_zero() || deadline.is_some_and(|d| d <= now) {
                drop(st);
                wakes.wake_all();
                return Err(Rejected::QueueTimeout);
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
        let slot = Arc::new(Slot(Mutex::new(SlotInner {
            state: SlotState::Waiting,
            waker: None,
        })));
        st.queue.push_back(Entry {
            slot: Arc::clone(&slot),
            enqueued_at: now,
        });
        st.live += 1;
        st.peak = st.peak.max(st.live);
        if st.standing_since.is_none() {
            st.standing_since = Some(now);
        }
        drop(st);
        wakes.wake_all();
        Ok((Enqueued::Queued(slot), max_wait))
    }

    /// Releases one permit: a CAS when nobody waits, else a locked hand-off.
    fn release(&self) {
        let mut cur = self.word.load(Ordering::Acquire);
        while cur & WAITERS == 0 {
            match self
                .word
                .compare_exchange_weak(cur, cur - 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
        let mut wakes = WakeList::new();
        let mut st = self.state.lock();
        self.release_locked(&mut st, &mut wakes);
        drop(st);
        wakes.wake_all();
    }

    fn release_locked(&self, st: &mut State, wakes: &mut WakeList) {
        // Atomic even under the lock: if WAITERS was cleared meanwhile, the
        // lock-free paths may be touching the count too.
        self.word.fetch_sub(1, Ordering::AcqRel);
        self.admit_waiters(st, Instant::now(), wakes);
    }

    /// Grants permits to waiters while the cap allows.
    fn admit_waiters(&self, st: &mut State, now: Instant, wakes: &mut WakeList) {
        while st.live > 0 && self.word.load(Ordering::Acquire) & COUNT < st.limits.max_in_flight {
            let Some(entry) = self.pop_next(st, now, wakes) else {
                break;
            };
            st.live -= 1;
            // WAITERS is still set, so nothing else changes the count now.
            self.word.fetch_add(1, Ordering::AcqRel);
            entry.slot.finish(SlotState::Granted, wakes);
        }
        self.settle(st);
    }

    /// Removes the next live waiter per the discipline (not yet granted).
    fn pop_next(&self, st: &mut State, now: Instant, wakes: &mut WakeList) -> Option<Entry> {
        if st.lifo_active(now) {
            self.shed_stale(st, now, wakes);
            while let Some(entry) = st.queue.pop_back() {
                if entry.slot.is_waiting() {
                    return Some(entry);
                }
            }
        } else {
            while let Some(entry) = st.queue.pop_front() {
                if entry.slot.is_waiting() {
                    return Some(entry);
                }
            }
        }
        None
    }

    /// CoDel: rejects waiters at the old end that waited beyond the target.
    fn shed_stale(&self, st: &mut State, now: Instant, wakes: &mut WakeList) {
        let target = st.limits.codel_target;
        while let Some(front) = st.queue.front() {
            let live = front.slot.is_waiting();
            if live && now.saturating_duration_since(front.enqueued_at) <= target {
                break;
            }
            if let Some(entry) = st.queue.pop_front() {
                if live {
                    st.live -= 1;
                    entry.slot.finish(SlotState::Shed, wakes);
                }
            }
        }
        self.settle(st);
    }

    /// Restores the invariants once the queue has no live waiter: FIFO mode,
    /// no dead slots kept, lock-free paths re-enabled.
    fn settle(&self, st: &mut State) {
        if st.live == 0 {
            st.standing_since = None;
            st.queue.clear();
            if self.word.load(Ordering::Acquire) & WAITERS != 0 {
                self.word.fetch_and(!WAITERS, Ordering::AcqRel);
            }
        }
    }

    /// A live waiter left on its own (cancelled or timed out).
    fn leave(&self, st: &mut State) {
        st.live -= 1;
        // Amortised O(1): a pass over `len` slots happens only after about
        // `len / 2` departures, and bounds the deque at `2 * live + slack`.
        if st.queue.len() > 2 * st.live + COMPACT_SLACK {
            st.queue.retain(|entry| entry.slot.is_waiting());
        }
        self.settle(st);
    }

    /// Deque length and capacity, to check that memory stays bounded.
    #[cfg(test)]
    fn queue_slots(&self) -> (usize, usize) {
        let st = self.state.lock();
        (st.queue.len(), st.queue.capacity())
    }
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("stats", &self.stats())
            .finish()
    }
}

/// The atomic word cannot count to `usize::MAX`; no real cap comes close.
fn clamp(mut limits: AdmissionLimits) -> AdmissionLimits {
    limits.max_in_flight = limits.max_in_flight.min(COUNT);
    limits
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
}

// === impl Slot ===

impl Slot {
    fn is_waiting(&self) -> bool {
        self.0.lock().state == SlotState::Waiting
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
    /// Ready once the slot is granted or shed; registers the waker otherwise.
    fn poll_slot(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Rejected>> {
        let mut inner = self.slot.0.lock();
        let outcome = match inner.state {
            SlotState::Waiting => {
                match &mut inner.waker {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    other => *other = Some(cx.waker().clone()),
                }
                return Poll::Pending;
            }
            SlotState::Granted => Ok(()),
            SlotState::Shed | SlotState::Done => Err(Rejected::QueueTimeout),
        };
        inner.state = SlotState::Done;
        self.finished = true;
        Poll::Ready(outcome)
    }

    /// The wait timer fired. A grant that raced with it wins.
    fn expire(&mut self) -> Result<(), Rejected> {
        self.finished = true;
        let mut st = self.admission.state.lock();
        match self.slot.take_state() {
            SlotState::Waiting => {
                self.admission.leave(&mut st);
                Err(Rejected::QueueTimeout)
            }
            SlotState::Granted => Ok(()),
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
            SlotState::Waiting => self.admission.leave(&mut st),
            // Granted but never observed: the permit is ours to pass on.
            SlotState::Granted => self.admission.release_locked(&mut st, &mut wakes),
            SlotState::Shed | SlotState::Done => {}
        }
        drop(st);
        wakes.wake_all();
    }
}

// === impl WakeList ===

impl WakeList {
    fn new() -> Self {
        Self {
            wakers: std::array::from_fn(|_| None),
            len: 0,
        }
    }

    fn push(&mut self, waker: Waker) {
        if self.len == WAKE_BATCH {
            // Only a large CoDel shed gets here; waking under the lock is
            // correct, just less polite.
            self.wake_all();
        }
        self.wakers[self.len] = Some(waker);
        self.len += 1;
    }

    fn wake_all(&mut self) {
        for waker in self.wakers[..self.len].iter_mut() {
            if let Some(waker) = waker.take() {
                waker.wake();
            }
        }
        self.len = 0;
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
            .finish_non_exhaustive()
    }
}

// === impl Permit ===

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release();
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit").finish_non_exhaustive()
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
}
