"""Another process that holds idle TCP connections to a port, as a hostile local user would.

    python -m tests.idle_flood HOST PORT N [--partial]

Opens N connections (``--partial``: each sends half a request header and stops), prints
``connected N`` (or how many it managed, and why it stopped), then answers each line on
stdin with ``closed K``: how many of its connections the server has closed so far. EOF on
stdin ends it.
"""

from __future__ import annotations

import argparse
import socket
import sys


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset by the peer
        return True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--partial", action="store_true")
    args = parser.parse_args()
    socks = []
    try:
        for _ in range(args.count):
            sock = socket.create_connection((args.host, args.port), timeout=5)
            if args.partial:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            sock.setblocking(False)  # a socket with a timeout would wait in every peek
            socks.append(sock)
    except OSError as exc:  # the server stopped accepting: say so, and how far it got
        print(f"connected {len(socks)} of {args.count}: {exc}", flush=True)
    else:
        print(f"connected {len(socks)}", flush=True)
    for _line in sys.stdin:
        print(f"closed {sum(closed_by_peer(s) for s in socks)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
