"""How a run's status reads to a person: the live progress line of ``start`` in the
foreground, and the lines of ``status``.

On a terminal, the progress line is rewritten in place; otherwise a plain line every
``plain_every`` seconds, so a log file or CI console gets readable progress.
"""

from __future__ import annotations

import time
from typing import Any, TextIO


def format_progress(status: dict[str, Any], now_wall: float) -> str:
    parts = [f"epoch {status.get('epoch')}", str(status.get("state"))]
    progress = status.get("progress")
    if isinstance(progress, float):
        parts.append(f"{progress:6.1%}")
    rate = status.get("dims_per_s") or status.get("units_per_s")
    unit = "dims/s" if status.get("dims_per_s") else "units/s"
    if isinstance(rate, (int, float)) and rate > 0:
        parts.append(f"{_si(rate)} {unit}")
        done, total = status.get("units_done"), status.get("units_total")
        units_rate = status.get("units_per_s")
        if isinstance(done, int) and isinstance(total, int) and units_rate:
            parts.append(f"ETA {_duration((total - done) / units_rate)}")
    gpu = status.get("gpu") or {}
    if isinstance(gpu.get("temperature"), (int, float)):
        parts.append(f"{gpu['temperature']:.0f}°C")
    parts.append(f"restarts {status.get('restarts', 0)}")
    last = status.get("last_checkpoint_wall")
    if isinstance(last, (int, float)):
        parts.append(f"ckpt {_duration(max(0.0, now_wall - last))} ago")
    return " | ".join(parts)


#: The exit code ``status --watch`` ends with once the run has ended, by its state.
ENDED = {"completed": 0, "gave_up": 3, "kill_failed": 3, "stopped": 4, "interrupted": 4}


def status_lines(status: dict[str, Any], now_wall: float) -> list[tuple[str, str]]:
    """(label, value) rows for ``status``: numbers rounded for reading, a paused or ended
    run without a stale rate, ETA, checkpoint age and the supervisor's uptime."""
    state, source = str(status.get("state")), status.get("source")
    done, total = _number(status.get("units_done")), _number(status.get("units_total"))
    progress = _number(status.get("progress"))
    rows = [("run", str(status.get("run_id"))), ("state", f"{state} ({source})"),
            ("epoch", str(status.get("epoch"))), ("restarts", str(status.get("restarts", 0)))]
    units = f"{int(done):,} of {int(total):,}" if done is not None and total is not None \
        else "-"
    rows.append(("progress", (f"{progress:.1%}, " if progress is not None else "")
                 + f"units {units}"))
    dims, per_unit = _number(status.get("dims_per_s")), _number(status.get("units_per_s"))
    rate, unit = (dims, "dims/s") if dims else (per_unit, "units/s")
    if state != "running" or source == "disk":
        rows.append(("rate", f"- ({state})"))
    elif rate:
        rows.append(("rate", f"{_si(rate)} {unit}"))
        if done is not None and total is not None and per_unit:
            rows.append(("ETA", _duration((total - done) / per_unit)))
    seq, last = status.get("durable_ckpt_seq"), _number(status.get("last_checkpoint_wall"))
    age = f", {_duration(max(0.0, now_wall - last))} ago" if last is not None else ""
    rows.append(("checkpoint", f"{seq}{age}" if seq else "none yet"))
    gpu = status.get("gpu") or {}
    temperature = _number(gpu.get("temperature"))
    if temperature is not None:
        rows.append(("GPU", f"{temperature:.0f}°C, {gpu.get('thermal_state')}, duty "
                            f"{gpu.get('duty')}"))
    shards = status.get("shards")
    if isinstance(shards, dict):
        rows.append(("shards", f"{shards.get('done')} of {shards.get('total')} done"))
    if status.get("engine") == "ray":
        rows.append(("engine", f"ray, {status.get('nodes')} node(s)"))
    for row in status.get("gpus") or ():  # one line per GPU of a sharded run
        parts = [str(row.get("state"))]
        if row.get("shard") is not None:
            share = _number(row.get("progress"))
            parts.append(f"shard {row['shard']}" + (f" {share:.0%}" if share is not None
                                                    else ""))
        rate = _number(row.get("dims_per_s")) or _number(row.get("units_per_s"))
        if rate:
            parts.append(f"{_si(rate)} {'dims/s' if row.get('dims_per_s') else 'units/s'}")
        heat = _number(row.get("temperature"))
        if heat is not None:
            parts.append(f"{heat:.0f}°C {row.get('thermal_state')}")
        if row.get("node"):  # --engine ray: a node agent, named by where it runs
            parts.insert(0, f"{row.get('host')} node {row['node']}")
            rows.append((f"agent {row.get('index')}", ", ".join(parts)))
        else:
            rows.append((f"GPU {row.get('index')}", ", ".join(parts)))
    if status.get("worker_pid"):
        rows.append(("worker pid", str(status["worker_pid"])))
    pid, started = status.get("supervisor_pid"), _number(status.get("supervisor_started_wall"))
    if pid and source != "disk":
        up = f", up {_duration(max(0.0, now_wall - started))}" if started is not None else ""
        rows.append(("supervisor", f"pid {pid}{up}"))
    return rows


def _number(value: Any) -> float | None:
    """A JSON number as a float; None for null, text or a bool."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    mins, s = divmod(rem, 60)
    return f"{h}h{mins:02d}m" if h else f"{mins}m{s:02d}s" if mins else f"{s}s"


class ProgressDisplay:
    def __init__(self, out: TextIO, plain_every: float = 10.0) -> None:
        self.out: TextIO | None = out
        self.tty = out.isatty()
        self.plain_every = plain_every
        self._last_plain = 0.0
        self._width = 0

    def update(self, status: dict[str, Any]) -> None:
        if self.out is None:
            return
        try:
            self._show(status)
        except OSError:
            self.out = None  # the terminal hung up or the pipe closed: go on silently

    def _show(self, status: dict[str, Any]) -> None:
        assert self.out is not None
        line = format_progress(status, time.time())
        if self.tty:
            pad = max(0, self._width - len(line))
            self.out.write("\r" + line + " " * pad)
            self._width = len(line)
            self.out.flush()
        elif time.monotonic() - self._last_plain >= self.plain_every:
            self._last_plain = time.monotonic()
            self.out.write(line + "\n")
            self.out.flush()

    def close(self) -> None:
        if self.out is not None and self.tty and self._width:
            try:
                self.out.write("\n")
                self.out.flush()
            except OSError:
                pass
