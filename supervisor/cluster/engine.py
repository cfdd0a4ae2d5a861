"""``start --engine ray``: join the cluster, cut a new run into shards, and drive it.

    code = run_on_ray(run, config, wal, log, say=say, backend="numpy", sim_gpu=None)

Called by ``launch`` with the run locked and its WAL open and recovered (so every damage
check and message of a local start applies); the WAL is handed over to the journal actor
here. A run is cut into shards at its first start, ``SHARDS_PER_GPU`` per unit of the
agents' resource the cluster has then, and keeps that cut for life: a resume, on any
engine, computes the same shards.
"""

from __future__ import annotations

import sys
from typing import Any

from nkat.supervisor.cluster.settings import (
    RayMissing,
    RaySettings,
    agent_resource,
    import_ray,
    init_options,
)
from nkat.supervisor.config import Config
from nkat.supervisor.exitcode import ExitCode
from nkat.supervisor.rundir import RunDir
from nkat.supervisor.spawn import check_job_spec
from nkat.supervisor.wal import Wal


def run_on_ray(run: RunDir, config: Config, wal: Wal, log: Any, *, say: Any, backend: str,
               sim_gpu: str | None = None, on_status: Any = None,
               metrics: Any = None) -> ExitCode:
    settings = RaySettings.from_config(config)
    try:
        ray = import_ray()
    except RayMissing as exc:
        return _refuse(log, str(exc), ExitCode.USAGE)
    options = init_options(settings)
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        return _refuse(log, f"cannot join the Ray cluster at {options['address']}: {exc}",
                       ExitCode.USAGE)
    try:
        resource, _ = agent_resource(settings, backend)
        capacity = int(ray.cluster_resources().get(resource, 0))
        log.info("ray.connected", address=options["address"], resource=resource,
                 capacity=capacity, nodes=len(ray.nodes()))
        say(f"on Ray at {options['address']}: {capacity} × {resource} for node agents")
        if not run.info.shards:
            why = _cut(run, wal, capacity)
            if why:
                return _refuse(log, why, ExitCode.USAGE)
        wal.close()  # the journal actor is the run's one writer from here on
        from nkat.supervisor.cluster.driver import Driver

        driver = Driver(ray, run, config, log, say=say, backend=backend, sim_gpu=sim_gpu,
                        on_status=on_status, metrics=metrics)
        return driver.run()
    finally:
        ray.shutdown()


def _cut(run: RunDir, wal: Wal, capacity: int) -> str | None:
    """Cut a new run into shards, durably; or why it cannot be."""
    from nkat.supervisor.launch import SHARDS_PER_GPU, cut_shards

    if wal.checkpoints():
        return (f"run {run.run_id} was computed as one piece by the local engine; it cannot "
                "move to Ray mid-run: finish it with --engine local, or start --fresh")
    facts = check_job_spec(run.info.spec)
    if isinstance(facts, str):
        return f"the job refused this spec: {facts}"
    if not facts.shardable:
        return (f"job {run.info.spec.get('job')!r} cannot be cut into shards (its partials "
                "merge in unit order only): run it with --engine local")
    run.set_shards(cut_shards(facts.units_total, SHARDS_PER_GPU * max(1, capacity)))
    return None


def _refuse(log: Any, message: str, code: ExitCode) -> ExitCode:
    log.error("ray.refused", reason=message)
    print(f"nkat-supervise: error: {message}", file=sys.stderr)
    return code
