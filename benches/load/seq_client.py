#!/usr/bin/env python3
"""N keep-alive GET / requests to 127.0.0.1:PORT over C connections, one in
flight per connection, each answer read whole (Content-Length framed).

usage: seq_client.py PORT N [C]   (standard library only; exits non-zero on
any answer other than 200, a closed connection, or 30 s without progress)
"""
import selectors
import socket
import sys


def main():
    port, n = int(sys.argv[1]), int(sys.argv[2])
    c = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    req = (f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
           "User-Agent: seq_client\r\nAccept: */*\r\n\r\n").encode()
    sel = selectors.DefaultSelector()
    sent = done = 0
    conns = []
    for _ in range(min(c, n)):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        st = {"s": s, "buf": b""}
        conns.append(st)
        sel.register(s, selectors.EVENT_READ, st)
    for st in conns:
        st["s"].sendall(req)
        sent += 1
    while done < n:
        ready = sel.select(30)
        if not ready:
            sys.exit(f"no answer for 30 s after {done} of {n}")
        for key, _ in ready:
            st = key.data
            data = st["s"].recv(65536)
            if not data:
                sys.exit(f"connection closed after {done} of {n}")
            st["buf"] += data
            while True:
                b = st["buf"]
                end = b.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = b[:end].decode("latin-1")
                if not head.startswith("HTTP/1.1 200"):
                    sys.exit("unexpected answer: " + head.split("\r\n")[0])
                length = 0
                for line in head.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                if len(b) < end + 4 + length:
                    break
                st["buf"] = b[end + 4 + length:]
                done += 1
                if sent < n:
                    st["s"].sendall(req)
                    sent += 1
    for st in conns:
        st["s"].close()


if __name__ == "__main__":
    main()
