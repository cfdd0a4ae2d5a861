"""The wire messages between supervisor and worker (docs/architecture.md, "Conversation").

Every message is a frozen dataclass; ``encode`` turns one into msgpack bytes and
``decode`` turns bytes back into a message or raises :class:`ProtocolError`, the one
typed error for anything malformed, oversized, of unknown type or of another version.

    raw = encode(Beat(epoch=3, seq=1, progress_seq=7, units_done=70, units_total=1000,
                      stage="compute", t_mono=12.5, metrics={}))
    msg = decode(raw)          # -> Beat(...), or ProtocolError

On the wire a message is a msgpack map ``{"v": PROTOCOL_VERSION, "t": <type>,
"epoch": <int>, ...fields}``. Decoding uses hard limits and no ext types, then checks
every field against the dataclass's annotation; a decoded message is always well typed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any, ClassVar, Union

import msgpack

PROTOCOL_VERSION = 1

#: ``ack{ckpt_seq: DONE_ACK_SEQ}`` acknowledges ``done`` (checkpoint seqs start at 1).
DONE_ACK_SEQ = 0

#: Largest encoded message accepted (the worker socket sets ZMQ_MAXMSGSIZE to this too).
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_STR_LEN = 4 * 1024 * 1024
MAX_ARRAY_LEN = 1_000_000
MAX_MAP_LEN = 100_000
MAX_DEPTH = 32

JsonValue = Any  # nested dict/list/str/int/float/bool/None; checked by _check_plain


class ProtocolError(ValueError):
    """A message that is malformed, oversized, of unknown type or of another version."""


def state_digest(state: bytes) -> str:
    """The digest a checkpoint or result carries: SHA-256 of its bytes, hex."""
    return hashlib.sha256(state).hexdigest()


def canonical_json(value: Any) -> str:
    """The one spelling of a result (``done.digest`` is over it) or a spec."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def result_digest(result: Any) -> str:
    """The digest ``done`` carries: SHA-256 of the result's canonical JSON."""
    return state_digest(canonical_json(result).encode())


def spec_hash(spec: Any) -> str:
    """A run's identity: the first 16 hex digits of SHA-256 of its spec's canonical JSON."""
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Message:
    """Base of every message: the worker incarnation (epoch) it belongs to."""

    TYPE: ClassVar[str] = ""
    epoch: int


# Worker -> supervisor ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hello(Message):
    TYPE: ClassVar[str] = "hello"
    token: str
    pid: int
    job: str
    proto: int
    backend: str
    device: str


@dataclasses.dataclass(frozen=True)
class Beat(Message):
    """Sent about once a second by a background thread, carrying the main loop's
    progress counter: liveness is judged from arrival, progress from progress_seq."""

    TYPE: ClassVar[str] = "beat"
    seq: int
    progress_seq: int
    units_done: int
    units_total: int
    stage: str
    t_mono: float
    metrics: dict[str, JsonValue]


@dataclasses.dataclass(frozen=True)
class Extend(Message):
    """The next step is known to be long: lengthen the progress deadline once."""

    TYPE: ClassVar[str] = "extend"
    seconds: float
    reason: str


@dataclasses.dataclass(frozen=True)
class Ckpt(Message):
    TYPE: ClassVar[str] = "ckpt"
    ckpt_seq: int
    units_done: int
    state: bytes
    digest: str


@dataclasses.dataclass(frozen=True)
class Done(Message):
    TYPE: ClassVar[str] = "done"
    result: dict[str, JsonValue]
    digest: str


@dataclasses.dataclass(frozen=True)
class Fail(Message):
    TYPE: ClassVar[str] = "fail"
    kind: str
    message: str
    traceback: str
    fatal: bool


@dataclasses.dataclass(frozen=True)
class Log(Message):
    TYPE: ClassVar[str] = "log"
    level: str
    event: str
    fields: dict[str, JsonValue]


# Supervisor -> worker ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Resume:
    """The checkpoint a new worker restores (part of ``welcome``)."""

    ckpt_seq: int
    units_done: int
    state: bytes


@dataclasses.dataclass(frozen=True)
class Welcome(Message):
    TYPE: ClassVar[str] = "welcome"
    run_id: str
    spec: dict[str, JsonValue]
    settings: dict[str, JsonValue]
    resume: Resume | None


@dataclasses.dataclass(frozen=True)
class Ack(Message):
    """Sent only after the checkpoint's WAL record is durable."""

    TYPE: ClassVar[str] = "ack"
    ckpt_seq: int


CMD_OPS = frozenset({"checkpoint_now", "throttle", "pause", "resume", "free_memory", "stop"})


@dataclasses.dataclass(frozen=True)
class Cmd(Message):
    """An order to the worker. ``throttle`` needs ``args["duty"]`` in (0, 1];
    ``stop`` needs ``args["deadline_s"]`` > 0; the other ops take no arguments."""

    TYPE: ClassVar[str] = "cmd"
    op: str
    args: dict[str, JsonValue] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_cmd(self.op, self.args)


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Hello, Beat, Extend, Ckpt, Done, Fail, Log, Welcome, Ack, Cmd)
}

WorkerMessage = Hello | Beat | Extend | Ckpt | Done | Fail | Log
SupervisorMessage = Welcome | Ack | Cmd


# Encoding ------------------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """Encode a message; the result always decodes back to an equal message."""
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": msg.TYPE}
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if isinstance(value, Resume):
            value = dataclasses.asdict(value)
        body[f.name] = value
    data: bytes = msgpack.packb(body, use_bin_type=True)
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{msg.TYPE} message of {len(data)} bytes exceeds the limit")
    return data


def decode(data: bytes) -> Message:
    """Decode and validate one message, or raise ProtocolError (and nothing else)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("message is not bytes")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the limit")
    try:
        body = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_MESSAGE_BYTES,
            max_str_len=MAX_STR_LEN,
            max_array_len=MAX_ARRAY_LEN,
            max_map_len=MAX_MAP_LEN,
            max_ext_len=0,
            ext_hook=_refuse_ext,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises many types for bad input
        raise ProtocolError(f"undecodable message: {type(exc).__name__}: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("message is not a map")
    version = body.pop("v", None)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r}, expected {PROTOCOL_VERSION}")
    mtype = body.pop("t", None)
    cls = MESSAGE_TYPES.get(mtype) if isinstance(mtype, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {mtype!r}")
    return _build(cls, body)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"ext type {code} is not allowed")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _build(cls: type[Message], body: dict[str, Any]) -> Message:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    extra = set(body) - set(names)
    if extra:
        raise ProtocolError(f"{cls.TYPE}: unexpected fields {sorted(extra)}")
    kwargs: dict[str, Any] = {}
    for name in names:
        if name not in body:
            raise ProtocolError(f"{cls.TYPE}: missing field {name!r}")
        kwargs[name] = _check(cls.TYPE, name, hints[name], body[name])
    try:
        return cls(**kwargs)
    except ProtocolError:
        raise
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{cls.TYPE}: {exc}") from None


def _check(mtype: str, name: str, hint: Any, value: Any) -> Any:
    where = f"{mtype}.{name}"
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (hint,) = [o for o in options if o is not type(None)]
        origin = typing.get_origin(hint)
    if hint is Resume:
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected a map")
        return _build_resume(where, value)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif hint is str:
        ok = isinstance(value, str)
    elif hint is bytes:
        ok = isinstance(value, bytes)
    elif origin is dict:
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
        if ok:
            _check_plain(where, value, 0)
    else:  # pragma: no cover - a new annotation without a checker is a programming error
        raise TypeError(f"no checker for {where}: {hint!r}")
    if not ok:
        raise ProtocolError(f"{where}: expected {getattr(hint, '__name__', hint)}, "
                            f"got {type(value).__name__}")
    return value


def _build_resume(where: str, value: dict[str, Any]) -> Resume:
    fields = {"ckpt_seq": int, "units_done": int, "state": bytes}
    if set(value) != set(fields):
        raise ProtocolError(f"{where}: expected fields {sorted(fields)}")
    for key, hint in fields.items():
        _check("resume", key, hint, value[key])
    return Resume(**value)


def _check_plain(where: str, value: Any, depth: int) -> None:
    """Nested maps/lists of plain values only (what JSON and msgpack share, plus bytes)."""
    if depth > MAX_DEPTH:
        raise ProtocolError(f"{where}: nested deeper than {MAX_DEPTH}")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ProtocolError(f"{where}: map keys must be strings")
            _check_plain(where, v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_plain(where, v, depth + 1)
    elif value is not None and not isinstance(value, (str, int, float, bool, bytes)):
        raise ProtocolError(f"{where}: unsupported value type {type(value).__name__}")


def _check_cmd(op: str, args: dict[str, Any]) -> None:
    if op not in CMD_OPS:
        raise ProtocolError(f"cmd: unknown op {op!r}")
    if op == "throttle":
        duty = args.get("duty")
        if set(args) != {"duty"} or not isinstance(duty, (int, float)) or isinstance(duty, bool) \
                or not 0.0 < duty <= 1.0:
            raise ProtocolError("cmd throttle: needs args {duty} with 0 < duty <= 1")
    elif op == "stop":
        deadline = args.get("deadline_s")
        if set(args) != {"deadline_s"} or not isinstance(deadline, (int, float)) \
                or isinstance(deadline, bool) or not deadline > 0:
            raise ProtocolError("cmd stop: needs args {deadline_s} with deadline_s > 0")
    elif args:
        raise ProtocolError(f"cmd {op}: takes no arguments")
