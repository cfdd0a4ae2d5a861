"""The head of a run's log: its first rotated files, set aside where rotation never
reaches, so ``run.started`` and the first worker's start stay readable however much the
run logs later.

    for path in head_files(run.log_file):     # logs/supervisor.head-000.jsonl, -001 …
        ...                                   # read these first, then .N … .1, then the log

The writer (``jsonlog.RotatingLineFile``) rotates as before, with one change: when the
oldest backup (or, with ``log_backups = 0``, the file itself) would be deleted and the
head holds less than :data:`HEAD_BYTES` in fewer than :data:`HEAD_FILES` files, that file
is renamed to the next head name instead. A rename is atomic, so every line is in the
head or in the rotated files, never both and never neither, even after a crash mid-way;
the head files are never written again. The head is the start of the log and the
rotated files its end, with the lines rotated out between them missing: readers read
the head first (``ops.logview.LogReader`` does, so ``logs``, ``report``, ``status`` and
the status page all see it). A run whose log never fills its backups has no head; one
whose first files an older version deleted gets its head from the oldest file left.

Disk bound: the head adds less than ``HEAD_BYTES + log_max_bytes``, in at most
``HEAD_FILES`` files, to the ``(log_backups + 1) x log_max_bytes`` of the rotated log; at
the default 16 MiB files it is the first file alone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

#: The head takes rotated files until it holds at least this many bytes …
HEAD_BYTES = 64 << 10
#: … or this many files (64 KiB at the smallest ``log_max_bytes``, 4096).
HEAD_FILES = 16


def head_path(log_file: Path, index: int) -> Path:
    """``supervisor.jsonl`` → ``supervisor.head-000.jsonl`` for index 0. The name does not
    start with ``supervisor.jsonl.``: that is the rotated files' namespace."""
    return log_file.with_name(f"{log_file.stem}.head-{index:03d}{log_file.suffix}")


def head_files(log_file: Path) -> list[Path]:
    """The head's files, oldest first (none when the log never lost a line)."""
    return [path for _index, path in _indexed(log_file)]


def next_head_index(log_file: Path) -> int:
    """The index the next head file takes: past every one there, so none is replaced."""
    return max((index for index, _path in _indexed(log_file)), default=-1) + 1


def _indexed(log_file: Path) -> list[tuple[int, Path]]:
    pattern = re.compile(re.escape(f"{log_file.stem}.head-") + r"(\d+)"
                         + re.escape(log_file.suffix))
    try:
        names = os.listdir(log_file.parent)
    except FileNotFoundError:
        return []
    return sorted((int(m.group(1)), log_file.with_name(name)) for name in names
                  if (m := pattern.fullmatch(name)))
