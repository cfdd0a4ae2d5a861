"""The random-kill campaign: SIGKILL a supervised run's worker, its supervisor, or both,
at random moments, any number of times, and check that it still finishes with the
byte-identical result of an uninterrupted run and never lost an acknowledged checkpoint.

    python tools/crash_campaign.py --kills 30 --seed 1 [--target worker|supervisor|both]
        [--max-dimension M] [--unit-dims U] [--state-dir DIR] [--keep] [--quiet]

The summary is one JSON object on stdout (kills, resumes, result_identical, acked_lost
...); progress lines go to stderr. Exit code 0 when the result is identical, no
acknowledged checkpoint was lost, no worker outlived its supervisor and nothing was left
running; 1 otherwise (the state directory is then kept for inspection).

How it works:

1. The reference: ``python -m nkat.worker --standalone`` with the same params.
2. A supervised run: ``python -m nkat.supervisor start --run-id R`` with short
   checkpoint and restart delays, a high restart budget and small WAL segments (so
   segment rolls and retention happen under fire too).
3. Kills at moments drawn from ``random.Random(seed)``, each ``--interval`` apart:
   ``worker`` SIGKILLs the supervisor's worker child (the supervisor restarts it);
   ``supervisor`` SIGKILLs the supervisor alone, checks that its worker died by itself
   (PR_SET_PDEATHSIG) within 5 s, then runs the same ``start`` again, which resumes;
   ``both`` SIGKILLs the two together. ``--target both`` mixes the three evenly.
4. Before each kill, the newest checkpoint in the WAL (read-only) is the newest one
   that may have been acknowledged. Every worker welcomed after the kill must resume
   from at least that checkpoint: each that does not counts in ``acked_lost``.
5. At the end: the deterministic blocks of result.json (all but ``performance`` and
   ``provenance``, as ``json.dumps(sort_keys=True)``) against the reference's, a WAL
   verify, and a search for leftover workers.

The job is made long enough for the kills: if the reference computed for less time
than the kills need, stalls are planted through NKAT_FAILPOINTS
(``stall@unit=K:seconds=S``, a sleep that releases the GIL between units), which slow
the run without changing its result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from benchlib import (  # run as a script: tools/ is on the path
    SupervisedRun,
    deterministic,
    events_of,
    standalone,
    wait_gone,
)

from nkat.supervisor.wal import RecordType, WalError, verify
from nkat.supervisor.wal.readonly import read_records

KINDS = ("worker", "supervisor", "both")
#: How long a worker may outlive its SIGKILLed supervisor before it counts as an orphan.
ORPHAN_GRACE_S = 5.0
#: Length of each planted stall; many short ones keep progress visible between kills.
STALL_S = 0.1
#: Productive seconds a kill interval yields on average, as a fraction of the interval
#: (the rest goes to restart, start-up and redoing the units after the last checkpoint).
PRODUCTIVE_SHARE = 0.6


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    intro, _usage, output = __doc__.split("\n\n")[:3]
    p = argparse.ArgumentParser(description=f"{intro}\n\n{output}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=30, help="kills to deliver (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    p.add_argument("--target", choices=KINDS, default="both",
                   help="what to kill; both = worker, supervisor and both at once, mixed")
    p.add_argument("--max-dimension", type=float, default=1e9, help="job size (default 1e9)")
    p.add_argument("--unit-dims", type=int, default=65536, help="dimensions per unit")
    p.add_argument("--interval", type=float, nargs=2, default=(0.3, 1.5),
                   metavar=("MIN", "MAX"), help="seconds between kills (default 0.3 1.5)")
    p.add_argument("--throttle", default="auto",
                   help="seconds of stalls to plant over the run: auto (enough for the "
                        "kills) or a number (0: none)")
    p.add_argument("--checkpoint-interval", type=float, default=0.2)
    p.add_argument("--segment-size", type=int, default=64 * 1024,
                   help="WAL segment bytes (small, so segments roll under fire)")
    p.add_argument("--backend", choices=("auto", "numpy", "cupy"), default="auto")
    p.add_argument("--state-dir", type=Path, help="where the run lives (default: a temp "
                   "directory, removed afterwards unless the campaign fails or --keep)")
    p.add_argument("--keep", action="store_true", help="keep the state directory")
    # The summary was once text unless --json; old command lines still parse.
    p.add_argument("--json", action="store_true",
                   help="accepted and ignored: the summary is always one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.kills < 0 or not 0 < args.interval[0] <= args.interval[1]:
        p.error("--kills must be >= 0 and 0 < MIN <= MAX")
    args.max_dimension = int(args.max_dimension)
    return args


def kill_schedule(rng: random.Random, kills: int, target: str) -> list[str]:
    """What each kill hits: the target, or for ``both`` the three kinds in shuffled
    rounds, so that a handful of kills already covers each kind."""
    if target != "both":
        return [target] * kills
    kinds: list[str] = []
    while len(kinds) < kills:
        block = list(KINDS)
        rng.shuffle(block)
        kinds += block
    return kinds[:kills]


def stall_plan(units_total: int, compute_s: float, kills: int, mean_interval: float,
               throttle: str) -> list[int]:
    """The units to plant a STALL_S stall at, so the run outlasts the kills."""
    if throttle == "auto":
        wanted = kills * mean_interval * PRODUCTIVE_SHARE + 2.0
        extra = max(0.0, wanted - compute_s)
    else:
        extra = max(0.0, float(throttle))
    count = min(units_total - 1, math.ceil(extra / STALL_S))
    if count <= 0:
        return []
    return sorted({(j + 1) * units_total // (count + 1) for j in range(count)})


def newest_checkpoint(wal_dir: Path) -> int | None:
    """The newest ckpt_seq in the WAL right now (0: none yet), read without opening it
    for writing; None if it could not be read (a segment removed mid-read, say)."""
    for _ in range(5):
        try:
            newest = 0
            for record in read_records(wal_dir):
                if record.type in (RecordType.CKPT, RecordType.CKPT_REF):
                    newest = max(newest, int(record.payload["ckpt_seq"]))
            return newest
        except FileNotFoundError:
            if not wal_dir.exists():
                return 0
        except (WalError, OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    return None


class Campaign:
    """One campaign: the reference, the supervised run under fire, the verdict."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.say = (lambda text: None) if args.quiet else (
            lambda text: print(f"crash_campaign: {text}", file=sys.stderr, flush=True))
        self.kills: list[dict[str, Any]] = []
        self.missed = 0
        self.orphans = 0
        self.ack_read_failures = 0
        self.notes: list[str] = []
        self.finish_timeout = 120.0

    # The run ----------------------------------------------------------------------------

    def run(self, state_dir: Path) -> dict[str, Any]:
        a = self.args
        started = time.monotonic()
        params = {"max_dimension": a.max_dimension, "unit_dims": a.unit_dims}
        self.say(f"reference run of {a.max_dimension} dimensions ...")
        reference, reference_wall = standalone(params, backend=a.backend)
        compute_s = float(reference["performance"]["total_gpu_time"] or 0.0)
        units_total = -(-a.max_dimension // a.unit_dims)
        stalls = stall_plan(units_total, compute_s, a.kills, sum(a.interval) / 2, a.throttle)
        env = {"NKAT_FAILPOINTS": ";".join(f"stall@unit={u}:seconds={STALL_S}"
                                           for u in stalls)} if stalls else None
        run_id = f"campaign-s{a.seed}-{int(time.time())}"
        sets = {**params, "checkpoint_interval": a.checkpoint_interval,
                "max_restarts": 1000, "poison_after": 1000, "restart_delay": 0.05,
                "restart_delay_max": 0.2, "segment_size": a.segment_size,
                "log_max_bytes": 1 << 30}
        run = SupervisedRun(state_dir, run_id, sets, backend=a.backend, env=env)
        self.finish_timeout = 120.0 + 10.0 * (compute_s + len(stalls) * STALL_S)
        self.say(f"run {run_id}: {units_total} units, reference {compute_s:.1f} s of compute, "
                 f"{len(stalls)} stalls of {STALL_S} s planted; {a.kills} kills "
                 f"({a.target}), seed {a.seed}")
        try:
            exit_code = self._supervise(run)
            leftovers = wait_gone(run.stray_workers(), ORPHAN_GRACE_S)
        finally:
            run.cleanup()
        summary = self._summarise(run, reference, exit_code, leftovers)
        summary.update({
            "elapsed_s": round(time.monotonic() - started, 2),
            "reference_s": round(reference_wall, 2),
            "reference_compute_s": round(compute_s, 2),
            "max_dimension": a.max_dimension, "unit_dims": a.unit_dims,
            "units_total": units_total, "seed": a.seed, "target": a.target,
            "stalls_planted": len(stalls), "stall_s": STALL_S if stalls else 0,
            "run_id": run_id,
        })
        return summary

    def _supervise(self, run: SupervisedRun) -> int | None:
        a = self.args
        schedule = kill_schedule(self.rng, a.kills, a.target)
        run.start()
        last = time.monotonic()
        for number, kind in enumerate(schedule, 1):
            at = last + self.rng.uniform(*a.interval)
            while time.monotonic() < at and run.running():
                time.sleep(0.005)
            if not run.running():
                break
            record = self._kill(run, kind)
            last = time.monotonic()
            if record is None:
                self.missed += 1
                if not run.running():
                    break
                continue
            record["n"] = number
            self.kills.append(record)
            self.say(f"kill {number}/{a.kills}: {kind} (newest checkpoint {record['acked']})")
        if len(self.kills) < a.kills:
            self.notes.append(f"the run ended after {len(self.kills)} of {a.kills} kills; "
                              "a larger --max-dimension or --throttle gives room for more")
        code = run.wait(self.finish_timeout)
        if code is None:
            self.notes.append("the run did not finish in time")
        elif code != 0:
            self.notes.append(f"the supervisor exited {code}: {run.stderr_tail(500)}")
        return code

    def _kill(self, run: SupervisedRun, kind: str) -> dict[str, Any] | None:
        """Deliver one kill; the record of what was killed and what was durable."""
        worker = None
        if kind in ("worker", "both"):
            worker = run.wait_worker(15.0)
            if worker is None:
                return None
        sup_pid = run.pid
        before = run.stray_workers(sup_pid) if kind != "worker" else []
        acked = newest_checkpoint(run.run_dir / "wal")
        if acked is None:
            self.ack_read_failures += 1
        # The log offset is taken after the WAL read: every welcome logged after it was
        # decided after that checkpoint was written, so it must resume from it or later.
        pos = run.log_file.stat().st_size if run.log_file.exists() else 0
        record = {"kind": kind, "acked": acked or 0, "pos": pos}
        if worker is not None:
            try:
                worker.kill()
            except psutil.Error:  # gone meanwhile: it exited on its own
                if kind == "worker":
                    return None
        if kind in ("supervisor", "both"):
            if not run.sigkill():
                return None
            record["orphans"] = self._orphans(run, sup_pid, before)
            run.start()
        return record

    def _orphans(self, run: SupervisedRun, sup_pid: int | None, before: list[Any]) -> int:
        """Workers of a SIGKILLed supervisor still alive after ORPHAN_GRACE_S (then ended
        here, so the campaign can go on)."""
        deadline = time.monotonic() + ORPHAN_GRACE_S
        left = wait_gone(before, ORPHAN_GRACE_S)
        # One forked just before the kill may show up only once it has exec'd.
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            found = {p.pid: p for p in left + run.stray_workers(sup_pid)}
            left = wait_gone(list(found.values()), 0.05)
            if left:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= 0.3:
                break
            time.sleep(0.05)
        for proc in left:
            self.notes.append(f"worker pid {proc.pid} outlived its supervisor pid {sup_pid}")
            with contextlib.suppress(psutil.Error):
                proc.kill()
        self.orphans += len(left)
        return len(left)

    # The verdict -------------------------------------------------------------------------

    def _summarise(self, run: SupervisedRun, reference: dict[str, Any], exit_code: int | None,
                   leftovers: list[Any]) -> dict[str, Any]:
        events = list(events_of(run.log_file))
        lost, detail = acked_lost(events, self.kills)
        spawned = [e for e in events if e.get("event") == "worker.spawned"]
        welcomed = [e for e in events if e.get("event") == "worker.welcomed"]
        regressions = sum(1 for prev, cur in zip(spawned, spawned[1:], strict=False)
                          if cur.get("epoch", 0) <= prev.get("epoch", 0))
        if regressions:
            self.notes.append(f"epoch numbers went backwards {regressions} time(s) across "
                              "supervisor restarts")
        result = run.result()
        identical = result is not None and deterministic(result) == deterministic(reference)
        report = verify(run.run_dir / "wal", run.run_dir / "blobs")
        kinds = {k: sum(1 for r in self.kills if r["kind"] == k) for k in KINDS}
        summary = {
            "kills": len(self.kills),
            "kills_requested": self.args.kills,
            "worker_kills": kinds["worker"] + kinds["both"],
            "supervisor_kills": kinds["supervisor"] + kinds["both"],
            "kills_by_kind": kinds,
            "missed_kills": self.missed,
            "epochs": len(spawned),
            "resumes": sum(1 for e in welcomed if e.get("resume_ckpt_seq")),
            "supervisor_starts": run.starts,
            "checkpoints_durable": sum(1 for e in events
                                       if e.get("event") == "checkpoint.durable"),
            "result_identical": identical,
            "acked_lost": lost,
            "acked_lost_detail": detail,
            "orphans": self.orphans,
            "leftover_processes": len(leftovers),
            "epoch_regressions": regressions,
            "ack_read_failures": self.ack_read_failures,
            "wal_verify_ok": report.ok,
            "supervisor_exit": exit_code,
            "kill_log": [{"n": r["n"], "kind": r["kind"], "acked": r["acked"]}
                         for r in self.kills],
        }
        summary["ok"] = bool(identical and lost == 0 and self.orphans == 0 and not leftovers
                             and exit_code == 0)
        summary["notes"] = self.notes
        return summary


def acked_lost(events: list[dict[str, Any]], kills: list[dict[str, Any]]
               ) -> tuple[int, list[dict[str, Any]]]:
    """Welcomes that resumed from an older checkpoint than one written before a kill
    that preceded them in the log."""
    lost = []
    for event in events:
        if event.get("event") != "worker.welcomed":
            continue
        required = max((k["acked"] for k in kills if k["pos"] <= event["_pos"]), default=0)
        resumed = event.get("resume_ckpt_seq") or 0
        if resumed < required:
            lost.append({"epoch": event.get("epoch"), "resumed": resumed,
                         "acked_before_kill": required})
    return len(lost), lost


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    temporary = args.state_dir is None
    state_dir = Path(tempfile.mkdtemp(prefix="nkat-campaign-")) if temporary else args.state_dir
    summary = Campaign(args).run(state_dir)
    keep = args.keep or not summary["ok"] or not temporary
    if keep:
        summary["state_dir"] = str(state_dir)
    else:
        shutil.rmtree(state_dir, ignore_errors=True)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
