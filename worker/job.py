"""The job API: what a user implements to run a computation under the supervisor.

A job is a fixed, deterministic sequence of *units* (numbered 0 … units_total-1). The
runtime asks the job to compute a contiguous range of units at a time (a batch, whose
size the runtime chooses and changes freely), then merges the per-unit partial results
into the job's small state strictly in unit order. Because the result is defined by the
units and their order, not by the batches, any batch size and any number of
interruptions (snapshot → restore at a unit boundary) give a byte-identical result.

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

Jobs are found by built-in name (``nkat-highdim``) or by ``module:Class``.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar


class JobParamsError(ValueError):
    """The job's params are invalid: fatal, the run is not restarted."""


class JobNotFound(LookupError):
    """No job by that name, or ``module:Class`` does not name a Job subclass."""


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

    @abc.abstractmethod
    def compute(self, xp: Any, first: int, count: int) -> Sequence[Any]:
        """Compute units first … first+count-1 on array module ``xp`` (numpy or cupy).

        Returns one small, host-side partial per unit, in unit order. Must be pure:
        the partial of a unit may not depend on the batch it was computed in.
        """

    @abc.abstractmethod
    def merge(self, partial: Any) -> None:
        """Fold the next unit's partial into the state (called strictly in unit order)."""

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
