"""Memory high water, RSS leak suspicion and power warnings (rate limits, windows)."""

from __future__ import annotations

import pytest

from nkat.supervisor.policies.resources import (
    LeakWatch,
    MemoryWatch,
    PowerWatch,
    ResourceActionKind,
    ResourceSettings,
)

S = ResourceSettings()
GB = 1024**3
MB = 1024**2


def test_defaults_and_from_config() -> None:
    assert (S.memory_high_water, S.free_memory_interval, S.leak_rss_growth_mb, S.leak_window,
            S.power_limit, S.power_high_water, S.power_warn_interval) == \
        (0.95, 30.0, 1024.0, 600.0, None, 0.95, 300.0)
    assert ResourceSettings.from_config({"power_limit": 320.0, "leak_window": 60.0,
                                         "memory_high_water": 0.9}) == \
        ResourceSettings(power_limit=320.0, leak_window=60.0, memory_high_water=0.9)
    with pytest.raises(ValueError, match="memory_high_water"):
        ResourceSettings(memory_high_water=1.5)
    with pytest.raises(ValueError, match="power_limit"):
        ResourceSettings(power_limit=0.0)


# Memory ----------------------------------------------------------------------------------


def test_free_memory_at_the_high_water_mark_rate_limited() -> None:
    mem = MemoryWatch(S)
    assert mem.update(0.0, int(9.4 * GB), 10 * GB) is None
    action = mem.update(1.0, int(9.5 * GB), 10 * GB)
    assert action is not None and action.kind is ResourceActionKind.FREE_MEMORY
    assert action.fields["repeats"] == 1
    for t in range(2, 31):
        assert mem.update(float(t), int(9.9 * GB), 10 * GB) is None
    again = mem.update(31.0, int(9.9 * GB), 10 * GB)
    assert again is not None and again.fields["repeats"] == 2  # still high: send again


def test_repeats_start_over_once_memory_fell() -> None:
    mem = MemoryWatch(S)
    mem.update(0.0, 96, 100)
    mem.update(40.0, 50, 100)
    action = mem.update(80.0, 96, 100)
    assert action is not None and action.fields["repeats"] == 1


@pytest.mark.parametrize(("used", "total"), [(None, 100), (90, None), (90, 0)])
def test_unknown_memory_does_nothing(used: int | None, total: int | None) -> None:
    assert MemoryWatch(S).update(0.0, used, total) is None


# Leak ------------------------------------------------------------------------------------


def test_warmup_growth_is_ignored() -> None:
    leak = LeakWatch(S, now=0.0)
    assert leak.update(1.0, 100 * MB) is None
    assert leak.update(59.0, 5 * GB) is None  # pools and imports grow at start
    for t in range(60, 700, 10):
        assert leak.update(float(t), 5 * GB) is None


def test_growth_past_the_bound_within_the_window_is_a_leak_once() -> None:
    leak = LeakWatch(S, now=0.0)
    assert leak.update(60.0, 2 * GB) is None
    assert leak.update(300.0, 2 * GB + 1024 * MB) is None  # exactly the bound: not past it
    action = leak.update(310.0, 2 * GB + 1025 * MB)
    assert action is not None and action.kind is ResourceActionKind.PLANNED_RESTART
    assert "leak suspected" in action.reason
    assert action.fields["growth_mb"] == pytest.approx(1025)
    assert leak.update(320.0, 9 * GB) is None  # once per worker


def test_growth_is_measured_from_the_window_minimum() -> None:
    leak = LeakWatch(S, now=0.0)
    leak.update(60.0, 3 * GB)
    leak.update(100.0, 1 * GB)  # dips (a pool released), then grows from there
    assert leak.update(200.0, 2 * GB) is None
    action = leak.update(300.0, 2 * GB + 10 * MB)
    assert action is not None


def test_slow_growth_spread_beyond_the_window_is_not_a_leak() -> None:
    leak = LeakWatch(S, now=0.0)
    for i in range(0, 360):  # +100 MB every minute for six hours: 500 MB per window
        assert leak.update(60.0 + i * 60.0, GB + i * 100 * MB // 60) is None


def test_missing_rss_is_ignored() -> None:
    leak = LeakWatch(S, now=0.0)
    assert leak.update(100.0, None) is None


# Power -----------------------------------------------------------------------------------


def test_no_limit_known_no_warning() -> None:
    assert PowerWatch(S).update(0.0, 500.0, None) is None
    assert PowerWatch(S).limit(None) is None


def test_the_lower_limit_wins() -> None:
    power = PowerWatch(ResourceSettings(power_limit=320.0))
    assert power.limit(None) == 320.0
    assert power.limit(300.0) == 300.0
    assert power.limit(350.0) == 320.0
    assert PowerWatch(S).limit(250.0) == 250.0


def test_warn_at_95_percent_rate_limited() -> None:
    power = PowerWatch(ResourceSettings(power_limit=320.0))
    assert power.update(0.0, 284.0, 300.0) is None
    action = power.update(1.0, 285.0, 300.0)
    assert action is not None and action.kind is ResourceActionKind.POWER_WARNING
    assert action.fields == {"watts": 285.0, "limit_w": 300.0}
    assert power.update(100.0, 299.0, 300.0) is None
    assert power.update(301.0, 299.0, 300.0) is not None
    assert power.update(302.0, None, 300.0) is None
