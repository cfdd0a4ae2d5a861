"""Xid classes: restart the worker, give up for a GPU reset, or log."""

from __future__ import annotations

import pytest

from nkat.supervisor.policies.xid import (
    XidAction,
    classify_event,
    classify_gpu_lost,
    classify_xid,
)


@pytest.mark.parametrize("xid", [13, 31, 43])
def test_context_errors_restart_the_worker(xid: int) -> None:
    verdict = classify_xid(xid)
    assert verdict.action is XidAction.RESTART_WORKER
    assert verdict.message.startswith(f"Xid {xid}:")


@pytest.mark.parametrize("xid", [48, 79, 95])
def test_device_errors_need_a_reset(xid: int) -> None:
    action, message = classify_xid(xid)
    assert action is XidAction.GPU_RESET
    assert "reset" in message and "reboot" in message


@pytest.mark.parametrize("xid", [0, 8, 32, 45, 61, 62, 63, 64, 74, 92, 94, 119, 9999])
def test_other_xids_are_only_logged(xid: int) -> None:
    assert classify_xid(xid).action is XidAction.LOG


def test_gpu_lost_needs_a_reset() -> None:
    action, message = classify_gpu_lost()
    assert action is XidAction.GPU_RESET and message.startswith("GPU lost")


def test_sensor_events() -> None:
    assert classify_event("xid", 31).action is XidAction.RESTART_WORKER
    assert classify_event("xid", 94).action is XidAction.LOG
    assert classify_event("ecc_double_bit", None).action is XidAction.GPU_RESET
    assert classify_event("gpu_unavailable", None).action is XidAction.GPU_RESET

