"""The notification document and headers (pure), the settings' checks, the crash-loop alarm."""

from __future__ import annotations

import json

import pytest

from nkat.supervisor.notify import (
    KINDS,
    SCHEMA,
    CrashLoopAlarm,
    NotifyEvent,
    NotifySettings,
    UnknownEvent,
    http_headers,
    payload,
)

T_WALL = 1_790_000_000.25


def gave_up() -> NotifyEvent:
    return NotifyEvent("run.gave_up", "r1", {"reason": "crash loop: 6 crashes in 600 s",
                                              "ckpt_seq": 7}, T_WALL)


def test_the_document_carries_every_receivers_fields() -> None:
    body = payload(gave_up(), host="gpu-box")
    assert body["schema"] == SCHEMA and body["event"] == "run.gave_up"
    assert body["run_id"] == "r1" and body["host"] == "gpu-box"
    assert body["ts"] == "2026-09-21T14:13:20.250Z" and body["t_wall"] == T_WALL
    assert body["fields"] == {"reason": "crash loop: 6 crashes in 600 s", "ckpt_seq": 7}
    # Slack reads text; ntfy's template reads title and message; both name the run.
    assert "run gave up" in body["text"] and "r1" in body["text"]
    assert body["title"] == "nkat-supervise: run gave up (r1)"
    assert "crash loop" in body["message"] and "gpu-box" in body["message"]
    assert body["priority"] == 4 and "run.gave_up" in body["tags"]
    json.dumps(body)  # JSON-able as it is


def test_ntfy_headers_template_the_title_and_message_from_the_body() -> None:
    headers = http_headers(gave_up())
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Template"] == "yes"
    assert headers["X-Title"] == "{{.title}}" and headers["X-Message"] == "{{.message}}"
    assert headers["X-Priority"] == "4" and headers["X-Tags"] == "x,nkat-supervise"
    for value in headers.values():
        value.encode("latin-1")  # http.client sends header values as latin-1


def test_every_issue_event_is_a_kind_and_only_run_endings_are_final() -> None:
    assert set(KINDS) == {"run.completed", "run.gave_up", "worker.kill_failed",
                          "thermal.kill_now", "worker.crash_loop", "wal.write_failed"}
    assert {k for k, kind in KINDS.items() if kind.final} == {"run.completed", "run.gave_up"}
    assert all(1 <= kind.priority <= 5 for kind in KINDS.values())


def test_an_unknown_kind_is_refused_when_the_event_is_made() -> None:
    with pytest.raises(UnknownEvent, match="run.exploded"):
        NotifyEvent("run.exploded", "r1", {}, T_WALL)


def test_long_field_values_are_cut_for_a_phone_screen() -> None:
    event = NotifyEvent("wal.write_failed", "r1", {"error": "x" * 1000}, T_WALL)
    assert len(payload(event, "h")["message"]) < 300
    assert payload(event, "h")["fields"]["error"] == "x" * 1000  # the fields stay whole


@pytest.mark.parametrize("kwargs, problem", [
    ({"notify_url": "ntfy.sh/topic"}, "http:// or https://"),
    ({"notify_command": "  "}, "empty"),
    ({"notify_timeout": 0}, "notify_timeout"),
])
def test_bad_settings_name_the_key(kwargs: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        NotifySettings(**kwargs)  # type: ignore[arg-type]


def test_settings_come_from_the_flat_config_by_name() -> None:
    settings = NotifySettings.from_config({"notify_url": "https://ntfy.sh/t", "other": 1})
    assert settings.enabled and settings.notify_timeout == 10.0
    assert not NotifySettings.from_config({}).enabled


def test_crash_loop_alarm_fires_once_per_loop_and_rearms_after_progress() -> None:
    alarm = CrashLoopAlarm(window=600.0, alarm_at=2)
    assert alarm.crashed(0.0) is None
    assert alarm.crashed(10.0) == 2
    assert alarm.crashed(20.0) is None  # already told
    alarm.progressed()
    assert alarm.crashed(30.0) is None
    assert alarm.crashed(40.0) == 2


def test_crashes_outside_the_window_do_not_make_a_loop() -> None:
    alarm = CrashLoopAlarm(window=60.0, alarm_at=2)
    assert alarm.crashed(0.0) is None
    assert alarm.crashed(61.0) is None
    assert alarm.crashed(100.0) == 2
