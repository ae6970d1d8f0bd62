#!/usr/bin/env python3
"""Stand-in for `spillway upstream` (used only with UPSTREAM=python): an
asyncio HTTP/1.1 keep-alive server that serves at most --capacity requests at
once (the rest wait in an unbounded queue), each taking --service-time, and
answers GET /__stats with {"peak_concurrency":N,"served":M,"in_flight":K}.
Standard library only; good for a few thousand req/s, not for the core
(throughput) scenario.

usage: slow_upstream.py --bind 127.0.0.1:PORT [--service-time 20ms]
                        [--capacity 8] [--fail-rate 0] [--body-bytes 64]
"""
import argparse
import asyncio
import json
import random
import signal


def dur(s):
    s = s.strip()
    for unit, mul in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0)):
        if s.endswith(unit):
            return float(s[: -len(unit)]) * mul
    return float(s)


class State:
    def __init__(self, capacity):
        self.sem = asyncio.Semaphore(capacity) if capacity > 0 else None
        self.in_flight = 0
        self.peak = 0
        self.served = 0


async def handle(reader, writer, st, a, body):
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            hdrs = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    hdrs[k.strip().lower()] = v.strip()
            n = int(hdrs.get("content-length", "0") or 0)
            if n:
                await reader.readexactly(n)
            close = hdrs.get("connection", "").lower() == "close"
            if target.startswith("/__stats"):
                out = json.dumps({"peak_concurrency": st.peak, "served": st.served,
                                  "in_flight": st.in_flight}).encode()
                status = "200 OK"
            else:
                if st.sem:
                    await st.sem.acquire()
                st.in_flight += 1
                st.peak = max(st.peak, st.in_flight)
                try:
                    if a.service_time > 0:
                        await asyncio.sleep(a.service_time)
                finally:
                    st.in_flight -= 1
                    st.served += 1
                    if st.sem:
                        st.sem.release()
                out = body
                status = "500 Internal Server Error" if random.random() < a.fail_rate else "200 OK"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(out)}\r\n"
                f"{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n".encode() + out)
            await writer.drain()
            if close:
                return
    finally:
        writer.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bind", required=True)
    ap.add_argument("--service-time", type=dur, default=0.0)
    ap.add_argument("--capacity", type=int, default=0)
    ap.add_argument("--fail-rate", type=float, default=0.0)
    ap.add_argument("--body-bytes", type=int, default=64)
    a = ap.parse_args()
    host, port = a.bind.rsplit(":", 1)
    st = State(a.capacity)
    body = b"x" * a.body_bytes
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, st, a, body), host, int(port), backlog=4096)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
