"""Configuration: the flat, seed-style keys, their defaults, ranges and sources.

Values come from, in rising precedence: the defaults below, a TOML file (``--config``),
and ``--set key=value`` options. Every key is known here once; an unknown key or a
value out of range is a ``ConfigError`` naming the key and what it allows.

    cfg = load_config(Path("run.toml"), ["max_dimension=1000000"])
    cfg["checkpoint_interval"]       # 30.0
    cfg.source("max_dimension")      # "--set"

Each key has a *role*: ``job`` keys form the job's params (they define the result),
``worker`` keys travel to the worker in ``welcome.settings``, ``supervisor`` keys tune
the supervisor's own policies.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file or option that cannot be used; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Key:
    name: str
    default: Any
    kind: type
    role: str  # "job" | "worker" | "supervisor"
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    seed: str | None = None  # the seed guide's name, when it has this key
    nullable: bool = False
    only: bool | None = None  # a bool key that must have this value (always on)
    why: str = ""  # what a refused value is told (with ``only``)

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind is bool:
            return "true or false" if self.only is None else f"{str(self.only).lower()} only"
        lo = "-inf" if self.low is None else _fmt(self.low)
        hi = "inf" if self.high is None else _fmt(self.high)
        what = "an integer" if self.kind is int else "a number" if self.kind is float else "text"
        if self.kind in (int, float):
            what += f" in [{lo}, {hi}]"
        return what + (" or null" if self.nullable else "")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _k(name: str, default: Any, kind: type, role: str, help: str, **kw: Any) -> Key:
    return Key(name, default, kind, role, help, **kw)


NKAT_JOB = "nkat-highdim"
#: ``--set params.NAME=VALUE`` passes NAME straight to a custom job's params.
PARAM_PREFIX = "params."

KEYS: tuple[Key, ...] = (
    # The job (its params define the result) -------------------------------------------
    _k("job", NKAT_JOB, str, "job", "job to run: a built-in name or module:Class"),
    _k("min_dimension", 1, int, "job", "smallest N of the NKAT analysis", low=1, high=2**62),
    _k("max_dimension", 100000, int, "job", "largest N (inclusive)", low=1, high=2**62,
       seed="max_dimension / max_N"),
    _k("precision_mode", "balanced", str, "job", "float32, float64, or float64 + mpmath check",
       choices=("speed", "balanced", "precision"), seed="precision_mode"),
    _k("unit_dims", 65536, int, "job",
       "dimensions per unit (fixed by the spec: part of the result)", low=1, high=2**24),
    _k("curve_points", 512, int, "job", "points of the downsampled S(N) curve", low=2, high=65536),
    _k("mpmath_samples", 64, int, "job", "N sampled for the 256-bit mpmath check (precision mode)",
       low=1, high=4096),
    # The worker -----------------------------------------------------------------------
    _k("backend", "auto", str, "worker", "array backend for the worker",
       choices=("auto", "numpy", "cupy")),
    _k("checkpoint_interval", 30.0, float, "worker", "seconds between checkpoints",
       low=0.01, high=86400, seed="checkpoint_interval"),
    _k("checkpoint_compression", False, bool, "worker",
       "zlib-compress the job's snapshot in each checkpoint (for large, compressible states)",
       seed="checkpoint_compression"),
    _k("batch_size", 0, int, "worker", "units per batch to start with (0: the job's default)",
       low=0, high=2**31, seed="batch_size"),
    _k("batch_size_adaptive", True, bool, "worker", "grow/shrink batches by throughput and memory",
       seed="batch_size_adaptive"),
    _k("memory_limit", 0, int, "worker", "GPU memory pool limit in MB (0: no limit)",
       low=0, high=2**31, seed="memory_limit"),
    _k("memory_reserve", 1024, int, "worker", "MB of GPU memory left free for others",
       low=0, high=2**31, seed="memory_reserve"),
    _k("heartbeat_interval", 1.0, float, "worker", "seconds between heartbeats",
       low=0.05, high=60),
    _k("supervisor_timeout", 60.0, float, "worker",
       "seconds an unacknowledged checkpoint may wait before the worker gives up",
       low=1, high=3600),
    _k("ack_resend", 5.0, float, "worker", "seconds before an unacknowledged message is resent",
       low=0.1, high=600),
    # Liveness and restarts --------------------------------------------------------------
    _k("heartbeat_timeout", 10.0, float, "supervisor", "no message this long: unresponsive",
       low=0.5, high=3600),
    _k("stall_timeout_min", 30.0, float, "supervisor", "floor of the adaptive stall deadline",
       low=0.5, high=86400),
    _k("stall_timeout_max", 600.0, float, "supervisor", "cap of the adaptive stall deadline",
       low=0.5, high=86400),
    _k("stall_factor", 10.0, float, "supervisor", "stall deadline = factor x p99 batch time",
       low=1, high=1000),
    _k("startup_timeout", 120.0, float, "supervisor", "start-up and first batch deadline",
       low=1, high=86400),
    _k("stop_deadline", 10.0, float, "supervisor", "seconds a worker has to obey cmd stop",
       low=0.1, high=3600),
    _k("term_grace", 5.0, float, "supervisor", "seconds between SIGTERM and SIGKILL",
       low=0.1, high=3600),
    _k("kill_confirm", 5.0, float, "supervisor",
       "seconds after SIGKILL for the worker and its GPU context to be gone (else kill_failed)",
       low=0.1, high=3600),
    _k("restart_delay", 0.25, float, "supervisor", "first restart backoff (s)", low=0, high=3600),
    _k("restart_delay_max", 60.0, float, "supervisor", "largest restart backoff (s)",
       low=0, high=86400),
    _k("max_restarts", 5, int, "supervisor", "restarts allowed in restart_window",
       low=0, high=10000),
    _k("restart_window", 600.0, float, "supervisor", "crash-loop window (s)", low=1, high=864000),
    _k("stable_after", 60.0, float, "supervisor", "uptime after which backoff resets (s)",
       low=0, high=86400),
    _k("poison_after", 3, int, "supervisor", "deaths before passing one checkpoint = poison",
       low=1, high=1000),
    # Durability ----------------------------------------------------------------------
    _k("backup_checkpoints", 3, int, "supervisor", "checkpoints kept in the WAL",
       low=1, high=1000, seed="backup_checkpoints"),
    _k("checkpoint_verification", True, bool, "supervisor",
       "always on: CRC32C per record, SHA-256 per checkpoint, checked on write, resume, verify",
       seed="checkpoint_verification", only=True,
       why="a checkpoint is never trusted unchecked; verification cannot be turned off"),
    _k("segment_size", 64 * 1024 * 1024, int, "supervisor", "WAL segment size in bytes",
       low=64 * 1024, high=2**34),
    # GPU health ---------------------------------------------------------------------
    _k("target_temperature", 75.0, float, "supervisor", "resume/unthrottle at or below (C)",
       low=20, high=120, seed="target_temperature"),
    _k("thermal_throttle_temp", 80.0, float, "supervisor", "throttle at or above (C)",
       low=20, high=120, seed="thermal_throttle_temp"),
    _k("max_temperature", 83.0, float, "supervisor", "checkpoint, stop and cool down at (C)",
       low=20, high=120, seed="max_temperature"),
    _k("emergency_temp", 85.0, float, "supervisor", "kill at once at (C)",
       low=20, high=130, seed="emergency_temp"),
    _k("thermal_samples", 3, int, "supervisor", "consecutive readings before escalating",
       low=1, high=100),
    _k("thermal_dwell", 60.0, float, "supervisor", "seconds at or below target before resuming",
       low=0, high=86400),
    _k("power_limit", None, float, "supervisor", "warn at 95% of this many watts",
       low=1, high=100000, seed="power_limit", nullable=True),
    _k("memory_high_water", 0.95, float, "supervisor",
       "GPU memory fraction at which the worker is told to free memory", low=0.5, high=1.0),
    _k("leak_rss_growth_mb", 1024, int, "supervisor",
       "worker RSS growth (MB) within leak_window that triggers a planned restart",
       low=1, high=2**31),
    _k("leak_window", 600.0, float, "supervisor", "window (s) for leak_rss_growth_mb",
       low=1, high=864000),
    _k("gpu_index", 0, int, "supervisor",
       "which GPU (NVML index): the sensor watches it, the worker computes on it",
       low=0, high=63),
    _k("gpu_poll_interval", 1.0, float, "supervisor", "seconds between GPU readings",
       low=0.05, high=60),
    _k("gpu_log_interval", 10.0, float, "supervisor",
       "seconds between gpu.reading log events (what report plots)", low=0.1, high=86400),
    # Operator -------------------------------------------------------------------------
    _k("log_max_bytes", 16 * 1024 * 1024, int, "supervisor", "rotate the JSON log at this size",
       low=4096, high=2**40),
    _k("log_backups", 5, int, "supervisor", "rotated JSON logs kept", low=0, high=1000),
    _k("metrics_addr", None, str, "supervisor",
       "serve Prometheus metrics on this loopback host:port", nullable=True),
)

KEY_BY_NAME: dict[str, Key] = {k.name: k for k in KEYS}


class Config(Mapping[str, Any]):
    """The resolved config: every key, its value and where the value came from."""

    def __init__(self, values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
        self.settings = dict(values)
        self.sources = dict(sources)

    def __getitem__(self, name: str) -> Any:
        return self.settings[name]

    def __iter__(self) -> Any:
        return iter(self.settings)

    def __len__(self) -> int:
        return len(self.settings)

    def source(self, name: str) -> str:
        return self.sources[name]

    def role(self, role: str) -> dict[str, Any]:
        return {k.name: self.settings[k.name] for k in KEYS if k.role == role}

    def job_spec(self) -> dict[str, Any]:
        """The spec a run is identified by: the job and its params.

        The built-in NKAT job takes the job keys of the table; another job takes only
        ``params.NAME`` keys (``--set params.n=1000``, or a ``[params]`` table).
        """
        job = self.settings["job"]
        if job == NKAT_JOB:
            params = {k: v for k, v in self.role("job").items() if k != "job"}
        else:
            params = {}
        params.update({k[len(PARAM_PREFIX):]: v for k, v in self.settings.items()
                       if k.startswith(PARAM_PREFIX)})
        return {"job": job, "params": params}

    def with_overrides(self, overrides: Mapping[str, Any], source: str) -> Config:
        values, sources = dict(self.settings), dict(self.sources)
        for name, raw in overrides.items():
            values[name] = coerce(name, raw)
            sources[name] = source
        check_relations(values)
        return Config(values, sources)


def unknown_key_message(name: str) -> str:
    near = difflib.get_close_matches(name, KEY_BY_NAME, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"unknown config key {name!r}{hint}"


def coerce(name: str, raw: Any) -> Any:
    """Check one value against its key (converting text from --set); ConfigError if bad."""
    if name.startswith(PARAM_PREFIX) and len(name) > len(PARAM_PREFIX):
        return _parse_text(raw) if isinstance(raw, str) else raw  # the job validates it
    key = KEY_BY_NAME.get(name)
    if key is None:
        raise ConfigError(unknown_key_message(name))
    value = _parse_text(raw) if isinstance(raw, str) and key.kind is not str else raw
    if value is None:
        if key.nullable:
            return None
        raise ConfigError(f"{name}: must be {key.allowed()}, got null")
    bad = ConfigError(f"{name}: must be {key.allowed()}, got {raw!r}")
    if key.kind is bool:
        if not isinstance(value, bool):
            raise bad
        if key.only is not None and value is not key.only:
            raise ConfigError(f"{name}: must be {key.allowed()}, got {raw!r}: {key.why}")
        return value
    if key.kind is str:
        if not isinstance(value, str):
            raise bad
        if key.choices and value not in key.choices:
            raise bad
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    if key.kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise bad
        value = int(value)
    else:
        value = float(value)
        if value != value:  # NaN
            raise bad
    if (key.low is not None and value < key.low) or (key.high is not None and value > key.high):
        raise bad
    return value


def _parse_text(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered in ("null", "none", ""):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def check_relations(values: Mapping[str, Any]) -> None:
    """Rules between keys, each named in the message."""
    if values["min_dimension"] > values["max_dimension"]:
        raise ConfigError("min_dimension must not exceed max_dimension "
                          f"({values['min_dimension']} > {values['max_dimension']})")
    temps = ("target_temperature", "thermal_throttle_temp", "max_temperature", "emergency_temp")
    for low, high in zip(temps, temps[1:], strict=False):
        if values[low] > values[high]:
            raise ConfigError(f"{low} ({values[low]}) must not exceed {high} ({values[high]})")
    if values["target_temperature"] >= values["thermal_throttle_temp"]:
        raise ConfigError("target_temperature must be below thermal_throttle_temp "
                          "(the gap is the hysteresis that stops throttling from flapping)")
    if values["stall_timeout_min"] > values["stall_timeout_max"]:
        raise ConfigError("stall_timeout_min must not exceed stall_timeout_max")
    if values["restart_delay"] > values["restart_delay_max"]:
        raise ConfigError("restart_delay must not exceed restart_delay_max")
    if values["heartbeat_timeout"] < 2 * values["heartbeat_interval"]:
        raise ConfigError(f"heartbeat_timeout ({values['heartbeat_timeout']}) must be at least "
                          f"twice heartbeat_interval ({values['heartbeat_interval']}), or every "
                          "worker would look unresponsive")
    if values["ack_resend"] >= values["supervisor_timeout"]:
        raise ConfigError("ack_resend must be shorter than supervisor_timeout")
    addr = values["metrics_addr"]
    if addr is not None:
        host, _, port = addr.rpartition(":")
        if host not in ("127.0.0.1", "localhost", "[::1]", "::1") or not port.isdigit() \
                or not 0 < int(port) < 65536:
            raise ConfigError(f"metrics_addr: must be a loopback host:port such as "
                              f"127.0.0.1:9108, got {addr!r}")


def defaults() -> Config:
    return Config({k.name: k.default for k in KEYS}, {k.name: "default" for k in KEYS})


def parse_set_options(options: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings from ``--set`` into a dict; ConfigError on a bad one."""
    out: dict[str, str] = {}
    for option in options:
        name, sep, value = option.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"--set {option!r}: expected KEY=VALUE")
        if name not in KEY_BY_NAME and not name.startswith(PARAM_PREFIX):
            raise ConfigError(unknown_key_message(name))
        out[name] = value
    return out


def read_toml(path: Path) -> dict[str, Any]:
    """A config file's flat keys. Tables are allowed for grouping and are flattened."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc.strerror}") from None
    flat: dict[str, Any] = {}
    for name, value in data.items():
        if name == "params" and isinstance(value, dict):
            flat.update({PARAM_PREFIX + k: v for k, v in value.items()})
        elif isinstance(value, dict):
            flat.update(value)
        else:
            flat[name] = value
    for name in flat:
        if name not in KEY_BY_NAME and not name.startswith(PARAM_PREFIX):
            raise ConfigError(f"config file {path}: {unknown_key_message(name)}")
    return flat


def load_config(path: Path | None, set_options: Iterable[str] = (),
                extra: Mapping[str, Any] | None = None) -> Config:
    """Defaults, then the file, then ``--set``, then ``extra`` (explicit CLI flags)."""
    cfg = defaults()
    if path is not None:
        try:
            cfg = cfg.with_overrides(read_toml(path), f"file {path.name}")
        except ConfigError as exc:
            msg = str(exc)
            raise ConfigError(msg if str(path) in msg else f"config file {path}: {msg}") from None
    cfg = cfg.with_overrides(parse_set_options(set_options), "--set")
    if extra:
        cfg = cfg.with_overrides(extra, "option")
    return cfg
