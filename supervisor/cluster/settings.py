"""The Ray engine's config keys, the one lazy ``import ray``, and how Ray is joined.

    ray = import_ray()                     # RayMissing (exit 2) names the extra to install
    ray.init(**init_options(settings))     # --ray-address, else RAY_ADDRESS, else local
    resource, options = agent_resource(settings, backend)  # what an agent asks for

Importable without Ray: the config table and ``start --help`` read the keys from here.
The values were measured with Ray 2.60 on a 2-core machine (docs/architecture.md, "Many
machines: the Ray engine"); the comments say why each is set.
"""

from __future__ import annotations

import dataclasses
import os
from types import ModuleType
from typing import Any

from nkat.protocol.settings import Role, setting
from nkat.supervisor.cluster import ENGINES

INSTALL_HINT = "pip install 'nkat-supervise[ray]'"

#: GCS health checks of nodes, for a Ray instance this tool starts itself (a cluster that
#: `ray start --head` made keeps its own: README says which environment variables set
#: them there). A node whose raylet dies is seen at once either way; a hung or cut-off
#: node only when its checks time out: about 64 s with Ray's defaults, 10 s "moderate",
#: 2.5 s "tuned" (measured). Too tight, and a merely slow node is declared dead.
HEALTH: dict[str, dict[str, int]] = {
    "default": {},
    "moderate": {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                 "health_check_failure_threshold": 5},
    "tuned": {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 500,
              "health_check_timeout_ms": 500, "health_check_failure_threshold": 3},
}


@dataclasses.dataclass(frozen=True)
class RaySettings:
    """Which engine runs the shards, and how the Ray engine joins and uses a cluster."""

    engine: str = setting("local", "local: this machine's GPUs (--gpus); ray: the shards run "
                                   "on a Ray cluster, one node agent per GPU", role=Role.SUPERVISOR,
                          choices=ENGINES)
    ray_address: str | None = setting(
        None, "the Ray cluster to join: auto, HOST:PORT or ray://HOST:PORT (null: "
              "RAY_ADDRESS, else a new local Ray instance)", role=Role.SUPERVISOR)
    ray_resource: str | None = setting(
        None, "a custom Ray resource each node agent takes one unit of (null: one GPU, or "
              "one CPU with the numpy backend)", role=Role.SUPERVISOR)
    ray_health: str = setting("moderate", "node health checks of a Ray instance this tool "
                                          "starts itself (a lost node is seen in about 64, "
                                          "10 or 2.5 s)", role=Role.SUPERVISOR,
                              choices=tuple(HEALTH))
    ray_lease: float = setting(15.0, "seconds a node waits for the driver to make a record "
                                     "durable before it stops its worker (a node cut off "
                                     "from the driver must not compute on)",
                               role=Role.SUPERVISOR, low=1, high=3600)

    def __post_init__(self) -> None:
        if self.ray_resource is not None and not self.ray_resource.strip():
            raise ValueError("ray_resource: a resource name, or null")
        if self.ray_resource in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ValueError(f"ray_resource: {self.ray_resource} is one of Ray's own "
                             "resources; leave it null to use GPUs (or CPUs with numpy)")

    @classmethod
    def from_config(cls, config: Any) -> RaySettings:
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls)})


class RayMissing(RuntimeError):
    """``--engine ray`` was asked for but Ray is not installed."""

    def __init__(self) -> None:
        super().__init__(f"--engine ray needs Ray, which is not installed: {INSTALL_HINT}")


def import_ray() -> ModuleType:
    """``import ray`` on demand (about a second and 50 MiB): the supervisor stays light
    without it; RayMissing names the extra."""
    try:
        import ray
    except ImportError as exc:
        raise RayMissing() from exc
    module: ModuleType = ray
    return module


def resolve_address(given: str | None) -> str:
    """What ``ray.init`` is given: ``ray_address``, else ``RAY_ADDRESS``, else ``local``.
    Never None: Ray would then join whatever cluster last wrote its
    ``ray_current_cluster`` file on this machine (any test cluster, even a dead one)."""
    return given or os.environ.get("RAY_ADDRESS") or "local"


def init_options(settings: RaySettings) -> dict[str, Any]:
    """``ray.init`` keywords: the address; workers' output stays on their nodes (the run's
    own logs carry what matters) and Ray leaves this process's logging alone. A local
    instance gets the health checks of ``ray_health`` and no dashboard."""
    address = resolve_address(settings.ray_address)
    options: dict[str, Any] = {"address": address, "log_to_driver": False,
                               "configure_logging": False}
    if address == "local":
        options["include_dashboard"] = False
        if HEALTH[settings.ray_health]:
            options["_system_config"] = HEALTH[settings.ray_health]
    return options


def agent_capacity(available: dict[str, float], resource: str,
                   options: dict[str, Any]) -> int:
    """How many node agents ``available`` (``ray.cluster_resources()``) has room for."""
    room = int(available.get(resource, 0))
    if options.get("num_gpus") and resource != "GPU":
        room = min(room, int(available.get("GPU", 0)))
    return room


def agent_resource(settings: RaySettings, backend: str) -> tuple[str, dict[str, Any]]:
    """The resource one node agent takes (its name, to count the cluster's capacity) and
    the actor options that ask for it. The worker computes on what Ray gave the agent:
    ``num_gpus=1`` sets CUDA_VISIBLE_DEVICES for it, so a custom resource with the cupy
    backend takes a GPU too (with ``auto`` it takes none: the node decides)."""
    if settings.ray_resource:
        gpu = {"num_gpus": 1} if backend == "cupy" else {}
        return settings.ray_resource, {"resources": {settings.ray_resource: 1}, "num_cpus": 0,
                                       **gpu}
    if backend == "numpy":
        return "CPU", {"num_cpus": 1}
    return "GPU", {"num_gpus": 1, "num_cpus": 0}
