"""One run on two (simulated) GPUs, with real processes: ``start --gpus 2 --sim-gpu
two_gpus --backend numpy``. One worker is SIGKILLed, the hot GPU overheats (its shard
goes to the cool one), the supervisor is SIGKILLed and started again; the merged result
is byte-identical to a one-GPU run's."""

from __future__ import annotations

import signal
import subprocess

import psutil

from nkat.supervisor import journal
from tests.e2e import (  # noqa: F401 - reap_processes is an autouse fixture
    SupervisedRun,
    deterministic,
    env_with,
    reap_processes,
    reference,
    wait_for,
)

JOB = ["max_dimension=75000000", "unit_dims=131072"]  # 573 units: 8 shards of ~72
#: Until the supervisor is killed every unit takes a little while, so kills and the heat
#: land mid-run, while the job itself costs little CPU.
CRAWL = "crawl@seconds=0.06"
#: Batches of 4 crawling units (0.24 s): checkpoints and stops are obeyed promptly.
QUICK = ["restart_delay=0.05", "checkpoint_interval=0.3", "segment_size=1048576",
         "thermal_dwell=2", "thermal_samples=2", "gpu_poll_interval=0.2", "batch_size=4"]


def test_two_gpus_kill_heat_and_a_supervisor_kill_give_the_one_gpu_result(tmp_path):
    expected = deterministic(reference(JOB))
    run = SupervisedRun(tmp_path, "two", JOB + QUICK, failpoints=CRAWL,
                        extra_args=["--gpus", "2", "--sim-gpu", "two_gpus"])
    run.start()
    wait_for(lambda: len(run.events("worker.welcomed")) >= 2, 60, "both GPUs' workers")
    toml = (run.path / "run.toml").read_text()
    assert "shards = [" in toml and 'gpus = "0,1"' in toml
    # The cool GPU's worker: the hot one's must be running when its GPU overheats.
    victim = wait_for(lambda: next((row["pid"] for row in run.status().get("gpus") or ()
                                    if row["index"] == 0 and row["pid"]), None),
                      30, "GPU 0's worker")
    psutil.Process(victim).send_signal(signal.SIGKILL)
    wait_for(lambda: run.events("thermal.stop"), 60, "GPU 1 to overheat")
    wait_for(lambda: run.events("shard.completed"), 60, "a shard to complete")
    run.kill_supervisor()
    run.failpoints = None  # the rest of the job runs at full speed
    run.start()  # the same command: it resumes the run from its WAL
    assert run.wait(timeout=240) == 0, run.err
    assert deterministic(run.result()) == expected
    assert run.events("run.recovered_unclean")
    exits = {e["exit_class"] for e in run.events("worker.exited")}
    assert {"crashed", "thermal", "completed"} <= exits
    done = [e for e in map(journal.read, run.records()) if isinstance(e, journal.Event)
            and e.kind is journal.EventKind.SHARD_DONE]
    assert len({e.fields["shard"] for e in done}) >= 1
    status = subprocess.run(run.argv("status")[:6] + [run.run_id, "--json"], env=env_with(),
                            capture_output=True, text=True, timeout=60)
    assert '"state": "completed"' in status.stdout
