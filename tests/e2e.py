"""Helpers for tests that run the real supervisor and worker as processes.

    run = SupervisedRun(tmp_path, "r1", ["max_dimension=600000000"])
    run.start()                       # python -m nkat.supervisor start … as a subprocess
    run.wait_progress(epoch=1)        # until the worker of that epoch has made progress
    run.kill_worker()                 # SIGKILL the current worker
    assert run.wait() == 0
    assert deterministic(run.result()) == deterministic(reference(...))
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from nkat.supervisor import loghead
from nkat.supervisor.wal import RecordType
from nkat.supervisor.wal.readonly import read_records

REPO = Path(__file__).resolve().parent.parent

#: Settings that make a test run restart quickly and never give up on random kills.
FAST_RESTARTS = ["restart_delay=0.05", "restart_delay_max=0.2", "max_restarts=1000",
                 "poison_after=1000", "checkpoint_interval=0.2", "segment_size=1048576"]

#: Failpoints for a run that only has to stay alive while a test watches it: 20 ms a unit,
#: so a never-ending job does not take the CPU from the tests beside it.
IDLING = "crawl@seconds=0.02"


def deterministic(result: dict[str, Any]) -> str:
    """The blocks of a result that must be byte-identical across interruptions."""
    return json.dumps({k: v for k, v in result.items()
                       if k not in ("performance", "provenance")}, sort_keys=True)


def env_with(failpoints: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("NKAT_FAILPOINTS", None)
    if failpoints:
        env["NKAT_FAILPOINTS"] = failpoints
    return env


#: Where reference results are kept for the whole session, shared by pytest-xdist's
#: workers (set by conftest.py); None computes each one afresh.
REFERENCE_CACHE: Path | None = None


def reference(params: Iterable[str]) -> dict[str, Any]:
    """The result of one uninterrupted standalone run with these job params, computed once
    per session: the first caller runs it while the others wait on its lock."""
    params = list(params)
    if REFERENCE_CACHE is None:
        return _standalone_result(params)
    key = hashlib.sha256("\0".join(params).encode()).hexdigest()[:20]
    kept = REFERENCE_CACHE / f"{key}.json"
    REFERENCE_CACHE.mkdir(parents=True, exist_ok=True)
    with open(REFERENCE_CACHE / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if kept.exists():
            result: dict[str, Any] = json.loads(kept.read_text())
            return result
        result = _standalone_result(params)
        partial = kept.with_suffix(".partial")
        partial.write_text(json.dumps(result))
        partial.replace(kept)
        return result


def _standalone_result(params: list[str]) -> dict[str, Any]:
    argv = [sys.executable, "-m", "nkat.worker", "--standalone", "--backend", "numpy"]
    for p in params:
        argv += ["--set", p]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env=env_with(),
                         timeout=300)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class SupervisedRun:
    """One run directory and the supervisor processes started on it."""

    def __init__(self, tmp: Path, run_id: str, settings: Iterable[str],
                 failpoints: str | None = None, extra_args: Iterable[str] = ()) -> None:
        self.state = tmp / "state"
        self.run_id = run_id
        self.settings = list(settings)
        self.failpoints = failpoints
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[str] | None = None

    @property
    def path(self) -> Path:
        return self.state / "runs" / self.run_id

    def argv(self, command: str = "start") -> list[str]:
        argv = [sys.executable, "-m", "nkat.supervisor", command, "--state-dir", str(self.state),
                "--run-id", self.run_id, "--quiet", "--backend", "numpy", *self.extra_args]
        for s in self.settings:
            argv += ["--set", s]
        return argv

    def start(self) -> subprocess.Popen[str]:
        self.proc = subprocess.Popen(self.argv(), env=env_with(self.failpoints),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _STARTED.append(self.proc)
        return self.proc

    def wait(self, timeout: float = 240) -> int:
        assert self.proc is not None
        try:
            self.out, self.err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.out, self.err = self.proc.communicate()
            raise AssertionError(f"supervisor did not finish in {timeout}s:\n{self.err}") \
                from None
        return self.proc.returncode

    # What the run says about itself --------------------------------------------------
    def status(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.path / "status.json").read_text())
            return data
        except (FileNotFoundError, ValueError):
            return {}

    def result(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.path / "results" / "result.json").read_text())
        return data

    def records(self) -> list[Any]:
        if not (self.path / "wal").is_dir():
            return []
        return list(read_records(self.path / "wal"))

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        log_dir = self.path / "logs"
        files = loghead.head_files(log_dir / "supervisor.jsonl") + sorted(
            log_dir.glob("supervisor.jsonl.*"), key=lambda p: -int(p.suffix[1:])) + [
            log_dir / "supervisor.jsonl"]
        for path in files:
            if not path.exists():
                continue
            for line in path.read_text().splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if name is None or event.get("event") == name:
                    out.append(event)
        return out

    def acked_ckpt_seq(self) -> int:
        """The newest checkpoint the supervisor has acknowledged (logged after the ack)."""
        return max((e["ckpt_seq"] for e in self.events("checkpoint.durable")), default=0)

    def resumed_seqs(self) -> list[int]:
        return [int(r.payload.get("resume_ckpt_seq", 0)) for r in self.records()
                if r.type is RecordType.EPOCH]

    # The worker ----------------------------------------------------------------------
    def worker(self) -> psutil.Process | None:
        """The current worker process (a child of the supervisor), if any."""
        if self.proc is None:
            return None
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return None
        for child in children:
            try:
                if "nkat.worker" in " ".join(child.cmdline()) and \
                        child.status() != psutil.STATUS_ZOMBIE:
                    return child
            except psutil.Error:
                continue
        return None

    def wait_welcomed(self, epoch: int, timeout: float = 60) -> None:
        """Until the worker of ``epoch`` has been welcomed (from the log: no status lag)."""
        wait_for(lambda: any(e.get("epoch") == epoch for e in self.events("worker.welcomed")),
                 timeout, f"the worker of epoch {epoch} to be welcomed", interval=0.01)

    def wait_progress(self, epoch: int | None = None, timeout: float = 60) -> dict[str, Any]:
        """Until the status shows the worker of ``epoch`` running with units done."""
        def ready() -> dict[str, Any] | None:
            st = self.status()
            if st.get("state") in ("running", "paused") and (st.get("units_done") or 0) > 0 \
                    and (epoch is None or st.get("epoch") == epoch):
                return st
            return None
        result: dict[str, Any] = wait_for(ready, timeout, f"progress of epoch {epoch}")
        return result

    def kill_worker(self, sig: int = signal.SIGKILL) -> int:
        worker = wait_for(self.worker, 30, "a worker process")
        pid: int = worker.pid
        os.kill(pid, sig)
        return pid

    def kill_supervisor(self) -> list[int]:
        """SIGKILL the supervisor alone; returns the worker pids that were alive."""
        assert self.proc is not None
        sup = psutil.Process(self.proc.pid)
        workers = [c.pid for c in sup.children(recursive=True)]
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return workers


def gone(pids: Iterable[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


_STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def reap_processes() -> Iterator[None]:
    """No supervisor or worker outlives its test (import this into a test module)."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
            except psutil.Error:
                pass
            proc.kill()
            proc.communicate()
