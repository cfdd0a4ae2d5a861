"""Shards: a job's unit range cut into pieces computed apart, then merged into one result.

A worker welcomed with ``unit_range`` = [first, stop) computes those units only and
ends with a final checkpoint covering the range (``runtime``); that checkpoint state is
the shard's state. Here the states of all shards (in any order) become the result a
single run would have given: for a ``shardable`` job its deterministic blocks are
byte-identical to a one-shard run's.

    result = finalize_shards(spec, [Shard((0, 40), s1), Shard((40, 96), s2)], provenance)
    both = merge_shards(spec, Shard((0, 40), s1), Shard((40, 96), s2))  # one Shard

``python -m nkat.worker --merge-shards`` does the same from the command line: msgpack
``{"spec": {...}, "states": [{"range": [first, stop], "state": <bytes>}, ...],
"provenance": {...}}`` on stdin, the result's canonical JSON on stdout.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from nkat.protocol.messages import MAX_MESSAGE_BYTES, canonical_json, spec_hash
from nkat.worker import state
from nkat.worker.job import Job, JobNotFound, JobParamsError, RunContext, resolve_job

#: Exit code of ``--merge-shards`` for input it cannot merge (the message says why).
MERGE_ERROR_EXIT = 2


class ShardMergeError(ValueError):
    """Shards that do not make one job: overlapping or missing units, another job's
    states, a job that cannot merge shards, or a state that does not unwrap."""


@dataclasses.dataclass(frozen=True)
class Shard:
    """A shard's unit range [first, stop) and its state (a worker checkpoint state, as
    the WAL stores it)."""

    range: tuple[int, int]
    state: bytes


def _job(spec: Mapping[str, Any]) -> Job:
    name, params = spec.get("job"), spec.get("params", {})
    if not isinstance(name, str) or not isinstance(params, Mapping):
        raise ShardMergeError("spec needs {job: name, params: {...}}")
    try:
        job = resolve_job(name)(params)
    except (JobNotFound, JobParamsError) as exc:
        raise ShardMergeError(f"spec: {exc}") from exc
    if not job.shardable:
        raise ShardMergeError(f"job {name} cannot merge shards: its partials merge in "
                              "unit order only")
    return job


def _unwrap(shard: Shard) -> tuple[bytes, dict[str, Any]]:
    first, stop = shard.range
    try:
        return state.unwrap(shard.state, stop - first)
    except state.BadCheckpoint as exc:
        raise ShardMergeError(f"shard [{first}, {stop}): {exc}") from exc


def _check_ranges(shards: Sequence[Shard], total: int) -> None:
    ranges = sorted(s.range for s in shards)
    reached = 0
    for first, stop in ranges:
        if first != reached or stop <= first:
            what = "overlap" if first < reached else "leave units out"
            raise ShardMergeError(f"shard ranges {[list(r) for r in ranges]} {what}: "
                                  f"they must tile [0, {total}) exactly")
        reached = stop
    if reached != total:
        raise ShardMergeError(f"shard ranges {[list(r) for r in ranges]} end at {reached}, "
                              f"the job has {total} units")


def _merged(job: Job, shards: Sequence[Shard]) -> dict[str, Any]:
    """Fold the shards' job states into ``job``; returns their summed runtime counters."""
    counters = dict(state.COUNTERS)
    for shard in shards:
        job_state, runtime = _unwrap(shard)
        try:
            job.merge_state(job_state)
        except ValueError as exc:
            raise ShardMergeError(f"shard {list(shard.range)}: {exc}") from exc
        counters["compute_seconds"] += runtime["compute_seconds"]
        counters["batches"] += runtime["batches"]
        counters["oom_retries"] += runtime["oom_retries"]
        counters["peak_memory_bytes"] = max(counters["peak_memory_bytes"],
                                            runtime["peak_memory_bytes"])
    return counters


def merge_shards(spec: Mapping[str, Any], a: Shard, b: Shard) -> Shard:
    """Two adjacent shards (either order) as one, its state as a worker would have
    checkpointed it after computing both ranges."""
    (lo, hi) = sorted((a, b), key=lambda s: s.range)
    if lo.range[1] != hi.range[0]:
        raise ShardMergeError(f"shards {list(lo.range)} and {list(hi.range)} are not "
                              "adjacent")
    job = _job(spec)
    counters = _merged(job, (lo, hi))
    first, stop = lo.range[0], hi.range[1]
    wrapped = state.wrap(job.snapshot(), stop - first, dict(counters, epoch=0))
    return Shard((first, stop), wrapped)


def finalize_shards(spec: Mapping[str, Any], shards: Sequence[Shard],
                    provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The result of the whole job from shards that tile its units, in any order.

    ``provenance`` may give backend, backends (every one the run used), device, epochs
    and restarts (over the shards' runs, by the caller); performance comes from the
    shards' counters.
    """
    job = _job(spec)
    _check_ranges(shards, job.units_total())
    counters = _merged(job, shards)
    context = RunContext(
        backend=str(provenance.get("backend", "")), device=str(provenance.get("device", "")),
        epochs=int(provenance.get("epochs", len(shards))),
        restarts=int(provenance.get("restarts", 0)),
        backends=tuple(str(b) for b in provenance.get("backends", ())),
        compute_seconds=counters["compute_seconds"],
        peak_memory_bytes=counters["peak_memory_bytes"], spec_hash=spec_hash(dict(spec)),
        extra={"units_total": job.units_total(), "batches": counters["batches"],
               "oom_retries": counters["oom_retries"], "shards": len(shards)})
    try:
        result = job.finalize(context)
    except ValueError as exc:
        raise ShardMergeError(f"finalize: {exc}") from exc
    plain: dict[str, Any] = json.loads(canonical_json(result))
    return plain


def read_request(data: bytes) -> tuple[dict[str, Any], list[Shard], dict[str, Any]]:
    """Parse the ``--merge-shards`` msgpack request."""
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True,
                               max_bin_len=MAX_MESSAGE_BYTES)
    except Exception as exc:  # msgpack raises many types for bad input
        raise ShardMergeError(f"stdin is not msgpack: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("states"), list):
        raise ShardMergeError("expected a map {spec, states: [{range, state}, ...], "
                              "provenance}")
    shards = []
    for item in body["states"]:
        rng = item.get("range") if isinstance(item, dict) else None
        blob = item.get("state") if isinstance(item, dict) else None
        if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(v, int)
                                                               for v in rng)
                and isinstance(blob, bytes)):
            raise ShardMergeError(f"each state needs range [first, stop] and state bytes, "
                                  f"got {str(item)[:200]}")
        shards.append(Shard((rng[0], rng[1]), blob))
    spec, provenance = body.get("spec"), body.get("provenance") or {}
    if not isinstance(spec, dict) or not isinstance(provenance, dict):
        raise ShardMergeError("spec and provenance must be maps")
    return spec, shards, provenance


def main() -> int:
    """``--merge-shards``: request on stdin, result JSON on stdout."""
    try:
        spec, shards, provenance = read_request(sys.stdin.buffer.read())
        result = finalize_shards(spec, shards, provenance)
    except ShardMergeError as exc:
        print(f"nkat.worker: cannot merge shards: {exc}", file=sys.stderr, flush=True)
        return MERGE_ERROR_EXIT
    sys.stdout.write(canonical_json(result) + "\n")
    return 0
