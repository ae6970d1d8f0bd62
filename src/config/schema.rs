//! Raw config as written in YAML. Every struct denies unknown fields; values that
//! may come from `defaults:` are `Option` so that a route can be merged field by
//! field. Raw types never reach the data path: `validate.rs` turns them into the
//! typed `Config`.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::units::{Dur, Size};

/// The whole file.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub version: Option<u32>,
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub runtime: RawRuntime,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub drain: RawDrain,
    #[serde(default)]
    pub upstreams: BTreeMap<String, RawUpstream>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub defaults: Option<RawRoute>,
}

/// A `listeners[]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListener {
    pub name: String,
    pub bind: String,
    pub protocol: Option<String>,
    pub tls: Option<RawListenerTls>,
    pub request_header_timeout: Option<Dur>,
    pub idle_timeout: Option<Dur>,
    pub max_connections: Option<u64>,
    pub max_header_bytes: Option<Size>,
    pub http1_fast_path: Option<bool>,
}

/// A listener's `tls:` block as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListenerTls {
    pub cert: String,
    pub key: String,
    pub client_ca: Option<String>,
    pub handshake_timeout: Option<Dur>,
    pub max_handshakes: Option<u64>,
    pub forward_client_identity_header: Option<String>,
}

/// The `admin:` section as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub bind: Option<String>,
}

/// The `runtime:` section as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRuntime {
    /// `auto` or a positive number.
    pub worker_threads: Option<RawThreads>,
}

/// `runtime.worker_threads` as written: a count, or a word (only `auto` is valid).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawThreads {
    Count(u64),
    Word(String),
}

/// The `limits:` section as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub max_in_flight: Option<u64>,
}

/// The `drain:` section as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDrain {
    pub grace: Option<Dur>,
    pub timeout: Option<Dur>,
}

/// An `upstreams.<name>` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstream {
    pub endpoints: Vec<String>,
    pub tls: Option<RawUpstreamTls>,
    pub connect_timeout: Option<Dur>,
    pub pool: Option<RawPool>,
    pub protocol: Option<String>,
    pub circuit_breaker: Option<RawBreaker>,
}

/// An upstream's `tls:` block as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstreamTls {
    pub server_name: Option<String>,
    pub ca: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
}

/// An upstream's `pool:` block as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPool {
    pub max_idle_per_endpoint: Option<u64>,
    pub idle_timeout: Option<Dur>,
}

/// An upstream's `circuit_breaker:` block as written; validation checks `failure_on` and `mode`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBreaker {
    pub failure_threshold: Option<u64>,
    pub failure_rate: Option<RawFailureRate>,
    pub recovery_timeout: Option<Dur>,
    pub half_open_calls: Option<u64>,
    pub failure_on: Option<Vec<String>>,
    pub mode: Option<String>,
}

/// A breaker's `failure_rate:` block as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFailureRate {
    pub threshold: f64,
    pub window: Option<Dur>,
    pub min_requests: Option<u64>,
}

/// A route, and also the `defaults:` block (which may not set `name` or `match`).
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub name: Option<String>,
    #[serde(rename = "match")]
    pub matcher: Option<RawMatch>,
    pub upstream: Option<String>,
    pub concurrency: Option<RawConcurrency>,
    pub queue: Option<RawQueue>,
    pub timeouts: Option<RawTimeouts>,
    pub retries: Option<RawRetries>,
    pub shed: Option<RawShed>,
    pub fallback: Option<RawFallback>,
    pub max_request_body: Option<Size>,
    pub priority: Option<RawPriority>,
    pub fairness: Option<RawFairness>,
    pub mode: Option<String>,
}

/// A route's `priority:` block as written; `reserved` maps class names to shares.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPriority {
    pub header: Option<String>,
    pub classes: Option<Vec<String>>,
    pub default: Option<String>,
    pub reserved: Option<BTreeMap<String, RawShare>>,
}

/// A share of the limit: `20%`, or a fraction like `0.2`.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub(crate) enum RawShare {
    Number(f64),
    Text(String),
}

/// A route's `fairness:` block as written.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFairness {
    pub key: Option<RawFairKey>,
    pub max_keys: Option<u64>,
}

/// `fairness.key` as written; validation requires exactly one of its fields.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFairKey {
    pub header: Option<String>,
    pub client_ip: Option<bool>,
    pub client_identity: Option<bool>,
}

/// A route's `match:` block as written; validation allows at most one `path_*` field.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMatch {
    pub path_prefix: Option<String>,
    pub path_exact: Option<String>,
    pub path_regex: Option<String>,
    pub methods: Option<Vec<String>>,
    pub host: Option<String>,
    pub headers: Option<BTreeMap<String, String>>,
}

/// A route's `concurrency:` block as written.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConcurrency {
    /// A number, or `auto` for the adaptive limit.
    pub max_in_flight: Option<RawMaxInFlight>,
    pub adaptive: Option<RawAdaptive>,
}

/// `concurrency.max_in_flight` as written: a count, or a word (only `auto` is valid).
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub(crate) enum RawMaxInFlight {
    Count(u64),
    Word(String),
}

/// `concurrency.adaptive:` as written; only meaningful with `max_in_flight: auto`.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdaptive {
    pub min: Option<u64>,
    pub max: Option<u64>,
    pub initial: Option<u64>,
    pub tolerance: Option<f64>,
}

/// A route's `queue:` block as written.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQueue {
    pub max_depth: Option<u64>,
    pub max_wait: Option<Dur>,
    pub discipline: Option<String>,
}

/// `per_try: null` is the same as leaving it out.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTimeouts {
    pub request: Option<Dur>,
    pub per_try: Option<Dur>,
    pub response_body_idle: Option<Dur>,
}

/// A route's `retries:` block as written.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetries {
    pub max_attempts: Option<u64>,
    pub on: Option<Vec<RawRetryOn>>,
    pub backoff: Option<RawBackoff>,
    pub budget: Option<RawBudget>,
    pub max_buffered_body: Option<Size>,
    pub idempotency_key_header: Option<String>,
}

/// `on:` mixes words (`connect`) and status codes (`503`).
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub(crate) enum RawRetryOn {
    Status(u64),
    Word(String),
}

/// The `retries.backoff:` block as written.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBackoff {
    pub base: Option<Dur>,
    pub max: Option<Dur>,
}

/// The `retries.budget:` block as written.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBudget {
    pub ratio: Option<f64>,
    pub min_per_second: Option<u64>,
}

/// A route's `shed:` block as written.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawShed {
    pub status: Option<u64>,
    pub retry_after: Option<Dur>,
}

/// A route's `fallback:` block as written.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFallback {
    pub status: Option<u64>,
    pub headers: Option<BTreeMap<String, String>>,
    pub body: Option<String>,
}
