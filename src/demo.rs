//! `spillway demo` and `spillway upstream`.
//!
//! The simulated upstream serves at most `capacity` requests at once, each for
//! `service_time`; the rest wait inside it (like a real service's thread pool).
//! `GET /__stats` returns `{"peak_concurrency","current","served"}` and
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
use tokio::net::TcpListener;
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
}

/// Counters of the simulated service.
#[derive(Default)]
pub struct SimStats {
    pub current: AtomicUsize,
    pub peak: AtomicUsize,
    pub served: AtomicU64,
    pub failing: AtomicBool,
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
    let listener = TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let stats = Arc::new(SimStats::default());
    let st = stats.clone();
    let task = tokio::spawn(async move {
        let cap = Arc::new(Semaphore::new(cfg.capacity.max(1)));
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

async fn sim_handle(
    req: Request<Incoming>,
    cap: Arc<Semaphore>,
    st: Arc<SimStats>,
    cfg: SimConfig,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, Infallible> {
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/__stats") => {
            let j = format!(
                "{{\"peak_concurrency\":{},\"current\":{},\"served\":{}}}",
                st.peak.load(Ordering::Relaxed),
                st.current.load(Ordering::Relaxed),
                st.served.load(Ordering::Relaxed)
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
    // Drain the request body (bounded by the proxy's max_request_body).
    let _ = req.into_body().collect().await;
    let fail = st.failing.load(Ordering::Relaxed)
        || (cfg.fail_rate > 0.0 && fastrand::f64() < cfg.fail_rate);
    let resp = match cap.acquire().await {
        Ok(_permit) => {
            if !cfg.service_time.is_zero() {
                tokio::time::sleep(cfg.service_time).await;
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
        Err(_) => {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r
        }
    };
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
