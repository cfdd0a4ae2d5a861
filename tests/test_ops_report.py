"""``nkat-supervise report``: PNGs that matplotlib reads back and a summary, for a finished
real run and for an unfinished one with restarts, thermal stops and readings in its log;
and a clear error when the optional matplotlib is missing."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from nkat.supervisor.ops import report
from nkat.supervisor.rundir import RunDir
from tests.test_ops_support import nkat_run, run_ops

__all__ = ["nkat_run"]  # a fixture, imported so pytest finds it here

# matplotlib is imported by the tests that draw, not at collection, which every xdist
# worker pays for.
if importlib.util.find_spec("matplotlib") is None:
    pytest.skip("matplotlib is not installed (the report extra)", allow_module_level=True)


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.stat().st_size > 1000
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0  # not a blank canvas


def test_a_finished_run_gets_its_curve_throughput_and_summary(nkat_run, tmp_path):
    state, run_id = nkat_run
    out = tmp_path / "rep"
    done = run_ops("report", run_id, "--state-dir", str(state), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert_png(out / "s_curve.png")
    summary = (out / "summary.md").read_text()
    assert f"# Run {run_id}" in summary and "**completed**" in summary
    assert "| summary.total_dimensions | 3000000 |" in summary
    assert "s_curve.png" in summary
    listed = {Path(p).name for p in done.stdout.split()}
    assert {"s_curve.png", "summary.md"} <= listed
    for name in listed:
        if name.endswith(".png"):
            assert_png(out / name)


def _line(t0: datetime, seconds: float, event: str, **fields: object) -> str:
    ts = (t0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")
    return json.dumps({"run_id": "u1", "component": "supervisor", **fields, "event": event,
                       "level": "info", "ts": ts})


def test_an_unfinished_run_plots_what_its_log_has(tmp_path):
    run = RunDir.create(tmp_path, "u1", {"job": "nkat-highdim", "params": {
        "min_dimension": 1, "max_dimension": 10_000_000, "unit_dims": 1000}}, {})
    t0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    lines = [_line(t0, 0, "run.started"),
             _line(t0, 1, "worker.started", epoch=1, units_done=0),
             _line(t0, 11, "checkpoint.durable", epoch=1, units_done=1000, ckpt_seq=1),
             _line(t0, 21, "checkpoint.durable", epoch=1, units_done=2100, ckpt_seq=2),
             _line(t0, 25, "thermal.throttle", temperature=80.5),
             _line(t0, 30, "thermal.stop", temperature=83.2),
             _line(t0, 31, "worker.exited", epoch=1, exit_class="thermal"),
             _line(t0, 32, "thermal.cooling", epoch=1),
             _line(t0, 90, "gpu.reading", temperature=74.0),
             _line(t0, 91, "thermal.resume", temperature=74.0),
             _line(t0, 92, "worker.started", epoch=2, units_done=2100),
             _line(t0, 102, "checkpoint.durable", epoch=2, units_done=3000, ckpt_seq=3),
             _line(t0, 110, "worker.exited", epoch=2, exit_class="crashed"),
             _line(t0, 110, "worker.restart_scheduled", exit_class="crashed",
                   reason="crashed: killed by SIGSEGV"),
             _line(t0, 112, "worker.started", epoch=3, units_done=3000),
             _line(t0, 122, "checkpoint.durable", epoch=3, units_done=4200, ckpt_seq=4)]
    # Rotated once: the report reads .1 before the live file.
    (run.log_dir / "supervisor.jsonl.1").write_text("\n".join(lines[:8]) + "\n")
    run.log_file.write_text("\n".join(lines[8:]) + "\n")

    timeline = report.read_timeline(run, 1000.0)
    assert [(t0, t1, round(r)) for t0, t1, r in timeline.rates] == [
        (1, 11, 100_000), (11, 21, 110_000), (92, 102, 90_000), (112, 122, 120_000)]
    assert [v for _, v in timeline.temperatures] == [80.5, 83.2, 74.0, 74.0]
    assert timeline.epochs == 3 and timeline.restart_reasons == {"crashed": 1}
    assert len(timeline.thermal_stops) == 2 and len(timeline.checkpoints) == 4

    out = tmp_path / "rep"
    done = run_ops("report", "--state-dir", str(tmp_path), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert_png(out / "throughput.png")
    assert_png(out / "temperature.png")
    assert not (out / "s_curve.png").exists()
    assert "no S(N) plot: the run has no result yet" in done.stderr
    summary = (out / "summary.md").read_text()
    assert "No result yet" in summary
    assert "- restarts: 1 (crashed: 1)" in summary
    assert "thermal.stop: 1" in summary
    assert "- worker epochs: 3" in summary


def test_without_matplotlib_it_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    args = argparse.Namespace(state_dir=str(tmp_path), run=None, out=tmp_path / "rep")
    assert report.run(args) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "nkat-supervise[report]" in err
    assert not (tmp_path / "rep").exists()
