"""Memory, leak and power rules: when to free GPU memory, plan a restart, or warn.

    settings = ResourceSettings.from_config(config)
    memory = MemoryWatch(settings)
    leak = LeakWatch(settings, now=clock())          # one per worker epoch, at spawn
    power = PowerWatch(settings)
    for action in (memory.update(now, used, total), leak.update(now, rss_bytes),
                   power.update(now, watts, enforced_limit_w)):
        ...                                           # None, or a ResourceAction

Pure: times are passed in. The rules:

- GPU memory used/total ≥ ``memory_high_water`` → ``free_memory``, at most once per
  ``free_memory_interval``. The worker frees its pools; if memory stays high the next
  ``free_memory`` follows (``fields["repeats"]`` counts them) and the worker's answer to
  a later OOM is smaller batches.
- Worker RSS: samples from the first ``leak_warmup`` seconds are ignored (pools and
  imports grow then); afterwards, RSS more than ``leak_rss_growth_mb`` above the lowest
  sample of the last ``leak_window`` seconds → ``planned_restart`` ("leak suspected"),
  once per worker: the shell stops it at its next durable checkpoint
  (KillReason.LEAK) and starts a fresh one.
- Power ≥ ``power_high_water`` of the lower of ``power_limit`` (configured, None = none)
  and the enforced NVML limit → ``power_warning``, at most once per ``power_warn_interval``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque

from nkat.protocol.settings import Role, setting
from nkat.supervisor.policies.settings import FromConfig

_S = Role.SUPERVISOR

_MB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ResourceSettings(FromConfig):
    """Memory, leak and power knobs.

    memory_high_water: GPU memory used/total fraction that triggers ``free_memory``.
    free_memory_interval: least seconds between two ``free_memory``.
    leak_rss_growth_mb: RSS growth (MB) over the window that suggests a leak.
    leak_window: seconds of RSS history the growth is measured over.
    leak_warmup: seconds after spawn whose RSS samples are ignored.
    power_limit: configured power limit (W); None = only the enforced NVML limit.
    power_high_water: fraction of the power limit that triggers a warning.
    power_warn_interval: least seconds between two power warnings.
    """

    memory_high_water: float = setting(
        0.95, "GPU memory fraction at which the worker is told to free memory", role=_S,
        low=0.5, high=1.0)
    free_memory_interval: float = 30.0
    leak_rss_growth_mb: int = setting(
        1024, "worker RSS growth (MB) within leak_window that triggers a planned restart",
        role=_S, low=1, high=2**31)
    leak_window: float = setting(600.0, "window (s) for leak_rss_growth_mb", role=_S, low=1,
                                 high=864000)
    leak_warmup: float = 60.0
    power_limit: float | None = setting(None, "warn at 95% of this many watts", role=_S, low=1,
                                        high=100000, seed="power_limit")
    power_high_water: float = 0.95
    power_warn_interval: float = 300.0

    def __post_init__(self) -> None:
        for name in ("memory_high_water", "power_high_water"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        for name in ("leak_rss_growth_mb", "leak_window"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.power_limit is not None and not self.power_limit > 0:
            raise ValueError(f"power_limit must be > 0 W or None, got {self.power_limit!r}")
        for name in ("free_memory_interval", "leak_warmup", "power_warn_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


class ResourceActionKind(enum.StrEnum):
    FREE_MEMORY = "free_memory"  # cmd free_memory
    PLANNED_RESTART = "planned_restart"  # stop at the next durable checkpoint, restart
    POWER_WARNING = "power_warning"  # a warning event, nothing else


@dataclasses.dataclass(frozen=True)
class ResourceAction:
    kind: ResourceActionKind
    reason: str
    fields: dict[str, float]


class MemoryWatch:
    """GPU memory high water → ``free_memory``, rate-limited."""

    def __init__(self, settings: ResourceSettings) -> None:
        self._s = settings
        self._last_sent: float | None = None
        self._repeats = 0

    def update(self, now: float, used_bytes: int | None,
               total_bytes: int | None) -> ResourceAction | None:
        if used_bytes is None or not total_bytes:
            return None
        fraction = used_bytes / total_bytes
        if fraction < self._s.memory_high_water:
            self._repeats = 0
            return None
        if self._last_sent is not None and now - self._last_sent < self._s.free_memory_interval:
            return None
        self._last_sent = now
        self._repeats += 1
        return ResourceAction(
            ResourceActionKind.FREE_MEMORY,
            f"GPU memory {fraction:.1%} used, at or above {self._s.memory_high_water:.0%}",
            {"used_fraction": fraction, "repeats": self._repeats})


class LeakWatch:
    """Worker RSS growth over a sliding window → one ``planned_restart``."""

    def __init__(self, settings: ResourceSettings, now: float) -> None:
        self._s = settings
        self._warm_from = now + settings.leak_warmup
        # Sliding-window minimum: (time, rss) with rss strictly increasing from the left,
        # so the left end is the window's minimum.
        self._window: deque[tuple[float, int]] = deque()
        self._fired = False

    def update(self, now: float, rss_bytes: int | None) -> ResourceAction | None:
        if rss_bytes is None or self._fired or now < self._warm_from:
            return None
        while self._window and self._window[-1][1] >= rss_bytes:
            self._window.pop()
        self._window.append((now, rss_bytes))
        while self._window[0][0] < now - self._s.leak_window:
            self._window.popleft()
        low = self._window[0][1]
        growth_mb = (rss_bytes - low) / _MB
        if growth_mb <= self._s.leak_rss_growth_mb:
            return None
        self._fired = True
        return ResourceAction(
            ResourceActionKind.PLANNED_RESTART,
            f"leak suspected: worker RSS grew {growth_mb:.0f} MB within"
            f" {self._s.leak_window:g} s", {"rss_mb": rss_bytes / _MB, "growth_mb": growth_mb})


class PowerWatch:
    """Power draw near the limit → a warning, rate-limited."""

    def __init__(self, settings: ResourceSettings) -> None:
        self._s = settings
        self._last_sent: float | None = None

    def limit(self, enforced_limit_w: float | None) -> float | None:
        """The limit in force: the lower of the configured and the enforced one."""
        limits = [w for w in (self._s.power_limit, enforced_limit_w) if w is not None and w > 0]
        return min(limits) if limits else None

    def update(self, now: float, watts: float | None,
               enforced_limit_w: float | None) -> ResourceAction | None:
        limit = self.limit(enforced_limit_w)
        if watts is None or limit is None or watts < self._s.power_high_water * limit:
            return None
        if self._last_sent is not None and now - self._last_sent < self._s.power_warn_interval:
            return None
        self._last_sent = now
        return ResourceAction(
            ResourceActionKind.POWER_WARNING,
            f"power {watts:.0f} W is {watts / limit:.0%} of the {limit:.0f} W limit",
            {"watts": watts, "limit_w": limit})
