"""tools/gpu_check.sh without a GPU: it fails clearly, in one JSON document, with exit
code 2, before installing anything; its driver's comparison keeps to its tolerance;
and the script is shellcheck-clean where shellcheck is installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.fake_supervisor import REPO

SCRIPT = REPO / "tools" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "tools"))


def test_no_gpu_fails_at_once_with_one_json_document(tmp_path):
    env = {**os.environ, "PATH": "/usr/bin:/bin", "GPU_CHECK_VENV": str(tmp_path / "venv")}
    run = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2, run.stderr
    doc = json.loads(run.stdout)
    assert doc["ok"] is False and doc["stage"] == "gpu"
    assert "nvidia-smi" in doc["error"]
    assert not (tmp_path / "venv").exists(), "nothing is installed without a GPU"


def test_the_driver_says_why_it_cannot_run_without_nvml():
    pytest.importorskip("pynvml")
    from nkat.supervisor.gpu.nvml import NvmlSensor
    from nkat.supervisor.gpu.sensor import GpuUnavailable

    try:
        NvmlSensor(xid_events=False).open()
    except GpuUnavailable:
        pass
    else:
        pytest.skip("a GPU answers here")
    run = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py")], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    doc = json.loads(run.stdout)
    assert doc["ok"] is False and doc["error"].startswith("NVML:")


def test_comparison_holds_to_the_stated_tolerance():
    import gpu_check

    gpu = {"summary": {"mean": 1.0, "n": 5}, "curve": {"S": [2.0, 3.0]}}
    close = {"summary": {"mean": 1.0 + 1e-14, "n": 5}, "curve": {"S": [2.0, 3.0]}}
    assert gpu_check.compare(gpu, close) == []
    assert gpu_check.max_rel_diff(gpu, close) == pytest.approx(1e-14, rel=0.01)
    far = {"summary": {"mean": 1.0 + 1e-9, "n": 5}, "curve": {"S": [2.0, 3.0]}}
    assert gpu_check.compare(gpu, far) == [".summary.mean: cupy 1.0 numpy 1.000000001"]
    assert gpu_check.compare(gpu, {"summary": {"mean": 1.0, "n": 6},
                                   "curve": {"S": [2.0, 3.0]}}) == \
        [".summary.n: cupy 5 numpy 6"]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_script_is_shellcheck_clean():
    run = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stdout
