"""``nkat-supervise report``: PNG plots and a short summary of a run, finished or not.

    nkat-supervise report [RUN] --out DIR

Writes ``s_curve.png`` (S(N) from the result's ``curve`` block, once there is a result),
``throughput.png`` (dims/s, or units/s for other jobs, between checkpoints) and
``temperature.png`` (GPU readings found in the log), these two with restarts, worker
exits, thermal stops and checkpoints marked, and ``summary.md``. Everything comes from files
(run.toml, the JSON log, the WAL, the result), so it works while the supervisor runs and
long after. matplotlib is the optional extra ``report``; it is imported only here.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

from nkat.supervisor.exitcode import ExitCode
from nkat.supervisor.ops.logview import line_time, read_log, resolve_run
from nkat.supervisor.rundir import RunDir, state_dir

NC = 17.2644  # the seed's critical dimension, marked on the S(N) plot
RESTART_EVENT = "worker.restart_scheduled"
EXIT_EVENT = "worker.exited"
THERMAL_STOP_EVENTS = ("thermal.stop", "thermal.kill_now", "thermal.cooling")
CHECKPOINT_EVENT = "checkpoint.durable"
# A reading carries "temperature"; the thermal ladder's events carry the reading that
# triggered them, so a log without periodic readings still shows the peaks that mattered.
TEMPERATURE_EVENTS = ("gpu.reading", "thermal.")


@dataclasses.dataclass
class Timeline:
    """What the log says happened, in seconds since the run's first log line. A rate is
    (from, to, per second): the average between two progress points of one worker."""

    start: float | None = None
    rates: list[tuple[float, float, float]] = dataclasses.field(default_factory=list)
    temperatures: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    checkpoints: list[float] = dataclasses.field(default_factory=list)
    restarts: list[float] = dataclasses.field(default_factory=list)
    exits: list[float] = dataclasses.field(default_factory=list)
    thermal_stops: list[float] = dataclasses.field(default_factory=list)
    restart_reasons: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter)
    thermal_counts: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter)
    epochs: int = 0


def _nkat_dims(spec: dict[str, Any]) -> tuple[int, int] | None:
    from nkat.supervisor.ops.metrics import nkat_dims  # prometheus_client: only when reporting

    return nkat_dims(spec)


class TimelineReader:
    """Builds a :class:`Timeline` from log records fed oldest first: ``read_timeline`` feeds
    a whole log, the status page the lines written since its last look.

    Rates are per worker epoch, from its start (``worker.started`` carries where it resumed)
    and each durable checkpoint, times ``scale`` (dimensions per unit, or 1)."""

    def __init__(self, scale: float) -> None:
        self.timeline = Timeline()
        self.scale = scale
        self._last_point: dict[int, tuple[float, int]] = {}

    def feed(self, rec: dict[str, Any]) -> None:
        tl = self.timeline
        when = line_time(rec)
        if when is None:
            return
        if tl.start is None:
            tl.start = when
        t = when - tl.start
        event = rec["event"]
        epoch = rec.get("epoch")
        if isinstance(epoch, int):
            tl.epochs = max(tl.epochs, epoch)
        units = rec.get("units_done")
        if event in ("worker.started", CHECKPOINT_EVENT) and isinstance(units, int) \
                and isinstance(epoch, int):
            before = self._last_point.get(epoch)
            if before is not None and t > before[0]:
                tl.rates.append((before[0], t,
                                 (units - before[1]) / (t - before[0]) * self.scale))
            self._last_point[epoch] = (t, units)
            if event == CHECKPOINT_EVENT:
                tl.checkpoints.append(t)
        temperature = rec.get("temperature")
        if event.startswith(TEMPERATURE_EVENTS) and isinstance(temperature, (int, float)):
            tl.temperatures.append((t, float(temperature)))
        if event == RESTART_EVENT:
            tl.restarts.append(t)
            tl.restart_reasons[str(rec.get("exit_class") or rec.get("reason"))] += 1
        elif event == EXIT_EVENT and rec.get("exit_class") != "completed":
            tl.exits.append(t)
        elif event in THERMAL_STOP_EVENTS:
            tl.thermal_stops.append(t)
        if event.startswith("thermal."):
            tl.thermal_counts[event] += 1


def read_timeline(run: RunDir, scale: float) -> Timeline:
    """The timeline of the run's whole log (see :class:`TimelineReader`)."""
    reader = TimelineReader(scale)
    for _line, rec in read_log(run.log_file):
        reader.feed(rec)
    return reader.timeline


# Plots -------------------------------------------------------------------------------------
def _time_axis(tl: Timeline) -> tuple[float, str]:
    """A divisor and label that keep the time axis readable for seconds or days."""
    times = [t for _, t, _ in tl.rates] + [t for t, _ in tl.temperatures] + tl.checkpoints
    span = max(times, default=0.0)
    for divisor, name in ((86400.0, "days"), (3600.0, "hours"), (60.0, "minutes")):
        if span >= 3 * divisor:
            return divisor, name
    return 1.0, "seconds"


def _mark_events(ax: Any, tl: Timeline, divisor: float) -> None:
    def vlines(times: list[float], **style: Any) -> None:
        for i, t in enumerate(times):
            ax.axvline(t / divisor, label=style.pop("label", None) if i == 0 else None,
                       **style)

    vlines(tl.exits, color="0.5", linestyle=":", linewidth=1, label="worker exited")
    vlines(tl.restarts, color="tab:red", linestyle="--", linewidth=1, label="restart")
    vlines(tl.thermal_stops, color="tab:orange", linestyle="-", linewidth=2, alpha=0.6,
           label="thermal stop")
    if tl.checkpoints:
        # A rug along the bottom: there may be thousands, too many for lines.
        ax.plot([t / divisor for t in tl.checkpoints], [0.02] * len(tl.checkpoints), "|",
                color="tab:green", markersize=8, transform=ax.get_xaxis_transform(),
                label="checkpoint")


def _figure(figure_cls: Any) -> tuple[Any, Any]:
    fig = figure_cls(figsize=(9, 4.5), layout="constrained")
    return fig, fig.add_subplot()


def plot_curve(figure_cls: Any, curve: dict[str, list[float]], out: Path, run_id: str) -> None:
    n, s = curve["N"], curve["S"]
    fig, ax = _figure(figure_cls)
    ax.plot(n, s, color="tab:blue", linewidth=1.5, label="S(N)")
    if n and max(n) / max(min(n), 1) > 1000:
        ax.set_xscale("log")
    if n and min(n) <= NC <= max(n):
        ax.axvline(NC, color="0.5", linestyle=":", label=f"Nc = {NC}")
    ax.set_xlabel("N")
    ax.set_ylabel("S(N)")
    ax.set_title(f"S(N) — run {run_id}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    fig.savefig(out, dpi=100)


def plot_throughput(figure_cls: Any, tl: Timeline, out: Path, ylabel: str, title: str) -> None:
    """Each average is drawn over its own interval, so a worker's downtime is a gap."""
    divisor, unit = _time_axis(tl)
    fig, ax = _figure(figure_cls)
    ax.hlines([r for _, _, r in tl.rates], [t0 / divisor for t0, _, _ in tl.rates],
              [t1 / divisor for _, t1, _ in tl.rates], color="tab:blue", linewidth=2,
              label=ylabel)
    ax.set_ylim(bottom=0)
    _finish_timeline(ax, tl, divisor, unit, ylabel, title)
    fig.savefig(out, dpi=100)


def plot_temperature(figure_cls: Any, tl: Timeline, out: Path, title: str) -> None:
    divisor, unit = _time_axis(tl)
    fig, ax = _figure(figure_cls)
    ax.plot([t / divisor for t, _ in tl.temperatures], [v for _, v in tl.temperatures], "o-",
            markersize=3, linewidth=1, color="tab:purple", label="GPU °C")
    _finish_timeline(ax, tl, divisor, unit, "GPU °C", title)
    fig.savefig(out, dpi=100)


def _finish_timeline(ax: Any, tl: Timeline, divisor: float, unit: str, ylabel: str,
                     title: str) -> None:
    _mark_events(ax, tl, divisor)
    ax.set_xlabel(f"time since the run's first log line ({unit})")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")  # off the data


# Summary -------------------------------------------------------------------------------------
def scalar_rows(result: dict[str, Any]) -> list[tuple[str, Any]]:
    """The result's figures: scalars at the top and one or two levels down (no curve)."""
    rows: list[tuple[str, Any]] = []

    def walk(prefix: str, value: Any, depth: int) -> None:
        if isinstance(value, dict) and depth < 3:
            for key, inner in value.items():
                if key != "curve":
                    walk(f"{prefix}.{key}" if prefix else key, inner, depth + 1)
        elif value is None or isinstance(value, (str, int, float, bool)):
            rows.append((prefix, value))

    walk("", result, 0)
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def write_summary(path: Path, run: RunDir, status: dict[str, Any], tl: Timeline,
                  checkpoints: list[dict[str, Any]], result: dict[str, Any] | None,
                  notes: list[str], written: list[str]) -> None:
    epochs = max(tl.epochs, status.get("epoch") or 0)
    progress = status.get("progress")
    restarts = ", ".join(f"{why}: {n}" for why, n in tl.restart_reasons.most_common())
    thermal = ", ".join(f"{name}: {n}" for name, n in sorted(tl.thermal_counts.items()))
    lines = [
        f"# Run {run.run_id}",
        "",
        f"- job: `{run.info.spec.get('job')}`, spec hash `{run.info.spec_hash}`, "
        f"created {run.info.created}",
        f"- state: **{status.get('state')}**"
        + (f", progress {progress:.1%}" if isinstance(progress, float) else ""),
        f"- worker epochs: {epochs}",
        f"- restarts: {sum(tl.restart_reasons.values())}" + (f" ({restarts})" if restarts else ""),
        f"- thermal events: {thermal or 'none'}",
        f"- checkpoints made durable (in the log): {len(tl.checkpoints)}; newest durable "
        f"seq {status.get('durable_ckpt_seq') or 0}; retained in the WAL: {len(checkpoints)}",
    ]
    if tl.rates:
        rates = sorted(r for _, _, r in tl.rates)
        unit = "dims/s" if _nkat_dims(run.info.spec) else "units/s"
        lines.append(f"- throughput between checkpoints: median {_fmt(rates[len(rates) // 2])}"
                     f" {unit}, max {_fmt(rates[-1])} {unit}")
    lines += ["", "## Result", ""]
    if result is None:
        lines.append("No result yet: the run has not completed.")
    else:
        lines += ["| figure | value |", "| --- | --- |"]
        lines += [f"| {key} | {_fmt(value)} |" for key, value in scalar_rows(result)]
    lines += ["", "## Plots", ""]
    lines += [f"- [{name}]({name})" for name in written] or ["none"]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    path.write_text("\n".join(lines) + "\n")


# The command ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", nargs="?", help="run id (default: the newest run)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="where to write the PNGs and summary.md "
                             "(default: ./report-RUN)")


def run(args: argparse.Namespace) -> int:
    try:
        from matplotlib.figure import Figure  # Agg, without pyplot's global state
    except ImportError:
        print("nkat-supervise: error: report needs matplotlib; install the extra: "
              "pip install 'nkat-supervise[report]'", file=sys.stderr)
        return ExitCode.USAGE
    the_run = resolve_run(state_dir(args.state_dir), args.run)
    out: Path = args.out or Path(f"report-{the_run.run_id}")
    out.mkdir(parents=True, exist_ok=True)
    return write_report(the_run, out, Figure)


def write_report(run: RunDir, out: Path, figure_cls: Any) -> int:
    from nkat.supervisor.ops.inspect import list_checkpoints, run_status  # the WAL reader

    dims = _nkat_dims(run.info.spec)
    tl = read_timeline(run, float(dims[0]) if dims else 1.0)
    status = run_status(run)
    result = run.read_result()
    notes: list[str] = []
    written: list[str] = []
    curve = (result or {}).get("curve")
    if isinstance(curve, dict) and curve.get("N") and len(curve["N"]) == len(curve.get("S", [])):
        plot_curve(figure_cls, curve, out / "s_curve.png", run.run_id)
        written.append("s_curve.png")
    else:
        notes.append("no S(N) plot: " + ("the run has no result yet" if result is None
                                         else "the result has no curve block"))
    if tl.rates:
        ylabel = "dims/s" if dims else "units/s"
        plot_throughput(figure_cls, tl, out / "throughput.png", ylabel,
                        f"throughput between checkpoints — run {run.run_id}")
        written.append("throughput.png")
    else:
        notes.append("no throughput plot: the log has no worker start and checkpoint, or two "
                     "checkpoints, of one worker")
    if tl.temperatures:
        plot_temperature(figure_cls, tl, out / "temperature.png",
                         f"GPU temperature — run {run.run_id}")
        written.append("temperature.png")
    else:
        notes.append("no temperature plot: the log has no GPU temperature readings "
                     "(no GPU, or none crossed a thermal threshold)")
    write_summary(out / "summary.md", run, status, tl, list_checkpoints(run), result, notes,
                  written)
    for name in [*written, "summary.md"]:
        print(out / name)
    for note in notes:
        print(f"  {note}", file=sys.stderr)
    return ExitCode.OK
