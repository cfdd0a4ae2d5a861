"""Faults planted through NKAT_FAILPOINTS and bad jobs: what the worker says and how it
exits, and that a run resumed after a crash gives the uninterrupted run's result."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from nkat.protocol import exitcodes
from nkat.protocol.messages import DONE_ACK_SEQ, Beat, Ckpt, Done, Fail, Hello, Log, Resume
from nkat.worker.backend import BackendUnavailable, select_backend
from nkat.worker.job import resolve_job
from nkat.worker.supervised import NO_BACKEND
from tests.fake_supervisor import REPO, FakeSupervisor, toy_expected, worker_env
from tests.jobs.toy import Toy

SLOW = {"units": 100_000, "unit_seconds": 0.002}


@pytest.fixture
def sup():
    fake = FakeSupervisor()
    yield fake
    fake.close()


def test_hang_releasing_the_gil_keeps_beats_with_frozen_progress(sup):
    sup.start({"units": 1000}, failpoints="hang_nogil@unit=40")
    sup.expect(Beat, where=lambda b: b.units_done == 40)
    beats = sup.beats(sup.collect(1.0))
    assert len(beats) >= 5
    assert {(b.stage, b.progress_seq, b.units_done) for b in beats} == \
        {("compute", beats[0].progress_seq, 40)}


def test_hang_holding_the_gil_stops_beats_and_sigusr1_dumps_stacks(sup):
    sup.start({"units": 1000, "unit_seconds": 0.005}, failpoints="hang_gil@unit=40")
    sup.expect(Beat, where=lambda b: b.units_done > 0)
    deadline = time.monotonic() + 5
    while "failpoint hang_gil fired" not in sup.stderr():
        assert time.monotonic() < deadline, sup.stderr()
        time.sleep(0.05)
    sup.collect(0.3)  # a beat already on its way
    assert sup.beats(sup.collect(1.0)) == []
    assert sup.proc.poll() is None
    sup.send_signal(signal.SIGUSR1)
    # faulthandler writes one thread at a time: wait for the whole dump (every thread).
    while len(re.findall(r"^(Current thread|Thread) 0x", sup.stderr(), re.M)) < 2:
        assert time.monotonic() < deadline + 5, f"fewer than two stacks: {sup.stderr()}"
        time.sleep(0.05)


def test_oom_halves_the_batch_and_the_result_is_unchanged(sup):
    sup.start({"units": 100}, settings={"batch_size": 16}, failpoints="oom@unit=20:times=2")
    done = sup.expect(Done)
    sup.ack(DONE_ACK_SEQ)
    assert sup.wait_exit() == exitcodes.DONE
    ooms = [m.fields for m in sup.received if isinstance(m, Log) and m.event == "batch.oom"]
    assert ooms == [{"first": 16, "count": 16, "to": 8}, {"first": 16, "count": 8, "to": 4}]
    assert Toy({}).deterministic_result(done.result) == toy_expected(100)


def test_oom_at_a_batch_of_one_exits_oom(sup):
    sup.start({"units": 100}, failpoints="oom@unit=3:times=100")
    fail = sup.expect(Fail)
    assert (fail.kind, fail.fatal) == ("oom", False)
    assert "MemoryError" in fail.message and fail.traceback
    assert sup.wait_exit() == exitcodes.OOM


def test_cuda_sticky_error_exits_gpu_sticky(sup):
    sup.start({"units": 100}, failpoints="cuda_sticky@unit=40")
    fail = sup.expect(Fail)
    assert (fail.kind, fail.fatal) == ("gpu_sticky", False)
    assert "cudaErrorIllegalAddress" in fail.message
    assert sup.wait_exit() == exitcodes.GPU_STICKY


@pytest.mark.parametrize("params, kind, text", [
    ({"units": 100, "fail_at": 30}, "job_error", "toy job bug at unit 30"),
    ({"units": -1}, "params", "units must be a positive integer"),
])
def test_job_errors_are_fatal(sup, params, kind, text):
    sup.start(params)
    fail = sup.expect(Fail)
    assert (fail.kind, fail.fatal) == (kind, True)
    assert text in fail.message and text in fail.traceback
    assert sup.wait_exit() == exitcodes.FATAL


def test_unusable_backend_is_a_retryable_start_failure_and_never_a_fallback(sup):
    try:
        select_backend("cupy")
    except BackendUnavailable:
        pass
    else:
        pytest.skip("CuPy is usable here")
    hello = sup.start({"units": 10}, NKAT_BACKEND="cupy")
    # hello names what the worker really computes on: nothing, not NumPy instead.
    assert (hello.backend, hello.device) == (NO_BACKEND, "")
    fail = sup.expect(Fail)
    assert (fail.kind, fail.fatal) == ("backend_unavailable", False)
    assert "'cupy' is unavailable" in fail.message
    assert sup.wait_exit() == exitcodes.BACKEND_UNAVAILABLE
    assert not any(isinstance(m, (Beat, Ckpt, Done)) and getattr(m, "units_done", 0)
                   for m in sup.received), "no unit may be computed on another backend"
    assert exitcodes.NAMES[exitcodes.BACKEND_UNAVAILABLE] == "backend_unavailable"


def test_auto_says_why_it_settled_for_numpy(sup):
    if select_backend("auto").name != "numpy":
        pytest.skip("CuPy is usable here")
    hello = sup.start({"units": 10}, NKAT_BACKEND="auto")
    assert hello.backend == "numpy"
    fallback = sup.expect(Log, where=lambda m: m.event == "backend.fallback")
    assert fallback.fields["asked"] == "auto" and fallback.fields["using"] == "numpy"
    assert fallback.fields["reason"]
    sup.expect(Done)
    sup.ack(DONE_ACK_SEQ)
    assert sup.wait_exit() == exitcodes.DONE


def test_unknown_job_is_fatal(sup):
    sup.start({}, job="no.such.module:Job")
    fail = sup.expect(Fail)
    assert (fail.kind, fail.fatal) == ("job_not_found", True)
    assert sup.wait_exit() == exitcodes.FATAL


@pytest.mark.parametrize("failpoint, code", [
    ("crash@unit=12:code=3", 3),
    ("crash@unit=12:signal=SIGKILL", -signal.SIGKILL),
    ("crash@code=4:start", 4),
])
def test_crash(sup, failpoint, code):
    if failpoint.endswith("start"):
        sup.spawn(failpoints=failpoint)
    else:
        sup.start({"units": 100}, failpoints=failpoint)
    assert sup.wait_exit() == code


def test_bad_failpoints_fail_startup(sup):
    sup.spawn(failpoints="crash@unit=oops")
    assert sup.wait_exit() == exitcodes.STARTUP
    assert "crash@unit=oops" in sup.stderr()


def test_ignore_sigterm(sup):
    sup.start(SLOW, failpoints="ignore_sigterm")
    sup.expect(Beat, where=lambda b: b.units_done > 0)
    sup.send_signal(signal.SIGTERM)
    assert sup.beats(sup.collect(0.5)), "still beating after SIGTERM"
    assert sup.proc.poll() is None


def test_resume_after_a_crash_gives_the_uninterrupted_result(sup):
    params = {"units": 300, "unit_seconds": 0.002}
    failpoints = "crash@unit=120:code=3:epoch=1"
    sup.start(params, settings={"checkpoint_interval": 0.05, "batch_size": 10},
              failpoints=failpoints)
    assert sup.wait_exit() == 3
    last = sup.acked[-1]
    # The crash came before unit 120 was computed, so epoch 2 computes it again: only
    # the epoch qualifier keeps the failpoint from firing there.
    assert 0 < last.units_done <= 120

    resumed = FakeSupervisor(epoch=2)
    try:
        resumed.start(params, failpoints=failpoints,
                      settings={"checkpoint_interval": 0.05, "batch_size": 7,
                                "provenance": {"epochs": 2, "restarts": 1}},
                      resume=Resume(last.ckpt_seq, last.units_done, last.state))
        done = resumed.expect(Done)
        resumed.ack(DONE_ACK_SEQ)
        assert resumed.wait_exit() == exitcodes.DONE
        ckpts = [m for m in resumed.received if isinstance(m, Ckpt)]
        assert ckpts and ckpts[0].ckpt_seq == last.ckpt_seq + 1
        assert done.result["provenance"]["epochs"] == 2
        deterministic = Toy({}).deterministic_result(done.result)
        assert json.dumps(deterministic, sort_keys=True) == \
            json.dumps(toy_expected(300), sort_keys=True)
    finally:
        resumed.close()


def test_corrupt_resume_state_is_fatal(sup):
    sup.start({"units": 100}, resume=Resume(3, 50, b"not a checkpoint"))
    fail = sup.expect(Fail)
    assert (fail.kind, fail.fatal) == ("bad_resume", True)
    assert sup.wait_exit() == exitcodes.FATAL


def test_worker_dies_with_its_supervisor(sup):
    # A stand-in supervisor process spawns the worker, then is killed: the kernel must
    # take the worker down with it (PR_SET_PDEATHSIG).
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import os, subprocess, sys, time\n"
         "env = dict(os.environ, NKAT_SUPERVISOR_PID=str(os.getpid()))\n"
         "p = subprocess.Popen([sys.executable, '-m', 'nkat.worker'], env=env)\n"
         "print(p.pid, flush=True)\n"
         "time.sleep(60)\n"],
        cwd=REPO, stdout=subprocess.PIPE,
        env=worker_env(NKAT_ENDPOINT=sup.endpoint, NKAT_TOKEN=sup.token, NKAT_EPOCH="1",
                       NKAT_BACKEND="numpy"))
    try:
        worker = psutil.Process(int(parent.stdout.readline()))
        sup.expect(Hello)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 5
    while _alive(worker):
        assert time.monotonic() < deadline, "the worker outlived its supervisor"
        time.sleep(0.05)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE  # nobody may reap an orphan here
    except psutil.NoSuchProcess:
        return False


def test_nkat_highdim_resumed_after_a_crash_gives_the_bare_result():
    pytest.importorskip("nkat.worker.jobs.nkat_highdim")
    params = {"min_dimension": 1, "max_dimension": 20_000, "unit_dims": 100}  # 200 units
    job = resolve_job("nkat-highdim")(params)
    bare = subprocess.run(
        [sys.executable, "-m", "nkat.worker", "--standalone",
         *(f"--set={k}={v}" for k, v in params.items())],
        cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=60)
    assert bare.returncode == 0, bare.stderr
    settings = {"checkpoint_interval": 0.01, "batch_size": 10}
    # However fast the job: the first stall makes a checkpoint due, the second gives it
    # time to be sent and acknowledged before the crash.
    failpoints = ("stall@unit=50:seconds=0.05:epoch=1;stall@unit=100:seconds=0.3:epoch=1;"
                  "crash@unit=150:epoch=1")
    first = FakeSupervisor()
    try:
        first.start(params, job="nkat-highdim", settings=settings, failpoints=failpoints)
        assert first.wait_exit(30) == 1
        last = first.acked[-1]
        assert 0 < last.units_done <= 150
    finally:
        first.close()
    second = FakeSupervisor(epoch=2)
    try:
        second.start(params, job="nkat-highdim", settings=settings, failpoints=failpoints,
                     resume=Resume(last.ckpt_seq, last.units_done, last.state))
        done = second.expect(Done, timeout=30)
        second.ack(DONE_ACK_SEQ)
        assert second.wait_exit() == exitcodes.DONE
    finally:
        second.close()
    canonical = {"sort_keys": True, "separators": (",", ":")}
    assert json.dumps(job.deterministic_result(done.result), **canonical) == \
        json.dumps(job.deterministic_result(json.loads(bare.stdout)), **canonical)
