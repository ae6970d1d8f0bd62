//! Configuration: parse -> validate -> typed [`Config`].
//!
//! `spillway check` and every reload go through [`load_file`], so what `check`
//! accepts, a reload accepts. Every problem is reported at once, each with its
//! file, line, column and field path.

mod locate;
pub(crate) mod schema;
pub mod units;
mod validate;
pub(crate) mod watch;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use serde::Serialize;

pub use units::{Dur, Size};

/// Largest config file accepted; a sidecar config is a few KiB.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// A validated configuration. Only this type reaches the data path.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub version: u32,
    pub listeners: Vec<ListenerConfig>,
    pub admin: AdminConfig,
    pub runtime: RuntimeConfig,
    pub limits: LimitsConfig,
    pub drain: DrainConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    /// Where it came from (file name and a hash of its bytes).
    pub source: SourceInfo,
}

/// Identity of the text a config was loaded from.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct SourceInfo {
    pub file: String,
    /// FNV-1a 64 of the file's bytes, hex: tells whether a file event changed anything.
    pub hash: String,
}

/// What a listener speaks (`listeners[].protocol`): HTTP/1.1, h2c, or both on one port.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    Http1,
    Http2,
    Auto,
}

/// The `listeners[]` entry as validated: where clients connect and the per-connection bounds.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub protocol: ListenerProtocol,
    pub tls: Option<ListenerTls>,
    pub request_header_timeout: Dur,
    pub idle_timeout: Dur,
    pub max_connections: usize,
    pub max_header_bytes: Size,
    /// Plain HTTP/1.1 requests are served by Spillway's own codec, the rest
    /// by hyper; `false`: hyper serves every request.
    pub http1_fast_path: bool,
}

/// A listener's `tls:` block as validated; with `client_ca`, client certificates are verified.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ListenerTls {
    pub cert: PathBuf,
    #[serde(serialize_with = "redact")]
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    /// A client that has not completed its handshake by then is dropped.
    pub handshake_timeout: Dur,
    /// Handshakes in progress at once; accept pauses above it.
    pub max_handshakes: usize,
    /// Header carrying the verified client certificate identity upstream;
    /// always stripped from incoming requests when set.
    #[serde(serialize_with = "ser_opt_header")]
    pub forward_client_identity_header: Option<HeaderName>,
}

/// The `admin:` section as validated: where `/metrics`, `/ready` and the other admin pages are.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AdminConfig {
    pub bind: SocketAddr,
}

/// The `runtime:` section as validated; read once at start, so a change needs a restart.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RuntimeConfig {
    /// `None` = auto (CPUs this process may use, cgroup quota respected).
    pub worker_threads: Option<usize>,
}

/// The `limits:` section as validated: the cap over all routes (`global_limit` beyond it).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LimitsConfig {
    pub max_in_flight: usize,
}

/// The `drain:` section as validated: `/ready` fails for `grace`, then in-flight gets `timeout`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DrainConfig {
    pub grace: Dur,
    pub timeout: Dur,
}

/// What an upstream speaks (`upstreams.<name>.protocol`): HTTP/1.1, or HTTP/2 (h2c or ALPN).
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    Http1,
    Http2,
}

/// The `upstreams.<name>` entry as validated: endpoints, TLS, pooling and the optional breaker.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct UpstreamConfig {
    pub name: String,
    /// `host:port` strings; hosts are resolved when connecting.
    pub endpoints: Vec<String>,
    pub tls: Option<UpstreamTls>,
    pub connect_timeout: Dur,
    pub pool: PoolConfig,
    pub protocol: UpstreamProtocol,
    pub circuit_breaker: Option<BreakerSettings>,
}

/// An upstream's `tls:` block as validated: server name, trust roots, optional client certificate.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct UpstreamTls {
    pub server_name: Option<String>,
    pub ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    #[serde(serialize_with = "redact_opt")]
    pub client_key: Option<PathBuf>,
}

/// An upstream's `pool:` block as validated: how many idle connections are kept, and how long.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PoolConfig {
    pub max_idle_per_endpoint: usize,
    pub idle_timeout: Dur,
}

/// An upstream's `circuit_breaker:` block as validated: when it opens, how it probes, if it acts.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BreakerSettings {
    pub failure_threshold: u32,
    pub failure_rate: Option<FailureRateSettings>,
    pub recovery_timeout: Dur,
    pub half_open_calls: u32,
    pub failure_on: FailureOn,
    pub mode: Mode,
}

/// A breaker's `failure_rate:` block as validated: also opens at a failure ratio of `threshold`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FailureRateSettings {
    pub threshold: f64,
    pub window: Dur,
    pub min_requests: u32,
}

/// What counts as a breaker failure.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct FailureOn {
    pub connect: bool,
    pub timeout: bool,
    #[serde(rename = "5xx")]
    pub status_5xx: bool,
}

/// The `routes[]` entry as validated, `defaults:` merged in: matching, admission, retries, replies.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RouteConfig {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: MatchConfig,
    pub upstream: String,
    pub concurrency: ConcurrencyConfig,
    pub queue: QueueConfig,
    pub timeouts: TimeoutsConfig,
    pub retries: RetriesConfig,
    pub shed: ShedConfig,
    pub fallback: Option<FallbackConfig>,
    pub max_request_body: Size,
    pub priority: Option<PriorityConfig>,
    pub fairness: Option<FairnessConfig>,
    pub mode: Mode,
}

/// A route's `match:` block as validated; every given condition must hold for the route to match.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MatchConfig {
    pub path: PathMatch,
    #[serde(serialize_with = "ser_methods")]
    pub methods: Option<Vec<Method>>,
    pub host: Option<String>,
    #[serde(serialize_with = "ser_headers")]
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// Which `match.path_*` condition a route uses; `Any` when none is given.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    Any,
    Prefix(String),
    Exact(String),
    Regex(PathRegex),
}

/// A `path_regex` as written, with its compiled form anchored to the whole
/// path (`^(?:...)$`, as Envoy's `safe_regex`). Compiled once by validation;
/// the router shares it, and a reload reuses it while the pattern stays.
/// Equality and serialization use the source.
#[derive(Clone, Debug)]
pub struct PathRegex {
    pub source: String,
    pub anchored: regex::Regex,
}

impl PartialEq for PathRegex {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for PathRegex {}

impl Serialize for PathRegex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

/// `enforce` (the default) or `shadow`: decide, count, but do not act.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Enforce,
    Shadow,
}

/// Criticality classes of a route (`priority:`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PriorityConfig {
    /// The request header naming the class (forwarded unchanged).
    #[serde(serialize_with = "ser_header")]
    pub header: HeaderName,
    /// Class names, highest first.
    pub classes: Vec<String>,
    /// Index in `classes` of a request without, or with an unknown, value.
    pub default: usize,
    /// Share of the limit reserved per class, in `classes` order (0 where none).
    pub reserved: Vec<f64>,
}

impl PriorityConfig {
    /// The class index of a request carrying `value` in the class header.
    pub fn class_of(&self, value: Option<&[u8]>) -> usize {
        value
            .and_then(|v| self.classes.iter().position(|c| c.as_bytes() == v))
            .unwrap_or(self.default)
    }
}

/// Per-caller fairness of a route (`fairness:`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FairnessConfig {
    pub key: FairKey,
    /// Keys tracked at once; further keys share one overflow key.
    pub max_keys: usize,
}

/// Where a request's fairness key comes from.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum FairKey {
    /// A request header's value (a missing header is the empty key).
    Header(#[serde(serialize_with = "ser_header")] HeaderName),
    /// The client's IP address.
    ClientIp,
    /// The verified mTLS client identity.
    ClientIdentity,
}

/// A route's concurrency cap: fixed, or adaptive (`max_in_flight: auto`).
#[derive(Clone, Debug, PartialEq)]
pub struct ConcurrencyConfig {
    /// The fixed cap; with `adaptive`, the limit it starts at (`initial`).
    pub max_in_flight: usize,
    /// Set with `max_in_flight: auto`: the limit follows the upstream.
    pub adaptive: Option<AdaptiveConfig>,
}

/// The bounds and sensitivity of an adaptive limit.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct AdaptiveConfig {
    /// Lowest limit.
    pub min: usize,
    /// Highest limit.
    pub max: usize,
    /// Limit at start.
    pub initial: usize,
    /// Latency up to `tolerance` x the no-load latency is healthy.
    pub tolerance: f64,
}

/// Written back as it was configured: `max_in_flight: auto` with its
/// `adaptive` block, or the number.
impl Serialize for ConcurrencyConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        match &self.adaptive {
            Some(a) => {
                m.serialize_entry("max_in_flight", "auto")?;
                m.serialize_entry("adaptive", a)?;
            }
            None => m.serialize_entry("max_in_flight", &self.max_in_flight)?,
        }
        m.end()
    }
}

/// Order in which a route's queue hands out freed slots (`queue.discipline`).
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum QueueDiscipline {
    Fifo,
    AdaptiveLifo,
}

/// A route's `queue:` block as validated: how many requests may wait beyond the cap, how long.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct QueueConfig {
    pub max_depth: usize,
    pub max_wait: Dur,
    pub discipline: QueueDiscipline,
}

/// A route's `timeouts:` block as validated: whole exchange, each attempt, gap between chunks.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TimeoutsConfig {
    pub request: Dur,
    pub per_try: Option<Dur>,
    pub response_body_idle: Dur,
}

/// A route's `retries:` block as validated: how often, on what, with what backoff and budget.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RetriesConfig {
    pub max_attempts: u32,
    pub on: RetryOnConfig,
    pub backoff: BackoffConfig,
    pub budget: BudgetSettings,
    pub max_buffered_body: Size,
    #[serde(serialize_with = "ser_opt_header")]
    pub idempotency_key_header: Option<HeaderName>,
}

/// Conditions that make an attempt retryable.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, Default)]
pub struct RetryOnConfig {
    pub connect: bool,
    pub reset: bool,
    pub timeout: bool,
    pub statuses: Vec<u16>,
}

/// The `retries.backoff:` block as validated: bounds of the exponential backoff with full jitter.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BackoffConfig {
    pub base: Dur,
    pub max: Dur,
}

/// The `retries.budget:` block as validated: retries at most `ratio` x requests plus a floor.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BudgetSettings {
    pub ratio: f64,
    pub min_per_second: u32,
}

/// A route's `shed:` block as validated: status and `Retry-After` of queue and global-limit sheds.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ShedConfig {
    pub status: u16,
    pub retry_after: Dur,
}

/// A route's `fallback:` block as validated: the reply sent instead of shed and `breaker_open`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FallbackConfig {
    pub status: u16,
    #[serde(serialize_with = "ser_headers")]
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: String,
}

/// A config that loaded, with its warnings.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<ConfigIssue>,
}

/// One problem (or warning) in a config file.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ConfigIssue {
    pub file: String,
    pub line: Option<u64>,
    pub column: Option<u64>,
    /// Field path like `routes[2].queue.max_wait`; empty for the whole file.
    pub path: String,
    pub message: String,
}

/// Every problem found in a config file. Display prints one per line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub issues: Vec<ConfigIssue>,
}

// === impl Config ===

impl Config {
    /// The upstream with this name.
    pub fn upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    /// Effective config as JSON for `/config` (secrets redacted by the serializers).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// The one-line summary `spillway check` prints.
    pub fn summary(&self) -> String {
        format!(
            "{}: ok ({} listener{}, {} upstream{}, {} route{})",
            self.source.file,
            self.listeners.len(),
            plural(self.listeners.len()),
            self.upstreams.len(),
            plural(self.upstreams.len()),
            self.routes.len(),
            plural(self.routes.len()),
        )
    }

    /// Timeout the whole process needs to drain.
    pub fn drain_total(&self) -> Duration {
        self.drain.grace.0 + self.drain.timeout.0
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

// === impl ConfigIssue ===

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        if self.path.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.path, self.message)
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{issue}")?;
        }
        Ok(())
    }
}

// === loading ===

/// Reads, parses and validates a config file.
pub fn load_file(path: &Path) -> Result<Loaded, ConfigError> {
    let file = path.display().to_string();
    let whole = |message: String| ConfigError {
        issues: vec![ConfigIssue {
            file: file.clone(),
            line: None,
            column: None,
            path: String::new(),
            message,
        }],
    };
    let meta = std::fs::metadata(path).map_err(|e| whole(format!("cannot read: {e}")))?;
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(whole(format!(
            "file is {} bytes; the limit is {MAX_CONFIG_BYTES}",
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| whole(format!("cannot read: {e}")))?;
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => return Err(not_utf8(&file, e.as_bytes(), e.utf8_error())),
    };
    load_str(&text, &file)
}

/// Invalid UTF-8, reported at its line and column like every other problem
/// (columns count characters, as YAML positions do).
fn not_utf8(file: &str, bytes: &[u8], e: std::str::Utf8Error) -> ConfigError {
    let good = &bytes[..e.valid_up_to()];
    // Everything before `valid_up_to` is valid UTF-8 by definition.
    let good = std::str::from_utf8(good).unwrap_or_default();
    let line_start = good.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = good.matches('\n').count() as u64 + 1;
    let column = good[line_start..].chars().count() as u64 + 1;
    let bad: Vec<String> = bytes[e.valid_up_to()..]
        .iter()
        .take(e.error_len().unwrap_or(1).max(1))
        .map(|b| format!("0x{b:02x}"))
        .collect();
    ConfigError {
        issues: vec![ConfigIssue {
            file: file.to_string(),
            line: Some(line),
            column: Some(column),
            path: String::new(),
            message: format!(
                "not UTF-8: invalid byte {} (a config file must be UTF-8 text)",
                bad.join(" ")
            ),
        }],
    }
}

/// Parses and validates config text; `source_name` is used in messages.
pub fn load_str(text: &str, source_name: &str) -> Result<Loaded, ConfigError> {
    validate::load(text, source_name)
}

/// FNV-1a: stable, dependency-free content hash for change detection (not security).
pub fn content_hash(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

// === serializers for /config ===

fn redact<S: serde::Serializer>(_: &PathBuf, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str("<redacted>")
}

fn redact_opt<S: serde::Serializer>(v: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("<redacted>"),
        None => s.serialize_none(),
    }
}

fn ser_methods<S: serde::Serializer>(v: &Option<Vec<Method>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(list) => s.collect_seq(list.iter().map(|m| m.as_str())),
        None => s.serialize_none(),
    }
}

fn ser_headers<S: serde::Serializer>(
    v: &[(HeaderName, HeaderValue)],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(
        v.iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap_or("<binary>"))),
    )
}

fn ser_header<S: serde::Serializer>(v: &HeaderName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v.as_str())
}

fn ser_opt_header<S: serde::Serializer>(v: &Option<HeaderName>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(h) => s.serialize_str(h.as_str()),
        None => s.serialize_none(),
    }
}
