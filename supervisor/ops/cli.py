"""``nkat-supervise``: the command line (README, "Command line").

Each subcommand is one function ``cmd_<name>(args) -> exit code``. Exit codes: 0 done,
1 a check failed (verify) or nothing to show, 2 usage or config error, 3 gave up,
4 stopped by the operator (resumable). A reader of stdout that goes away (``| head``) is
not an error: the command stops quietly, with its own exit code if it had finished, else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nkat.supervisor import control
from nkat.supervisor.cluster import ENGINES
from nkat.supervisor.exitcode import ExitCode
from nkat.supervisor.ops import logview, report, runs, serve, service
from nkat.supervisor.ops.progress import ENDED, status_lines
from nkat.supervisor.ops.stdout import silence_stdout
from nkat.supervisor.oslimits import FdLimitError, ensure_nofile
from nkat.supervisor.rundir import RunDir, RunDirError, list_runs, state_dir


class UsageError(Exception):
    """A command that cannot run as asked; printed without a traceback, exit 2."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return ExitCode.USAGE
    code = 0  # a command its reader cut short ends as if it had finished (as `logs` does)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
        return code
    except BrokenPipeError:  # before OSError, which it is: the reader went away (| head)
        silence_stdout()
        return code
    except (UsageError, RunDirError) as exc:
        print(f"nkat-supervise: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except ValueError as exc:  # config is imported only by the commands that read one
        from nkat.supervisor.config import ConfigError

        if not isinstance(exc, ConfigError):
            raise
        print(f"nkat-supervise: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except OSError as exc:  # an unusable --state-dir, a file we may not read ...
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"nkat-supervise: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nkat-supervise",
        description="Keep a long GPU computation alive: supervise a worker, checkpoint it "
                    "durably, restart it when it crashes, hangs or overheats.",
        epilog="Exit codes: 0 completed, 1 check failed, 2 usage/config error, "
               "3 gave up (resumable), 4 stopped by the operator (resumable).")
    state_help = ("where runs live (default: $NKAT_STATE_DIR, else "
                  "$XDG_STATE_HOME/nkat-supervise, else ~/.local/state/nkat-supervise)")
    # A global option, before or after the command: the command's copy only overrides
    # the global one when it is given (SUPPRESS leaves no default behind).
    parser.add_argument("--state-dir", metavar="DIR", help=state_help)
    sub = parser.add_subparsers(metavar="COMMAND")

    def add(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--state-dir", metavar="DIR", help=state_help,
                       default=argparse.SUPPRESS)
        p.set_defaults(func=func)
        return p

    p = add("start", cmd_start, "start a run, or resume the unfinished run of the same spec")
    p.add_argument("--run-id", help="run id to create or resume ([A-Za-z0-9._-], 1-64)")
    p.add_argument("--fresh", action="store_true", help="start a new run even if one can resume")
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--backend", choices=("auto", "numpy", "cupy"), help="worker array backend")
    p.add_argument("--gpus", metavar="all|N|I,J,…",
                   help="compute on several GPUs: all, the first N, or these NVML indices; "
                        "the run is cut into shards, several per GPU")
    p.add_argument("--engine", choices=ENGINES,
                   help="local (default): this machine; ray: the shards run on a Ray "
                        "cluster, one node agent per GPU (pip install 'nkat-supervise[ray]')")
    p.add_argument("--ray-address", metavar="auto|HOST:PORT|ray://…",
                   help="the Ray cluster to join (default: RAY_ADDRESS, else a new local "
                        "Ray instance)")
    p.add_argument("--detach", action="store_true", help="run in the background; print the run id")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--sim-gpu", metavar="PROFILE", help="use a scripted GPU profile (TOML)")
    p.add_argument("--salvage", action="store_true",
                   help="if the WAL is corrupt, fall back to the newest intact checkpoint")
    p.add_argument("--boot", action="store_true",
                   help="resume only runs that were running when the machine went down")
    p.add_argument("--share-gpu", action="store_true",
                   help="start even though another live run computes on the same GPU")
    # --detach's child supervises the run its parent has just created (a first start).
    p.add_argument("--created", action="store_true", help=argparse.SUPPRESS)

    for name, help in (("stop", "stop a running supervisor gracefully (final checkpoint)"),
                       ("pause", "pause the worker (it keeps its GPU state)"),
                       ("resume", "resume a paused worker"),
                       ("checkpoint-now", "ask the worker for a checkpoint now")):
        p = add(name, cmd_control, help)
        p.add_argument("run", nargs="?", help="run id (default: the only or newest active run)")
        p.set_defaults(op=name.replace("-", "_"))

    p = add("status", cmd_status, "show a run's status (live, or from disk when it is down)")
    p.add_argument("run", nargs="?")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument("--watch", action="store_true",
                   help="refresh every --interval seconds until interrupted")
    p.add_argument("--interval", type=float, default=1.0, metavar="S")


    p = add("checkpoints", cmd_checkpoints, "list a run's retained checkpoints")
    p.add_argument("run", nargs="?")
    p.add_argument("--json", action="store_true")

    p = add("verify", cmd_verify, "check a run's WAL end to end (exit 1 on corruption)")
    p.add_argument("run", nargs="?")
    p.add_argument("--json", action="store_true")

    p = add("results", cmd_results, "print a run's result JSON")
    p.add_argument("run", nargs="?")

    p = add("config", cmd_config, "show the resolved config and where each value came from")
    p.add_argument("--show", action="store_true", help="print the resolved config (default)")
    p.add_argument("--config", type=Path, metavar="FILE")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true")

    for name, module, help in (
            ("runs", runs, "list runs; rm removes one, prune removes old finished ones"),
            ("logs", logview, "show a run's JSON log; -f follows it across rotations"),
            ("report", report, "write PNG plots and a summary of a run"),
            ("serve", serve, "serve a read-only web page of every run, for a browser or a phone"),
            ("install-service", service,
             "install a systemd unit that resumes interrupted runs at boot")):
        p = add(name, module.run, help)
        module.add_arguments(p)

    p = add("gpu", cmd_gpu, "show GPUs, their thresholds and one reading")
    p.add_argument("--json", action="store_true")
    p.add_argument("--sim-gpu", metavar="PROFILE", help="read a scripted GPU profile instead")
    return parser


# start ------------------------------------------------------------------------------------
def cmd_start(args: argparse.Namespace) -> int:
    from nkat.supervisor.config import check_wire, load_config
    from nkat.supervisor.health import check_profile
    from nkat.supervisor.launch import launch_run, pick_run

    try:
        ensure_nofile()  # before any run directory exists
    except FdLimitError as exc:
        raise UsageError(str(exc)) from None
    state = state_dir(args.state_dir)
    extra = {k: v for k, v in (("backend", args.backend), ("gpus", args.gpus),
                               ("engine", args.engine), ("ray_address", args.ray_address))
             if v} or None
    config = load_config(args.config, args.set, extra)
    check_wire(config)
    if config["engine"] == "ray":
        from nkat.supervisor.cluster.settings import RayMissing, import_ray

        try:
            import_ray()  # before any run directory exists: exit 2, naming the extra
        except RayMissing as exc:
            raise UsageError(str(exc)) from None
    if args.sim_gpu:
        check_profile(args.sim_gpu)  # before any run directory is made
    plan = pick_run(state, config, run_id=args.run_id, fresh=args.fresh, boot=args.boot)
    if plan.how == "none":
        print("nkat-supervise: no run was running when the machine went down; nothing to do")
        return ExitCode.OK
    if plan.how == "new":
        from nkat.supervisor.launch import check_gpu_free, plan_shards
        from nkat.supervisor.spawn import check_job_spec

        facts = check_job_spec(plan.config.job_spec())  # the job's own word, before a run
        if isinstance(facts, str):
            raise UsageError(f"the job refused this spec: {facts}")
        plan = plan_shards(plan, facts, args.sim_gpu)
        if not args.share_gpu:
            check_gpu_free(state, plan.config)
    run = plan.run or plan.create(state)
    if args.detach and plan.how != "completed":
        return _detach(args, run, created=plan.how == "new")
    if args.created and plan.how == "resume":
        plan = dataclasses.replace(plan, how="new")
    try:
        code = launch_run(run, plan.config, how=plan.how, quiet=args.quiet,
                          sim_gpu=args.sim_gpu, salvage=args.salvage)
    finally:
        if plan.how == "new" and not _ever_ran(run):
            shutil.rmtree(run.path, ignore_errors=True)  # a failed start leaves nothing
    return code


def _ever_ran(run: RunDir) -> bool:
    """Whether a worker was ever started for the run (its WAL names an epoch)."""
    from nkat.supervisor.wal import RecordType, WalError
    from nkat.supervisor.wal.readonly import read_records

    try:
        return any(r.type is RecordType.EPOCH for r in read_records(run.wal_dir))
    except (WalError, OSError):
        return True  # unreadable: keep it for `verify` to look at


def _detach(args: argparse.Namespace, run: RunDir, *, created: bool) -> int:
    argv = [sys.executable, "-m", "nkat.supervisor", "start", "--run-id", run.run_id,
            "--state-dir", str(run.path.parent.parent), "--quiet"]
    if created:
        argv.append("--created")
    if args.config:
        argv += ["--config", str(args.config)]
    for option in args.set:
        argv += ["--set", option]
    for flag, value in (("--backend", args.backend), ("--engine", args.engine),
                        ("--ray-address", args.ray_address)):
        if value:
            argv += [flag, value]
    if args.sim_gpu:
        argv += ["--sim-gpu", args.sim_gpu]
    if args.salvage:
        argv.append("--salvage")
    err = open(run.log_dir / "detached.stderr", "ab")  # noqa: SIM115 - handed to the child
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=err, start_new_session=True)
    err.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if child.poll() is not None:
            if child.returncode == 0:  # it finished already (a short or completed run)
                print(run.run_id)
            else:
                print(f"nkat-supervise: the detached supervisor exited with "
                      f"{child.returncode}; see {run.log_dir}", file=sys.stderr)
            return child.returncode
        # Ready once it holds the lock and answers on its control socket.
        if run.holder_pid() == child.pid and (run.sock_dir / "control").exists():
            print(run.run_id)
            return ExitCode.OK
        time.sleep(0.05)
    print(run.run_id)
    print(f"nkat-supervise: the supervisor (pid {child.pid}) has not confirmed it is ready; "
          f"check `nkat-supervise status {run.run_id}`", file=sys.stderr)
    return ExitCode.OK


# Talking to a live supervisor -------------------------------------------------------------
def _resolve_run(state: Path, run_id: str | None, *, live: bool = False) -> RunDir:
    if run_id:
        return RunDir.open(state, run_id)
    runs = list_runs(state)
    if live:
        active = [r for r in runs if r.holder_pid()]
        if len(active) == 1:
            return active[0]
        if len(active) > 1:
            names = ", ".join(r.run_id for r in active)
            raise UsageError(f"several runs are active ({names}); name one")
    if not runs:
        raise UsageError(f"no runs in {state}")
    return runs[-1]


def cmd_control(args: argparse.Namespace) -> int:
    state = state_dir(args.state_dir)
    run = _resolve_run(state, args.run, live=True)
    if not run.holder_pid():
        raise UsageError(f"run {run.run_id} has no running supervisor")
    try:
        reply = control.request(run.endpoint("control"), args.op, timeout=5.0)
    except control.ControlUnavailable as exc:
        raise UsageError(str(exc)) from None
    if not reply.get("ok"):
        print(f"nkat-supervise: {reply.get('error')}", file=sys.stderr)
        return ExitCode.CHECK_FAILED
    print(f"{run.run_id}: {reply.get('message', 'ok')}")
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    from nkat.supervisor.ops.inspect import run_status

    state = state_dir(args.state_dir)
    run = _resolve_run(state, args.run)
    while True:
        status = run_status(run)
        if args.json:
            print(json.dumps(status, indent=None if args.watch else 2, sort_keys=True),
                  flush=True)
        else:
            if args.watch and sys.stdout.isatty():
                print("\x1b[H\x1b[2J", end="")
            for label, value in status_lines(status, time.time()):
                print(f"{label:>12}: {value}", flush=True)
        if not args.watch:
            return ExitCode.OK
        if status.get("source") == "disk" and status.get("state") in ENDED:
            return ENDED[status["state"]]  # the run has ended: so does the watch
        time.sleep(max(0.1, args.interval))


def cmd_checkpoints(args: argparse.Namespace) -> int:
    from nkat.supervisor.ops.inspect import list_checkpoints

    run = _resolve_run(state_dir(args.state_dir), args.run)
    rows = list_checkpoints(run)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"{run.run_id}: no checkpoints")
    else:
        for r in rows:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["t_wall"]))
            print(f"seq {r['ckpt_seq']:>6}  epoch {r['epoch']:>4}  units {r['units_done']:>10}"
                  f"  {when}  {r['size']:>9} B  verified")
    return ExitCode.OK


def cmd_verify(args: argparse.Namespace) -> int:
    from nkat.supervisor.ops.inspect import verify_run

    run = _resolve_run(state_dir(args.state_dir), args.run)
    report = verify_run(run)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        verdict = "ok" if report["ok"] else "CORRUPT"
        print(f"{run.run_id}: {verdict}: {report['segments']} segments, {report['records']} "
              f"records, {report['checkpoints']} checkpoints")
        for problem in report.get("problems", []):
            where = f"{problem['file']} at byte {problem['offset']}"
            print(f"  {where}: {problem['reason']}"
                  + ("" if problem["needed"] else " (older than what a resume needs)"))
        if not report["ok"] and not report.get("needs_salvage"):
            print("  a plain start resumes past it, with a warning")
        elif report.get("needs_salvage"):
            print("  start refuses; start --salvage resumes from the newest intact checkpoint")
    return ExitCode.OK if report["ok"] else ExitCode.CHECK_FAILED


def cmd_results(args: argparse.Namespace) -> int:
    run = _resolve_run(state_dir(args.state_dir), args.run)
    result = run.read_result()
    if result is None:
        print(f"{run.run_id}: no result yet", file=sys.stderr)
        return ExitCode.CHECK_FAILED
    print(json.dumps(result, indent=2, sort_keys=True))
    return ExitCode.OK


def cmd_config(args: argparse.Namespace) -> int:
    from nkat.supervisor.config import KEYS, load_config

    config = load_config(args.config, args.set)
    if args.json:
        print(json.dumps({k.name: {"value": config[k.name], "source": config.source(k.name),
                                   "role": k.role.value} for k in KEYS}, indent=2))
        return ExitCode.OK
    for key in KEYS:
        print(f"{key.name:<24} {json.dumps(config[key.name]):<22} {config.source(key.name)}")
    return ExitCode.OK


def cmd_gpu(args: argparse.Namespace) -> int:
    from nkat.supervisor.gpu.show import gpu_command

    return gpu_command(json_output=args.json, sim_gpu=args.sim_gpu)


if __name__ == "__main__":
    sys.exit(main())
