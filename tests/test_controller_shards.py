"""A sharded run across several GPUs, scripted against the controller with a fake clock:
each GPU's worker computes one shard at a time under its own supervision; a GPU that
finishes takes the next shard; one that overheats, crash-loops or needs a reset lets go
of its shard for the others; every shard done, their states are merged into the result
(or, on a Ray node, left to the driver to merge)."""

from __future__ import annotations

from nkat.protocol import exitcodes
from nkat.protocol import messages as m
from nkat.supervisor import controller as c
from nkat.supervisor import journal
from nkat.supervisor.exitcode import ExitCode
from tests.controller_script import SPEC, Script

TWO = [("gpu0", 0), ("gpu1", 1)]
FOUR_SHARDS = [(0, 10), (10, 20), (20, 30), (30, 40)]


def sharded(**kw: object) -> Script:
    s = Script(slots=TWO, shards=FOUR_SHARDS, gpus=2, **kw)  # type: ignore[arg-type]
    s.start()
    for wid, _ in TWO:
        s.hello(wid)
        s.beat(wid=wid)
    return s


def test_each_gpu_takes_a_shard_then_the_next_and_the_states_are_merged():
    s = sharded()
    owned = {wid: s.shard_of(wid).index for wid, _ in TWO}
    assert sorted(owned.values()) == [0, 1]
    (welcome0,) = s.messages(m.Welcome, "gpu0")
    assert welcome0.settings["unit_range"] == list(FOUR_SHARDS[owned["gpu0"]])
    s.finish_shard("gpu0")
    assert s.events("shard.completed")[0]["shard"] == owned["gpu0"]
    s.advance(0.2)  # gpu0 takes the next free shard
    assert s.shard_of("gpu0").index not in owned.values()
    s.hello("gpu0")
    s.beat(wid="gpu0")
    s.finish_shard("gpu1")
    s.advance(0.2)
    s.hello("gpu1")
    s.beat(wid="gpu1")
    s.finish_shard("gpu0")
    assert not s.merges
    s.finish_shard("gpu1")
    (merge,) = s.merges
    assert sorted(span for _, span in merge.shards) == FOUR_SHARDS
    (done,) = s.of_type(journal.Done)
    assert done.result == {"merged": [list(span) for span in FOUR_SHARDS]}
    assert s.finish.code is ExitCode.COMPLETED and s.results == [done.result]
    done_events = [r for r in s.records if isinstance(r, journal.Event)
                   and r.kind is journal.EventKind.SHARD_DONE]
    assert sorted(e.fields["shard"] for e in done_events) == [0, 1, 2, 3]


def test_checkpoints_are_kept_and_resumed_per_shard():
    s = sharded()
    k0, k1 = s.shard_of("gpu0").index, s.shard_of("gpu1").index
    s.ckpt(1, 4, state=b"a", wid="gpu0")
    s.ckpt(1, 6, state=b"b", wid="gpu1")  # each shard counts its own seqs
    assert [(r.shard, r.ckpt_seq) for r in s.of_type(journal.CheckpointMeta)] == [
        (k0, 1), (k1, 1)]
    s.ckpt(3, 7, wid="gpu1")  # a gap in gpu1's shard: a violation of that worker only
    assert s.events("worker.killing")[0]["epoch"] == s.ctl.run.workers["gpu1"].epoch
    s.exit(-9, "gpu1")
    s.tick()
    s.advance(0.5)
    s.hello("gpu1")
    resume = s.messages(m.Welcome, "gpu1")[-1].resume
    assert resume == m.Resume(1, 6, b"b") and s.shard_of("gpu1").index == k1


def test_a_done_without_the_final_checkpoint_is_a_violation():
    s = sharded()
    s.ckpt(1, 5, wid="gpu0")
    s.done(wid="gpu0")
    assert "without its final checkpoint" in s.events("protocol.error")[0]["reason"]
    assert not s.events("shard.completed")


def test_an_overheated_gpu_lets_go_of_its_shard_and_another_gpu_finishes_it():
    s = sharded(thermal_samples=1, thermal_dwell=30.0)
    hot_shard = s.shard_of("gpu1").index
    s.ckpt(1, 3, state=b"hot", wid="gpu1")
    s.reading(92.0, gpu=1)  # emergency on gpu1 only
    s.tick()
    assert s.ctl.run.workers["gpu1"].state.value == "cooling"
    assert s.ctl.run.shards[hot_shard].owner is None
    s.finish_shard("gpu0")
    s.advance(0.2)
    assert s.shard_of("gpu0").index == hot_shard  # the one with progress first
    s.hello("gpu0")
    assert s.messages(m.Welcome, "gpu0")[-1].resume == m.Resume(1, 3, b"hot")
    assert s.ctl.run.workers["gpu0"].gpu_index == 0


def test_a_crash_looping_gpu_is_retired_and_the_run_goes_on():
    s = sharded(max_restarts=1)
    bad = s.shard_of("gpu1").index
    for _ in range(2):
        s.exit(-11, "gpu1")
        s.tick()
        s.advance(0.5)
        if s.ctl.run.workers["gpu1"].state.value == "gave_up":
            break
        s.hello("gpu1")
    (retired,) = s.events("worker.retired")
    assert retired["worker"] == "gpu1" and retired["shard"] == bad
    assert s.finish is None and s.ctl.run.shards[bad].owner is None
    assert "retired" in s.kinds()


def test_a_fatal_job_error_gives_the_whole_run_up():
    s = sharded()
    s.send(m.Fail(epoch=s.ctl.run.workers["gpu0"].epoch, kind="job_error", message="bad",
                  traceback="", fatal=True), "gpu0")
    s.exit(exitcodes.FATAL, "gpu0")
    s.tick()
    assert s.finish.code is ExitCode.GAVE_UP


def test_a_stop_waits_for_every_gpus_final_checkpoint():
    s = sharded()
    s.workers["gpu1"].obeys_stop = False  # gpu1 is slower to finish its final checkpoint
    s.control("stop")
    for wid, _ in TWO:
        assert [c.op for c in s.messages(m.Cmd, wid)] == ["stop"]
    s.ckpt(1, 4, wid="gpu0")
    s.tick()  # gpu0 exits: gpu1 still has a process, nothing is recorded yet
    assert not s.of_type(journal.Stop) and s.workers["gpu1"].returncode is None
    s.ckpt(1, 2, wid="gpu1")
    s.exit(exitcodes.STOPPED, "gpu1")
    s.tick()
    (stop,) = s.of_type(journal.Stop)
    assert s.finish.code is ExitCode.STOPPED


def test_status_has_one_row_per_gpu_and_counts_shards():
    s = sharded(thermal_samples=1)
    s.ckpt(1, 5, wid="gpu0")
    s.reading(70.0, gpu=0)
    status = s.control("status")["status"]
    assert status["shards"] == {"total": 4, "done": 0}
    assert [row["index"] for row in status["gpus"]] == [0, 1]
    row0 = status["gpus"][0]
    assert row0["shard"] == s.shard_of("gpu0").index and row0["temperature"] == 70.0
    assert status["units_total"] == 40 and status["durable_units"] == 5


def test_a_ray_node_computes_its_one_shard_and_leaves_the_merge_to_the_driver():
    # What a Ray node agent's controller is told: its shard (resumed from the durable
    # checkpoint the journal gave), every other shard done, epochs from its attempt's
    # block, and no merge.
    plans = tuple(c.ShardPlan(span, c.Durable(2, 3) if k == 2 else c.Durable(), done=k != 2)
                  for k, span in enumerate(FOUR_SHARDS))
    facts = c.RunFacts("r1", SPEC, epoch=200, shards=plans, merge_when_done=False)
    s = Script(facts=facts, slots=[("n1-gpu0", 0)], gpus=1)
    s.start()
    s.hello("n1-gpu0")
    assert s.ctl.run.workers["n1-gpu0"].epoch == 201  # above the attempt's block base
    (welcome,) = s.messages(m.Welcome, "n1-gpu0")
    assert welcome.settings["unit_range"] == list(FOUR_SHARDS[2])
    s.beat(wid="n1-gpu0")
    s.finish_shard("n1-gpu0")
    assert [e["shard"] for e in s.events("shard.completed")] == [2]
    assert not s.merges and not s.of_type(journal.Done) and not s.results
    assert s.finish is not None and s.finish.code is ExitCode.COMPLETED
    assert [(r.shard, r.ckpt_seq) for r in s.of_type(journal.CheckpointMeta)] == [(2, 3)]
