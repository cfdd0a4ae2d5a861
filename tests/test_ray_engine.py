"""``start --engine ray`` on a real local Ray cluster (``ray.cluster_utils.Cluster``: a head
and three nodes, each offering one unit of the resource ``nkat``; NumPy workers). A node is
lost mid-run, shard workers are SIGKILLed, the driver is SIGKILLed and started again: each
run ends with the one-GPU result, byte for byte. Without Ray, ``--engine ray`` exits 2 and
names the extra."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from nkat.supervisor import journal
from nkat.supervisor.rundir import RunDir
from nkat.supervisor.wal import RecordType
from tests.e2e import (  # noqa: F401 - reap_processes is an autouse fixture
    SupervisedRun,
    deterministic,
    env_with,
    reap_processes,
    reference,
    wait_for,
)

JOB = ["max_dimension=75000000", "unit_dims=131072"]  # 573 units, 12 shards on 3 nodes
#: Every unit takes a little while on the nodes, so the faults land mid-run, while the job
#: itself costs little CPU.
CRAWL = "crawl@seconds=0.02"
#: Batches of 4 crawling units (0.08 s): progress and checkpoints come often.
QUICK = ["restart_delay=0.05", "checkpoint_interval=0.3", "segment_size=1048576",
         "ray_resource=nkat", "ray_lease=10", "batch_size=4"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    pytest.importorskip("ray")
    from nkat.supervisor.testing.ray_cluster import LocalRayCluster

    # The nodes' workers inherit the raylets' environment, which is this process's.
    saved = os.environ.get("NKAT_FAILPOINTS")
    os.environ["NKAT_FAILPOINTS"] = CRAWL
    made = LocalRayCluster.start(nodes=3, resource="nkat")
    try:
        yield made
    finally:
        leftovers = made.stop()
        if saved is None:
            os.environ.pop("NKAT_FAILPOINTS", None)
        else:
            os.environ["NKAT_FAILPOINTS"] = saved
        assert not leftovers, f"processes outlived the cluster: {leftovers}"


@pytest.fixture(scope="module")
def expected() -> str:
    return deterministic(reference(JOB))


def ray_run(tmp_path: Path, cluster: object, run_id: str = "ray1",
            extra: list[str] | None = None) -> SupervisedRun:
    return SupervisedRun(tmp_path, run_id, JOB + QUICK + (extra or []),
                         extra_args=["--engine", "ray", "--ray-address",
                                     cluster.address])  # type: ignore[attr-defined]


def node_workers() -> list[psutil.Process]:
    """The nodes' worker processes (the cluster's processes are this test's children)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            argv = proc.cmdline()
            if "nkat.worker" in argv and "--check-spec" not in argv and \
                    "--merge-shards" not in argv and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def busy_nodes(run: SupervisedRun) -> set[str]:
    """The node ids (8 characters) that hold a shard now, from the driver's log."""
    status = run.status()
    return {row["node"] for row in status.get("gpus") or () if row.get("shard") is not None
            and row.get("node")}


def unfinished_checkpoints(run: SupervisedRun) -> set[int]:
    """The shards whose newest durable checkpoint in the WAL is partway through them: each
    must resume from it. (A shard whose newest checkpoint holds all its units is done even
    if its node died before it wrote ``shard_done``: the journal completes it at open.)"""
    sizes = [stop - first for first, stop in RunDir.open(run.state, run.run_id).info.shards]
    newest: dict[int, int] = {}
    for entry in map(journal.read, run.records()):
        if isinstance(entry, journal.CheckpointMeta) and entry.shard is not None:
            newest[entry.shard] = entry.units_done
    return {shard for shard, units in newest.items() if 0 < units < sizes[shard]}


def wait_running_everywhere(run: SupervisedRun) -> None:
    wait_for(lambda: len(busy_nodes(run)) == 3 and (run.status().get("durable_units") or 0),
             120, "shards running on all three nodes with a durable checkpoint", 0.1)


def finish(run: SupervisedRun, expected: str) -> None:
    code = run.wait(timeout=240)
    assert code == 0, run.err
    assert deterministic(run.result()) == expected
    assert run.result()["provenance"]["device"] == "ray: nkat"
    assert_fenced(run)


def assert_fenced(run: SupervisedRun) -> None:
    """What the WAL shows of every attempt, whatever was lost or killed: epochs are unique
    and each lies in the block of its shard's newest attempt; a shard's checkpoints go up
    by one, and each comes from its shard's newest attempt (nothing of an attempt is
    recorded once a newer one is assigned)."""
    blocks: dict[int, tuple[int, int]] = {}
    epochs: set[int] = set()
    seqs: dict[int, int] = {}
    attempts = 0
    for rec in run.records():
        entry = journal.read(rec)
        if isinstance(entry, journal.Event) and entry.kind is journal.EventKind.ASSIGNED:
            attempts += 1
            blocks[entry.fields["shard"]] = (entry.fields["epoch_base"],
                                             entry.fields["epoch_limit"])
        elif isinstance(entry, journal.Epoch):
            assert entry.epoch not in epochs, f"epoch {entry.epoch} was started twice"
            epochs.add(entry.epoch)
            base, limit = blocks[entry.shard]
            assert base < entry.epoch <= limit, (entry, blocks[entry.shard])
        elif isinstance(entry, journal.CheckpointMeta):
            base, limit = blocks[entry.shard]
            assert base < entry.epoch <= limit, (entry, blocks[entry.shard])
            assert entry.ckpt_seq == seqs.get(entry.shard, 0) + 1, entry
            seqs[entry.shard] = entry.ckpt_seq
    assert attempts >= 12 and len(seqs) == 12


def freeze_with_unfinished_checkpoints(run: SupervisedRun
                                       ) -> tuple[set[int], list[psutil.Process]]:
    """SIGSTOP the nodes' workers at a moment the WAL holds a checkpoint of a shard that is
    not done: those shards, and the frozen workers. A frozen worker sends nothing more, so
    its shard is still unfinished when its node or the driver dies (running on, a shard of
    48 crawling units could finish in the seconds Ray takes to end the actors, and leave
    nothing to move or resume). Frozen workers still die with their node agents
    (PR_SET_PDEATHSIG)."""
    def frozen_with_some() -> tuple[set[int], list[psutil.Process]] | None:
        if not unfinished_checkpoints(run):
            return None
        workers: list[psutil.Process] = []
        while newcomers := [p for p in node_workers() if p not in workers]:
            for proc in newcomers:  # one started meanwhile is frozen too
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.suspend()
            workers += newcomers
        time.sleep(0.3)  # what the workers had already sent reaches the WAL
        left = unfinished_checkpoints(run)
        if not left:
            for proc in workers:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.resume()
            return None
        return left, workers

    return wait_for(frozen_with_some, 120,
                    "a durable checkpoint of an unfinished shard, with the workers frozen", 0.05)


def assigned_nodes(run: SupervisedRun) -> dict[int, str]:
    """Each shard's node (8 characters) in its newest assignment, from the WAL."""
    return {e.fields["shard"]: e.fields["node"] for e in map(journal.read, run.records())
            if isinstance(e, journal.Event) and e.kind is journal.EventKind.ASSIGNED}


def test_a_lost_node_moves_its_shards_and_the_result_is_identical(tmp_path, cluster, expected):
    run = ray_run(tmp_path, cluster)
    run.start()
    wait_running_everywhere(run)
    status = run.status()
    assert status["engine"] == "ray" and status["nodes"] == 3
    assert status["shards"]["total"] == 12  # 4 per node agent the cluster had at the start
    # A node whose shard is partway, with its worker frozen so that the shard cannot finish
    # in the moment Ray takes to lose the node (then there would be nothing to move); the
    # other nodes' workers go on.
    partway, frozen = freeze_with_unfinished_checkpoints(run)
    keep: set[int] = set()  # the pids left frozen: the victim node's
    try:
        owners = assigned_nodes(run)
        held = {shard: cluster.node_with(owners[shard])  # type: ignore[attr-defined]
                for shard in partway}
        theirs = {shard: {p.pid for p in cluster.processes_of(node)}  # type: ignore[attr-defined]
                  for shard, node in held.items()}
        frozen_pids = {p.pid for p in frozen}
        mine = sorted(s for s in partway if theirs[s] & frozen_pids)
        assert mine, f"no frozen worker on the nodes of shards {sorted(partway)}"
        moved = mine[0]
        victim, node, keep = owners[moved], held[moved], theirs[moved]
    finally:
        for proc in frozen:  # all but the victim's go on
            if proc.pid not in keep:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.resume()
    cluster.remove(node)  # type: ignore[attr-defined]
    try:
        finish(run, expected)
    finally:
        cluster.add_node()  # type: ignore[attr-defined]  # the next test has three again
    retired = [e for e in run.events("node.retired") if e["node"] == victim]
    assert [e["shard"] for e in retired] == [moved], retired
    later = [e for e in run.events("shard.assigned") if e["shard"] == moved]
    assert later[-1]["node"] != victim and later[-1]["attempt"] >= 2
    kinds = [journal.read(r) for r in run.records() if r.type is RecordType.EVENT]
    assert any(k.kind is journal.EventKind.RETIRED and k.fields["node"] == victim
               for k in kinds)


@pytest.mark.slow  # the node's restart is the local loop's, which the kill -9 tests cover
def test_sigkilled_shard_workers_restart_on_their_nodes(tmp_path, cluster, expected):
    run = ray_run(tmp_path, cluster)
    run.start()
    wait_running_everywhere(run)
    killed = set()
    for _ in range(3):
        worker = wait_for(lambda: [p for p in node_workers() if p.pid not in killed], 60,
                          "a node's worker to kill")[0]
        os.kill(worker.pid, signal.SIGKILL)
        killed.add(worker.pid)
    finish(run, expected)
    assert run.status()["restarts"] >= 3  # each node's own loop restarted its worker
    assert not run.events("node.retired")  # supervision stayed on the nodes


def test_a_killed_driver_resumes_from_its_wal_with_start(tmp_path, cluster, expected):
    # A frozen worker beats no more: its node must not restart it before the agents end.
    run = ray_run(tmp_path, cluster, extra=["heartbeat_timeout=120"])
    run.start()
    wait_running_everywhere(run)
    unfinished, _ = freeze_with_unfinished_checkpoints(run)
    run.kill_supervisor()
    wait_for(lambda: not node_workers(), 30, "the dead driver's workers to end with it", 0.1)
    assert unfinished_checkpoints(run) >= unfinished
    again = ray_run(tmp_path, cluster)
    again.start()
    finish(again, expected)
    resumed = {e["shard"] for e in again.events("shard.assigned") if e.get("resume_units")}
    assert resumed >= unfinished, f"shards {unfinished - resumed} did not resume: {resumed}"


def test_a_cluster_without_the_agents_resource_is_refused_and_leaves_no_run(
        tmp_path, cluster):
    run = SupervisedRun(tmp_path, "none", [*JOB, *QUICK, "ray_resource=absent"],
                        extra_args=["--engine", "ray", "--ray-address",
                                    cluster.address])  # type: ignore[attr-defined]
    run.start()
    assert run.wait(timeout=120) == 2, run.err
    assert "offers no absent" in run.err and "--resources" in run.err
    assert not run.path.exists()  # a new run that never started leaves nothing behind


def test_without_ray_the_engine_exits_2_and_names_the_extra(tmp_path):
    hide = tmp_path / "no-ray"
    (hide / "ray").mkdir(parents=True)
    (hide / "ray" / "__init__.py").write_text("raise ImportError('ray is not installed')\n")
    env = env_with()
    env["PYTHONPATH"] = os.pathsep.join([str(hide), env["PYTHONPATH"]])
    done = subprocess.run([sys.executable, "-m", "nkat.supervisor", "start", "--state-dir",
                           str(tmp_path / "state"), "--engine", "ray", "--backend", "numpy"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "pip install 'nkat-supervise[ray]'" in done.stderr
    assert not (tmp_path / "state" / "runs").exists() or \
        not any((tmp_path / "state" / "runs").iterdir())
