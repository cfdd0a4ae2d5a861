"""``python -m nkat.worker --standalone``: the bare baseline, its options and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nkat.protocol import exitcodes
from tests.fake_supervisor import REPO, TOY, toy_expected, worker_env
from tests.jobs.toy import Toy


def worker(*args: str, failpoints: str = "") -> subprocess.CompletedProcess[str]:
    env = worker_env(**({"NKAT_FAILPOINTS": failpoints} if failpoints else {}))
    return subprocess.run([sys.executable, "-m", "nkat.worker", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_help():
    run = worker("--help")
    assert run.returncode == 0
    for word in ("--standalone", "--job", "--set", "--backend", "--out", "batch_size"):
        assert word in run.stdout


def test_result_is_the_same_for_any_batching_and_written_to_out(tmp_path: Path):
    out = tmp_path / "result.json"
    fixed = worker("--standalone", "--job", TOY, "--set", "units=300", "--set", "batch_size=1",
                   "--set", "batch_size_adaptive=false", "--out", str(out))
    assert fixed.returncode == 0, fixed.stderr
    assert fixed.stdout == ""
    adaptive = worker("--standalone", "--job", TOY, "--set", "units=300", "--backend", "numpy")
    assert adaptive.returncode == 0, adaptive.stderr
    a, b = json.loads(out.read_text()), json.loads(adaptive.stdout)
    assert Toy({}).deterministic_result(a) == Toy({}).deterministic_result(b) == \
        toy_expected(300)
    assert a["performance"]["batches"] == 300 > b["performance"]["batches"]
    assert adaptive.stdout == json.dumps(b, sort_keys=True, separators=(",", ":")) + "\n"


def test_oom_failpoint_applies_standalone_and_changes_nothing():
    run = worker("--standalone", "--job", TOY, "--set", "units=100", "--set", "batch_size=32",
                 failpoints="oom@unit=50:times=3")
    assert run.returncode == 0, run.stderr
    assert Toy({}).deterministic_result(json.loads(run.stdout)) == toy_expected(100)
    assert run.stderr.count('"batch.oom"') == 3


@pytest.mark.parametrize("args, code, text", [
    (["--standalone", "--job", "nope"], 2, "unknown job 'nope'"),
    (["--standalone", "--job", "no.such.module:Job"], 2, "cannot import"),
    (["--standalone", "--job", TOY, "--set", "colour=blue"], 2, "unknown params ['colour']"),
    (["--standalone", "--job", TOY, "--set", "units"], 2, "expected KEY=VALUE"),
    (["--standalone", "--job", TOY, "--set", "batch_size=-3"], 2, "batch_size"),
    (["--standalone", "--job", TOY, "--set", "units=10", "--set", "fail_at=4"],
     exitcodes.FATAL, "toy job bug at unit 4"),
    (["--job", TOY], 2, "need --standalone"),
    ([], exitcodes.STARTUP, "NKAT_ENDPOINT is not set"),
])
def test_errors_name_the_problem(args, code, text):
    run = worker(*args)
    assert run.returncode == code
    assert text in run.stderr
    assert run.stdout == ""

