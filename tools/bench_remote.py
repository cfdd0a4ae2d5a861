"""Remote signals: how fast a notification reaches a webhook, and how fast a cloud's
preemption notice is seen. ``python tools/bench.py remote [--json] [--quick]``.

The parts alone, in this process. Figures (one run, on this machine, loopback only):
  notify_submit_lag_ms_p50 / _max   Notifier.submit -> the webhook receiver has the document
  preempt_notice_to_seen_ms_p50_<cloud>   notice published -> PreemptionWatch has it,
                                    at preemption_poll_interval 1 s (GCP: hanging GET)

The whole way through a real supervisor is ``bench.py cli``'s: notify_lag_ms_p50 (the
event's log line -> the webhook has it) and preempt_notice_to_durable_ms_p50 (notice ->
the run's final checkpoint durable), with the same receiver and `measure_notice_latency_ms`.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from benchlib import WebhookReceiver, p50  # run as a script: tools/ is on the path

from nkat.supervisor.notifier import Notifier
from nkat.supervisor.notify import NotifyEvent, NotifySettings
from nkat.supervisor.preemption import CLOUDS, PreemptionSettings
from nkat.supervisor.preemption_watch import PreemptionWatch
from nkat.supervisor.testing.metadata_fake import measure_notice_latency_ms


class _NullLog:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def notify_submit_lag_ms(trials: int) -> list[float]:
    """Submit -> received, per event, against a receiver on 127.0.0.1."""
    samples = []
    with WebhookReceiver() as hook:
        notifier = Notifier(NotifySettings(notify_url=hook.url), _NullLog())
        try:
            for n in range(trials):
                submitted = time.time()
                notifier.submit(NotifyEvent("worker.crash_loop", "bench", {"n": n}, submitted))
                arrivals = hook.wait_for(n + 1, 10)
                if len(arrivals) <= n:
                    raise RuntimeError("the webhook never received the event")
                samples.append((arrivals[n][0] - submitted) * 1000.0)
                notifier.wait_idle(5)
        finally:
            notifier.close(timeout=2)
    return samples


def preempt_seen_ms(cloud: str, trials: int, interval: float = 1.0) -> list[float]:
    def start(url: str) -> PreemptionWatch:
        settings = PreemptionSettings(preemption=cloud, metadata_url=url,
                                      preemption_poll_interval=interval)
        return PreemptionWatch(settings, _NullLog())

    def reached(watch: PreemptionWatch, t_notice: float) -> float:
        notice = watch.wait(30)
        if notice is None:
            raise RuntimeError(f"{cloud}: the notice was not seen within 30 s")
        return notice.seen_mono

    # A random settle time puts the notice at a random phase of the poll cycle.
    phases = random.Random(13)
    return measure_notice_latency_ms(cloud, start, reached, PreemptionWatch.close,
                                     trials=trials,
                                     settle_s=lambda: 0.2 + phases.uniform(0, interval))


def run(args: argparse.Namespace) -> dict[str, float]:
    trials = 5 if args.quick else 20
    lags = notify_submit_lag_ms(trials)
    figures = {"notify_submit_lag_ms_p50": round(p50(lags), 2),
               "notify_submit_lag_ms_max": round(max(lags), 2)}
    for cloud in CLOUDS:
        seen = preempt_seen_ms(cloud, 3 if args.quick else 10)
        figures[f"preempt_notice_to_seen_ms_p50_{cloud}"] = round(p50(seen), 1)
        figures[f"preempt_notice_to_seen_ms_max_{cloud}"] = round(max(seen), 1)
    return figures
