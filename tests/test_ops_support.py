"""Shared helpers for the operations tests (logs, metrics, report, install-service).

``ops_argv`` runs one operations command exactly as the CLI wires it (a subparser with
``--state-dir``, the module's ``add_arguments``, then its ``run``), in a real process.
``nkat_run`` supervises a small real NKAT run once per session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nkat.supervisor.rundir import list_runs

REPO = Path(__file__).resolve().parent.parent
COMMAND_MODULES = {"logs": "logview", "report": "report", "install-service": "service"}
_RUNNER = f"""
import argparse, importlib, sys
name = sys.argv[1]
mod = importlib.import_module("nkat.supervisor.ops." + {COMMAND_MODULES!r}[name])
parser = argparse.ArgumentParser(prog="nkat-supervise " + name)
parser.add_argument("--state-dir")
mod.add_arguments(parser)
sys.exit(mod.run(parser.parse_args(sys.argv[2:])))
"""


def ops_argv(command: str, *args: str) -> list[str]:
    return [sys.executable, "-c", _RUNNER, command, *args]


def ops_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # The toy job lives in tests/jobs; workers import it from the repository root.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("NO_COLOR", None)
    env.update(extra)
    return env


def run_ops(command: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ops_argv(command, *args), capture_output=True, text=True,
                          timeout=timeout, env=ops_env())


def supervise(state: Path, *options: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``nkat-supervise start --quiet`` as a real process, to its end."""
    return subprocess.run([sys.executable, "-m", "nkat.supervisor", "start", "--state-dir",
                           str(state), "--quiet", *options], capture_output=True, text=True,
                          timeout=timeout, env=ops_env())


@pytest.fixture(scope="session")
def nkat_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(state dir, run id) of a completed NKAT run: 3,000,000 dimensions, 46 units."""
    state = tmp_path_factory.mktemp("ops_state")
    done = supervise(state, "--set", "max_dimension=3000000", "--set", "unit_dims=65536",
                     "--set", "checkpoint_interval=0.1")
    assert done.returncode == 0, done.stderr
    (run,) = list_runs(state)
    return state, run.run_id
