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

use crate::config::units::format_duration;
use crate::config::QueueDiscipline;
use crate::error::Reason;
use crate::metrics::{Label, StatusClass};
use crate::proxy::outcome::{ShadowLabel, TimeoutStage};
use crate::proxy::Shared;
use crate::registry::Route;
use crate::shutdown::{Phase, Tracker};

mod series;

pub(crate) use series::StatusSeries;

/// What the admin endpoints read.
pub(crate) struct AdminState {
    pub shared: Arc<Shared>,
    /// Fields a reload could not apply (listener/admin binds), for /config.
    pub restart_required: Mutex<Vec<String>>,
    /// The last minutes of every route, for the charts on /status.
    pub series: Arc<StatusSeries>,
}

/// Samples every route once a second for /status until aborted at shutdown
/// (owned by the caller's task set, like the admin listener).
pub(crate) async fn sample(state: Arc<AdminState>) {
    use tracing::Instrument;
    series::run(state.shared.clone(), state.series.clone())
        .instrument(tracing::info_span!("status_sampler"))
        .await;
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
                r.publish_gauges();
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
        "/status.json" => no_store(reply(
            StatusCode::OK,
            "application/json",
            pretty(&status_json(state)),
        )),
        "/status" => no_store(reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            status_html(&status_json(state)),
        )),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics /live /ready /config /status\n".into(),
        ),
    }
}

/// How often the /status page refreshes itself from /status.json.
const STATUS_REFRESH_SECS: u64 = 2;

/// Live state of every route and upstream: what `/status.json` serves and
/// `/status` renders. Keys are only ever added; scripts may rely on them.
pub(crate) fn status_json(state: &AdminState) -> serde_json::Value {
    let snap = state.shared.snapshot.load();
    let routes: Vec<serde_json::Value> = snap
        .routes
        .iter()
        .map(|r| route_status(r, &state.series.view(&r.config.name)))
        .collect();
    let upstreams: Vec<_> = snap
        .upstreams
        .iter()
        .map(|u| {
            let mine: Vec<&serde_json::Value> = routes
                .iter()
                .filter(|r| r["upstream"].as_str() == Some(u.name.as_str()))
                .collect();
            let in_flight: u64 = mine.iter().filter_map(|r| r["in_flight"].as_u64()).sum();
            let names: Vec<&serde_json::Value> = mine.iter().map(|r| &r["name"]).collect();
            let settings = u.config.circuit_breaker.as_ref().map(|b| {
                json!({
                    "failure_threshold": b.failure_threshold,
                    "failure_rate": b.failure_rate.as_ref().map(|f| json!({
                        "threshold": f.threshold,
                        "window": format_duration(f.window.0),
                        "min_requests": f.min_requests,
                    })),
                    "recovery_timeout": format_duration(b.recovery_timeout.0),
                    "half_open_calls": b.half_open_calls,
                })
            });
            json!({
                "name": u.name,
                "endpoints": u.config.endpoints,
                "breaker": u.breaker.as_ref().map(|b| b.state().as_str()),
                "breaker_settings": settings,
                "routes": names,
                "in_flight": in_flight,
            })
        })
        .collect();
    let loaded = snap
        .loaded_at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "generation": snap.generation,
        "loaded_at_unix": loaded,
        "source": snap.config.source.file,
        "phase": format!("{:?}", state.shared.shutdown.phase()).to_lowercase(),
        "global_in_flight": snap.global.in_flight(),
        "global_limit": snap.config.limits.max_in_flight,
        "restart_required": *state.restart_required.lock(),
        "refresh_seconds": STATUS_REFRESH_SECS,
        "series_interval_seconds": series::INTERVAL.as_secs(),
        "series_capacity": series::SAMPLES,
        "series_last_unix": state.series.last_unix(),
        "routes": routes,
        "upstreams": upstreams,
    })
}

/// One route's live state, the limits it runs under and its last minutes.
fn route_status(r: &Route, view: &series::View) -> serde_json::Value {
    let st = &r.state;
    let s = st.admission.stats();
    let rejections: serde_json::Map<String, serde_json::Value> = Reason::ALL
        .iter()
        .filter(|reason| reason.is_rejection())
        .map(|&reason| {
            (
                reason.as_str().to_string(),
                json!(st.rejections.get(reason)),
            )
        })
        .filter(|(_, v)| v.as_u64() != Some(0))
        .collect();
    let rejections_total = st.rejections.total();
    let mut requests = serde_json::Map::new();
    for &class in StatusClass::ALL {
        let n: u64 = Reason::ALL
            .iter()
            .map(|&reason| st.requests.get(class, reason))
            .sum();
        if n > 0 {
            requests.insert(class.as_str().to_string(), json!(n));
        }
    }
    let requests_total = st.requests.total();
    let timeouts: serde_json::Map<String, serde_json::Value> = TimeoutStage::ALL
        .iter()
        .map(|&stage| (stage.as_str().to_string(), json!(st.timeouts.get(stage))))
        .filter(|(_, v)| v.as_u64() != Some(0))
        .collect();
    let retries_total = st.retries.total();
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
        "rejections_total": rejections_total,
        "discipline": match r.config.queue.discipline {
            QueueDiscipline::Fifo => "fifo",
            QueueDiscipline::AdaptiveLifo => "adaptive_lifo",
        },
        "max_wait": format_duration(r.config.queue.max_wait.0),
        "request_timeout": format_duration(r.config.timeouts.request.0),
        "per_try_timeout": r.config.timeouts.per_try.map(|d| format_duration(d.0)),
        "breaker": r.upstream.breaker.as_ref().map(|b| b.state().as_str()),
        "requests": requests,
        "requests_total": requests_total,
        "timeouts": timeouts,
        "retries_total": retries_total,
        "retry_budget_exhausted": st.budget_exhausted.get(),
        "rejections_per_s_recent": view.recent_rejections_per_s.map(round2),
        "series": series_json(view),
        "mode": r.config.mode,
        "classes": classes_json(r, &s),
        "fairness_keys": r.config.fairness.as_ref().map(|_| s.keys),
        "shadow_decisions": shadow_json(r),
    })
}

/// Per priority class: permits held, admitted and shed so far (empty
/// without classes).
fn classes_json(r: &Route, s: &crate::proxy::admission::AdmissionStats) -> serde_json::Value {
    let Some(p) = &r.config.priority else {
        return json!([]);
    };
    let list: Vec<serde_json::Value> = p
        .classes
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let c = r.classes.get(i);
            json!({
                "name": name,
                "in_flight": s.class_in_flight.get(i).copied().unwrap_or(0),
                "admitted": c.map_or(0, |c| c.admitted.get()),
                "shed": c.map_or(0, |c| c.shed.get()),
            })
        })
        .collect();
    json!(list)
}

/// What shadow mode would have done, by decision (only those that happened).
fn shadow_json(r: &Route) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = ShadowLabel::ALL
        .iter()
        .map(|&d| (d.as_str().to_string(), json!(r.state.shadow.get(d))))
        .filter(|(_, v)| v.as_u64() != Some(0))
        .collect();
    json!(map)
}

/// One array per chart, oldest sample first, one sample per
/// `series_interval_seconds`; the last one was taken at `series_last_unix`.
fn series_json(view: &series::View) -> serde_json::Value {
    let col = |f: &dyn Fn(&series::Sample) -> serde_json::Value| -> Vec<serde_json::Value> {
        view.samples.iter().map(f).collect()
    };
    json!({
        "requests_per_s": col(&|s| json!(round2(s.requests_per_s))),
        "p99_ms": col(&|s| json!(s.p99_ms.map(round2))),
        "rejections_per_s": col(&|s| json!(round2(s.rejections_per_s))),
        "queue_depth": col(&|s| json!(s.queue_depth)),
        "concurrency_limit": col(&|s| json!(s.limit)),
    })
}

/// Two decimals are plenty for a chart, and keep /status.json small.
fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The /status page: self-contained (no external assets, since the admin port
/// may be the only thing reachable), readable without JavaScript (rows are
/// rendered here), and refreshed in place by a small script that polls
/// /status.json and re-renders the same markup (`STATUS_JS` mirrors
/// `route_row` and `upstream_row`).
fn status_html(v: &serde_json::Value) -> String {
    let routes: String = v["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(route_row)
        .collect();
    let charts: String = v["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(chart_row)
        .collect();
    let upstreams: String = v["upstreams"]
        .as_array()
        .into_iter()
        .flatten()
        .map(upstream_row)
        .collect();
    let chart_heads: String = CHARTS
        .iter()
        .map(|c| format!("<th>{}</th>", c.title))
        .collect();
    let restart: Vec<String> = v["restart_required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(esc))
        .collect();
    let phase = esc(v["phase"].as_str().unwrap_or(""));
    let refresh = v["refresh_seconds"].as_u64().unwrap_or(STATUS_REFRESH_SECS);
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>Spillway status</title>
<noscript><meta http-equiv="refresh" content="{refresh}"></noscript>
<style>{css}</style></head>
<body data-refreshes="0">
<header><h1>Spillway <small id="version">{version}</small></h1>
<p id="summary">config generation <b id="generation">{generation}</b> &middot; loaded <span id="loaded">{loaded}</span> from <code id="source">{source}</code> &middot; phase <b id="phase" class="phase-{phase}">{phase}</b> &middot; global in-flight <b id="global">{gin} / {glimit}</b></p>
<p id="restart" class="warn"{restart_hidden}>restart required for: <span id="restart-fields">{restart}</span></p>
<p id="live" class="muted">rendered by the server; refreshes every {refresh} s</p></header>
<h2>Routes</h2>
<table id="routes"><thead><tr><th>route</th><th>upstream</th><th>in-flight / cap</th><th>queue / capacity</th><th>peak</th><th>rejections</th><th>recent rej/s</th><th>breaker</th><th>requests</th></tr></thead>
<tbody>{routes}</tbody></table>
<h2>Last 5 minutes <small>one sample per second, newest on the right</small></h2>
<table id="charts"><thead><tr><th>route</th>{chart_heads}</tr></thead>
<tbody>{charts}</tbody></table>
<h2>Upstreams</h2>
<table id="upstreams"><thead><tr><th>upstream</th><th>endpoints</th><th>breaker</th><th>breaker settings</th><th>routes</th><th>in-flight</th></tr></thead>
<tbody>{upstreams}</tbody></table>
<footer class="muted">also: <a href="status.json">status.json</a> &middot; <a href="metrics">metrics</a> &middot; <a href="config">config</a></footer>
<script>{js}</script>
</body></html>
"#,
        css = STATUS_CSS,
        js = STATUS_JS
            .replace("__REFRESH_MS__", &(refresh * 1000).to_string())
            .replace("__SAMPLES__", &series::SAMPLES.to_string())
            .replace("__MIN_SPAN__", &SPARK_MIN_SPAN.to_string()),
        version = esc(v["version"].as_str().unwrap_or("")),
        generation = v["generation"],
        loaded = iso_utc(v["loaded_at_unix"].as_f64().unwrap_or(0.0)),
        source = esc(v["source"].as_str().unwrap_or("")),
        gin = v["global_in_flight"],
        glimit = v["global_limit"],
        restart_hidden = if restart.is_empty() { " hidden" } else { "" },
        restart = restart.join(", "),
    )
}

fn route_row(r: &serde_json::Value) -> String {
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    let name = esc(r["name"].as_str().unwrap_or(""));
    let (inf, cap, depth, qcap) = (
        n("in_flight"),
        n("max_in_flight"),
        n("queue_depth"),
        n("queue_capacity"),
    );
    let lifo = if r["lifo_active"].as_bool() == Some(true) {
        " <span class=\"badge b-open\">LIFO</span>"
    } else {
        ""
    };
    let shadow = if r["mode"].as_str() == Some("shadow") {
        format!(
            " <span class=\"badge b-half_open\">shadow</span> <small>would have: {}</small>",
            counts(&r["shadow_decisions"])
        )
    } else {
        String::new()
    };
    let classes: Vec<String> = r["classes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    format!(
                        "{} {}/{}&#8595;",
                        esc(c["name"].as_str().unwrap_or("")),
                        c["in_flight"].as_u64().unwrap_or(0),
                        c["shed"].as_u64().unwrap_or(0)
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let mut extra = String::new();
    if !classes.is_empty() {
        extra.push_str(&format!(
            "<br><small class=\"classes\">classes (in flight/shed): {}</small>",
            classes.join(", ")
        ));
    }
    if let Some(k) = r["fairness_keys"].as_u64() {
        extra.push_str(&format!(
            "<br><small class=\"keys\">fairness keys: {k}</small>"
        ));
    }
    format!(
        "<tr class=\"route\" data-route=\"{name}\" data-in-flight=\"{inf}\" data-max-in-flight=\"{cap}\" data-queue-depth=\"{depth}\" data-queue-capacity=\"{qcap}\">\
<td class=\"name\">{name}{shadow}{extra}</td><td class=\"upstream\">{upstream}</td>\
<td class=\"inflight\">{bar1}<span class=\"num\">{inf} / {cap}</span></td>\
<td class=\"queue\">{bar2}<span class=\"num\">{depth} / {qcap}</span> <small>{disc} &le; {wait}</small>{lifo}</td>\
<td class=\"peak\">{peak}</td>\
<td class=\"rej\"><span class=\"num\">{rej}</span> <small>{reasons}</small></td>\
<td class=\"rate\">{rate}</td>\
<td class=\"breaker\">{breaker}</td>\
<td class=\"req\">{requests}</td></tr>",
        upstream = esc(r["upstream"].as_str().unwrap_or("")),
        bar1 = bar(inf, cap),
        bar2 = bar(depth, qcap),
        disc = esc(r["discipline"].as_str().unwrap_or("")),
        wait = esc(r["max_wait"].as_str().unwrap_or("")),
        peak = n("queue_depth_peak"),
        rej = n("rejections_total"),
        reasons = counts(&r["rejections"]),
        breaker = badge(r["breaker"].as_str()),
        requests = counts(&r["requests"]),
        rate = esc(&fmt_num(r["rejections_per_s_recent"].as_f64())),
    )
}

/// One chart of /status: a `series` key of /status.json, the cell's class,
/// its column title and the unit after its figures.
struct Chart {
    key: &'static str,
    class: &'static str,
    title: &'static str,
    unit: &'static str,
}

/// The charts of a route, in column order (the page's script has the same list).
const CHARTS: [Chart; 5] = [
    Chart {
        key: "requests_per_s",
        class: "req",
        title: "answered/s",
        unit: "",
    },
    Chart {
        key: "p99_ms",
        class: "p99",
        title: "p99 latency",
        unit: " ms",
    },
    Chart {
        key: "rejections_per_s",
        class: "rej",
        title: "rejected/s",
        unit: "",
    },
    Chart {
        key: "queue_depth",
        class: "depth",
        title: "queue depth",
        unit: "",
    },
    Chart {
        key: "concurrency_limit",
        class: "limit",
        title: "concurrency limit",
        unit: "",
    },
];

/// Height of a sparkline in its own units; its width is one unit per sample
/// of a full series.
const SPARK_H: f64 = 30.0;

/// The fewest samples a sparkline's x axis spans (a minute).
const SPARK_MIN_SPAN: usize = 60;

fn chart_row(r: &serde_json::Value) -> String {
    let name = esc(r["name"].as_str().unwrap_or(""));
    let cells: String = CHARTS
        .iter()
        .map(|c| {
            let values: Vec<Option<f64>> = r["series"][c.key]
                .as_array()
                .into_iter()
                .flatten()
                .map(serde_json::Value::as_f64)
                .collect();
            let last = values.last().copied().flatten();
            let max = values
                .iter()
                .flatten()
                .copied()
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
            format!(
                "<td class=\"{class}\">{svg}<span class=\"num\">{last}{unit}</span>{max}</td>",
                class = c.class,
                svg = sparkline(c.class, &values),
                last = esc(&fmt_num(last)),
                max = max.map_or(String::new(), |m| format!(
                    " <small>max {}</small>",
                    esc(&fmt_num(Some(m)))
                )),
                unit = if last.is_some() { c.unit } else { "" },
            )
        })
        .collect();
    format!("<tr class=\"chart\" data-chart=\"{name}\"><td class=\"name\">{name}</td>{cells}</tr>")
}

/// An inline SVG line of `values` (oldest first, `None` leaves a gap), scaled
/// from 0 to its maximum and right-aligned so that now is always at the right
/// edge. The page's script draws the same path (`sparkPath`).
fn sparkline(class: &str, values: &[Option<f64>]) -> String {
    let width = series::SAMPLES - 1;
    format!(
        "<svg class=\"spark s-{class}\" viewBox=\"0 0 {width} {SPARK_H}\" preserveAspectRatio=\"none\" aria-hidden=\"true\"><path d=\"{d}\"/></svg>",
        d = spark_path(values),
    )
}

fn spark_path(values: &[Option<f64>]) -> String {
    use std::fmt::Write;
    let max = values.iter().flatten().copied().fold(0.0, f64::max);
    // 3 units of margin keep a flat line at 0 or at the maximum visible.
    let scale = if max > 0.0 {
        (SPARK_H - 6.0) / max
    } else {
        0.0
    };
    let values = &values[values.len().saturating_sub(series::SAMPLES)..];
    // The x axis spans the samples there are, at least a minute's worth, so a
    // freshly started proxy's first seconds are not a speck at the edge.
    let span = values.len().clamp(SPARK_MIN_SPAN, series::SAMPLES);
    let offset = span - values.len();
    let step = (series::SAMPLES - 1) as f64 / (span - 1) as f64;
    let mut d = String::new();
    let mut pen = false;
    for (i, v) in values.iter().enumerate() {
        match v {
            Some(v) => {
                let cmd = if pen {
                    " L"
                } else if d.is_empty() {
                    "M"
                } else {
                    " M"
                };
                let x = (offset + i) as f64 * step;
                let _ = write!(d, "{cmd}{x:.1} {:.1}", SPARK_H - 3.0 - v * scale);
                pen = true;
            }
            None => pen = false,
        }
    }
    d
}

/// A chart figure: whole numbers as they are, others to one decimal (none
/// from 100 up), `–` when there is none.
fn fmt_num(v: Option<f64>) -> String {
    match v {
        None => "\u{2013}".to_string(),
        Some(v) if v.fract() == 0.0 => format!("{v}"),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
    }
}

fn upstream_row(u: &serde_json::Value) -> String {
    let name = esc(u["name"].as_str().unwrap_or(""));
    let list = |k: &str| {
        u[k].as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(esc))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let settings = match u["breaker_settings"].as_object() {
        Some(b) => esc(&breaker_text(b)),
        None => "&ndash;".to_string(),
    };
    format!(
        "<tr class=\"upstream\" data-upstream=\"{name}\" data-breaker=\"{state}\">\
<td class=\"name\">{name}</td><td class=\"endpoints\">{endpoints}</td>\
<td class=\"breaker\">{breaker}</td><td class=\"settings\">{settings}</td>\
<td class=\"routes\">{routes}</td><td class=\"inflight\">{inf}</td></tr>",
        state = esc(u["breaker"].as_str().unwrap_or("none")),
        endpoints = list("endpoints"),
        breaker = badge(u["breaker"].as_str()),
        routes = list("routes"),
        inf = u["in_flight"].as_u64().unwrap_or(0),
    )
}

/// The breaker settings in words (the page's script has the same function).
fn breaker_text(b: &serde_json::Map<String, serde_json::Value>) -> String {
    let field = |k: &str| match b.get(k) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => String::new(),
    };
    let mut text = format!(
        "opens after {} failures in a row",
        field("failure_threshold")
    );
    if let Some(rate) = b.get("failure_rate").and_then(|r| r.as_object()) {
        let pct = rate
            .get("threshold")
            .and_then(|t| t.as_f64())
            .unwrap_or(0.0)
            * 100.0;
        text.push_str(&format!(
            " or {pct:.0}% of {} (at least {} requests)",
            rate.get("window").and_then(|w| w.as_str()).unwrap_or(""),
            rate.get("min_requests").unwrap_or(&json!(0)),
        ));
    }
    text.push_str(&format!(
        " \u{b7} recovery {} \u{b7} {} half-open probes",
        field("recovery_timeout"),
        field("half_open_calls")
    ));
    text
}

/// A fill bar: amber from 75 %, red when full.
fn bar(n: u64, cap: u64) -> String {
    // An empty capacity (no queue) reads full as soon as anything is in it.
    let pct = match n.saturating_mul(100).checked_div(cap) {
        Some(p) => p.min(100),
        None if n == 0 => 0,
        None => 100,
    };
    let class = match pct {
        100 => "bar full",
        75..=99 => "bar high",
        _ => "bar",
    };
    format!("<div class=\"{class}\"><span style=\"width:{pct}%\"></span></div>")
}

fn badge(state: Option<&str>) -> String {
    match state {
        Some(s) => {
            let s = esc(s);
            format!("<span class=\"badge b-{s}\">{s}</span>")
        }
        None => "<span class=\"muted\">none</span>".to_string(),
    }
}

/// `{"queue_full": 4, "queue_timeout": 1}` -> `queue_full 4 · queue_timeout 1`.
fn counts(v: &serde_json::Value) -> String {
    v.as_object()
        .into_iter()
        .flatten()
        .map(|(k, n)| format!("{} {}", esc(k), n))
        .collect::<Vec<_>>()
        .join(" &middot; ")
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (UTC), what the page's script
/// prints too (civil-from-days, Howard Hinnant's algorithm).
fn iso_utc(unix: f64) -> String {
    let secs = unix.max(0.0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

const STATUS_CSS: &str = "\
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.5em 2em;color:#1d232a;background:#fafbfc}\
h1{margin:0 0 .2em;font-size:1.6em}h1 small{font-weight:normal;color:#6a737d;font-size:.6em}\
h2{margin:1.2em 0 .4em;font-size:1.15em}\
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px rgba(0,0,0,.08)}\
th,td{border:1px solid #e1e4e8;padding:5px 9px;text-align:left;vertical-align:middle}\
th{background:#f3f5f7;font-weight:600;font-size:.9em}\
td.peak,td.rate,td.inflight,td.queue,td.rej,#charts td{font-variant-numeric:tabular-nums;white-space:nowrap}\
small,.muted{color:#6a737d}code{font-size:.95em}\
.bar{display:inline-block;width:70px;height:9px;background:#e9ecef;border-radius:4px;margin-right:7px;overflow:hidden;vertical-align:middle}\
.bar span{display:block;height:100%;background:#2f9e44}.bar.high span{background:#f08c00}.bar.full span{background:#e03131}\
.badge{display:inline-block;padding:1px 7px;border-radius:9px;font-size:.85em;font-weight:600;color:#fff;background:#868e96}\
.b-closed{background:#2f9e44}.b-half_open{background:#f08c00}.b-open{background:#e03131}\
.phase-running{color:#2f9e44}.phase-draining,.phase-stopping,.phase-stopped{color:#e03131}\
.warn{color:#b35c00;font-weight:600}#live.stale{color:#e03131;font-weight:600}\
.spark{display:block;width:150px;height:30px;background:#f3f5f7;border-radius:3px;margin-bottom:2px}\
.spark path{fill:none;stroke:#1c7ed6;stroke-width:1.5;vector-effect:non-scaling-stroke;stroke-linejoin:round}\
.s-rej path{stroke:#e03131}.s-p99 path{stroke:#7048e8}.s-depth path{stroke:#f08c00}.s-limit path{stroke:#495057}";

/// Re-renders the tables and charts from /status.json every refresh; mirrors
/// `route_row`, `chart_row`, `upstream_row`, `bar`, `badge`, `counts`,
/// `fmt_num`, `CHARTS` and `spark_path`. Builds DOM nodes
/// (textContent), never HTML strings, so names cannot inject markup.
const STATUS_JS: &str = r##"(function () {
  "use strict";
  var REFRESH_MS = __REFRESH_MS__;
  var SAMPLES = __SAMPLES__;
  var SPARK_H = 30;
  var MIN_SPAN = __MIN_SPAN__;
  var SVG = "http://www.w3.org/2000/svg";
  var CHARTS = [["requests_per_s", "req", ""], ["p99_ms", "p99", " ms"], ["rejections_per_s", "rej", ""],
                ["queue_depth", "depth", ""], ["concurrency_limit", "limit", ""]];
  var refreshes = 0;
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function td(cls, kids) {
    var c = el("td", cls);
    kids.forEach(function (k) { if (k) c.appendChild(typeof k === "string" ? document.createTextNode(k) : k); });
    return c;
  }
  function bar(n, cap) {
    var pct = cap === 0 ? (n === 0 ? 0 : 100) : Math.min(100, Math.floor(n * 100 / cap));
    var b = el("div", pct === 100 ? "bar full" : pct >= 75 ? "bar high" : "bar");
    var s = el("span");
    s.style.width = pct + "%";
    b.appendChild(s);
    return b;
  }
  function badge(state) {
    return state ? el("span", "badge b-" + state, state) : el("span", "muted", "none");
  }
  function counts(obj) {
    return Object.keys(obj || {}).map(function (k) { return k + " " + obj[k]; }).join(" \u00b7 ");
  }
  function iso(unix) {
    return new Date(Math.floor(unix) * 1000).toISOString().replace(/\.\d+Z$/, "Z");
  }
  function num(v) {
    if (v === null || v === undefined) return "\u2013";
    return Number.isInteger(v) ? String(v) : v >= 100 ? v.toFixed(0) : v.toFixed(1);
  }
  function sparkPath(values) {
    var max = 0;
    values.forEach(function (v) { if (v !== null && v > max) max = v; });
    var scale = max > 0 ? (SPARK_H - 6) / max : 0;
    values = values.slice(Math.max(0, values.length - SAMPLES));
    var span = Math.min(SAMPLES, Math.max(MIN_SPAN, values.length));
    var offset = span - values.length, step = (SAMPLES - 1) / (span - 1), d = "", pen = false;
    values.forEach(function (v, i) {
      if (v === null) { pen = false; return; }
      d += (pen ? " L" : d === "" ? "M" : " M") + ((offset + i) * step).toFixed(1) + " " + (SPARK_H - 3 - v * scale).toFixed(1);
      pen = true;
    });
    return d;
  }
  function chartRow(r) {
    var tr = el("tr", "chart");
    tr.dataset.chart = r.name;
    tr.appendChild(td("name", [r.name]));
    CHARTS.forEach(function (c) {
      var values = (r.series && r.series[c[0]]) || [];
      var last = values.length ? values[values.length - 1] : null;
      var max = null;
      values.forEach(function (v) { if (v !== null && (max === null || v > max)) max = v; });
      var svg = document.createElementNS(SVG, "svg");
      svg.setAttribute("class", "spark s-" + c[1]);
      svg.setAttribute("viewBox", "0 0 " + (SAMPLES - 1) + " " + SPARK_H);
      svg.setAttribute("preserveAspectRatio", "none");
      svg.setAttribute("aria-hidden", "true");
      var path = document.createElementNS(SVG, "path");
      path.setAttribute("d", sparkPath(values));
      svg.appendChild(path);
      var cell = [svg, el("span", "num", num(last) + (last === null ? "" : c[2]))];
      if (max !== null) { cell.push(" "); cell.push(el("small", null, "max " + num(max))); }
      tr.appendChild(td(c[1], cell));
    });
    return tr;
  }
  function routeRow(r, rate) {
    var tr = el("tr", "route");
    tr.dataset.route = r.name;
    tr.dataset.inFlight = r.in_flight;
    tr.dataset.maxInFlight = r.max_in_flight;
    tr.dataset.queueDepth = r.queue_depth;
    tr.dataset.queueCapacity = r.queue_capacity;
    var queue = [bar(r.queue_depth, r.queue_capacity), el("span", "num", r.queue_depth + " / " + r.queue_capacity), " ",
                 el("small", null, r.discipline + " \u2264 " + r.max_wait)];
    if (r.lifo_active) { queue.push(" "); queue.push(el("span", "badge b-open", "LIFO")); }
    tr.appendChild(td("name", [r.name]));
    tr.appendChild(td("upstream", [r.upstream]));
    tr.appendChild(td("inflight", [bar(r.in_flight, r.max_in_flight), el("span", "num", r.in_flight + " / " + r.max_in_flight)]));
    tr.appendChild(td("queue", queue));
    tr.appendChild(td("peak", [String(r.queue_depth_peak)]));
    tr.appendChild(td("rej", [el("span", "num", r.rejections_total), " ", el("small", null, counts(r.rejections))]));
    tr.appendChild(td("rate", [num(rate)]));
    tr.appendChild(td("breaker", [badge(r.breaker)]));
    tr.appendChild(td("req", [counts(r.requests)]));
    return tr;
  }
  function breakerText(b) {
    var text = "opens after " + b.failure_threshold + " failures in a row";
    var rate = b.failure_rate;
    if (rate) {
      text += " or " + (rate.threshold * 100).toFixed(0) + "% of " + rate.window +
              " (at least " + rate.min_requests + " requests)";
    }
    return text + " \u00b7 recovery " + b.recovery_timeout + " \u00b7 " + b.half_open_calls + " half-open probes";
  }
  function upstreamRow(u) {
    var tr = el("tr", "upstream");
    tr.dataset.upstream = u.name;
    tr.dataset.breaker = u.breaker || "none";
    var b = u.breaker_settings;
    var settings = b ? breakerText(b) : "\u2013";
    tr.appendChild(td("name", [u.name]));
    tr.appendChild(td("endpoints", [(u.endpoints || []).join(", ")]));
    tr.appendChild(td("breaker", [badge(u.breaker)]));
    tr.appendChild(td("settings", [settings]));
    tr.appendChild(td("routes", [(u.routes || []).join(", ")]));
    tr.appendChild(td("inflight", [String(u.in_flight)]));
    return tr;
  }
  function replaceBody(id, rows) {
    var old = document.querySelector("#" + id + " tbody");
    var body = el("tbody");
    rows.forEach(function (r) { body.appendChild(r); });
    old.parentNode.replaceChild(body, old);
  }
  function render(d) {
    replaceBody("routes", d.routes.map(function (r) { return routeRow(r, r.rejections_per_s_recent); }));
    replaceBody("charts", d.routes.map(chartRow));
    replaceBody("upstreams", d.upstreams.map(upstreamRow));
    document.getElementById("version").textContent = d.version;
    document.getElementById("generation").textContent = d.generation;
    document.getElementById("loaded").textContent = iso(d.loaded_at_unix);
    document.getElementById("source").textContent = d.source;
    var phase = document.getElementById("phase");
    phase.textContent = d.phase;
    phase.className = "phase-" + d.phase;
    document.getElementById("global").textContent = d.global_in_flight + " / " + d.global_limit;
    var restart = document.getElementById("restart");
    restart.hidden = d.restart_required.length === 0;
    document.getElementById("restart-fields").textContent = d.restart_required.join(", ");
  }
  function setLive(text, stale) {
    var live = document.getElementById("live");
    live.textContent = text;
    live.className = stale ? "stale" : "muted";
  }
  function tick() {
    fetch("status.json", { cache: "no-store" })
      .then(function (resp) {
        if (!resp.ok) throw new Error("HTTP " + resp.status);
        return resp.json();
      })
      .then(function (d) {
        var now = Date.now();
        render(d);
        refreshes += 1;
        document.body.dataset.refreshes = refreshes;
        setLive("live \u00b7 updated " + iso(now / 1000) + " \u00b7 refreshes every " + REFRESH_MS / 1000 + " s", false);
      })
      .catch(function (e) {
        setLive("stale: cannot reach status.json (" + e.message + "); retrying", true);
      })
      .then(function () { setTimeout(tick, REFRESH_MS); });
  }
  tick();
})();"##;

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

/// Live pages must not be served from a cache.
fn no_store(mut r: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparklines_are_right_aligned_scaled_to_their_maximum_and_gap_on_null() {
        assert_eq!(spark_path(&[]), "");
        // Two samples of a minute's axis: at its last two positions, 0 at the
        // bottom margin and the maximum at the top margin.
        let step = 299.0 / 59.0;
        let d = spark_path(&[Some(0.0), Some(8.0)]);
        assert_eq!(d, format!("M{:.1} 27.0 L299.0 3.0", 58.0 * step));
        // A missing p99 breaks the line.
        let d = spark_path(&[Some(1.0), None, Some(1.0), Some(1.0)]);
        assert_eq!(d.matches('M').count(), 2, "{d}");
        assert_eq!(d.matches('L').count(), 1, "{d}");
        // More than five minutes: only the last 300 samples, filling the width.
        let long: Vec<Option<f64>> = (0..400).map(|i| Some(i as f64)).collect();
        let d = spark_path(&long);
        assert!(d.starts_with("M0.0 "), "{d}");
        assert_eq!(d.matches('L').count(), 299);
        assert_eq!(fmt_num(None), "\u{2013}");
        assert_eq!(fmt_num(Some(4.0)), "4");
        assert_eq!(fmt_num(Some(35.44)), "35.4");
        assert_eq!(fmt_num(Some(1234.4)), "1234");
    }
}
