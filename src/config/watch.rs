//! Watching files for content changes: the config file and the listeners'
//! TLS certificate, key and client CA files.
//!
//! notify watches each file's *directory*, never the file itself: a watch on
//! a file follows its inode, and Kubernetes replaces a ConfigMap by swapping
//! a `..data` symlink (Envoy issue #3928 shows file watches miss it), editors
//! rename a new file over the old one, and tools delete and re-create. A
//! directory watch sees all of those. Every directory that decides what the
//! path resolves to is watched: the one holding each symlink met while
//! resolving it, and the one holding the final file; the set is recomputed
//! after every change, so the new `..2026_…` folder of a ConfigMap is
//! watched once `..data` points at it. Events for the other entries of
//! those directories (a log written next to the config) are dropped on
//! notify's thread: only one naming a symlink on the way, the file itself
//! or a watched directory starts a look.
//!
//! An event only means "look again": after a debounce the files are hashed
//! ([`content_hash`], reading through any symlink chain) and only a changed
//! hash is reported. Touches, our own reads, and a delete (until the file is
//! re-created with new content) are therefore ignored. If notify cannot be
//! set up, or reports an error, the watch falls back to hashing every second
//! and says so once. All file I/O runs on the blocking pool, never on an
//! async worker.

use std::collections::{BTreeSet, VecDeque};
use std::ffi::OsString;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use super::content_hash;

/// How often files are hashed when notify is unavailable.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// A stream of events may stretch one debounce window to this many
/// debounces, so a file that is written continuously is still looked at.
const MAX_STRETCH: u32 = 5;
/// Symlinks followed while resolving one path (Linux's own limit is 40).
const MAX_HOPS: usize = 40;
/// Only this many leading bytes are hashed (configs and certificates are KiBs).
const MAX_HASH_BYTES: u64 = 64 << 20;

/// Watches files for content changes; see the module docs. Dropping it stops
/// its task (and with it notify's thread).
pub(crate) struct FileWatch {
    changes: mpsc::Receiver<()>,
    task: JoinHandle<()>,
    /// Times the files were hashed and compared (tests wait on it).
    checks: Arc<AtomicU64>,
}

/// How the task learns that something may have changed.
enum Source {
    Notify(Native),
    Poll,
}

/// A notify watcher on the directories of the watched files.
struct Native {
    watcher: RecommendedWatcher,
    /// Directories currently watched.
    watched: BTreeSet<PathBuf>,
    /// The paths whose events can change what the files resolve to or hold
    /// (each symlink met, each file, the watched directories themselves);
    /// notify's thread drops events for anything else in those directories.
    relevant: Arc<Mutex<BTreeSet<PathBuf>>>,
    /// One token per burst of relevant events (capacity 1: a pending token
    /// already means "look again").
    events: mpsc::Receiver<()>,
    /// The first error notify reported, if any.
    error: Arc<Mutex<Option<String>>>,
}

/// Last seen content hash of each file.
struct Hashes {
    files: Arc<[PathBuf]>,
    /// `None`: never read (missing, or not yet looked at).
    last: Vec<Option<String>>,
    /// Whether the file was missing at the last look (logged once per absence).
    missing: Vec<bool>,
    checks: Arc<AtomicU64>,
}

// === impl FileWatch ===

impl FileWatch {
    /// Watches `paths`, reporting content changes after `debounce`. Cannot
    /// fail: without notify it polls. Must be called within a tokio runtime.
    // The config watch knows its baseline; TLS certificate rotation will use this.
    /// Every file's baseline starts unknown: the first look takes it as it is.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn spawn(paths: Vec<PathBuf>, debounce: Duration) -> FileWatch {
        let unknown = vec![None; paths.len()];
        Self::start(paths, debounce, unknown, true)
    }

    /// Like [`FileWatch::spawn`], but compares against known hashes (`None`:
    /// unknown, take the file as it is now). If a file already differs from
    /// its known hash, that is reported at once: e.g. a config edited between
    /// loading it and starting the watch.
    pub(crate) fn spawn_with_baseline(
        paths: Vec<PathBuf>,
        debounce: Duration,
        baseline: Vec<Option<String>>,
    ) -> FileWatch {
        Self::start(paths, debounce, baseline, true)
    }

    /// Resolves when any watched file's content changed (after debounce);
    /// `None` once the watch stopped. Changes that happen while nobody is
    /// waiting are coalesced into one.
    pub(crate) async fn changed(&mut self) -> Option<()> {
        self.changes.recv().await
    }

    /// How many times the files have been hashed and compared.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn checks(&self) -> u64 {
        self.checks.load(Ordering::Acquire)
    }

    fn start(
        paths: Vec<PathBuf>,
        debounce: Duration,
        mut baseline: Vec<Option<String>>,
        use_notify: bool,
    ) -> FileWatch {
        baseline.resize(paths.len(), None);
        let (tx, changes) = mpsc::channel(1);
        let checks = Arc::new(AtomicU64::new(0));
        let files: Arc<[PathBuf]> = paths.into();
        let span = tracing::info_span!("file_watch", files = ?files);
        let hashes = Hashes {
            missing: vec![false; files.len()],
            files,
            last: baseline,
            checks: checks.clone(),
        };
        let task = tokio::spawn(run(hashes, debounce, use_notify, tx).instrument(span));
        FileWatch {
            changes,
            task,
            checks,
        }
    }
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The watch loop: wait for a hint (event burst or poll tick), re-resolve
/// the directories, hash, report a change.
async fn run(mut hashes: Hashes, debounce: Duration, use_notify: bool, out: mpsc::Sender<()>) {
    let mut source = if use_notify {
        match Native::start(hashes.files.clone()).await {
            Ok(n) => Source::Notify(n),
            Err(e) => {
                fall_back(&e);
                Source::Poll
            }
        }
    } else {
        Source::Poll
    };
    // The first look only fills in unknown hashes, but reports a file that
    // already differs from a known one.
    let mut changed = hashes.check(true).await;
    loop {
        if changed {
            match out.try_send(()) {
                // Full: a change is already waiting to be picked up.
                Ok(()) | Err(mpsc::error::TrySendError::Full(())) => {}
                Err(mpsc::error::TrySendError::Closed(())) => return,
            }
        }
        source = match source {
            Source::Notify(mut n) => match n.next_burst(debounce, &out).await {
                Burst::Closed => return,
                Burst::Error(e) => {
                    fall_back(&e);
                    Source::Poll
                }
                Burst::Settled => match n.resync(hashes.files.clone()).await {
                    Ok(n) => Source::Notify(n),
                    Err(e) => {
                        fall_back(&e);
                        Source::Poll
                    }
                },
            },
            Source::Poll => {
                tokio::select! {
                    () = tokio::time::sleep(POLL_INTERVAL) => {}
                    () = out.closed() => return,
                }
                Source::Poll
            }
        };
        changed = hashes.check(false).await;
    }
}

fn fall_back(reason: &str) {
    tracing::warn!(
        reason,
        interval = ?POLL_INTERVAL,
        "file watching unavailable; polling the files' content hash instead"
    );
}

/// How a wait for events ended.
enum Burst {
    /// Events came and then stopped for a debounce (or the window was stretched to its limit).
    Settled,
    /// notify reported an error (or its thread went away).
    Error(String),
    /// Nobody listens for changes any more.
    Closed,
}

// === impl Native ===

impl Native {
    /// Creates the notify watcher and watches the files' directories
    /// (blocking work: inotify syscalls and a round trip to notify's thread).
    async fn start(files: Arc<[PathBuf]>) -> Result<Native, String> {
        let (tx, events) = mpsc::channel(1);
        let error = Arc::new(Mutex::new(None));
        let seen_error = error.clone();
        let relevant = Arc::new(Mutex::new(BTreeSet::new()));
        let wanted = relevant.clone();
        // Runs on notify's own thread.
        let handler = move |res: notify::Result<Event>| match res {
            Ok(ev) if is_noise(&ev.kind) => {}
            Ok(ev) if !concerns(&ev, &wanted.lock()) => {}
            Ok(_) => {
                let _ = tx.try_send(());
            }
            Err(e) => {
                seen_error.lock().get_or_insert_with(|| e.to_string());
                let _ = tx.try_send(());
            }
        };
        let setup = tokio::task::spawn_blocking(move || {
            let watcher = notify::recommended_watcher(handler)
                .map_err(|e| format!("cannot create a notify watcher: {e}"))?;
            let mut native = Native {
                watcher,
                watched: BTreeSet::new(),
                relevant,
                events,
                error,
            };
            native.sync(&files)?;
            Ok(native)
        });
        match setup.await {
            Ok(res) => res,
            Err(e) => Err(format!("watch setup task failed: {e}")),
        }
    }

    /// Waits for a burst of events, then until none came for `debounce`.
    async fn next_burst(&mut self, debounce: Duration, out: &mpsc::Sender<()>) -> Burst {
        tokio::select! {
            ev = self.events.recv() => if ev.is_none() {
                return Burst::Error("notify's event thread stopped".into());
            },
            () = out.closed() => return Burst::Closed,
        }
        let start = Instant::now();
        let limit = start + debounce * MAX_STRETCH;
        let mut settle = start + debounce;
        loop {
            if let Some(e) = self.error.lock().take() {
                return Burst::Error(e);
            }
            tokio::select! {
                ev = self.events.recv() => match ev {
                    Some(()) => settle = (Instant::now() + debounce).min(limit),
                    None => return Burst::Error("notify's event thread stopped".into()),
                },
                () = tokio::time::sleep_until(settle) => return Burst::Settled,
            }
        }
    }

    /// Re-resolves the files and watches the directories that now matter
    /// (a ConfigMap's new `..2026_…` folder), on the blocking pool.
    async fn resync(self, files: Arc<[PathBuf]>) -> Result<Native, String> {
        let res = tokio::task::spawn_blocking(move || {
            let mut me = self;
            me.sync(&files).map(|()| me)
        })
        .await;
        match res {
            Ok(r) => r,
            Err(e) => Err(format!("watch update task failed: {e}")),
        }
    }

    /// Watches exactly the directories `files` depend on. Blocking.
    fn sync(&mut self, files: &[PathBuf]) -> Result<(), String> {
        let mut wanted = BTreeSet::new();
        let mut relevant = BTreeSet::new();
        for f in files {
            let chain = resolve(f);
            wanted.extend(chain.dirs);
            relevant.extend(chain.entries);
        }
        relevant.extend(wanted.iter().cloned());
        // Before the watches change, so no event of a new one is dropped.
        *self.relevant.lock() = relevant;
        for gone in self.watched.difference(&wanted) {
            // Already gone when the directory was deleted: nothing to undo.
            let _ = self.watcher.unwatch(gone);
        }
        let mut watched = BTreeSet::new();
        for dir in wanted {
            // Re-adding a watched directory is harmless and repairs a watch
            // notify dropped because the directory was deleted and re-created.
            match self.watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(dir);
                }
                Err(e) if matches!(e.kind, notify::ErrorKind::PathNotFound) => {
                    tracing::debug!(dir = %dir.display(), "not there (yet); not watched");
                }
                Err(e) => return Err(format!("cannot watch {}: {e}", dir.display())),
            }
        }
        if watched.is_empty() {
            return Err("none of the watched files' directories exists".into());
        }
        self.watched = watched;
        Ok(())
    }
}

/// Events that cannot change content: opens and reads (including our own
/// hashing, which would otherwise wake us forever).
fn is_noise(kind: &EventKind) -> bool {
    matches!(kind, EventKind::Access(a) if *a != AccessKind::Close(AccessMode::Write))
}

/// Whether an event can matter: it names one of the `relevant` paths, or
/// names none (notify lost events and asks for a rescan, or cannot say).
fn concerns(ev: &Event, relevant: &BTreeSet<PathBuf>) -> bool {
    ev.need_rescan() || ev.paths.is_empty() || ev.paths.iter().any(|p| relevant.contains(p))
}

/// What `file` resolves through; see [`resolve`].
struct Chain {
    /// The directories whose entries decide what the file resolves to: the
    /// one holding each symlink met, then the one holding the file.
    dirs: Vec<PathBuf>,
    /// Each symlink met, then the file.
    entries: Vec<PathBuf>,
}

/// Follows `file`'s symlinks as the kernel would (up to [`MAX_HOPS`]). For a
/// ConfigMap mount `dir/f -> ..data/f`, `..data -> ..2026_x` the directories
/// are `dir` and `dir/..2026_x`, the entries `dir/f`, `dir/..data` and
/// `dir/..2026_x/f`. Paths come out absolute and resolved.
fn resolve(file: &Path) -> Chain {
    enum Part {
        Root,
        Up,
        Name(OsString),
    }
    fn parts(p: &Path) -> impl DoubleEndedIterator<Item = Part> + '_ {
        p.components().filter_map(|c| match c {
            Component::RootDir => Some(Part::Root),
            Component::ParentDir => Some(Part::Up),
            Component::Normal(n) => Some(Part::Name(n.to_owned())),
            Component::CurDir | Component::Prefix(_) => None,
        })
    }
    let root = PathBuf::from(std::path::MAIN_SEPARATOR_STR);
    let abs = if file.is_absolute() {
        file.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(file))
            .unwrap_or_else(|_| file.to_path_buf())
    };
    let mut dirs = Vec::new();
    let mut entries = Vec::new();
    let mut todo: VecDeque<Part> = parts(&abs).collect();
    let mut at = root.clone();
    let mut hops = 0;
    while let Some(part) = todo.pop_front() {
        match part {
            Part::Root => at.clone_from(&root),
            Part::Up => {
                at.pop();
            }
            Part::Name(name) => {
                let next = at.join(&name);
                let is_link = std::fs::symlink_metadata(&next)
                    .map(|m| m.file_type().is_symlink())
                    .unwrap_or(false);
                let target = if is_link && hops < MAX_HOPS {
                    std::fs::read_link(&next).ok()
                } else {
                    None
                };
                match target {
                    Some(target) => {
                        hops += 1;
                        if !dirs.contains(&at) {
                            dirs.push(at.clone());
                        }
                        entries.push(next);
                        // An absolute target starts with Root and resets `at`.
                        for p in parts(&target).rev() {
                            todo.push_front(p);
                        }
                    }
                    None => at = next,
                }
            }
        }
    }
    if let Some(parent) = at.parent() {
        let parent = parent.to_path_buf();
        if !dirs.contains(&parent) {
            dirs.push(parent);
        }
    }
    entries.push(at);
    Chain { dirs, entries }
}

// === impl Hashes ===

impl Hashes {
    /// Hashes every file (on the blocking pool) and records what changed.
    /// `first`: fill in unknown hashes without calling that a change.
    async fn check(&mut self, first: bool) -> bool {
        let files = self.files.clone();
        let now = tokio::task::spawn_blocking(move || {
            files.iter().map(|f| hash_file(f)).collect::<Vec<_>>()
        })
        .await;
        let now = match now {
            Ok(now) => now,
            Err(e) => {
                tracing::error!(error = %e, "hashing the watched files failed");
                return false;
            }
        };
        let mut changed = false;
        for (i, hash) in now.into_iter().enumerate() {
            let file = &self.files[i];
            match hash {
                Some(hash) => {
                    if self.missing[i] {
                        tracing::info!(file = %file.display(), "watched file is back");
                    }
                    self.missing[i] = false;
                    if self.last[i].as_deref() != Some(hash.as_str()) {
                        changed |= !(first && self.last[i].is_none());
                        self.last[i] = Some(hash);
                    }
                }
                None => {
                    if !self.missing[i] {
                        tracing::info!(file = %file.display(), "watched file is missing or unreadable; keeping what was loaded until it is back");
                    }
                    self.missing[i] = true;
                }
            }
        }
        self.checks.fetch_add(1, Ordering::Release);
        changed
    }
}

/// Content hash of `file`, read through any symlink chain; `None` if it
/// cannot be read (missing, mid-swap, no permission). Blocking.
fn hash_file(file: &Path) -> Option<String> {
    let mut bytes = Vec::new();
    let res =
        std::fs::File::open(file).and_then(|f| f.take(MAX_HASH_BYTES).read_to_end(&mut bytes));
    match res {
        Ok(_) => Some(content_hash(&bytes)),
        Err(e) => {
            tracing::debug!(file = %file.display(), error = %e, "cannot read watched file");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::fs::symlink;
    use std::sync::atomic::AtomicUsize;

    const DEBOUNCE: Duration = Duration::from_millis(50);
    /// Generous bound for anything to happen on a loaded CI machine.
    const BOUND: Duration = Duration::from_secs(20);

    /// A temporary directory removed on drop.
    struct Tmp(PathBuf);

    impl Tmp {
        fn new(tag: &str) -> Tmp {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "spillway-watch-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&p).unwrap();
            Tmp(p)
        }
        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
        fn write(&self, name: &str, text: &str) -> PathBuf {
            let p = self.path(name);
            std::fs::write(&p, text).unwrap();
            p
        }
        /// The layout kubelet mounts a ConfigMap with: `c.yaml ->
        /// ..data/c.yaml`, `..data -> ..2026_01`. Returns `c.yaml`.
        fn configmap(&self) -> PathBuf {
            std::fs::create_dir(self.path("..2026_01")).unwrap();
            std::fs::write(self.path("..2026_01/c.yaml"), "a: 1\n").unwrap();
            symlink("..2026_01", self.path("..data")).unwrap();
            symlink("..data/c.yaml", self.path("c.yaml")).unwrap();
            self.path("c.yaml")
        }
    }

    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    async fn expect_change(w: &mut FileWatch, what: &str) {
        match tokio::time::timeout(BOUND, w.changed()).await {
            Ok(Some(())) => {}
            Ok(None) => panic!("{what}: watch stopped"),
            Err(_) => panic!("{what}: no change reported within {BOUND:?}"),
        }
    }

    /// Waits until the watch has looked at the files more than `after` times
    /// (so a write before that has been judged), then asserts nothing was reported.
    async fn expect_no_change(w: &mut FileWatch, after: u64, what: &str) {
        let deadline = Instant::now() + BOUND;
        while w.checks() <= after {
            assert!(Instant::now() < deadline, "{what}: the watch never looked");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            matches!(w.changes.try_recv(), Err(mpsc::error::TryRecvError::Empty)),
            "{what}: reported a change"
        );
    }

    /// Waits until the first look (initial hashes) happened.
    async fn started(w: &FileWatch) {
        let deadline = Instant::now() + BOUND;
        while w.checks() == 0 {
            assert!(Instant::now() < deadline, "watch never started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn in_place_write_is_seen_and_same_content_is_ignored() {
        let d = Tmp::new("inplace");
        let f = d.write("c.yaml", "a: 1\n");
        let mut w = FileWatch::spawn(vec![f.clone()], DEBOUNCE);
        started(&w).await;
        std::fs::write(&f, "a: 2\n").unwrap();
        expect_change(&mut w, "in-place write").await;
        let n = w.checks();
        std::fs::write(&f, "a: 2\n").unwrap();
        expect_no_change(&mut w, n, "rewrite with the same content").await;
        std::fs::write(&f, "a: 3\n").unwrap();
        expect_change(&mut w, "second write").await;
    }

    #[tokio::test]
    async fn rename_over_is_seen() {
        let d = Tmp::new("rename");
        let f = d.write("c.yaml", "a: 1\n");
        let mut w = FileWatch::spawn(vec![f.clone()], DEBOUNCE);
        started(&w).await;
        let tmp = d.write(".c.yaml.swp", "a: 2\n");
        std::fs::rename(&tmp, &f).unwrap();
        expect_change(&mut w, "rename over").await;
    }

    #[tokio::test]
    async fn delete_is_ignored_and_recreate_is_seen() {
        let d = Tmp::new("recreate");
        let f = d.write("c.yaml", "a: 1\n");
        let mut w = FileWatch::spawn(vec![f.clone()], DEBOUNCE);
        started(&w).await;
        let n = w.checks();
        std::fs::remove_file(&f).unwrap();
        expect_no_change(&mut w, n, "delete").await;
        std::fs::write(&f, "a: 2\n").unwrap();
        expect_change(&mut w, "re-create with new content").await;
        // Re-created with the same content as before the delete: no change.
        let n = w.checks();
        std::fs::remove_file(&f).unwrap();
        std::fs::write(&f, "a: 2\n").unwrap();
        expect_no_change(&mut w, n, "re-create with the same content").await;
    }

    /// The layout kubelet mounts a ConfigMap with, and its atomic swap.
    #[tokio::test]
    async fn configmap_symlink_swap_is_seen() {
        let d = Tmp::new("configmap");
        let f = d.configmap();
        assert_eq!(resolve(&f).dirs, vec![d.0.clone(), d.path("..2026_01")]);

        let mut w = FileWatch::spawn(vec![f.clone()], DEBOUNCE);
        started(&w).await;
        for (i, text) in [(2, "a: 2\n"), (3, "a: 3\n")] {
            let new = format!("..2026_0{i}");
            std::fs::create_dir(d.path(&new)).unwrap();
            std::fs::write(d.path(&format!("{new}/c.yaml")), text).unwrap();
            symlink(&new, d.path("..data_tmp")).unwrap();
            std::fs::rename(d.path("..data_tmp"), d.path("..data")).unwrap();
            std::fs::remove_dir_all(d.path(&format!("..2026_0{}", i - 1))).unwrap();
            expect_change(&mut w, &format!("swap {i}")).await;
        }
    }

    /// A symlink to a file in another directory, edited in place there.
    #[tokio::test]
    async fn symlink_target_in_another_directory_is_watched() {
        let a = Tmp::new("chain-a");
        let b = Tmp::new("chain-b");
        let real = b.write("real.yaml", "a: 1\n");
        symlink(&real, a.path("c.yaml")).unwrap();
        let f = a.path("c.yaml");
        assert_eq!(resolve(&f).dirs, vec![a.0.clone(), b.0.clone()]);
        let mut w = FileWatch::spawn(vec![f], DEBOUNCE);
        started(&w).await;
        std::fs::write(&real, "a: 2\n").unwrap();
        expect_change(&mut w, "write to the symlink's target").await;
    }

    #[tokio::test]
    async fn polling_fallback_sees_changes() {
        let d = Tmp::new("poll");
        let f = d.write("c.yaml", "a: 1\n");
        let mut w = FileWatch::start(vec![f.clone()], DEBOUNCE, vec![None], false);
        started(&w).await;
        std::fs::write(&f, "a: 2\n").unwrap();
        expect_change(&mut w, "polled write").await;
        let n = w.checks();
        expect_no_change(&mut w, n, "poll tick without a write").await;
    }

    #[tokio::test]
    async fn missing_directory_falls_back_to_polling() {
        let d = Tmp::new("nodir");
        let f = d.path("later/c.yaml");
        let mut w = FileWatch::spawn(vec![f.clone()], DEBOUNCE);
        started(&w).await;
        std::fs::create_dir(d.path("later")).unwrap();
        std::fs::write(&f, "a: 1\n").unwrap();
        expect_change(&mut w, "file appearing in a new directory").await;
    }

    #[tokio::test]
    async fn known_baseline_that_differs_is_reported_at_once() {
        let d = Tmp::new("baseline");
        let f = d.write("c.yaml", "a: 2\n");
        let mut w = FileWatch::spawn_with_baseline(
            vec![f.clone()],
            DEBOUNCE,
            vec![Some(content_hash(b"a: 1\n"))],
        );
        expect_change(&mut w, "file differs from the loaded one").await;
        let mut same =
            FileWatch::spawn_with_baseline(vec![f], DEBOUNCE, vec![Some(content_hash(b"a: 2\n"))]);
        started(&same).await;
        expect_no_change(&mut same, 0, "file equals the loaded one").await;
    }

    #[tokio::test]
    async fn our_own_reads_do_not_wake_the_watch() {
        let d = Tmp::new("reads");
        let f = d.write("c.yaml", "a: 1\n");
        let mut w = FileWatch::spawn(vec![f.clone()], DEBOUNCE);
        started(&w).await;
        std::fs::write(&f, "a: 2\n").unwrap();
        expect_change(&mut w, "write").await;
        // Hashing opens and reads the file; that must not start another look.
        let n = w.checks();
        let _ = std::fs::read(&f).unwrap();
        tokio::time::sleep(DEBOUNCE * (MAX_STRETCH + 2)).await;
        assert_eq!(w.checks(), n, "reads woke the watch");
    }

    /// A config next to a log or a data file: writes, creates, renames and
    /// deletes of the neighbours are not looked at.
    #[tokio::test]
    async fn other_files_in_the_directory_do_not_wake_the_watch() {
        let d = Tmp::new("neighbours");
        let f = d.write("c.yaml", "a: 1\n");
        let mut w = FileWatch::spawn(vec![f.clone()], DEBOUNCE);
        started(&w).await;
        std::fs::write(&f, "a: 2\n").unwrap();
        expect_change(&mut w, "write").await;
        let n = w.checks();
        for i in 0..3 {
            let log = d.write("app.log", &format!("line {i}\n"));
            let tmp = d.write(".app.log.tmp", "x");
            std::fs::rename(&tmp, d.path("app.log.1")).unwrap();
            std::fs::remove_file(&log).unwrap();
        }
        tokio::time::sleep(DEBOUNCE * (MAX_STRETCH + 2)).await;
        assert_eq!(w.checks(), n, "a neighbour's events woke the watch");
        // The watched file itself still is.
        std::fs::write(&f, "a: 3\n").unwrap();
        expect_change(&mut w, "write after the neighbours'").await;
    }

    #[test]
    fn a_configmap_chain_names_each_symlink_and_the_file() {
        let d = Tmp::new("chain");
        let chain = resolve(&d.configmap());
        assert_eq!(
            chain.entries,
            vec![
                d.path("c.yaml"),
                d.path("..data"),
                d.path("..2026_01/c.yaml")
            ]
        );
        let ev = |p: PathBuf| Event::new(EventKind::Any).add_path(p);
        let relevant: BTreeSet<PathBuf> = chain.entries.into_iter().collect();
        assert!(concerns(&ev(d.path("..data")), &relevant));
        assert!(!concerns(&ev(d.path("..data_tmp")), &relevant));
        assert!(!concerns(&ev(d.path("..2026_02")), &relevant));
        assert!(
            concerns(&Event::new(EventKind::Any), &relevant),
            "no path: look"
        );
    }

    #[tokio::test]
    async fn stopped_watch_reports_none() {
        let d = Tmp::new("stop");
        let f = d.write("c.yaml", "a: 1\n");
        let mut w = FileWatch::spawn(vec![f], DEBOUNCE);
        w.task.abort();
        let res = tokio::time::timeout(BOUND, w.changed()).await;
        assert_eq!(res.ok(), Some(None));
    }
}
