"""The worker's parts that need no process or socket: failpoint grammar, batch sizing,
settings, checkpoint state, environment, ``--set`` parsing, and the compute loop itself."""

from __future__ import annotations

import queue
import time
import zlib
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nkat.protocol.messages import MAX_MESSAGE_BYTES, Cmd, state_digest
from nkat.worker import state
from nkat.worker.backend import Backend, BackendUnavailable, StickyDeviceError, select_backend
from nkat.worker.batching import MAX_BATCH_SECONDS, BatchSizer
from nkat.worker.failpoints import FailpointError, Failpoints
from nkat.worker.heartbeat import Board
from nkat.worker.runtime import RunFailed, Runner, Stopped
from nkat.worker.settings import Settings, SettingsError, parse_settings
from nkat.worker.standalone import UsageError, parse_sets
from nkat.worker.supervised import EnvError, read_env
from tests.fake_supervisor import toy_expected
from tests.jobs.toy import Toy

# Failpoints --------------------------------------------------------------------------


def test_failpoint_grammar_accepts_every_documented_kind():
    parsed = Failpoints.parse(
        "crash@unit=50:code=1; hang_gil@unit=30;hang_nogil@unit=30;stall@unit=10:seconds=5;"
        "ignore_sigterm;oom@unit=20:times=1;cuda_sticky@unit=40;crash@unit=50:signal=SIGKILL;"
        "crash@unit=50:signal=9;error@unit=7:epoch=2;stall@start:seconds=0.5;"
        "crawl@seconds=0.002;crawl@seconds=1:epoch=3", epoch=1)
    kinds = {point.kind for point in parsed.points}
    # error@…:epoch=2 and crawl@…:epoch=3 are other epochs': not planted in epoch 1.
    assert kinds == {"crash", "hang_gil", "hang_nogil", "stall", "ignore_sigterm", "oom",
                     "cuda_sticky", "crawl"}
    assert len(parsed.points) == 11


def test_failpoints_fire_only_in_their_epoch():
    Failpoints.parse("error@unit=7:epoch=2", epoch=1).before_batch(0, 10)
    with pytest.raises(RuntimeError, match="failpoint error"):
        Failpoints.parse("error@unit=7:epoch=2", epoch=2).before_batch(0, 10)


@pytest.mark.parametrize("text", [
    "explode@unit=1", "crash", "crash@unit=1:start", "crash@unit=x", "oom@start",
    "crash@unit=1:seconds=3", "ignore_sigterm@unit=3", "oom@unit=1:times=0",
    "crash@unit=1:signal=SIGNOPE", "stall@unit=-1", "crawl", "crawl@unit=3:seconds=0.1",
    "crawl@start:seconds=1", "crawl@seconds=0.1:times=1", "crawl@seconds=-1", "crawl@code=1",
    "crawl@seconds=nan", "stall@unit=1:seconds=inf", "crawl@epoch=2",
])
def test_failpoint_grammar_names_the_bad_entry(text):
    with pytest.raises(FailpointError, match="failpoint"):
        Failpoints.parse(text, epoch=1)


def test_a_crawl_sleeps_per_unit_of_every_batch(capfd):
    fps = Failpoints.parse("crawl@seconds=0.01", epoch=1)
    fps.install()  # nothing fires at start
    assert "fired" not in capfd.readouterr().err
    for count in (5, 20):
        began = time.monotonic()
        fps.crawl(count)
        assert time.monotonic() - began >= 0.01 * count
    began = time.monotonic()
    Failpoints.parse("crawl@seconds=1:epoch=2", epoch=1).crawl(100)  # another epoch's
    assert time.monotonic() - began < 1


def test_failpoints_fire_in_the_batch_holding_their_unit_as_often_as_asked():
    fps = Failpoints.parse("oom@unit=20:times=2;cuda_sticky@unit=40;error@unit=60", epoch=1)
    fps.before_batch(0, 20)
    for _ in range(2):
        with pytest.raises(MemoryError):
            fps.before_batch(16, 8)
    fps.before_batch(16, 8)  # used up
    with pytest.raises(StickyDeviceError):
        fps.before_batch(40, 1)
    with pytest.raises(RuntimeError, match="failpoint error at unit 60"):
        fps.before_batch(59, 2)


# Batch sizing ------------------------------------------------------------------------


def test_batch_grows_while_throughput_improves_then_settles():
    sizer = BatchSizer(4, adaptive=True, units_total=10_000)
    assert not sizer.observe(4, 0.010, headroom=True)  # warm-up batch: no evidence
    assert sizer.observe(4, 0.004, headroom=True) and sizer.size == 8
    assert sizer.observe(8, 0.004, headroom=True) and sizer.size == 16
    assert sizer.observe(16, 0.010, headroom=True) and sizer.size == 8  # worse: back off
    assert not sizer.observe(8, 0.001, headroom=True) and sizer.size == 8  # settled


def test_batch_growth_stops_at_the_cap_the_time_limit_and_without_headroom():
    capped = BatchSizer(4, adaptive=True, units_total=8)
    for _ in range(5):
        capped.observe(capped.size, 0.001 / capped.size, headroom=True)
    assert capped.size == 8
    slow = BatchSizer(4, adaptive=True, units_total=10_000)
    slow.observe(4, MAX_BATCH_SECONDS, headroom=True)
    assert not slow.observe(4, MAX_BATCH_SECONDS * 0.6, headroom=True) and slow.size == 4
    tight = BatchSizer(4, adaptive=True, units_total=10_000)
    tight.observe(4, 0.01, headroom=True)
    assert not tight.observe(4, 0.01, headroom=False) and tight.size == 4


def test_oom_halves_and_the_batch_never_grows_back():
    sizer = BatchSizer(64, adaptive=True, units_total=10_000)
    assert sizer.shrink(64) == 32
    for _ in range(5):
        sizer.observe(sizer.size, 0.001, headroom=True)
    assert sizer.size < 64
    assert BatchSizer(1, adaptive=False, units_total=10).shrink(1) == 1


def test_fixed_batch_never_changes():
    sizer = BatchSizer(5, adaptive=False, units_total=10_000)
    assert not any(sizer.observe(5, 1e-6, headroom=True) for _ in range(5))
    assert sizer.size == 5


# Settings, environment, --set ----------------------------------------------------------


def test_settings_defaults_and_unknown_keys():
    s = parse_settings({"checkpoint_interval": 5, "batch_size": 10, "max_temperature": 83})
    assert (s.checkpoint_interval, s.batch_size, s.heartbeat_interval) == (5.0, 10, 1.0)
    assert parse_settings({}) == Settings()


@pytest.mark.parametrize("raw", [
    {"checkpoint_interval": 0}, {"batch_size": 1.5}, {"batch_size_adaptive": 1},
    {"heartbeat_interval": "1"}, {"memory_limit": -1}, {"provenance": {"epochs": -1}},
])
def test_settings_errors_name_the_key(raw):
    with pytest.raises(SettingsError, match=next(iter(raw))):
        parse_settings(raw)


def test_environment_contract():
    env = read_env({"NKAT_ENDPOINT": "ipc://x", "NKAT_TOKEN": "t", "NKAT_EPOCH": "3",
                    "NKAT_SUPERVISOR_PID": "42"})
    assert (env.epoch, env.supervisor_pid, env.backend, env.job) == (3, 42, "auto", "")
    with pytest.raises(EnvError, match="NKAT_EPOCH"):
        read_env({"NKAT_ENDPOINT": "ipc://x", "NKAT_TOKEN": "t", "NKAT_EPOCH": "zero",
                  "NKAT_SUPERVISOR_PID": "42"})
    with pytest.raises(EnvError, match="NKAT_BACKEND"):
        read_env({"NKAT_BACKEND": "tpu"})


def test_set_values_are_read_as_the_supervisor_reads_them():
    runtime, params = parse_sets(["batch_size=8", "max_dimension=1000", "ratio=0.5",
                                  "fast=yes", "mode=speed", "list=[1,2]", "empty=",
                                  "cpu_threads=2"])
    assert runtime == {"batch_size": 8, "cpu_threads": 2}
    assert params == {"max_dimension": 1000, "ratio": 0.5, "fast": True, "mode": "speed",
                      "list": [1, 2], "empty": None}
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_sets(["novalue"])


def test_backends():
    assert select_backend("numpy").name == "numpy"
    assert select_backend("auto").name in ("numpy", "cupy")
    with pytest.raises(BackendUnavailable, match="tpu"):
        select_backend("tpu")


# Checkpoint state -----------------------------------------------------------------------


def test_state_round_trip_and_verification():
    wrapped = state.wrap(b"job-bytes", 70, dict(state.COUNTERS, batches=7, epoch=2))
    job_state, counters = state.unwrap(wrapped, 70)
    assert job_state == b"job-bytes" and counters["batches"] == 7
    with pytest.raises(state.BadCheckpoint, match="covers 70 units"):
        state.unwrap(wrapped, 71)
    with pytest.raises(state.BadCheckpoint, match="digest"):
        state.unwrap(wrapped.replace(b"job-bytes", b"job-bytez"), 70)
    with pytest.raises(state.BadCheckpoint):
        state.unwrap(b"\xc1garbage", 70)


def test_compressed_state_round_trip_and_what_is_refused():
    snapshot = b"curve " * 5000
    plain = state.wrap(snapshot, 70, state.COUNTERS)
    packed = state.wrap(snapshot, 70, state.COUNTERS, compress=True)
    assert len(packed) < len(plain) // 10
    assert msgpack.unpackb(packed)["codec"] == "zlib"
    assert state.unwrap(packed, 70)[0] == snapshot == state.unwrap(plain, 70)[0]

    def with_body(**changes: Any) -> bytes:
        body = msgpack.unpackb(packed)
        body.update(changes)
        return msgpack.packb(body, use_bin_type=True)
    compressed = msgpack.unpackb(packed)["job"]
    with pytest.raises(state.BadCheckpoint, match="unknown codec 'lz4'"):
        state.unwrap(with_body(codec="lz4"), 70)
    with pytest.raises(state.BadCheckpoint, match="cut short"):
        state.unwrap(with_body(job=compressed[:-8]), 70)
    with pytest.raises(state.BadCheckpoint, match="does not decompress"):
        state.unwrap(with_body(job=b"not zlib at all"), 70)
    bomb = zlib.compress(bytes(MAX_MESSAGE_BYTES + 1), 9)  # a few KB that inflate past it
    with pytest.raises(state.BadCheckpoint, match="beyond"):
        state.unwrap(with_body(job=bomb), 70)


# The compute loop in process -------------------------------------------------------------


class ListLink:
    """Records what the runner sends; tests fill its inbox."""

    def __init__(self) -> None:
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.logs: list[tuple[str, dict[str, Any]]] = []
        self.ckpts: list[tuple[int, int, bytes]] = []

    def log(self, level: str, event: str, fields: Any) -> None:
        self.logs.append((event, dict(fields)))

    def extend(self, seconds: float, reason: str) -> None:
        self.logs.append(("extend", {"reason": reason}))

    def beat_now(self) -> None:
        self.logs.append(("beat_now", {}))

    def post_ckpt(self, ckpt_seq: int, units_done: int, job_state: bytes, runtime: Any) -> None:
        self.ckpts.append((ckpt_seq, units_done, job_state))


def run_toy(units: int, link: ListLink | None = None, failpoints: str = "",
            **settings: Any) -> dict[str, Any]:
    runner = Runner(Toy({"units": units}), Backend(), Settings(**settings), link or ListLink(),
                    Board(), Failpoints.parse(failpoints, 1), epoch=1, spec_hash="x",
                    checkpoints=True)
    return Toy({}).deterministic_result(runner.run())


@settings(max_examples=25, deadline=None)
@given(units=st.integers(1, 200), batch=st.integers(1, 64), adaptive=st.booleans())
def test_any_batching_gives_the_same_result(units, batch, adaptive):
    assert run_toy(units, batch_size=batch, batch_size_adaptive=adaptive) == toy_expected(units)


def test_stop_before_any_unit_needs_no_checkpoint():
    link = ListLink()
    link.inbox.put(Cmd(epoch=1, op="stop", args={"deadline_s": 0.05}))
    runner = Runner(Toy({"units": 50}), Backend(), Settings(batch_size=5), link, Board(),
                    Failpoints([], 1), epoch=1, spec_hash="x", checkpoints=True)
    with pytest.raises(Stopped) as stopped:
        runner.run()
    assert stopped.value.acked and link.ckpts == []


def test_snapshot_digest_is_what_the_checkpoint_covers():
    link = ListLink()
    run_toy(40, link, checkpoint_interval=1e-9, batch_size=8)
    seqs = [seq for seq, _, _ in link.ckpts]
    assert seqs == [1], "one in flight: no ack ever came, so no second checkpoint"
    _, units_done, job_state = link.ckpts[0]
    job = Toy({"units": 40})
    job.restore(job_state)
    assert job.merged == units_done == 8 and state_digest(job_state)


def test_failures_are_classified():
    with pytest.raises(RunFailed) as sticky:
        run_toy(50, failpoints="cuda_sticky@unit=3")
    assert (sticky.value.kind, sticky.value.fatal) == ("gpu_sticky", False)
    with pytest.raises(RunFailed) as oom:
        run_toy(50, failpoints="oom@unit=3:times=99", batch_size=2)
    assert (oom.value.kind, oom.value.fatal) == ("oom", False)
