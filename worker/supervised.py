"""Supervised mode: the environment contract, the handshake and the exit code.

docs/architecture.md pins what happens here: read ``NKAT_*`` from the environment, make
sure we cannot outlive the supervisor, say ``hello``, wait for ``welcome``, restore the
resumed checkpoint, run, and end with ``done`` (or ``fail``) and a code from
:mod:`nkat.protocol.exitcodes`.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import sys
import time
import traceback
from collections.abc import Mapping
from typing import NoReturn

from nkat.protocol import exitcodes
from nkat.protocol.messages import (
    DONE_ACK_SEQ,
    PROTOCOL_VERSION,
    Ack,
    Cmd,
    Hello,
    ProtocolError,
    Resume,
    Welcome,
    result_digest,
    spec_hash,
)
from nkat.worker import guards, state
from nkat.worker.backend import BACKENDS, Backend, BackendUnavailable, select_backend
from nkat.worker.channel import Channel
from nkat.worker.failpoints import ENV as FAILPOINTS_ENV
from nkat.worker.failpoints import FailpointError, Failpoints
from nkat.worker.heartbeat import Board, Heartbeat
from nkat.worker.job import Job, JobNotFound, JobParamsError, resolve_job
from nkat.worker.runtime import (
    ResumePoint,
    RunFailed,
    Runner,
    Stopped,
    classify,
)
from nkat.worker.settings import Settings, SettingsError, parse_settings

#: Wait for ``welcome`` this long after ``hello`` (NKAT_WELCOME_TIMEOUT overrides).
WELCOME_TIMEOUT_S = 30.0
#: How long the last messages (``fail``, logs) may take to leave at exit.
FLUSH_S = 1.0
#: ``hello.backend`` of a worker that could get no backend (it then fails
#: ``backend_unavailable`` and exits BACKEND_UNAVAILABLE once welcomed).
NO_BACKEND = "none"
#: Exit code for a failure of the runtime itself: not a protocol code, so the supervisor
#: counts a crash and restarts.
INTERNAL_ERROR_EXIT = 1


class EnvError(ValueError):
    """The environment the supervisor must provide is missing or malformed."""


@dataclasses.dataclass(frozen=True)
class Env:
    endpoint: str
    token: str
    epoch: int
    supervisor_pid: int
    backend: str
    failpoints: str
    #: Optional: the job the supervisor will name in ``welcome`` (``hello.job``, else "").
    job: str
    welcome_timeout: float


def read_env(environ: Mapping[str, str]) -> Env:
    def need(name: str) -> str:
        value = environ.get(name, "")
        if not value:
            raise EnvError(f"{name} is not set (run under nkat-supervise, or use --standalone)")
        return value

    def number(name: str, value: str, kind: type[int] | type[float]) -> int | float:
        try:
            parsed = kind(value)
        except ValueError:
            parsed = 0
        if not parsed > 0:
            raise EnvError(f"{name}={value!r} is not a positive {kind.__name__}")
        return parsed

    backend = environ.get("NKAT_BACKEND", "") or "auto"
    if backend not in BACKENDS:
        raise EnvError(f"NKAT_BACKEND={backend!r}: expected one of {', '.join(BACKENDS)}")
    return Env(
        endpoint=need("NKAT_ENDPOINT"),
        token=need("NKAT_TOKEN"),
        epoch=int(number("NKAT_EPOCH", need("NKAT_EPOCH"), int)),
        supervisor_pid=int(number("NKAT_SUPERVISOR_PID", need("NKAT_SUPERVISOR_PID"), int)),
        backend=backend,
        failpoints=environ.get(FAILPOINTS_ENV, ""),
        job=environ.get("NKAT_JOB", ""),
        welcome_timeout=float(number("NKAT_WELCOME_TIMEOUT",
                                     environ.get("NKAT_WELCOME_TIMEOUT", "")
                                     or str(WELCOME_TIMEOUT_S), float)),
    )


def main() -> NoReturn:
    code = run(os.environ)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: the exit code must not depend on a library's atexit.
    os._exit(code)


def run(environ: Mapping[str, str]) -> int:
    """Run one epoch under the supervisor; returns the exit code."""
    try:
        env = read_env(environ)
        failpoints = Failpoints.parse(env.failpoints, env.epoch)
    except (EnvError, FailpointError) as exc:
        _say(str(exc))
        return exitcodes.STARTUP
    guards.install_faulthandler()
    guards.die_with_parent()
    if not guards.parent_is(env.supervisor_pid):
        _say(f"parent is pid {os.getppid()}, not the supervisor {env.supervisor_pid}")
        return exitcodes.ORPHANED
    failpoints.install()
    backend: Backend | None = None
    backend_error = ""
    try:
        backend = select_backend(env.backend)
    except BackendUnavailable as exc:
        # Reported in a fail once welcome has made us known, never replaced by another
        # backend: hello names what this worker really computes on, here nothing.
        backend_error = f"backend {env.backend!r} is unavailable: {exc}"
        _say(backend_error)
    board = Board()
    channel = Channel(env.endpoint, epoch=env.epoch, heartbeat=Heartbeat(board, env.epoch),
                      supervisor_pid=env.supervisor_pid, routing_id=env.token.encode())
    channel.start(Hello(epoch=env.epoch, token=env.token, pid=os.getpid(), job=env.job,
                        proto=PROTOCOL_VERSION,
                        backend=backend.name if backend else NO_BACKEND,
                        device=backend.device if backend else ""))
    try:
        welcome = _await_welcome(channel, env.welcome_timeout)
        if welcome is None:
            _say(f"no welcome within {env.welcome_timeout:g} s")
            return exitcodes.STARTUP
        if backend is None:
            raise RunFailed("backend_unavailable", backend_error, fatal=False,
                            exit_code=exitcodes.BACKEND_UNAVAILABLE)
        if backend.fallback:
            channel.log("warning", "backend.fallback", {"asked": env.backend,
                                                         "using": backend.name,
                                                         "reason": backend.fallback})
        return _session(env, welcome, channel, board, backend, failpoints)
    except RunFailed as failure:
        channel.fail(failure.kind, failure.message, failure.traceback, failure.fatal)
        return failure.exit_code
    except Exception as exc:
        tb = traceback.format_exc()
        _say(tb)
        channel.fail("internal", f"{type(exc).__name__}: {exc}", tb, False)
        return INTERNAL_ERROR_EXIT
    finally:
        channel.close(flush_s=FLUSH_S)


def _session(env: Env, welcome: Welcome, channel: Channel, board: Board, backend: Backend,
             failpoints: Failpoints) -> int:
    settings, job_name, params = _read_welcome(env, welcome)
    channel.start_beats(settings)
    backend.set_memory_limit(settings.memory_limit, settings.memory_reserve)
    job = _make_job(job_name, params, backend)
    resume = _restore(job, welcome.resume, backend) if welcome.resume else None
    runner = Runner(job, backend, settings, channel, board, failpoints, epoch=env.epoch,
                    spec_hash=spec_hash(welcome.spec), checkpoints=True, resume=resume)
    channel.log("info", "worker.started", {
        "job": job_name, "backend": backend.name, "device": backend.device,
        "units_total": runner.total, "units_done": runner.units_done,
        "resumed_ckpt_seq": welcome.resume.ckpt_seq if welcome.resume else None,
        "batch_size": runner.sizer.size})
    try:
        result = runner.run()
    except Stopped as stopped:
        channel.log("info", "worker.stopped", {"units_done": runner.units_done,
                                               "final_ckpt_acked": stopped.acked})
        return exitcodes.STOPPED
    try:
        channel.post_done(result, result_digest(result))
    except (ProtocolError, OverflowError) as exc:
        raise RunFailed("job_error", f"the result cannot be sent: {exc}", fatal=True,
                        exit_code=exitcodes.FATAL) from exc
    return _await_done_ack(channel)


def _await_welcome(channel: Channel, timeout: float) -> Welcome | None:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = channel.inbox.get(timeout=left)
        except queue.Empty:
            return None
        if isinstance(msg, Welcome):
            return msg
    return None


def _read_welcome(env: Env, welcome: Welcome) -> tuple[Settings, str, dict[str, object]]:
    try:
        settings = parse_settings(welcome.settings)
    except SettingsError as exc:
        raise RunFailed("bad_welcome", str(exc), fatal=True, exit_code=exitcodes.FATAL) from exc
    job_name, params = welcome.spec.get("job"), welcome.spec.get("params", {})
    if not isinstance(job_name, str) or not job_name or not isinstance(params, dict):
        raise RunFailed("bad_welcome", "welcome.spec needs {job: name, params: {...}}",
                        fatal=True, exit_code=exitcodes.FATAL)
    if env.job and env.job != job_name:
        raise RunFailed("bad_welcome", f"welcome names job {job_name!r}, NKAT_JOB {env.job!r}",
                        fatal=True, exit_code=exitcodes.FATAL)
    return settings, job_name, params


def _make_job(name: str, params: dict[str, object], backend: Backend) -> Job:
    try:
        return resolve_job(name)(params)
    except JobNotFound as exc:
        raise RunFailed("job_not_found", str(exc), fatal=True, exit_code=exitcodes.FATAL,
                        tb=traceback.format_exc()) from exc
    except JobParamsError as exc:
        raise RunFailed("params", f"job {name}: {exc}", fatal=True, exit_code=exitcodes.FATAL,
                        tb=traceback.format_exc()) from exc
    except Exception as exc:
        raise classify(exc, backend) from exc


def _restore(job: Job, resume: Resume, backend: Backend) -> ResumePoint:
    try:
        job_state, counters = state.unwrap(resume.state, resume.units_done)
    except state.BadCheckpoint as exc:
        raise RunFailed("bad_resume", f"checkpoint {resume.ckpt_seq}: {exc}", fatal=True,
                        exit_code=exitcodes.FATAL) from exc
    try:
        job.restore(job_state)
    except Exception as exc:
        raise classify(exc, backend) from exc
    return ResumePoint(resume.ckpt_seq, resume.units_done, counters)


def _await_done_ack(channel: Channel) -> int:
    """Wait for ``ack{DONE_ACK_SEQ}``; the channel resends ``done`` and gives up (orphaned)
    after supervisor_timeout. A ``stop`` bounds the wait by its deadline."""
    deadline: float | None = None
    while True:
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            return exitcodes.STOPPED
        try:
            msg = channel.inbox.get(timeout=timeout)
        except queue.Empty:
            return exitcodes.STOPPED
        if isinstance(msg, Ack) and msg.ckpt_seq == DONE_ACK_SEQ:
            return exitcodes.DONE
        if isinstance(msg, Cmd) and msg.op == "stop" and deadline is None:
            deadline = time.monotonic() + float(msg.args["deadline_s"])


def _say(text: str) -> None:
    print(f"nkat.worker: {text}", file=sys.stderr, flush=True)
