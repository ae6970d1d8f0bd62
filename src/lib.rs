//! Spillway: a sidecar HTTP proxy with per-route concurrency caps, bounded
//! queues, stage timeouts, safe retries and circuit breakers, tuned in one YAML
//! file and visible as Prometheus metrics.
//!
//! Tests and `spillway demo` use [`start`]; `main.rs` is a thin CLI around it.

mod admin;
mod app;
pub mod config;
pub mod demo;
pub mod error;
#[doc(hidden)]
pub mod fuzz_api;
mod metrics;
mod proxy;
mod registry;
mod series;
pub(crate) mod server;
mod shutdown;
mod tls;

pub use app::{
    reload_file, serve_signals_and_reloads, start, ConfigWatch, ReloadError, RunningProxy,
    StartError,
};

/// Internals exposed for the criterion benches only; not a stable API.
#[doc(hidden)]
pub mod bench_api {
    pub mod admission {
        pub use crate::proxy::admission::{Admission, AdmissionLimits, Discipline, Policy, Ticket};
    }
    pub mod adaptive {
        pub use crate::proxy::adaptive::{AdaptiveLimit, Settings};
    }
    pub mod router {
        pub use crate::proxy::router::Router;
    }
    pub mod headers {
        pub use crate::proxy::headers::{
            add_forwarding, forwarded, ip_header_value, strip_hop_by_hop, Forwarded,
        };
    }
}
