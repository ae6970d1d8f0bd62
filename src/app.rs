//! Wiring: registry, listeners, admin, drain supervisor, hot reload.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;

use crate::admin::{self, AdminState};
use crate::config::watch::FileWatch;
use crate::config::{Config, ConfigError, ConfigIssue};
use crate::metrics::Metrics;
use crate::proxy::Shared;
use crate::registry::Registry;
use crate::server::listener;
use crate::shutdown::{Phase, Shutdown, Tracker};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener or the admin port could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The config could not be turned into running state.
    #[error("{0}")]
    Build(String),
}

/// Why a reload was refused; the running config is untouched.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    #[error("{0}")]
    Build(String),
}

/// A started proxy. Dropping it does not stop it; call [`RunningProxy::drain`].
pub struct RunningProxy {
    listeners: Vec<(String, SocketAddr)>,
    admin_addr: SocketAddr,
    core: Arc<Core>,
    supervisor: tokio::task::JoinHandle<()>,
}

/// What reloads and the supervisor share.
struct Core {
    shared: Arc<Shared>,
    registry: Registry,
    admin: Arc<AdminState>,
    generation: AtomicU64,
    /// Serializes reloads (build + swap) so generations stay ordered.
    reload_lock: Mutex<()>,
    /// Generations replaced by a reload, freed by the reload thread.
    retired: Mutex<Vec<Arc<crate::registry::Snapshot>>>,
    /// Jobs for the reload thread, started on the first reload. The thread
    /// holds only the receiver, so it ends when this core is dropped.
    reloader: Mutex<Option<std::sync::mpsc::SyncSender<ReloadJob>>>,
}

/// Work for the reload thread.
type ReloadJob = Box<dyn FnOnce() + Send>;

/// Reload requests that may wait for the reload thread (SIGHUP, the file
/// watcher and API callers each wait for their own, so a few at most).
const RELOAD_QUEUE: usize = 16;

/// Binds everything and starts serving on the current tokio runtime.
pub async fn start(config: Config) -> Result<RunningProxy, StartError> {
    let metrics = Arc::new(Metrics::new());
    let registry = Registry::new(metrics.clone(), config.limits.max_in_flight);
    let config = Arc::new(config);
    let (snapshot, _) = registry
        .build(config.clone(), 1, None)
        .map_err(StartError::Build)?;
    metrics.config_generation.set(1);
    metrics.config_last_reload_success.set(1);
    let shutdown = Shutdown::new();
    let shared = Arc::new(Shared::new(snapshot, metrics, shutdown.clone()));

    let mut bound = Vec::new();
    for l in &config.listeners {
        let tcp = bind(l.bind).map_err(|source| StartError::Bind {
            what: format!("listener `{}`", l.name),
            addr: l.bind,
            source,
        })?;
        let addr = tcp.local_addr().unwrap_or(l.bind);
        bound.push((l.clone(), tcp, addr));
    }
    let admin_tcp = bind(config.admin.bind).map_err(|source| StartError::Bind {
        what: "admin".into(),
        addr: config.admin.bind,
        source,
    })?;
    let admin_addr = admin_tcp.local_addr().unwrap_or(config.admin.bind);

    let admin_state = Arc::new(AdminState {
        shared: shared.clone(),
        restart_required: Mutex::new(Vec::new()),
        series: Default::default(),
    });
    let core = Arc::new(Core {
        shared: shared.clone(),
        registry,
        admin: admin_state.clone(),
        generation: AtomicU64::new(1),
        reload_lock: Mutex::new(()),
        retired: Mutex::new(Vec::new()),
        reloader: Mutex::new(None),
    });

    let conns = Arc::new(Tracker::default());
    let admin_conns = Arc::new(Tracker::default());
    let mut tasks = JoinSet::new();
    let mut listeners = Vec::new();
    for (cfg, tcp, addr) in bound {
        tracing::info!(listener = %cfg.name, %addr, protocol = ?cfg.protocol, "listening");
        listeners.push((cfg.name.clone(), addr));
        tasks.spawn(listener::serve(tcp, cfg, shared.clone(), conns.clone()));
    }
    tracing::info!(%admin_addr, "admin listening");
    tasks.spawn(admin::sample(admin_state.clone()));
    tasks.spawn(admin::serve(admin_tcp, admin_state, admin_conns));
    tasks.spawn(memory_janitor(shared.clone(), conns.clone()));

    let supervisor = tokio::spawn(supervise(shared, conns, tasks, config.clone()));
    Ok(RunningProxy {
        listeners,
        admin_addr,
        core,
        supervisor,
    })
}

/// Drives the drain: grace (ready=503, still serving) -> stop accepting and
/// close connections gracefully -> wait up to drain.timeout -> stopped.
async fn supervise(
    shared: Arc<Shared>,
    conns: Arc<Tracker>,
    mut tasks: JoinSet<()>,
    config: Arc<Config>,
) {
    let shutdown = shared.shutdown.clone();
    shutdown.reached(Phase::Draining).await;
    let cfg = shared.snapshot.load().config.drain.clone();
    tracing::info!(grace = ?cfg.grace.0, "draining: /ready is 503, still serving");
    tokio::time::sleep(cfg.grace.0).await;
    shutdown.advance(Phase::Stopping);
    tracing::info!(timeout = ?cfg.timeout.0, open = conns.count(), "stopped accepting; waiting for in-flight requests");
    let waited = tokio::time::timeout(cfg.timeout.0, async {
        conns.idle().await;
        shared.tunnels.idle().await;
    })
    .await;
    if waited.is_err() {
        tracing::warn!(
            open = conns.count(),
            "drain timeout: closing remaining connections"
        );
    }
    shutdown.advance(Phase::Stopped);
    tasks.abort_all();
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res {
            if !e.is_cancelled() {
                tracing::error!(error = %e, "task failed");
            }
        }
    }
    drop(config);
    tracing::info!("stopped");
}

/// Listening socket with `SO_REUSEADDR` and a backlog of [`LISTEN_BACKLOG`]:
/// a burst of connects (a pool filling, clients reconnecting) waits in the
/// kernel's queue instead of having its SYNs dropped, which costs each
/// dropped client a 1 s retransmit. `TcpListener::bind` listens with 128.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(s.into())
}

/// Connections the kernel completes before they are accepted (capped by
/// `net.core.somaxconn`).
const LISTEN_BACKLOG: i32 = 1024;

// === impl RunningProxy ===

impl RunningProxy {
    /// The bound address of a listener (useful with port 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    /// All listeners with their bound addresses.
    pub fn listener_addrs(&self) -> &[(String, SocketAddr)] {
        &self.listeners
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Begins graceful shutdown, exactly as SIGTERM does.
    pub fn drain(&self) {
        self.core.shared.shutdown.advance(Phase::Draining);
    }

    /// The config generation in effect.
    pub fn generation(&self) -> u64 {
        self.core.generation.load(Ordering::Acquire)
    }

    /// Applies a new validated config atomically for new requests. Requests in
    /// flight finish under the config they started with; state survives by name.
    /// Listener/admin changes need a restart: they are reported, not applied.
    pub fn reload(&self, config: Config) -> Result<u64, ReloadError> {
        self.core.reload(config)
    }

    /// Records a reload that failed before reaching [`RunningProxy::reload`] (invalid file).
    pub fn reload_failed(&self, err: &ConfigError) {
        self.core
            .shared
            .metrics
            .config_reloads_total
            .with_label_values(&["failure"])
            .inc();
        self.core.shared.metrics.config_last_reload_success.set(0);
        for issue in &err.issues {
            tracing::error!(%issue, "config reload rejected; the running config stays in effect");
        }
    }

    /// Resolves when the proxy has fully stopped.
    pub async fn stopped(self) {
        if let Err(e) = self.supervisor.await {
            tracing::error!(error = %e, "supervisor task failed");
        }
    }
}

impl Core {
    /// Runs `job` on the reload thread, starting it (again, if a job
    /// panicked) when needed. One long-lived thread: spawning one per reload
    /// cost the event loop a stack mmap and a clone(2) each time.
    fn on_reload_thread(&self, job: ReloadJob) -> Result<(), String> {
        use std::sync::mpsc::{sync_channel, TrySendError};
        let mut slot = self.reloader.lock();
        let job = match slot.as_ref() {
            None => job,
            Some(tx) => match tx.try_send(job) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full(_)) => {
                    return Err(format!("{RELOAD_QUEUE} reloads already waiting"))
                }
                Err(TrySendError::Disconnected(job)) => job,
            },
        };
        let (tx, rx) = sync_channel::<ReloadJob>(RELOAD_QUEUE);
        std::thread::Builder::new()
            .name("spillway-reload".into())
            .spawn(move || {
                lower_thread_priority();
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .map_err(|e| format!("cannot start the reload thread: {e}"))?;
        tx.try_send(job)
            .map_err(|_| "the reload thread stopped at once".to_string())?;
        *slot = Some(tx);
        Ok(())
    }

    fn reload(&self, config: Config) -> Result<u64, ReloadError> {
        let serial = self.reload_lock.lock();
        self.apply(&serial, config)
    }

    /// Reads, validates and applies the file, all under the reload lock so a
    /// slower read can never overwrite a newer one. Blocking: runs on the reload
    /// thread (`on_reload_thread`), never on an async worker. `Ok(None)`: a file event whose content is already in
    /// effect (and the last reload succeeded), so nothing was done or counted.
    fn reload_file(&self, path: &Path, trigger: Trigger) -> Result<Option<u64>, ReloadError> {
        let serial = self.reload_lock.lock();
        // E.g. SIGHUP applied this content before the watcher's debounce ended.
        // Hashing first skips the parse; a change after this read is just
        // applied by the load below.
        if trigger == Trigger::FileChange
            && self.shared.metrics.config_last_reload_success.get() == 1
            && std::fs::read(path).is_ok_and(|bytes| {
                crate::config::content_hash(&bytes)
                    == self.shared.snapshot.load().config.source.hash
            })
        {
            return Ok(None);
        }
        let loaded = crate::config::load_file(path)?;
        for w in &loaded.warnings {
            tracing::warn!(%w, "config warning");
        }
        self.apply(&serial, loaded.config).map(Some)
    }

    /// Builds the new generation (state reused by name) and publishes it.
    /// Listener, admin and runtime settings only take effect at start: the
    /// ones in effect are kept (so /config shows what runs) and the fields
    /// that differ are listed in `restart_required`.
    fn apply(&self, _serial: &MutexGuard<'_, ()>, mut config: Config) -> Result<u64, ReloadError> {
        let metrics = &self.shared.metrics;
        let old = self.shared.snapshot.load_full();
        let gen = self.generation.load(Ordering::Acquire) + 1;
        let restart = restart_required(&old.config, &config);
        config.listeners.clone_from(&old.config.listeners);
        config.admin.clone_from(&old.config.admin);
        config.runtime.clone_from(&old.config.runtime);
        match self.registry.build(Arc::new(config), gen, Some(&old)) {
            Ok((snap, diff)) => {
                let (file, hash) = (
                    snap.config.source.file.clone(),
                    snap.config.source.hash.clone(),
                );
                self.shared.snapshot.store(Arc::new(snap));
                self.generation.store(gen, Ordering::Release);
                self.retired.lock().push(old);
                metrics.config_generation.set(gen as i64);
                metrics
                    .config_reloads_total
                    .with_label_values(&["success"])
                    .inc();
                metrics.config_last_reload_success.set(1);
                tracing::info!(
                    generation = gen,
                    %file,
                    %hash,
                    added = ?diff.added,
                    removed = ?diff.removed,
                    changed = ?diff.changed,
                    upstreams_added = ?diff.upstreams_added,
                    upstreams_removed = ?diff.upstreams_removed,
                    upstreams_rebuilt = ?diff.upstreams_rebuilt,
                    "config reloaded"
                );
                if !restart.is_empty() {
                    tracing::warn!(fields = ?restart, "these changes need a restart and were not applied");
                }
                *self.admin.restart_required.lock() = restart;
                Ok(gen)
            }
            Err(e) => {
                metrics
                    .config_reloads_total
                    .with_label_values(&["failure"])
                    .inc();
                metrics.config_last_reload_success.set(0);
                tracing::error!(error = %e, "config reload failed; the running config stays in effect");
                Err(ReloadError::Build(e))
            }
        }
    }
}

/// Drops a replaced generation on the calling (reload) thread once the
/// requests still using it are done, rather than on the event loop in
/// whichever request finishes last: freeing 50 routes' routers and state is
/// work that would otherwise stall that request's connection. Waits at most
/// a second (a longer request keeps it and frees it itself).
fn retire(old: Arc<crate::registry::Snapshot>) {
    let mut old = old;
    // 200 x 5 ms: about a second.
    for _ in 0..200 {
        match Arc::try_unwrap(old) {
            Ok(snap) => return drop(snap),
            Err(still_used) => old = still_used,
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Fields of `new` that differ from what runs and only apply at start, as
/// field paths (`listeners[0].bind`, `admin.bind`, `runtime.worker_threads`).
fn restart_required(running: &Config, new: &Config) -> Vec<String> {
    // Typed comparison first; only a section that differs is serialized to
    // name its fields (a reload of a big file pays nothing here).
    fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
        serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
    }
    let mut out = Vec::new();
    if running.listeners.len() != new.listeners.len() {
        out.push("listeners".to_string());
    } else {
        for (i, (x, y)) in running.listeners.iter().zip(&new.listeners).enumerate() {
            if x != y {
                fields_differing(&format!("listeners[{i}]"), &json(x), &json(y), &mut out);
            }
        }
    }
    if running.admin != new.admin {
        fields_differing("admin", &json(&running.admin), &json(&new.admin), &mut out);
    }
    if running.runtime != new.runtime {
        fields_differing(
            "runtime",
            &json(&running.runtime),
            &json(&new.runtime),
            &mut out,
        );
    }
    out
}

/// Pushes `prefix.key` for each top-level key whose JSON differs; `prefix`
/// alone if none does (a redacted field, such as a TLS key path, changed).
fn fields_differing(
    prefix: &str,
    a: &serde_json::Value,
    b: &serde_json::Value,
    out: &mut Vec<String>,
) {
    let before = out.len();
    if let (Some(x), Some(y)) = (a.as_object(), b.as_object()) {
        let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            if x.get(k) != y.get(k) {
                out.push(format!("{prefix}.{k}"));
            }
        }
    }
    if out.len() == before {
        out.push(prefix.to_string());
    }
}

// === hot reload ===

/// File events are collected this long before the file is read: editors and
/// kubelet touch several directory entries per save.
const CONFIG_DEBOUNCE: Duration = Duration::from_millis(200);

/// What asked for a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    /// SIGHUP or an explicit call: always reloads and counts the result.
    Forced,
    /// The watched file changed: content already in effect is ignored.
    FileChange,
}

/// Watches a proxy's config file and applies every change; see
/// [`RunningProxy::watch_config`]. Dropping it stops watching.
pub struct ConfigWatch {
    task: Option<JoinHandle<()>>,
}

impl ConfigWatch {
    /// Stops watching and waits until the watcher has let go of the proxy.
    pub async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            if let Err(e) = task.await {
                if !e.is_cancelled() {
                    tracing::error!(error = %e, "config watch task failed");
                }
            }
        }
    }
}

impl Drop for ConfigWatch {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl RunningProxy {
    /// Watches `path` and reloads it whenever its content changes: what `run`
    /// does besides SIGHUP. The file's directory is watched, so a Kubernetes
    /// ConfigMap's `..data` symlink swap, an editor's rename-over, delete and
    /// re-create, and in-place writes are all seen; events are debounced for
    /// 200 ms and ignored when the content is what already runs. A change
    /// made since the running config was loaded is applied at once. Without
    /// inotify the file is polled every second.
    pub fn watch_config(self: &Arc<Self>, path: PathBuf) -> ConfigWatch {
        let running = self.core.shared.snapshot.load().config.source.hash.clone();
        let mut files = FileWatch::spawn_with_baseline(
            vec![path.clone()],
            CONFIG_DEBOUNCE,
            vec![Some(running)],
        );
        let proxy = self.clone();
        let span = tracing::info_span!("config_watch", file = %path.display());
        let task = tokio::spawn(
            async move {
                while files.changed().await.is_some() {
                    tracing::info!("config file changed: reloading");
                    reload(&proxy, &path, Trigger::FileChange).await;
                }
                tracing::warn!("config file watch stopped; SIGHUP still reloads");
            }
            .instrument(span),
        );
        ConfigWatch { task: Some(task) }
    }
}

/// Runs a started proxy as the `run` command does: SIGTERM/SIGINT drain it,
/// SIGHUP and changes to the config file reload it. Returns when it stopped.
pub async fn serve_signals_and_reloads(
    proxy: RunningProxy,
    path: std::path::PathBuf,
) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("signal handler: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("signal handler: {e}"))?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| format!("signal handler: {e}"))?;
    let proxy = Arc::new(proxy);
    let watch = proxy.watch_config(path.clone());
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading config");
                reload_file(&proxy, &path).await;
                continue;
            }
        }
        // No reloads while draining: the config that drains is the one in effect.
        watch.stop().await;
        proxy.drain();
        let p = proxy.clone();
        // Wait for the drain to finish, or for a second signal.
        let done = async move {
            while p.core.shared.shutdown.phase() < Phase::Stopped {
                p.core.shared.shutdown.reached(Phase::Stopped).await;
            }
        };
        tokio::select! {
            _ = done => break,
            _ = term.recv() => { tracing::warn!("second signal: exiting now"); return Ok(()); }
            _ = int.recv() => { tracing::warn!("second signal: exiting now"); return Ok(()); }
        }
    }
    match Arc::try_unwrap(proxy) {
        Ok(p) => p.stopped().await,
        Err(_) => tracing::debug!("proxy still shared at exit"),
    }
    Ok(())
}

/// Reloads the file now, as SIGHUP does: reads, parses, validates and
/// applies it on the one long-lived reload thread. Always counted, even when nothing
/// changed. Invalid: the running config stays, every issue is logged with
/// its file:line:column and field path. Returns whether it was applied.
pub async fn reload_file(proxy: &RunningProxy, path: &std::path::Path) -> bool {
    reload(proxy, path, Trigger::Forced).await
}

/// The one reload path (SIGHUP, file watch, [`reload_file`]). The async
/// worker only hands the job over and waits: file I/O, parsing, validation
/// and the build of the new generation all run on the reload thread, at the
/// lowest CPU priority with a short time slice, so on a sidecar's single
/// core they yield to request work instead of delaying requests behind them.
async fn reload(proxy: &RunningProxy, path: &Path, trigger: Trigger) -> bool {
    let core = proxy.core.clone();
    let file = path.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: ReloadJob = Box::new(move || {
        // The receiver only goes away if the caller was cancelled.
        let _ = tx.send(core.reload_file(&file, trigger));
        // After answering and outside the reload lock: free the replaced
        // generation here rather than on the event loop.
        let retired = std::mem::take(&mut *core.retired.lock());
        for old in retired {
            retire(old);
        }
    });
    let done = match proxy.core.on_reload_thread(job) {
        // A job that panicked drops its sender: an error here, not a hang.
        Ok(()) => rx.await.map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    match done {
        Ok(Ok(Some(_))) => true,
        Ok(Ok(None)) => {
            tracing::debug!("config content unchanged; nothing to reload");
            true
        }
        Ok(Err(ReloadError::Invalid(e))) => {
            proxy.reload_failed(&e);
            false
        }
        // Counted and logged by `Core::apply`.
        Ok(Err(ReloadError::Build(_))) => false,
        Err(e) => {
            proxy.reload_failed(&ConfigError {
                issues: vec![ConfigIssue {
                    file: path.display().to_string(),
                    line: None,
                    column: None,
                    path: String::new(),
                    message: format!("reload task failed: {e}"),
                }],
            });
            false
        }
    }
}

/// Returns freed heap memory to the OS when traffic pauses. After a burst,
/// the allocator keeps the freed pages resident and hands them out again, so
/// RSS would stay at the burst's peak; one trim after a quiet second lets it
/// follow the live connections instead: `mi_collect(true)` for mimalloc
/// (whose delayed purge otherwise waits for the next allocation), and
/// `malloc_trim(0)` for glibc. Quiet means no request arrived, the number
/// of open client connections did not change and no idle connection was
/// parked for a second: many keep-alive connections closing or parking at
/// once free their buffers without any request, and are followed by a trim
/// too. It runs only while no request arrives, so it
/// never delays one. jemalloc purges on its own decay clock.
async fn memory_janitor(shared: Arc<Shared>, conns: Arc<Tracker>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = (u64::MAX, usize::MAX, u64::MAX);
    let mut trimmed = true;
    loop {
        tick.tick().await;
        let now = (
            shared.requests.load(std::sync::atomic::Ordering::Relaxed),
            conns.count(),
            crate::server::listener::parks(),
        );
        if now != seen {
            seen = now;
            trimmed = false;
        } else if !trimmed {
            trimmed = true;
            release_free_memory();
        }
    }
}

fn release_free_memory() {
    #[cfg(feature = "mimalloc")]
    {
        // SAFETY: mi_collect only frees pages that hold no live block; it is
        // callable from any thread at any time.
        unsafe {
            libmimalloc_sys::mi_collect(true);
        }
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes the allocator's own locks and only
        // releases pages of chunks that are already free.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Lowers the calling thread to nice 19 (Linux: priorities are per thread)
/// and asks for a 100 us time slice. The short slice matters as much as the
/// nice value: EEVDF lets a running task finish its slice before a waking
/// one preempts it (RUN_TO_PARITY), so with the default slice a reload that
/// got the CPU could hold the request path off it for milliseconds. Since
/// Linux 6.12 `sched_runtime` is the slice of a normal task; older
/// kernels refuse it and get nice 19 alone. Failure is harmless: the reload
/// just runs at normal priority.
/// (SCHED_IDLE was measured too: reloads then wait for idle CPU, and a
/// sidecar at 100% CPU is exactly when an operator changes its limits.)
fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    {
        let attr = libc::sched_attr {
            size: std::mem::size_of::<libc::sched_attr>() as u32,
            sched_policy: libc::SCHED_OTHER as u32,
            sched_flags: 0,
            sched_nice: 19,
            sched_priority: 0,
            sched_runtime: 100_000,
            sched_deadline: 0,
            sched_period: 0,
        };
        // SAFETY: sched_setattr reads `attr` (valid, sized by its `size`
        // field) for the calling thread (pid 0) and touches no other memory.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_sched_setattr,
                0,
                &attr as *const libc::sched_attr,
                0,
            )
        };
        if rc == 0 {
            return;
        }
        // SAFETY: setpriority only reads its integer arguments; `who = 0` is the
        // calling thread, so no other thread's state is touched.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
        if rc != 0 {
            tracing::debug!("could not lower the reload thread's priority");
        }
    }
}

impl RunningProxy {
    /// (in-flight, queue depth) of a route, for the demo's table.
    pub fn route_load(&self, route: &str) -> Option<(usize, usize)> {
        let snap = self.core.shared.snapshot.load();
        let r = snap.routes.iter().find(|r| r.config.name == route)?;
        let s = r.state.admission.stats();
        Some((s.in_flight, s.queue_depth))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpStream;
    use tokio::task::JoinSet;

    /// Nothing accepts: every connect completes only if the kernel queues it.
    /// A backlog of 128 leaves the rest retransmitting SYNs for good.
    #[tokio::test]
    async fn a_burst_of_connects_waits_in_the_backlog() {
        let l = super::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let mut set = JoinSet::new();
        for _ in 0..300 {
            set.spawn(async move {
                tokio::time::timeout(Duration::from_secs(20), TcpStream::connect(addr)).await
            });
        }
        let mut held = Vec::new();
        while let Some(r) = set.join_next().await {
            let s = r
                .unwrap()
                .expect("connect waited past the backlog")
                .unwrap();
            held.push(s);
        }
        assert_eq!(held.len(), 300);
        drop(l);
    }
}
