"""Scale-out: one run on two (simulated) GPUs of this machine, and on Ray, against one GPU.
``python tools/bench.py scale [--json] [--quick]``.

Figures (one run each, NumPy workers standing in for GPUs, on this 2-core machine):
  local_2shards_vs_1        throughput of `start --gpus 2` (two workers, one per core)
                            over `start` (one worker); the runs go one, two, ray, ray,
                            two, one, so each ratio is taken symmetrically in time
  ray_vs_local              `start --engine ray` on a local Ray instance (one node agent
                            per CPU, so two) over `start --gpus 2`: the same job and cores
  ray_node_loss_recovery_s  a 3-node local Ray cluster (ray.cluster_utils, health checks
                            "tuned": period 500 ms, timeout 500 ms, 3 failures): a busy
                            node's raylet is SIGKILLed; seconds from then to the moved
                            shard's first durable checkpoint on another node (one of the
                            attempt that replaced the lost one: a checkpoint every 0.5 s)
  ray_node_loss_detection_s the same fault to the driver's node.retired line
  shards_identical          1 when the deterministic blocks of every run above (one GPU,
                            two simulated GPUs, Ray) are byte-identical, and the node-loss
                            run's (a smaller job) equal those of an uninterrupted
                            `python -m nkat.worker --standalone` run of its job

Every worker computes on one thread (``cpu_threads=1``): one shard per core. Throughput
is the run's units over the time from its first worker's start (local:
worker.spawned; Ray: shard.assigned) to run.completed, so Ray's own start-up (a local
instance takes seconds) is not counted against it; its `ray_startup_s` is given apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import (  # run as a script: tools/ is on the path
    deterministic,
    events_of,
    standalone,
    ts_wall,
)

from nkat.supervisor.testing.ray_cluster import LocalRayCluster
from nkat.supervisor.wal import RecordType
from nkat.supervisor.wal.readonly import read_records

#: Two calm simulated GPUs (the shipped two_gpus profile has a hot one, which would stop).
TWO_CALM_GPUS = """
description = "two calm simulated GPUs, for the scale benchmark"
time_scale = 1.0
""" + "".join(f"""
[[device]]
name = "Simulated GPU {n} (calm)"
uuid = "GPU-5e1a0000-0000-4000-8000-00000000b0{n}"
memory_total_mib = 24576
memory_reserved_mib = 400
pids = []
[device.thresholds]
shutdown = 96
slowdown = 93
gpu_max = 90
enforced_power_limit_w = 450
[device.trace]
temperature = [[0, 60]]
thermal_margin = [[0, 30]]
power_w = [[0, 280]]
utilization_pct = [[0, 97]]
memory_used_pct = [[0, 40]]
clock_event_reasons = [[0, []]]
ecc_uncorrected_volatile = [[0, 0]]
""" for n in (0, 1))


def run(args: argparse.Namespace) -> dict[str, Any]:
    # Long enough that start-up and the last shard's tail weigh little (as in a real run).
    dims = 4 * 10**8 if args.quick else 40 * 10**8
    # One thread a worker: one shard per core (a lone worker would use both otherwise).
    job = {"max_dimension": dims, "unit_dims": 1 << 20, "cpu_threads": 1}
    with tempfile.TemporaryDirectory(prefix="nkscale-") as tmp:
        root = Path(tmp)
        profile = root / "two_calm.toml"
        profile.write_text(TWO_CALM_GPUS)
        rates: dict[str, list[float]] = {"one": [], "two": [], "ray": []}
        results: dict[str, str] = {}
        ray_walls = []
        # A B R R B A: each comparison is symmetric in time (this machine's speed drifts).
        for n, kind in enumerate(("one", "two", "ray", "ray", "two", "one")):
            if kind == "ray":
                extra, first = ["--engine", "ray"], "shard.assigned"
            else:
                extra = ["--sim-gpu", str(profile)] + (["--gpus", "2"] if kind == "two" else [])
                first = "worker.spawned"
            started = time.perf_counter()
            rate, result = timed_run(root / f"{kind}{n}", job, extra, first)
            if kind == "ray":
                ray_walls.append(time.perf_counter() - started)
            rates[kind].append(rate)
            results[f"{kind}{n}"] = deterministic(result)
        loss_job = {**job, "max_dimension": min(dims, 16 * 10**8)}
        loss = node_loss(root / "loss", loss_job)
        lost_node_identical = loss.pop("result") == deterministic(
            standalone(loss_job, backend="numpy")[0])
        one, two, ray = (sum(v) / len(v) for v in (rates["one"], rates["two"], rates["ray"]))
        return {
            "local_1shard_units_per_s": round(one, 2),
            "local_2shards_units_per_s": round(two, 2),
            "local_2shards_vs_1": round(two / one, 3),
            "ray_units_per_s": round(ray, 2),
            "ray_vs_local": round(ray / two, 3),
            "ray_run_wall_s": round(max(ray_walls), 2),
            **loss,
            "shards_identical": int(len(set(results.values())) == 1 and lost_node_identical),
            "max_dimension": dims,
        }


def timed_run(state: Path, job: dict[str, Any], extra: list[str],
              first_event: str) -> tuple[float, dict[str, Any]]:
    """One run to its end; (units per second from ``first_event`` to run.completed,
    its result)."""
    argv = [sys.executable, "-m", "nkat.supervisor", "start", "--state-dir", str(state),
            "--run-id", "s", "--quiet", "--backend", "numpy", *extra]
    for key, value in job.items():
        argv += ["--set", f"{key}={value}"]
    done = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(extra)}: exit {done.returncode}: {done.stderr[-2000:]}")
    run_dir = state / "runs" / "s"
    events = list(events_of(run_dir / "logs" / "supervisor.jsonl"))
    begin = min(ts_wall(e["ts"]) for e in events if e.get("event") == first_event)
    end = max(ts_wall(e["ts"]) for e in events if e.get("event") == "run.completed")
    result = json.loads((run_dir / "results" / "result.json").read_text())
    units = -(-int(job["max_dimension"]) // int(job["unit_dims"]))
    return units / (end - begin), result


def node_loss(state: Path, job: dict[str, Any]) -> dict[str, Any]:
    """A busy node of a 3-node cluster is lost mid-run; how soon its shard moves on."""
    units = -(-int(job["max_dimension"]) // int(job["unit_dims"]))
    # Slow units, so the fault lands while every node computes (the nodes' workers take
    # the raylets' environment, which is this process's).
    os.environ["NKAT_FAILPOINTS"] = ";".join(f"stall@unit={k}:seconds=0.03"
                                             for k in range(units))
    cluster = LocalRayCluster.start(nodes=3, resource="nkat")
    os.environ.pop("NKAT_FAILPOINTS")
    proc = None
    try:
        argv = [sys.executable, "-m", "nkat.supervisor", "start", "--state-dir", str(state),
                "--run-id", "s", "--quiet", "--backend", "numpy", "--engine", "ray",
                "--ray-address", cluster.address, "--set", "ray_resource=nkat",
                "--set", "checkpoint_interval=0.5"]
        for key, value in job.items():
            argv += ["--set", f"{key}={value}"]
        proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        run_dir = state / "runs" / "s"
        busy = _wait(lambda: _busy(run_dir), 180, "shards running on three nodes")
        node = sorted(busy)[0]
        fault = time.time()
        cluster.remove(cluster.node_with(node))
        _, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"the node-loss run exited {proc.returncode}: {err[-2000:]}")
        events = list(events_of(run_dir / "logs" / "supervisor.jsonl"))
        lost = min((e for e in events if e.get("event") == "node.retired"),
                   key=lambda e: e["ts"])
        retired, shard = ts_wall(lost["ts"]), lost["shard"]
        records = list(read_records(run_dir / "wal"))
        # The shard's next attempt (its epochs lie above the block the attempt began)...
        again = min((r.payload for r in records if r.type is RecordType.EVENT
                     and r.payload.get("kind") == "assigned"
                     and r.payload.get("shard") == shard and r.payload["t_wall"] > fault),
                    key=lambda p: p["t_wall"])
        # ... and its first durable checkpoint: progress elsewhere, not a late one of the
        # lost node's attempt.
        first = min(r.payload["t_wall"] for r in records
                    if r.type in (RecordType.CKPT, RecordType.CKPT_REF)
                    and r.payload.get("shard") == shard
                    and r.payload["epoch"] > again["epoch_base"])
        result = json.loads((run_dir / "results" / "result.json").read_text())
        return {"ray_node_loss_recovery_s": round(first - fault, 2),
                "ray_node_loss_detection_s": round(retired - fault, 2),
                "ray_node_loss_health": "tuned (500 ms period, 500 ms timeout, 3 failures)",
                "result": deterministic(result)}
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        cluster.stop()


def _busy(run_dir: Path) -> dict[str, int] | None:
    """node -> the shard it computes, once all three have one and something is durable."""
    try:
        status = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None
    rows = {r["node"]: r["shard"] for r in status.get("gpus") or ()
            if r.get("node") and r.get("shard") is not None}
    return rows if len(rows) == 3 and status.get("durable_units") else None


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"waited {timeout:g} s for {what}")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NKAT_FAILPOINTS", None)
    return env
