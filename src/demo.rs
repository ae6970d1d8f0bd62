//! `spillway demo` and `spillway upstream`.
//!
//! The simulated upstream serves at most `capacity` requests at once, each for
//! `service_time`; the rest wait inside it (like a real service's thread pool).
//! With a capacity schedule (`--capacity-schedule 8@0s,16@20s,4@40s`) the
//! capacity changes while it runs: growing admits waiting requests at once,
//! shrinking cancels nothing and admits no one until fewer than the new
//! capacity are being served.
//! Under a backlog each server finishes one request per `service_time`: the
//! timer wakes up to a millisecond late, and a server that starts a request
//! that was already waiting makes that lateness up (at most 2 ms of it), so the
//! simulated capacity is `capacity / service_time`, not a few percent below.
//! `GET /__stats` returns `{"peak_concurrency","current","served","latency_ms"}`,
//! where `latency_ms` maps whole milliseconds (the last bucket holds longer
//! ones) to how many requests took that long inside the service, waiting
//! included: the upstream latency the proxy in front of it sees. And
//! `POST /__fail?on=1|0` makes every request answer 503 (to trip a breaker).
//!
//! The demo starts that upstream, Spillway in front of it with config/demo.yaml,
//! and an open-loop load generator that walks through three phases: normal load,
//! 4x overload (queueing, then shedding with 429 while accepted latency stays
//! bounded), and an upstream failure (the breaker opens, answers fail fast,
//! then it recovers). A table is printed once a second.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config;

/// Simulated service parameters.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub service_time: Duration,
    pub capacity: usize,
    pub fail_rate: f64,
    pub body_bytes: usize,
    /// Capacity changes `(after, capacity)` from the start, ascending; empty
    /// for a fixed `capacity`.
    pub capacity_schedule: Vec<(Duration, usize)>,
}

/// Parses `8@0s,16@20s,4@40s`: capacity 8 from the start, 16 after 20 s, 4
/// after 40 s. Times must ascend; capacities are at least 1.
pub fn parse_capacity_schedule(s: &str) -> Result<Vec<(Duration, usize)>, String> {
    let mut out: Vec<(Duration, usize)> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (cap, at) = part
            .split_once('@')
            .ok_or_else(|| format!("`{part}`: expected CAPACITY@TIME, e.g. 8@0s"))?;
        let cap: usize = cap
            .trim()
            .parse()
            .map_err(|_| format!("`{part}`: capacity `{cap}` is not a number"))?;
        if cap == 0 {
            return Err(format!("`{part}`: capacity must be at least 1"));
        }
        let at = config::units::parse_duration(at.trim()).map_err(|e| format!("`{part}`: {e}"))?;
        if out.last().is_some_and(|(prev, _)| *prev >= at) {
            return Err(format!("`{part}`: times must ascend"));
        }
        out.push((at, cap));
    }
    if out.is_empty() {
        return Err("empty schedule: expected e.g. 8@0s,16@20s".to_string());
    }
    Ok(out)
}

/// A resizable count of servers. A tokio semaphore plus a debt: shrinking
/// removes free permits at once and owes the rest, which are then withheld
/// as busy servers finish (no one is interrupted).
pub(crate) struct Servers {
    sem: Semaphore,
    state: Mutex<ServersState>,
}

struct ServersState {
    capacity: usize,
    /// Permits still to be withheld after a shrink.
    debt: usize,
    /// When each free server finished its last request (at most one entry
    /// per free permit; a server missing here has been idle).
    free_at: Vec<Instant>,
}

/// How much of a timer's lateness a server makes up on its next request.
const MAX_CATCH_UP: Duration = Duration::from_millis(2);

/// One request being served.
pub(crate) struct Serving<'a> {
    servers: &'a Servers,
    permit: Option<tokio::sync::SemaphorePermit<'a>>,
    /// When this request's service began: when the server became free if
    /// that was less than [`MAX_CATCH_UP`] ago and this request was already
    /// waiting then, else now.
    start: Instant,
    /// When this request's service is due to end, once known.
    end: Option<Instant>,
}

impl Serving<'_> {
    /// Serves for `service_time` from [`Serving::start`].
    pub(crate) async fn serve(&mut self, service_time: Duration) {
        let end = self.start + service_time;
        self.end = Some(end);
        tokio::time::sleep_until(end).await;
    }
}

impl Servers {
    /// Starts with `capacity` free servers (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Servers {
            sem: Semaphore::new(capacity),
            state: Mutex::new(ServersState {
                capacity,
                debt: 0,
                free_at: Vec::with_capacity(capacity),
            }),
        }
    }

    /// Waits for a free server.
    pub(crate) async fn acquire(&self) -> Option<Serving<'_>> {
        let asked = Instant::now();
        let permit = self.sem.acquire().await.ok()?;
        let now = Instant::now();
        let free_at = self.state.lock().free_at.pop();
        // Never before this request asked: only a waiting request can start
        // when the server it takes became free.
        let start = match free_at {
            Some(t) if now.saturating_duration_since(t) <= MAX_CATCH_UP => t.max(asked),
            _ => now,
        };
        Some(Serving {
            servers: self,
            permit: Some(permit),
            start,
            end: None,
        })
    }

    /// Changes the number of servers.
    pub(crate) fn set_capacity(&self, capacity: usize) {
        let capacity = capacity.max(1);
        let mut st = self.state.lock();
        if capacity > st.capacity {
            let mut grow = capacity - st.capacity;
            let repaid = grow.min(st.debt);
            st.debt -= repaid;
            grow -= repaid;
            self.sem.add_permits(grow);
        } else {
            let shrink = st.capacity - capacity;
            let taken = self.sem.forget_permits(shrink);
            st.debt += shrink - taken;
        }
        st.capacity = capacity;
    }
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        let mut st = self.servers.state.lock();
        if let Some(p) = self.permit.take() {
            if st.debt > 0 {
                st.debt -= 1;
                p.forget();
            } else if st.free_at.len() < st.capacity {
                // Dropped early (the client left) or served without a
                // service time: the server is free from now.
                let now = Instant::now();
                st.free_at.push(self.end.map_or(now, |e| e.min(now)));
            }
        }
    }
}

/// Counters of the simulated service.
#[derive(Default)]
pub struct SimStats {
    pub current: AtomicUsize,
    pub peak: AtomicUsize,
    pub served: AtomicU64,
    pub failing: AtomicBool,
    /// Requests by whole milliseconds spent inside the service.
    pub latency_ms: LatencyMs,
}

/// Counts by whole milliseconds, 0 to [`LatencyMs::MAX_MS`]; longer ones
/// count in the last bucket.
pub struct LatencyMs(Box<[AtomicU64]>);

impl LatencyMs {
    pub const MAX_MS: usize = 2000;

    pub fn record(&self, d: Duration) {
        let ms = usize::try_from(d.as_millis()).unwrap_or(usize::MAX);
        if let Some(b) = self.0.get(ms.min(Self::MAX_MS)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `{"20":31,"21":4}`: only the buckets that counted something.
    pub fn to_json(&self) -> String {
        let mut out = String::from("{");
        for (ms, b) in self.0.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            if n > 0 {
                if out.len() > 1 {
                    out.push(',');
                }
                out.push_str(&format!("\"{ms}\":{n}"));
            }
        }
        out.push('}');
        out
    }
}

impl Default for LatencyMs {
    fn default() -> Self {
        LatencyMs((0..=Self::MAX_MS).map(|_| AtomicU64::new(0)).collect())
    }
}

/// A running simulated upstream.
pub struct SimUpstream {
    pub addr: SocketAddr,
    pub stats: Arc<SimStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SimUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the simulated upstream on `bind` (use port 0 for any).
pub async fn start_upstream(bind: SocketAddr, cfg: SimConfig) -> std::io::Result<SimUpstream> {
    // The proxy's own listener, for its backlog (see `app::bind`).
    let listener = crate::app::bind(bind)?;
    let addr = listener.local_addr()?;
    let stats = Arc::new(SimStats::default());
    let st = stats.clone();
    let cap = Arc::new(Servers::new(
        cfg.capacity_schedule
            .first()
            .map_or(cfg.capacity, |(_, c)| *c),
    ));
    let schedule = cfg.capacity_schedule.clone();
    let servers = cap.clone();
    let task = tokio::spawn(async move {
        // Capacity changes run beside the accept loop, owned by it (aborted
        // with it).
        let mut changes = JoinSet::new();
        if schedule.len() > 1 {
            changes.spawn(run_schedule(servers, schedule));
        }
        let body = Bytes::from(vec![b'x'; cfg.body_bytes]);
        let mut conns = JoinSet::new();
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "upstream accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (cap, st, cfg, body) = (cap.clone(), st.clone(), cfg.clone(), body.clone());
            // Reap finished connections so the set stays bounded by open connections.
            while conns.try_join_next().is_some() {}
            conns.spawn(async move {
                let svc = service_fn(move |req| {
                    sim_handle(req, cap.clone(), st.clone(), cfg.clone(), body.clone())
                });
                let b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                if let Err(e) = b
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await
                {
                    tracing::trace!(error = %e, "upstream connection ended");
                }
            });
        }
    });
    Ok(SimUpstream { addr, stats, task })
}

/// Applies a capacity schedule from now on.
async fn run_schedule(servers: Arc<Servers>, schedule: Vec<(Duration, usize)>) {
    let start = Instant::now();
    for (at, capacity) in schedule.into_iter().skip(1) {
        tokio::time::sleep_until(start + at).await;
        servers.set_capacity(capacity);
        tracing::info!(capacity, "simulated upstream capacity changed");
    }
}

async fn sim_handle(
    req: Request<Incoming>,
    cap: Arc<Servers>,
    st: Arc<SimStats>,
    cfg: SimConfig,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, Infallible> {
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/__stats") => {
            let j = format!(
                "{{\"peak_concurrency\":{},\"current\":{},\"served\":{},\"latency_ms\":{}}}",
                st.peak.load(Ordering::Relaxed),
                st.current.load(Ordering::Relaxed),
                st.served.load(Ordering::Relaxed),
                st.latency_ms.to_json()
            );
            return Ok(Response::new(Full::new(Bytes::from(j))));
        }
        ("POST", "/__fail") => {
            let on = req.uri().query().is_some_and(|q| q.contains("on=1"));
            st.failing.store(on, Ordering::Relaxed);
            return Ok(Response::new(Full::new(Bytes::from_static(b"ok"))));
        }
        _ => {}
    }
    let now = st.current.fetch_add(1, Ordering::Relaxed) + 1;
    st.peak.fetch_max(now, Ordering::Relaxed);
    // Counted out when the handler ends, also when hyper drops it because the
    // client (the proxy) closed the connection: a cancelled request must not
    // stay counted as outstanding.
    let _outstanding = Outstanding(st.clone());
    let arrived = Instant::now();
    // Drain the request body (bounded by the proxy's max_request_body).
    let _ = req.into_body().collect().await;
    let fail = st.failing.load(Ordering::Relaxed)
        || (cfg.fail_rate > 0.0 && fastrand::f64() < cfg.fail_rate);
    let resp = match cap.acquire().await {
        Some(mut serving) => {
            if !cfg.service_time.is_zero() {
                serving.serve(cfg.service_time).await;
            }
            let mut r = Response::new(Full::new(if fail {
                Bytes::from_static(b"unavailable")
            } else {
                body
            }));
            if fail {
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            r
        }
        None => {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r
        }
    };
    st.latency_ms.record(arrived.elapsed());
    st.served.fetch_add(1, Ordering::Relaxed);
    Ok(resp)
}

/// One request in the simulated upstream's `current` count.
struct Outstanding(Arc<SimStats>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.current.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `spillway upstream`: serve until SIGTERM/SIGINT.
pub async fn serve_upstream(bind: SocketAddr, cfg: SimConfig) -> Result<(), String> {
    let up = start_upstream(bind, cfg.clone())
        .await
        .map_err(|e| format!("cannot bind {bind}: {e}"))?;
    eprintln!(
        "simulated upstream on {} (capacity {}, service time {:?}, fail rate {})",
        up.addr, cfg.capacity, cfg.service_time, cfg.fail_rate
    );
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

/// One phase of the demo's load.
struct Phase {
    name: &'static str,
    secs: u64,
    rate: u64,
    fail: bool,
}

#[derive(Default)]
struct Window {
    latencies_ms: Vec<f64>,
    by_reason: BTreeMap<String, u64>,
}

/// `spillway demo`.
pub async fn run(total: Duration) -> Result<(), String> {
    let up = start_upstream(
        "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
        SimConfig {
            service_time: Duration::from_millis(20),
            capacity: 8,
            fail_rate: 0.0,
            body_bytes: 64,
            capacity_schedule: Vec::new(),
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let path = Path::new("config/demo.yaml");
    let (text, source) = match std::fs::read_to_string(path) {
        Ok(t) => (t, path.display().to_string()),
        Err(_) => (
            include_str!("../config/demo.yaml").to_string(),
            "built-in config/demo.yaml".to_string(),
        ),
    };
    let mut loaded = config::load_str(&text, &source).map_err(|e| e.to_string())?;
    for u in &mut loaded.config.upstreams {
        u.endpoints = vec![up.addr.to_string()];
    }
    let proxy = match crate::start(loaded.config.clone()).await {
        Ok(p) => p,
        Err(e) => {
            // Ports in the demo file are taken: fall back to any free port.
            eprintln!("{e}; retrying on free ports");
            for l in &mut loaded.config.listeners {
                l.bind.set_port(0);
            }
            loaded.config.admin.bind.set_port(0);
            crate::start(loaded.config)
                .await
                .map_err(|e| e.to_string())?
        }
    };
    let addr = proxy
        .listener_addrs()
        .first()
        .map(|(_, a)| *a)
        .ok_or("no listener")?;
    let admin = proxy.admin_addr();
    println!("Spillway demo — config: {source}");
    println!(
        "  simulated upstream: {} (8 at once, 20 ms each: ~400 req/s)",
        up.addr
    );
    println!("  proxy:   curl -i http://{addr}/api/hello");
    println!("  metrics: curl http://{admin}/metrics   status: http://{admin}/status");
    println!("  route `api`: max_in_flight 8, queue 16 for at most 100ms, then 429; breaker: 5 failures, 3s recovery\n");

    let phases = scale_phases(total);
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_max_idle_per_host(1024)
        .build_http();
    let window = Arc::new(Mutex::new(Window::default()));
    let outstanding = Arc::new(Semaphore::new(2048));
    let mut tasks = JoinSet::new();
    println!(
        "{:>4}  {:<9} {:>7} {:>7} {:>8} {:>8} {:>9} {:>6}  answers",
        "t(s)", "phase", "offered", "ok/s", "p50 ms", "p99 ms", "in-flight", "queue"
    );
    let start = Instant::now();
    let mut t = 0u64;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    'outer: for ph in &phases {
        let stats = up.stats.clone();
        stats.failing.store(ph.fail, Ordering::Relaxed);
        for _ in 0..ph.secs {
            let sec_end = start + Duration::from_secs(t + 1);
            let gap = Duration::from_secs_f64(1.0 / ph.rate as f64);
            let mut next = start + Duration::from_secs(t);
            while next < sec_end {
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => {}
                    _ = &mut interrupted => break 'outer,
                }
                // Open loop: requests are sent on schedule whatever the answers do.
                if let Ok(permit) = outstanding.clone().try_acquire_owned() {
                    let (client, window) = (client.clone(), window.clone());
                    let uri = format!("http://{addr}/api/item");
                    tasks.spawn(async move {
                        let _permit = permit;
                        let sent = Instant::now();
                        let req = Request::get(uri).body(Empty::new());
                        let Ok(req) = req else { return };
                        let res = client.request(req).await;
                        let ms = sent.elapsed().as_secs_f64() * 1000.0;
                        let mut w = window.lock();
                        match res {
                            Ok(resp) => {
                                let reason = resp
                                    .headers()
                                    .get(crate::error::REASON_HEADER)
                                    .and_then(|v| v.to_str().ok())
                                    .map(str::to_owned)
                                    .unwrap_or_else(|| format!("{}", resp.status().as_u16()));
                                if resp.status().is_success() {
                                    w.latencies_ms.push(ms);
                                }
                                *w.by_reason.entry(reason).or_default() += 1;
                            }
                            Err(_) => *w.by_reason.entry("client_error".into()).or_default() += 1,
                        }
                    });
                }
                while tasks.try_join_next().is_some() {}
                next += gap;
            }
            t += 1;
            let w = std::mem::take(&mut *window.lock());
            print_row(t, ph, &w, &proxy);
        }
    }
    tasks.abort_all();
    println!("\nDone. Spillway kept the upstream at its capacity (peak {} concurrent) and answered the rest fast.", up.stats.peak.load(Ordering::Relaxed));
    proxy.drain();
    proxy.stopped().await;
    Ok(())
}

fn scale_phases(total: Duration) -> Vec<Phase> {
    let s = total.as_secs().max(3);
    let a = (s * 3 / 10).max(1);
    let b = (s * 4 / 10).max(1);
    let c = s.saturating_sub(a + b).max(1);
    vec![
        Phase {
            name: "normal",
            secs: a,
            rate: 200,
            fail: false,
        },
        Phase {
            name: "overload",
            secs: b,
            rate: 1600,
            fail: false,
        },
        Phase {
            name: "failing",
            secs: c / 2 + c % 2,
            rate: 200,
            fail: true,
        },
        Phase {
            name: "recovery",
            secs: c / 2,
            rate: 200,
            fail: false,
        },
    ]
    .into_iter()
    .filter(|p| p.secs > 0)
    .collect()
}

fn print_row(t: u64, ph: &Phase, w: &Window, proxy: &crate::RunningProxy) {
    let mut l = w.latencies_ms.clone();
    l.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        if l.is_empty() {
            0.0
        } else {
            l[((l.len() - 1) as f64 * p) as usize]
        }
    };
    let (inflight, queue) = proxy.route_load("api").unwrap_or((0, 0));
    let answers: Vec<String> = w
        .by_reason
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "{:>4}  {:<9} {:>7} {:>7} {:>8.1} {:>8.1} {:>9} {:>6}  {}",
        t,
        ph.name,
        ph.rate,
        l.len(),
        pct(0.5),
        pct(0.99),
        inflight,
        queue,
        answers.join(" ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls once; true if not ready.
    fn pending<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        f.poll(&mut cx).is_pending()
    }

    #[test]
    fn capacity_schedule_parses_and_rejects_nonsense() {
        assert_eq!(
            parse_capacity_schedule("8@0s,16@20s, 4@40s").unwrap(),
            vec![
                (Duration::ZERO, 8),
                (Duration::from_secs(20), 16),
                (Duration::from_secs(40), 4)
            ]
        );
        for bad in ["", "8", "x@0s", "0@0s", "8@0s,4@0s", "8@soon"] {
            assert!(parse_capacity_schedule(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn servers_grow_at_once_and_shrink_without_interrupting() {
        let servers = Servers::new(2);
        let a = servers.acquire().await.expect("open");
        let b = servers.acquire().await.expect("open");
        let third = servers.acquire();
        tokio::pin!(third);
        assert!(pending(third.as_mut()));
        // Growing admits the waiter at once.
        servers.set_capacity(3);
        let c = third.await.expect("admitted by growth");
        // Shrinking to 1 with 3 serving: nobody is interrupted, and no one
        // new is admitted until fewer than 1 are served.
        servers.set_capacity(1);
        drop(a);
        drop(b);
        let next = servers.acquire();
        tokio::pin!(next);
        assert!(pending(next.as_mut()), "admitted above the new capacity");
        drop(c);
        let d = next.await.expect("admitted once below capacity");
        let more = servers.acquire();
        tokio::pin!(more);
        assert!(pending(more.as_mut()));
        // Growing again repays nothing owed and adds a server.
        servers.set_capacity(2);
        let _e = more.await.expect("admitted by growth");
        drop(d);
        assert_eq!(servers.sem.available_permits(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_timer_is_made_up_on_the_next_request_only_under_backlog() {
        let servers = Servers::new(1);
        let service = Duration::from_millis(20);
        let mut first = servers.acquire().await.expect("open");
        let began = first.start;
        // The second request waits for the only server.
        let second = servers.acquire();
        tokio::pin!(second);
        assert!(pending(second.as_mut()));
        first.serve(service).await;
        // The handler runs 1 ms after the service ended (a late wake-up).
        tokio::time::advance(Duration::from_millis(1)).await;
        drop(first);
        let mut second = second.await.expect("granted");
        assert_eq!(
            second.start,
            began + service,
            "back to back from the due end"
        );
        second.serve(service).await;
        assert_eq!(Instant::now(), began + 2 * service);
        drop(second);
        // A request that arrives after the server became free is not served
        // shorter: it starts when it arrived.
        tokio::time::advance(Duration::from_millis(1)).await;
        let third = servers.acquire().await.expect("free");
        assert_eq!(third.start, Instant::now());
        drop(third);
        // Idle longer than the catch-up bound: the next one starts now.
        tokio::time::advance(Duration::from_millis(5)).await;
        let fourth = servers.acquire().await.expect("free");
        assert_eq!(fourth.start, Instant::now());
    }

    #[test]
    fn latency_buckets_are_whole_milliseconds_with_an_overflow_bucket() {
        let l = LatencyMs::default();
        l.record(Duration::from_micros(20_900));
        l.record(Duration::from_millis(20));
        l.record(Duration::from_secs(60));
        assert_eq!(l.to_json(), "{\"20\":2,\"2000\":1}");
    }
}
