//! Admin endpoints on `admin.bind`: /metrics /live /ready /config /status /status.json.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use serde_json::json;
use tokio::net::TcpListener;

use crate::error::Reason;
use crate::proxy::Shared;
use crate::shutdown::{Phase, Tracker};

/// What the admin endpoints read.
pub(crate) struct AdminState {
    pub shared: Arc<Shared>,
    /// Fields a reload could not apply (listener/admin binds), for /config.
    pub restart_required: Mutex<Vec<String>>,
}

/// Serves the admin listener until the process stops.
pub(crate) async fn serve(listener: TcpListener, state: Arc<AdminState>, conns: Arc<Tracker>) {
    let stop = state.shared.shutdown.clone();
    let stopped = stop.reached(Phase::Stopped);
    tokio::pin!(stopped);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = &mut stopped => break,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let state = state.clone();
        let tracked = conns.track();
        // Owned by the admin tracker; a scrape is short-lived.
        tokio::spawn(async move {
            let _tracked = tracked;
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(req, &state)) }
            });
            let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            b.http1()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10));
            if let Err(e) = b.serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(error = %e, "admin connection error");
            }
        });
    }
}

fn handle(req: Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => {
            let snap = state.shared.snapshot.load();
            for r in &snap.routes {
                r.state.publish_gauges();
            }
            state
                .shared
                .metrics
                .global_in_flight
                .set(snap.global.in_flight() as i64);
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                state.shared.metrics.render(),
            )
        }
        "/live" => reply(StatusCode::OK, "text/plain", "live\n".into()),
        "/ready" => match state.shared.shutdown.phase() {
            Phase::Running => reply(StatusCode::OK, "text/plain", "ready\n".into()),
            _ => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "draining\n".into(),
            ),
        },
        "/config" => {
            let snap = state.shared.snapshot.load();
            let loaded = snap
                .loaded_at
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            let body = json!({
                "generation": snap.generation,
                "loaded_at_unix": loaded,
                "source": snap.config.source,
                "restart_required": *state.restart_required.lock(),
                "config": snap.config.to_json(),
            });
            reply(StatusCode::OK, "application/json", pretty(&body))
        }
        "/status.json" => reply(
            StatusCode::OK,
            "application/json",
            pretty(&status_json(state)),
        ),
        "/status" => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            status_html(&status_json(state)),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics /live /ready /config /status\n".into(),
        ),
    }
}

/// Live state of every route and upstream.
pub(crate) fn status_json(state: &AdminState) -> serde_json::Value {
    let snap = state.shared.snapshot.load();
    let routes: Vec<_> = snap
        .routes
        .iter()
        .map(|r| {
            let s = r.state.admission.stats();
            let rejections: serde_json::Map<String, serde_json::Value> = REJECTION_REASONS
                .iter()
                .map(|reason| {
                    (
                        reason.as_str().to_string(),
                        json!(r.state.rejections.get(reason.index())),
                    )
                })
                .filter(|(_, v)| v.as_u64() != Some(0))
                .collect();
            json!({
                "name": r.config.name,
                "upstream": r.config.upstream,
                "max_in_flight": s.max_in_flight,
                "in_flight": s.in_flight,
                "queue_depth": s.queue_depth,
                "queue_capacity": s.max_depth,
                "queue_depth_peak": s.queue_depth_peak,
                "lifo_active": s.lifo_active,
                "rejections": rejections,
            })
        })
        .collect();
    let upstreams: Vec<_> = snap
        .upstreams
        .iter()
        .map(|u| {
            json!({
                "name": u.name,
                "endpoints": u.config.endpoints,
                "breaker": u.breaker.as_ref().map(|b| b.state().as_str()),
            })
        })
        .collect();
    json!({
        "generation": snap.generation,
        "phase": format!("{:?}", state.shared.shutdown.phase()).to_lowercase(),
        "global_in_flight": snap.global.in_flight(),
        "global_limit": snap.config.limits.max_in_flight,
        "routes": routes,
        "upstreams": upstreams,
    })
}

const REJECTION_REASONS: [Reason; 7] = [
    Reason::QueueFull,
    Reason::QueueTimeout,
    Reason::GlobalLimit,
    Reason::BreakerOpen,
    Reason::BodyTooLarge,
    Reason::Draining,
    Reason::NoRoute,
];

fn status_html(v: &serde_json::Value) -> String {
    let mut rows = String::new();
    for r in v["routes"].as_array().into_iter().flatten() {
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}/{}</td><td>{}/{} (peak {})</td><td>{}</td></tr>",
            esc(r["name"].as_str().unwrap_or("")),
            esc(r["upstream"].as_str().unwrap_or("")),
            r["in_flight"],
            r["max_in_flight"],
            r["queue_depth"],
            r["queue_capacity"],
            r["queue_depth_peak"],
            esc(&r["rejections"].to_string()),
        ));
    }
    let mut ups = String::new();
    for u in v["upstreams"].as_array().into_iter().flatten() {
        ups.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(u["name"].as_str().unwrap_or("")),
            esc(&u["endpoints"].to_string()),
            esc(u["breaker"].as_str().unwrap_or("none")),
        ));
    }
    format!(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=2><title>Spillway status</title>\
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style></head>\
<body><h1>Spillway</h1><p>config generation {} &middot; {} &middot; global in-flight {}/{}</p>\
<h2>Routes</h2><table><tr><th>route</th><th>upstream</th><th>in-flight/cap</th><th>queue/capacity</th><th>rejections</th></tr>{}</table>\
<h2>Upstreams</h2><table><tr><th>upstream</th><th>endpoints</th><th>breaker</th></tr>{}</table></body></html>",
        v["generation"], esc(v["phase"].as_str().unwrap_or("")), v["global_in_flight"], v["global_limit"], rows, ups
    )
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| "{}".into())
}

fn reply(status: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}
