"""Command-line figures for ``python tools/bench.py cli [--json] [--quick]``: how quickly an
operator gets answers from a live run. All from real processes in this one run.

    status_latency_ms_p50          ``nkat-supervise status --json RUN`` as a subprocess,
                                   launch to exit, while the supervisor is up (the primary
                                   figure: what an operator waits); _inprocess: one
                                   ``control.request(..., "status")`` round trip. The live
                                   run's worker computes on one thread (``cpu_threads=1``,
                                   as a GPU worker's host side does): a NumPy worker on
                                   every core of this 2-core machine would make the
                                   command wait for a core, which measures the machine.
    logs_follow_lag_ms_p50         a log line's ``ts`` -> that line read from the stdout of
                                   ``nkat-supervise logs -f --json RUN``; null, with
                                   logs_follow_note, where the CLI has no ``logs`` command.
    start_to_first_progress_s      launching ``nkat-supervise start`` for a fresh run -> the
                                   first beat with units done (default heartbeat settings:
                                   the worker beats at once after its first batch; read
                                   from the run's events socket); the median of a few fresh runs.
                                   _ckpt: -> the first ``checkpoint.durable`` (checkpoints
                                   every 0.1 s), an upper bound by another road.
                                   start_breakdown_p50: launch -> ``wal.recovered`` (the
                                   supervisor is up), -> ``worker.spawned``,
                                   -> ``worker.welcomed``, -> that first beat.
    web_first_paint_ms             ``nkat-supervise serve``'s page in headless Chromium (the
                                   system chromium, driven by Playwright): navigation start
                                   -> first contentful paint, the median of a few fresh
                                   pages; _cold: the first one; web_first_data_ms: -> the
                                   runs on screen (the page's ``nkat-runs-shown`` mark).
    web_update_lag_ms_p50          a progress change -> that ``units_done`` shown in the page
                                   (a MutationObserver's clock against this process's: one
                                   machine, one clock). The change is the beat that carried
                                   it, read from the run's events socket: the supervisor
                                   knows it then, and writes status.json from the same
                                   status up to a second later. _disk: from the moment
                                   status.json first held it (the page, which asks the live
                                   supervisor, is often ahead of the disk: then 0).
                                   null, with web_note, without playwright or chromium.
    notify_lag_ms_p50              a run's ``run.completed`` (the event's log line ``ts``) ->
                                   the document received by a webhook on 127.0.0.1 (its
                                   handler's wall clock once the body is read): a fresh
                                   ``nkat-supervise start --backend numpy`` with
                                   ``notify_url`` set, run to the end, per sample.
    preempt_notice_to_durable_ms_p50   a spot notice published on the fake AWS metadata
                                   service (nkat.supervisor.testing.metadata_fake, at a
                                   random phase of the default 1 s poll) -> the ``ts`` of
                                   the ``checkpoint.durable`` line of the run's final
                                   checkpoint (the one ``run.stopped`` names), for a run
                                   started with ``preemption=aws`` and ``metadata_url``;
                                   preempt_breakdown_ms_p50: -> ``preemption.notice`` (seen),
                                   then -> that checkpoint durable.

The CLI is the ``nkat-supervise`` script beside this interpreter when installed (else
``python -m nkat.supervisor``); cli_command says which.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchlib import (
    EventStream,
    LogTail,
    SupervisedRun,
    WebhookReceiver,
    cli_command,
    events_of,
    p50,
    percentile,
    rounded,
    ts_wall,
)

from nkat.supervisor import control
from nkat.supervisor.testing.metadata_fake import measure_notice_latency_ms

ENDLESS = 10**12


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = bool(getattr(args, "quick", False))
    command = cli_command()
    figures: dict[str, Any] = {"cli_command": " ".join(Path(c).name for c in command[:3])}
    with tempfile.TemporaryDirectory(prefix="nkat-bench-cli-") as tmp:
        base = Path(tmp)
        figures.update(start_to_first_progress(base, command, runs=1 if quick else 3))
        live = SupervisedRun(base, "live", {"max_dimension": ENDLESS, "checkpoint_interval": 0.1,
                                            "log_max_bytes": 1 << 30, "cpu_threads": 1},
                             command=command)
        try:
            live.start()
            tail = LogTail(live.log_file)
            if tail.follow(lambda e: e.get("event") == "checkpoint.durable", 60,
                           live.running) is None:
                raise RuntimeError(f"bench: the live run never checkpointed: "
                                   f"{live.stderr_tail(500)}")
            figures.update(status_latency(live, command, runs=5 if quick else 20,
                                          calls=50 if quick else 300))
            figures.update(logs_follow_lag(live, command, lines=20 if quick else 60))
            figures.update(web_figures(live, command, base, pages=3 if quick else 7,
                                       watch_s=10 if quick else 30))
        finally:
            live.cleanup()
        figures.update(notify_lag(base, command, runs=3 if quick else 5))
        figures.update(preempt_to_durable(base, command, trials=3 if quick else 5))
    return figures


def status_latency(live: SupervisedRun, command: list[str], runs: int,
                   calls: int) -> dict[str, Any]:
    argv = [*command, "status", "--json", "--state-dir", str(live.state_dir), live.run_id]
    walls = []
    for _ in range(runs):
        started = time.perf_counter()
        out = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        walls.append(time.perf_counter() - started)
        if out.returncode != 0 or json.loads(out.stdout).get("source") != "supervisor":
            raise RuntimeError(f"bench: status did not reach the live supervisor: "
                               f"{out.stdout[-300:]} {out.stderr[-300:]}")
    inproc = []
    endpoint = live.endpoint("control")
    for _ in range(calls):
        started = time.perf_counter()
        reply = control.request(endpoint, "status", timeout=5.0)
        inproc.append(time.perf_counter() - started)
        if not reply.get("ok"):
            raise RuntimeError(f"bench: status request failed: {reply}")
    return {"status_latency_ms_p50": rounded(p50(walls) * 1000, 1),
            "status_latency_ms_p50_inprocess": rounded(p50(inproc) * 1000, 3),
            "status_latency_ms_p99_inprocess": rounded(
                percentile([t * 1000 for t in inproc], 0.99), 3),
            "status_latency_runs": runs}


def logs_follow_lag(live: SupervisedRun, command: list[str], lines: int) -> dict[str, Any]:
    probe = subprocess.run([*command, "logs", "--help"], capture_output=True,
                           stdin=subprocess.DEVNULL)
    if probe.returncode != 0:
        return {"logs_follow_lag_ms_p50": None,
                "logs_follow_note": "this nkat-supervise has no logs command yet"}
    argv = [*command, "logs", "-f", "--json", "--state-dir", str(live.state_dir), live.run_id]
    follower = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL)
    started = time.time()
    lags: list[float] = []
    done = threading.Event()

    def read() -> None:
        assert follower.stdout is not None
        for raw in follower.stdout:
            seen = time.time()
            try:
                written = ts_wall(json.loads(raw)["ts"])
            except (ValueError, KeyError, TypeError):
                continue
            if written >= started:  # the backlog -f prints first is not a lag
                lags.append(seen - written)
            if len(lags) >= lines:
                break
        done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    done.wait(30 + lines)
    follower.kill()
    follower.wait()
    if not lags:
        return {"logs_follow_lag_ms_p50": None,
                "logs_follow_note": "logs -f printed no new line within the wait"}
    return {"logs_follow_lag_ms_p50": rounded(p50(lags) * 1000, 1),
            "logs_follow_lag_ms_p99": rounded(percentile([t * 1000 for t in lags], 0.99), 1),
            "logs_follow_lines": len(lags)}


def start_to_first_progress(base: Path, command: list[str], runs: int) -> dict[str, Any]:
    samples = [_first_progress(base, command, f"fresh-{n}") for n in range(runs)]
    return {
        "start_to_first_progress_s": rounded(p50(s["beat"] for s in samples)),
        "start_to_first_progress_s_ckpt": rounded(p50(s["ckpt"]
                                                                    for s in samples)),
        "start_breakdown_p50": {
            part: rounded(p50(s[part] for s in samples))
            for part in ("supervisor_up", "spawned", "welcomed", "first_beat")},
        "start_runs": runs,
    }


def _first_progress(base: Path, command: list[str], run_id: str) -> dict[str, float]:
    run = SupervisedRun(base, run_id, {"max_dimension": ENDLESS, "checkpoint_interval": 0.1,
                                       "log_max_bytes": 1 << 30},
                        command=command)
    # Listening before the launch: the socket connects once the supervisor binds it.
    stream = EventStream(run.endpoint("events"))
    tail = LogTail(run.log_file)
    events: dict[str, float] = {}
    first_beat = None
    try:
        launched = time.time()
        run.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and run.running():
            for t, body in stream.read(0.005):
                if first_beat is None and body.get("t") == "beat" and body.get("units_done"):
                    first_beat = t
            for event in tail.read():
                events.setdefault(event.get("event", ""), event.get("_t", 0.0))
            if first_beat is not None and "checkpoint.durable" in events:
                break
    finally:
        stream.close()
        run.cleanup()
    if first_beat is None or "checkpoint.durable" not in events:
        raise RuntimeError(f"bench: run {run_id} made no progress: {run.stderr_tail(500)}")
    return {"beat": first_beat - launched, "ckpt": events["checkpoint.durable"] - launched,
            "supervisor_up": events["wal.recovered"] - launched,
            "spawned": events["worker.spawned"] - events["wal.recovered"],
            "welcomed": events["worker.welcomed"] - events["worker.spawned"],
            "first_beat": first_beat - events["worker.welcomed"]}


# Remote signals through a real supervisor -------------------------------------------------
#: A run that ends in about a second of compute: its run.completed is the event notified.
NOTIFY_RUN_DIMS = 3 * 10**7
#: The default preemption_poll_interval: notices land at a random phase of it.
POLL_S = 1.0


def notify_lag(base: Path, command: list[str], runs: int) -> dict[str, Any]:
    lags = []
    with WebhookReceiver() as hook:
        for n in range(runs):
            run = SupervisedRun(base, f"notify-{n}", {"max_dimension": NOTIFY_RUN_DIMS,
                                                      "notify_url": hook.url},
                                backend="numpy", command=command)
            try:
                run.start()
                code = run.wait(120)
            finally:
                run.cleanup()
            completed = [e for e in events_of(run.log_file) if e.get("event") == "run.completed"]
            arrivals = hook.wait_for(n + 1, 10)
            if code != 0 or len(completed) != 1 or len(arrivals) <= n:
                raise RuntimeError(f"bench: run notify-{n} ended {code} with "
                                   f"{len(completed)} run.completed and {len(arrivals) - n} "
                                   f"deliveries: {run.stderr_tail(500)}")
            arrived, document = arrivals[n]
            if document.get("event") != "run.completed" or document.get("run_id") != run.run_id:
                raise RuntimeError(f"bench: the webhook got {str(document)[:300]}")
            lags.append(arrived - completed[0]["_t"])
    return {"notify_lag_ms_p50": rounded(p50(lags) * 1000, 1),
            "notify_lag_ms_max": rounded(max(lags) * 1000, 1),
            "notify_event": "run.completed", "notify_runs": runs}


class _Preempted:
    """One preemption trial's run, for measure_notice_latency_ms."""

    def __init__(self, run: SupervisedRun) -> None:
        self.run = run
        self.parts: dict[str, float] = {}


def preempt_to_durable(base: Path, command: list[str], trials: int) -> dict[str, Any]:
    done: list[_Preempted] = []
    phases = random.Random(17)

    def start(url: str) -> _Preempted:
        run = SupervisedRun(base, f"preempt-{len(done)}",
                            {"max_dimension": ENDLESS, "preemption": "aws",
                             "metadata_url": url, "log_max_bytes": 1 << 30},
                            backend="numpy", command=command)
        trial = _Preempted(run)
        done.append(trial)
        run.start()
        # Computing before the notice: the worker has units done.
        deadline = time.monotonic() + 60
        while not (run.status() or {}).get("units_done"):
            if not run.running() or time.monotonic() > deadline:
                raise RuntimeError(f"bench: {run.run_id} made no progress: "
                                   f"{run.stderr_tail(500)}")
            time.sleep(0.02)
        return trial

    def reached(trial: _Preempted, t_notice: float) -> float:
        notice_wall = time.time() - (time.monotonic() - t_notice)
        run = trial.run
        if run.wait(60) is None:
            raise RuntimeError(f"bench: {run.run_id} did not stop after the notice")
        events = list(events_of(run.log_file))
        stopped = next((e for e in events if e.get("event") == "run.stopped"), None)
        seen = next((e for e in events if e.get("event") == "preemption.notice"), None)
        durable = next((e for e in events if e.get("event") == "checkpoint.durable"
                        and stopped is not None and e.get("ckpt_seq") == stopped.get("ckpt_seq")),
                       None)
        if stopped is None or seen is None or durable is None or durable["_t"] < notice_wall:
            raise RuntimeError(f"bench: {run.run_id} has no final checkpoint after the notice: "
                               f"{run.stderr_tail(500)}")
        trial.parts = {"seen": seen["_t"] - notice_wall, "durable": durable["_t"] - seen["_t"]}
        return t_notice + float(durable["_t"]) - notice_wall

    def stop(trial: _Preempted) -> None:
        trial.run.cleanup()

    ms = measure_notice_latency_ms("aws", start, reached, stop, trials=trials,
                                   settle_s=lambda: 0.2 + phases.uniform(0, POLL_S))
    return {"preempt_notice_to_durable_ms_p50": rounded(p50(ms), 1),
            "preempt_notice_to_durable_ms_max": rounded(max(ms), 1),
            "preempt_breakdown_ms_p50": {
                part: rounded(p50(t.parts[part] * 1000 for t in done), 1)
                for part in ("seen", "durable")},
            "preempt_cloud": "aws", "preempt_trials": trials}


# The status page in a browser -------------------------------------------------------------
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# Records each units count the live run's card shows, with the browser's wall clock.
_OBSERVE_UNITS = """(runId) => {
  window.__shown = [];
  const note = () => {
    const card = document.querySelector(`article[data-run="${runId}"]`);
    const units = card ? Number(card.dataset.units) : NaN;
    const last = window.__shown[window.__shown.length - 1];
    if (!isNaN(units) && (!last || last[1] !== units)) window.__shown.push([Date.now(), units]);
  };
  new MutationObserver(note).observe(document.getElementById("runs"),
    {subtree: true, childList: true, attributes: true, attributeFilter: ["data-units"]});
  note();
}"""


def serve_command(command: list[str]) -> list[str]:
    """``nkat-supervise serve``, or the module itself where the CLI does not list it yet."""
    probe = subprocess.run([*command, "serve", "--help"], capture_output=True,
                           stdin=subprocess.DEVNULL)
    if probe.returncode == 0:
        return [*command, "serve"]
    return [sys.executable, "-m", "nkat.supervisor.ops.serve"]


def web_figures(live: SupervisedRun, command: list[str], base: Path, pages: int,
                watch_s: float) -> dict[str, Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return {"web_first_paint_ms": None, "web_update_lag_ms_p50": None,
                "web_note": "playwright is not installed"}
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return {"web_first_paint_ms": None, "web_update_lag_ms_p50": None,
                "web_note": "chromium is not installed"}
    server = subprocess.Popen([*serve_command(command), "--state-dir", str(live.state_dir),
                               "--addr", "127.0.0.1:0"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if " on http" not in line:
            raise RuntimeError(f"bench: serve did not start: {line!r}")
        url = line.rsplit(" on ", 1)[1].strip()
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                str(base / "chromium-profile"), executable_path=chromium, headless=True,
                args=CHROMIUM_ARGS, viewport={"width": 390, "height": 844})
            try:
                figures = _first_paint(context, url, pages)
                figures.update(_update_lag(context, url, live, watch_s))
            finally:
                context.close()
    finally:
        server.terminate()
        server.wait(15)
    return figures


def _first_paint(context: Any, url: str, pages: int) -> dict[str, Any]:
    paints, shown = [], []
    for _ in range(pages):
        page = context.new_page()
        page.goto(url)
        page.wait_for_selector("article.run", timeout=30000)
        entries = page.evaluate("""() => {
          const paint = Object.fromEntries(performance.getEntriesByType("paint")
                                           .map((e) => [e.name, e.startTime]));
          const runs = performance.getEntriesByName("nkat-runs-shown")[0];
          return [paint["first-contentful-paint"] ?? paint["first-paint"],
                  runs ? runs.startTime : null];
        }""")
        page.close()
        paints.append(entries[0])
        shown.append(entries[1])
    return {"web_first_paint_ms": rounded(p50(paints), 1),
            "web_first_paint_ms_cold": rounded(paints[0], 1),
            "web_first_data_ms": rounded(p50(shown), 1),
            "web_pages": pages}


def _update_lag(context: Any, url: str, live: SupervisedRun, watch_s: float) -> dict[str, Any]:
    status_file = live.run_dir / "status.json"
    beats: list[tuple[float, int]] = []  # (received, units_done), from the events socket
    on_disk: list[tuple[float, int]] = []  # (first seen in status.json, units_done)
    stop = threading.Event()

    def changed(series: list[tuple[float, int]], when: float, units: Any) -> None:
        if isinstance(units, int) and (not series or series[-1][1] != units):
            series.append((when, units))

    def watch_disk() -> None:
        while not stop.is_set():
            try:
                units = json.loads(status_file.read_text()).get("units_done")
            except (OSError, ValueError):
                units = None
            changed(on_disk, time.time(), units)
            time.sleep(0.005)

    def watch_beats() -> None:
        stream = EventStream(live.endpoint("events"))
        try:
            while not stop.is_set():
                for when, body in stream.read(0.05):
                    if body.get("t") == "beat":
                        changed(beats, when, body.get("units_done"))
        finally:
            stream.close()

    page = context.new_page()
    page.goto(url)
    page.wait_for_selector(f'article.run[data-run="{live.run_id}"]', timeout=30000)
    page.evaluate(_OBSERVE_UNITS, live.run_id)
    watchers = [threading.Thread(target=w, daemon=True) for w in (watch_disk, watch_beats)]
    for watcher in watchers:
        watcher.start()
    started = time.time()
    time.sleep(watch_s)
    stop.set()
    for watcher in watchers:
        watcher.join()
    shown = page.evaluate("window.__shown")
    page.close()

    def lags(changes: list[tuple[float, int]]) -> list[float]:
        out = []
        for when, units in changes:
            # Changes at the very start or end may have no counterpart in the window.
            if when < started + 1 or when > started + watch_s - 3:
                continue
            seen = [t / 1000 for t, u in shown if u >= units]
            if seen:
                out.append(max(0.0, min(seen) - when))
        return out

    from_beat, from_disk = lags(beats), lags(on_disk)
    if not from_beat:
        return {"web_update_lag_ms_p50": None,
                "web_note": "the page showed no progress change within the watch"}
    return {"web_update_lag_ms_p50": rounded(p50(from_beat) * 1000, 1),
            "web_update_lag_ms_p99": rounded(percentile([t * 1000 for t in from_beat], 0.99), 1),
            "web_update_lag_ms_p50_disk": rounded(p50(from_disk) * 1000, 1)
            if from_disk else None,
            "web_update_samples": len(from_beat)}
