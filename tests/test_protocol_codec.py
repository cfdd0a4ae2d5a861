"""Codec faults: every message round-trips; garbage, truncation, oversize and other
versions raise ProtocolError and nothing else."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nkat.protocol import messages as m

nonneg = st.integers(min_value=0, max_value=2**63 - 1)
text = st.text(max_size=40)
plain = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False) | text | st.binary(max_size=32),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=12,
)
plain_map = st.dictionaries(text, plain, max_size=5)

STRATEGIES = {
    m.Hello: st.builds(m.Hello, epoch=nonneg, token=text, pid=nonneg, job=text, proto=nonneg,
                       backend=text, device=text),
    m.Beat: st.builds(m.Beat, epoch=nonneg, seq=nonneg, progress_seq=nonneg, units_done=nonneg,
                      units_total=nonneg, stage=text, t_mono=st.floats(allow_nan=False),
                      metrics=plain_map),
    m.Extend: st.builds(m.Extend, epoch=nonneg, seconds=st.floats(allow_nan=False), reason=text),
    m.Ckpt: st.builds(m.Ckpt, epoch=nonneg, ckpt_seq=nonneg, units_done=nonneg,
                      state=st.binary(max_size=256), digest=text),
    m.Done: st.builds(m.Done, epoch=nonneg, result=plain_map, digest=text),
    m.Fail: st.builds(m.Fail, epoch=nonneg, kind=text, message=text, traceback=text,
                      fatal=st.booleans()),
    m.Log: st.builds(m.Log, epoch=nonneg, level=text, event=text, fields=plain_map),
    m.Welcome: st.builds(
        m.Welcome, epoch=nonneg, run_id=text, spec=plain_map, settings=plain_map,
        resume=st.none() | st.builds(m.Resume, ckpt_seq=nonneg, units_done=nonneg,
                                     state=st.binary(max_size=256))),
    m.Ack: st.builds(m.Ack, epoch=nonneg, ckpt_seq=nonneg),
    m.Cmd: st.one_of(
        st.builds(m.Cmd, epoch=nonneg,
                  op=st.sampled_from(["checkpoint_now", "pause", "resume", "free_memory"]),
                  args=st.just({})),
        st.builds(m.Cmd, epoch=nonneg, op=st.just("throttle"),
                  args=st.builds(dict, duty=st.floats(min_value=0.01, max_value=1.0))),
        st.builds(m.Cmd, epoch=nonneg, op=st.just("stop"),
                  args=st.builds(dict, deadline_s=st.floats(min_value=0.1, max_value=1e6))),
    ),
}


def test_every_message_type_has_a_strategy():
    assert set(STRATEGIES) == set(m.MESSAGE_TYPES.values())


@pytest.mark.parametrize("cls", list(STRATEGIES), ids=lambda c: c.TYPE)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_round_trip(cls, data):
    msg = data.draw(STRATEGIES[cls])
    assert m.decode(m.encode(msg)) == msg


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_garbage_raises_only_protocol_error(raw):
    try:
        decoded = m.decode(raw)
    except m.ProtocolError as exc:
        assert str(exc)  # the one typed error, saying what is wrong
    else:  # garbage that happens to spell a message is a well-typed message
        assert isinstance(decoded, m.Message) and decoded.TYPE in m.MESSAGE_TYPES


@settings(max_examples=200, deadline=None)
@given(msg=st.one_of(*STRATEGIES.values()), data=st.data())
def test_truncated_message_raises_protocol_error(msg, data):
    raw = m.encode(msg)
    cut = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    with pytest.raises(m.ProtocolError):
        m.decode(raw[:cut])


@settings(max_examples=200, deadline=None)
@given(msg=st.one_of(*STRATEGIES.values()),
       version=st.integers(min_value=-(2**63), max_value=2**64 - 1).filter(lambda v: v != 1))
def test_other_version_is_refused(msg, version):
    body = msgpack.unpackb(m.encode(msg), raw=False)
    body["v"] = version
    with pytest.raises(m.ProtocolError, match="version"):
        m.decode(msgpack.packb(body, use_bin_type=True))


@settings(max_examples=300, deadline=None)
@given(msg=st.one_of(*STRATEGIES.values()), key=text, value=plain)
def test_mutated_fields_never_escape_as_other_errors(msg, key, value):
    body = msgpack.unpackb(m.encode(msg), raw=False)
    body[key] = value
    try:
        decoded = m.decode(msgpack.packb(body, use_bin_type=True))
    except m.ProtocolError:
        return
    # Whatever decodes is a well-typed message of a known type.
    assert isinstance(decoded, m.Message)
    assert type(decoded) is m.MESSAGE_TYPES[body["t"]]


def test_unknown_type_missing_and_extra_fields():
    good = msgpack.unpackb(m.encode(m.Ack(epoch=1, ckpt_seq=2)), raw=False)
    with pytest.raises(m.ProtocolError, match="unknown message type"):
        m.decode(msgpack.packb({**good, "t": "reboot"}))
    with pytest.raises(m.ProtocolError, match="missing field"):
        m.decode(msgpack.packb({k: v for k, v in good.items() if k != "ckpt_seq"}))
    with pytest.raises(m.ProtocolError, match="unexpected fields"):
        m.decode(msgpack.packb({**good, "extra": 1}))
    with pytest.raises(m.ProtocolError, match="expected int"):
        m.decode(msgpack.packb({**good, "ckpt_seq": True}))
    with pytest.raises(m.ProtocolError, match="expected int"):
        m.decode(msgpack.packb({**good, "ckpt_seq": -1}))


def test_ext_types_and_non_maps_are_refused():
    with pytest.raises(m.ProtocolError):
        m.decode(msgpack.packb(msgpack.ExtType(5, b"xx")))
    with pytest.raises(m.ProtocolError, match="not a map"):
        m.decode(msgpack.packb([1, 2, 3]))


def test_oversized_input_is_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(m, "MAX_MESSAGE_BYTES", 1024)
    big = m.Ckpt(epoch=1, ckpt_seq=1, units_done=1, state=b"x" * 2048, digest="d")
    with pytest.raises(m.ProtocolError, match="exceeds the limit"):
        m.encode(big)
    raw = msgpack.packb({**dataclasses.asdict(big), "v": 1, "t": "ckpt"}, use_bin_type=True)
    with pytest.raises(m.ProtocolError, match="exceeds the limit"):
        m.decode(raw)


def test_oversized_string_field_is_refused():
    raw = msgpack.packb({"v": 1, "t": "log", "epoch": 1, "level": "info",
                         "event": "x" * (m.MAX_STR_LEN + 1), "fields": {}})
    with pytest.raises(m.ProtocolError):
        m.decode(raw)


@pytest.mark.parametrize("op,args", [
    ("throttle", {}), ("throttle", {"duty": 0}), ("throttle", {"duty": 1.5}),
    ("throttle", {"duty": True}), ("stop", {"deadline_s": 0}), ("stop", {}),
    ("pause", {"x": 1}), ("reboot", {}),
])
def test_bad_commands_are_refused(op, args):
    with pytest.raises(m.ProtocolError):
        m.Cmd(epoch=1, op=op, args=args)
    raw = msgpack.packb({"v": 1, "t": "cmd", "epoch": 1, "op": op, "args": args})
    with pytest.raises(m.ProtocolError):
        m.decode(raw)


def test_deeply_nested_payload_is_refused():
    value: object = 1
    for _ in range(m.MAX_DEPTH + 5):
        value = [value]
    raw = msgpack.packb({"v": 1, "t": "log", "epoch": 1, "level": "info", "event": "e",
                         "fields": {"deep": value}})
    with pytest.raises(m.ProtocolError, match="nested"):
        m.decode(raw)
