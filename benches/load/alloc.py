#!/usr/bin/env python3
"""Spillway's global allocator compared: the orchestration behind benches/load/alloc.sh.

Standard library only; reuses harness.py's process, /proc and wrk helpers. Each
variant is one `spillway` binary (built by alloc.sh with different Cargo
features); all of them proxy to the same `spillway upstream`, one worker
thread, the core scenario's config (spillway-core.yaml). Per variant it reports:

- instructions per proxied request under `valgrind --tool=callgrind`: two
  fixed-count oha runs (keep-alive, 16 connections) of CG_N requests each in a
  fresh proxy; (Ir(n2) - Ir(n1)) / (n2 - n1) removes startup and shutdown.
  Instruction counts do not depend on how busy the machine is.
- proxy CPU µs per request under wrk -t1 -c64 (sidecar layout: generator on
  GEN_CPU, upstream + proxy on APP_CPU), the median over ROUNDS rounds with the
  variants alternated, since on a shared machine one round proves little.
- RSS: idle after start; peak during a burst of BURST_CONNS wrk connections;
  a few seconds after the burst; with IDLE_CONNS idle keep-alive connections;
  after those close again.

Only 127.0.0.1 is contacted; every process started is stopped on exit.

usage: alloc.py NAME=BINARY [NAME=BINARY ...]
Environment: ROUNDS (3), DURATION (5 s per wrk run), CG_N ("1000,5000"; empty
skips callgrind), BURST_CONNS (256), IDLE_CONNS (1000), GEN_CPU, APP_CPU.
"""
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import harness as h

ROUNDS = int(os.environ.get("ROUNDS", "3"))
DURATION = int(os.environ.get("DURATION", "5"))
CG_N = [int(n) for n in os.environ.get("CG_N", "1000,5000").split(",") if n.strip()]
BURST_CONNS = int(os.environ.get("BURST_CONNS", "256"))
IDLE_CONNS = int(os.environ.get("IDLE_CONNS", "1000"))
SETTLE_S = 3.0  # the memory janitor trims after a quiet second, checked once a second


def loadavg():
    return " ".join(h.loadavg())


def start_proxy(name, binary, up_port, wrapper=()):
    port, admin = h.free_port(), h.free_port()
    conf = h.render("spillway-core.yaml", f"{name}.yaml", PORT=port, ADMIN_PORT=admin,
                    UPSTREAM=f"127.0.0.1:{up_port}")
    p = h.start(name, list(wrapper) + [binary, "run", "--config", conf], h.APP_CPU)
    h.wait_ready(port, p, timeout=120.0)
    return p, port


def stop_slowly(p, grace):
    """SIGTERM and wait: Spillway drains and exits, and valgrind then writes its output."""
    if p is None or p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    h.stop(p)


def oha_count(port, n, conns=16):
    rc, out = h.run_bounded("oha", [h.OHA, "--no-tui", "--output-format", "json", "--worker-threads", "1",
                                    "-n", str(n), "-c", str(conns), f"http://127.0.0.1:{port}/"],
                            h.GEN_CPU, 600)
    if rc != 0:
        raise RuntimeError(f"oha failed (rc={rc}): {out[-2000:]}")
    o = json.loads(out)
    ok = o.get("statusCodeDistribution", {}).get("200", 0)
    if ok != n:
        raise RuntimeError(f"oha: {ok} of {n} requests got 200: {o.get('errorDistribution')}")


def callgrind_ir(name, binary, up_port, n):
    out = os.path.join(h.WORK, f"callgrind.{name}.{n}.out")
    p, port = start_proxy(f"cg-{name}-{n}", binary, up_port,
                          ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"])
    try:
        oha_count(port, n)
    finally:
        stop_slowly(p, 60.0)
    with open(out) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no instruction total in {out}")


def rss(pid):
    return h.rss_kib(h.proc_tree(pid))


def one_round(name, binary, up):
    up_p, up_port = up
    r = {}
    p, port = start_proxy(name, binary, up_port)
    try:
        time.sleep(1.0)
        r["rss_idle"] = rss(p.pid)
        h.wrk(port, 64, 1)  # warm-up, discarded
        time.sleep(0.5)
        t0, u0 = h.cpu_ticks(h.proc_tree(p.pid)), h.cpu_ticks([up_p.pid])
        w = h.wrk(port, 64, DURATION)
        t1, u1 = h.cpu_ticks(h.proc_tree(p.pid)), h.cpu_ticks([up_p.pid])
        r["cpu_us"] = (t1 - t0) / h.CLK_TCK * 1e6 / w["requests"]
        r["up_cpu_us"] = (u1 - u0) / h.CLK_TCK * 1e6 / w["requests"]
        r["rps"] = w["rps"]
        r["errors"] = w["errors"] + w["err_status"]
        with h.RssSampler(p.pid, every=0.1) as s:
            b = h.wrk(port, BURST_CONNS, DURATION)
        r["rss_burst_peak"] = s.peak
        r["errors"] += b["errors"] + b["err_status"]
        time.sleep(SETTLE_S)
        r["rss_after_burst"] = rss(p.pid)
        kib, ok, failed = h.idle_conns_rss(port, p.pid, IDLE_CONNS)
        r["rss_idle_conns"] = kib if not failed else None
        r["idle_conns_failed"] = failed
        time.sleep(SETTLE_S)
        r["rss_after_idle_conns"] = rss(p.pid)
    finally:
        stop_slowly(p, 10.0)
    h.say(f"   {name}: {r['cpu_us']:.1f} µs/req ({r['rps']:,.0f} req/s), RSS idle {r['rss_idle']/1024:.1f}"
          f" burst {r['rss_burst_peak']/1024:.1f} after {r['rss_after_burst']/1024:.1f}"
          f" {IDLE_CONNS} conns {(r['rss_idle_conns'] or 0)/1024:.1f}"
          f" after {r['rss_after_idle_conns']/1024:.1f} MiB")
    return r


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def mib(kib):
    return "—" if kib is None else f"{kib / 1024:.1f}"


def main():
    variants = []
    for a in sys.argv[1:]:
        name, _, path = a.partition("=")
        if not path or not os.access(path, os.X_OK):
            h.say(__doc__)
            return 2
        variants.append((name, os.path.abspath(path)))
    if not variants:
        h.say(__doc__)
        return 2
    h.WORK = tempfile.mkdtemp(prefix="spillway-alloc-")
    os.sched_setaffinity(0, {h.GEN_CPU})
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 65536), hard), hard))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("SPILLWAY_LOG", "warn")
    h.say(f"work dir (configs, logs, callgrind output): {h.WORK}")
    load_start = loadavg()
    res = {n: {"rounds": []} for n, _ in variants}
    try:
        # One upstream for everyone: the first variant's binary.
        h.SPILLWAY = variants[0][1]
        up = h.start_upstream("spillway", overload=False)
        if len(CG_N) == 2:
            for name, binary in variants:
                irs = [callgrind_ir(name, binary, up[1], n) for n in CG_N]
                res[name]["ir_per_req"] = (irs[1] - irs[0]) / (CG_N[1] - CG_N[0])
                res[name]["ir"] = irs
                h.say(f"   {name}: callgrind {irs} -> {res[name]['ir_per_req']:,.0f} instructions/request")
        for rnd in range(ROUNDS):
            h.say(f"== round {rnd + 1}/{ROUNDS}, load average {loadavg()}")
            order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
            for name, binary in order:
                res[name]["rounds"].append(one_round(name, binary, up))
    finally:
        h.cleanup()
        with open(os.path.join(h.WORK, "raw.json"), "w") as f:
            json.dump(res, f, indent=1)
    load_end = loadavg()

    rows = []
    for name, _ in variants:
        rs, x = res[name]["rounds"], res[name]
        cpu = [r["cpu_us"] for r in rs]
        rows.append([
            name,
            f"{x['ir_per_req']:,.0f}" if "ir_per_req" in x else "—",
            f"{med(cpu):.1f} ({min(cpu):.1f}–{max(cpu):.1f})",
            f"{med([r['rps'] for r in rs]):,.0f}",
            mib(med([r["rss_idle"] for r in rs])),
            mib(med([r["rss_burst_peak"] for r in rs])),
            mib(med([r["rss_after_burst"] for r in rs])),
            mib(med([r["rss_idle_conns"] for r in rs])),
            mib(med([r["rss_after_idle_conns"] for r in rs])),
            str(sum(r["errors"] for r in rs)),
        ])
    head = ["allocator", "instructions/req (callgrind)", f"proxy CPU µs/req, wrk -c64 median (range)",
            "req/s", "RSS idle MiB", f"RSS peak, wrk -c{BURST_CONNS}", f"RSS {SETTLE_S:.0f} s after",
            f"RSS {IDLE_CONNS} idle conns", f"RSS after they close", "errors"]
    print(f"Spillway allocators: {ROUNDS} rounds, {DURATION} s per wrk run, one worker thread; "
          f"wrk on CPU {h.GEN_CPU}, upstream + proxy on CPU {h.APP_CPU}; "
          f"callgrind: oha -c16 -n {'/'.join(map(str, CG_N)) or '(skipped)'}; "
          f"load average {load_start} at start, {load_end} at end.\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
