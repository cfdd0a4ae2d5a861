"""Policy settings built from the flat run config: one attribute per config key.

    settings = WatchdogSettings.from_config(config)    # config: any Mapping of flat keys

Each policy's settings dataclass names its fields exactly like the config keys, so the
mapping is by name; a field the config does not have keeps its default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Self


class FromConfig:
    """Mixin for the frozen settings dataclasses of the policies."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        return cls(**{name: config[name] for name in names if name in config})
