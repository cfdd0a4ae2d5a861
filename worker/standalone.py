"""Standalone mode: run a job with no supervisor and no socket, print its result.

The same :class:`~nkat.worker.runtime.Runner` as a supervised worker (same batching, same
job calls) minus checkpoints and beats, so it is the honest "bare" baseline that
supervision overhead is measured against. Logs go to stderr as JSON lines.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nkat.protocol import exitcodes
from nkat.protocol.messages import Message, canonical_json, spec_hash
from nkat.protocol.settings import (
    SettingError,
    WorkerSettings,
    keys_of,
    parse_text,
    split_assignment,
)
from nkat.worker.backend import BackendUnavailable, select_backend
from nkat.worker.failpoints import ENV as FAILPOINTS_ENV
from nkat.worker.failpoints import FailpointError, Failpoints
from nkat.worker.heartbeat import Board
from nkat.worker.job import JobNotFound, JobParamsError, resolve_job
from nkat.worker.runtime import RunFailed, Runner
from nkat.worker.settings import SettingsError, parse_settings
from nkat.worker.spec_check import USAGE_ERROR

#: ``--set`` keys that tune the runtime (the declared worker settings, and a shard's
#: range); every other key is a job param.
RUNTIME_KEYS = frozenset({k.name for k in keys_of(WorkerSettings)} | {"unit_range"})
#: Failpoints with ``epoch=E`` treat a standalone run as the first epoch.
STANDALONE_EPOCH = 1


class UsageError(ValueError):
    """A command line that cannot run (exit code 2)."""


class StderrLink:
    """Where a standalone runner's logs go; nothing ever arrives in its inbox."""

    def __init__(self) -> None:
        self.inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()

    def log(self, level: str, event: str, fields: Mapping[str, Any]) -> None:
        print(json.dumps({"level": level, "event": event, **fields}), file=sys.stderr)

    def extend(self, seconds: float, reason: str) -> None:
        """No deadline to extend without a supervisor."""

    def beat_now(self) -> None:
        """No beats without a supervisor."""

    def post_ckpt(self, ckpt_seq: int, units_done: int, job_state: bytes,
                  runtime: Mapping[str, Any]) -> None:
        raise AssertionError("a standalone run takes no checkpoints")


def parse_sets(items: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``KEY=VALUE`` pairs -> (runtime settings, job params), read as the supervisor reads
    its ``--set`` (``nkat.protocol.settings``): true/false/null words and JSON literals
    (``3``, ``0.5``, ``[1,2]``) where they parse, else the text."""
    settings: dict[str, Any] = {}
    params: dict[str, Any] = {}
    for item in items:
        try:
            key, text = split_assignment(item)
        except SettingError as exc:
            raise UsageError(str(exc)) from None
        (settings if key in RUNTIME_KEYS else params)[key] = parse_text(text)
    return settings, params


def run(job_name: str, sets: Sequence[str], backend_name: str, out: Path | None) -> int:
    """Run ``job_name`` to completion here; returns the exit code."""
    try:
        raw_settings, params = parse_sets(sets)
        settings = parse_settings(raw_settings)
        if settings.unit_range is not None:
            raise UsageError("unit_range needs a supervisor: a shard's state travels in "
                             "its final checkpoint, which a standalone run does not take")
        job = resolve_job(job_name)(params)
        backend = select_backend(backend_name)
        failpoints = Failpoints.parse(os.environ.get(FAILPOINTS_ENV, ""), STANDALONE_EPOCH)
    except JobParamsError as exc:
        return _fail(f"bad params for job {job_name}: {exc}", USAGE_ERROR)
    except (UsageError, SettingsError, JobNotFound, BackendUnavailable, FailpointError) as exc:
        return _fail(str(exc), USAGE_ERROR)
    except Exception:  # the job's constructor has a bug
        return _fail(traceback.format_exc(), exitcodes.FATAL)
    failpoints.install()
    try:
        runner = Runner(job, backend, settings, StderrLink(), Board(), failpoints,
                        epoch=STANDALONE_EPOCH,
                        spec_hash=spec_hash({"job": job_name, "params": params}),
                        checkpoints=False)
        result = runner.run()
    except RunFailed as failure:
        return _fail(f"{failure.kind}: {failure.message}\n{failure.traceback}",
                     failure.exit_code)
    text = canonical_json(result) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")
    return exitcodes.DONE


def _fail(message: str, code: int) -> int:
    print(f"nkat.worker: {message}", file=sys.stderr, flush=True)
    return code
