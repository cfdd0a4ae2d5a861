"""A multi-node Ray cluster on this machine, for tests and benchmarks of ``--engine ray``.

    cluster = LocalRayCluster.start(nodes=3, resource="nkat")   # head + 3 nodes
    run `nkat-supervise start --engine ray --ray-address {cluster.address}
         --set ray_resource=nkat ...`
    cluster.remove(cluster.node_with("a1b2c3d4"))                # a node is lost
    leftovers = cluster.stop()                                   # [] when nothing leaked

``ray.cluster_utils.Cluster`` runs each node as its own raylet (and agents) on this machine,
all children of the calling process. The head offers no ``resource``, so node agents never
land on it and the driver's journal (pinned to the head, the driver's node) is never lost
with a node. The head's health checks are "tuned": a lost node is declared dead in seconds.
Each node is light: one CPU, an 80 MiB object store (Ray's default takes 30% of the RAM per
node), no dashboard UI, and a short private temp dir (AF_UNIX paths stop at 107 bytes).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from typing import Any

import psutil

from nkat.supervisor.cluster.settings import HEALTH, import_ray

_NODE: dict[str, Any] = {"num_cpus": 1, "object_store_memory": 80 * 1024 * 1024,
                         "include_dashboard": False}


@dataclasses.dataclass
class LocalRayCluster:
    cluster: Any
    nodes: list[Any]
    resource: str
    temp_dir: str

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    @classmethod
    def start(cls, nodes: int = 3, resource: str = "nkat") -> LocalRayCluster:
        import_ray()
        from ray.cluster_utils import Cluster

        _make_rays_default_temp_dir()
        temp_dir = tempfile.mkdtemp(prefix="nkray-")
        head = {**_NODE, "temp_dir": temp_dir, "no_monitor": True,
                "include_log_monitor": False, "_system_config": HEALTH["tuned"]}
        try:
            cluster = Cluster(initialize_head=True, head_node_args=head)
        except BaseException:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        made = cls(cluster, [], resource, temp_dir)
        try:
            for _ in range(nodes):
                made.add_node()
        except BaseException:  # a half-made cluster is not left running
            made.stop()
            raise
        return made

    def add_node(self) -> Any:
        node = self.cluster.add_node(**_NODE, resources={self.resource: 1})
        self.nodes.append(node)
        return node

    def node_with(self, node_id_prefix: str) -> Any:
        """The node whose id starts with ``node_id_prefix`` (logs show 8 characters)."""
        return next(n for n in self.nodes if n.node_id.startswith(node_id_prefix))

    def processes_of(self, node: Any) -> list[psutil.Process]:
        """``node``'s processes (its raylet and all it started: actors, their workers)."""
        found = []
        for _, popen in node.live_processes():
            try:
                top = psutil.Process(popen.pid)
                found += [top, *top.children(recursive=True)]
            except psutil.Error:
                continue
        return found

    def remove(self, node: Any, graceful: bool = False) -> None:
        """Lose ``node``: its raylet is killed (SIGKILL unless ``graceful``)."""
        self.cluster.remove_node(node, allow_graceful=graceful)
        self.nodes.remove(node)

    def wait_for_nodes(self, timeout: float = 60.0) -> None:
        self.cluster.wait_for_nodes(timeout)

    def stop(self) -> list[str]:
        """Tear everything down; the processes of it still alive after 10 s (none)."""
        before = psutil.Process().children(recursive=True)
        self.cluster.shutdown()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        deadline = time.monotonic() + 10
        left = [p for p in before if _alive(p)]
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = [p for p in left if _alive(p)]
        return [f"{p.pid} {_name(p)}" for p in left if _alive(p)]


def _make_rays_default_temp_dir() -> None:
    """Ray's ``Cluster`` records the head's address in Ray's default temp dir even when the
    head is given its own, and fails (FileNotFoundError) on a machine where Ray never ran.
    """
    try:
        from ray._common.utils import get_default_ray_temp_dir
        default = get_default_ray_temp_dir()
    except ImportError:  # another Ray release keeps it elsewhere; its usual place
        default = os.path.join(os.environ.get("RAY_TMPDIR", tempfile.gettempdir()), "ray")
    os.makedirs(default, exist_ok=True)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return "?"
