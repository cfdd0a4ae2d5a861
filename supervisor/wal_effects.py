"""The shell's storage hands: carry out the controller's WAL effects and answer with the
input each one returns (docs/architecture.md, "The loop").

    appended = append(wal, effect, t_wall)       # c.Append | c.AppendCheckpoint → c.Appended
    loaded = load_checkpoint(wal, effect)         # c.LoadCheckpoint → c.CheckpointLoaded

A full disk or a damaged WAL is an answer (``ok=False`` with the error and advice), never
an exception: the controller decides what the run does about it.
"""

from __future__ import annotations

import time

from nkat.protocol import messages as m
from nkat.supervisor import controller as c
from nkat.supervisor import journal
from nkat.supervisor.oslimits import io_advice
from nkat.supervisor.wal import WalError


def append(wal: journal.RunLog, effect: c.Append | c.AppendCheckpoint,
           t_wall: float) -> c.Appended:
    """Append one record, stamped ``t_wall``, durably; how long that took is reported."""
    started = time.perf_counter()
    try:
        if isinstance(effect, c.AppendCheckpoint):
            wal.append_checkpoint(journal.payload_of(effect.meta, t_wall), effect.state)
        else:
            journal.write(wal, effect.record, lambda: t_wall)
    except (WalError, OSError) as exc:
        return c.Appended(effect.then, False, t_wall, error=str(exc), advice=io_advice(exc))
    return c.Appended(effect.then, True, t_wall, time.perf_counter() - started)


def load_checkpoint(wal: journal.RunLog, effect: c.LoadCheckpoint) -> c.CheckpointLoaded:
    """The newest durable checkpoint of the effect's shard, as the worker's ``resume``."""
    try:
        latest = wal.latest_checkpoint(shard=effect.shard or 0)
    except (WalError, OSError) as exc:
        return c.CheckpointLoaded(effect.worker, effect.epoch, None, str(exc))
    resume = None if latest is None else m.Resume(
        ckpt_seq=latest.ckpt_seq, units_done=latest.units_done, state=latest.state)
    return c.CheckpointLoaded(effect.worker, effect.epoch, resume)
