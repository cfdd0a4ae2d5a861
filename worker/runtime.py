"""The compute loop shared by supervised and standalone runs (docs/architecture.md).

:class:`Runner` hands the job batches of units (``compute_batch``), merges what comes
back in unit order (``merge_batch``), and between batches, at unit boundaries, obeys
commands, hands snapshots over for checkpoints and adapts the batch size. When a batch
is still queued on a device after ``compute_batch`` returns, the next one is launched
before the host waits: the device computes batch k+1 while the host merges batch k,
beats and checkpoints (not while throttled, paused or stopping, when the device should
rest). It reaches the outside only through a :class:`Link` (the zmq channel, or stderr
when standalone), so ``--standalone`` makes exactly the same job calls.

With ``unit_range`` = [first, stop) the runner computes those units only (a shard): its
``units_done``/``units_total`` count within the range, and when the range is done it
sends a final checkpoint, waits for its ack and returns ``{"shard": [first, stop],
"units_done": n}`` instead of finalizing; the checkpoint is the shard's state.

    runner = Runner(job, backend, settings, link, board, failpoints, ...)
    result = runner.run()   # or raises Stopped / RunFailed
"""

from __future__ import annotations

import collections
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
from nkat.worker.batching import MAX_BATCH_SECONDS, BatchSizer, UnitTimes
from nkat.worker.failpoints import Failpoints
from nkat.worker.heartbeat import Board
from nkat.worker.job import BatchShapeError, Job, JobParamsError, Pending, RunContext
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
    """Where a resumed run starts: after checkpoint ``ckpt_seq``, ``units_done`` units
    into its range."""

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
    if isinstance(exc, BatchShapeError):
        return RunFailed("job_error", str(exc), fatal=True, exit_code=exitcodes.FATAL, tb=tb)
    return RunFailed("job_error", message, fatal=True, exit_code=exitcodes.FATAL, tb=tb)


@dataclasses.dataclass
class _Batch:
    """A batch handed to the job and not merged yet."""

    first: int
    count: int
    handle: Pending
    launched: float
    seconds: float = 0.0


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
        self.shard = settings.unit_range is not None
        self.first, self.stop = settings.unit_range or (0, self.total)
        if self.stop > self.total:
            raise RunFailed("bad_welcome", f"unit_range [{self.first}, {self.stop}) goes past "
                            f"the job's {self.total} units", fatal=True,
                            exit_code=exitcodes.FATAL)
        if self.shard and not job.shardable:
            raise RunFailed("bad_welcome", f"job {job.name or type(job).__name__} cannot run "
                            "as shards (unit_range): its partials must merge in unit order",
                            fatal=True, exit_code=exitcodes.FATAL)
        self.counters = dict(resume.counters if resume else state.COUNTERS)
        self.next_unit = self.first + (resume.units_done if resume else 0)
        self.first_unit = self.next_unit  # where this process started
        if self.next_unit > self.stop:
            raise RunFailed("bad_resume", f"resume at unit {self.next_unit} of "
                            f"[{self.first}, {self.stop})", fatal=True,
                            exit_code=exitcodes.FATAL)
        self.sizer = BatchSizer(settings.batch_size or job.default_batch_units,
                                adaptive=settings.batch_size_adaptive,
                                units_total=self.stop - self.first,
                                max_seconds=min(MAX_BATCH_SECONDS,
                                                settings.checkpoint_interval / 4))
        self._call(job.set_cpu_threads, settings.threads())
        self.unit_times = UnitTimes()  # this process's batches only
        self.inflight: collections.deque[_Batch] = collections.deque()
        self._last_done = time.perf_counter()
        self.progress_seq = 0
        self.duty = 1.0
        self.paused = False
        self.stop_deadline: float | None = None
        self.checkpoint_wanted = False
        self.next_ckpt_seq = resume.ckpt_seq + 1 if resume else 1
        self.acked_seq = resume.ckpt_seq if resume else 0
        self.pending_ckpt: tuple[int, int] | None = None  # (ckpt_seq, units_done) in flight
        self.submitted_units = self.units_done
        self.last_ckpt_at = time.monotonic()
        self._publish(stage="startup")

    @property
    def units_done(self) -> int:
        """Units merged, counted within the range (what checkpoints and beats carry)."""
        return self.next_unit - self.first

    # The loop ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Compute every unit left, then finalize (or, for a shard, send its final
        checkpoint); the result is plain JSON data."""
        started = time.monotonic()
        self.last_ckpt_at = started
        if self.backend.warmup_seconds and self.next_unit < self.stop:
            self.link.extend(self.backend.warmup_seconds, "first_batch")
        while self.next_unit < self.stop:
            self._at_boundary()
            self._step()
        if self.shard:
            self._final_checkpoint()
            return {"shard": [self.first, self.stop], "units_done": self.units_done}
        return self._finalize(time.monotonic() - started)

    def _step(self) -> None:
        batch, partial = self._next_batch()
        t0 = time.perf_counter()
        self._call(self.job.merge_batch, batch.first, batch.count, partial)
        seconds = batch.seconds + time.perf_counter() - t0
        count = batch.count
        self.next_unit += count
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

    def _next_batch(self) -> tuple[_Batch, Any]:
        """The next batch's partial, launching it (and the one after, while the device
        works) as needed; on OOM drop what is in flight, free, halve and retry."""
        while True:
            failed = (self.next_unit, min(self.sizer.size, self.stop - self.next_unit))
            try:
                if not self.inflight:
                    self._launch(self.next_unit)
                head = self.inflight[0]
                after = head.first + head.count
                if head.handle.pending and len(self.inflight) == 1 and after < self.stop \
                        and self._may_prefetch():
                    failed = (after, min(self.sizer.size, self.stop - after))
                    self._launch(after)
                failed = (head.first, head.count)
                partial = head.handle.wait()
            except Exception as exc:
                failure = classify(exc, self.backend)
                if failure.kind != "oom":
                    raise failure from exc
                self.inflight.clear()
                self.backend.free_pools()
                if failed[1] <= 1:
                    raise failure from exc
                self.counters["oom_retries"] += 1
                self.sizer.shrink(failed[1])
                self.link.log("warning", "batch.oom", {"first": failed[0], "count": failed[1],
                                                       "to": self.sizer.size})
                self._publish()
                continue
            done = time.perf_counter()
            self.inflight.popleft()
            # Device time as the host sees it: from the launch, or from the end of the
            # batch before when this one was queued behind it.
            head.seconds = done - max(head.launched, self._last_done)
            self._last_done = done
            return head, partial

    def _launch(self, first: int) -> None:
        count = min(self.sizer.size, self.stop - first)
        self.failpoints.before_batch(first, count)
        launched = time.perf_counter()
        self.failpoints.crawl(count)
        handle = self.job.compute_batch(self.backend.xp, first, count)
        self.inflight.append(_Batch(first, count, handle, launched))

    def _may_prefetch(self) -> bool:
        """Keep the device busy unless it should rest: throttled, paused or stopping."""
        return self.duty >= 1.0 and not self.paused and self.stop_deadline is None

    def _finalize(self, wall_seconds: float) -> dict[str, Any]:
        self._publish(stage="finalize")
        self.link.extend(FINALIZE_EXTEND_S, "finalize")
        provenance = self.settings.provenance
        used = tuple(provenance.get("backends", ()))
        context = RunContext(
            backends=used if used[-1:] == (self.backend.name,) else (*used, self.backend.name),
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

    def _final_checkpoint(self) -> None:
        """A shard's end: its whole range checkpointed and acknowledged."""
        if not self.checkpoints:
            return
        self._publish(stage="checkpoint")
        deadline = time.monotonic() + self.settings.supervisor_timeout
        self._await_ack(deadline)
        if self.pending_ckpt is None and self.units_done > self.submitted_units:
            self._checkpoint()
            self._await_ack(deadline)
        if self.pending_ckpt is not None:
            raise RunFailed("shard_unacknowledged", "the shard's final checkpoint was not "
                            f"acknowledged within {self.settings.supervisor_timeout:g} s",
                            fatal=False, exit_code=exitcodes.ORPHANED)

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
            if self.pending_ckpt is not None and msg.ckpt_seq == self.pending_ckpt[0]:
                self.acked_seq = msg.ckpt_seq
                self.pending_ckpt = None
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
        if not self.checkpoints or self.pending_ckpt is not None:
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
        self.pending_ckpt = (seq, self.units_done)
        self.submitted_units = self.units_done

    def _stop(self) -> None:
        """Final checkpoint at this boundary, its ack awaited until the deadline."""
        assert self.stop_deadline is not None
        self._publish(stage="stopping")
        self.link.log("info", "worker.stopping", {"units_done": self.units_done})
        if self.checkpoints:
            self._await_ack(self.stop_deadline)
            if self.pending_ckpt is None and self.units_done > self.submitted_units:
                self._checkpoint()
                self._await_ack(self.stop_deadline)
        raise Stopped(acked=self.pending_ckpt is None)

    def _await_ack(self, deadline: float) -> None:
        while self.pending_ckpt is not None and (left := deadline - time.monotonic()) > 0:
            self._wait_inbox(left)

    # Helpers -------------------------------------------------------------------------

    def _publish(self, **changes: Any) -> None:
        self.board.publish(units_done=self.units_done, units_total=self.stop - self.first,
                           progress_seq=self.progress_seq, batch_size=self.sizer.size,
                           device_bytes=self.backend.device_bytes(), **changes)

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Call into the job; any exception becomes the RunFailed it means."""
        try:
            return fn(*args)
        except Exception as exc:
            raise classify(exc, self.backend) from exc
