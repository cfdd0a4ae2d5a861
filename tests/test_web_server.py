"""The HTTP serving layer under idle-connection floods: bounded connections, file handles and
threads, idle connections closed after the timeout, and a real request still answered.

The hostile client is another process (tests/idle_flood.py) holding hundreds of idle TCP
connections, as the local user of issue 10 did to the old threaded metrics server."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from nkat.supervisor.ops.metrics import RunMetrics
from nkat.supervisor.web.server import ConnectionLimiter, loop_thread_alive
from tests.e2e import IDLING, SupervisedRun, reap_processes  # noqa: F401 - the fixture is autouse

REPO = Path(__file__).resolve().parent.parent
FLOOD = 500


def open_sockets() -> int:
    """This process's open socket handles (the pipes to the flood process are not counted)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            continue  # the fd of the listing itself, closed already
    return count


class Flood:
    """``tests/idle_flood.py`` as a child process."""

    def __init__(self, port: int, count: int, partial: bool = False) -> None:
        argv = [sys.executable, "-m", "tests.idle_flood", "127.0.0.1", str(port), str(count)]
        self.proc = subprocess.Popen(argv + (["--partial"] if partial else []), cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == f"connected {count}", line

    def closed(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("?\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline().split()[1])

    def end(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


def wait_until(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


@pytest.fixture
def metrics() -> Iterator[RunMetrics]:
    m = RunMetrics("r1")
    m.serve("127.0.0.1:0", max_connections=16, idle_timeout=1.5)
    yield m
    m.close()


# The policy -------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_full_limiter_evicts_the_longest_idle_connection_for_a_newcomer():
    clock, closed = Clock(), []
    lim = ConnectionLimiter(3, idle_timeout=10, clock=clock)
    for name in "abc":
        assert lim.admit(name, lambda n=name: closed.append(n))
        clock.now += 1
    lim.busy("a")  # mid-request: never evicted
    assert lim.admit("d", lambda: closed.append("d"))
    assert closed == ["b"] and len(lim) == 3 and lim.evicted == 1


def test_a_limiter_full_of_requests_in_progress_refuses_the_newcomer():
    lim = ConnectionLimiter(2, idle_timeout=10, clock=Clock())
    for name in "ab":
        lim.admit(name, lambda: None)
        lim.busy(name)
    assert not lim.admit("c", lambda: None)
    assert lim.refused == 1 and len(lim) == 2


def test_idle_connections_expire_and_busy_ones_do_not():
    clock, closed = Clock(), []
    lim = ConnectionLimiter(8, idle_timeout=5, clock=clock)
    for name in "abc":
        lim.admit(name, lambda n=name: closed.append(n))
    lim.busy("b")
    clock.now = 4.9
    assert lim.expire() == 0
    clock.now = 5.0
    assert lim.expire() == 2 and sorted(closed) == ["a", "c"]
    lim.idle("b")  # its request ended at 5.0: idle from then on
    clock.now = 9.9
    assert lim.expire() == 0
    clock.now = 10.0
    assert lim.expire() == 1 and len(lim) == 0


def test_limiter_bounds_are_checked():
    with pytest.raises(ValueError):
        ConnectionLimiter(0, 1.0)
    with pytest.raises(ValueError):
        ConnectionLimiter(1, 0.0)


# Real sockets -----------------------------------------------------------------------------
def test_500_idle_connections_hold_no_more_handles_than_the_bound_and_a_scrape_succeeds(
        metrics: RunMetrics):
    assert metrics.port is not None
    scrape(metrics.port)  # warm: the loop thread and its first connection exist
    sockets_before, threads_before = open_sockets(), threading.active_count()
    flood = Flood(metrics.port, FLOOD)
    try:
        # The server has accepted (and evicted) them all once the flood's last connection
        # is held; every one of the 500 is either held or closed by then.
        wait_until(lambda: flood.closed() >= FLOOD - 16, 20, "the flood to be trimmed")
        during = open_sockets()
        assert during <= sockets_before + 16 + 4, (sockets_before, during)
        assert threading.active_count() == threads_before  # no thread per connection
        assert "nkat_up" in scrape(metrics.port)
    finally:
        flood.end()


def test_idle_and_trickling_connections_are_closed_after_the_idle_timeout(metrics: RunMetrics):
    assert metrics.port is not None
    sockets_before = open_sockets()
    idle, partial = Flood(metrics.port, 5), Flood(metrics.port, 5, partial=True)
    try:
        started = time.monotonic()
        wait_until(lambda: idle.closed() == 5 and partial.closed() == 5, 10,
                   "the idle connections to be closed")
        assert time.monotonic() - started >= 1.0  # not before the timeout (1.5 s) is near
        wait_until(lambda: open_sockets() <= sockets_before, 5,
                   "the server's handles to be released")
    finally:
        idle.end()
        partial.end()


def test_a_keep_alive_connection_serves_several_requests_then_idles_out(metrics: RunMetrics):
    import http.client

    assert metrics.port is not None
    conn = http.client.HTTPConnection("127.0.0.1", metrics.port, timeout=5)
    for _ in range(3):
        conn.request("GET", "/metrics")
        reply = conn.getresponse()
        assert reply.status == 200 and b"nkat_up" in reply.read()
    time.sleep(2.5)  # idle_timeout 1.5 s, reaped within a quarter of it
    conn.request("GET", "/metrics")
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        conn.getresponse()
    conn.close()


def test_the_serving_thread_stops_with_the_last_server():
    first, second = RunMetrics("a"), RunMetrics("b")
    first.serve("127.0.0.1:0")
    second.serve("127.0.0.1:0")
    names = [t.name for t in threading.enumerate()]
    assert names.count("nkat-http") == 1  # one thread for every endpoint of the process
    first.close()
    assert second.port is not None and "nkat_up" in scrape(second.port)
    second.close()
    wait_until(lambda: not loop_thread_alive(), 5, "the serving thread to stop")


def test_a_port_in_use_is_an_oserror_at_serve():
    first = RunMetrics("a")
    first.serve("127.0.0.1:0")
    try:
        with pytest.raises(OSError):
            RunMetrics("b").serve(f"127.0.0.1:{first.port}")
    finally:
        first.close()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_live_supervisor_under_a_metrics_flood_keeps_its_handles_and_runs_on(tmp_path):
    port = free_port()
    run = SupervisedRun(tmp_path, "flood", ["max_dimension=1000000000000",
                                            f"metrics_addr=127.0.0.1:{port}",
                                            "checkpoint_interval=0.2"],
                        failpoints=IDLING)
    proc = run.start()
    run.wait_progress()
    sup = psutil.Process(proc.pid)
    # The endpoint serves while the run is live, and the gauge follows the worker's state.
    wait_until(lambda: 'nkat_up{run_id="flood"} 1.0' in scrape(port), 30,
               "nkat_up to show the running worker")
    fds_before, threads_before = sup.num_fds(), sup.num_threads()
    flood = Flood(port, FLOOD)
    try:
        wait_until(lambda: flood.closed() >= FLOOD - 16, 30, "the flood to be trimmed")
        assert sup.num_fds() <= fds_before + 16 + 4, (fds_before, sup.num_fds())
        assert sup.num_threads() <= threads_before + 1  # no thread per connection
        seq = run.acked_ckpt_seq()
        assert 'nkat_up{run_id="flood"} 1.0' in scrape(port)
        wait_until(lambda: run.acked_ckpt_seq() > seq, 30, "checkpoints during the flood")
    finally:
        flood.end()
    stop = subprocess.run([sys.executable, "-m", "nkat.supervisor", "stop", "--state-dir",
                           str(run.state), run.run_id], capture_output=True, text=True,
                          timeout=60)
    assert stop.returncode == 0, stop.stderr
    assert run.wait(60) == 4  # stopped by the operator, not crashed (exit 2 in issue 10)
    assert not run.events("wal.write_failed")
