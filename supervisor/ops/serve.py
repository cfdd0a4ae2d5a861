"""``nkat-supervise serve``: a read-only web page of every run in the state directory, for a
browser or a phone; it updates live, without reloads, and writes nothing to any run.

    nkat-supervise serve                      # http://127.0.0.1:8765/
    nkat-supervise serve --addr 0.0.0.0:8765 --token-file ~/.config/nkat-supervise/token

Any address but loopback needs ``--token-file`` (exit 2 without one). Runs until Ctrl-C or
SIGTERM, then exits 0. The page is ``nkat.supervisor.web.page``, on aiohttp, which is
imported only when this command runs.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from nkat.supervisor.rundir import state_dir

DEFAULT_ADDR = "127.0.0.1:8765"
EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--addr", default=DEFAULT_ADDR, metavar="HOST:PORT",
                        help=f"where to serve the page (default {DEFAULT_ADDR}; port 0 picks "
                             "a free one); any address but loopback needs --token-file")
    parser.add_argument("--token-file", metavar="FILE",
                        help="file holding the token readers must present (at least 16 of "
                             "A-Z a-z 0-9 . _ ~ -); open the page once as "
                             "http://HOST:PORT/?token=TOKEN and the browser keeps it")


def _error(message: str) -> int:
    print(f"nkat-supervise: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run(args: argparse.Namespace) -> int:
    from nkat.supervisor.web.access import AccessError, listen_token

    try:
        token = listen_token(args.addr, args.token_file, "--addr")
    except AccessError as exc:
        return _error(str(exc))
    try:
        from nkat.supervisor.web.board import Board
        from nkat.supervisor.web.page import StatusPage
    except ImportError as exc:
        return _error(f"serve needs aiohttp ({exc}); install it with: pip install aiohttp")
    state = state_dir(args.state_dir)
    page = StatusPage(Board(state), args.addr, token=token, what="--addr")
    try:
        page.start()
    except OSError as exc:
        return _error(f"cannot serve on {args.addr}: {exc.strerror or exc}")
    stop = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"serving the runs in {state} on {page.url}", flush=True)
        if token is not None:
            print(f"open {page.url}?token=TOKEN once (TOKEN: the contents of "
                  f"{args.token_file}); the browser keeps it in a cookie", flush=True)
        print("read-only; Ctrl-C stops it", flush=True)
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        page.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m nkat.supervisor.ops.serve``: the command without the whole CLI."""
    parser = argparse.ArgumentParser(prog="nkat-supervise serve", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--state-dir", metavar="DIR")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
