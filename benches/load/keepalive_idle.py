#!/usr/bin/env python3
"""Open N keep-alive HTTP/1.1 connections to 127.0.0.1:PORT, send one GET on
each (so every connection is fully established through the proxy), then hold
them idle. Prints "READY <ok> <failed>" once all are open, then waits until
stdin closes or --hold seconds pass, and exits. Standard library only.

usage: keepalive_idle.py PORT [--conns 1000] [--hold 60] [--path /]
"""
import argparse
import asyncio
import os
import sys


async def one(port, path, sem, timeout):
    async with sem:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), timeout)
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "User-Agent: spillway-bench-idle\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip().lower()
        if "content-length" in headers:
            await asyncio.wait_for(
                reader.readexactly(int(headers["content-length"])), timeout)
        elif "chunked" in headers.get("transfer-encoding", ""):
            await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), timeout)
        if status >= 400 or headers.get("connection") == "close":
            raise RuntimeError(f"status {status}, connection {headers.get('connection')}")
        return writer


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--hold", type=float, default=60.0)
    ap.add_argument("--path", default="/")
    a = ap.parse_args()
    sem = asyncio.Semaphore(100)  # open at most 100 at a time (no SYN storm)
    results = await asyncio.gather(
        *(one(a.port, a.path, sem, 10.0) for _ in range(a.conns)),
        return_exceptions=True)
    writers = [r for r in results if not isinstance(r, BaseException)]
    errs = [r for r in results if isinstance(r, BaseException)]
    print(f"READY {len(writers)} {len(errs)}", flush=True)
    if errs:
        print(f"first error: {errs[0]!r}", file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)
    try:
        await asyncio.wait_for(asyncio.shield(stdin_closed), a.hold)
    except asyncio.TimeoutError:
        pass
    for w in writers:
        w.close()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
    os._exit(0)  # do not wait for the thread blocked on stdin
