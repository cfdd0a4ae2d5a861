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
    def num(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    state = str(status.get("state"))
    done, total = status.get("units_done"), status.get("units_total")
    progress = status.get("progress")
    rows = [("run", str(status.get("run_id"))), ("state", f"{state} ({status.get('source')})"),
            ("epoch", str(status.get("epoch"))), ("restarts", str(status.get("restarts", 0)))]
    units = f"{done:,} of {total:,}" if num(done) and num(total) else "-"
    rows.append(("progress", (f"{progress:.1%}, " if num(progress) else "") + f"units {units}"))
    rate = status.get("dims_per_s") or status.get("units_per_s")
    unit = "dims/s" if status.get("dims_per_s") else "units/s"
    running = state == "running" and status.get("source") != "disk"
    if not running:
        rows.append(("rate", f"- ({state})"))
    elif num(rate) and rate > 0:
        rows.append(("rate", f"{_si(float(rate))} {unit}"))
        units_rate = status.get("units_per_s")
        if num(done) and num(total) and num(units_rate) and units_rate > 0:
            rows.append(("ETA", _duration((total - done) / units_rate)))
    seq, last = status.get("durable_ckpt_seq"), status.get("last_checkpoint_wall")
    age = f", {_duration(max(0.0, now_wall - last))} ago" if num(last) else ""
    rows.append(("checkpoint", f"{seq or 'none yet'}{age if seq else ''}"))
    gpu = status.get("gpu") or {}
    if num(gpu.get("temperature")):
        rows.append(("GPU", f"{gpu['temperature']:.0f}°C, {gpu.get('thermal_state')}, duty "
                            f"{gpu.get('duty')}"))
    if status.get("worker_pid"):
        rows.append(("worker pid", str(status["worker_pid"])))
    pid, started = status.get("supervisor_pid"), status.get("supervisor_started_wall")
    if pid and status.get("source") != "disk":
        up = f", up {_duration(max(0.0, now_wall - started))}" if num(started) else ""
        rows.append(("supervisor", f"pid {pid}{up}"))
    return rows


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
