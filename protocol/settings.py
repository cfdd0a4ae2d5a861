"""Settings as data: each key's default, range, help and role, declared once as field
metadata of a frozen dataclass, and checked by one function.

    @dataclasses.dataclass(frozen=True)
    class WatchdogSettings:
        heartbeat_timeout: float = setting(10.0, "no message this long: unresponsive",
                                           role=Role.SUPERVISOR, low=0.5, high=3600)

    keys_of(WatchdogSettings)                   # (Key("heartbeat_timeout", ...),)
    key.check("12.5")                           # 12.5, or SettingError naming the key

The supervisor's config table (README) and its ``--set`` checks are generated from these
declarations; the two that travel on the wire live here, so that the worker reads them
from the same source: :class:`WorkerSettings` (``welcome.settings``) and
:class:`NkatParams` (the NKAT job's ``spec.params``).
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping
from typing import Any

#: The field-metadata key a declared setting is stored under.
SETTING = "nkat.setting"


class Role(enum.StrEnum):
    """Where a key acts: ``job`` keys are the job's params (they define the result),
    ``worker`` keys travel to the worker in ``welcome.settings``, ``supervisor`` keys
    tune the supervisor."""

    JOB = "job"
    WORKER = "worker"
    SUPERVISOR = "supervisor"


class SettingError(ValueError):
    """A value a key does not allow; the message names the key and what it allows."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a key allows and means (its default is the field's)."""

    help: str
    role: Role
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    seed: str | None = None  # the seed guide's name, when it has this key
    only: bool | None = None  # a bool key that must have this value (always on)
    why: str = ""  # what a refused value is told (with ``only``)


def setting(default: Any, help: str, *, role: Role, **kw: Any) -> Any:
    """A dataclass field declaring one key (see the module docstring)."""
    return dataclasses.field(default=default, metadata={SETTING: Spec(help, role, **kw)})


_KINDS: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str}


@dataclasses.dataclass(frozen=True)
class Key:
    """One key: its name, default, type and :class:`Spec`."""

    name: str
    default: Any
    kind: type
    spec: Spec
    nullable: bool = False

    @property
    def role(self) -> Role:
        return self.spec.role

    @property
    def help(self) -> str:
        return self.spec.help

    def allowed(self) -> str:
        """What the key allows, in words ("an integer in [1, 100]")."""
        s = self.spec
        if s.choices:
            return "one of " + ", ".join(s.choices)
        if self.kind is bool:
            return "true or false" if s.only is None else f"{str(s.only).lower()} only"
        what = {int: "an integer", float: "a number"}.get(self.kind, "text")
        if self.kind in (int, float):
            lo = "-inf" if s.low is None else _fmt(s.low)
            hi = "inf" if s.high is None else _fmt(s.high)
            what += f" in [{lo}, {hi}]"
        return what + (" or null" if self.nullable else "")

    def check(self, raw: Any, *, text: bool = True) -> Any:
        """``raw`` as this key's value (with ``text``, a string is first read as ``--set``
        text: "12" is 12); SettingError if the key does not allow it."""
        value = parse_text(raw) if text and isinstance(raw, str) and self.kind is not str \
            else raw
        if value is None:
            if self.nullable:
                return None
            raise SettingError(self.name, f"{self.name}: must be {self.allowed()}, got null")
        bad = SettingError(self.name, f"{self.name}: must be {self.allowed()}, got "
                                      f"{_shown(raw)}")
        s = self.spec
        if self.kind is bool:
            if not isinstance(value, bool):
                raise bad
            if s.only is not None and value is not s.only:
                raise SettingError(self.name, f"{self.name}: must be {self.allowed()}, got "
                                              f"{_shown(raw)}: {s.why}")
            return value
        if self.kind is str:
            if not isinstance(value, str) or (s.choices and value not in s.choices):
                raise bad
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        if self.kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise bad
            value = int(value)
        else:
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise bad
        if (s.low is not None and value < s.low) or (s.high is not None and value > s.high):
            raise bad
        return value


def keys_of(cls: type) -> tuple[Key, ...]:
    """The declared keys of a settings dataclass, in field order."""
    keys = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(SETTING)
        if spec is None:
            continue
        annotation = str(f.type).replace(" ", "")
        nullable = annotation.endswith("|None")
        kind = _KINDS[annotation.removesuffix("|None")]
        keys.append(Key(f.name, f.default, kind, spec, nullable))
    return tuple(keys)


def build(cls: type[Any], raw: Mapping[str, Any], *, strict: bool = False) -> Any:
    """An instance of ``cls`` from typed values (a wire map: no text is parsed), each
    declared key checked (missing ones keep their defaults); with ``strict``, an unknown
    key is an error too."""
    keys = {k.name: k for k in keys_of(cls)}
    if strict:
        unknown = sorted(set(raw) - set(keys))
        if unknown:
            raise SettingError(unknown[0], f"unknown param {unknown[0]!r}; allowed: "
                                           f"{', '.join(sorted(keys))}")
    return cls(**{name: key.check(raw[name], text=False) for name, key in keys.items()
                  if name in raw})


def split_assignment(option: str) -> tuple[str, str]:
    """``KEY=VALUE`` (a ``--set`` option) as (key, value text); SettingError if malformed."""
    name, sep, value = option.partition("=")
    name = name.strip()
    if not sep or not name:
        raise SettingError(name, f"--set {option!r}: expected KEY=VALUE")
    return name, value


def parse_text(text: str) -> Any:
    """A ``--set`` value: true/false/null words, JSON, else the text itself."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered in ("null", "none", ""):
        return None
    if len(text) > 64:  # no key takes a long number or a structure: keep it as text
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _shown(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= 80 else text[:77] + "..."


# The settings that travel on the wire ------------------------------------------------------
W = Role.WORKER


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    """``welcome.settings``: how the worker runs (never what it computes)."""

    checkpoint_interval: float = setting(
        30.0, "seconds between checkpoints", role=W, low=0.01, high=86400,
        seed="checkpoint_interval")
    checkpoint_compression: bool = setting(
        False, "zlib-compress the job's snapshot in each checkpoint (for large, compressible "
        "states)", role=W, seed="checkpoint_compression")
    batch_size: int = setting(
        0, "units per batch to start with (0: the job's default)", role=W, low=0, high=2**31,
        seed="batch_size")
    batch_size_adaptive: bool = setting(
        True, "grow/shrink batches by throughput and memory", role=W,
        seed="batch_size_adaptive")
    memory_limit: int = setting(
        0, "GPU memory pool limit in MB (0: no limit)", role=W, low=0, high=2**31,
        seed="memory_limit")
    memory_reserve: int = setting(
        1024, "MB of GPU memory left free for others", role=W, low=0, high=2**31,
        seed="memory_reserve")
    heartbeat_interval: float = setting(
        1.0, "seconds between heartbeats", role=W, low=0.05, high=60)
    supervisor_timeout: float = setting(
        60.0, "seconds an unacknowledged checkpoint may wait before the worker gives up",
        role=W, low=1, high=3600)
    ack_resend: float = setting(
        5.0, "seconds before an unacknowledged message is resent", role=W, low=0.1, high=600)
    cpu_threads: int = setting(
        0, "threads a CPU batch may use (0: every core this process may run on); the result "
        "is the same bytes for any count", role=W, low=0, high=4096)


J = Role.JOB
#: The largest N the NKAT job computes (float64 keeps N exact far beyond it).
NKAT_MAX_DIMENSION = 10**15


@dataclasses.dataclass(frozen=True)
class NkatParams:
    """The NKAT job's params (``spec.params``): they define the result."""

    min_dimension: int = setting(1, "smallest N of the NKAT analysis", role=J, low=1,
                                 high=NKAT_MAX_DIMENSION)
    max_dimension: int = setting(100000, "largest N (inclusive)", role=J, low=1,
                                 high=NKAT_MAX_DIMENSION, seed="max_dimension / max_N")
    precision_mode: str = setting(
        "balanced", "float32, float64, or float64 + mpmath check", role=J,
        choices=("speed", "balanced", "precision"), seed="precision_mode")
    unit_dims: int = setting(65536, "dimensions per unit (fixed by the spec: part of the "
                                    "result)", role=J, low=1, high=2**24)
    curve_points: int = setting(512, "points of the downsampled S(N) curve", role=J, low=2,
                                high=65536)
    mpmath_samples: int = setting(64, "N sampled for the 256-bit mpmath check (precision "
                                      "mode)", role=J, low=1, high=4096)

    def __post_init__(self) -> None:
        if self.min_dimension > self.max_dimension:
            raise SettingError("min_dimension", "min_dimension must not exceed max_dimension "
                                                f"({self.min_dimension} > {self.max_dimension})")
