"""The runtime settings a worker receives in ``welcome`` (docs/architecture.md, "Settings").

Parsed once into a frozen :class:`Settings`. Keys the worker does not use are ignored
(the supervisor's config has many); a known key of the wrong type or range is an error
that names the key. The keys, defaults and ranges are declared once, in
``nkat.protocol.settings.WorkerSettings``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from nkat.protocol.settings import SettingError, WorkerSettings, build


class SettingsError(ValueError):
    """A setting has the wrong type or is out of range."""


@dataclasses.dataclass(frozen=True)
class Settings(WorkerSettings):
    """The declared worker settings (``nkat.protocol.settings.WorkerSettings``: defaults,
    ranges and help in one place, read by the supervisor's config too), plus what the
    supervisor sets per epoch."""

    provenance: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: {"epochs": 1, "restarts": 0, "backends": []})
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


def parse_settings(raw: Mapping[str, Any]) -> Settings:
    """Build Settings from a ``welcome.settings`` map (or standalone ``--set`` keys)."""
    try:
        declared = build(WorkerSettings, raw)
    except SettingError as exc:
        raise SettingsError(f"setting {exc}") from None
    values = {f.name: getattr(declared, f.name) for f in dataclasses.fields(WorkerSettings)}
    if raw.get("unit_range") is not None:
        values["unit_range"] = _parse_unit_range(raw["unit_range"])
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


def _parse_provenance(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise SettingsError(f"setting provenance: expected a map, got {value!r}")
    result: dict[str, Any] = {"epochs": 1, "restarts": 0}
    for key in ("epochs", "restarts"):
        if key in value:
            count = value[key]
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise SettingsError(f"setting provenance.{key}: expected an integer >= 0, "
                                    f"got {count!r}")
            result[key] = count
    backends = value.get("backends", [])
    if not isinstance(backends, list) or not all(isinstance(b, str) for b in backends):
        raise SettingsError(f"setting provenance.backends: expected a list of names, got "
                            f"{backends!r}")
    result["backends"] = list(backends)
    return result
