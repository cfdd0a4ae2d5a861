"""The Prometheus endpoint: served on loopback from its own registry, its text parses, and
it has every series docs/metrics.md lists, with the values the run loop fed it."""

from __future__ import annotations

import math
import re
import urllib.request
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nkat.supervisor.ops.metrics import RunMetrics, nkat_dims, parse_addr

DOC = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
STATUS = {"run_id": "r1", "state": "running", "epoch": 2, "units_done": 23, "units_total": 46,
          "progress": 0.5, "units_per_s": 100.0, "dims_per_s": None, "durable_ckpt_seq": 7,
          "gpu": {"temperature": 71.0}}


def documented() -> dict[str, str]:
    """name -> type, from the table in docs/metrics.md."""
    rows = re.findall(r"^\| `(nkat_\w+)` \| (\w+) \|", DOC.read_text(), re.MULTILINE)
    return dict(rows)


def scrape(metrics: RunMetrics) -> dict[str, prometheus_client.Metric]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(family: prometheus_client.Metric, suffix: str = "", **labels: str) -> float:
    for sample in family.samples:
        if sample.name == family.name + suffix and all(
                sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    raise AssertionError(f"no sample {family.name}{suffix} {labels}")


@pytest.fixture
def metrics():
    now = [100.0]
    m = RunMetrics("r1", dims_per_unit=65536, dims_total=3_000_000, clock=lambda: now[0])
    m.serve("127.0.0.1:0")
    m.now = now  # type: ignore[attr-defined]  # the test's clock
    yield m
    m.close()


def test_every_documented_series_is_served_with_its_type_and_run_id(metrics):
    # The per-GPU series exist once a status names GPUs (a run on several GPUs).
    metrics.update_from_status({**STATUS, "gpus": [
        {"index": 0, "temperature": 70.0, "progress": 0.5, "dims_per_s": 1e6, "shard": 2},
        {"index": 1, "temperature": None, "progress": None, "dims_per_s": None, "shard": None}]})
    families = scrape(metrics)
    docs = documented()
    assert len(docs) >= 14
    for name, kind in docs.items():
        # The text format names a counter's family without its _total suffix.
        family = families[name.removesuffix("_total") if kind == "counter" else name]
        assert family.type == kind, name
        assert family.samples and all(s.labels["run_id"] == "r1" for s in family.samples)
    served = {n for n in families if n.startswith("nkat_") and not n.endswith("_created")}
    assert served == {n.removesuffix("_total") if docs[n] == "counter" else n for n in docs}


def test_values_follow_the_status_and_the_events(metrics):
    fresh = scrape(metrics)
    assert math.isnan(value(fresh["nkat_gpu_temperature_celsius"]))
    assert math.isnan(value(fresh["nkat_heartbeat_age_seconds"]))
    assert value(fresh["nkat_restarts"], "_total", reason="crashed") == 0

    metrics.update_from_status(STATUS)
    metrics.beat(97.5)
    metrics.restart("crashed")
    metrics.restart("crashed")
    metrics.restart("crashed: exit code 1")  # free text is never a label value
    metrics.protocol_error()
    for seconds in (0.0008, 0.003, 0.2):
        metrics.checkpoint_acked(seconds)
    f = scrape(metrics)
    assert value(f["nkat_up"]) == 1
    assert value(f["nkat_worker_epoch"]) == 2
    assert value(f["nkat_progress_ratio"]) == 0.5
    assert value(f["nkat_units_done"]) == 23 and value(f["nkat_units_planned"]) == 46
    assert value(f["nkat_dims_done"]) == 23 * 65536
    assert value(f["nkat_dims_planned"]) == 3_000_000
    assert value(f["nkat_dims_per_second"]) == 100.0 * 65536
    assert value(f["nkat_gpu_temperature_celsius"]) == 71.0
    assert value(f["nkat_checkpoint_durable_seq"]) == 7
    assert value(f["nkat_heartbeat_age_seconds"]) == 2.5
    assert value(f["nkat_restarts"], "_total", reason="crashed") == 2
    assert value(f["nkat_restarts"], "_total", reason="other") == 1
    assert value(f["nkat_protocol_errors"], "_total") == 1
    hist = f["nkat_checkpoint_ack_seconds"]
    assert value(hist, "_count") == 3
    assert value(hist, "_bucket", le="0.001") == 1
    assert value(hist, "_bucket", le="0.25") == 3

    metrics.update_from_status({**STATUS, "state": "backoff", "units_done": 46,
                                "gpu": None, "dims_per_s": 5e6})
    f = scrape(metrics)
    assert value(f["nkat_up"]) == 0
    assert value(f["nkat_dims_done"]) == 3_000_000  # the last unit is short
    assert value(f["nkat_dims_per_second"]) == 5e6
    assert math.isnan(value(f["nkat_gpu_temperature_celsius"]))


def test_the_global_registry_is_left_alone(metrics):
    metrics.update_from_status(STATUS)
    names = {f.name for f in prometheus_client.REGISTRY.collect()}
    assert not any(name.startswith("nkat_") for name in names)
    second = RunMetrics("r2")  # a second run's metrics do not collide with the first's
    assert second.registry is not metrics.registry


def test_other_jobs_report_units_and_nan_dimensions():
    m = RunMetrics("r1")
    m.update_from_status(STATUS)
    assert math.isnan(m.registry.get_sample_value("nkat_dims_done", {"run_id": "r1"}))
    assert m.registry.get_sample_value("nkat_units_done", {"run_id": "r1"}) == 23
    assert nkat_dims({"job": "nkat-highdim", "params": {"max_dimension": 10,
                                                       "min_dimension": 3}}) == (65536, 8)
    assert nkat_dims({"job": "toy", "params": {"units": 3}}) is None


def test_addresses():
    assert parse_addr("127.0.0.1:9108") == ("127.0.0.1", 9108)
    assert parse_addr("[::1]:9108") == ("::1", 9108)
    with pytest.raises(ValueError):
        parse_addr("9108")


def test_each_gpu_of_a_sharded_run_has_its_own_series(metrics):
    metrics.update_from_status({**STATUS, "gpus": [
        {"index": 0, "temperature": 70.0, "progress": 0.5, "dims_per_s": 1e6, "shard": 2},
        {"index": 3, "temperature": None, "progress": None, "dims_per_s": None, "shard": None}]})
    f = scrape(metrics)
    assert value(f["nkat_gpu_row_temperature_celsius"], gpu="0") == 70.0
    assert value(f["nkat_gpu_row_shard_progress_ratio"], gpu="0") == 0.5
    assert value(f["nkat_gpu_row_dims_per_second"], gpu="0") == 1e6
    assert value(f["nkat_gpu_row_shard"], gpu="0") == 2
    assert math.isnan(value(f["nkat_gpu_row_temperature_celsius"], gpu="3"))
    assert value(f["nkat_gpu_row_shard"], gpu="3") == -1  # idle: no shard
