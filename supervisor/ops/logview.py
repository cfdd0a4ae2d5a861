"""``nkat-supervise logs``: read, filter and follow a run's JSON log across its rotations.

    nkat-supervise logs                     # the newest run, coloured on a terminal
    nkat-supervise logs RUN -f -n 20 --level warning --event 'worker.*' --since 10m
    nkat-supervise logs RUN --json | jq .   # the stored lines, exactly, one per line

Files are read oldest first: the log's head (``supervisor.head-000.jsonl`` …, the run's
first lines, which rotation never deletes; see :mod:`nkat.supervisor.loghead`), then
``supervisor.jsonl.N`` … ``.1``, then ``supervisor.jsonl``.
``-f`` follows the file by inode: when the writer rotates, the old file is read to its end,
then every newer file from its start, so no line is lost or repeated. A line that is not a
JSON object (the torn last line of a crash) is skipped, with ``--json`` too, so a pipe to
jq never breaks. ``-n`` counts lines after the filters; ``-f`` alone starts with the last
10. The human rendering shows local time.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from nkat.supervisor import loghead
from nkat.supervisor.exitcode import ExitCode
from nkat.supervisor.ops.stdout import silence_stdout
from nkat.supervisor.rundir import RunDir, RunDirError, list_runs, state_dir

# jsonlog.LEVELS, in its order (a test holds them equal). Not imported from there: that
# would load structlog into every command line, since the CLI builds all its parsers.
LEVELS = ("debug", "info", "warning", "error", "critical")
POLL_S = 0.05  # follow latency; an idle poll is one read() and one stat()
FOLLOW_DEFAULT_LINES = 10
_READ_CHUNK = 1 << 16
_RESCANS = 20  # a file cannot outrun this many scans: each is a few opens, a rotation a write
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_HEADER_KEYS = frozenset({"ts", "level", "event", "run_id", "component"})


# Reading the rotated files ------------------------------------------------------------
_FileId = tuple[int, int]  # (st_dev, st_ino)
_Opened = list[tuple[int, _FileId]]  # open fds with their file ids


def _file_id(fd: int) -> _FileId:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class LogReader:
    """The complete lines of a rotating log, in order, each exactly once.

        reader = LogReader(run.log_file)
        for line in reader.read_available(): ...      # everything so far, oldest first
        for line in reader.read_available(): ...      # only what was written since

    The newest file stays open; a rotation is noticed when the path no longer names the
    open file's inode. The writer (``jsonlog.RotatingLineFile``) writes a line with one
    write and closes a file before renaming it, so once the rename is seen the old file
    is complete and a partial line left at its end is torn, never still being written.
    The head's files come first, once: they never change.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._id: _FileId | None = None
        self._partial = b""
        self._head_read = False

    def read_available(self) -> Iterator[bytes]:
        if self._fd is not None:
            yield from self._drain(self._fd)
            if not self._rotated():
                return
            yield from self._drain(self._fd)  # anything written before the rename
            newer = self._open_newer_than(self._id)
            if not newer:
                return  # mid-rotation: the new file is not there yet
            yield from self._finish_current()
        else:
            newer = self._open_newer_than(None)
            if not self._head_read:
                newer = (self._open_head(newer) or []) + newer
                self._head_read = True
        for fd, fid in newer[:-1]:
            self._fd, self._id = fd, fid
            yield from self._drain(fd)
            yield from self._finish_current()
        if newer:
            self._fd, self._id = newer[-1]
            yield from self._drain(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _drain(self, fd: int) -> Iterator[bytes]:
        while chunk := os.read(fd, _READ_CHUNK):
            lines = (self._partial + chunk).split(b"\n")
            self._partial = lines.pop()
            yield from (line for line in lines if line)

    def _finish_current(self) -> Iterator[bytes]:
        """Close a file that will not grow again; its unterminated tail is a torn line."""
        if self._partial:
            yield self._partial
            self._partial = b""
        self.close()

    def _rotated(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self._id

    def _open_newer_than(self, known: _FileId | None) -> _Opened:
        """Open the files newer than ``known`` (all of them for None), oldest first."""
        for _attempt in range(_RESCANS):
            opened, found = self._scan(known)
            if known is None or found or self._fd is None:
                break
            # Not found: the writer moved it to the head (then the head's files after it
            # are newer too), or deleted it (no links left: every file is newer), or moved
            # it past the scan while shifting names; then look again.
            later_head = self._open_head(opened, after=known)
            if later_head is not None:
                opened += reversed(later_head)  # older than the rotated files
                break
            if os.fstat(self._fd).st_nlink == 0:
                break
            for fd, _fid in opened:
                os.close(fd)
        else:
            # Moved out of the naming scheme by hand: which named files are newer cannot
            # be told, so go on with the newest alone rather than repeat older ones.
            opened, _found = self._scan(None)
            for fd, _fid in opened[1:]:
                os.close(fd)
            opened = opened[:1]
        opened.reverse()
        return opened

    def _open_head(self, chain: _Opened, after: _FileId | None = None) -> _Opened | None:
        """Open the head's files, oldest first; with ``after``, only those after that one
        (None when it is not in the head). A file that ``chain``'s scan opened already
        joined the head meanwhile: the newest of the head and the oldest of the chain, it
        is read once, in its place."""
        skip = {fid for _fd, fid in chain}
        opened: _Opened = []
        seen_after = after is None
        for path in loghead.head_files(self.path):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            fid = _file_id(fd)
            if not seen_after or fid in skip:
                seen_after = seen_after or fid == after
                os.close(fd)
            else:
                opened.append((fd, fid))
        if not seen_after:
            return None
        return opened

    def _scan(self, known: _FileId | None) -> tuple[_Opened, bool]:
        """Open supervisor.jsonl, .1, .2 … (newest first) until ``known``; True if found.

        A rotation shifts names upwards (.4 → .5 … .1 → .2, then the file → .1), leaving
        a gap for a moment. Scanning upwards past gaps, to beyond the highest name seen
        before the scan, meets every file at least once; an inode opened already is
        skipped.
        """
        prefix = self.path.name + "."
        top = max((int(n[len(prefix):]) for n in os.listdir(self.path.parent)
                   if n.startswith(prefix) and n[len(prefix):].isdigit()), default=0)
        opened: _Opened = []
        seen: set[_FileId] = set()
        index = 0
        while True:
            name = self.path if index == 0 else self.path.with_name(f"{prefix}{index}")
            index += 1
            try:
                fd = os.open(name, os.O_RDONLY)
            except FileNotFoundError:
                if index > top + 1:
                    return opened, False
                continue
            fid = _file_id(fd)
            if fid == known:
                os.close(fd)
                return opened, True
            if fid in seen:
                os.close(fd)
            else:
                seen.add(fid)
                opened.append((fd, fid))


# Lines and filters -------------------------------------------------------------------
def parse_line(raw: bytes) -> tuple[str, dict[str, Any]] | None:
    """The line and its object, or None for a line that is not a JSON log object.

    A supervisor that crashed mid-write leaves a torn line, and the next one appends to
    it; the complete object after the torn part is recovered rather than lost with it.
    """
    text = raw.decode("utf-8", "replace").strip()
    start = 0
    while start >= 0:
        try:
            record = json.loads(text[start:])
        except ValueError:
            start = text.find('{"', start + 1)
            continue
        if isinstance(record, dict) and isinstance(record.get("event"), str):
            return text[start:], record
        return None
    return None


def parse_since(text: str, now: float | None = None) -> float:
    """``--since``: an ISO time (naive means local time) or a duration ago (``1h30m``)."""
    text = text.strip()
    if text and _DURATION_RE.sub("", text) == "":
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_RE.findall(text))
        return (time.time() if now is None else now) - seconds
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO time (2026-11-28T23:02:40) nor a duration "
            "(30s, 10m, 2h, 1d)") from None
    return when.astimezone().timestamp()  # astimezone() reads a naive time as local


def line_time(record: dict[str, Any]) -> float | None:
    ts = record.get("ts")
    if not isinstance(ts, str):
        return None
    try:
        return datetime.fromisoformat(ts).timestamp()
    except ValueError:
        return None


def _level_rank(level: Any) -> int:
    return LEVELS.index(level) if level in LEVELS else LEVELS.index("info")


class LineFilter:
    """``--level`` (minimum), ``--event`` (any of the globs) and ``--since``."""

    def __init__(self, level: str | None = None, events: Iterable[str] = (),
                 since: float | None = None) -> None:
        self.min_rank = _level_rank(level) if level else 0
        self.events = list(events)
        self.since = since

    def __call__(self, record: dict[str, Any]) -> bool:
        if _level_rank(record.get("level")) < self.min_rank:
            return False
        if self.events and not any(fnmatch.fnmatchcase(record["event"], pattern)
                                   for pattern in self.events):
            return False
        if self.since is not None:
            when = line_time(record)
            if when is None or when < self.since:
                return False
        return True


def read_log(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every valid line of a run's log so far, oldest first (used by ``report`` too)."""
    reader = LogReader(path)
    try:
        for raw in reader.read_available():
            entry = parse_line(raw)
            if entry is not None:
                yield entry
    finally:
        reader.close()


# Rendering ------------------------------------------------------------------------------
_COLOURS = {"debug": "2", "info": "32", "warning": "33", "error": "31", "critical": "1;31"}


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        if value and not any(c.isspace() or c in '"=' for c in value):
            return value
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


class Printer:
    """Writes entries as the stored JSON line or as a human line; flushes each line so
    ``-f`` output reaches a pipe at once."""

    def __init__(self, out: TextIO, *, raw: bool, colour: bool) -> None:
        self.out = out
        self.raw = raw
        self.colour = colour

    def emit(self, line: str, record: dict[str, Any]) -> None:
        self.out.write(line + "\n" if self.raw else self.render(record))
        self.out.flush()

    def _paint(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.colour else text

    def render(self, record: dict[str, Any]) -> str:
        when = line_time(record)
        stamp = "????-??-?? ??:??:??.???" if when is None else (
            datetime.fromtimestamp(when).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3])
        level = str(record.get("level", "info"))
        parts = [self._paint("2", stamp),
                 self._paint(_COLOURS.get(level, "0"), f"{level.upper():<8}")]
        component = record.get("component")
        if component not in (None, "supervisor"):
            parts.append(self._paint("35", f"[{component}]"))
        parts.append(self._paint("1", str(record["event"])))
        blocks = []
        for key, value in record.items():
            if key in _HEADER_KEYS:
                continue
            if isinstance(value, str) and "\n" in value:
                # Tracebacks and worker output read better as the block they are.
                blocks.append((key, value))
                continue
            parts.append(f"{self._paint('36', key)}={_value_text(value)}")
        text = " ".join(parts) + "\n"
        for key, value in blocks:
            text += f"  {self._paint('36', key)}:\n"
            text += "".join(f"    {row}\n" for row in value.rstrip("\n").split("\n"))
        return text


# The command ------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", nargs="?", help="run id (default: the newest run)")
    parser.add_argument("-f", "--follow", action="store_true",
                        help="keep printing new lines (across rotations) until Ctrl-C")
    parser.add_argument("-n", "--lines", type=_non_negative, metavar="N",
                        help="only the last N lines after filtering (-f alone: 10)")
    parser.add_argument("--level", choices=LEVELS, help="minimum level to show")
    parser.add_argument("--event", action="append", default=[], metavar="GLOB",
                        help="only events matching this glob, e.g. 'worker.*' (repeatable)")
    parser.add_argument("--since", type=parse_since, metavar="T",
                        help="only lines at or after T: an ISO time, or a duration ago "
                             "such as 30s, 10m, 2h, 1d")
    parser.add_argument("--json", action="store_true",
                        help="print the stored JSON lines exactly (for jq); skips torn lines")


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def resolve_run(state: Path, run_id: str | None) -> RunDir:
    """The named run, else the newest one."""
    if run_id:
        return RunDir.open(state, run_id)
    runs = list_runs(state)
    if not runs:
        raise RunDirError(f"no runs in {state}")
    return runs[-1]


def run(args: argparse.Namespace) -> int:
    log_run = resolve_run(state_dir(args.state_dir), args.run)
    if not args.follow and not any(log_run.log_dir.glob(log_run.log_file.name + "*")):
        print(f"nkat-supervise: run {log_run.run_id} has no log yet", file=sys.stderr)
        return ExitCode.CHECK_FAILED
    keep = LineFilter(args.level, args.event, args.since)
    colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    printer = Printer(sys.stdout, raw=args.json, colour=colour)
    count = args.lines if args.lines is not None else (
        FOLLOW_DEFAULT_LINES if args.follow else None)
    reader = LogReader(log_run.log_file)
    try:
        backlog: Iterable[tuple[str, dict[str, Any]]] = _select(reader.read_available(), keep)
        if count is not None:
            backlog = deque(backlog, maxlen=count)
        for line, record in backlog:
            printer.emit(line, record)
        if args.follow:
            _follow(reader, keep, printer)
    except BrokenPipeError:
        silence_stdout()  # the reader went away (| head): stop quietly
    finally:
        reader.close()
    return ExitCode.OK


def _select(raws: Iterable[bytes], keep: LineFilter) -> Iterator[tuple[str, dict[str, Any]]]:
    for raw in raws:
        entry = parse_line(raw)
        if entry is not None and keep(entry[1]):
            yield entry


def _follow(reader: LogReader, keep: LineFilter, printer: Printer) -> None:
    """Poll until SIGINT or SIGTERM; the signal only sets a flag, so a line is never cut."""
    stop: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _f: stop.append(s))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop:
            for line, record in _select(reader.read_available(), keep):
                printer.emit(line, record)
            time.sleep(POLL_S)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
