"""The batch-level job API and the runner that drives it: a device batch overlaps the
host's work on the one before, the per-unit path still works, and a worker given a
``unit_range`` computes a shard and ends with its acknowledged final checkpoint."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import msgpack
import pytest

from nkat.protocol import exitcodes
from nkat.protocol.messages import DONE_ACK_SEQ, Ack, Beat, Cmd, Done, Fail
from nkat.worker import state
from nkat.worker.backend import Backend
from nkat.worker.failpoints import Failpoints
from nkat.worker.heartbeat import Board
from nkat.worker.job import Job, Ready, RunContext
from nkat.worker.runtime import RunFailed, Runner
from nkat.worker.settings import Settings, SettingsError, parse_settings
from nkat.worker.shards import Shard, finalize_shards
from tests.fake_supervisor import FakeSupervisor, toy_expected
from tests.jobs.toy import Toy
from tests.test_worker_inprocess import ListLink


class DeviceSum(Job):
    """Sums unit indices, batch by batch, on a pretend device that queues work: each
    batch's ``wait`` is logged, so the test sees what the runner launched before it."""

    name = "device-sum"
    shardable = True

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.units = int(params.get("units", 100))
        self.events: list[tuple[str, int]] = []
        self.total = 0

    def units_total(self) -> int:
        return self.units

    def compute_batch(self, xp: Any, first: int, count: int) -> Any:
        self.events.append(("launch", first))
        job = self

        class Queued:
            pending = True

            def wait(self) -> int:
                job.events.append(("wait", first))
                return sum(range(first, first + count))

        return Queued()

    def merge_batch(self, first: int, count: int, partial: Any) -> None:
        self.events.append(("merge", first))
        self.total += partial

    def merge_state(self, snapshot: bytes) -> None:
        self.total += msgpack.unpackb(snapshot)

    def snapshot(self) -> bytes:
        return msgpack.packb(self.total)

    def restore(self, data: bytes) -> None:
        self.total = msgpack.unpackb(data)

    def finalize(self, context: RunContext) -> dict[str, Any]:
        return {"total": self.total}


def runner(job: Job, link: ListLink | None = None, **settings: Any) -> Runner:
    return Runner(job, Backend(), Settings(**settings), link or ListLink(), Board(),
                  Failpoints([], 1), epoch=1, spec_hash="x", checkpoints=True)


def test_the_next_device_batch_is_launched_before_the_host_waits_for_this_one():
    job = DeviceSum({"units": 40})
    assert runner(job, batch_size=10, batch_size_adaptive=False).run() == {"total": 780}
    assert job.events == [
        ("launch", 0), ("launch", 10), ("wait", 0), ("merge", 0),
        ("launch", 20), ("wait", 10), ("merge", 10),
        ("launch", 30), ("wait", 20), ("merge", 20),
        ("wait", 30), ("merge", 30)]


def test_a_throttled_device_is_not_given_the_next_batch_early():
    job = DeviceSum({"units": 30})
    link = ListLink()
    link.inbox.put(Cmd(epoch=1, op="throttle", args={"duty": 0.99}))
    runner(job, link, batch_size=10, batch_size_adaptive=False).run()
    assert job.events == [("launch", 0), ("wait", 0), ("merge", 0),
                          ("launch", 10), ("wait", 10), ("merge", 10),
                          ("launch", 20), ("wait", 20), ("merge", 20)]


def test_host_batches_are_not_computed_ahead():
    class HostSum(DeviceSum):
        def compute_batch(self, xp: Any, first: int, count: int) -> Any:
            self.events.append(("launch", first))
            return Ready(sum(range(first, first + count)))

    job = HostSum({"units": 20})
    runner(job, batch_size=10, batch_size_adaptive=False).run()
    assert job.events == [("launch", 0), ("merge", 0), ("launch", 10), ("merge", 10)]


def test_the_per_unit_path_still_merges_in_unit_order():
    job = Toy({"units": 37})
    result = runner(job, batch_size=5, batch_size_adaptive=True).run()
    assert Toy({}).deterministic_result(result) == toy_expected(37)


def test_a_compute_that_returns_the_wrong_count_is_a_fatal_job_error():
    class Short(Toy):
        def compute(self, xp: Any, first: int, count: int) -> list[int]:
            return list(super().compute(xp, first, count))[:-1]

    with pytest.raises(RunFailed) as failed:
        runner(Short({"units": 10}), batch_size=4).run()
    assert (failed.value.kind, failed.value.fatal) == ("job_error", True)
    assert "returned 3 partials" in failed.value.message


def test_an_oom_in_a_queued_batch_drops_both_and_retries_smaller():
    class OomOnce(DeviceSum):
        tripped = False

        def compute_batch(self, xp: Any, first: int, count: int) -> Any:
            queued = super().compute_batch(xp, first, count)
            if first == 10 and count == 10 and not self.tripped:
                self.tripped = True
                queued.wait = lambda: (_ for _ in ()).throw(MemoryError("device"))
            return queued

    job = OomOnce({"units": 40})
    link = ListLink()
    assert runner(job, link, batch_size=10, batch_size_adaptive=False).run() == \
        {"total": 780}
    assert ("batch.oom", {"first": 10, "count": 10, "to": 5}) in link.logs


def test_a_shard_ends_with_its_final_checkpoint_and_a_small_result():
    job = DeviceSum({"units": 100})
    link = ListLink()
    run = runner(job, link, batch_size=7, batch_size_adaptive=False, unit_range=(30, 60),
                 supervisor_timeout=5.0)

    def ack_the_final_checkpoint(ckpt_seq: int, units_done: int, job_state: bytes,
                                 runtime: Any) -> None:
        link.ckpts.append((ckpt_seq, units_done, job_state))
        link.inbox.put(Ack(epoch=1, ckpt_seq=ckpt_seq))

    link.post_ckpt = ack_the_final_checkpoint  # type: ignore[method-assign]
    assert run.run() == {"shard": [30, 60], "units_done": 30}
    (seq, units_done, job_state), = link.ckpts
    assert (seq, units_done) == (1, 30)
    assert msgpack.unpackb(job_state) == sum(range(30, 60))
    assert [e for e in job.events if e[0] == "launch"][0] == ("launch", 30)


def test_a_shard_whose_final_checkpoint_is_never_acknowledged_fails():
    run = runner(DeviceSum({"units": 10}), batch_size=10, unit_range=(0, 10),
                 supervisor_timeout=0.2)
    with pytest.raises(RunFailed) as failed:
        run.run()
    assert (failed.value.kind, failed.value.exit_code) == ("shard_unacknowledged",
                                                           exitcodes.ORPHANED)


def test_unit_range_is_refused_past_the_job_or_for_an_ordered_job():
    with pytest.raises(RunFailed, match="goes past"):
        runner(DeviceSum({"units": 10}), unit_range=(5, 11))
    with pytest.raises(RunFailed, match="cannot run as shards"):
        runner(Toy({"units": 10}), unit_range=(0, 5))


@pytest.mark.parametrize("raw", [[3], [5, 5], [-1, 4], [1.0, 4], "0,4", [True, 4]])
def test_unit_range_setting_must_be_first_below_stop(raw):
    with pytest.raises(SettingsError, match="unit_range"):
        parse_settings({"unit_range": raw})
    assert parse_settings({"unit_range": None}).unit_range is None
    assert parse_settings({"unit_range": [2, 9], "cpu_threads": 3}).unit_range == (2, 9)


def test_cpu_threads_resolves_to_the_cores_this_process_may_use():
    assert Settings(cpu_threads=3).threads() == 3
    assert Settings().threads() >= 1


# A real worker process against the fake supervisor ------------------------------------


@pytest.fixture
def sup():
    fake = FakeSupervisor()
    yield fake
    fake.close()


NKAT = {"max_dimension": 60_000, "unit_dims": 1000, "curve_points": 40}


def _shard_state(sup: FakeSupervisor, first: int, stop: int) -> Shard:
    sup.start(NKAT, job="nkat-highdim",
              settings={"unit_range": [first, stop], "batch_size": 7,
                        "checkpoint_interval": 0.05})
    done = sup.expect(Done, timeout=30)
    assert done.result == {"shard": [first, stop], "units_done": stop - first}
    final = sup.acked[-1]
    # The final checkpoint was acknowledged before done was sent, and covers the range.
    assert sup.received.index(final) < sup.received.index(done)
    assert final.units_done == stop - first
    # Beats count within the range: the one sent at once after the first batch at least.
    beats = [m for m in sup.received if isinstance(m, Beat) and m.progress_seq >= 1]
    assert beats and all(b.units_total == stop - first for b in beats)
    sup.ack(DONE_ACK_SEQ)
    assert sup.wait_exit() == exitcodes.DONE
    return Shard((first, stop), final.state)


def test_workers_given_unit_ranges_make_shards_that_merge_into_the_one_run_result():
    from tests.test_nkat_split import compute

    parts = []
    for first, stop in ((25, 60), (0, 25)):
        fake = FakeSupervisor()
        try:
            parts.append(_shard_state(fake, first, stop))
        finally:
            fake.close()
    result = finalize_shards({"job": "nkat-highdim", "params": NKAT}, parts, {})
    whole = compute(NKAT, 0, 60, [60])
    expected = whole.deterministic_result(whole.finalize(RunContext("numpy", "cpu", 1, 0, 1.0,
                                                                    0, "x")))
    assert json.dumps({k: v for k, v in result.items()
                       if k not in ("performance", "provenance")}, sort_keys=True) == \
        json.dumps(expected, sort_keys=True)
    _, counters = state.unwrap(parts[0].state, 35)
    assert counters["batches"] == 5  # 35 units in batches of 7


def test_a_resumed_shard_continues_inside_its_range(sup):
    # The first stall makes a checkpoint due, the second lets it be acknowledged.
    failpoints = ("stall@unit=30:seconds=0.05:epoch=1;stall@unit=40:seconds=0.3:epoch=1;"
                  "crash@unit=50:epoch=1")
    sup.start(NKAT, job="nkat-highdim", failpoints=failpoints,
              settings={"unit_range": [20, 60], "batch_size": 5, "checkpoint_interval": 0.01})
    assert sup.wait_exit(30) == 1
    last = sup.acked[-1]
    assert 0 < last.units_done <= 30
    resumed = FakeSupervisor(epoch=2)
    try:
        from nkat.protocol.messages import Resume

        resumed.start(NKAT, job="nkat-highdim",
                      settings={"unit_range": [20, 60], "batch_size": 5},
                      resume=Resume(last.ckpt_seq, last.units_done, last.state))
        done = resumed.expect(Done, timeout=30)
        assert done.result == {"shard": [20, 60], "units_done": 40}
        final = resumed.acked[-1]
        resumed.ack(DONE_ACK_SEQ)
        assert resumed.wait_exit() == exitcodes.DONE
    finally:
        resumed.close()
    job_state, _ = state.unwrap(final.state, 40)
    assert msgpack.unpackb(job_state)["units"] == [[20, 60]]


def test_an_ordered_job_given_a_unit_range_fails_fatally(sup):
    sup.start({"units": 50}, settings={"unit_range": [0, 10]})
    fail = sup.expect(Fail)
    assert (fail.kind, fail.fatal) == ("bad_welcome", True)
    assert sup.wait_exit() == exitcodes.FATAL


def test_standalone_refuses_a_unit_range():
    import subprocess
    import sys

    from tests.fake_supervisor import REPO, worker_env

    run = subprocess.run([sys.executable, "-m", "nkat.worker", "--standalone", "--set",
                          "unit_range=[0,3]"], cwd=REPO, env=worker_env(),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "unit_range needs a supervisor" in run.stderr

