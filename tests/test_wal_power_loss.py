"""Power loss at every operation: the recording file system rebuilds each disk a crash
could leave (unsynced writes dropped, kept in part or torn at 512 B / 4 KiB sectors,
unsynced creates, renames and unlinks dropped) and each one must recover with every
acknowledged record, the checkpoint digest that was sent, contiguous seqs, and a log
that keeps working. ``--crash-states N`` checks N states (0: all of a bigger campaign)."""

from __future__ import annotations

import pytest

from nkat.supervisor.wal.testing.crashcheck import run_campaign, run_workload
from nkat.supervisor.wal.testing.recording import RecordingIO


def test_every_crash_state_recovers(crash_states: int | None) -> None:
    if crash_states is None:  # every state of the default campaign, about 2500
        result = run_campaign(None, seed=0)
    else:
        scale = max(1, crash_states // 2000)
        result = run_campaign(crash_states or None, seed=0, workloads=4 * scale,
                              second_lives=8 * scale)
    assert result.states_checked >= min(500, crash_states or 500)
    assert result.violations == []


@pytest.mark.slow
def test_thousands_of_crash_states_recover() -> None:
    result = run_campaign(None, seed=1000, workloads=24, second_lives=60)
    assert result.states_checked > 10_000
    assert result.violations == []


def test_the_campaign_sees_states_of_every_kind() -> None:
    states = run_workload(1).io.crash_states()
    labels = " | ".join(s.label for s in states)
    for kind in ("writes none", "writes all", "torn at 512", "torn at 4096", "head kept",
                 "tail kept", "dir ops ["):
        assert kind in labels, kind


@pytest.mark.parametrize("skipped", ["fdatasync", "fsync_dir"])
def test_the_campaign_catches_a_missing_sync(monkeypatch: pytest.MonkeyPatch,
                                             skipped: str) -> None:
    """The checker is not vacuous: a log that skips a sync loses acknowledged data."""
    monkeypatch.setattr(RecordingIO, skipped, lambda self, target: None)
    result = run_campaign(300, seed=0, workloads=2, second_lives=0, stop_at_violation=True)
    assert result.violations
