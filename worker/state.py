"""The checkpoint state a worker sends: the job's snapshot wrapped with runtime counters.

    state = msgpack {"format": 1,
                     "job": <job.snapshot() bytes, zlib-compressed if "codec" says so>,
                     ["codec": "zlib",]    (only with checkpoint_compression)
                     "runtime": {"units_done", "job_digest", "epoch", "backend", "device",
                                 "compute_seconds", "peak_memory_bytes", "batches",
                                 "oom_retries"}}

The supervisor stores the bytes and their digest without looking inside. ``job_digest``
lets a resumed worker check the snapshot it restores, since ``resume`` carries no digest;
the counters carry provenance and performance across epochs. ``job_digest`` is of the
snapshot as the job made it, so it also checks the decompression.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import msgpack

from nkat.protocol.messages import MAX_MESSAGE_BYTES, state_digest

FORMAT = 1
#: The one compression a state may carry (``checkpoint_compression``): fast zlib.
CODEC = "zlib"
ZLIB_LEVEL = 1

#: Counters summed (or maxed) across epochs; their values in a fresh run.
COUNTERS: dict[str, Any] = {
    "compute_seconds": 0.0,
    "peak_memory_bytes": 0,
    "batches": 0,
    "oom_retries": 0,
}


class BadCheckpoint(ValueError):
    """A resumed state that does not unwrap or whose snapshot fails its digest."""


def wrap(job_state: bytes, units_done: int, runtime: Mapping[str, Any], *,
         compress: bool = False) -> bytes:
    info = dict(runtime, units_done=units_done, job_digest=state_digest(job_state))
    body: dict[str, Any] = {"format": FORMAT, "job": job_state, "runtime": info}
    if compress:
        body.update(job=zlib.compress(job_state, ZLIB_LEVEL), codec=CODEC)
    data: bytes = msgpack.packb(body, use_bin_type=True)
    return data


def unwrap(state: bytes, units_done: int) -> tuple[bytes, dict[str, Any]]:
    """The job snapshot and the runtime counters of a resumed state, verified."""
    try:
        body = msgpack.unpackb(state, raw=False, strict_map_key=True,
                               max_bin_len=MAX_MESSAGE_BYTES)
    except Exception as exc:  # msgpack raises many types for bad input
        raise BadCheckpoint(f"resume state does not decode: {exc}") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise BadCheckpoint("resume state is not a worker checkpoint of format "
                            f"{FORMAT}")
    job_state, runtime = body.get("job"), body.get("runtime")
    if not isinstance(job_state, bytes) or not isinstance(runtime, dict):
        raise BadCheckpoint("resume state lacks its job snapshot or runtime counters")
    codec = body.get("codec")
    if codec == CODEC:
        job_state = _inflate(job_state)
    elif codec is not None:
        raise BadCheckpoint(f"resume state: unknown codec {codec!r}")
    if runtime.get("job_digest") != state_digest(job_state):
        raise BadCheckpoint("resume state: job snapshot does not match its digest")
    if runtime.get("units_done") != units_done:
        raise BadCheckpoint(f"resume state covers {runtime.get('units_done')!r} units, "
                            f"resume says {units_done}")
    counters = {k: runtime.get(k, v) for k, v in COUNTERS.items()}
    if not all(isinstance(counters[k], type(v)) for k, v in COUNTERS.items()):
        raise BadCheckpoint("resume state: runtime counters of the wrong type")
    return job_state, counters


def _inflate(data: bytes) -> bytes:
    """A compressed snapshot, no larger than a message may be (no zip bomb gets past)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_MESSAGE_BYTES)
    except zlib.error as exc:
        raise BadCheckpoint(f"resume state: job snapshot does not decompress: {exc}") from None
    if inflater.unconsumed_tail:
        raise BadCheckpoint("resume state: job snapshot decompresses beyond "
                            f"{MAX_MESSAGE_BYTES} bytes")
    if not inflater.eof:
        raise BadCheckpoint("resume state: compressed job snapshot is cut short")
    return out
