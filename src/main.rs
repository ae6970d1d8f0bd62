//! `spillway` command line: thin; everything real lives in the library.
//! Exit codes: 0 clean shutdown, 1 config error, 2 usage error, 3 bind/runtime error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use spillway::config;

// The binary's heap allocator, chosen at build time (Cargo features; see
// docs/benchmarks.md, "Allocator", for the measurements behind the default).
// jemalloc wins when both features are on, so `--features jemalloc` alone
// switches over; neither feature means the system (glibc) malloc.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "spillway",
    version,
    about = "Sidecar HTTP proxy: per-route caps, bounded queues, timeouts, safe retries, circuit breakers"
)]
struct Cli {
    /// Log filter (env-filter syntax), e.g. `info` or `spillway=debug`.
    #[arg(long, global = true, env = "SPILLWAY_LOG")]
    log: Option<String>,
    /// Log format: text for people, json for Kubernetes log pipelines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve with a config file (re-read on change and on SIGHUP).
    Run {
        /// Config file; defaults to $SPILLWAY_CONFIG, then config/spillway.yaml.
        #[arg(long, env = "SPILLWAY_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate a config file: exit 0 with a summary, or 1 listing every problem.
    Check {
        #[arg(long, env = "SPILLWAY_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Self-contained tour: a simulated upstream, Spillway in front, load, a live table.
    Demo {
        /// How long to run, in seconds.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// A simulated upstream service (used by the demo and the load benchmarks).
    Upstream {
        #[arg(long, default_value = "127.0.0.1:3000")]
        bind: std::net::SocketAddr,
        /// Time each request takes once it is being served, e.g. 20ms.
        #[arg(long, default_value = "0ms", value_parser = parse_dur)]
        service_time: Duration,
        /// Requests served at once; the rest wait inside the upstream.
        #[arg(long, default_value_t = 1024)]
        capacity: usize,
        /// Capacity changing over time, e.g. `8@0s,16@20s,4@40s` (overrides
        /// --capacity).
        #[arg(long, value_parser = parse_schedule)]
        capacity_schedule: Option<Schedule>,
        /// Fraction of requests answered 503 (0.0-1.0).
        #[arg(long, default_value_t = 0.0)]
        fail_rate: f64,
        /// Response body size in bytes.
        #[arg(long, default_value_t = 2)]
        body_bytes: usize,
        /// Worker threads (default 1: an upstream beside a sidecar shares its core).
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

/// A parsed `--capacity-schedule` (one flag value, not a list of flags).
#[derive(Clone, Debug)]
struct Schedule(Vec<(Duration, usize)>);

fn parse_schedule(s: &str) -> Result<Schedule, String> {
    spillway::demo::parse_capacity_schedule(s).map(Schedule)
}

fn parse_dur(s: &str) -> Result<Duration, String> {
    config::units::parse_duration(s)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // clap prints help/version with exit 0 and usage errors with 2.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    init_logging(cli.log.as_deref(), cli.log_format);
    match cli.cmd {
        Cmd::Check { config } => check(&config_path(config)),
        Cmd::Run { config } => run(&config_path(config)),
        Cmd::Demo { seconds } => with_runtime(None, async move {
            spillway::demo::run(Duration::from_secs(seconds)).await
        }),
        Cmd::Upstream {
            bind,
            service_time,
            capacity,
            capacity_schedule,
            fail_rate,
            body_bytes,
            threads,
        } => with_runtime(Some(threads), async move {
            let cfg = spillway::demo::SimConfig {
                service_time,
                capacity,
                fail_rate,
                body_bytes,
                capacity_schedule: capacity_schedule.map(|s| s.0).unwrap_or_default(),
            };
            spillway::demo::serve_upstream(bind, cfg).await
        }),
    }
}

fn config_path(p: Option<PathBuf>) -> PathBuf {
    p.unwrap_or_else(|| PathBuf::from("config/spillway.yaml"))
}

fn init_logging(filter: Option<&str>, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter.unwrap_or("info"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn check(path: &Path) -> ExitCode {
    match config::load_file(path) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            println!("{}", loaded.config.summary());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            eprintln!(
                "{}: {} problem{}",
                path.display(),
                e.issues.len(),
                if e.issues.len() == 1 { "" } else { "s" }
            );
            ExitCode::from(1)
        }
    }
}

fn with_runtime<F>(threads: Option<usize>, fut: F) -> ExitCode
where
    F: std::future::Future<Output = Result<(), String>>,
{
    // One worker: the current-thread scheduler does the same work without
    // cross-thread wake-ups and work-stealing bookkeeping (the sidecar case).
    let mut b = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    b.enable_all();
    if let Some(n) = threads.filter(|n| *n > 1) {
        b.worker_threads(n);
    }
    let rt = match b.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(3);
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(3)
        }
    }
}

fn run(path: &Path) -> ExitCode {
    let loaded = match config::load_file(path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    for w in &loaded.warnings {
        tracing::warn!(%w, "config warning");
    }
    let threads = loaded.config.runtime.worker_threads.unwrap_or_else(|| {
        // std reads the cgroup CPU quota on Linux, so this is what we may use.
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let path = path.to_path_buf();
    with_runtime(Some(threads), async move {
        let proxy = spillway::start(loaded.config)
            .await
            .map_err(|e| e.to_string())?;
        spillway::serve_signals_and_reloads(proxy, path).await
    })
}
