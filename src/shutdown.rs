//! Drain signal, readiness latch and connection tracking.
//!
//! Phases: `Running` -> `Draining` (SIGTERM: /ready is 503, traffic still
//! served for `drain.grace`, so endpoints can be updated) -> `Stopping` (stop
//! accepting, ask connections to close: `Connection: close`, GOAWAY; wait up
//! to `drain.timeout` for in-flight requests) -> `Stopped`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Waker;

use parking_lot::Mutex;
use tokio::sync::{watch, Notify};

/// Where the process is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    Running = 0,
    Draining = 1,
    Stopping = 2,
    Stopped = 3,
}

/// The shared drain signal.
pub(crate) struct Shutdown {
    phase: AtomicU8,
    tx: watch::Sender<Phase>,
    /// Connection tasks woken at every phase change. A connection registers
    /// its task's waker once and then reads [`Shutdown::phase`] on each poll:
    /// far cheaper per request than polling a channel future.
    wakers: Mutex<HashMap<u64, Waker>>,
    next_waker: AtomicU64,
}

/// Keeps a waker registered with [`Shutdown`]; unregisters on drop.
pub(crate) struct PhaseWaker {
    shutdown: Arc<Shutdown>,
    id: u64,
}

impl Drop for PhaseWaker {
    fn drop(&mut self) {
        self.shutdown.wakers.lock().remove(&self.id);
    }
}

impl Shutdown {
    /// Starts in `Running`, with no wakers registered.
    pub(crate) fn new() -> Arc<Self> {
        let (tx, _) = watch::channel(Phase::Running);
        Arc::new(Shutdown {
            phase: AtomicU8::new(0),
            tx,
            wakers: Mutex::new(HashMap::new()),
            next_waker: AtomicU64::new(0),
        })
    }

    /// Cheap check for the data path.
    pub(crate) fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Running,
            1 => Phase::Draining,
            2 => Phase::Stopping,
            _ => Phase::Stopped,
        }
    }

    /// Moves forward (never back).
    pub(crate) fn advance(&self, to: Phase) {
        let prev = self.phase.fetch_max(to as u8, Ordering::AcqRel);
        if prev < to as u8 {
            self.tx.send_replace(to);
            for w in self.wakers.lock().values() {
                w.wake_by_ref();
            }
        }
    }

    /// Wakes `waker` at every phase change from now on. The caller reads
    /// [`Shutdown::phase`] after registering, so no change can be missed.
    pub(crate) fn register(self: &Arc<Self>, waker: &Waker) -> PhaseWaker {
        let id = self.next_waker.fetch_add(1, Ordering::Relaxed);
        self.wakers.lock().insert(id, waker.clone());
        PhaseWaker {
            shutdown: self.clone(),
            id,
        }
    }

    /// Resolves once the phase is at least `at`.
    pub(crate) async fn reached(&self, at: Phase) {
        let mut rx = self.tx.subscribe();
        // Err only if the sender is gone, which cannot happen while `self` lives.
        let _ = rx.wait_for(|p| *p >= at).await;
    }
}

/// Counts live connections (or other tracked work) and wakes when none is left.
#[derive(Default)]
pub(crate) struct Tracker {
    count: AtomicUsize,
    zero: Notify,
}

/// Held by one tracked connection.
pub(crate) struct Tracked(Arc<Tracker>);

impl Tracker {
    /// Counts one more live connection until the returned guard is dropped.
    pub(crate) fn track(self: &Arc<Self>) -> Tracked {
        self.count.fetch_add(1, Ordering::AcqRel);
        Tracked(self.clone())
    }

    /// Live connections (or other tracked work) right now.
    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Resolves when the count is zero.
    pub(crate) async fn idle(&self) {
        loop {
            let notified = self.zero.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.zero.notify_waiters();
        }
    }
}
