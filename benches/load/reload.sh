#!/usr/bin/env bash
# Hot reload benchmark. usage: benches/load/reload.sh
#
# 1. Reload latency: rename a new config over the watched file, then poll
#    /config until the new generation is visible (it serves new requests from
#    then on). Median, p99 and max over RELOADS reloads (default 100), each on
#    its own (the next rename waits until the watcher has settled). Includes
#    the 200 ms debounce.
# 2. Data-path cost, same proxy process: wrk -t1 -c$CONNS for DURATION s with
#    no reloads vs. a reload every RELOAD_INTERVAL_MS (default 100 ms: the file
#    is renamed over with a changed cap AND SIGHUP is sent, since the debounce
#    alone would fold 100 ms changes into one reload; the no-reload runs do the
#    same driver work on an unwatched file with signal 0, so the generator's
#    core is equally busy in both), alternating over ROUNDS
#    rounds. req/s, p99 and Spillway's CPU time per request (utime+stime from
#    /proc, robust to other load on the machine), medians over rounds; errors
#    and non-2xx counted. Also Spillway's CPU time per reload.
#
# Layout as in harness.py: upstream (`spillway upstream`) and Spillway pinned
# to APP_CPU, wrk and this driver to GEN_CPU. 127.0.0.1 only; every run is
# bounded and every process started here is killed on exit. Needs wrk (and
# python3, taskset); benches/load/run.sh installs them. Results are printed
# and written to the work directory printed first.
#
# Knobs: RELOADS=100 ROUNDS=5 DURATION=10 CONNS=64 ROUTES=50
#        RELOAD_INTERVAL_MS=100 APP_CPU GEN_CPU SKIP_BUILD=1 SPILLWAY_BIN
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
export PATH="$HOME/.cargo/bin:$PATH"

for tool in wrk python3; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "$tool is not installed (benches/load/run.sh installs it: apt-get install $tool)" >&2
    exit 1
  fi
done
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  (cd "$ROOT" && cargo build --profile dist --locked >&2)
fi
export SPILLWAY_BIN="${SPILLWAY_BIN:-$ROOT/target/dist/spillway}"
export BENCH_HERE="$HERE"

exec python3 - <<'PY'
import atexit, http.client, json, os, re, shutil, signal, socket, statistics
import subprocess, sys, tempfile, threading, time

BIN = os.environ["SPILLWAY_BIN"]
HERE = os.environ["BENCH_HERE"]
RELOADS = int(os.environ.get("RELOADS", "100"))
ROUNDS = int(os.environ.get("ROUNDS", "5"))
DURATION = int(os.environ.get("DURATION", "10"))
CONNS = int(os.environ.get("CONNS", "64"))
ROUTES = int(os.environ.get("ROUTES", "50"))
INTERVAL = float(os.environ.get("RELOAD_INTERVAL_MS", "100")) / 1000.0
_cpus = sorted(os.sched_getaffinity(0))
APP_CPU = int(os.environ.get("APP_CPU", _cpus[0]))
GEN_CPU = int(os.environ.get("GEN_CPU", _cpus[1] if len(_cpus) > 1 else _cpus[0]))
TASKSET = shutil.which("taskset")

WORK = tempfile.mkdtemp(prefix="spillway-reload-")
CFG = os.path.join(WORK, "spillway.yaml")
os.mkdir(os.path.join(WORK, "placebo"))
PLACEBO = os.path.join(WORK, "placebo", "spillway.yaml")
procs = []


def say(*a):
    print(*a, file=sys.stderr, flush=True)


def cleanup():
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + 3
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


atexit.register(cleanup)
for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, lambda *_: sys.exit(130))


def start(name, argv, cpu, env=None):
    log = open(os.path.join(WORK, f"{name}.log"), "w")
    if TASKSET:
        argv = [TASKSET, "-c", str(cpu)] + argv
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                         env=dict(os.environ, **(env or {})))
    procs.append(p)
    return p


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port, path, conn=None):
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", path)
    r = c.getresponse()
    body = r.read()
    if conn is None:
        c.close()
    return r.status, body


def wait_ready(port, proc, path):
    deadline = time.time() + 20
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}); see {WORK}")
        try:
            if get(port, path)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not ready; see {WORK}")


def config(cap, port, admin, up):
    y = [f"version: 1\nlisteners:\n  - name: inbound\n    bind: 127.0.0.1:{port}\n"
         f"admin:\n  bind: 127.0.0.1:{admin}\nruntime:\n  worker_threads: 1\n"
         f"upstreams:\n  app:\n    endpoints: [\"127.0.0.1:{up}\"]\nroutes:\n"]
    # ROUTES-1 specific routes, then the catch-all that the load hits.
    for i in range(ROUTES - 1):
        y.append(f"  - name: r{i}\n    match:\n      path_prefix: /r{i}/\n    upstream: app\n"
                 f"    concurrency:\n      max_in_flight: {cap}\n")
    y.append(f"  - name: all\n    match:\n      path_prefix: /\n    upstream: app\n"
             f"    concurrency:\n      max_in_flight: {cap}\n")
    return "".join(y)


def write_config(text):
    tmp = os.path.join(WORK, ".spillway.yaml.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, CFG)


def wrk(port):
    argv = ["wrk", "-t1", f"-c{CONNS}", f"-d{DURATION}s", "--timeout", "5s",
            "-s", os.path.join(HERE, "wrk-report.lua"), f"http://127.0.0.1:{port}/"]
    if TASKSET:
        argv = [TASKSET, "-c", str(GEN_CPU)] + argv
    out = subprocess.run(argv, capture_output=True, text=True, timeout=DURATION + 30).stdout
    m = re.search(r"^WRK_JSON (\{.*\})$", out, re.M)
    if not m:
        raise RuntimeError(f"wrk failed: {out[-2000:]}")
    r = json.loads(m.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"]
    return r


def cpu_s(pid):
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(vals, p):
    s = sorted(vals)
    return s[min(len(s) - 1, max(0, int(round(p / 100.0 * len(s) + 0.5)) - 1))]


def main():
    if TASKSET:
        os.sched_setaffinity(0, {GEN_CPU})
    say(f"work dir: {WORK}")
    up, port, admin = free_port(), free_port(), free_port()
    upstream = start("upstream", [BIN, "upstream", "--bind", f"127.0.0.1:{up}",
                                  "--service-time", "0ms", "--threads", "1"], APP_CPU)
    wait_ready(up, upstream, "/")
    caps = [1000, 1001]
    write_config(config(caps[0], port, admin, up))
    proxy = start("spillway", [BIN, "run", "--config", CFG], APP_CPU, {"SPILLWAY_LOG": "warn"})
    wait_ready(admin, proxy, "/ready")
    wait_ready(port, proxy, "/")
    adm = [http.client.HTTPConnection("127.0.0.1", admin, timeout=5)]

    def admin_get(path):
        # Kept alive for tight polling; the admin server closes connections
        # idle for 10 s (e.g. across a wrk run), so reconnect once.
        try:
            return get(admin, path, adm[0])[1]
        except (http.client.HTTPException, OSError):
            adm[0].close()
            adm[0] = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
            return get(admin, path, adm[0])[1]

    def generation():
        return json.loads(admin_get("/config"))["generation"]

    def metric(name):
        text = admin_get("/metrics").decode()
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    # --- 1. reload latency -------------------------------------------------
    say(f"reload latency: {RELOADS} renames, {ROUTES} routes")
    lat = []
    for i in range(RELOADS):
        g0 = generation()
        tmp = os.path.join(WORK, ".spillway.yaml.tmp")
        with open(tmp, "w") as f:
            f.write(config(caps[(i + 1) % 2], port, admin, up))
        t0 = time.perf_counter()
        os.rename(tmp, CFG)
        while generation() <= g0:
            if time.perf_counter() - t0 > 10:
                raise RuntimeError(f"reload {i} not visible after 10 s; see {WORK}")
            time.sleep(0.001)
        lat.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.3)  # past the debounce: every sample is one reload

    # CPU a reload costs (read, parse, validate, build, swap): SIGHUPs with
    # the file unchanged (still a full reload), no polling while they run.
    n = 20
    g0, c0 = generation(), cpu_s(proxy.pid)
    for _ in range(n):
        os.kill(proxy.pid, signal.SIGHUP)
        time.sleep(0.1)
    deadline = time.time() + 10
    while generation() < g0 + n:
        if time.time() > deadline:
            raise RuntimeError(f"SIGHUP reloads not applied; see {WORK}")
        time.sleep(0.05)
    cpu_per_reload_ms = (cpu_s(proxy.pid) - c0) / n * 1000

    # --- 2. data-path cost -------------------------------------------------
    say(f"data path: wrk -t1 -c{CONNS} {DURATION}s x {ROUNDS} rounds, none vs reload every {INTERVAL*1000:.0f} ms")
    wrk(port)  # warm-up (connections, pools), discarded
    results = {"none": [], "reload": []}
    reload_rates = []
    for rnd in range(ROUNDS):
        for mode in (["none", "reload"] if rnd % 2 == 0 else ["reload", "none"]):
            stop = threading.Event()
            g0 = generation()

            def reloader(real):
                # Both modes do the same work on the generator's core (write a
                # file, signal the process), so only Spillway's side differs:
                # "none" writes outside the watched directory and sends
                # signal 0 (a permission check, nothing delivered).
                i = 0
                while not stop.wait(INTERVAL):
                    i += 1
                    text = config(caps[i % 2], port, admin, up)
                    if real:
                        write_config(text)
                        os.kill(proxy.pid, signal.SIGHUP)
                    else:
                        with open(PLACEBO + ".tmp", "w") as f:
                            f.write(text)
                        os.rename(PLACEBO + ".tmp", PLACEBO)
                        os.kill(proxy.pid, 0)

            t = threading.Thread(target=reloader, args=(mode == "reload",), daemon=True)
            t.start()
            c0 = cpu_s(proxy.pid)
            r = wrk(port)
            r["cpu_us_per_req"] = (cpu_s(proxy.pid) - c0) / r["requests"] * 1e6
            stop.set()
            t.join()
            if mode == "reload":
                time.sleep(1.5)  # let the watcher settle before counting
                reload_rates.append((generation() - g0) / DURATION)
            results[mode].append(r)
            say(f"  round {rnd + 1} {mode:6}: {r['rps']:,.0f} req/s, p99 {r['p99_us'] / 1000:.2f} ms, "
                f"CPU {r['cpu_us_per_req']:.1f} us/req, errors {r['errors']}, non-2xx {r['err_status']}")
    failures = metric('spillway_config_reloads_total{result="failure"}')

    def med(mode, key):
        return statistics.median(r[key] for r in results[mode])

    rps0, rps1 = med("none", "rps"), med("reload", "rps")
    p0, p1 = med("none", "p99_us") / 1000, med("reload", "p99_us") / 1000
    c0, c1 = med("none", "cpu_us_per_req"), med("reload", "cpu_us_per_req")
    errors = sum(r["errors"] + r["err_status"] for m in results for r in results[m])
    lines = [
        "## Hot reload (benches/load/reload.sh)",
        "",
        f"{os.cpu_count()} CPUs; upstream + Spillway (1 worker) on CPU {APP_CPU}, wrk + driver on CPU {GEN_CPU}; "
        f"{ROUTES} routes; {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        "| reload latency (rename -> generation on /config) | median | p99 | max |",
        "|---|---|---|---|",
        f"| {RELOADS} reloads, 200 ms debounce included | {statistics.median(lat):.0f} ms | {pct(lat, 99):.0f} ms | {max(lat):.0f} ms |",
        "",
        f"Spillway CPU per reload ({ROUTES} routes): {cpu_per_reload_ms:.1f} ms.",
        "",
        f"| wrk -t1 -c{CONNS}, {DURATION} s, median of {ROUNDS} | req/s | p99 | Spillway CPU per request |",
        "|---|---|---|---|",
        f"| no reloads | {rps0:,.0f} | {p0:.2f} ms | {c0:.1f} us |",
        f"| reload every {INTERVAL*1000:.0f} ms ({statistics.median(reload_rates):.1f} reloads/s applied) | {rps1:,.0f} ({(rps1 / rps0 - 1) * 100:+.1f}%) | {p1:.2f} ms ({(p1 / p0 - 1) * 100:+.1f}%) | {c1:.1f} us ({(c1 / c0 - 1) * 100:+.1f}%) |",
        "",
        f"Failed requests (socket errors + non-2xx) across all runs: {errors}. Failed reloads: {failures:.0f}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(WORK, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(WORK, "raw.json"), "w") as f:
        json.dump({"latency_ms": lat, "cpu_per_reload_ms": cpu_per_reload_ms, "runs": results,
                   "reload_rates": reload_rates}, f, indent=1)
    if proxy.poll() is not None:
        raise RuntimeError(f"spillway exited ({proxy.returncode}); see {WORK}")


main()
PY
