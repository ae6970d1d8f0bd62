#!/usr/bin/env bash
# Resilience scenario benchmark, on loopback only, side by side in one run:
#
#   flaky   upstream answers 30% of requests 503 at random. Client success rate
#           and the extra load retries put on the upstream, through: nothing,
#           nginx (proxy_next_upstream), HAProxy (retry-on 503) and Spillway
#           (3 attempts; retry budget 0.2 = default, and 0.5).
#   storm   upstream fails 100%: extra load added by retries (Spillway's budget
#           bound: ratio + min_per_second x seconds) vs nginx and HAProxy.
#   breaker upstream fails for 10 s, then recovers: requests reaching it while
#           failing, fail-fast latency, time from recovery to clean answers
#           (Spillway breaker vs nginx max_fails and HAProxy observe layer7).
#
# usage: benches/load/resilience.sh            (about 4 minutes)
# knobs: FLAKY_REQUESTS (20000) STORM_SECONDS (10) CONNS (16) STEADY_RATE (200)
#        SPILLWAY_BIN SKIP_BUILD=1 APP_CPU GEN_CPU BENCH_TIMEOUT (900 s)
#
# Installs what is missing by package name (apt-get: nginx haproxy; cargo: oha),
# builds Spillway with the `dist` profile (cargo waits on its own lock if another build
# runs), then runs the harness below (python3, standard library only). Every
# process it starts is killed by its pid on exit; every load run is bounded.
# The table is printed and written to a fresh /tmp/spillway-resilience-* dir.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=()
for tool in nginx haproxy taskset python3; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  pkgs=()
  for tool in "${missing[@]}"; do
    case "$tool" in
      taskset) pkgs+=(util-linux) ;;
      *) pkgs+=("$tool") ;;
    esac
  done
  echo "installing: ${pkgs[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${pkgs[@]}" >&2
  for svc in nginx haproxy; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
      $SUDO systemctl stop "$svc" || true
    fi
  done
fi
if ! command -v oha >/dev/null 2>&1; then
  echo "installing oha (cargo install oha --locked)" >&2
  cargo install oha --locked >&2
fi

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  (cd "$ROOT" && cargo build --profile dist --locked >&2)
fi
export SPILLWAY_BIN="${SPILLWAY_BIN:-$ROOT/target/dist/spillway}"
export OHA_BIN="${OHA_BIN:-$(command -v oha)}"

exec python3 - <<'PY'
import atexit, http.client, json, math, os, signal, socket, statistics, subprocess
import sys, tempfile, threading, time

SPILLWAY = os.environ["SPILLWAY_BIN"]
OHA = os.environ["OHA_BIN"]
FLAKY_REQUESTS = int(os.environ.get("FLAKY_REQUESTS", "20000"))
STORM_SECONDS = int(os.environ.get("STORM_SECONDS", "10"))
CONNS = int(os.environ.get("CONNS", "16"))
STEADY_RATE = int(os.environ.get("STEADY_RATE", "200"))
BENCH_TIMEOUT = int(os.environ.get("BENCH_TIMEOUT", "900"))
_cpus = sorted(os.sched_getaffinity(0))
APP_CPU = int(os.environ.get("APP_CPU", _cpus[0]))
GEN_CPU = int(os.environ.get("GEN_CPU", _cpus[1] if len(_cpus) > 1 else _cpus[0]))

# Spillway's settings, stated once (the table quotes them).
BUDGET_RATIO, BUDGET_MPS = 0.2, 10          # defaults (docs/config.md)
BREAKER = dict(failure_threshold=5, recovery_timeout_s=1.0, half_open_calls=3)
FAIL_AT, RECOVER_AT, END_AT, BURST_AT, BURST_S = 2.0, 12.0, 16.0, 5.0, 3

WORK = tempfile.mkdtemp(prefix="spillway-resilience-")
PROCS = []


def say(*a):
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ processes

def start(name, argv, cpu, env=None):
    logf = open(os.path.join(WORK, name + ".log"), "ab")
    p = subprocess.Popen(["taskset", "-c", str(cpu)] + argv, stdin=subprocess.DEVNULL,
                         stdout=logf, stderr=logf, start_new_session=True,
                         env=dict(os.environ, **(env or {})))
    p.name = name
    PROCS.append(p)
    return p


def stop(p):
    if p is None:
        return
    if p.poll() is None:
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(p.pid, sig)  # the group we created (start_new_session)
            except ProcessLookupError:
                break
            try:
                p.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
    if p in PROCS:
        PROCS.remove(p)


def cleanup():
    for p in list(PROCS):
        stop(p)


atexit.register(cleanup)


def on_signal(signum, _frame):
    raise SystemExit(f"stopped by signal {signum}")


signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGALRM, on_signal)
signal.alarm(BENCH_TIMEOUT)  # the whole run is bounded


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def request(port, method="GET", path="/", timeout=2.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def wait_ready(port, proc, path="/__stats", timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.returncode}; see {WORK}/{proc.name}.log")
        try:
            if request(port, path=path)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} not ready on port {port} after {timeout}s")


def oha(port, args, timeout):
    cmd = ["taskset", "-c", str(GEN_CPU), OHA, "--no-tui", "--output-format", "json",
           "--worker-threads", "1"] + args + [f"http://127.0.0.1:{port}/load"]
    out = subprocess.run(cmd, capture_output=True, timeout=timeout, check=True)
    return json.loads(out.stdout)


def ok_count(o):
    return sum(n for s, n in o["statusCodeDistribution"].items() if s.startswith("2"))


def total_count(o):
    return sum(o["statusCodeDistribution"].values()) + sum(o.get("errorDistribution", {}).values())


# ------------------------------------------------------------------ upstream and proxies

def start_upstream(fail_rate):
    port = free_port()
    p = start("upstream", [SPILLWAY, "upstream", "--bind", f"127.0.0.1:{port}",
                           "--fail-rate", str(fail_rate), "--threads", "1"], APP_CPU)
    wait_ready(port, p)
    return port, p


def served(up_port):
    return json.loads(request(up_port, path="/__stats")[1])["served"]


def write(name, text):
    path = os.path.join(WORK, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def nginx_conf(name, port, servers, location_extra):
    tmp = os.path.join(WORK, name + "-tmp")
    os.makedirs(tmp, exist_ok=True)
    return write(name + ".conf", f"""
worker_processes 1;
daemon off;
master_process on;
pid {WORK}/{name}.pid;
error_log {WORK}/{name}.error.log crit;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 100000;
    upstream app {{
{servers}
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
{location_extra}
        }}
    }}
}}
""")


def haproxy_cfg(name, port, backend):
    return write(name + ".cfg", f"""
global
    nbthread 1
    maxconn 8000
defaults
    mode http
    maxconn 8000
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    http-reuse always
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
{backend}
""")


def spillway_yaml(name, port, admin, up, upstream_extra, route_extra):
    return write(name + ".yaml", f"""version: 1
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
{upstream_extra}
routes:
  - name: all
    match:
      path_prefix: /
    upstream: app
{route_extra}
""")


def start_proxy(kind, up, variant):
    """kind: direct | nginx | haproxy | spillway*; variant: retry | breaker."""
    if kind == "direct":
        return up, None, None
    port = free_port()
    admin = None
    if kind == "nginx":
        if variant == "retry":
            # 3 entries for the same upstream: nginx tries each server once per
            # request, so 3 entries = 3 attempts. max_fails=0: pure retries,
            # no passive health marking.
            servers = "\n".join(f"        server 127.0.0.1:{up} max_fails=0;" for _ in range(3))
            extra = ("            proxy_next_upstream error timeout http_503;\n"
                     "            proxy_next_upstream_tries 3;")
        else:
            # nginx ignores max_fails with a single server: two entries, same
            # upstream. A 503 counts against max_fails only when nginx may pass
            # the request on (tries > 1), so each request may try both entries.
            servers = "\n".join(f"        server 127.0.0.1:{up} max_fails={BREAKER['failure_threshold']} "
                                f"fail_timeout={int(BREAKER['recovery_timeout_s'])}s;" for _ in range(2))
            extra = "            proxy_next_upstream error timeout http_503;"
        conf = nginx_conf(f"nginx-{variant}", port, servers, extra)
        p = start("nginx", ["nginx", "-p", WORK, "-e", os.path.join(WORK, "nginx-startup.log"), "-c", conf], APP_CPU)
    elif kind == "haproxy":
        if variant == "retry":
            backend = ("    retry-on 503\n"
                       "    retries 2\n"
                       f"    server app 127.0.0.1:{up}")
        else:
            backend = ("    option httpchk GET /health\n"
                       "    http-check expect status 200\n"
                       f"    server app 127.0.0.1:{up} check inter {int(BREAKER['recovery_timeout_s'] * 1000)}ms "
                       f"rise 1 fall 1 observe layer7 error-limit {BREAKER['failure_threshold']} on-error mark-down")
        cfg = haproxy_cfg(f"haproxy-{variant}", port, backend)
        p = start("haproxy", ["haproxy", "-db", "-f", cfg], APP_CPU)
    else:
        admin = free_port()
        if variant == "retry":
            ratio = 0.5 if kind == "spillway-b0.5" else BUDGET_RATIO
            route_extra = ("    retries:\n      max_attempts: 3\n      on: [503]\n"
                           f"      budget: {{ratio: {ratio}, min_per_second: {BUDGET_MPS}}}\n")
            upstream_extra = ""
        else:
            route_extra = ""
            upstream_extra = ("    circuit_breaker:\n"
                              f"      failure_threshold: {BREAKER['failure_threshold']}\n"
                              f"      recovery_timeout: {int(BREAKER['recovery_timeout_s'] * 1000)}ms\n"
                              f"      half_open_calls: {BREAKER['half_open_calls']}\n")
        conf = spillway_yaml(f"{kind}-{variant}", port, admin, up, upstream_extra, route_extra)
        p = start("spillway", [SPILLWAY, "run", "--config", conf], APP_CPU, env={"SPILLWAY_LOG": "warn"})
    wait_ready(port, p)
    return port, p, admin


# ------------------------------------------------------------------ flaky and storm

RETRY_TARGETS = ["direct", "nginx", "haproxy", "spillway", "spillway-b0.5"]


def pct(x):
    return f"{100.0 * x:.1f}%"


def flaky():
    rows = []
    for kind in RETRY_TARGETS:
        up, up_p = start_upstream(0.3)
        port, p, _ = start_proxy(kind, up, "retry")
        try:
            o = oha(port, ["-n", str(FLAKY_REQUESTS), "-c", str(CONNS)], timeout=300)
            n = total_count(o)
            s = served(up)
            lp = o["latencyPercentiles"]
            rows.append(dict(target=kind, requests=n, ok=ok_count(o) / n, upstream=s,
                             extra=s / n - 1.0, p50=lp["p50"], p99=lp["p99"],
                             rps=o["summary"]["requestsPerSec"]))
            say(f"  flaky {kind}: success {pct(rows[-1]['ok'])}, extra load {pct(rows[-1]['extra'])}")
        finally:
            stop(p)
            stop(up_p)
    return rows


def storm():
    rows = []
    for kind in [t for t in RETRY_TARGETS if t != "spillway-b0.5"]:
        up, up_p = start_upstream(1.0)
        port, p, _ = start_proxy(kind, up, "retry")
        try:
            t0 = time.monotonic()
            o = oha(port, ["-z", f"{STORM_SECONDS}s", "-c", str(CONNS)], timeout=STORM_SECONDS + 120)
            secs = time.monotonic() - t0
            n = total_count(o)
            s = served(up)
            row = dict(target=kind, requests=n, upstream=s, extra=s / n - 1.0,
                       rps=o["summary"]["requestsPerSec"], p99=o["latencyPercentiles"]["p99"])
            if kind.startswith("spillway"):
                # the budget's promise: ratio x requests + min_per_second x max(window, run)
                row["bound"] = (BUDGET_RATIO * n + BUDGET_MPS * max(10.0, math.ceil(secs))) / n
            rows.append(row)
            say(f"  storm {kind}: {n} requests, upstream {s}, extra {pct(row['extra'])}")
        finally:
            stop(p)
            stop(up_p)
    return rows


# ------------------------------------------------------------------ breaker

class Steady:
    """Paced GETs (STEADY_RATE req/s over 4 keep-alive connections), every reply recorded."""

    def __init__(self, port):
        self.port, self.records, self.lock = port, [], threading.Lock()
        self.stop_ev = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(4)]

    def start(self):
        self.t0 = time.monotonic()
        for t in self.threads:
            t.start()

    def run(self, i):
        interval = len(self.threads) / STEADY_RATE
        next_t = self.t0 + i * interval / len(self.threads)
        conn = None
        while not self.stop_ev.is_set():
            now = time.monotonic()
            if now < next_t:
                time.sleep(next_t - now)
            next_t += interval
            t0 = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/steady")
                r = conn.getresponse()
                r.read()
                status, reason = r.status, r.getheader("x-spillway-reason")
                if (r.getheader("connection") or "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                status, reason = 0, type(e).__name__
                if conn is not None:
                    conn.close()
                conn = None
            with self.lock:
                self.records.append((t0, time.monotonic() - t0, status, reason))

    def finish(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(10)
        return sorted(self.records)


class Sampler:
    """Upstream `served` (and Spillway's breaker state) every 10 ms."""

    def __init__(self, up, admin):
        self.up, self.admin, self.samples = up, admin, []
        self.stop_ev = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop_ev.is_set():
            try:
                state = None
                if self.admin:
                    v = json.loads(request(self.admin, path="/status.json")[1])
                    state = v["upstreams"][0]["breaker"]
                self.samples.append((time.monotonic(), served(self.up), state))
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.01)

    def finish(self):
        self.stop_ev.set()
        self.t.join(10)
        return self.samples


def q(vals, p):
    if not vals:
        return float("nan")
    vals = sorted(vals)
    return vals[min(len(vals) - 1, int(math.ceil(p * len(vals))) - 1)]


def breaker():
    rows = []
    for kind in ["nginx", "haproxy", "spillway"]:
        up, up_p = start_upstream(0.0)
        port, p, admin = start_proxy(kind, up, "breaker")
        try:
            steady, sampler = Steady(port), Sampler(up, admin)
            steady.start()
            sampler.t.start()
            T0 = steady.t0

            def at(t):
                d = T0 + t - time.monotonic()
                if d > 0:
                    time.sleep(d)

            at(FAIL_AT)
            request(up, "POST", "/__fail?on=1")
            t_fail, s_fail = time.monotonic(), served(up)
            at(BURST_AT)
            # back to back on one connection: a low fixed rate measures the VM's
            # timer wake-ups more than the proxy (p99 moved 0.3-3.5 ms between runs)
            burst = oha(port, ["-z", f"{BURST_S}s", "-c", "1"], timeout=BURST_S + 60)
            at(RECOVER_AT)
            s_rec = served(up)
            request(up, "POST", "/__fail?on=0")
            t_rec = time.monotonic()
            at(END_AT)
            records, samples = steady.finish(), sampler.finish()
        finally:
            stop(p)
            stop(up_p)
        clients_failing = sum(1 for r in records if t_fail <= r[0] < t_rec) + total_count(burst)
        fast = [lat for (t, lat, st, _) in records if t_fail + 1.0 <= t < t_rec and not 200 <= st < 300]
        after = [(t + lat, st) for (t, lat, st, _) in records if t >= t_rec]
        bad_after = [end for (end, st) in after if not 200 <= st < 300]
        first_ok = next((end for (end, st) in after if 200 <= st < 300), None)
        row = dict(target=kind, hits_failing=s_rec - s_fail, clients_failing=clients_failing,
                   burst_ok=ok_count(burst), burst_p50=burst["latencyPercentiles"]["p50"],
                   burst_p99=burst["latencyPercentiles"]["p99"],
                   burst_p999=burst["latencyPercentiles"]["p99.9"],
                   steady_fail_p99=q(fast, 0.99),
                   errors_stop=(max(bad_after) - t_rec) if bad_after else 0.0,
                   first_ok=(first_ok - t_rec) if first_ok else float("nan"))
        if kind == "spillway":
            opened = next((s for s in samples if s[0] >= t_fail and s[2] in ("open", "half_open")), None)
            closed = next((s for s in samples if s[0] >= t_rec and s[2] == "closed"), None)
            if opened:
                open_s = t_rec - opened[0]
                row["hits_open"] = s_rec - opened[1]
                row["open_bound"] = BREAKER["half_open_calls"] * math.ceil(open_s / BREAKER["recovery_timeout_s"])
            row["to_closed"] = (closed[0] - t_rec) if closed else float("nan")
        rows.append(row)
        say(f"  breaker {kind}: upstream hits while failing {row['hits_failing']} "
            f"of {clients_failing} client requests; fail-fast p99 {row['burst_p99'] * 1e3:.2f} ms")
    return rows


# ------------------------------------------------------------------ report

def table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def ms(x):
    return "—" if x != x else f"{x * 1e3:.2f} ms"


def main():
    os.sched_setaffinity(0, {GEN_CPU})
    say(f"work dir: {WORK} (configs, logs, raw.json); upstream+proxy on CPU {APP_CPU}, load on CPU {GEN_CPU}")
    say("flaky upstream (30% 503)...")
    fl = flaky()
    say("retry storm (100% 503)...")
    st = storm()
    say("breaker (fails 10 s, then recovers)...")
    br = breaker()
    with open(os.path.join(WORK, "raw.json"), "w") as f:
        json.dump(dict(flaky=fl, storm=st, breaker=br), f, indent=1)

    names = {"direct": "direct (no proxy)", "nginx": "nginx proxy_next_upstream, 3 tries",
             "haproxy": "HAProxy retry-on 503, retries 2",
             "spillway": f"Spillway 3 attempts, budget {BUDGET_RATIO} + {BUDGET_MPS}/s (default)",
             "spillway-b0.5": f"Spillway 3 attempts, budget 0.5 + {BUDGET_MPS}/s"}
    out = ["# Resilience scenarios", "",
           f"Loopback, `spillway upstream` (0 ms service time) and the proxy on CPU {APP_CPU}, "
           f"oha / the harness on CPU {GEN_CPU}; one worker per proxy. Extra load = upstream requests "
           f"/ client requests - 1.", "",
           f"## Flaky upstream: 30% of requests answer 503 (oha -n {FLAKY_REQUESTS} -c {CONNS})", ""]
    out += table(["target", "client success (target >= 97%)", "extra upstream load", "req/s", "p50", "p99"],
                 [[names[r["target"]], pct(r["ok"]), pct(r["extra"]), f"{r['rps']:,.0f}",
                   ms(r["p50"]), ms(r["p99"])] for r in fl])
    out += ["", "Spillway waits its backoff before each retry (default `base: 25ms`, full jitter); nginx and "
            "HAProxy retry at once. In this closed loop that wait shows as lower req/s and a higher p99, "
            "not as proxy cost.", ""]
    out += ["", f"## Retry storm: upstream fails 100% (oha -z {STORM_SECONDS}s -c {CONNS})", ""]
    out += table(["target", "client requests", "upstream requests", "extra upstream load",
                  "Spillway bound: ratio + min_per_second x 10 s window"],
                 [[names[r["target"]], f"{r['requests']:,}", f"{r['upstream']:,}", pct(r["extra"]),
                   pct(r["bound"]) if "bound" in r else "—"] for r in st])
    rt = BREAKER["recovery_timeout_s"]
    out += ["", f"## Breaker: upstream fails from t={FAIL_AT:.0f}s to t={RECOVER_AT:.0f}s "
                f"(steady {STEADY_RATE} req/s, plus oha -c 1 back to back for {BURST_S}s from t={BURST_AT:.0f}s)", "",
            f"Spillway: `failure_threshold: {BREAKER['failure_threshold']}, recovery_timeout: {rt:g}s, "
            f"half_open_calls: {BREAKER['half_open_calls']}`; nginx: 2 entries for the upstream with "
            f"`max_fails={BREAKER['failure_threshold']} fail_timeout={rt:g}s`, `proxy_next_upstream http_503` "
            f"(so a request may try both entries); HAProxy: `observe layer7 error-limit {BREAKER['failure_threshold']} on-error mark-down`, "
            f"`option httpchk GET /health`, `inter {rt:g}s rise 1` (its health checks are counted in the "
            "upstream's requests).", ""]
    names_b = {"nginx": "nginx max_fails", "haproxy": "HAProxy observe layer7", "spillway": "Spillway breaker"}
    out += table(["target", "upstream requests while failing (of client requests)",
                  "of which while open (target: half_open_calls per recovery_timeout)",
                  "fail-fast p50 / p99 / p99.9 (oha; target p99 <= 1 ms)", "p99 steady failures (python client)",
                  "recovery -> closed (target <= recovery_timeout + 1 probe)", "recovery -> last error"],
                 [[names_b[r["target"]], f"{r['hits_failing']} (of {r['clients_failing']:,})",
                   f"{r['hits_open']} (<= {r['open_bound']})" if "hits_open" in r else "—",
                   f"{ms(r['burst_p50'])} / {ms(r['burst_p99'])} / {ms(r['burst_p999'])}" + ("" if r["burst_ok"] == 0 else f" ({r['burst_ok']} 2xx!)"),
                   ms(r["steady_fail_p99"]),
                   ms(r["to_closed"]) if "to_closed" in r else "—",
                   ms(r["errors_stop"])] for r in br])
    text = "\n".join(out) + "\n"
    write("results.md", text)
    print(text)


try:
    main()
finally:
    cleanup()
PY
