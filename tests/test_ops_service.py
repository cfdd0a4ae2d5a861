"""``install-service``: the unit parses, names the right command and exit codes, passes
``systemd-analyze verify`` where that exists, installs atomically for a user; and
``start --boot`` with real processes resumes only the run a SIGKILL interrupted, never
the completed one or the one an operator stopped."""

from __future__ import annotations

import configparser
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nkat.supervisor.ops.inspect import run_state_from_disk
from nkat.supervisor.ops.service import render_unit
from nkat.supervisor.rundir import RunDir
from tests.test_ops_support import ops_argv, ops_env, run_ops, supervise


def parse_unit(text: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    unit.read_string(text)
    return unit


def test_printed_unit_runs_start_boot_with_the_right_policy(tmp_path):
    state = tmp_path / "state dir"  # a space must survive systemd's quoting
    out = run_ops("install-service", "--state-dir", str(state), "--print")
    assert out.returncode == 0, out.stderr
    unit = parse_unit(out.stdout)
    assert unit.sections() == ["Unit", "Service", "Install"]
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == str(Path(sys.executable).absolute()) and Path(argv[0]).is_absolute()
    assert argv[1:] == ["-m", "nkat.supervisor", "start", "--boot", "--quiet", "--state-dir",
                        str(state.resolve())]
    assert service["Type"] == "simple"
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"].split() == ["2", "3", "4"]
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"
    assert int(service["TimeoutStopSec"]) >= 30
    assert shlex.split(service["Environment"]) == [f"NKAT_STATE_DIR={state.resolve()}"]
    assert "local-fs.target" in unit["Unit"]["After"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_percent_and_dollar_are_escaped_for_systemd():
    text = render_unit(state=Path("/srv/100%/$HOME"), python="/usr/bin/python3",
                       user_unit=True, run_as=None, persistenced=False)
    service = parse_unit(text)["Service"]
    assert service["ExecStart"].endswith("--state-dir /srv/100%%/$$HOME")
    assert "User" not in service and "After" not in parse_unit(text)["Unit"]
    assert parse_unit(text)["Install"]["WantedBy"] == "default.target"
    with_gpu = parse_unit(render_unit(state=Path("/s"), python="/p", user_unit=False,
                                      run_as="gpu", persistenced=True))
    assert with_gpu["Unit"]["Wants"] == "nvidia-persistenced.service"
    assert with_gpu["Service"]["User"] == "gpu"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("scope", [[], ["--user"]])
def test_systemd_analyze_verify_accepts_the_unit(tmp_path, scope):
    out = run_ops("install-service", "--state-dir", str(tmp_path / "st %x"), "--print", *scope)
    assert out.returncode == 0, out.stderr
    path = tmp_path / "nkat-supervise.service"
    path.write_text(out.stdout)
    # System mode for both: a user manager is not running in a test environment.
    check = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert "nkat-supervise.service" not in check.stderr, check.stderr


def test_user_install_writes_the_unit_and_says_how_to_enable_it(tmp_path):
    env = ops_env(XDG_CONFIG_HOME=str(tmp_path / "config"))
    out = subprocess.run([*ops_argv("install-service"), "--user", "--state-dir",
                          str(tmp_path / "st")], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    path = tmp_path / "config" / "systemd" / "user" / "nkat-supervise.service"
    assert parse_unit(path.read_text())["Service"]["ExecStart"].endswith(str(tmp_path / "st"))
    assert path.stat().st_mode & 0o777 == 0o644
    assert "systemctl --user enable --now nkat-supervise.service" in out.stdout
    assert "loginctl enable-linger" in out.stdout
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


# start --boot -----------------------------------------------------------------------------
TOY = ["--set", "job=tests.jobs.toy:Toy", "--set", "checkpoint_interval=0.2"]


def _start(state: Path, run_id: str, *options: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "nkat.supervisor", "start", "--state-dir",
                             str(state), "--quiet", "--run-id", run_id, *TOY, *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ops_env(), start_new_session=True)


def _wait_for(state: Path, run_id: str, event: str, proc: subprocess.Popen[str]) -> None:
    log = state / "runs" / run_id / "logs" / "supervisor.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if log.exists() and any(json.loads(t).get("event") == event
                                for t in log.read_text().splitlines() if t.endswith("}")):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{run_id}: no {event} within 30 s")


def _released(run: RunDir) -> None:
    deadline = time.monotonic() + 10
    while run.holder_pid() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.holder_pid() is None


def test_boot_resumes_only_the_interrupted_run(tmp_path):
    state = tmp_path
    done = supervise(state, "--run-id", "done", *TOY, "--set", "params.units=16")
    assert done.returncode == 0, done.stderr

    stopped = _start(state, "stopped", "--set", "params.units=4000",
                     "--set", "params.unit_seconds=0.01")
    try:
        _wait_for(state, "stopped", "checkpoint.durable", stopped)
        # An operator's stop (Ctrl-C or `nkat-supervise stop`) stays stopped; SIGTERM, which
        # is also what a shutting-down machine sends, is resumed at boot (tested below).
        stopped.send_signal(signal.SIGINT)
        assert stopped.wait(timeout=30) == 4, stopped.communicate()
    finally:
        if stopped.poll() is None:
            os.killpg(stopped.pid, signal.SIGKILL)

    units = 80
    victim = _start(state, "interrupted", "--set", f"params.units={units}",
                    "--set", "params.unit_seconds=0.03")
    _wait_for(state, "interrupted", "checkpoint.durable", victim)
    os.killpg(victim.pid, signal.SIGKILL)  # power cut, as far as the run can tell
    victim.wait(timeout=10)
    runs = {name: RunDir.open(state, name) for name in ("done", "stopped", "interrupted")}
    _released(runs["interrupted"])
    assert {n: run_state_from_disk(r) for n, r in runs.items()} == {
        "done": "completed", "stopped": "stopped", "interrupted": "interrupted"}
    done_result = runs["done"].result_file.read_bytes()

    boot = supervise(state, "--boot")
    assert boot.returncode == 0, boot.stderr
    result = runs["interrupted"].read_result()
    assert result is not None and result["merged"] == units
    assert result["provenance"]["epochs"] == 2
    log = runs["interrupted"].log_file.read_text()
    assert '"event": "run.recovered_unclean"' in log
    assert run_state_from_disk(runs["stopped"]) == "stopped"
    assert runs["stopped"].read_result() is None
    assert runs["done"].result_file.read_bytes() == done_result

    again = supervise(state, "--boot")
    assert again.returncode == 0 and "nothing to do" in again.stdout
