"""SIGKILL of the worker, of the supervisor, and of both, at random moments: the final
result's deterministic blocks are byte-identical to an uninterrupted run's, and no
acknowledged checkpoint is lost (every new epoch resumes at or after the newest ack)."""

from __future__ import annotations

import random
import signal
import time

import pytest

from nkat.supervisor import journal
from nkat.supervisor.config import load_config
from nkat.supervisor.exitcode import ExitCode
from nkat.supervisor.launch import pick_run
from tests.e2e import (  # noqa: F401 - reap_processes is an autouse fixture
    FAST_RESTARTS,
    SupervisedRun,
    deterministic,
    gone,
    reap_processes,
    reference,
    wait_for,
)

JOB = ["max_dimension=100000000", "unit_dims=65536"]  # 1526 units


def crawling(epochs: int) -> str:
    """Failpoints that make each unit of epochs 1..``epochs`` last at least 6 ms (about
    9 s for the whole job), so every kill lands mid-run while the job itself costs little
    CPU; the epoch after the last kill runs at full speed to the end."""
    return ";".join(f"crawl@seconds=0.006:epoch={e}" for e in range(1, epochs + 1))


@pytest.fixture(scope="module")
def expected() -> str:
    return deterministic(reference(JOB))


def _check_no_acked_loss(acked_before: list[tuple[int, int]], run: SupervisedRun) -> None:
    """Each kill happened with some ack seen; the epoch after it resumed at or past it."""
    resumed = run.resumed_seqs()  # one per epoch, in order
    for epoch_killed, acked in acked_before:
        assert resumed[epoch_killed] >= acked, (epoch_killed, acked, resumed)


def test_worker_sigkilled_eight_times_finishes_identically(tmp_path, expected):
    rng = random.Random(20261128)
    run = SupervisedRun(tmp_path, "kill-worker", JOB + FAST_RESTARTS, failpoints=crawling(8))
    run.start()
    acked_before = []
    for epoch in range(1, 9):
        run.wait_welcomed(epoch)
        time.sleep(rng.uniform(0.0, 0.5))
        acked_before.append((epoch, run.acked_ckpt_seq()))
        run.kill_worker()
    assert run.wait() == 0, run.err
    assert deterministic(run.result()) == expected
    _check_no_acked_loss(acked_before, run)
    assert len(run.resumed_seqs()) >= 9
    restarts = [e for e in map(journal.read, run.records()) if isinstance(e, journal.Event)
                and e.kind is journal.EventKind.RESTART_SCHEDULED]
    assert len(restarts) >= 8 and all(e.fields["exit_class"] == "crashed" for e in restarts)
    # The count rides on the records, so status and the result agree with the log.
    assert run.result()["provenance"]["restarts"] >= 8


def test_supervisor_sigkilled_three_times_resumes_with_start(tmp_path, expected):
    rng = random.Random(5)
    run = SupervisedRun(tmp_path, "kill-sup", JOB + FAST_RESTARTS, failpoints=crawling(3))
    acked_before = []
    for epoch in range(1, 4):
        run.start()
        run.wait_welcomed(epoch)
        time.sleep(rng.uniform(0.1, 0.6))
        acked_before.append((epoch, run.acked_ckpt_seq()))
        workers = run.kill_supervisor()
        # PR_SET_PDEATHSIG: the worker dies with its supervisor; no orphan is left.
        wait_for(lambda w=workers: gone(w), 10, "the orphaned worker to die")
    run.start()
    assert run.wait() == 0, run.err
    recovered = run.events("run.recovered_unclean")
    assert len(recovered) == 3 and all(e["ckpt_seq"] or e["units_done"] == 0 for e in recovered)
    assert deterministic(run.result()) == expected
    _check_no_acked_loss(acked_before, run)


def test_both_sigkilled_together(tmp_path, expected):
    rng = random.Random(7)
    run = SupervisedRun(tmp_path, "kill-both", JOB + FAST_RESTARTS, failpoints=crawling(3))
    acked_before = []
    for epoch in range(1, 4):
        run.start()
        run.wait_welcomed(epoch)
        time.sleep(rng.uniform(0.1, 0.6))
        acked_before.append((epoch, run.acked_ckpt_seq()))
        worker = run.worker()
        assert worker is not None
        worker.send_signal(signal.SIGKILL)
        pids = run.kill_supervisor()
        wait_for(lambda p=pids: gone(p), 10, "the worker to be gone")
    run.start()
    assert run.wait() == 0, run.err
    assert deterministic(run.result()) == expected
    _check_no_acked_loss(acked_before, run)


def test_supervisor_killed_before_it_made_the_log(tmp_path, expected):
    """A first start killed after it created the run directory but before the log's first
    segment was durable leaves run.toml and an empty wal/: the next start makes the log
    and runs. Once a log was made, a start that finds no segment refuses (they were
    deleted), naming the damage."""
    run = SupervisedRun(tmp_path, "early-kill", JOB)
    config = load_config(None, run.settings, {"backend": "numpy"})
    # What `start` has done when the kill lands: the run planned and created, no log yet.
    made = pick_run(run.state, config, run_id=run.run_id, fresh=False, boot=False)
    made.create(run.state)
    assert not any((run.path / "wal").iterdir())
    assert "wal_started = false" in (run.path / "run.toml").read_text()
    run.start()
    assert run.wait() == 0, run.err
    assert deterministic(run.result()) == expected
    assert "wal_started" not in (run.path / "run.toml").read_text()

    for segment in (run.path / "wal").iterdir():
        segment.unlink()
    run.start()
    assert run.wait() == ExitCode.GAVE_UP
    assert "has lost its newest part" in run.err and "were its segments deleted?" in run.err
