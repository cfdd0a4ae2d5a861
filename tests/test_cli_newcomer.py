"""What a newcomer tripped on, following README, each now a test with real processes: a
finished spec is not computed again, old runs can be removed, global options go on
either side, a failed start leaves nothing, a second run on a busy GPU is refused,
``status`` reads like prose and ``--watch`` ends with the run, and a SIGTERM is not
called an operator's stop."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from nkat.supervisor.rundir import RunDir
from tests.e2e import (  # noqa: F401 - reap_processes is an autouse fixture
    SupervisedRun,
    env_with,
    reap_processes,
    wait_for,
)

SMALL = ["--set", "max_dimension=1000", "--quiet"]
#: 20 ms a unit: a run of 60,000,000 dims (916 units) lasts about 18 s unless stopped, and
#: obeys a stop within a batch.
CRAWL = "crawl@seconds=0.02"


def cli(state: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nkat.supervisor", *args, "--state-dir",
                           str(state)], capture_output=True, text=True, env=env_with(),
                          timeout=timeout)


def test_a_finished_spec_is_not_computed_again_unless_fresh(tmp_path):
    assert cli(tmp_path, "start", *SMALL).returncode == 0
    again = cli(tmp_path, "start", "--set", "max_dimension=1000")
    assert again.returncode == 0
    assert "already completed" in again.stdout and "result.json" in again.stdout
    assert len(list((tmp_path / "runs").iterdir())) == 1
    assert cli(tmp_path, "start", "--fresh", *SMALL).returncode == 0
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_a_lost_result_file_is_written_from_the_wal_by_a_plain_start(tmp_path):
    assert cli(tmp_path, "start", *SMALL).returncode == 0
    (result,) = tmp_path.glob("runs/*/results/result.json")
    text = result.read_text()
    result.write_bytes(b"")  # a power cut between the done record and the file
    again = cli(tmp_path, "start", *SMALL)
    assert again.returncode == 0 and result.read_text() == text
    assert len(list((tmp_path / "runs").iterdir())) == 1


def test_global_options_go_before_or_after_the_command(tmp_path):
    before = subprocess.run([sys.executable, "-m", "nkat.supervisor", "--state-dir",
                             str(tmp_path), "start", *SMALL], capture_output=True, text=True,
                            env=env_with(), timeout=120)
    assert before.returncode == 0, before.stderr
    listed = subprocess.run([sys.executable, "-m", "nkat.supervisor", "--state-dir",
                             str(tmp_path), "runs", "--json"], capture_output=True, text=True,
                            env=env_with(), timeout=60)
    assert [r["state"] for r in json.loads(listed.stdout)] == ["completed"]


def test_runs_rm_and_prune(tmp_path):
    assert cli(tmp_path, "start", *SMALL).returncode == 0
    assert cli(tmp_path, "start", "--set", "max_dimension=2000", "--quiet").returncode == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    dry = cli(tmp_path, "runs", "prune", "--older-than", "1h", "--dry-run")
    assert dry.returncode == 0 and "would remove 0 run(s)" in dry.stdout
    gone = cli(tmp_path, "runs", "rm", runs[0])
    assert gone.returncode == 0 and not (tmp_path / "runs" / runs[0]).exists()
    pruned = cli(tmp_path, "runs", "prune", "--older-than", "0s")
    assert "removed 1 run(s)" in pruned.stdout and not (tmp_path / "runs" / runs[1]).exists()
    bad = cli(tmp_path, "runs", "prune", "--older-than", "soon")
    assert bad.returncode == 2 and "--older-than" in bad.stderr


def test_a_stopped_run_is_removed_only_with_force(tmp_path):
    run = SupervisedRun(tmp_path, "keep", ["max_dimension=60000000", "unit_dims=65536"],
                        failpoints=CRAWL)
    run.start()
    run.wait_welcomed(1)
    busy = cli(run.state, "runs", "rm", "keep", "--force")
    assert busy.returncode == 1 and "already supervised" in busy.stdout
    assert cli(run.state, "stop", "keep").returncode == 0 and run.wait() == 4
    refused = cli(run.state, "runs", "rm", "keep")
    assert refused.returncode == 1 and "--force" in refused.stdout
    assert cli(run.state, "runs", "rm", "keep", "--force").returncode == 0
    assert not run.path.exists()


def test_a_start_that_fails_leaves_no_run_behind(tmp_path):
    bad = cli(tmp_path, "start", "--set", "max_dimension=2000000000000000")
    assert bad.returncode == 2 and "max_dimension" in bad.stderr
    job = cli(tmp_path, "start", "--set", "job=nosuchmodule:Job")
    assert job.returncode == 2 and "cannot import 'nosuchmodule'" in job.stderr
    gpu = cli(tmp_path, "start", "--sim-gpu", "nosuchprofile", *SMALL)
    assert gpu.returncode == 2
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_a_second_live_run_on_the_same_gpu_is_refused_unless_asked(tmp_path):
    # A live run pinned to CuPy on GPU 0 (its lock held here, as a supervisor holds it).
    busy = RunDir.create(tmp_path, "on-gpu0", {"job": "nkat-highdim", "params": {}},
                         {"backend": "cupy", "gpu_index": 0})
    with busy.lock():
        second = cli(tmp_path, "start", "--fresh", "--set", "max_dimension=1000")
        assert second.returncode == 2 and "already computes on GPU 0" in second.stderr
        assert "--share-gpu" in second.stderr
        other_gpu = cli(tmp_path, "start", "--fresh", *SMALL, "--set", "gpu_index=1",
                        "--set", "backend=numpy")
        assert other_gpu.returncode == 0, other_gpu.stderr
        shared = cli(tmp_path, "start", "--fresh", "--share-gpu", "--backend", "numpy", *SMALL)
        assert shared.returncode == 0, shared.stderr


def test_status_reads_like_prose_and_watch_ends_with_the_run(tmp_path):
    run = SupervisedRun(tmp_path, "watched", ["max_dimension=60000000", "unit_dims=65536"],
                        failpoints="crawl@seconds=0.005")  # about 4.6 s in all
    run.start()
    run.wait_progress()
    # The watch starts while the run computes, so it shows the run live, then its end.
    watch = subprocess.Popen([sys.executable, "-m", "nkat.supervisor", "status", "watched",
                              "--watch", "--interval", "0.2", "--state-dir", str(run.state)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env_with())
    live = cli(run.state, "status", "watched")
    assert "ETA" in live.stdout and "supervisor: pid" in live.stdout and " up " in live.stdout
    assert "units_per_s" not in live.stdout  # no raw floats
    watched, err = watch.communicate(timeout=180)
    assert watch.returncode == 0, err
    assert 0 <= watched.find("ETA") < watched.find("completed (disk)"), watched
    assert run.wait() == 0


def test_sigterm_is_not_called_an_operators_stop(tmp_path):
    run = SupervisedRun(tmp_path, "term", ["max_dimension=60000000", "unit_dims=65536"],
                        failpoints=CRAWL)
    run.start()
    run.wait_welcomed(1)
    assert run.proc is not None
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 4
    (exited,) = run.events("worker.exited")
    assert "SIGTERM" in exited["reason"] and "operator" not in exited["reason"]
    (killing,) = run.events("worker.killing")
    assert killing["level"] == "info"  # a stop someone asked for is not a warning
