"""Each cloud's documented answers turned into a Notice (or none), and the settings."""

from __future__ import annotations

import json

import pytest

from nkat.supervisor.preemption import (
    GCP_NOTICE_S,
    MetadataError,
    PreemptionSettings,
    parse_aws,
    parse_azure,
    parse_gcp,
)

NOW = 1_790_000_000.0
MONO = 123.0


def test_aws_404_is_no_notice() -> None:
    assert parse_aws(404, b"Not Found", NOW, MONO) is None


def test_aws_instance_action_gives_its_action_and_time() -> None:
    body = b'{"action": "terminate", "time": "2017-09-18T08:22:00Z"}'
    notice = parse_aws(200, body, NOW, MONO)
    assert notice is not None and notice.cloud == "aws"
    assert notice.deadline_wall == 1505722920.0
    assert notice.detail == "action=terminate time=2017-09-18T08:22:00Z"
    assert notice.seen_wall == NOW and notice.seen_mono == MONO


@pytest.mark.parametrize("action", ["stop", "hibernate"])
def test_aws_stop_and_hibernate_are_notices_too(action: str) -> None:
    body = json.dumps({"action": action, "time": "2017-09-18T08:22:00Z"}).encode()
    notice = parse_aws(200, body, NOW, MONO)
    assert notice is not None and f"action={action}" in notice.detail


@pytest.mark.parametrize("status, body", [(200, b"<html>"), (200, b'{"action": "stop"}'),
                                          (403, b"Forbidden"), (500, b"")])
def test_aws_undocumented_answers_are_errors_that_quote_them(status: int, body: bytes) -> None:
    with pytest.raises(MetadataError, match="instance-action"):
        parse_aws(status, body, NOW, MONO)


def test_gcp_false_is_no_notice_and_true_gives_thirty_seconds() -> None:
    assert parse_gcp(200, b"FALSE", NOW, MONO) is None
    notice = parse_gcp(200, b"TRUE\n", NOW, MONO)
    assert notice is not None and notice.deadline_wall == NOW + GCP_NOTICE_S == NOW + 30


def test_gcp_other_values_are_errors() -> None:
    with pytest.raises(MetadataError, match="neither TRUE nor FALSE"):
        parse_gcp(200, b"maybe", NOW, MONO)
    with pytest.raises(MetadataError, match="HTTP 403"):
        parse_gcp(403, b"Missing Metadata-Flavor:Google header.", NOW, MONO)


def azure(*events: dict[str, object]) -> bytes:
    return json.dumps({"DocumentIncarnation": 2, "Events": list(events)}).encode()


def event(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "EventId": "602d9444-d2cd-49c7-8624-8643e7171297", "EventType": "Preempt",
        "ResourceType": "VirtualMachine", "Resources": ["vm0"], "EventStatus": "Scheduled",
        "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT", "Description": "",
        "EventSource": "Platform", "DurationInSeconds": -1}
    return {**base, **kw}


def test_azure_empty_events_is_no_notice() -> None:
    assert parse_azure(200, azure(), NOW, MONO, "vm0") is None


def test_azure_preempt_for_this_vm_gives_not_before_as_the_deadline() -> None:
    notice = parse_azure(200, azure(event()), NOW, MONO, "vm0")
    assert notice is not None and notice.deadline_wall == 1474309787.0
    assert notice.detail.startswith("Preempt 602d9444")
    assert "Scheduled" in notice.detail


def test_azure_events_of_other_kinds_or_other_vms_are_not_notices() -> None:
    body = azure(event(EventType="Freeze"), event(EventType="Reboot"),
                 event(Resources=["another-vm"]))
    assert parse_azure(200, body, NOW, MONO, "vm0") is None
    # Without the VM's name every Preempt counts: better a needless checkpoint.
    assert parse_azure(200, body, NOW, MONO, None) is not None


def test_azure_terminate_counts_and_the_soonest_deadline_wins() -> None:
    body = azure(event(NotBefore="Mon, 19 Sep 2016 18:40:00 GMT"),
                 event(EventType="Terminate", EventId="t1",
                       NotBefore="Mon, 19 Sep 2016 18:30:00 GMT"))
    notice = parse_azure(200, body, NOW, MONO, "vm0")
    assert notice is not None and notice.detail.startswith("Terminate t1")


def test_azure_a_started_event_has_a_blank_not_before_and_is_due_now() -> None:
    notice = parse_azure(200, azure(event(EventStatus="Started", NotBefore="")), NOW, MONO,
                         "vm0")
    assert notice is not None and notice.deadline_wall == NOW


@pytest.mark.parametrize("status, body", [(400, b'{"error": "Bad request"}'),
                                          (200, b"{}"), (200, b"not json")])
def test_azure_undocumented_answers_are_errors(status: int, body: bytes) -> None:
    with pytest.raises(MetadataError):
        parse_azure(status, body, NOW, MONO, "vm0")


def test_azure_a_bad_not_before_is_an_error() -> None:
    with pytest.raises(MetadataError, match="RFC 1123"):
        parse_azure(200, azure(event(NotBefore="soon")), NOW, MONO, "vm0")


def test_settings_default_off_and_name_the_bad_key() -> None:
    assert not PreemptionSettings().enabled
    settings = PreemptionSettings.from_config({"preemption": "gcp"})
    assert settings.base_url == "http://metadata.google.internal"
    assert PreemptionSettings(preemption="aws", metadata_url="http://127.0.0.1:1/"
                              ).base_url == "http://127.0.0.1:1"
    with pytest.raises(ValueError, match="preemption must be one of off, aws, gcp, azure"):
        PreemptionSettings(preemption="oracle")
    with pytest.raises(ValueError, match="metadata_url"):
        PreemptionSettings(preemption="aws", metadata_url="https://x")
    with pytest.raises(ValueError, match="preemption_poll_interval"):
        PreemptionSettings(preemption_poll_interval=0)
