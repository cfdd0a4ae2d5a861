"""The compute loop shared by supervised and standalone runs (docs/architecture.md).

:class:`Runner` batches the job's units, merges their partials in unit order, and between
batches, at unit boundaries, obeys commands, hands snapshots over for checkpoints and
adapts the batch size. It reaches the outside only through a :class:`Link` (the zmq
channel, or stderr when standalone), so ``--standalone`` makes exactly the same job calls.

    runner = Runner(job, backend, settings, link, board, failpoints, ...)
    result = runner.run()   # or raises Stopped / RunFailed
"""

from __future__ import annotations

import dataclasses
import json
import queue
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from nkat.protocol import exitcodes
from nkat.protocol.messages import MAX_MESSAGE_BYTES, Ack, Cmd, Message, canonical_json
from nkat.worker import state
from nkat.worker.backend import Backend
from nkat.worker.batching import BatchSizer, UnitTimes
from nkat.worker.failpoints import Failpoints
from nkat.worker.heartbeat import Board
from nkat.worker.job import Job, JobParamsError, RunContext
from nkat.worker.settings import Settings

#: Progress deadline asked for before ``finalize``, which no batch timing predicts.
FINALIZE_EXTEND_S = 60.0
#: Room left in a message for the checkpoint's envelope around the job snapshot.
_ENVELOPE_BYTES = 1024 * 1024
#: How often a paused loop looks at its inbox when nothing arrives.
_PAUSED_POLL_S = 0.2

T = TypeVar("T")


class RunFailed(Exception):
    """The run cannot go on; ``kind`` and ``fatal`` go into ``fail``, ``exit_code`` out."""

    def __init__(self, kind: str, message: str, *, fatal: bool, exit_code: int,
                 tb: str = "") -> None:
        super().__init__(message)
        self.kind, self.message, self.fatal, self.exit_code = kind, message, fatal, exit_code
        self.traceback = tb


class Stopped(Exception):
    """``cmd stop`` obeyed; ``acked`` says whether the final checkpoint is durable."""

    def __init__(self, acked: bool) -> None:
        super().__init__("stopped")
        self.acked = acked


class Link(Protocol):
    """The runner's way out: the supervisor channel, or stderr when standalone."""

    inbox: queue.SimpleQueue[Message]

    def log(self, level: str, event: str, fields: Mapping[str, Any]) -> None: ...

    def extend(self, seconds: float, reason: str) -> None: ...

    def beat_now(self) -> None: ...

    def post_ckpt(self, ckpt_seq: int, units_done: int, job_state: bytes,
                  runtime: Mapping[str, Any]) -> None: ...


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run starts: after checkpoint ``ckpt_seq``, at ``units_done``."""

    ckpt_seq: int
    units_done: int
    counters: Mapping[str, Any]


def classify(exc: BaseException, backend: Backend) -> RunFailed:
    """What an exception from the job means for the run (and for a restart)."""
    tb = "".join(traceback.format_exception(exc))
    message = f"{type(exc).__name__}: {exc}"
    if backend.is_sticky(exc):
        return RunFailed("gpu_sticky", message, fatal=False, exit_code=exitcodes.GPU_STICKY,
                         tb=tb)
    if isinstance(exc, backend.oom_errors):
        return RunFailed("oom", message, fatal=False, exit_code=exitcodes.OOM, tb=tb)
    if isinstance(exc, JobParamsError):
        return RunFailed("params", message, fatal=True, exit_code=exitcodes.FATAL, tb=tb)
    return RunFailed("job_error", message, fatal=True, exit_code=exitcodes.FATAL, tb=tb)


class Runner:
    """One epoch's compute loop. The main thread's only loop; never touches a socket."""

    def __init__(self, job: Job, backend: Backend, settings: Settings, link: Link,
                 board: Board, failpoints: Failpoints, *, epoch: int, spec_hash: str,
                 checkpoints: bool, resume: ResumePoint | None = None) -> None:
        self.job, self.backend, self.settings, self.link = job, backend, settings, link
        self.board, self.failpoints, self.epoch = board, failpoints, epoch
        self.spec_hash = spec_hash
        self.checkpoints = checkpoints
        self.total = self._call(job.units_total)
        if not isinstance(self.total, int) or isinstance(self.total, bool) or self.total < 0:
            raise RunFailed("job_error", f"units_total() returned {self.total!r}", fatal=True,
                            exit_code=exitcodes.FATAL)
        self.counters = dict(resume.counters if resume else state.COUNTERS)
        self.units_done = resume.units_done if resume else 0
        self.first_unit = self.units_done  # where this process started
        if self.units_done > self.total:
            raise RunFailed("bad_resume", f"resume at unit {self.units_done} of {self.total}",
                            fatal=True, exit_code=exitcodes.FATAL)
        self.sizer = BatchSizer(settings.batch_size or job.default_batch_units,
                                adaptive=settings.batch_size_adaptive, units_total=self.total)
        self.unit_times = UnitTimes()  # this process's batches only
        self.progress_seq = 0
        self.duty = 1.0
        self.paused = False
        self.stop_deadline: float | None = None
        self.checkpoint_wanted = False
        self.next_ckpt_seq = resume.ckpt_seq + 1 if resume else 1
        self.acked_seq = resume.ckpt_seq if resume else 0
        self.inflight: tuple[int, int] | None = None  # (ckpt_seq, units_done)
        self.submitted_units = self.units_done
        self.last_ckpt_at = time.monotonic()
        self._publish(stage="startup")

    # The loop ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Compute every unit left, then finalize; the result is plain JSON data."""
        started = time.monotonic()
        self.last_ckpt_at = started
        if self.backend.warmup_seconds and self.units_done < self.total:
            self.link.extend(self.backend.warmup_seconds, "first_batch")
        while self.units_done < self.total:
            self._at_boundary()
            self._step()
        return self._finalize(time.monotonic() - started)

    def _step(self) -> None:
        first = self.units_done
        partials, count, seconds = self._compute(first)
        t0 = time.perf_counter()
        for partial in partials:
            self._call(self.job.merge, partial)
        seconds += time.perf_counter() - t0
        self.units_done += count
        self.progress_seq += 1
        self.counters["compute_seconds"] += seconds
        self.counters["batches"] += 1
        self.unit_times.add(seconds, count)
        self.backend.sample()
        sleep = seconds * (1.0 - self.duty) / self.duty
        if self.sizer.observe(count, seconds, headroom=self.backend.has_headroom(2.0)):
            self.link.log("info", "batch.resized", {"from": count, "to": self.sizer.size,
                                                    "reason": "throughput"})
        self._publish(stage="compute", batch_seconds=seconds, batch_units=count,
                      units_per_s=count / (seconds + sleep) if seconds + sleep > 0 else 0.0)
        if self.progress_seq == 1:
            # The epoch's first progress is news (a restart worked, the ETA can start):
            # beat now rather than up to a heartbeat_interval later.
            self.link.beat_now()
        if sleep > 0:
            self._sleep(sleep)

    def _compute(self, first: int) -> tuple[list[Any], int, float]:
        """Compute the next batch; on OOM free, halve and retry the same units."""
        while True:
            count = min(self.sizer.size, self.total - first)
            try:
                t0 = time.perf_counter()
                self.failpoints.before_batch(first, count)
                partials = list(self.job.compute(self.backend.xp, first, count))
                seconds = time.perf_counter() - t0
            except Exception as exc:
                failure = classify(exc, self.backend)
                if failure.kind != "oom":
                    raise failure from exc
                self.backend.free_pools()
                if count == 1:
                    raise failure from exc
                self.counters["oom_retries"] += 1
                self.sizer.shrink(count)
                self.link.log("warning", "batch.oom", {"first": first, "count": count,
                                                       "to": self.sizer.size})
                self._publish()
                continue
            if len(partials) != count:
                raise RunFailed("job_error", f"compute({first}, {count}) returned "
                                f"{len(partials)} partials", fatal=True,
                                exit_code=exitcodes.FATAL)
            return partials, count, seconds

    def _finalize(self, wall_seconds: float) -> dict[str, Any]:
        self._publish(stage="finalize")
        self.link.extend(FINALIZE_EXTEND_S, "finalize")
        provenance = self.settings.provenance
        context = RunContext(
            backend=self.backend.name, device=self.backend.device,
            epochs=provenance["epochs"], restarts=provenance["restarts"],
            compute_seconds=self.counters["compute_seconds"],
            peak_memory_bytes=max(self.counters["peak_memory_bytes"],
                                  self.backend.peak_memory_bytes()),
            spec_hash=self.spec_hash,
            extra={"units_total": self.total, "batches": self.counters["batches"],
                   "oom_retries": self.counters["oom_retries"], "batch_size": self.sizer.size,
                   "epoch_wall_seconds": wall_seconds, "epoch_first_unit": self.first_unit,
                   "unit_seconds_p10": self.unit_times.quantile(0.10),
                   "unit_seconds_p50": self.unit_times.quantile(0.50)})
        result = self._call(self.job.finalize, context)
        try:
            # One round through canonical JSON: what we send is what the digest covers.
            plain = json.loads(canonical_json(result))
        except (TypeError, ValueError) as exc:
            raise RunFailed("job_error", f"finalize returned a result that is not JSON: {exc}",
                            fatal=True, exit_code=exitcodes.FATAL) from exc
        if not isinstance(plain, dict):
            raise RunFailed("job_error", "finalize returned no dict", fatal=True,
                            exit_code=exitcodes.FATAL)
        return plain

    # Unit boundaries: commands, pause, checkpoints, stop -------------------------------

    def _at_boundary(self) -> None:
        self._drain_inbox()
        while True:
            if self.stop_deadline is not None:
                self._stop()
            self._maybe_checkpoint()
            if not self.paused:
                break
            self._publish(stage="paused")
            self._wait_inbox(_PAUSED_POLL_S)
        self._publish(stage="compute")

    def _sleep(self, seconds: float) -> None:
        """Throttle: wait at this unit boundary, checkpointing as usual, but leave early
        for a pause or a stop."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            self._wait_inbox(left)
            if self.paused or self.stop_deadline is not None:
                return
            self._maybe_checkpoint()

    def _drain_inbox(self) -> None:
        while True:
            try:
                self._handle(self.link.inbox.get_nowait())
            except queue.Empty:
                return

    def _wait_inbox(self, timeout: float) -> None:
        try:
            self._handle(self.link.inbox.get(timeout=max(0.0, timeout)))
        except queue.Empty:
            return
        self._drain_inbox()

    def _handle(self, msg: Message) -> None:
        if isinstance(msg, Ack):
            if self.inflight is not None and msg.ckpt_seq == self.inflight[0]:
                self.acked_seq = msg.ckpt_seq
                self.inflight = None
                self._publish(ckpt_seq=self.acked_seq)
            return
        if not isinstance(msg, Cmd):
            return
        self.link.log("info", f"cmd.{msg.op}", dict(msg.args))
        if msg.op == "checkpoint_now":
            self.checkpoint_wanted = True
        elif msg.op == "throttle":
            self.duty = float(msg.args["duty"])
            self._publish(duty=self.duty)
        elif msg.op == "pause":
            self.paused = True
        elif msg.op == "resume":
            self.paused = False
        elif msg.op == "free_memory":
            self.backend.free_pools()
            self.sizer.shrink(self.sizer.size)
            self._publish()
        elif msg.op == "stop":
            deadline = time.monotonic() + float(msg.args["deadline_s"])
            if self.stop_deadline is None or deadline < self.stop_deadline:
                self.stop_deadline = deadline

    def _maybe_checkpoint(self) -> None:
        if not self.checkpoints or self.inflight is not None:
            return  # at most one in flight: a wanted one waits for the ack
        now = time.monotonic()
        due = now - self.last_ckpt_at >= self.settings.checkpoint_interval
        if not (due or self.checkpoint_wanted):
            return
        if self.units_done > self.submitted_units:
            self._checkpoint()
        elif self.checkpoint_wanted:
            self.link.log("info", "checkpoint.skipped", {"units_done": self.units_done,
                                                         "reason": "no new units"})
        self.checkpoint_wanted = False
        self.last_ckpt_at = now

    def _checkpoint(self) -> None:
        self._publish(stage="checkpoint")
        job_state = self._call(self.job.snapshot)
        if not isinstance(job_state, bytes):
            raise RunFailed("job_error", f"snapshot() returned {type(job_state).__name__}, "
                            "not bytes", fatal=True, exit_code=exitcodes.FATAL)
        if len(job_state) > MAX_MESSAGE_BYTES - _ENVELOPE_BYTES:
            raise RunFailed("state_too_large", f"snapshot of {len(job_state)} bytes exceeds "
                            "the message limit", fatal=True, exit_code=exitcodes.FATAL)
        self.counters["peak_memory_bytes"] = max(self.counters["peak_memory_bytes"],
                                                 self.backend.peak_memory_bytes())
        seq = self.next_ckpt_seq
        self.next_ckpt_seq += 1
        runtime = dict(self.counters, epoch=self.epoch, backend=self.backend.name,
                       device=self.backend.device)
        self.link.post_ckpt(seq, self.units_done, job_state, runtime)
        self.inflight = (seq, self.units_done)
        self.submitted_units = self.units_done

    def _stop(self) -> None:
        """Final checkpoint at this boundary, its ack awaited until the deadline."""
        assert self.stop_deadline is not None
        self._publish(stage="stopping")
        self.link.log("info", "worker.stopping", {"units_done": self.units_done})
        if self.checkpoints:
            self._await_ack()
            if self.inflight is None and self.units_done > self.submitted_units:
                self._checkpoint()
                self._await_ack()
        raise Stopped(acked=self.inflight is None)

    def _await_ack(self) -> None:
        assert self.stop_deadline is not None
        while self.inflight is not None and (left := self.stop_deadline - time.monotonic()) > 0:
            self._wait_inbox(left)

    # Helpers -------------------------------------------------------------------------

    def _publish(self, **changes: Any) -> None:
        self.board.publish(units_done=self.units_done, units_total=self.total,
                           progress_seq=self.progress_seq, batch_size=self.sizer.size,
                           device_bytes=self.backend.device_bytes(), **changes)

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Call into the job; any exception becomes the RunFailed it means."""
        try:
            return fn(*args)
        except Exception as exc:
            raise classify(exc, self.backend) from exc
