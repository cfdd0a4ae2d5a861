"""``start --engine ray``: join the cluster, cut a new run into shards, and drive it.

    code = run_on_ray(run, config, wal, log, say=say, backend="numpy",
                      hand_over=close_wal_and_let_go)

Called by ``launch`` with the run locked, the WAL writer's lock taken and the WAL open and
recovered (so every damage check and message of a local start applies); ``hand_over``
closes the WAL and lets go of its lock, for the journal actor to take. A cluster with
none of the agents' resource is refused (exit 2) before anything is cut or written. A run
is cut into shards at its first start, ``SHARDS_PER_GPU`` per unit of the
agents' resource the cluster has then, and keeps that cut for life: a resume, on any
engine, computes the same shards.
"""

from __future__ import annotations

import sys
from typing import Any

from nkat.supervisor.cluster.settings import (
    RayMissing,
    RaySettings,
    agent_capacity,
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
               hand_over: Any, sim_gpu: str | None = None, on_status: Any = None,
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
        resource, agent_options = agent_resource(settings, backend)
        capacity = agent_capacity(ray.cluster_resources(), resource, agent_options)
        log.info("ray.connected", address=options["address"], resource=resource,
                 capacity=capacity, nodes=len(ray.nodes()))
        if capacity == 0:
            return _refuse(log, _no_capacity(resource, settings, backend), ExitCode.USAGE)
        say(f"on Ray at {options['address']}: {capacity} × {resource} for node agents")
        if not run.info.shards:
            why = _cut(run, wal, capacity)
            if why:
                return _refuse(log, why, ExitCode.USAGE)
        hand_over()  # the journal actor is the run's one writer from here on
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


def _no_capacity(resource: str, settings: RaySettings, backend: str) -> str:
    """Why nothing can run, and what to change."""
    start = f"the Ray cluster offers no {resource} for the node agents"
    if settings.ray_resource and backend == "cupy":
        return (f"the Ray cluster offers no {resource} with a GPU for the node agents (the "
                f"cupy backend needs both): start GPU nodes with --resources "
                f"'{{\"{resource}\": 1}}'")
    if settings.ray_resource:
        return (f"{start}: start the nodes with --resources '{{\"{resource}\": 1}}', or set "
                "ray_resource to one the cluster has")
    if resource == "GPU":
        return (f"{start}: the {backend} backend needs a GPU on each node agent; add GPU "
                "nodes, or use --backend numpy for CPU nodes")
    return f"{start}: add nodes with CPUs"


def _refuse(log: Any, message: str, code: ExitCode) -> ExitCode:
    log.error("ray.refused", reason=message)
    print(f"nkat-supervise: error: {message}", file=sys.stderr)
    return code
