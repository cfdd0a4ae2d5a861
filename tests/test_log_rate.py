"""The flood limit of the run's log, as a pure policy on a clock the test moves: the first
``burst`` of an event per window are written, the rest counted, and every count comes
back as one summary; the events the run's history is read from are never limited."""

from __future__ import annotations

from typing import Any

import pytest

from nkat.supervisor.log_rate import (
    LIMITED_EVENTS,
    NEVER_LIMITED,
    OUTPUT_EVENTS,
    OVERFLOW_EVENT,
    LogRateLimiter,
    LogRateSettings,
    Suppressed,
)
from tests.test_ops_logs import emitted_events

SETTINGS = LogRateSettings(log_rate_window=10.0, log_rate_burst=3, log_output_burst=5,
                           max_keys=8)


def feed(limiter: LogRateLimiter, now: float, event: str, n: int, *,
         component: str = "supervisor", epoch: int | None = None,
         level: str = "warning") -> tuple[int, list[Suppressed]]:
    """n occurrences at ``now``: how many were written, and the summaries due first."""
    written, summaries = 0, []
    for i in range(n):
        summaries += limiter.due(now)
        written += limiter.admit(now, event, component, epoch, level, f"{now}#{i}")
    return written, summaries


def test_a_flood_writes_the_burst_and_counts_the_rest_until_the_window_ends() -> None:
    limiter = LogRateLimiter(SETTINGS)
    written, early = feed(limiter, 0.0, "protocol.error", 1000)
    assert (written, early) == (3, [])
    assert limiter.due(9.999) == []  # the window is still open
    (summary,) = limiter.due(10.0)
    assert summary == Suppressed("protocol.error", "supervisor", None, 997, "warning", 10.0,
                                 "0.0#3", "0.0#999")
    assert limiter.due(20.0) == [] and limiter.tracked == 0  # reported once, then forgotten


def test_the_next_occurrence_after_the_window_reports_the_count_then_opens_a_new_window() -> None:
    limiter = LogRateLimiter(SETTINGS)
    feed(limiter, 0.0, "protocol.error", 5)
    written, summaries = feed(limiter, 12.0, "protocol.error", 4)
    assert [s.count for s in summaries] == [2]  # before the first line of the new window
    assert written == 3  # a fresh burst
    assert [s.count for s in limiter.drain()] == [1]


def test_a_steady_flood_costs_at_most_burst_plus_one_lines_per_window() -> None:
    limiter = LogRateLimiter(SETTINGS)
    emitted = written = suppressed = summaries = 0
    for step in range(10_000):  # 100 per second for 100 seconds
        now = step / 100
        for summary in limiter.due(now):
            suppressed += summary.count
            summaries += 1
        written += limiter.admit(now, "worker.stderr", "supervisor", 1, "info", str(now))
        emitted += 1
    for summary in limiter.drain():
        suppressed += summary.count
        summaries += 1
    assert written + suppressed == emitted
    windows = 100 / SETTINGS.log_rate_window
    assert written == SETTINGS.log_output_burst * windows
    assert summaries == windows


def test_a_summary_takes_the_highest_level_it_counted_and_at_least_info() -> None:
    limiter = LogRateLimiter(SETTINGS)
    feed(limiter, 0.0, "gpu.xid", 3, level="debug")
    feed(limiter, 0.0, "gpu.xid", 2, level="debug")
    assert [s.level for s in limiter.drain()] == ["info"]
    feed(limiter, 0.0, "gpu.xid", 4, level="warning")
    feed(limiter, 0.0, "gpu.xid", 1, level="exception")
    feed(limiter, 0.0, "gpu.xid", 1, level="warning")
    assert [s.level for s in limiter.drain()] == ["error"]


def test_close_reports_every_count_left_even_in_an_open_window() -> None:
    limiter = LogRateLimiter(SETTINGS)
    feed(limiter, 0.0, "protocol.error", 4)
    feed(limiter, 5.0, "socket.flooded", 9)
    feed(limiter, 5.0, "operator.pause", 2)  # under the burst: nothing to report
    assert {(s.event, s.count) for s in limiter.drain()} == {("protocol.error", 1),
                                                            ("socket.flooded", 6)}
    assert limiter.drain() == [] and limiter.tracked == 0


def test_the_history_events_are_never_limited() -> None:
    limiter = LogRateLimiter(SETTINGS)
    for event in sorted(NEVER_LIMITED):
        written, _ = feed(limiter, 0.0, event, 100, level="critical")
        assert written == 100, event
    assert limiter.drain() == [] and limiter.tracked == 0


def test_the_limited_and_never_limited_sets_are_apart_and_name_real_events() -> None:
    assert not (LIMITED_EVENTS | OUTPUT_EVENTS) & NEVER_LIMITED
    emitted = emitted_events()
    # A renamed event would silently leave the limit (or the guard): every name is real.
    assert (LIMITED_EVENTS | OUTPUT_EVENTS | NEVER_LIMITED) - emitted == set()


def test_an_event_not_named_anywhere_is_written_in_full() -> None:
    limiter = LogRateLimiter(SETTINGS)
    assert feed(limiter, 0.0, "test.line", 1000)[0] == 1000


def test_worker_output_has_its_own_larger_burst_per_epoch_and_stream() -> None:
    limiter = LogRateLimiter(SETTINGS)
    assert feed(limiter, 0.0, "worker.stdout", 50, epoch=1, level="info")[0] == 5
    assert feed(limiter, 0.0, "worker.stderr", 50, epoch=1, level="info")[0] == 5
    assert feed(limiter, 0.0, "worker.stdout", 50, epoch=2, level="info")[0] == 5
    assert {(s.event, s.epoch, s.count) for s in limiter.drain()} == {
        ("worker.stdout", 1, 45), ("worker.stderr", 1, 45), ("worker.stdout", 2, 45)}


def test_every_event_a_worker_forwards_is_limited_but_each_epoch_starts_whole() -> None:
    limiter = LogRateLimiter(SETTINGS)
    # A worker that floods even a history event's name cannot flood the log with it …
    assert feed(limiter, 0.0, "run.completed", 100, component="worker", epoch=1)[0] == 3
    assert feed(limiter, 0.0, "batch.resized", 100, component="worker", epoch=1)[0] == 3
    # … and the next incarnation's start is written, whatever the last one did.
    assert feed(limiter, 0.0, "worker.started", 1, component="worker", epoch=2)[0] == 1
    assert sum(s.count for s in limiter.drain()) == 194


def test_invented_names_past_max_keys_share_one_counted_key() -> None:
    limiter = LogRateLimiter(SETTINGS)
    written = sum(feed(limiter, 0.0, f"junk.n{i}", 10, component="worker", epoch=1)[0]
                  for i in range(100))
    assert limiter.tracked == SETTINGS.max_keys + 1
    summaries = limiter.drain()
    assert written + sum(s.count for s in summaries) == 1000
    overflow = [s for s in summaries if s.event == OVERFLOW_EVENT]
    assert len(overflow) == 1 and overflow[0].count == 92 * 10 - 3


@pytest.mark.parametrize("field, value", [("log_rate_window", 0.0), ("log_rate_burst", 0),
                                          ("log_output_burst", 0), ("max_keys", 0)])
def test_settings_that_would_hide_everything_are_refused(field: str, value: float) -> None:
    changed: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=field):
        LogRateSettings(**changed)
