"""Open N connections that stall and count how many a server still holds after T seconds.

    python scripts/reliability/stalled_connections.py HOST PORT N SECONDS PID

Odd connections send part of their headers; even ones send all headers with
`Content-Length: 1000` and 10 bytes of body. Every 5 s each socket is peeked at: one with nothing
to read that is not closed counts as open. Also prints the server's open file descriptors.
"""

from __future__ import annotations

import os
import socket
import sys
import time

HEADERS = b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def main() -> None:
    host, port, n, wait_s, pid = (
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        float(sys.argv[4]),
        int(sys.argv[5]),
    )

    def fds() -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    print(f"server fds before: {fds()}")
    socks = []
    for i in range(n):
        sock = socket.create_connection((host, port))
        if i % 2:
            sock.sendall(HEADERS)
        else:
            sock.sendall(HEADERS + b"Content-Length: 1000\r\n\r\n" + b'{"query": ')
        sock.setblocking(False)
        socks.append(sock)
    time.sleep(1)
    print(f"{n} stalled connections opened; server fds: {fds()}")
    started = time.monotonic()
    while time.monotonic() - started < wait_s:
        time.sleep(min(5.0, wait_s))
        still_open = answered_408 = refused_503 = 0
        for sock in socks:
            try:
                data = sock.recv(65536, socket.MSG_PEEK)
            except BlockingIOError:
                still_open += 1
                continue
            except ConnectionResetError:
                continue
            answered_408 += data.startswith(b"HTTP/1.1 408")
            refused_503 += data.startswith(b"HTTP/1.1 503")
        print(
            f"after {time.monotonic() - started:.0f} s: still open {still_open} of {n}; "
            f"408: {answered_408}; 503: {refused_503}; server fds {fds()}"
        )


if __name__ == "__main__":
    main()
