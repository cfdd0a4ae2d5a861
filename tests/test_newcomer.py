"""The newcomer's first minutes: in a fresh virtualenv on a copy of the repository's files,
README's two opening commands run as written.

Marked slow (``python -m pytest -m slow tests/test_newcomer.py`` runs it): a fresh
virtualenv and two installs cost more than a minute, and ``.ci/run`` is itself this
newcomer on every CI run: it runs README's first command as written, install included, in
a fresh virtualenv on a copy of the tree, and later README's second command in full.

One deviation, on purpose: README's second command would run this suite inside itself.
Here its install part runs exactly as written, then ``python -m pytest -q --collect-only``,
which must collect the whole suite without an error.

Pip reads the package index as it is configured for the user running the suite (its cache
makes the second and later runs quicker).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e import REPO

#: Each README command (a pip install, then the job or the collection) within this.
COMMAND_TIMEOUT_S = 600

pytestmark = pytest.mark.slow
#: Top-level blocks of an NKAT result (README, "The NKAT job").
RESULT_KEYS = {"summary", "performance", "theoretical_validation", "statistics",
               "provenance", "curve", "precision"}


def readme_commands() -> list[str]:
    """README's opening ```bash blocks, one command each, as written."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)
    assert len(blocks) >= 2, "README must open with the main job and the test command"
    commands = [block.strip() for block in blocks[:2]]
    for command in commands:
        assert "\n" not in command, f"a README opening block holds one command: {command!r}"
    return commands


def tracked_files() -> list[str]:
    """The repository's files as a clean clone would have them, plus new ones not yet
    committed; what .gitignore names (build/, *.egg-info, caches) stays behind."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=False)
    if listing.returncode != 0:
        pytest.skip(f"not a git checkout: {listing.stderr.strip()}")
    return [name for name in listing.stdout.split("\0") if name]


def tail(proc: subprocess.CompletedProcess[str], chars: int = 4000) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-chars:]}\n" \
           f"--- stderr\n{proc.stderr[-chars:]}"


class Newcomer:
    """A copy of the repository and a fresh virtualenv beside it, and a shell in the copy
    with that virtualenv's bin first on PATH, as after ``source venv/bin/activate``."""

    def __init__(self, root: Path) -> None:
        self.tree = root / "nkat-supervise"
        for name in tracked_files():
            source = REPO / name
            if source.is_file():  # a tracked file deleted in the working tree is skipped
                target = self.tree / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        self.venv = root / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True,
                       timeout=COMMAND_TIMEOUT_S)
        self.state = root / "state"
        self.state.mkdir()
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
               and not k.startswith("NKAT_")}
        env["VIRTUAL_ENV"] = str(self.venv)
        env["PATH"] = os.pathsep.join([str(self.venv / "bin"), env.get("PATH", "")])
        env["NKAT_STATE_DIR"] = str(self.state)
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        self.env = env

    def bash(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", command], cwd=self.tree, env=self.env,
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory: pytest.TempPathFactory) -> Newcomer:
    return Newcomer(tmp_path_factory.mktemp("newcomer"))


@pytest.mark.timeout(2 * COMMAND_TIMEOUT_S + 120)
def test_readme_main_job_runs_as_written_in_a_fresh_venv(newcomer: Newcomer) -> None:
    main_job = readme_commands()[0]
    proc = newcomer.bash(main_job)
    assert proc.returncode == 0, f"{main_job}\n{tail(proc)}"
    results = sorted(newcomer.state.glob("**/results/result.json"))
    assert len(results) == 1, f"one result.json under the state dir, found {results}"
    result = json.loads(results[0].read_text())
    assert RESULT_KEYS <= result.keys(), sorted(result)
    assert result["summary"]["total_dimensions"] > 0, result["summary"]


@pytest.mark.timeout(2 * COMMAND_TIMEOUT_S + 120)
def test_readme_test_install_collects_the_whole_suite(newcomer: Newcomer) -> None:
    install, joined, _ = readme_commands()[1].partition(" && ")
    assert joined, "README's test command is an install, then the tests"
    proc = newcomer.bash(install)
    assert proc.returncode == 0, f"{install}\n{tail(proc)}"
    collect = newcomer.bash("python -m pytest -q --collect-only")
    assert collect.returncode == 0, tail(collect)
    summary = collect.stdout.strip().splitlines()[-1]
    count = re.match(r"(\d+)(?:/\d+)? tests? collected", summary)
    assert count and int(count.group(1)) > 100, summary
    assert "error" not in summary, summary
