"""Run directory faults: bad run ids, a second supervisor on the same run, torn or empty
status and result files, temporary files a crash left behind."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nkat.protocol.messages import spec_hash
from nkat.supervisor.rundir import (
    RunDir,
    RunDirError,
    RunExists,
    RunLocked,
    Stored,
    list_runs,
    state_dir,
)

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


def test_status_is_fsynced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    """A lazy file system drops what is not synced: renaming an unsynced status.json
    over the old one left it 0 bytes after every power cut."""
    run = RunDir.create(tmp_path, "r1", SPEC, {})
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        calls.append(f"rename {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run.write_status({"state": "running"})
    assert calls == ["fsync file", "rename status.json", "fsync dir"]


def test_an_empty_or_torn_status_or_result_reads_as_absent_and_says_so(tmp_path):
    run = RunDir.create(tmp_path, "r1", SPEC, {})
    assert run.read_status_file() == Stored(None) and run.read_result_file() == Stored(None)
    for path, read in ((run.status_file, run.read_status_file),
                       (run.result_file, run.read_result_file)):
        path.write_bytes(b"")
        stored = read()
        assert stored.data is None and "empty" in str(stored.problem)
        assert path.name in str(stored.problem)
        path.write_bytes(b'{"state": "runn')
        stored = read()
        assert stored.data is None and "torn" in str(stored.problem)
        path.write_bytes(b"[1, 2]")
        assert read().data is None and "object" in str(read().problem)
    assert run.read_status() is None and run.read_result() is None


KILLED_MID_WRITE = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from nkat.supervisor.rundir import RunDir
    run = RunDir.open(Path(sys.argv[1]), "r1")
    def hang(fd):  # the power cut comes while the result is being synced
        print("writing", flush=True)
        time.sleep(60)
    os.fsync = hang
    run.write_result({"answer": 42})
""")


def _killed_at(script: str, state: Path, line: str) -> int:
    """Run ``script`` on ``state`` in a child, SIGKILL it once it prints ``line`` (where
    it hangs); returns its pid."""
    child = subprocess.Popen([sys.executable, "-c", script, str(state)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == line
    finally:
        child.kill()
        child.wait()
    return child.pid


def test_a_write_killed_before_its_rename_leaves_no_temp_file_after_the_next_lock(tmp_path):
    run = RunDir.create(tmp_path, "r1", SPEC, {})
    pid = _killed_at(KILLED_MID_WRITE, tmp_path, "writing")
    left = [p.name for p in (run.path / "results").iterdir()]
    assert left == [f".result.json.{pid}.tmp"]
    (run.path / f".status.json.{pid + 1}.tmp").write_bytes(b"")
    keep = [run.path / "notes.tmp", run.path / ".hidden", run.path / "results" / "x.json.tmp"]
    for path in keep:
        path.write_bytes(b"mine")
    with run.lock():
        assert sorted(p.name for p in run.removed_temp_files) == sorted(
            [f".result.json.{pid}.tmp", f".status.json.{pid + 1}.tmp"])
        assert not (run.path / "results" / f".result.json.{pid}.tmp").exists()
        assert run.read_result() is None  # the write never happened: no result, not a torn one
    assert all(p.exists() for p in keep)


KILLED_MID_CREATE = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from nkat.supervisor.rundir import RunDir
    def hang(src, dst):  # the power cut comes as the built run is renamed into place
        print("renaming", flush=True)
        time.sleep(60)
    os.rename = hang
    RunDir.create(Path(sys.argv[1]), "r1", {"job": "j", "params": {}}, {})
""")


def test_a_creation_killed_before_its_rename_leaves_no_run_and_blocks_nothing(tmp_path):
    """A start killed while it made its run directory leaves no half-made run: not one
    without run.toml under the id (which no later start could use), not one in the list."""
    pid = _killed_at(KILLED_MID_CREATE, tmp_path, "renaming")
    runs = tmp_path / "runs"
    building = runs / f".r1.{pid}.tmp"
    assert sorted(p.name for p in runs.iterdir()) == [building.name]
    assert (building / "run.toml").exists() and (building / "wal").is_dir()
    assert list_runs(tmp_path) == []
    with pytest.raises(RunDirError, match="no run 'r1'"):
        RunDir.open(tmp_path, "r1")
    run = RunDir.create(tmp_path, "r1", SPEC, {})
    assert RunDir.open(tmp_path, "r1").info.spec == SPEC
    assert sorted(p.name for p in runs.iterdir()) == ["r1"]  # the dead build is gone
    assert [r.run_id for r in list_runs(tmp_path)] == [run.run_id]


def test_an_id_taken_by_a_directory_without_run_toml_is_refused_saying_so(tmp_path):
    (tmp_path / "runs" / "r2").mkdir(parents=True, mode=0o700)
    with pytest.raises(RunExists, match="holds no run.toml"):
        RunDir.create(tmp_path, "r2", SPEC, {})
    with pytest.raises(RunDirError, match="may not start with a dot"):
        RunDir.create(tmp_path, ".r2.1.tmp", SPEC, {})


RACE_TO_CREATE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from nkat.supervisor.rundir import RunDir, RunExists
    go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.001)
    try:
        RunDir.create(Path(sys.argv[1]), "r3", {"job": "j", "params": {"n": int(sys.argv[3])}},
                      {})
    except RunExists:
        print("exists")
    else:
        print("made")
""")


def test_processes_racing_to_create_one_id_make_one_whole_run(tmp_path):
    go = tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", RACE_TO_CREATE, str(tmp_path), str(go),
                                str(n)], stdout=subprocess.PIPE, text=True) for n in range(6)]
    time.sleep(0.5)  # every racer imported and waiting
    go.touch()
    said = [r.communicate(timeout=60)[0].strip() for r in racers]
    assert all(r.returncode == 0 for r in racers)
    assert sorted(said) == ["exists"] * 5 + ["made"]
    winner = said.index("made")
    assert RunDir.open(tmp_path, "r3").info.spec["params"] == {"n": winner}
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r3"]


def test_runs_of_one_spec_started_in_one_second_get_distinct_ids(tmp_path):
    """Two `start --fresh` of one spec within a second (a script, one per GPU) both run:
    the second id gets ``.2``, not "already exists"."""
    from nkat.supervisor.config import load_config
    from nkat.supervisor.launch import Plan

    config = load_config(None, ["max_dimension=1000"])
    spec = config.job_spec()
    now = time.time()
    # Whichever of the next three seconds the creations land in, its plain id is taken.
    taken = {time.strftime("%Y%m%d-%H%M%S", time.localtime(now + k)) + "-" + spec_hash(spec)[:6]
             for k in range(3)}
    for run_id in taken:
        RunDir.create(tmp_path, run_id, spec, {})
    first, second = Plan("new", config).create(tmp_path), Plan("new", config).create(tmp_path)
    assert first.run_id.removesuffix(".2") in taken and first.run_id.endswith(".2")
    assert second.run_id != first.run_id and second.run_id.rsplit(".", 1)[0] in taken
    assert first.info.spec == second.info.spec == spec
