#!/usr/bin/env python3
"""Adaptive concurrency under a changing upstream capacity.

usage: adaptive.py run            # both cases, writes results-adaptive.{md,csv}
       adaptive.py render WORKDIR # re-print the table of a past run
       adaptive.py plot CSV PNG   # needs matplotlib (adaptive.sh makes a venv)

The upstream (`spillway upstream --service-time 20ms --capacity-schedule
8@0s,16@20s,4@40s`) serves 8, then 16, then 4 requests at once, 20 s each.
oha offers a constant 800 req/s (2x the initial capacity, open loop,
latency-corrected) for the 60 s, through Spillway with a fixed
`max_in_flight: 8` and with `max_in_flight: auto`, one after the other, each
with a fresh upstream and proxy. oha stores every request in SQLite
(`--db-url`), so each 20 s phase is measured from the same continuous run.
Spillway's /metrics is sampled every 250 ms into a CSV. Standard library only
(except `plot`). See benches/load/README.md.
"""
import csv
import json
import os
import signal
import sqlite3
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402  (process helpers: start/stop/taskset/ports)

SERVICE_MS = 20
PHASE_S = int(os.environ.get("PHASE_S", "20"))  # seconds per capacity phase
SCHEDULE = [(0, 8), (PHASE_S, 16), (2 * PHASE_S, 4)]  # (from second, capacity)
TOTAL_S = PHASE_S * len(SCHEDULE)
RATE = int(os.environ.get("RATE", "800"))
CONNS = int(os.environ.get("OHA_CONNS", "256"))
QUEUE = 16
MAX_WAIT = "200ms"
TOLERANCE = float(os.environ.get("TOLERANCE", "2.0"))
SAMPLE_S = 0.25
SETTLE_BAND = 0.25  # the limit is settled once it stays within +-25% of the phase's last 10 s median
CASES = [c for c in os.environ.get("CASES", "fixed,auto").split(",") if c]

CONFIG = """version: 1
listeners:
  - name: inbound
    bind: 127.0.0.1:{port}
admin:
  bind: 127.0.0.1:{admin}
runtime:
  worker_threads: 1
upstreams:
  app:
    endpoints: ["127.0.0.1:{up}"]
routes:
  - name: all
    match:
      path_prefix: /
    upstream: app
    concurrency:
{concurrency}
    queue:
      max_depth: {queue}
      max_wait: {max_wait}
      discipline: fifo
"""


def concurrency_block(case):
    if case == "fixed":
        return "      max_in_flight: 8"
    return f"      max_in_flight: auto\n      adaptive: {{tolerance: {TOLERANCE}}}"


def capacity_at(t):
    cap = SCHEDULE[0][1]
    for at, c in SCHEDULE:
        if t >= at:
            cap = c
    return cap


def get(port, path, timeout=1.0):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return r.read().decode()


def metric(text, name, route="all"):
    want = f'{name}{{route="{route}"}} '
    for line in text.splitlines():
        if line.startswith(want):
            return float(line[len(want):])
    return None


def metric_sum(text, name, route="all", extra=""):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'route="{route}"' in line and extra in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


# (csv column, metric, label filter): sums and counts of Spillway's own
# histograms, so a phase's mean upstream latency (what the limiter sees) and
# mean queue wait come from the deltas between two samples.
HIST = [("upstream_s_sum", "spillway_stage_duration_seconds_sum", 'stage="upstream_headers"'),
        ("upstream_n", "spillway_stage_duration_seconds_count", 'stage="upstream_headers"'),
        ("queue_wait_s_sum", "spillway_queue_wait_seconds_sum", ""),
        ("queue_wait_n", "spillway_queue_wait_seconds_count", "")]


class Sampler:
    """Every 250 ms: the route's limit, in-flight and queue depth, and the upstream's own count."""

    def __init__(self, case, admin, up_port, t0):
        self.case, self.admin, self.up, self.t0 = case, admin, up_port, t0
        self.rows, self.stop = [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        nxt = time.monotonic()
        while not self.stop.is_set():
            t = time.monotonic() - self.t0
            row = {"case": self.case, "t_s": round(t, 3), "capacity": capacity_at(t)}
            try:
                m = get(self.admin, "/metrics")
                row["limit"] = metric(m, "spillway_concurrency_limit")
                row["in_flight"] = metric(m, "spillway_in_flight")
                row["queue_depth"] = metric(m, "spillway_queue_depth")
                row["rejections_total"] = metric_sum(m, "spillway_rejections_total")
                for col, name, extra in HIST:
                    row[col] = metric_sum(m, name, extra=extra)
            except OSError as e:
                row["error"] = str(e)
            try:
                st = json.loads(get(self.up, "/__stats"))
                row["upstream_current"] = st.get("current")
                row["upstream_served"] = st.get("served")
                # Cumulative whole-millisecond histogram of time spent in the
                # upstream (kept in memory for the percentiles, not in the CSV).
                row["upstream_latency_ms"] = {int(k): v for k, v in st.get("latency_ms", {}).items()}
            except (OSError, ValueError):
                pass
            self.rows.append(row)
            nxt += SAMPLE_S
            self.stop.wait(max(0.0, nxt - time.monotonic()))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)


def run_case(case):
    port, admin = h.free_port(), h.free_port()
    up_port = h.free_port()
    conf = os.path.join(h.WORK, f"spillway-{case}.yaml")
    with open(conf, "w") as f:
        f.write(CONFIG.format(port=port, admin=admin, up=up_port, queue=QUEUE,
                              max_wait=MAX_WAIT, concurrency=concurrency_block(case)))
    err = h.check_config("spillway", [h.SPILLWAY, "run", "--config", conf])
    if err:
        raise RuntimeError(f"{case}: config rejected: {err}")
    load_before = h.loadavg()
    os.environ["SPILLWAY_LOG"] = os.environ.get("SPILLWAY_LOG", "warn")
    proxy = h.start(f"spillway-{case}", [h.SPILLWAY, "run", "--config", conf], h.APP_CPU)
    h.wait_ready(admin, proxy, path="/metrics")
    sched = ",".join(f"{c}@{at}s" for at, c in SCHEDULE)
    # The schedule's clock starts with the upstream process: t0 is taken at its spawn.
    t0 = time.monotonic()
    up = h.start(f"upstream-{case}", [h.SPILLWAY, "upstream", "--bind", f"127.0.0.1:{up_port}",
                                      "--service-time", f"{SERVICE_MS}ms",
                                      "--capacity-schedule", sched], h.APP_CPU)
    h.wait_ready(up_port, up)
    db = os.path.join(h.WORK, f"oha-{case}.db")
    with Sampler(case, admin, up_port, t0) as s:
        launch = time.monotonic() - t0
        dur_ms = int((TOTAL_S - launch) * 1000)
        h.say(f"== {case}: oha -q {RATE} -c {CONNS} for {dur_ms} ms (schedule t = {launch:.3f} s)")
        rc, out = h.run_bounded(f"oha-{case}", [
            h.OHA, "--no-tui", "--output-format", "json", "--worker-threads", "1",
            "-q", str(RATE), "--latency-correction", "-c", str(CONNS), "-z", f"{dur_ms}ms",
            "--db-url", db, f"http://127.0.0.1:{port}/"], h.GEN_CPU, TOTAL_S + 60)
    if rc != 0:
        raise RuntimeError(f"oha failed (rc={rc}): {out[-2000:]}")
    summary = json.loads(out)
    final_metrics = get(admin, "/metrics")
    h.stop(up)
    h.stop(proxy)
    load_after = h.loadavg()
    return {"case": case, "launch": launch, "db": db, "samples": s.rows,
            "errors": summary.get("errorDistribution", {}),
            "rejections": {l.split("reason=\"")[1].split("\"")[0]: float(l.rsplit(" ", 1)[1])
                           for l in final_metrics.splitlines()
                           if l.startswith("spillway_rejections_total{")},
            "load_before": load_before, "load_after": load_after}


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, int(round(p / 100 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[i]


def settle_time(samples, lo, hi):
    """First time in [lo, hi) from which the limit stays within SETTLE_BAND of its last-10-s median."""
    pts = [(r["t_s"], r["limit"]) for r in samples if lo <= r["t_s"] < hi and r.get("limit") is not None]
    tail = sorted(v for t, v in pts if t >= hi - min(10, PHASE_S / 2))
    if not tail:
        return None, None
    med = tail[len(tail) // 2]
    settled = lo
    for t, v in pts:
        if abs(v - med) > SETTLE_BAND * med:
            settled = t + SAMPLE_S
    return min(settled, hi), med


def analyse(res):
    """Per phase: goodput, accepted latency (whole phase and after the limit settled), rejections."""
    con = sqlite3.connect(res["db"])
    # schedule time = oha time + launch offset; latency from the intended send time
    rows = con.execute("SELECT start_latency_correction, start, end, duration, status FROM oha").fetchall()
    con.close()
    off = res["launch"]
    phases = []
    for i, (at, cap) in enumerate(SCHEDULE):
        lo, hi = max(at, off), at + PHASE_S
        span = hi - lo
        settled, med = settle_time(res["samples"], lo, hi)
        ok, ok_settled, rej = [], [], {}
        done_ok = 0
        for slc, st, end, dur, status in rows:
            sent = (slc if slc is not None else st) + off
            if lo <= end + off < hi and 200 <= status < 300:
                done_ok += 1
            if not (lo <= sent < hi):
                continue
            if 200 <= status < 300:
                ok.append(dur)
                if settled is not None and sent >= settled:
                    ok_settled.append(dur)
            else:
                rej[status] = rej.get(status, 0) + 1
        ok.sort()
        ok_settled.sort()
        phase_cap = cap * 1000 / SERVICE_MS
        phases.append({
            "phase": f"{at}-{at + PHASE_S} s", "capacity": cap, "capacity_rps": phase_cap,
            "goodput": done_ok / span, "share": done_ok / span / phase_cap,
            "p50": pct(ok, 50), "p99": pct(ok, 99),
            "settled_at": settled, "limit_median": med, "p99_settled": pct(ok_settled, 99),
            "n_settled": len(ok_settled),
            "rejected_per_s": {k: v / span for k, v in sorted(rej.items())},
            "in_flight_mean": avg([r.get("in_flight") for r in res["samples"] if lo <= r["t_s"] < hi]),
            "queue_depth_mean": avg([r.get("queue_depth") for r in res["samples"] if lo <= r["t_s"] < hi]),
            "upstream_p99": upstream_pct(res["samples"], lo, hi, 99),
            "upstream_p99_settled": (upstream_pct(res["samples"], settled, hi, 99)
                                     if settled is not None else None),
            "upstream_mean": hist_mean(res["samples"], lo, hi, "upstream_s_sum", "upstream_n"),
            "queue_wait_mean": hist_mean(res["samples"], lo, hi, "queue_wait_s_sum", "queue_wait_n"),
        })
    return phases


def upstream_pct(samples, lo, hi, p):
    """p-th percentile (ms) of the upstream's own latency for requests it answered in [lo, hi)."""
    pts = [r for r in samples if lo <= r["t_s"] < hi and r.get("upstream_latency_ms") is not None]
    if len(pts) < 2:
        return None
    a, b = pts[0]["upstream_latency_ms"], pts[-1]["upstream_latency_ms"]
    delta = sorted((ms, b[ms] - a.get(ms, 0)) for ms in b if b[ms] > a.get(ms, 0))
    n = sum(c for _, c in delta)
    if n == 0:
        return None
    want, seen = p / 100 * n, 0
    for ms, c in delta:
        seen += c
        if seen >= want:
            # bucket `ms` holds [ms, ms + 1): report its upper edge, in seconds
            return (ms + 1) / 1000
    return (delta[-1][0] + 1) / 1000


def hist_mean(samples, lo, hi, sum_col, n_col):
    pts = [r for r in samples if lo <= r["t_s"] < hi and r.get(n_col) is not None]
    if len(pts) < 2 or pts[-1][n_col] <= pts[0][n_col]:
        return None
    return (pts[-1][sum_col] - pts[0][sum_col]) / (pts[-1][n_col] - pts[0][n_col])


def avg(vals):
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def ms(v):
    return "—" if v is None else f"{v * 1000:.0f}"


def render(results):
    bound = (TOLERANCE + 1) * SERVICE_MS / 1000
    out = [f"### Adaptive concurrency: {RATE} req/s for {TOTAL_S} s, upstream capacity "
           + " → ".join(f"{c}" for _, c in SCHEDULE) + f" ({PHASE_S} s each, service time {SERVICE_MS} ms)", "",
           f"- load: `oha -q {RATE} --latency-correction -c {CONNS}`, one continuous run per case, "
           "every request stored with `--db-url`; a request belongs to the phase it was due to be sent in "
           "(latency from that intended time), goodput counts 2xx completed in the phase",
           f"- queue: max_depth {QUEUE}, max_wait {MAX_WAIT}, fifo; `auto` = `max_in_flight: auto`, "
           f"`adaptive: {{tolerance: {TOLERANCE}}}` (min 1, max 1024, initial 16)",
           f"- settled: from the first 250 ms sample after which the limit stays within ±{SETTLE_BAND:.0%} "
           f"of its median over the phase's last 10 s; goal: accepted upstream p99 after settling "
           f"<= (tolerance + 1) x S = {bound * 1000:.0f} ms, goodput >= 95% of capacity",
           "- upstream p99: time inside the upstream (its own wait included), from its whole-millisecond "
           "histogram (`/__stats`), requests it answered in the span; 2xx p50/p99: end to end at the client, "
           "Spillway's queue included", ""]
    out.append("| case | phase | capacity (req/s) | goodput req/s (% of capacity) | limit (median, last 10 s) "
               "| settled after | upstream p99 ms | upstream p99 after settling ms "
               "| 2xx p50 ms | 2xx p99 ms | 2xx p99 after settling ms | rejected /s by status "
               "| mean upstream latency ms | mean queue wait ms | mean queue depth |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for res in results:
        for p in res["phases"]:
            rej = ", ".join(f"{k}: {v:.0f}" for k, v in p["rejected_per_s"].items()) or "0"
            settled = "—" if p["settled_at"] is None else f"{p['settled_at'] - int(p['phase'].split('-')[0]):.1f} s"
            lim = "—" if p["limit_median"] is None else f"{p['limit_median']:.0f}"
            out.append(f"| {res['case']} | {p['phase']} | {p['capacity']} x {SERVICE_MS} ms = {p['capacity_rps']:.0f} "
                       f"| {p['goodput']:.0f} ({p['share']:.0%}) | {lim} | {settled} "
                       f"| {ms(p.get('upstream_p99'))} | {ms(p.get('upstream_p99_settled'))} | {ms(p['p50'])} | {ms(p['p99'])} "
                       f"| {ms(p['p99_settled'])} | {rej} | {ms(p['upstream_mean'])} | {ms(p['queue_wait_mean'])} "
                       f"| {p['queue_depth_mean']:.1f} |")
    out.append("")
    for res in results:
        out.append(f"- {res['case']}: load average before {res['load_before']}, after {res['load_after']}; "
                   f"Spillway rejections by reason {json.dumps(res['rejections'])}; "
                   f"oha errors {json.dumps(res['errors'])}")
    return "\n".join(out) + "\n"


def write_csv(results, path):
    cols = ["case", "t_s", "capacity", "limit", "in_flight", "queue_depth", "rejections_total",
            "upstream_current", "upstream_served"] + [c for c, _, _ in HIST] + ["error"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for res in results:
            for r in res["samples"]:
                w.writerow(r)


def plot(csv_path, png_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by = {}
    with open(csv_path) as f:
        for r in csv.DictReader(f):
            if r["limit"]:
                by.setdefault(r["case"], []).append(r)
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    first = next(iter(by.values()))
    ts = [float(r["t_s"]) for r in first]
    ax.step(ts, [int(r["capacity"]) for r in first], where="post", color="black", lw=2,
            label="upstream capacity")
    style = {"auto": ("tab:blue", "auto: limit"), "fixed": ("tab:orange", "fixed 8: limit")}
    for case, rows in by.items():
        color, label = style.get(case, ("tab:gray", case))
        t = [float(r["t_s"]) for r in rows]
        ax.plot(t, [float(r["limit"]) for r in rows], color=color, lw=1.5, label=label)
        if case == "auto":
            ax.plot(t, [float(r["in_flight"]) for r in rows], color="tab:green", lw=0.8, ls="--",
                    label="auto: in flight", zorder=3)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("requests")
    ax.set_xlim(0, TOTAL_S)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(f"{RATE} req/s offered, service time {SERVICE_MS} ms", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path)


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else "run"
    if cmd == "plot":
        plot(sys.argv[2], sys.argv[3])
        return
    if cmd == "render":
        with open(os.path.join(sys.argv[2], "results.json")) as f:
            print(render(json.load(f)), end="")
        return
    h.WORK = tempfile.mkdtemp(prefix="spillway-adaptive-")
    h.say(f"work dir (configs, logs, oha databases, samples): {h.WORK}")
    os.sched_setaffinity(0, {h.GEN_CPU})  # the harness and its sampler stay off the app core
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    results = []
    try:
        for case in CASES:
            res = run_case(case)
            res["phases"] = analyse(res)
            results.append(res)
    finally:
        h.cleanup()
    with open(os.path.join(h.WORK, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_csv(results, os.path.join(h.WORK, "samples.csv"))
    table = render(results)
    print(table, end="")
    with open(os.path.join(h.HERE, "results-adaptive.md"), "w") as f:
        f.write(table)
    write_csv(results, os.path.join(h.HERE, "results-adaptive.csv"))


if __name__ == "__main__":
    main()
