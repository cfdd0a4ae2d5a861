"""Smoke test of tools/crash_campaign.py: a short random-kill campaign on real processes.

Nine kills, three of each kind (worker, supervisor, both at once), 0.8 to 1.6 s apart
(a restarted run needs most of a second to checkpoint on a loaded machine), on a small
job; the run must still end with the uninterrupted result, byte for byte, without losing
an acknowledged checkpoint or leaving a worker behind. At least three kills must land
after a checkpoint, and an epoch must resume from one, so that the check of acknowledged
checkpoints and the resume are real. (A kill often lands before the restarted epoch is
welcomed on a loaded machine, so the resumes are fewer than those kills.) The full
campaign is ``python tools/crash_campaign.py --kills 30``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CAMPAIGN = Path(__file__).resolve().parent.parent / "tools" / "crash_campaign.py"


@pytest.mark.timeout(180)
def test_random_kills_keep_the_result_and_every_acked_checkpoint(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(CAMPAIGN), "--kills", "9", "--seed", "3", "--target", "both",
         "--max-dimension", "1e8", "--interval", "0.8", "1.6", "--state-dir", str(tmp_path),
         "--quiet"],
        capture_output=True, text=True, timeout=170)
    assert proc.stdout, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["kills"] == 9, summary["notes"]
    assert summary["kills_by_kind"] == {"worker": 3, "supervisor": 3, "both": 3}
    assert summary["result_identical"], summary
    # Not vacuous: kills found a checkpoint, and an epoch resumed from one.
    assert sum(k["acked"] > 0 for k in summary["kill_log"]) >= 3, summary["kill_log"]
    assert summary["resumes"] >= 1, summary
    assert summary["acked_lost"] == 0, summary["acked_lost_detail"]
    assert summary["orphans"] == 0 and summary["leftover_processes"] == 0, summary["notes"]
    assert summary["supervisor_exit"] == 0 and summary["wal_verify_ok"], summary["notes"]
    assert summary["supervisor_starts"] == 1 + summary["supervisor_kills"]
    assert proc.returncode == 0
