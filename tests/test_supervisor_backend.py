"""The backend a run computes on, with real processes: ``auto`` is resolved once and the
run pinned to it; a restart that cannot get the pinned backend fails like a start (and
gives up saying why) instead of going on, silently, on another; only an explicit
``--backend`` switches it."""

from __future__ import annotations

import subprocess
import tomllib

from nkat.supervisor import journal
from tests.e2e import (  # noqa: F401 - reap_processes is an autouse fixture
    IDLING,
    SupervisedRun,
    deterministic,
    env_with,
    reap_processes,
    reference,
)

JOB = ["max_dimension=60000000", "unit_dims=65536"]
QUICK = ["restart_delay=0.05", "checkpoint_interval=0.2", "segment_size=1048576"]


def run_toml(run: SupervisedRun) -> dict:  # type: ignore[type-arg]
    return tomllib.loads((run.path / "run.toml").read_text())


def start(run: SupervisedRun, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [a for a in run.argv() if a not in ("--backend", "numpy")] + list(extra)
    return subprocess.run(argv, env=env_with(), capture_output=True, text=True, timeout=120)


def test_auto_is_pinned_and_a_backend_the_restart_cannot_get_is_never_swapped(tmp_path):
    expected = deterministic(reference(JOB))
    run = SupervisedRun(tmp_path, "pin", JOB + QUICK, failpoints=IDLING)
    run.argv = lambda command="start", _argv=run.argv: [  # type: ignore[method-assign]
        a for a in _argv(command) if a not in ("--backend", "numpy")]
    run.start()
    run.wait_welcomed(1)
    stop = subprocess.run(run.argv("stop")[:6] + [run.run_id], env=env_with(),
                          capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0 and run.wait() == 4
    toml = run_toml(run)
    assert toml["backends"] == ["numpy"] and toml["config"]["backend"] == "numpy"
    pinned = [e for e in map(journal.read, run.records()) if isinstance(e, journal.Event)
              and e.kind is journal.EventKind.BACKEND]
    assert pinned[0].fields == {"backend": "numpy", "was": None}

    # Asked for a backend this machine cannot give: it fails like a start, and gives up.
    cupy = start(run, "--backend", "cupy", "--set", "max_restarts=0")
    assert cupy.returncode == 3, cupy.stderr
    assert "switching its backend from numpy to cupy" in cupy.stdout + cupy.stderr
    assert "backend_unavailable" in cupy.stderr
    assert run_toml(run)["backends"] == ["numpy"]  # no worker ever computed on cupy

    # A plain start resumes on the pinned backend and finishes with the same result.
    plain = start(run)
    assert plain.returncode == 0, plain.stderr
    assert deterministic(run.result()) == expected
    assert run.result()["provenance"]["backends"] == ["numpy"]
