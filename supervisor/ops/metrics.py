"""Prometheus metrics of one supervised run, served on loopback when ``metrics_addr`` is set.

    metrics = RunMetrics.for_run(run)          # its own registry, never the global one
    metrics.serve("127.0.0.1:9108")            # GET /metrics, from the shared HTTP thread
    metrics.update_from_status(sup.status())   # each status turn
    metrics.beat(now); metrics.checkpoint_acked(0.004); metrics.restart("crashed")
    metrics.close()

Every series carries the constant label ``run_id``; docs/metrics.md lists them. The run
loop only sets numbers here; the HTTP thread reads them, so a slow scraper never holds
up supervision. Serving is ``nkat.supervisor.web.server``'s (aiohttp, bounded connections,
idle timeout), imported only by :meth:`RunMetrics.serve`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeGuard

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from nkat.supervisor.policies.restart_policy import ExitClass
from nkat.supervisor.rundir import RunDir
from nkat.supervisor.web.access import parse_addr as _parse_addr

NKAT_JOB = "nkat-highdim"
NKAT_DEFAULT_UNIT_DIMS = 1 << 16  # the job's default, for a spec that does not name it

# The exit classes that lead to a new worker; anything else is counted as "other" so a
# free-text reason can never grow the label set without bound.
RESTART_REASONS = tuple(c.value for c in (ExitClass.CRASHED, ExitClass.HUNG, ExitClass.OOM,
                                          ExitClass.PLANNED, ExitClass.THERMAL)) + ("other",)
UP_STATES = frozenset({"running", "paused"})
# Prometheus and an operator's curl: a few connections at once are plenty.
METRICS_MAX_CONNECTIONS = 16
# An fdatasync on a laptop SSD takes about a millisecond; a sick disk, seconds.
ACK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
               2.5, 5.0, 10.0)


def parse_addr(addr: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9108`` for IPv6) as the pair the HTTP server binds;
    ValueError (``AccessError``) for anything else."""
    return _parse_addr(addr, "metrics_addr")


def nkat_dims(spec: Mapping[str, Any]) -> tuple[int, int] | None:
    """(dimensions per unit, dimensions in all) of an NKAT spec, whose units are
    ``unit_dims`` consecutive N in [min_dimension, max_dimension]; None for other jobs."""
    params = spec.get("params", {})
    if spec.get("job") != NKAT_JOB or not isinstance(params, Mapping):
        return None
    try:
        total = int(params["max_dimension"]) - int(params.get("min_dimension", 1)) + 1
        return int(params.get("unit_dims", NKAT_DEFAULT_UNIT_DIMS)), total
    except (KeyError, TypeError, ValueError):
        return None


class RunMetrics:
    """The metric families of one run, in a registry of their own."""

    def __init__(self, run_id: str, *, dims_per_unit: int | None = None,
                 dims_total: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.run_id = run_id
        self.dims_per_unit = dims_per_unit
        self.dims_total = dims_total
        self.clock = clock
        self.registry = CollectorRegistry()
        self._server: Any = None
        self._last_beat: float | None = None
        reg, lbl = self.registry, ["run_id"]

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, lbl, registry=reg).labels(run_id)

        self.up = gauge("nkat_up", "1 while a worker is running or paused, else 0")
        self.epoch = gauge("nkat_worker_epoch", "the current worker incarnation (1, 2, ...)")
        self.progress = gauge("nkat_progress_ratio", "units done / units planned (0..1)")
        self.units_done = gauge("nkat_units_done", "units of work done (the last beat)")
        self.units_planned = gauge("nkat_units_planned", "units of work in the whole run")
        self.units_rate = gauge("nkat_units_per_second", "units per second (the last batch)")
        self.dims_done = gauge("nkat_dims_done", "dimensions N evaluated so far (NKAT job)")
        self.dims_planned = gauge("nkat_dims_planned", "dimensions N in the whole run")
        self.dims_rate = gauge("nkat_dims_per_second", "dimensions per second (NKAT job)")
        self.temperature = gauge("nkat_gpu_temperature_celsius",
                                 "GPU temperature; NaN when no GPU reading is available")
        self.durable_seq = gauge("nkat_checkpoint_durable_seq",
                                 "sequence number of the newest durable checkpoint")
        heartbeat = gauge("nkat_heartbeat_age_seconds",
                          "seconds since the last heartbeat; NaN before the first")
        heartbeat.set_function(self._heartbeat_age)
        self.restarts = Counter("nkat_restarts", "workers restarted, by why the last one ended",
                                ["run_id", "reason"], registry=reg)
        for reason in RESTART_REASONS:
            self.restarts.labels(run_id, reason)  # present at 0, so rate() works at once
        self.protocol_errors = Counter("nkat_protocol_errors",
                                       "malformed or out-of-place worker messages",
                                       lbl, registry=reg).labels(run_id)
        self.ack_seconds = Histogram("nkat_checkpoint_ack_seconds",
                                     "time to make a checkpoint durable before its ack",
                                     lbl, buckets=ACK_BUCKETS, registry=reg).labels(run_id)
        gpu_lbl = ["run_id", "gpu"]
        self.gpu_temperature = Gauge("nkat_gpu_row_temperature_celsius",
                                     "each GPU of a sharded run: its temperature", gpu_lbl,
                                     registry=reg)
        self.gpu_progress = Gauge("nkat_gpu_row_shard_progress_ratio",
                                  "each GPU of a sharded run: its shard's units done / units",
                                  gpu_lbl, registry=reg)
        self.gpu_dims_rate = Gauge("nkat_gpu_row_dims_per_second",
                                   "each GPU of a sharded run: dimensions per second",
                                   gpu_lbl, registry=reg)
        self.gpu_shard = Gauge("nkat_gpu_row_shard", "each GPU of a sharded run: the shard it "
                               "computes (-1: none)", gpu_lbl, registry=reg)
        for unknown in (self.temperature, self.dims_done, self.dims_planned, self.dims_rate):
            unknown.set(math.nan)  # NaN, not a made-up 0, until there is a value
        if dims_total is not None:
            self.dims_planned.set(dims_total)

    @classmethod
    def for_run(cls, run: RunDir) -> RunMetrics:
        """Metrics for ``run``, with dimensions when its job is the NKAT analysis."""
        dims = nkat_dims(run.info.spec)
        if dims is None:
            return cls(run.run_id)
        return cls(run.run_id, dims_per_unit=dims[0], dims_total=dims[1])

    # Serving --------------------------------------------------------------------------
    def serve(self, addr: str, *, max_connections: int = METRICS_MAX_CONNECTIONS,
              idle_timeout: float | None = None) -> None:
        """Answer ``GET /metrics`` on ``addr``. OSError if the port cannot be bound (the
        caller logs it and supervises on without metrics)."""
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from nkat.supervisor.web.server import DEFAULT_IDLE_TIMEOUT, HttpServer

        registry = self.registry

        async def metrics(_request: web.Request) -> web.Response:
            # Collecting a few dozen series takes microseconds: done on the loop itself.
            return web.Response(body=generate_latest(registry),
                                headers={"Content-Type": CONTENT_TYPE_LATEST})

        server = HttpServer(addr, [web.get("/metrics", metrics), web.get("/", metrics)],
                            max_connections=max_connections, what="metrics_addr",
                            idle_timeout=idle_timeout or DEFAULT_IDLE_TIMEOUT)
        server.start()
        self._server = server

    @property
    def port(self) -> int | None:
        """The bound port (useful with port 0), or None when not serving."""
        return None if self._server is None else self._server.port

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    # Updates from the run loop ------------------------------------------------------------
    def update_from_status(self, status: Mapping[str, Any]) -> None:
        """Set the gauges from :meth:`Supervisor.status`'s dict (missing keys: unchanged)."""
        self.up.set(1 if status.get("state") in UP_STATES else 0)
        _set(self.epoch, status.get("epoch"))
        _set(self.progress, status.get("progress"))
        _set(self.durable_seq, status.get("durable_ckpt_seq"))
        done, planned = status.get("units_done"), status.get("units_total")
        _set(self.units_done, done)
        _set(self.units_planned, planned)
        rate = status.get("units_per_s")
        _set(self.units_rate, rate)
        if self.dims_per_unit is not None:
            if _is_number(done):
                dims = done * self.dims_per_unit
                self.dims_done.set(min(dims, self.dims_total) if self.dims_total else dims)
            dims_rate = status.get("dims_per_s")
            if not _is_number(dims_rate) and _is_number(rate):
                dims_rate = rate * self.dims_per_unit
            _set(self.dims_rate, dims_rate)
        gpu = status.get("gpu")
        temp = gpu.get("temperature") if isinstance(gpu, Mapping) else None
        self.temperature.set(temp if _is_number(temp) else math.nan)
        for row in status.get("gpus") or ():  # one series per GPU of a sharded run
            label = str(row.get("index"))
            for gauge, key in ((self.gpu_temperature, "temperature"),
                               (self.gpu_progress, "progress"),
                               (self.gpu_dims_rate, "dims_per_s")):
                value = row.get(key)
                gauge.labels(self.run_id, label).set(value if _is_number(value) else math.nan)
            shard = row.get("shard")
            self.gpu_shard.labels(self.run_id, label).set(shard if _is_number(shard) else -1)

    def beat(self, now_mono: float) -> None:
        """A heartbeat arrived at ``now_mono`` (the clock given to the constructor)."""
        self._last_beat = now_mono

    def restart(self, reason: str) -> None:
        """A new worker is being started after one ended for ``reason`` (an exit class)."""
        self.restarts.labels(self.run_id, reason if reason in RESTART_REASONS else "other").inc()

    def checkpoint_acked(self, seconds: float) -> None:
        self.ack_seconds.observe(seconds)

    def protocol_error(self) -> None:
        self.protocol_errors.inc()

    def count(self, metric: str, value: float = 1.0, label: str = "") -> None:
        """One of the run loop's counts by name (``controller.Metric``): ``beat``,
        ``restart`` (label: why), ``checkpoint_acked`` (value: seconds), ``protocol_error``."""
        if metric == "beat":
            self.beat(self.clock())
        elif metric == "restart":
            self.restart(label)
        elif metric == "checkpoint_acked":
            self.checkpoint_acked(value)
        elif metric == "protocol_error":
            self.protocol_error()

    def _heartbeat_age(self) -> float:
        if self._last_beat is None:
            return math.nan
        return max(0.0, self.clock() - self._last_beat)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _set(gauge: Any, value: Any) -> None:
    if _is_number(value):
        gauge.set(value)
