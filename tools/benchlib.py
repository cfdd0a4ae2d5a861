"""Helpers shared by the tools that drive real processes: the crash campaign and the
``supervisor`` and ``cli`` bench suites.

    run = SupervisedRun(state_dir, "r1", {"max_dimension": 10**8})
    run.start()                          # python -m nkat.supervisor start --run-id r1 ...
    events = LogTail(run.log_file)       # the run's JSON log, read as it grows
    for event in events.read(): ...      # each with "_t" (wall seconds) and "_pos"
    worker = run.worker()                # psutil.Process of the live worker, or None
    code = run.wait(60)
    result, wall_s = standalone({"max_dimension": 10**8})   # the uninterrupted baseline
    deterministic(result) == deterministic(run.result())    # what no crash may change

Everything here is plain subprocess, psutil and file reading: the tools observe the
supervisor the way an operator would, never from inside.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import zmq

#: Result blocks that describe how a run went rather than what it computed.
NONDETERMINISTIC = ("performance", "provenance")


def deterministic(result: Mapping[str, Any]) -> str:
    """The part of a result that must be byte-identical however often the run died."""
    return json.dumps({k: v for k, v in result.items() if k not in NONDETERMINISTIC},
                      sort_keys=True)


def set_args(sets: Mapping[str, Any]) -> list[str]:
    """``--set KEY=VALUE`` arguments, values spelled as JSON (3, 0.5, true)."""
    args: list[str] = []
    for key, value in sets.items():
        args += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return args


def standalone(params: Mapping[str, Any], *, backend: str = "auto",
               env: Mapping[str, str] | None = None) -> tuple[dict[str, Any], float]:
    """Run the job with ``python -m nkat.worker --standalone``; (result, wall seconds)."""
    with tempfile.TemporaryDirectory(prefix="nkat-bare-") as tmp:
        out = Path(tmp) / "result.json"
        argv = [sys.executable, "-m", "nkat.worker", "--standalone", "--backend", backend,
                *set_args(params), "--out", str(out)]
        started = time.perf_counter()
        proc = subprocess.run(argv, env=_env(env), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"standalone run failed ({proc.returncode}): "
                               f"{proc.stderr.strip()[-2000:]}")
        return json.loads(out.read_text()), wall


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NKAT_FAILPOINTS", None)  # only what a caller plants on purpose
    env.update(extra or {})
    return env


class SupervisedRun:
    """One run id under one state directory, supervised by ``python -m nkat.supervisor
    start``; ``start`` again after a kill resumes it. Only ever signals what it started."""

    def __init__(self, state_dir: Path, run_id: str, sets: Mapping[str, Any], *,
                 backend: str = "auto", env: Mapping[str, str] | None = None,
                 command: list[str] | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.command = command or [sys.executable, "-m", "nkat.supervisor"]
        self.run_id = run_id
        self.sets = dict(sets)
        self.backend = backend
        self.env = _env(env)
        self.run_dir = self.state_dir / "runs" / run_id
        self.log_file = self.run_dir / "logs" / "supervisor.jsonl"
        self.result_file = self.run_dir / "results" / "result.json"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.started_wall = 0.0
        self._stderr = self.state_dir / f"{run_id}.supervisor.stderr"
        self._seen_workers: dict[int, psutil.Process] = {}

    def argv(self) -> list[str]:
        return [*self.command, "start", "--state-dir",
                str(self.state_dir), "--run-id", self.run_id, "--quiet", "--backend",
                self.backend, *set_args(self.sets)]

    def endpoint(self, name: str) -> str:
        return f"ipc://{self.run_dir / 'sock' / name}"

    def start(self) -> subprocess.Popen[bytes]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self._stderr, "ab") as err:
            self.started_wall = time.time()
            # Its own session: a Ctrl-C meant for the tool must not reach the run.
            self.proc = subprocess.Popen(self.argv(), env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)
        self.starts += 1
        return self.proc

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr_tail(self, chars: int = 2000) -> str:
        try:
            return self._stderr.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def process(self) -> psutil.Process | None:
        if not self.running():
            return None
        assert self.proc is not None
        try:
            return psutil.Process(self.proc.pid)
        except psutil.Error:
            return None

    def worker(self) -> psutil.Process | None:
        """The supervisor's live worker child, if one exists right now."""
        sup = self.process()
        if sup is None:
            return None
        try:
            children = sup.children()
        except psutil.Error:
            return None
        for child in children:
            try:
                if is_worker(child.cmdline()) and alive(child):
                    self._seen_workers.setdefault(child.pid, child)
                    return child
            except psutil.Error:
                continue
        return None

    def wait_worker(self, timeout: float) -> psutil.Process | None:
        """The worker, waiting for one to be spawned; None if the supervisor exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.running():
            worker = self.worker()
            if worker is not None:
                return worker
            time.sleep(0.01)
        return None

    def wait(self, timeout: float | None = None) -> int | None:
        """The supervisor's exit code, or None if it is still running after ``timeout``."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def sigkill(self) -> bool:
        """SIGKILL the supervisor process alone (never its worker) and reap it."""
        if not self.running():
            return False
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return True

    def result(self) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = json.loads(self.result_file.read_text())
        except (OSError, ValueError):
            return None
        return result

    def status(self, timeout: float = 0.5) -> dict[str, Any] | None:
        """The live status from the control socket, None when nobody answers."""
        from nkat.supervisor import control

        try:
            reply = control.request(self.endpoint("control"), "status", timeout=timeout)
        except control.ControlUnavailable:
            return None
        return reply.get("status") if reply.get("ok") else None

    def stray_workers(self, supervisor_pid: int | None = None) -> list[psutil.Process]:
        """Live workers of this run (any epoch; of ``supervisor_pid`` only, if given)."""
        endpoint = self.endpoint("worker")
        found = {p.pid: p for p in self._seen_workers.values() if alive(p)}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if proc.pid in found or "nkat.worker" not in " ".join(proc.info["cmdline"] or ()):
                    continue
                env = proc.environ()
            except psutil.Error:
                continue
            if env.get("NKAT_ENDPOINT") == endpoint and alive(proc):
                found[proc.pid] = proc
        if supervisor_pid is None:
            return list(found.values())
        out = []
        for proc in found.values():
            try:
                if proc.environ().get("NKAT_SUPERVISOR_PID") == str(supervisor_pid):
                    out.append(proc)
            except psutil.Error:
                continue
        return out

    def cleanup(self) -> None:
        """Leave nothing running: the supervisor and every worker of this run."""
        for proc in self.stray_workers():
            with contextlib.suppress(psutil.Error):
                proc.kill()
        if self.running():
            self.sigkill()
        for proc in self.stray_workers():
            with contextlib.suppress(psutil.Error):
                proc.kill()


#: ``python -m nkat.worker`` runs the supervisor starts that are not a run's worker: the
#: check of a spec before a run exists, the merge of shards' states.
WORKER_TOOL_FLAGS = ("--check-spec", "--merge-shards")


def is_worker(cmdline: list[str]) -> bool:
    """Whether a process's command line is a supervised worker's."""
    return "nkat.worker" in " ".join(cmdline) and not any(
        flag in cmdline for flag in WORKER_TOOL_FLAGS)


def cli_command() -> list[str]:
    """How an operator runs the CLI: the ``nkat-supervise`` script installed beside this
    interpreter, else ``python -m nkat.supervisor``."""
    script = Path(sys.executable).with_name("nkat-supervise")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "nkat.supervisor"]


class EventStream:
    """The run's PUB socket (``sock/events``): beats and status snapshots, each stamped
    with the wall time it was read. Connecting before the supervisor binds is fine."""

    def __init__(self, endpoint: str) -> None:
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 10)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)

    def read(self, timeout: float = 0.0) -> list[tuple[float, dict[str, Any]]]:
        """What arrived, waiting up to ``timeout`` for the first message."""
        out: list[tuple[float, dict[str, Any]]] = []
        if not self.sock.poll(int(timeout * 1000)):
            return out
        while True:
            try:
                raw = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return out
            with contextlib.suppress(ValueError):
                body = json.loads(raw)
                if isinstance(body, dict):
                    out.append((time.time(), body))

    def close(self) -> None:
        self.sock.close()


def alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (an orphan's zombie waits for init, which may not reap)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process is gone; those still alive at ``timeout``."""
    deadline = time.monotonic() + timeout
    left = [p for p in procs if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.01)
        left = [p for p in left if alive(p)]
    return left


def ts_wall(ts: str) -> float:
    """A log line's ``ts`` (UTC ISO-8601) as seconds since the epoch, like time.time()."""
    return datetime.datetime.fromisoformat(ts).timestamp()


class LogTail:
    """Reads a JSON-lines log as it grows; each event gets ``_t`` (its ``ts`` in wall
    seconds) and ``_pos`` (the byte offset just past its line). The tools raise the
    run's ``log_max_bytes`` so the file never rotates under them."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offset = 0
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        events = []
        data = self._partial + chunk
        start = self.offset - len(self._partial)
        self.offset += len(chunk)
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            start += len(line) + 1
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                event["_pos"] = start
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    event["_t"] = ts_wall(event["ts"])
                events.append(event)
        return events

    def follow(self, until: Callable[[dict[str, Any]], bool], timeout: float,
               alive_check: Callable[[], bool] | None = None) -> dict[str, Any] | None:
        """The first new event for which ``until`` is true, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.read():
                if until(event):
                    return event
            if alive_check is not None and not alive_check():
                for event in self.read():
                    if until(event):
                        return event
                return None
            time.sleep(0.01)
        return None


def events_of(path: Path) -> Iterator[dict[str, Any]]:
    """Every event of a finished log."""
    yield from LogTail(path).read()


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 1]): the one definition every bench uses, p50
    included (a value that was measured, never an average of two); None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def p50(values: Iterable[float]) -> float:
    """The nearest-rank median of at least one value."""
    value = percentile(values, 0.5)
    if value is None:
        raise ValueError("p50 of no values")
    return value


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def cpu_seconds(proc: psutil.Process) -> float | None:
    """User + system CPU seconds of the process itself (not its children)."""
    try:
        times = proc.cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def children_cpu_seconds() -> float:
    """User + system CPU seconds of every reaped descendant (a reaped supervisor brings
    the workers it reaped): the exact CPU of a finished run, whatever else loads the
    machine, as the difference of two readings."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def peak_rss_bytes(pid: int) -> int | None:
    """The kernel's high-water mark of a process's RSS (VmHWM), None where unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class WebhookReceiver:
    """A webhook on 127.0.0.1 that answers every POST with 200 and keeps what arrived:
    ``received`` holds (wall time the whole body was read, the JSON document).

        with WebhookReceiver() as hook:
            ... notify_url = hook.url ...
            (arrived, document), = hook.wait_for(1, timeout=10)
    """

    def __init__(self) -> None:
        self.received: list[tuple[float, Any]] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                arrived = time.time()
                try:
                    document = json.loads(body)
                except ValueError:
                    document = None
                with receiver._cond:
                    receiver.received.append((arrived, document))
                    receiver._cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/hook"

    def wait_for(self, count: int, timeout: float) -> list[tuple[float, Any]]:
        """The first ``count`` deliveries, waiting up to ``timeout``; fewer if they do not
        come."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.received) >= count, timeout)
            return list(self.received[:count])

    def __enter__(self) -> WebhookReceiver:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
