"""``nkat-supervise runs``: list the runs of a state dir, remove one, or prune old ones.

    nkat-supervise runs [--json]                     # every run with its state
    nkat-supervise runs rm RUN [RUN…] [--force]      # a run that is not done needs --force
    nkat-supervise runs prune --older-than 30d [--dry-run]

``prune`` removes completed and given-up runs whose last activity is older than the age;
stopped and interrupted runs are never pruned (they are waiting to be resumed). A run a
supervisor holds is never removed. Removal holds the run's lock, so a supervisor cannot
start on a run while it goes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from nkat.supervisor.exitcode import ExitCode
from nkat.supervisor.ops.logview import parse_since
from nkat.supervisor.rundir import RunDir, RunDirError, RunLocked, list_runs, state_dir

#: States a run may be pruned in: finished, one way or the other.
PRUNABLE = ("completed", "gave_up")
#: States ``rm`` removes without --force.
FINISHED = ("completed", "gave_up", "new")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON array")
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    rm = sub.add_parser("rm", help="remove runs", description="remove runs (a run that is "
                        "stopped or interrupted needs --force: it could still be resumed)")
    rm.add_argument("runs", nargs="+", metavar="RUN")
    rm.add_argument("--force", action="store_true",
                    help="remove a stopped or interrupted run too")
    prune = sub.add_parser("prune", help="remove old completed and given-up runs",
                           description="remove completed and given-up runs whose last "
                                       "activity is older than --older-than")
    prune.add_argument("--older-than", required=True, metavar="AGE",
                       help="an age such as 30d, 12h or 90m")
    prune.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    for action in (rm, prune):  # the global option, after the action too
        action.add_argument("--state-dir", metavar="DIR", default=argparse.SUPPRESS,
                            help="where runs live (see nkat-supervise --help)")


def run(args: argparse.Namespace) -> int:
    state = state_dir(args.state_dir)
    if args.action == "rm":
        return _rm(state, args.runs, force=args.force)
    if args.action == "prune":
        try:
            cutoff = parse_since(args.older_than)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise RunDirError(f"--older-than {args.older_than!r}: {exc}") from None
        return _prune(state, cutoff, dry_run=args.dry_run)
    return _list(state, as_json=args.json)


def _list(state: Path, *, as_json: bool) -> int:
    from nkat.supervisor.ops.inspect import run_status

    rows = []
    for r in list_runs(state):
        st = run_status(r)
        rows.append({"run_id": r.run_id, "created": r.info.created, "state": st["state"],
                     "job": r.info.spec.get("job"), "spec_hash": r.info.spec_hash,
                     "progress": st.get("progress")})
    if as_json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no runs")
    else:
        for row in rows:
            prog = "-" if row["progress"] is None else f"{row['progress']:.1%}"
            print(f"{row['run_id']:<34} {row['state']:<12} {prog:>7}  {row['job']}")
    return ExitCode.OK


def _rm(state: Path, run_ids: list[str], *, force: bool) -> int:
    from nkat.supervisor.ops.inspect import run_state_from_disk

    code = ExitCode.OK
    for run_id in run_ids:
        r = RunDir.open(state, run_id)
        current = run_state_from_disk(r)
        if current not in FINISHED and not force:
            print(f"nkat-supervise: run {run_id} is {current}: it could still be resumed; "
                  "pass --force to remove it anyway", flush=True)
            code = ExitCode.CHECK_FAILED
            continue
        if not _remove(r):
            code = ExitCode.CHECK_FAILED
    return code


def _prune(state: Path, cutoff: float, *, dry_run: bool) -> int:
    from nkat.supervisor.ops.inspect import run_state_from_disk

    gone = 0
    for r in list_runs(state):
        current = run_state_from_disk(r)
        if current not in PRUNABLE or last_activity(r) >= cutoff:
            continue
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(last_activity(r)))
        if dry_run:
            print(f"would remove {r.run_id} ({current}, last active {when})")
            gone += 1
        elif _remove(r):
            gone += 1
    print(f"{'would remove' if dry_run else 'removed'} {gone} run(s)")
    return ExitCode.OK


def _remove(r: RunDir) -> bool:
    """Remove a run under its lock; False (said) if a supervisor holds it."""
    try:
        with r.lock():
            shutil.rmtree(r.path)
    except RunLocked as exc:
        print(f"nkat-supervise: {exc}", flush=True)
        return False
    print(f"removed {r.run_id}")
    return True


def last_activity(r: RunDir) -> float:
    """When the run last did something: the newest of its files' modification times."""
    newest = 0.0
    for path in (r.path, r.path / "run.toml", r.status_file, r.result_file,
                 *r.wal_dir.glob("*.wal"), *r.log_dir.glob("supervisor.jsonl*")):
        try:
            newest = max(newest, path.stat().st_mtime)
        except OSError:
            continue
    return newest

