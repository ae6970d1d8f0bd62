#!/usr/bin/env python3
"""Spillway soak test: mixed traffic, reloads and upstream faults for N minutes.

usage:
  soak.py run --spillway BIN --minutes N --out DIR   (what soak.sh calls)
  soak.py upstream --port P --log FILE               (the soak upstream)
  soak.py drive --port P --seconds S --out FILE      (the load driver)

The upstream (HTTP/1.1, asyncio) serves GET /get, POST /post (appends the
request's x-request-id to a log file before answering, so the ids survive a
kill -9), GET /stream (10 chunks, 20 ms apart) and POST /__fail?on=1|0 (every
request answers 503). The driver runs HTTP/1.1 and h2c clients: GETs, POSTs
with unique ids, streams, and clients that leave mid-upload or mid-stream.
The run command starts everything, rewrites the config with a changed cap
(4, 2, 8 in turn) every 5 s, injects an upstream fault every 30 s
(alternately: killed and restarted 3 s later; answering 503 for 5 s),
samples the proxy every second into soak.csv, then draws soak.png and
writes summary.json.
"""
import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------ upstream

def upstream_main(args):
    log_fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    state = {"failing": False}

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                hdrs = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        hdrs[k.strip().lower()] = v.strip()
                body = b""
                if "content-length" in hdrs:
                    body = await reader.readexactly(int(hdrs["content-length"]))
                elif "chunked" in hdrs.get("transfer-encoding", ""):
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        data = await reader.readexactly(size + 2)
                        body += data[:-2]
                        if size == 0:
                            break
                path = target.split("?")[0]
                if path == "/__fail":
                    state["failing"] = "on=1" in target
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                elif state["failing"]:
                    writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nfail")
                elif path == "/post":
                    rid = hdrs.get("x-request-id", "-")
                    os.write(log_fd, (rid + "\n").encode())
                    out = rid.encode()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(out), out))
                elif path == "/stream":
                    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    for _ in range(10):
                        await asyncio.sleep(0.02)
                        writer.write(b"400\r\n" + b"s" * 1024 + b"\r\n")
                        await writer.drain()
                    writer.write(b"0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 64\r\n\r\n" + b"g" * 64)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", args.port, backlog=1024, reuse_address=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# ------------------------------------------------------------------ driver

class Stats:
    def __init__(self):
        self.by_kind = {}
        self.post_ok = []      # ids answered 2xx
        self.post_sent = 0

    def count(self, kind, outcome):
        d = self.by_kind.setdefault(kind, {})
        d[outcome] = d.get(outcome, 0) + 1


async def h1_request(reader, writer, method, path, headers=(), body=b""):
    head = f"{method} {path} HTTP/1.1\r\nhost: soak\r\n"
    for k, v in headers:
        head += f"{k}: {v}\r\n"
    if body or method == "POST":
        head += f"content-length: {len(body)}\r\n"
    writer.write(head.encode() + b"\r\n" + body)
    await writer.drain()
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    hdrs = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            hdrs[k.strip().lower()] = v.strip()
    data = b""
    if "content-length" in hdrs:
        data = await reader.readexactly(int(hdrs["content-length"]))
    elif "chunked" in hdrs.get("transfer-encoding", ""):
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            data += chunk[:-2]
            if size == 0:
                # No trailers are sent here: the empty line was read with the chunk.
                break
    return status, hdrs, data


async def h1_worker(port, kind, stop, stats, wid):
    n = 0
    conn = None
    while time.monotonic() < stop:
        try:
            if conn is None:
                conn = await asyncio.open_connection("127.0.0.1", port)
            reader, writer = conn
            n += 1
            if kind == "get":
                status, hdrs, _ = await asyncio.wait_for(h1_request(reader, writer, "GET", "/get"), 20)
            elif kind == "stream":
                status, hdrs, data = await asyncio.wait_for(h1_request(reader, writer, "GET", "/stream"), 20)
                if status == 200 and len(data) != 10 * 1024:
                    stats.count(kind, "short_body")
            else:
                rid = f"h1-{wid}-{n}"
                stats.post_sent += 1
                status, hdrs, data = await asyncio.wait_for(
                    h1_request(reader, writer, "POST", "/post", [("x-request-id", rid)], b"x" * 512), 20)
                if 200 <= status < 300:
                    stats.post_ok.append(rid)
            stats.count(kind, str(status))
            if hdrs.get("connection", "").lower() == "close":
                writer.close()
                conn = None
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError) as e:
            stats.count(kind, type(e).__name__)
            if conn is not None:
                conn[1].close()
            conn = None
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.01)
    if conn is not None:
        conn[1].close()


async def aborter(port, stop, stats):
    """Clients that leave: mid-upload, or after the first bytes of a stream."""
    n = 0
    while time.monotonic() < stop:
        n += 1
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if n % 2:
                writer.write(b"POST /post HTTP/1.1\r\nhost: soak\r\nx-request-id: abort-%d\r\n"
                             b"content-length: 100000\r\n\r\n" % n + b"a" * 1000)
                await writer.drain()
                await asyncio.sleep(0.05)
            else:
                writer.write(b"GET /stream HTTP/1.1\r\nhost: soak\r\n\r\n")
                await writer.drain()
                await asyncio.wait_for(reader.read(100), 5)
            if n % 3 == 0:
                # A reset instead of a FIN.
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            writer.close()
            stats.count("abort", "left")
        except (OSError, asyncio.TimeoutError) as e:
            stats.count("abort", type(e).__name__)
        await asyncio.sleep(0.05)


async def h2_worker(port, stop, stats, wid):
    import h2.config
    import h2.connection
    import h2.events

    n = 0
    while time.monotonic() < stop:
        writer = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
            conn.initiate_connection()
            writer.write(conn.data_to_send())
            while time.monotonic() < stop:
                n += 1
                post = n % 2 == 0
                rid = f"h2-{wid}-{n}"
                sid = conn.get_next_available_stream_id()
                hdrs = [(":method", "POST" if post else "GET"), (":scheme", "http"),
                        (":authority", "soak"), (":path", "/post" if post else "/get")]
                if post:
                    hdrs += [("x-request-id", rid), ("content-length", "512")]
                    stats.post_sent += 1
                conn.send_headers(sid, hdrs, end_stream=not post)
                if post:
                    conn.send_data(sid, b"y" * 512, end_stream=True)
                writer.write(conn.data_to_send())
                await writer.drain()
                status, done = None, False
                deadline = time.monotonic() + 20
                while not done:
                    data = await asyncio.wait_for(reader.read(65536), max(0.1, deadline - time.monotonic()))
                    if not data:
                        raise ConnectionResetError("h2 connection closed")
                    for ev in conn.receive_data(data):
                        if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                            status = int(dict(ev.headers)[":status"])
                        elif isinstance(ev, h2.events.DataReceived):
                            conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                        elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)) and ev.stream_id == sid:
                            done = True
                        elif isinstance(ev, h2.events.ConnectionTerminated):
                            raise ConnectionResetError("goaway")
                    writer.write(conn.data_to_send())
                kind = "h2_post" if post else "h2_get"
                stats.count(kind, str(status))
                if post and status is not None and 200 <= status < 300:
                    stats.post_ok.append(rid)
                await asyncio.sleep(0.01)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, KeyError) as e:
            stats.count("h2", type(e).__name__)
            await asyncio.sleep(0.05)
        except Exception as e:  # h2 protocol errors
            stats.count("h2", type(e).__name__)
            await asyncio.sleep(0.05)
        finally:
            if writer is not None:
                writer.close()


def drive_main(args):
    stats = Stats()

    async def main():
        stop = time.monotonic() + args.seconds
        tasks = [h1_worker(args.port, "get", stop, stats, i) for i in range(4)]
        tasks += [h1_worker(args.port, "post", stop, stats, i) for i in range(3)]
        tasks += [h1_worker(args.port, "stream", stop, stats, i) for i in range(2)]
        tasks += [h2_worker(args.port, stop, stats, i) for i in range(2)]
        tasks.append(aborter(args.port, stop, stats))
        await asyncio.gather(*tasks)

    asyncio.run(main())
    with open(args.out, "w") as f:
        json.dump({"by_kind": stats.by_kind, "post_ok": stats.post_ok, "post_sent": stats.post_sent}, f)


# ------------------------------------------------------------------ run

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, proc, what):
    for _ in range(200):
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not listen on {port}")


def config(port, admin, up, cap):
    return f"""version: 1
listeners:
  - name: inbound
    bind: 127.0.0.1:{port}
admin:
  bind: 127.0.0.1:{admin}
runtime:
  worker_threads: 1
drain:
  grace: 0s
  timeout: 5s
upstreams:
  app:
    endpoints: ["127.0.0.1:{up}"]
    connect_timeout: 200ms
    pool:
      idle_timeout: 5s
    circuit_breaker:
      failure_threshold: 5
      recovery_timeout: 2s
routes:
  - name: post
    match:
      path_prefix: /post
    upstream: app
    concurrency:
      max_in_flight: {cap}
    queue:
      max_depth: 64
      max_wait: 500ms
    timeouts:
      request: 5s
      per_try: 2s
      response_body_idle: 2s
    retries:
      max_attempts: 3
      backoff: {{ base: 5ms, max: 50ms }}
  - name: stream
    match:
      path_prefix: /stream
    upstream: app
    concurrency:
      max_in_flight: {cap}
    timeouts:
      request: 5s
      response_body_idle: 2s
  - name: get
    match:
      path_prefix: /
    upstream: app
    concurrency:
      max_in_flight: {cap}
    queue:
      max_depth: 64
      max_wait: 500ms
    timeouts:
      request: 5s
      per_try: 1s
    retries:
      max_attempts: 3
      backoff: {{ base: 5ms, max: 50ms }}
"""


def metrics(admin):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{")[0].split(" ")[0]
        try:
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        except ValueError:
            pass
    return out


def proc_sample(pid):
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def slope_per_min(ts, ys):
    import numpy as np
    if len(ts) < 2:
        return 0.0
    return float(np.polyfit(np.array(ts), np.array(ys, dtype=float), 1)[0]) * 60.0


def run_main(args):
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    seconds = int(args.minutes * 60)
    port, admin, up_port = free_port(), free_port(), free_port()
    post_log = os.path.join(out, "upstream-posts.log")
    if os.path.exists(post_log):
        os.remove(post_log)
    cfg_path = os.path.join(out, "soak.yaml")
    # Small enough that requests queue at times (12 client connections).
    caps = [4, 2, 8]
    with open(cfg_path, "w") as f:
        f.write(config(port, admin, up_port, caps[0]))
    logs = open(os.path.join(out, "processes.log"), "w")

    def start_upstream():
        p = subprocess.Popen([sys.executable, __file__, "upstream", "--port", str(up_port), "--log", post_log],
                             stdout=logs, stderr=logs)
        wait_port(up_port, p, "upstream")
        return p

    upstream = start_upstream()
    proxy = subprocess.Popen([args.spillway, "--log", "warn", "run", "--config", cfg_path], stdout=logs, stderr=logs)
    wait_port(port, proxy, "spillway")
    driver_out = os.path.join(out, "driver.json")
    driver = subprocess.Popen([sys.executable, __file__, "drive", "--port", str(port),
                               "--seconds", str(seconds), "--out", driver_out], stdout=logs, stderr=logs)
    csv_path = os.path.join(out, "soak.csv")
    csv = open(csv_path, "w")
    csv.write("t,rss_kib,fds,connections,in_flight,queue_depth,upstream_up,upstream_failing\n")
    rows = []
    start = time.monotonic()
    reloads, faults = 0, []
    upstream_up, failing = True, False
    restart_at = fail_until = None
    next_reload, next_fault, fault_n = 5, 30, 0
    try:
        for tick in range(seconds + 1):
            target = start + tick
            time.sleep(max(0.0, target - time.monotonic()))
            t = tick
            if t >= next_reload and t < seconds:
                next_reload += 5
                reloads += 1
                tmp = cfg_path + ".tmp"
                with open(tmp, "w") as f:
                    f.write(config(port, admin, up_port, caps[reloads % len(caps)]))
                os.rename(tmp, cfg_path)
            if t >= next_fault and t < seconds - 10:
                next_fault += 30
                fault_n += 1
                if fault_n % 2:
                    upstream.kill()
                    upstream.wait()
                    upstream_up, restart_at = False, t + 3
                    faults.append((t, "killed"))
                else:
                    urllib.request.urlopen(urllib.request.Request(
                        f"http://127.0.0.1:{up_port}/__fail?on=1", method="POST"), timeout=2).read()
                    failing, fail_until = True, t + 5
                    faults.append((t, "503s"))
            if restart_at is not None and t >= restart_at:
                upstream = start_upstream()
                upstream_up, restart_at = True, None
            if fail_until is not None and t >= fail_until:
                urllib.request.urlopen(urllib.request.Request(
                    f"http://127.0.0.1:{up_port}/__fail?on=0", method="POST"), timeout=2).read()
                failing, fail_until = False, None
            if proxy.poll() is not None:
                sys.exit(f"spillway exited with {proxy.returncode}")
            rss, fds = proc_sample(proxy.pid)
            m = metrics(admin)
            row = (t, rss, fds, int(m.get("spillway_connections", 0)), int(m.get("spillway_in_flight", 0)),
                   int(m.get("spillway_queue_depth", 0)), int(upstream_up), int(failing))
            rows.append(row)
            csv.write(",".join(map(str, row)) + "\n")
            csv.flush()
        driver.wait(timeout=60)
        # The end: every client gone; what is still held is leaked.
        settle_deadline = time.monotonic() + 15
        while True:
            m = metrics(admin)
            held = m.get("spillway_in_flight", 0) + m.get("spillway_queue_depth", 0)
            conns = m.get("spillway_connections", 0)
            if (held == 0 and conns == 0) or time.monotonic() > settle_deadline:
                break
            time.sleep(0.2)
        # Pooled upstream connections close after the pool's idle_timeout (5 s).
        fds_deadline = time.monotonic() + 10
        while proc_sample(proxy.pid)[1] > rows[0][2] and time.monotonic() < fds_deadline:
            time.sleep(0.2)
        final_rss, final_fds = proc_sample(proxy.pid)
        final = metrics(admin)
    finally:
        for p in (driver, proxy, upstream):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
        csv.close()

    with open(driver_out) as f:
        d = json.load(f)
    with open(post_log) as f:
        seen = [line.strip() for line in f if line.strip()]
    counts = {}
    for rid in seen:
        counts[rid] = counts.get(rid, 0) + 1
    dup = sorted(r for r, c in counts.items() if c > 1 and not r.startswith("abort-"))
    lost = sorted(r for r in d["post_ok"] if r not in counts)
    ts = [r[0] for r in rows]
    warm = [i for i, r in enumerate(rows) if r[0] >= 60] or list(range(len(rows)))
    summary = {
        "minutes": args.minutes,
        "samples": len(rows),
        "requests": {k: sum(v.values()) for k, v in d["by_kind"].items()},
        "outcomes": d["by_kind"],
        "posts_sent": d["post_sent"],
        "posts_ok": len(d["post_ok"]),
        "posts_at_upstream": len(counts),
        # Reached the upstream, but the client got no 2xx (e.g. the upstream
        # was killed before it answered): neither lost nor duplicated.
        "posts_at_upstream_unanswered": len(set(counts) - set(d["post_ok"]) - {r for r in counts if r.startswith("abort-")}),
        "posts_lost": len(lost),
        "posts_duplicated": len(dup),
        "leaked_permits": int(final.get("spillway_in_flight", 0)),
        "queue_depth_after": int(final.get("spillway_queue_depth", 0)),
        "connections_after": int(final.get("spillway_connections", 0)),
        "config_reloads_counted": int(final.get("spillway_config_reloads_total", 0)),
        "config_generation": int(final.get("spillway_config_generation", 0)),
        "reloads_written": reloads,
        "faults": faults,
        "rss_kib_first": rows[0][1] if rows else 0,
        "rss_kib_max": max(r[1] for r in rows) if rows else 0,
        "rss_kib_final": final_rss,
        "fds_first": rows[0][2] if rows else 0,
        "fds_max": max(r[2] for r in rows) if rows else 0,
        "fds_final": final_fds,
        "rss_slope_kib_per_min": slope_per_min(ts, [r[1] for r in rows]),
        "rss_slope_kib_per_min_after_1min": slope_per_min([ts[i] for i in warm], [rows[i][1] for i in warm]),
        "fd_slope_per_min": slope_per_min(ts, [r[2] for r in rows]),
        "fd_slope_per_min_after_1min": slope_per_min([ts[i] for i in warm], [rows[i][2] for i in warm]),
        "lost_ids": lost[:20],
        "duplicated_ids": dup[:20],
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    png = os.path.join(out, "soak.png")
    plot(rows, faults, png)
    print(json.dumps(summary, indent=2))
    print(f"csv: {csv_path}\npng: {png}")
    bad = summary["posts_lost"] or summary["posts_duplicated"] or summary["leaked_permits"]
    sys.exit(1 if bad else 0)


def plot(rows, faults, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r[0] for r in rows]
    fig, axes = plt.subplots(4, 1, figsize=(11, 10), sharex=True)
    series = [
        ("RSS (MiB)", [r[1] / 1024 for r in rows]),
        ("open fds", [r[2] for r in rows]),
        ("client connections", [r[3] for r in rows]),
        ("in flight / queued", None),
    ]
    for ax, (label, ys) in zip(axes, series):
        if ys is None:
            ax.plot(t, [r[4] for r in rows], label="in flight", lw=0.8)
            ax.plot(t, [r[5] for r in rows], label="queue depth", lw=0.8)
            ax.legend(loc="upper right")
        else:
            ax.plot(t, ys, lw=0.8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        for ft, kind in faults:
            ax.axvline(ft, color="red" if kind == "killed" else "orange", alpha=0.3, lw=0.8)
    axes[0].set_ylim(bottom=0)
    axes[1].set_ylim(bottom=0)
    axes[-1].set_xlabel("seconds (red: upstream killed for 3 s, orange: upstream answering 503 for 5 s)")
    fig.suptitle("Spillway soak: mixed HTTP/1.1 + h2c traffic, config rewritten every 5 s, upstream fault every 30 s")
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--spillway", required=True)
    r.add_argument("--minutes", type=float, default=10)
    r.add_argument("--out", required=True)
    u = sub.add_parser("upstream")
    u.add_argument("--port", type=int, required=True)
    u.add_argument("--log", required=True)
    dr = sub.add_parser("drive")
    dr.add_argument("--port", type=int, required=True)
    dr.add_argument("--seconds", type=float, required=True)
    dr.add_argument("--out", required=True)
    args = ap.parse_args()
    {"run": run_main, "upstream": upstream_main, "drive": drive_main}[args.cmd](args)


if __name__ == "__main__":
    main()
