"""The job API: what a user implements to run a computation under the supervisor.

A job is a fixed, deterministic set of *units* (numbered 0 … units_total-1). The runtime
asks the job to compute a contiguous range of units at a time (a batch, whose size the
runtime chooses and changes freely) and folds what comes back into the job's small
state; between batches it takes snapshots for checkpoints. A job has two ways to hand
its work back.

Per unit (simple jobs): ``compute`` returns one small partial per unit and ``merge``
folds them strictly in unit order. The result is defined by the units and their order,
not by the batches, so any batch size and any number of interruptions give a
byte-identical result.

    class Squares(Job):
        name = "squares"
        def __init__(self, params):           # validate; raise JobParamsError
            self.n = int(params.get("n", 1000)); self.total = 0
        def units_total(self): return self.n
        def compute(self, xp, first, count):  # -> one partial per unit, in order
            a = xp.arange(first, first + count, dtype=xp.int64)
            return [int(v) for v in (a * a).tolist()]
        def merge(self, partial): self.total += partial
        def snapshot(self): return msgpack.packb(self.total)
        def restore(self, data): self.total = msgpack.unpackb(data)
        def finalize(self, context): return {"sum_of_squares": self.total}

Per batch (jobs that must keep a device busy): override ``compute_batch`` to return a
:class:`Pending` whose ``wait()`` gives one small partial for the whole batch, and
``merge_batch`` to fold it. ``compute_batch`` may return before the work is done (queued
on a GPU stream): the runtime then launches the next batch before it waits for this
one, so the device computes batch k+1 while the host merges batch k, beats and takes
checkpoints (at most two batches are outstanding, and they are waited for in order).
A job whose batch partials merge in any order (exact integer sums, max/min with a
tie rule) sets ``shardable``, implements ``merge_state``, and can then run split into
shards (``unit_range``) whose states are merged afterwards (``nkat.worker.shards``).

    class SquaresOnDevice(Squares):
        def compute_batch(self, xp, first, count):
            a = xp.arange(first, first + count, dtype=xp.int64)
            return Ready(int((a * a).sum()))  # or a Pending that waits on a stream
        def merge_batch(self, first, count, partial): self.total += partial

Jobs are found by built-in name (``nkat-highdim``) or by ``module:Class``.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol


class JobParamsError(ValueError):
    """The job's params are invalid: fatal, the run is not restarted."""


class JobNotFound(LookupError):
    """No job by that name, or ``module:Class`` does not name a Job subclass."""


class BatchShapeError(ValueError):
    """``compute`` returned another number of partials than units asked for."""


class Pending(Protocol):
    """A batch on its way: ``wait()`` blocks until it is done and returns its partial.

    ``pending`` says whether work is still queued on a device when ``compute_batch``
    returns; only then does the runtime launch the next batch before waiting.
    """

    pending: bool

    def wait(self) -> Any: ...


class Ready:
    """A batch computed at once (on the host): its partial is already here."""

    pending = False

    def __init__(self, partial: Any) -> None:
        self._partial = partial

    def wait(self) -> Any:
        return self._partial


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What the runtime tells ``finalize`` about the run (provenance, performance)."""

    backend: str
    device: str
    epochs: int
    restarts: int
    compute_seconds: float
    peak_memory_bytes: int
    spec_hash: str
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: Every backend the run has computed on, this one last (a run is pinned to one
    #: backend; an operator's switch adds the next).
    backends: tuple[str, ...] = ()


class Job(abc.ABC):
    """Base class of every job. Subclasses set ``name`` and implement the methods."""

    name: ClassVar[str] = ""
    #: Units a batch starts with when the config does not say (the runtime adapts it).
    default_batch_units: ClassVar[int] = 1

    @abc.abstractmethod
    def __init__(self, params: Mapping[str, Any]) -> None:
        """Validate params (raise JobParamsError) and set up the empty state."""

    @abc.abstractmethod
    def units_total(self) -> int:
        """How many units the job has; fixed by the params."""

    #: The batch partials merge in any order and ``merge_state`` is implemented, so the
    #: job can run as shards (``unit_range``) merged afterwards.
    shardable: ClassVar[bool] = False

    def compute(self, xp: Any, first: int, count: int) -> Sequence[Any]:
        """Per unit: compute units first … first+count-1 on array module ``xp`` (numpy or
        cupy).

        Returns one small, host-side partial per unit, in unit order. Must be pure:
        the partial of a unit may not depend on the batch it was computed in.
        """
        raise NotImplementedError(f"{type(self).__name__} implements neither compute() "
                                  "nor compute_batch()")

    def merge(self, partial: Any) -> None:
        """Per unit: fold the next unit's partial into the state (strictly in unit order)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither merge() "
                                  "nor merge_batch()")

    def compute_batch(self, xp: Any, first: int, count: int) -> Pending:
        """Start computing units first … first+count-1; ``wait()`` gives the batch partial.

        The default runs ``compute`` and hands its per-unit partials to ``merge_batch``.
        Must be pure, like ``compute``; it may return before the work is done.
        """
        partials = list(self.compute(xp, first, count))
        if len(partials) != count:
            raise BatchShapeError(f"compute({first}, {count}) returned {len(partials)} "
                                  "partials")
        return Ready(partials)

    def merge_batch(self, first: int, count: int, partial: Any) -> None:
        """Fold the partial of units first … first+count-1 into the state (batches come
        in unit order). The default merges the per-unit partials one by one."""
        for unit_partial in partial:
            self.merge(unit_partial)

    def merge_state(self, snapshot: bytes) -> None:
        """Fold another shard's snapshot (of disjoint units) into this state; only for
        ``shardable`` jobs."""
        raise NotImplementedError(f"job {self.name or type(self).__name__} cannot merge "
                                  "shards")

    def set_cpu_threads(self, threads: int) -> None:
        """How many threads a CPU batch may use (the ``cpu_threads`` setting, resolved to
        at least 1); the default ignores it."""
        del threads

    @abc.abstractmethod
    def snapshot(self) -> bytes:
        """The state as bytes; ``restore(snapshot())`` must reproduce it exactly."""

    @abc.abstractmethod
    def restore(self, data: bytes) -> None:
        """Replace the state with a snapshot taken at a unit boundary."""

    @abc.abstractmethod
    def finalize(self, context: RunContext) -> dict[str, Any]:
        """Build the JSON-able result from the merged state."""

    def deterministic_result(self, result: Mapping[str, Any]) -> dict[str, Any]:
        """The part of the result that must be identical across interruptions.

        By default everything but ``performance`` and ``provenance``.
        """
        return {k: v for k, v in result.items() if k not in ("performance", "provenance")}


BUILTIN_JOBS: dict[str, str] = {
    "nkat-highdim": "nkat.worker.jobs.nkat_highdim:NkatHighDim",
}


def resolve_job(name: str) -> type[Job]:
    """Find a job class by built-in name or ``module:Class``."""
    target = BUILTIN_JOBS.get(name, name)
    if ":" not in target:
        raise JobNotFound(
            f"unknown job {name!r}: use a built-in ({', '.join(sorted(BUILTIN_JOBS))}) "
            "or module:Class")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise JobNotFound(f"job {name!r}: cannot import {module_name!r}: {exc}") from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Job)):
        raise JobNotFound(f"job {name!r}: {target} is not a nkat.worker.job.Job subclass")
    return cls
