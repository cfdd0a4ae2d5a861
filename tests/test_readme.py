"""The README's promises: its custom job runs alone and under the supervisor, its config
table matches the config keys, and its opening commands are the ones CI runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from nkat.supervisor.config import KEYS
from tests.e2e import REPO, SupervisedRun, env_with, reap_processes  # noqa: F401

README = (REPO / "README.md").read_text()


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
    expected = sum(i * i for i in range(1000))
    assert json.loads(alone.stdout)["sum_of_squares"] == expected

    run = SupervisedRun(tmp_path, "squares", ["job=squares:SumOfSquares", "params.n=1000",
                                              "segment_size=1048576"])
    run.proc = subprocess.Popen(run.argv(), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    assert run.wait() == 0, run.err
    assert run.result()["sum_of_squares"] == expected


def test_readme_config_table_lists_every_key_with_its_default():
    for key in KEYS:
        default = "null" if key.default is None else json.dumps(key.default)
        assert f"| `{key.name}` | `{default}` |" in README, key.name


def test_readme_test_command_is_what_ci_runs():
    command = re.search(r"```bash\n(pip install '\.\[test\]' && (python -m pytest[^\n]*))\n",
                        README)
    assert command, "README must open with the test command"
    ci = (REPO / ".ci" / "run").read_text()
    assert command.group(2) in ci
