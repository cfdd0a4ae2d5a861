"""Starting, signalling and reaping one worker process (the only place that forks).

A worker runs ``python -m nkat.worker`` in its own session (so its whole process group
can be signalled), with its epoch, token and endpoint in the environment, and its
stdout/stderr on pipes the supervisor's poll loop reads line by line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any

import msgpack
import psutil

from nkat.supervisor.wal import WalError

#: How long the job's own check of a spec may take (it imports the job, e.g. NumPy).
CHECK_TIMEOUT_S = 60.0


@dataclasses.dataclass(frozen=True)
class JobFacts:
    """What the job said of a spec it accepted."""

    units_total: int
    shardable: bool


def check_job_spec(spec: dict[str, object]) -> JobFacts | str:
    """Ask the job itself, in a worker process, whether it accepts ``spec``: its facts if
    it does, else its message (an unknown job, a module that does not import, a bad
    param)."""
    try:
        done = subprocess.run([sys.executable, "-m", "nkat.worker", "--check-spec"],
                              input=json.dumps(spec), capture_output=True, text=True,
                              timeout=CHECK_TIMEOUT_S, env=worker_env())
    except subprocess.TimeoutExpired:
        return f"the job did not answer within {CHECK_TIMEOUT_S:g} s while checking its spec"
    if done.returncode != 0:
        return done.stderr.strip() or f"the job's check exited {done.returncode}"
    try:
        facts = json.loads(done.stdout.strip().splitlines()[-1])
        return JobFacts(int(facts["units_total"]), bool(facts["shardable"]))
    except (ValueError, KeyError, IndexError, TypeError):
        return f"the job's check printed no facts: {done.stdout[-200:]!r}"


#: How long merging the shards' states into the result may take.
MERGE_TIMEOUT_S = 300.0


def merge_shards(wal: Any, run: Any, shards: Sequence[tuple[int, tuple[int, int]]],
                 provenance: Mapping[str, Any]) -> tuple[Any, str | None]:
    """Merge a sharded run's shard states (the newest checkpoint of each), as the job
    would (``python -m nkat.worker --merge-shards``): (the result, None), or (None, why
    it could not be merged)."""
    states = []
    try:
        for index, span in shards:
            latest = wal.latest_checkpoint(shard=index)
            if latest is None:
                return None, f"shard {index} has no durable checkpoint"
            states.append({"range": list(span), "state": latest.state})
    except (OSError, WalError) as exc:
        return None, f"a shard's state cannot be read: {exc}"
    request = msgpack.packb({"spec": run.info.spec, "states": states,
                             "provenance": dict(provenance)}, use_bin_type=True)
    try:
        done = subprocess.run([sys.executable, "-m", "nkat.worker", "--merge-shards"],
                              input=request, capture_output=True, timeout=MERGE_TIMEOUT_S,
                              env=_job_env(worker_env(), run.info.job_env),
                              cwd=_job_cwd(run.info.job_env))
    except subprocess.TimeoutExpired:
        return None, f"the merge took over {MERGE_TIMEOUT_S:g} s"
    if done.returncode != 0:
        return None, done.stderr.decode("utf-8", "replace").strip()[-500:]
    try:
        return json.loads(done.stdout), None
    except ValueError as exc:
        return None, f"the merge printed no result: {exc}"


def _job_env(env: dict[str, str], job_env: Mapping[str, str] | None) -> dict[str, str]:
    """``env`` with what a custom job's import needs (recorded at the run's first start)."""
    if job_env:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (job_env.get("PYTHONPATH", ""), job_env.get("cwd", "")) if p)
    return env


def _job_cwd(job_env: Mapping[str, str] | None) -> str | None:
    cwd = (job_env or {}).get("cwd", "")
    return cwd if cwd and os.path.isdir(cwd) else None


def worker_env(**extra: str) -> dict[str, str]:
    """The environment a worker (or a job check) runs in: ours, unbuffered."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


class WorkerProcess:
    """One worker incarnation (epoch)."""

    def __init__(self, epoch: int, endpoint: str, backend: str, job: str,
                 gpu_index: int = 0, job_env: Mapping[str, str] | None = None,
                 gpu_uuid: str | None = None) -> None:
        self.epoch = epoch
        self.token = secrets.token_hex(16)
        env = worker_env(NKAT_ENDPOINT=endpoint, NKAT_TOKEN=self.token,
                         NKAT_EPOCH=str(epoch), NKAT_SUPERVISOR_PID=str(os.getpid()),
                         NKAT_BACKEND=backend, NKAT_JOB=job)
        if gpu_uuid:
            # One GPU of several: CUDA names it by the UUID NVML reported, whatever order
            # either counts devices in.
            env["CUDA_VISIBLE_DEVICES"] = gpu_uuid
        elif "CUDA_VISIBLE_DEVICES" not in env:
            # CUDA numbers devices fastest-first, NVML by PCI bus: make them agree, so the
            # GPU the sensor watches is the one the worker computes on.
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            env["CUDA_VISIBLE_DEVICES"] = str(gpu_index)
        env = _job_env(env, job_env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nkat.worker"], cwd=_job_cwd(job_env),
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, close_fds=True,
        )
        self.pid = self.proc.pid
        self.pgid = self.pid  # start_new_session makes the worker its group's leader
        self.returncode: int | None = None
        self.last_words_awaited = False  # the shell read all it sent before its exit
        self.connection_fd: int | None = None  # the supervisor's end of its connection
        self._partial: dict[int, bytes] = {}
        self._streams: dict[int, tuple[str, IO[bytes]]] = {}
        for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            assert stream is not None
            os.set_blocking(stream.fileno(), False)
            self._streams[stream.fileno()] = (name, stream)

    @property
    def output_fds(self) -> dict[int, str]:
        """Pipe fds still open, with the stream name each carries."""
        return {fd: name for fd, (name, _) in self._streams.items()}

    def read_lines(self, fd: int) -> list[str]:
        """Whole lines available on ``fd``; a closed pipe flushes its last partial line."""
        if fd not in self._streams:
            return []
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return []
        buf = self._partial.get(fd, b"") + chunk
        if not chunk:  # EOF
            self._streams.pop(fd)[1].close()
            self._partial.pop(fd, None)
            return [buf.decode("utf-8", "replace")] if buf else []
        *lines, rest = buf.split(b"\n")
        # A runaway line without newlines is cut rather than buffered without bound.
        if len(rest) > 65536:
            lines.append(rest)
            rest = b""
        self._partial[fd] = rest
        return [line.decode("utf-8", "replace") for line in lines]

    def drain(self) -> Iterator[tuple[str, str]]:
        """Every line left on the pipes, to EOF, as (stream, line); then close them."""
        for fd, stream in list(self.output_fds.items()):
            while fd in self._streams:
                lines = self.read_lines(fd)
                yield from ((stream, line) for line in lines)
                if not lines and fd in self._streams:
                    break  # nothing more for now, and no EOF: the group keeps it open
        self.close()

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.proc.poll()
        return self.returncode

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass

    def group_alive(self) -> bool:
        """True while any process of the worker's group (or the worker itself) exists."""
        if self.poll() is None:
            return True
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # The leader is reaped but stragglers of its group remain (zombies count as gone).
        for proc in psutil.process_iter(["pid", "status"]):
            try:
                if os.getpgid(proc.info["pid"]) == self.pgid and \
                        proc.info["status"] != psutil.STATUS_ZOMBIE:
                    return True
            except (ProcessLookupError, psutil.Error):
                continue
        return False

    def describe_exit(self) -> str:
        code = self.returncode
        if code is None:
            return "running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def kill_now(self, wait: float = 5.0) -> None:
        """SIGKILL the whole group and wait (up to ``wait`` s) until it is gone."""
        self.signal_group(signal.SIGKILL)
        deadline = time.monotonic() + wait
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.close()

    def close(self) -> None:
        for _, stream in self._streams.values():
            stream.close()
        self._streams.clear()
