"""The test suite's own cost for ``python tools/bench.py tests`` (issue 9): README.md's test
command (its pytest part, after the install) run once from the repository root, as CI
runs it.

``suite_wall_s``: wall time of the whole default suite (goal ≤ 150 s on the 2-core
development machine). ``suite_cpu_s``: CPU seconds of pytest and every process it waited
for (its workers, the supervisors and workers they started). ``tests_passed``,
``tests_failed``, ``tests_skipped``: from pytest's summary line; a failing suite is
reported, not hidden. ``--quick`` runs one small module instead, to try the bench.
"""

from __future__ import annotations

import argparse
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUICK_MODULE = "tests/test_wal_format.py"


def readme_test_argv() -> list[str]:
    """README's second opening command, the part after the install, with this Python."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)
    _, _, tests = blocks[1].strip().partition(" && ")
    argv = shlex.split(tests)
    if not argv or argv[0] != "python":
        raise SystemExit(f"README's test command is not 'python -m pytest ...': {tests!r}")
    return [sys.executable, *argv[1:]]


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(args: argparse.Namespace) -> dict[str, object]:
    argv = readme_test_argv()
    if args.quick:
        argv.append(QUICK_MODULE)
    # As written: tests/conftest.py gives the session its own short temp dir (run sockets
    # live under it) and removes it after a green run.
    cpu_before = _children_cpu_s()
    began = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - began
    cpu = _children_cpu_s() - cpu_before
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error)",
                                                      summary)}
    return {
        "suite_command": " ".join(["python", *argv[1:]]),
        "suite_exit_code": proc.returncode,
        "suite_wall_s": round(wall, 1),
        "suite_cpu_s": round(cpu, 1),
        "tests_passed": counts.get("passed", 0),
        "tests_failed": counts.get("failed", 0) + counts.get("error", 0),
        "tests_skipped": counts.get("skipped", 0),
    }
