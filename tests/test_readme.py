"""The README's promises: its custom job runs alone and under the supervisor, its config
table matches the config keys, and its opening commands are the ones CI runs."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

from nkat.supervisor.config import KEYS
from tests.e2e import REPO, SupervisedRun, env_with, reap_processes, wait_for  # noqa: F401

README = (REPO / "README.md").read_text()
#: Epoch 1 crawls (units 50 to 2999 take 0.05 s each), so it can be stopped mid-run.
CRAWL = ";".join(f"stall@unit={k}:seconds=0.05:epoch=1" for k in range(50, 3000))


def _squares_source() -> str:
    match = re.search(r"```python\n# squares.py\n(.*?)```", README, re.S)
    assert match, "README lost its custom job example"
    return match.group(1)


def test_readme_custom_job_runs_standalone_and_supervised(tmp_path):
    (tmp_path / "squares.py").write_text(_squares_source())
    env = env_with()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    alone = subprocess.run(
        [sys.executable, "-m", "nkat.worker", "--standalone", "--job", "squares:SumOfSquares",
         "--set", "n=1000"], capture_output=True, text=True, env=env, timeout=120)
    assert alone.returncode == 0, alone.stderr
    expected = str(sum(i * i for i in range(1000)))
    assert json.loads(alone.stdout)["sum_of_squares"] == expected

    run = SupervisedRun(tmp_path, "squares", ["job=squares:SumOfSquares", "params.n=1000",
                                              "segment_size=1048576"])
    run.proc = subprocess.Popen(run.argv(), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    assert run.wait() == 0, run.err
    assert run.result()["sum_of_squares"] == expected


def test_readme_custom_job_holds_a_sum_past_64_bits(tmp_path):
    (tmp_path / "squares.py").write_text(_squares_source())
    env = env_with()
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    n = 2_000_000_000
    alone = subprocess.run(
        [sys.executable, "-m", "nkat.worker", "--standalone", "--job", "squares:SumOfSquares",
         "--set", f"n={n}"], capture_output=True, text=True, env=env, timeout=120)
    assert alone.returncode == 0, alone.stderr
    assert json.loads(alone.stdout)["sum_of_squares"] == str((n - 1) * n * (2 * n - 1) // 6)


def test_a_custom_job_resumes_at_boot_without_its_folder_on_the_path(tmp_path):
    # Started from the job's folder, as README says; resumed by `start --boot` the way
    # systemd runs it: another working directory and no PYTHONPATH.
    job_dir = tmp_path / "jobs"
    job_dir.mkdir()
    (job_dir / "squares.py").write_text(_squares_source())
    state = tmp_path / "state"
    env = {k: v for k, v in env_with().items() if k != "PYTHONPATH"}
    argv = [sys.executable, "-m", "nkat.supervisor", "start", "--state-dir", str(state),
            "--run-id", "sq", "--quiet", "--set", "job=squares:SumOfSquares",
            "--set", "params.n=3000000000",
            "--set", "segment_size=1048576", "--set", "checkpoint_interval=0.1"]
    first = subprocess.Popen(argv, cwd=job_dir, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**env, "NKAT_FAILPOINTS": CRAWL})
    def welcomed() -> bool:
        assert first.poll() is None, first.communicate()  # still starting, not failed
        return any("worker.welcomed" in log.read_text()
                   for log in state.glob("runs/*/logs/supervisor.jsonl"))

    wait_for(welcomed, 60, "the run's worker to start")
    first.send_signal(signal.SIGTERM)  # a shutdown: the run wants to run again at boot
    assert first.wait(timeout=60) == 4, first.stderr.read() if first.stderr else ""
    boot = subprocess.run([sys.executable, "-m", "nkat.supervisor", "start", "--state-dir",
                           str(state), "--boot", "--quiet"], cwd="/", env=env,
                          capture_output=True, text=True, timeout=120)
    assert boot.returncode == 0, boot.stderr
    (result,) = state.glob("runs/*/results/result.json")
    n = 3_000_000_000
    assert json.loads(result.read_text())["sum_of_squares"] == str((n - 1) * n * (2 * n - 1)
                                                                   // 6)


def test_readme_config_table_lists_every_key_with_its_default():
    for key in KEYS:
        default = "null" if key.default is None else json.dumps(key.default)
        assert f"| `{key.name}` | `{default}` |" in README, key.name


def test_readme_test_command_is_what_ci_runs():
    command = re.search(r"```bash\n(pip install '\.\[(test[\w,]*)\]' && "
                        r"(python -m pytest[^\n]*))\n", README)
    assert command, "README must open with the test command"
    ci = (REPO / ".ci" / "run").read_text()
    assert command.group(3) in ci
    assert f"pip install --quiet '.[{command.group(2)}]'" in ci  # the same extras
