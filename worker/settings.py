"""The runtime settings a worker receives in ``welcome`` (docs/architecture.md, "Settings").

Parsed once into a frozen :class:`Settings`. Keys the worker does not use are ignored
(the supervisor's config has many); a known key of the wrong type or range is an error
that names the key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any


class SettingsError(ValueError):
    """A setting has the wrong type or is out of range."""


@dataclasses.dataclass(frozen=True)
class Settings:
    checkpoint_interval: float = 30.0
    #: Units per batch to start with; 0 = the job's ``default_batch_units``.
    batch_size: int = 0
    batch_size_adaptive: bool = True
    #: zlib-compress the job snapshot inside each checkpoint state.
    checkpoint_compression: bool = False
    #: MB; 0 = no limit. Only the CuPy pool can be limited.
    memory_limit: float = 0.0
    memory_reserve: float = 0.0
    heartbeat_interval: float = 1.0
    supervisor_timeout: float = 60.0
    ack_resend: float = 5.0
    provenance: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: {"epochs": 1, "restarts": 0})
    #: Threads a CPU batch may use; 0 = every core this process may run on.
    cpu_threads: int = 0
    #: Units [first, stop) this worker computes (a shard); None = the whole job.
    unit_range: tuple[int, int] | None = None

    def threads(self) -> int:
        """cpu_threads resolved: at least 1."""
        if self.cpu_threads:
            return self.cpu_threads
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            return max(1, os.cpu_count() or 1)


_POSITIVE = ("checkpoint_interval", "heartbeat_interval", "supervisor_timeout", "ack_resend")
_NON_NEGATIVE = ("memory_limit", "memory_reserve")


def parse_settings(raw: Mapping[str, Any]) -> Settings:
    """Build Settings from a ``welcome.settings`` map (or standalone ``--set`` keys)."""
    values: dict[str, Any] = {}
    for key in _POSITIVE + _NON_NEGATIVE:
        if key in raw:
            value = raw[key]
            if not _is_number(value) or value < 0 or (key in _POSITIVE and value == 0):
                bound = "> 0" if key in _POSITIVE else ">= 0"
                raise SettingsError(f"setting {key}: expected a number {bound}, got {value!r}")
            values[key] = float(value)
    for key in ("batch_size", "cpu_threads"):
        if key in raw:
            value = raw[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SettingsError(f"setting {key}: expected an integer >= 0, got {value!r}")
            values[key] = value
    if raw.get("unit_range") is not None:
        values["unit_range"] = _parse_unit_range(raw["unit_range"])
    for key in ("batch_size_adaptive", "checkpoint_compression"):
        if key in raw:
            value = raw[key]
            if not isinstance(value, bool):
                raise SettingsError(f"setting {key}: expected a bool, got {value!r}")
            values[key] = value
    if "provenance" in raw:
        values["provenance"] = _parse_provenance(raw["provenance"])
    return Settings(**values)


def _parse_unit_range(value: Any) -> tuple[int, int]:
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok or not 0 <= value[0] < value[1]:
        raise SettingsError(f"setting unit_range: expected [first, stop) with "
                            f"0 <= first < stop, got {value!r}")
    return int(value[0]), int(value[1])


def _parse_provenance(value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise SettingsError(f"setting provenance: expected a map, got {value!r}")
    result = {"epochs": 1, "restarts": 0}
    for key in result:
        if key in value:
            count = value[key]
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise SettingsError(f"setting provenance.{key}: expected an integer >= 0, "
                                    f"got {count!r}")
            result[key] = count
    return result


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
