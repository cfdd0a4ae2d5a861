"""What the status page shows, read from a state directory: each run's status and, for the
runs open on the page, its chart, newest warnings and result. Nothing here writes.

    board = Board(state)                       # every run (``nkat-supervise serve``)
    board = Board.for_run(run)                 # one run, beside its live supervisor
    view = board.snapshot({"r1": 0})           # blocking (files, ZeroMQ): off the event loop

``snapshot`` is told which runs are open on the page and which detail version each page
holds; a run's detail is sent again only when its log has grown. However many pages poll,
the state directory is read at most every ``REFRESH_S``. Statuses come from
``inspect.run_status`` (the control socket of a live supervisor, else the disk, cached
until the run's files change); charts from report's ``TimelineReader``, fed the log lines
written since the last look by logview's ``LogReader``.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from nkat.supervisor.ops.logview import LogReader, parse_line
from nkat.supervisor.ops.report import Timeline, TimelineReader, scalar_rows
from nkat.supervisor.rundir import RunDir, list_runs

REFRESH_S = 0.5  # the state directory is read at most this often, whoever asks
MAX_OPEN = 8  # runs followed in detail at once: each keeps its log open
FORGET_AFTER_S = 60.0  # a run's log is closed when no page has asked about it this long
MAX_POINTS = 600  # chart points per series; past twice this, a series is halved
MAX_WARNINGS = 8
MAX_RESULT_ROWS = 40
MAX_TEXT = 240
WARNING_LEVELS = frozenset({"warning", "error", "critical"})
GPU_ROW_KEYS = ("index", "name", "shard", "progress", "dims_per_s", "temperature", "duty",
                "thermal_state", "state")
_HEADER_KEYS = frozenset({"ts", "level", "event", "run_id", "component"})
# Detail versions, unique across this process's followers and (starting from the clock)
# across restarts, so a page never keeps a detail that a new server numbered alike.
_versions = itertools.count(time.time_ns() // 1000)


def gpu_rows(status: Mapping[str, Any], config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per GPU: from ``gpus`` when the status has it, else from the single ``gpu``."""
    rows = status.get("gpus")
    if isinstance(rows, list):
        return [{key: row.get(key) for key in GPU_ROW_KEYS}
                for row in rows if isinstance(row, Mapping)]
    gpu = status.get("gpu")
    if not isinstance(gpu, Mapping):
        return []
    return [{"index": config.get("gpu_index", 0), "name": gpu.get("name"), "shard": None,
             "progress": status.get("progress"), "dims_per_s": status.get("dims_per_s"),
             "temperature": gpu.get("temperature"), "duty": gpu.get("duty"),
             "thermal_state": gpu.get("thermal_state"), "state": status.get("state")}]


def summarize(run: RunDir, status: Mapping[str, Any], now_wall: float) -> dict[str, Any]:
    """A run's card: its status, with the rate and ETA only while a supervisor reports them
    (a down run's last rate is history, not a speed)."""
    live = status.get("source") == "supervisor"
    units_rate = _number(status.get("units_per_s")) if live else None
    dims_rate = _number(status.get("dims_per_s")) if live else None
    done, total = status.get("units_done"), status.get("units_total")
    eta = None
    if live and status.get("state") == "running" and units_rate and isinstance(done, int) \
            and isinstance(total, int):
        eta = max(0, total - done) / units_rate
    last_ckpt = _number(status.get("last_checkpoint_wall"))
    return {
        "run_id": run.run_id, "created": run.info.created, "job": run.info.spec.get("job"),
        "state": status.get("state"), "outcome": status.get("outcome"), "live": live,
        "epoch": status.get("epoch"), "restarts": status.get("restarts"),
        "progress": _number(status.get("progress")), "units_done": done, "units_total": total,
        "rate": dims_rate if dims_rate is not None else units_rate,
        "rate_unit": "dims/s" if dims_rate is not None else "units/s",
        "eta_s": eta, "durable_ckpt_seq": status.get("durable_ckpt_seq"),
        "checkpoint_age_s": max(0.0, now_wall - last_ckpt) if last_ckpt else None,
        "gpus": gpu_rows(status, run.info.config), "error": status.get("error"),
    }


class RunLog:
    """One run's log, followed: chart series, restarts by reason, newest warnings."""

    def __init__(self, run: RunDir, scale: float, rate_unit: str) -> None:
        self.run = run
        self.rate_unit = rate_unit
        self.version = next(_versions)
        self.used = 0.0
        self.read_at = -math.inf
        self._reader = LogReader(run.log_file)
        self._timeline = TimelineReader(scale)
        self._warnings: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=MAX_WARNINGS)

    def refresh(self) -> None:
        grew = False
        for raw in self._reader.read_available():
            entry = parse_line(raw)
            if entry is None:
                continue
            record = entry[1]
            self._timeline.feed(record)
            if record.get("level") in WARNING_LEVELS:
                self._warnings.append(_warning(record))
            grew = True
        if grew:
            self.version = next(_versions)
            compact(self._timeline.timeline)

    def detail(self, state: Any) -> dict[str, Any]:
        tl = self._timeline.timeline
        start = tl.start or 0.0

        def wall(times: list[float]) -> list[float]:
            return [round(start + t, 3) for t in times]

        result = self.run.read_result() if state == "completed" else None
        return {
            "version": self.version,
            "rate_unit": self.rate_unit,
            "chart": {
                "rates": [[round(start + a, 3), round(start + b, 3), r] for a, b, r in tl.rates],
                "temperatures": [[round(start + t, 3), c] for t, c in tl.temperatures],
                "restarts": wall(tl.restarts), "thermal_stops": wall(tl.thermal_stops),
                "checkpoints": wall(tl.checkpoints),
            },
            "restart_reasons": dict(tl.restart_reasons.most_common()),
            "thermal_counts": dict(sorted(tl.thermal_counts.items())),
            "warnings": list(reversed(self._warnings)),
            "result": None if result is None else scalar_rows(result)[:MAX_RESULT_ROWS],
        }

    def close(self) -> None:
        self._reader.close()


class Board:
    """The runs of one state directory (or one run) as the page shows them."""

    def __init__(self, state: Path, only: RunDir | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.state = state
        self.only = only
        self.clock = clock
        self.wall = wall
        self._names: list[str] = []
        self._runs: list[RunDir] = []
        self._summaries: list[dict[str, Any]] = []
        self._read_at = -math.inf
        self._disk: dict[str, tuple[Any, dict[str, Any]]] = {}  # run id -> (files, status)
        self._logs: dict[str, RunLog] = {}

    @classmethod
    def for_run(cls, run: RunDir) -> Board:
        return cls(run.path.parent.parent, only=run)

    def snapshot(self, open_runs: Mapping[str, int]) -> dict[str, Any]:
        """Every run's card (live runs first, then the newest), and the detail of each
        open run whose version differs from the one given (0: none yet)."""
        now = self.clock()
        if now - self._read_at >= REFRESH_S:
            self._read_at = now
            wall = self.wall()
            cards = [summarize(run, self._status(run), wall) for run in reversed(self._list())]
            cards.sort(key=lambda card: not card["live"])  # live runs first, then newest
            self._summaries = cards
        states = {card["run_id"]: card["state"] for card in self._summaries}
        details: dict[str, Any] = {}
        for run_id, have in itertools.islice(open_runs.items(), MAX_OPEN):
            log = self._follow(run_id, now)
            if log is None:
                continue
            if now - log.read_at >= REFRESH_S:
                log.read_at = now
                log.refresh()
            if log.version != have:
                details[run_id] = log.detail(states.get(run_id))
        self._forget(now)
        view: dict[str, Any] = json_safe({"now": self.wall(), "state_dir": str(self.state),
                                          "runs": self._summaries, "details": details})
        return view

    def close(self) -> None:
        for log in self._logs.values():
            log.close()
        self._logs.clear()

    # Runs and their statuses -------------------------------------------------------------
    def _list(self) -> list[RunDir]:
        if self.only is not None:
            return [self.only]
        try:
            names = sorted(os.listdir(self.state / "runs"))
        except OSError:
            names = []
        # A run being created has its directory before its run.toml: list again until
        # every name is a run.
        if names != self._names or len(self._runs) < len(names):
            self._names = names
            self._runs = list_runs(self.state)
        return self._runs

    def _status(self, run: RunDir) -> dict[str, Any]:
        from nkat.supervisor.ops.inspect import run_status

        try:
            if run.holder_pid():
                self._disk.pop(run.run_id, None)
                return run_status(run)
            files = _files(run)
            cached = self._disk.get(run.run_id)
            if cached is not None and cached[0] == files:
                return cached[1]
            status = run_status(run)
            self._disk[run.run_id] = (files, status)
            return status
        except Exception as exc:  # one unreadable run must not blank the page for the others
            return {"state": "unreadable", "error": f"{type(exc).__name__}: {exc}"}

    # Followed logs -----------------------------------------------------------------------
    def _follow(self, run_id: str, now: float) -> RunLog | None:
        log = self._logs.get(run_id)
        if log is None:
            run = next((r for r in self._list() if r.run_id == run_id), None)
            if run is None:
                return None
            scale, unit = _rate_scale(run)
            log = self._logs[run_id] = RunLog(run, scale, unit)
        log.used = now
        return log

    def _forget(self, now: float) -> None:
        by_use = sorted(self._logs.values(), key=lambda log: log.used, reverse=True)
        for index, log in enumerate(by_use):
            if index >= MAX_OPEN or now - log.used > FORGET_AFTER_S:
                log.close()
                del self._logs[log.run.run_id]


def compact(tl: Timeline, limit: int = MAX_POINTS) -> None:
    """Keep the whole run on the chart in bounded memory: a series past twice ``limit``
    points is halved, coarser where it is oldest after a few halvings. Rates merge with
    their neighbour (time-weighted) only where one interval ends as the next starts, so
    a restart's gap stays; temperatures keep the hotter of each pair, so a peak stays."""
    if len(tl.rates) > 2 * limit:
        tl.rates[:] = _merge_rates(tl.rates)
        del tl.rates[:-2 * limit]  # runs of gaps that cannot merge: the newest are kept
    if len(tl.temperatures) > 2 * limit:
        pairs = zip(tl.temperatures[0::2], tl.temperatures[1::2], strict=False)
        odd = tl.temperatures[-1:] if len(tl.temperatures) % 2 else []
        tl.temperatures[:] = [max(a, b, key=lambda point: point[1]) for a, b in pairs] + odd
    for marks in (tl.checkpoints, tl.exits):
        if len(marks) > 2 * limit:
            marks[:] = marks[1::2]
    for marks in (tl.restarts, tl.thermal_stops):
        del marks[:-2 * limit]  # every one matters; only a flood of them is cut


def _merge_rates(rates: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    merged: list[tuple[float, float, float]] = []
    index = 0
    while index < len(rates):
        a0, b0, r0 = rates[index]
        if index + 1 < len(rates) and abs(rates[index + 1][0] - b0) < 1e-6:
            _a1, b1, r1 = rates[index + 1]
            merged.append((a0, b1, (r0 * (b0 - a0) + r1 * (b1 - b0)) / (b1 - a0)))
            index += 2
        else:
            merged.append((a0, b0, r0))
            index += 1
    return merged


def _files(run: RunDir) -> tuple[Any, ...]:
    """What a down run's status is computed from, as (name, mtime, size): equal means the
    status computed before still holds."""
    def stat(path: Path) -> tuple[int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def listing(path: Path) -> Iterator[tuple[str, tuple[int, int] | None]]:
        try:
            names = sorted(os.listdir(path))
        except OSError:
            return
        for name in names:
            yield name, stat(path / name)

    return (stat(run.status_file), stat(run.result_file), stat(run.blob_dir),
            tuple(listing(run.wal_dir)), stat(run.log_file))


def _rate_scale(run: RunDir) -> tuple[float, str]:
    from nkat.supervisor.ops.metrics import nkat_dims

    dims = nkat_dims(run.info.spec)
    return (float(dims[0]), "dims/s") if dims else (1.0, "units/s")


def _warning(record: Mapping[str, Any]) -> dict[str, Any]:
    parts = []
    for key, value in record.items():
        if key in _HEADER_KEYS:
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if "\n" in text:
            text = text.strip().splitlines()[-1] + " …"  # a traceback: its last line says why
        parts.append(f"{key}={text}")
    text = " ".join(parts)
    return {"ts": record.get("ts"), "level": record.get("level"), "event": record.get("event"),
            "text": text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 1] + "…"}


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as null: a browser's JSON.parse rejects them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
