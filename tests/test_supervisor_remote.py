"""A real supervisor against a local cloud metadata service and a local webhook receiver:
a spot notice stops the run with a final durable checkpoint, ``start --boot`` resumes it
on "the next instance" (the same state dir), and the run's end reaches the receiver."""

from __future__ import annotations

import subprocess

from nkat.supervisor import journal
from nkat.supervisor.testing.metadata_fake import FakeMetadataServer
from tests.e2e import (  # noqa: F401 - reap_processes is an autouse fixture
    SupervisedRun,
    deterministic,
    env_with,
    reap_processes,
    reference,
    wait_for,
)
from tests.webhook_receiver import WebhookReceiver

JOB = ["max_dimension=60000000", "unit_dims=65536"]
#: Epoch 1 crawls (a tenth of a second per unit from unit 50): the notice lands mid-run,
#: and every unit boundary is a place to obey cmd stop.
SLOW = ";".join(f"stall@unit={k}:seconds=0.1:epoch=1" for k in range(50, 400))
QUICK = ["restart_delay=0.05", "checkpoint_interval=5", "segment_size=1048576",
         "preemption_poll_interval=0.1"]


def test_a_spot_notice_checkpoints_stops_and_the_next_boot_finishes_and_notifies(tmp_path):
    expected = deterministic(reference(JOB))
    with FakeMetadataServer("aws") as imds, WebhookReceiver() as hook:
        run = SupervisedRun(tmp_path, "spot", JOB + QUICK + [
            "preemption=aws", f"metadata_url={imds.url}", f"notify_url={hook.url}"],
            failpoints=SLOW)
        run.start()
        wait_for(lambda: run.proc.poll() is not None or run.status().get("units_done"), 60,
                 "the worker to run")
        assert run.proc.poll() is None, run.proc.communicate()
        imds.announce(in_s=120)
        assert run.wait(timeout=60) == 4, run.err
        (preempted,) = run.events("run.preempted")
        assert preempted["cloud"] == "aws" and 100 <= preempted["seconds_left"] <= 120
        # The final checkpoint was made durable after the notice, before the stop record.
        entries = [journal.read(r) for r in run.records()]
        stop = entries[-1]
        assert isinstance(stop, journal.Stop) and stop.desired is journal.Desired.RUNNING
        ckpts = [e for e in entries if isinstance(e, journal.CheckpointMeta)]
        assert ckpts and stop.ckpt_seq == ckpts[-1].ckpt_seq >= 1
        assert hook.received == []  # a preemption is not an event to notify

        imds.clear()  # the next instance has no notice
        boot = subprocess.run(run.argv()[:6] + ["--boot", "--quiet", "--backend", "numpy"],
                              env=env_with(), capture_output=True, text=True, timeout=120)
        assert boot.returncode == 0, boot.stderr
        assert deterministic(run.result()) == expected
        (completed,) = hook.wait_for(1)
        body = completed.json
        assert body["event"] == "run.completed" and body["run_id"] == "spot"
        assert "text" in body and completed.headers.get("X-Title")
