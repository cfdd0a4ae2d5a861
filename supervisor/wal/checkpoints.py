"""Checkpoint records: how one is indexed, validated and shown to callers.

A ``ckpt`` record carries the state inline; a ``ckpt_ref`` record names a blob file and
holds its size, chunk size and per-chunk CRCs. Both carry the metadata the supervisor
gave (ckpt_seq, epoch, units_done, digest, t_wall, and ``shard`` when a run checkpoints
several workers' states: absent means shard 0). Retention and resume work per shard.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .format import RecordType, unpack_payload

#: Metadata every checkpoint payload carries, with the types it must have.
META_FIELDS: dict[str, type | tuple[type, ...]] = {
    "ckpt_seq": int, "epoch": int, "units_done": int, "digest": str, "t_wall": (int, float),
}
#: Payload keys the WAL adds; the caller's metadata may not use them.
STATE_FIELDS = ("state", "blob", "size", "chunk", "crcs")


def check_meta(meta: dict[str, Any]) -> None:
    """ValueError unless ``meta`` has every META_FIELDS key with its type, and a
    ``shard``, if any, that is an int >= 0."""
    for key, kind in META_FIELDS.items():
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"checkpoint field {key!r} missing or not {kind}")
    shard = meta.get("shard", 0)
    if not isinstance(shard, int) or isinstance(shard, bool) or shard < 0:
        raise ValueError(f"checkpoint field 'shard' must be an int >= 0, not {shard!r}")


@dataclass
class CheckpointEntry:
    """Where a checkpoint record is and what it says, without its state."""

    seq: int
    segment: int
    offset: int
    end: int
    meta: dict[str, Any]  # the payload minus STATE_FIELDS
    size: int
    blob: str | None = None  # file name in the blob directory; None: state inline
    chunk: int = 0
    crcs: list[int] = field(default_factory=list)
    pruned: bool = False  # retention removed its blob
    broken: str | None = None  # why its state does not verify, once checked

    @property
    def shard(self) -> int:
        shard: int = self.meta.get("shard", 0)
        return shard


def by_shard(entries: Iterable[CheckpointEntry]) -> dict[int, list[CheckpointEntry]]:
    """The entries of each shard, in the order given (oldest first)."""
    shards: dict[int, list[CheckpointEntry]] = {}
    for entry in entries:
        shards.setdefault(entry.shard, []).append(entry)
    return shards


def newest_of_each_shard(entries: list[CheckpointEntry],
                         count: int) -> list[CheckpointEntry]:
    """The newest ``count`` entries of every shard, in log order."""
    kept = {id(e) for group in by_shard(entries).values() for e in group[-count:]}
    return [e for e in entries if id(e) in kept]


def parse_entry(rtype: int, seq: int, segment: int, offset: int, end: int,
                payload_bytes: bytes) -> CheckpointEntry:
    """Index a ckpt or ckpt_ref record; ValueError if its payload is malformed."""
    payload = unpack_payload(payload_bytes)
    check_meta(payload)
    meta = {k: v for k, v in payload.items() if k not in STATE_FIELDS}
    if rtype == RecordType.CKPT:
        state = payload.get("state")
        if not isinstance(state, bytes):
            raise ValueError("inline checkpoint without a bytes state")
        return CheckpointEntry(seq, segment, offset, end, meta, len(state))
    blob, size, chunk, crcs = (payload.get(k) for k in STATE_FIELDS[1:])
    if not (isinstance(blob, str) and isinstance(size, int) and isinstance(chunk, int)
            and chunk > 0 and isinstance(crcs, list) and len(crcs) == -(-size // chunk)):
        raise ValueError("malformed blob reference")
    return CheckpointEntry(seq, segment, offset, end, meta, size, blob, chunk, crcs)


@dataclass(frozen=True)
class CheckpointInfo:
    """A retained checkpoint, described without loading its state."""

    seq: int  # the record's WAL seq
    ckpt_seq: int
    epoch: int
    units_done: int
    t_wall: float
    size: int  # state bytes
    inline: bool  # False: the state is in blob file ``blob``
    digest: str
    blob: str | None
    shard: int = 0

    @classmethod
    def of(cls, entry: CheckpointEntry) -> CheckpointInfo:
        m = entry.meta
        return cls(entry.seq, m["ckpt_seq"], m["epoch"], m["units_done"], float(m["t_wall"]),
                   entry.size, entry.blob is None, m["digest"], entry.blob, entry.shard)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint with its state, loaded and verified."""

    seq: int
    ckpt_seq: int
    epoch: int
    units_done: int
    digest: str
    t_wall: float
    state: bytes = field(repr=False)
    shard: int = 0
