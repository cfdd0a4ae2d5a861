"""The Ray engine's status: the journal's durable view and the nodes' latest reports, in
the shape ``status --json`` documents (README), with one row per node agent in ``gpus``.

    status = ray_status(run_id, spec, journal_snapshot, agents, state="running", ...)

Pure: the driver hands it what it holds. A shard's live progress comes from its node's
last report (at most a second or two old); what is durable comes from the journal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nkat.supervisor.cluster.journal import ShardTask
from nkat.supervisor.controller import dims_per_s_of


def ray_status(run_id: str, spec: Mapping[str, Any], snapshot: Mapping[str, Any],
               agents: Sequence[tuple[str, ShardTask | None, Mapping[str, Any] | None]], *,
               state: str, outcome: str | None, supervisor_pid: int,
               started_wall: float) -> dict[str, Any]:
    """``agents``: (agent id, the attempt it runs or None, where Ray placed it or None)."""
    shards = list(snapshot.get("shards", ()))
    reports: Mapping[int, Mapping[str, Any]] = snapshot.get("progress", {})
    sizes = [s["span"][1] - s["span"][0] for s in shards]
    units_total = sum(sizes)
    durable = [size if s["done"] else s["units_done"] for s, size in zip(shards, sizes,
                                                                          strict=True)]
    live = list(durable)
    for index, report in reports.items():
        share = report.get("progress")
        if not shards[index]["done"] and isinstance(share, int | float):
            live[index] = max(live[index], int(share * sizes[index]))
    rows = [_row(n, agent_id, task, where, reports, spec)
            for n, (agent_id, task, where) in enumerate(agents)]
    rates = [r["units_per_s"] for r in rows if isinstance(r["units_per_s"], int | float)]
    units_per_s = sum(rates) if rates else None
    units_done = units_total if outcome == "completed" else sum(live)
    walls = [s["t_wall"] for s in shards if s["t_wall"]]
    return {
        "run_id": run_id, "state": state, "outcome": outcome, "engine": "ray",
        "supervisor_pid": supervisor_pid, "supervisor_started_wall": started_wall,
        "epoch": snapshot.get("epoch"), "worker_pid": None,
        "restarts": snapshot.get("restarts", 0),
        "units_done": units_done, "units_total": units_total,
        "progress": units_done / units_total if units_total else None,
        "units_per_s": units_per_s, "dims_per_s": dims_per_s_of(spec, units_per_s),
        "durable_ckpt_seq": snapshot.get("durable_ckpt_seq", 0),
        "durable_units": sum(durable), "last_checkpoint_wall": max(walls) if walls else None,
        "ckpt_ack_ms_p50": None, "protocol_errors": None, "foreign_dropped": None,
        "gpu": None,
        "shards": {"total": len(shards), "done": sum(1 for s in shards if s["done"])},
        "nodes": len({str(w["node"]) for _, _, w in agents if w}),
        "gpus": rows,
    }


def _row(number: int, agent_id: str, task: ShardTask | None,
         where: Mapping[str, Any] | None, reports: Mapping[int, Mapping[str, Any]],
         spec: Mapping[str, Any]) -> dict[str, Any]:
    """One node agent's row: where it runs, its shard and how far, how fast, how hot."""
    report = reports.get(task.shard, {}) if task else {}
    ups = report.get("units_per_s")
    node = str(where["node"])[:8] if where else None
    host = where.get("host") if where else None
    return {
        "index": number, "worker": agent_id, "node": node, "host": host,
        "gpu": where.get("gpu") if where else None,
        "name": f"{host} ({node})" if where else "waiting for a node",
        "state": report.get("state") or ("starting" if task else
                                         "idle" if where else "placing"),
        "pid": report.get("worker_pid"),
        "shard": task.shard if task else None,
        "shard_range": list(task.span) if task else None,
        "progress": report.get("progress"),
        "units_per_s": ups, "dims_per_s": dims_per_s_of(spec, ups),
        "temperature": report.get("temperature"), "duty": report.get("duty"),
        "thermal_state": report.get("thermal_state"),
    }
