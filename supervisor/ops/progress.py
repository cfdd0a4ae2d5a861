"""The live progress line of ``start`` in the foreground.

On a terminal, one line rewritten in place; otherwise a plain line every
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
