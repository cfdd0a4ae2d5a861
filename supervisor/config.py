"""Configuration: the flat, seed-style keys, their defaults, ranges and sources.

Values come from, in rising precedence: the defaults, a TOML file (``--config``), and
``--set key=value`` options. Every key is declared once, as a field of a settings
dataclass with its default, range, help and role (``nkat.protocol.settings``): the
policies' own (``policies/``), the wire's (worker settings, NKAT params) and the few
below. The table (``KEYS``) and README's copy are generated from those declarations; an
unknown key or a value out of range is a ``ConfigError`` naming the key and what it
allows.

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
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from nkat.protocol.messages import ProtocolError, Welcome, decode, encode
from nkat.protocol.settings import (
    Key,
    NkatParams,
    Role,
    SettingError,
    WorkerSettings,
    keys_of,
    parse_text,
    setting,
    split_assignment,
)
from nkat.supervisor.cluster.settings import RaySettings
from nkat.supervisor.notify import NotifySettings
from nkat.supervisor.policies.kill_sequence import KillSettings
from nkat.supervisor.policies.resources import ResourceSettings
from nkat.supervisor.policies.restart_policy import RestartSettings
from nkat.supervisor.policies.thermal import ThermalSettings
from nkat.supervisor.policies.watchdog import WatchdogSettings
from nkat.supervisor.preemption import PreemptionSettings


class ConfigError(ValueError):
    """A config file or option that cannot be used; the message names the key."""


NKAT_JOB = "nkat-highdim"
#: A config file larger than this is refused unread (a config is a few flat keys).
MAX_CONFIG_BYTES = 1 << 20
#: ``--set params.NAME=VALUE`` passes NAME straight to a custom job's params.
PARAM_PREFIX = "params."
_SUP = Role.SUPERVISOR


@dataclasses.dataclass(frozen=True)
class JobChoice:
    """Which job runs, and on what."""

    job: str = setting(NKAT_JOB, "job to run: a built-in name or module:Class", role=Role.JOB)
    backend: str = setting("auto", "array backend for the worker (auto is resolved once, at "
                                   "the run's first start)", role=Role.WORKER,
                           choices=("auto", "numpy", "cupy"))


@dataclasses.dataclass(frozen=True)
class DurabilitySettings:
    """The WAL's knobs."""

    backup_checkpoints: int = setting(3, "checkpoints kept in the WAL", role=_SUP, low=1,
                                      high=1000, seed="backup_checkpoints")
    checkpoint_verification: bool = setting(
        True, "always on: CRC32C per record, SHA-256 per checkpoint, checked on write, resume, "
        "verify", role=_SUP, seed="checkpoint_verification", only=True,
        why="a checkpoint is never trusted unchecked; verification cannot be turned off")
    segment_size: int = setting(64 * 1024 * 1024, "WAL segment size in bytes", role=_SUP,
                                low=64 * 1024, high=2**34)


@dataclasses.dataclass(frozen=True)
class GpuSettings:
    """Which GPU is watched, and how often."""

    gpu_index: int = setting(0, "which GPU (NVML index): the sensor watches it, the worker "
                                "computes on it", role=_SUP, low=0, high=63)
    gpus: str | None = setting(None, "several GPUs for one run: all, a count (the first N) "
                                     "or NVML indices such as 0,2,3; the run is cut into "
                                     "shards, several per GPU (null: one GPU, gpu_index)",
                               role=_SUP)
    gpu_poll_interval: float = setting(1.0, "seconds between GPU readings", role=_SUP,
                                       low=0.05, high=60)
    gpu_log_interval: float = setting(10.0, "seconds between gpu.reading log events (what "
                                            "report plots)", role=_SUP, low=0.1, high=86400)


@dataclasses.dataclass(frozen=True)
class OperatorSettings:
    """What the operator sees: the log, the metrics endpoint and the status page."""

    log_max_bytes: int = setting(16 * 1024 * 1024, "rotate the JSON log at this size",
                                 role=_SUP, low=4096, high=2**40)
    log_backups: int = setting(5, "rotated JSON logs kept", role=_SUP, low=0, high=1000)
    metrics_addr: str | None = setting(None, "serve Prometheus metrics on this loopback "
                                             "host:port", role=_SUP)
    http_addr: str | None = setting(None, "serve this run's read-only status page on "
                                          "host:port (loopback, unless http_token_file is "
                                          "set)", role=_SUP)
    http_token_file: str | None = setting(None, "file holding the token a reader of the "
                                                "status page must present (at least 16 of "
                                                "A-Z a-z 0-9 . _ ~ -); required when "
                                                "http_addr is not loopback", role=_SUP)


#: Every settings dataclass whose declared fields are config keys, in the table's order.
SOURCES: tuple[type, ...] = (JobChoice, NkatParams, WorkerSettings, WatchdogSettings,
                             KillSettings, RestartSettings, DurabilitySettings,
                             ThermalSettings, ResourceSettings, GpuSettings, OperatorSettings,
                             NotifySettings, PreemptionSettings, RaySettings)

KEYS: tuple[Key, ...] = tuple(k for cls in SOURCES for k in keys_of(cls))
KEY_BY_NAME: dict[str, Key] = {k.name: k for k in KEYS}
#: The NKAT job's params, which the built-in job's spec is made of.
NKAT_PARAM_NAMES = tuple(k.name for k in keys_of(NkatParams))


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

    def role(self, role: Role) -> dict[str, Any]:
        return {k.name: self.settings[k.name] for k in KEYS if k.role is role}

    def job_spec(self) -> dict[str, Any]:
        """The spec a run is identified by: the job and its params.

        The built-in NKAT job takes the job keys of the table; another job takes only
        ``params.NAME`` keys (``--set params.n=1000``, or a ``[params]`` table).
        """
        job = self.settings["job"]
        params = {k: self.settings[k] for k in NKAT_PARAM_NAMES} if job == NKAT_JOB else {}
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
        return parse_text(raw) if isinstance(raw, str) else raw  # the job validates it
    key = KEY_BY_NAME.get(name)
    if key is None:
        raise ConfigError(unknown_key_message(name))
    try:
        return key.check(raw)
    except SettingError as exc:
        raise ConfigError(str(exc)) from None


def check_relations(values: Mapping[str, Any]) -> None:
    """Rules between keys, each named in the message."""
    try:
        NkatParams(**{k: values[k] for k in NKAT_PARAM_NAMES})
    except SettingError as exc:
        raise ConfigError(str(exc)) from None
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
    if values["engine"] == "ray" and values["ray_lease"] >= values["supervisor_timeout"]:
        raise ConfigError(f"ray_lease ({values['ray_lease']}) must be shorter than "
                          f"supervisor_timeout ({values['supervisor_timeout']}): a Ray node "
                          "waits that long for the driver before its worker gives up waiting")
    addr = values["metrics_addr"]
    if addr is not None:
        host, _, port = addr.rpartition(":")
        if host not in ("127.0.0.1", "localhost", "[::1]", "::1") or not port.isdigit() \
                or not 0 < int(port) < 65536:
            raise ConfigError(f"metrics_addr: must be a loopback host:port such as "
                              f"127.0.0.1:9108, got {addr!r}")
    if values["http_addr"] is not None or values["http_token_file"] is not None:
        from nkat.supervisor.web.access import AccessError, listen_token

        try:  # reads the token file: a missing or weak token is a config error, exit 2
            listen_token(values["http_addr"] or "127.0.0.1:0", values["http_token_file"],
                         "http_addr")
        except AccessError as exc:
            raise ConfigError(str(exc)) from None
    # Each settings class checks its own fields together too (its __post_init__).
    for cls in SOURCES:
        names = [f.name for f in dataclasses.fields(cls) if f.name in values]
        try:
            cls(**{name: values[name] for name in names})
        except (ValueError, TypeError) as exc:
            raise ConfigError(str(exc)) from None


def check_wire(config: Config) -> None:
    """ConfigError unless the run's spec and worker settings fit in a ``welcome`` the
    worker can decode (the wire's size, depth and count limits)."""
    welcome = Welcome(epoch=1, run_id="r" * 64, spec=config.job_spec(),
                      settings=config.role(Role.WORKER), resume=None)
    try:
        decode(encode(welcome))
    except (ProtocolError, ValueError, TypeError, OverflowError) as exc:
        raise ConfigError(f"the job's spec cannot travel to the worker: {str(exc)[:300]} "
                          "(params must be a few plain values)") from None


def defaults() -> Config:
    return Config({k.name: k.default for k in KEYS}, dict.fromkeys(KEY_BY_NAME, "default"))


def parse_set_options(options: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings from ``--set`` into a dict; ConfigError on a bad one."""
    out: dict[str, str] = {}
    for option in options:
        try:
            name, value = split_assignment(option)
        except SettingError as exc:
            raise ConfigError(str(exc)) from None
        if name not in KEY_BY_NAME and not name.startswith(PARAM_PREFIX):
            raise ConfigError(unknown_key_message(name))
        out[name] = value
    return out


def read_toml(path: Path) -> dict[str, Any]:
    """A config file's flat keys. Tables are allowed for grouping and are flattened."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path}: larger than {MAX_CONFIG_BYTES} bytes; a "
                          "config is a few flat keys")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
    except (ValueError, RecursionError) as exc:  # a 5,000-digit integer, deep nesting
        raise ConfigError(f"config file {path}: cannot be read as a config: "
                          f"{type(exc).__name__}: {str(exc)[:200]}") from None
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
