"""Notification delivery against a real HTTP receiver on 127.0.0.1 and real commands:
retries, timeouts, a full queue, the flush at exit, and failures that never raise."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from nkat.supervisor.notifier import Notifier
from nkat.supervisor.notify import NotifyEvent, NotifySettings
from tests.webhook_receiver import RecordingLog, WebhookReceiver

FAST = {"backoff_initial": 0.05, "backoff_max": 0.2}


def event(kind: str = "run.gave_up", **fields: object) -> NotifyEvent:
    return NotifyEvent(kind, "r1", fields or {"reason": "test"}, time.time())


def test_an_event_reaches_the_webhook_as_the_documented_json() -> None:
    log = RecordingLog()
    with WebhookReceiver() as hook:
        notifier = Notifier(NotifySettings(notify_url=hook.url), log, host="box", **FAST)
        notifier.submit(event("run.completed", result="results/result.json"))
        [got] = hook.wait_for(1)
        notifier.close(timeout=5)
    body = got.json
    assert body["event"] == "run.completed" and body["host"] == "box"
    assert body["fields"] == {"result": "results/result.json"}
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["X-Template"] == "yes" and got.headers["X-Priority"] == "3"
    [delivered] = log.events("notify.delivered")
    assert delivered["kind"] == "run.completed" and delivered["target"] == "url"
    assert delivered["attempts"] == 1 and delivered["ms"] >= 0


def test_a_slack_style_receiver_accepts_the_document() -> None:
    with WebhookReceiver(require_text=True) as hook:
        notifier = Notifier(NotifySettings(notify_url=hook.url), RecordingLog(), **FAST)
        notifier.submit(event("worker.kill_failed", pid=4242))
        [got] = hook.wait_for(1)
        notifier.close(timeout=5)
    assert "worker survived SIGKILL" in got.json["text"]


def test_a_receiver_failing_the_first_attempts_gets_the_event_after_retries() -> None:
    log = RecordingLog()
    with WebhookReceiver(fail_first=3) as hook:
        notifier = Notifier(NotifySettings(notify_url=hook.url), log, **FAST)
        notifier.submit(event())
        hook.wait_for(1)
        notifier.close(timeout=5)
        assert hook.attempts == 4
    retries = log.events("notify.retrying")
    assert [r["attempt"] for r in retries] == [1, 2, 3]
    assert "HTTP 503" in retries[0]["error"]
    assert log.events("notify.delivered")[0]["attempts"] == 4
    assert notifier.stats.delivered == 1 and notifier.stats.failed == 0


def test_a_rejecting_receiver_is_not_retried_and_the_failure_is_logged() -> None:
    log = RecordingLog()
    with WebhookReceiver(status=400) as hook:
        notifier = Notifier(NotifySettings(notify_url=hook.url), log, **FAST)
        notifier.submit(event())
        assert notifier.wait_idle(5)
        notifier.close(timeout=5)
        assert hook.attempts == 1
    [failed] = log.events("notify.failed")
    assert failed["reason"] == "rejected" and "HTTP 400" in failed["error"]
    assert failed["target"] == "url" and failed["attempts"] == 1


def test_a_hanging_receiver_times_out_and_is_retried_without_blocking_submit() -> None:
    log = RecordingLog()
    with WebhookReceiver(hang=True) as hook:
        notifier = Notifier(NotifySettings(notify_url=hook.url, notify_timeout=0.3), log,
                            retry_for=1.0, **FAST)
        started = time.monotonic()
        for _ in range(5):
            notifier.submit(event("thermal.kill_now", temperature=91))
        submit_s = time.monotonic() - started
        assert notifier.wait_idle(30)
        notifier.close(timeout=1)
    # Five submits return at once although every delivery hangs (0.3 s each at least).
    assert submit_s < 0.3
    failed = log.events("notify.failed")
    assert len(failed) == 5 and all("timed out" in f["error"] for f in failed)
    assert all(f["attempts"] >= 2 for f in failed)


def test_a_full_queue_drops_the_oldest_event_and_counts_it() -> None:
    log = RecordingLog()
    with WebhookReceiver(hang=True) as hook:
        notifier = Notifier(NotifySettings(notify_url=hook.url, notify_timeout=5), log,
                            queue_size=2, **FAST)
        for n in range(5):
            notifier.submit(event("worker.crash_loop", n=n))
        dropped = log.events("notify.dropped")
        notifier.close(timeout=0.2)
    # One is in delivery (hanging), two wait; the other two were dropped, oldest first.
    assert notifier.stats.dropped == len(dropped) >= 2
    assert dropped[-1]["dropped"] == notifier.stats.dropped
    assert notifier.stats.submitted == 5


def test_close_delivers_the_final_event_first_within_its_timeout() -> None:
    log = RecordingLog()
    with WebhookReceiver(fail_first=3) as hook:  # keeps the first event in its retries
        notifier = Notifier(NotifySettings(notify_url=hook.url), log, **FAST)
        notifier.submit(event("thermal.kill_now", temperature=91))
        notifier.submit(event("worker.crash_loop", crashes=2))
        notifier.submit(event("run.gave_up", reason="crash loop"))
        stats = notifier.close(timeout=5)
        kinds = [r.json["event"] for r in hook.wait_for(3)]
    # Whatever was under way when close() began, the final event overtakes the queue.
    assert kinds.index("run.gave_up") < kinds.index("worker.crash_loop")
    assert stats.unsent == 0 and stats.delivered == 3


def test_close_against_a_dead_receiver_returns_in_time_and_reports_what_was_unsent() -> None:
    log = RecordingLog()
    with WebhookReceiver(hang=True) as hook:
        notifier = Notifier(NotifySettings(notify_url=hook.url, notify_timeout=0.5), log,
                            **FAST)
        notifier.submit(event("thermal.kill_now"))
        notifier.submit(event("run.gave_up"))
        started = time.monotonic()
        stats = notifier.close(timeout=1.0)
        took = time.monotonic() - started
    assert took < 3.0
    assert stats.unsent + stats.failed == 2
    assert log.events("notify.unsent") or log.events("notify.failed")


def test_nothing_listening_is_logged_not_raised() -> None:
    log = RecordingLog()
    notifier = Notifier(NotifySettings(notify_url="http://127.0.0.1:9/hook"), log,
                        retry_for=0.3, **FAST)
    notifier.submit(event())
    assert notifier.wait_idle(10)
    notifier.close(timeout=1)
    [failed] = log.events("notify.failed")
    assert "refused" in failed["error"].lower() and failed["attempts"] >= 2


def test_the_command_gets_the_document_on_stdin(tmp_path: Path) -> None:
    out = tmp_path / "got.json"
    script = tmp_path / "hook.py"
    script.write_text("import os, sys\n"
                      f"data = sys.stdin.read()\nopen({str(out)!r}, 'w').write(data)\n"
                      "assert os.environ['NKAT_NOTIFY_EVENT'] == 'wal.write_failed'\n")
    log = RecordingLog()
    notifier = Notifier(NotifySettings(notify_command=f"{sys.executable} {script}"), log,
                        **FAST)
    notifier.submit(event("wal.write_failed", error="No space left on device"))
    assert notifier.wait_idle(10)
    notifier.close(timeout=1)
    body = json.loads(out.read_text())
    assert body["event"] == "wal.write_failed"
    assert body["fields"]["error"] == "No space left on device"
    assert log.events("notify.delivered")[0]["target"] == "command"


def test_a_command_that_hangs_is_killed_at_the_timeout(tmp_path: Path) -> None:
    log = RecordingLog()
    command = f"{sys.executable} -c 'import time; time.sleep(60)'"
    notifier = Notifier(NotifySettings(notify_command=command, notify_timeout=0.3), log,
                        retry_for=0.5, **FAST)
    started = time.monotonic()
    notifier.submit(event())
    assert notifier.wait_idle(20)
    notifier.close(timeout=1)
    assert time.monotonic() - started < 10
    [failed] = log.events("notify.failed")
    assert "did not finish within 0.3 s" in failed["error"]


def test_a_missing_command_is_not_retried() -> None:
    log = RecordingLog()
    notifier = Notifier(NotifySettings(notify_command="/nonexistent/notify-me"), log, **FAST)
    notifier.submit(event())
    assert notifier.wait_idle(5)
    notifier.close(timeout=1)
    [failed] = log.events("notify.failed")
    assert failed["reason"] == "rejected" and failed["attempts"] == 1


def test_without_a_target_submit_and_close_do_nothing() -> None:
    notifier = Notifier(NotifySettings(), RecordingLog())
    notifier.submit(event())
    assert notifier.close(timeout=1).submitted == 0


def test_a_broken_log_does_not_stop_deliveries() -> None:
    class BrokenLog:
        def __getattr__(self, name: str) -> object:
            def fail(*args: object, **kwargs: object) -> None:
                raise RuntimeError("log is gone")
            return fail

    with WebhookReceiver() as hook:
        notifier = Notifier(NotifySettings(notify_url=hook.url), BrokenLog(), **FAST)
        notifier.submit(event())
        notifier.submit(event("run.completed"))
        assert len(hook.wait_for(2)) == 2
        notifier.close(timeout=2)
