"""Run directory faults: bad run ids, a second supervisor on the same run, torn status."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from nkat.supervisor.rundir import RunDir, RunDirError, RunLocked, list_runs, state_dir

SPEC = {"job": "nkat-highdim", "params": {"max_dimension": 10}}


def test_layout_and_modes(tmp_path):
    run = RunDir.create(tmp_path, "r1", SPEC, {"a": 1, "b": None})
    assert stat.S_IMODE(run.path.stat().st_mode) == 0o700
    assert (run.path / "run.toml").exists()
    again = RunDir.open(tmp_path, "r1")
    assert again.info.spec == SPEC and again.info.config == {"a": 1}
    assert [r.run_id for r in list_runs(tmp_path)] == ["r1"]
    with pytest.raises(RunDirError, match="already exists"):
        RunDir.create(tmp_path, "r1", SPEC, {})


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "x" * 65, "..", "sp ace"])
def test_invalid_run_ids(tmp_path, bad):
    with pytest.raises(RunDirError, match="invalid run id"):
        RunDir.create(tmp_path, bad, SPEC, {})


def test_second_holder_in_another_process_is_named(tmp_path):
    run = RunDir.create(tmp_path, "r1", SPEC, {})
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from nkat.supervisor.rundir import RunDir
        run = RunDir.open(Path({str(tmp_path)!r}), "r1")
        with run.lock():
            print("locked", flush=True)
            time.sleep(30)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run.holder_pid() == holder.pid
        with pytest.raises(RunLocked) as err, run.lock():
            pass
        assert f"pid {holder.pid}" in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    assert run.holder_pid() is None  # the kernel released the dead holder's lock
    with run.lock():
        assert run.holder_pid() == os.getpid() or run.holder_pid() is None


def test_status_and_result_are_replaced_atomically(tmp_path):
    run = RunDir.create(tmp_path, "r1", SPEC, {})
    run.write_status({"state": "running"})
    run.write_status({"state": "completed"})
    assert run.read_status() == {"state": "completed"}
    assert not [p for p in run.path.iterdir() if p.name.endswith(".tmp")]
    run.status_file.write_text("{torn")
    assert run.read_status() is None


def test_state_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("NKAT_STATE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "x"))
    assert state_dir(None) == tmp_path / "a"
    assert state_dir(tmp_path / "b") == tmp_path / "b"
    monkeypatch.delenv("NKAT_STATE_DIR")
    assert state_dir(None) == tmp_path / "x" / "nkat-supervise"
