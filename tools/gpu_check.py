"""The checks of ``tools/gpu_check.sh`` on a machine with an NVIDIA GPU: one JSON document.

    python tools/gpu_check.py [--budget-s 420] [--out FILE]

1. NVML through the project's own sensor (``NvmlSensor``): name, temperature, every
   threshold the sensor uses (shutdown, slowdown, gpu_max, mem_max, the enforced power
   limit), power.
2. The CuPy backend alone (``python -m nkat.worker --standalone --backend cupy``) over
   10^10 and 10^11 dimensions: wall time, dims/s.
3. The NumPy backend on every core over 10^10 (and 10^11 when the time left allows it):
   each deterministic figure within TOLERANCE (relative) of the CuPy one, counts and
   dimensions equal.
4. One supervised CuPy run (``nkat.supervisor start``) whose worker is SIGKILLed twice,
   each time after a durable checkpoint: its deterministic blocks byte-identical to an
   uninterrupted CuPy run of the same spec.

Prints one JSON document (``ok``, the figures, ``mismatches``); exits 0 when everything
matched, 1 on any mismatch, 2 when a check could not run (no GPU, no CuPy, a run failed).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import (  # run as a script: tools/ is on the path
    LogTail,
    SupervisedRun,
    deterministic,
    standalone,
)

#: CuPy against NumPy: different log/exp implementations differ by an ulp or two per N,
#: and the per-unit trees differ; after exact accumulation that leaves ~1e-15 relative.
TOLERANCE = 1e-12
#: Values below this (a slope of 1e-20 per dimension, say) are compared absolutely.
ABS_FLOOR = 1e-30
DIMS = (10**10, 10**11)
MISMATCH_EXIT, CANNOT_RUN_EXIT = 1, 2


class CannotRun(RuntimeError):
    """A check could not run at all (as opposed to running and disagreeing)."""


def nvml_figures() -> dict[str, Any]:
    from nkat.supervisor.gpu.nvml import NvmlSensor
    from nkat.supervisor.gpu.sensor import GpuUnavailable

    sensor = NvmlSensor(xid_events=False)
    try:
        sensor.open()
    except GpuUnavailable as exc:
        raise CannotRun(f"NVML: {exc}") from exc
    try:
        devices = sensor.devices()
        out = []
        for device in devices:
            thresholds = sensor.thresholds(device.index)
            reading = sensor.read(device.index, time.monotonic())
            out.append({
                "index": device.index, "name": device.name, "uuid": device.uuid,
                "temperature_c": reading.temperature,
                "thermal_margin_c": reading.thermal_margin,
                "power_w": reading.power_w,
                "utilization_pct": reading.utilization_pct,
                "memory_used": reading.memory_used, "memory_total": reading.memory_total,
                "thresholds_c": {"shutdown": thresholds.shutdown,
                                 "slowdown": thresholds.slowdown,
                                 "gpu_max": thresholds.gpu_max,
                                 "mem_max": thresholds.mem_max},
                "enforced_power_limit_w": thresholds.enforced_power_limit_w,
                "unsupported": sorted(reading.unsupported),
            })
        return {"devices": out, "notes": sensor.take_notes()}
    finally:
        sensor.close()


def compare(gpu: Any, cpu: Any, path: str = "") -> list[str]:
    """Where two results' deterministic blocks differ beyond TOLERANCE."""
    if isinstance(gpu, dict) and isinstance(cpu, dict):
        if gpu.keys() != cpu.keys():
            return [f"{path}: keys {sorted(gpu)} != {sorted(cpu)}"]
        return [m for k in gpu for m in compare(gpu[k], cpu[k], f"{path}.{k}")]
    if isinstance(gpu, list) and isinstance(cpu, list):
        if len(gpu) != len(cpu):
            return [f"{path}: {len(gpu)} items != {len(cpu)}"]
        return [m for i, (a, b) in enumerate(zip(gpu, cpu, strict=True))
                for m in compare(a, b, f"{path}[{i}]")]
    if isinstance(gpu, float) and isinstance(cpu, float):
        if abs(gpu - cpu) <= max(TOLERANCE * max(abs(gpu), abs(cpu)), ABS_FLOOR):
            return []
        return [f"{path}: cupy {gpu!r} numpy {cpu!r}"]
    return [] if gpu == cpu else [f"{path}: cupy {gpu!r} numpy {cpu!r}"]


def max_rel_diff(gpu: Any, cpu: Any) -> float:
    if isinstance(gpu, dict):
        return max((max_rel_diff(gpu[k], cpu.get(k)) for k in gpu), default=0.0)
    if isinstance(gpu, list) and isinstance(cpu, list):
        return max((max_rel_diff(a, b) for a, b in zip(gpu, cpu, strict=False)), default=0.0)
    if isinstance(gpu, float) and isinstance(cpu, float) and max(abs(gpu), abs(cpu)) > 0:
        return abs(gpu - cpu) / max(abs(gpu), abs(cpu))
    return 0.0


def _deterministic(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("performance", "provenance")}


def _run(params: dict[str, Any], backend: str) -> tuple[dict[str, Any], float]:
    try:
        return standalone(params, backend=backend)
    except RuntimeError as exc:
        raise CannotRun(f"{backend} run of {params}: {exc}") from exc


def _durable_in(epoch: int, event: dict[str, Any]) -> bool:
    return event.get("event") == "checkpoint.durable" and event.get("epoch") == epoch


def supervised_kills(params: dict[str, Any], reference: dict[str, Any], budget_s: float,
                     kills: int = 2) -> dict[str, Any]:
    """A supervised CuPy run whose worker is SIGKILLed ``kills`` times, each after a
    checkpoint became durable; its deterministic blocks against ``reference``'s."""
    with tempfile.TemporaryDirectory(prefix="nkat-gpu-check-") as tmp:
        run = SupervisedRun(Path(tmp), "gpu-check",
                            {**params, "checkpoint_interval": 2.0, "restart_delay": 0.2,
                             "log_max_bytes": 1 << 30},
                            backend="cupy")
        deadline = time.monotonic() + budget_s
        done_kills = 0
        try:
            run.start()
            log = LogTail(run.log_file)
            while done_kills < kills:
                left = deadline - time.monotonic()
                epoch = done_kills + 1
                event = log.follow(functools.partial(_durable_in, epoch), left,
                                   alive_check=run.running)
                if event is None:
                    raise CannotRun(f"no durable checkpoint in epoch {done_kills + 1} "
                                    f"({run.stderr_tail(500)})")
                worker = run.worker()
                if worker is None:
                    break  # finished before the kill: the comparison still holds
                worker.send_signal(signal.SIGKILL)
                done_kills += 1
            code = run.wait(max(1.0, deadline - time.monotonic()))
            if code != 0:
                raise CannotRun(f"supervised run ended with {code}: {run.stderr_tail(1000)}")
            result = run.result()
            if result is None:
                raise CannotRun("supervised run left no result")
        finally:
            run.cleanup()
    identical = deterministic(result) == deterministic(reference)
    return {"params": params, "kills": done_kills, "identical": identical,
            "epochs": result.get("provenance", {}).get("epochs"),
            "backend": result.get("provenance", {}).get("backend")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="wall seconds the checks may take (default 420)")
    parser.add_argument("--out", type=Path, help="also write the JSON document here")
    args = parser.parse_args(argv)
    started = time.monotonic()
    doc: dict[str, Any] = {"ok": False, "tolerance": TOLERANCE, "mismatches": []}
    code = CANNOT_RUN_EXIT
    try:
        code = _checks(doc, started + args.budget_s)
    except CannotRun as exc:
        doc["error"] = str(exc)
    doc["seconds"] = round(time.monotonic() - started, 1)
    text = json.dumps(doc, indent=2, sort_keys=True)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return code


def _checks(doc: dict[str, Any], deadline: float) -> int:
    doc["nvml"] = nvml_figures()
    try:
        import cupy

        doc["cupy"] = {"version": cupy.__version__,
                       "device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()}
    except Exception as exc:  # a broken CUDA install fails in many ways
        raise CannotRun(f"CuPy does not work here: {type(exc).__name__}: {exc}") from exc
    runs: dict[str, Any] = {}
    for dims in DIMS:
        result, wall = _run({"max_dimension": dims}, "cupy")
        runs[f"{dims:.0e}"] = {"wall_s": round(wall, 2), "dims_per_s": round(dims / wall),
                               "compute_dims_per_s": result["performance"]["average_throughput"],
                               "result": result}
    doc["cupy_runs"] = {k: {kk: vv for kk, vv in v.items() if kk != "result"}
                        for k, v in runs.items()}
    top = runs[f"{DIMS[-1]:.0e}"]
    doc["nkat_gpu_dims_per_s"] = top["compute_dims_per_s"]
    comparisons, worst = {}, 0.0
    numpy_rate = None
    for dims in DIMS:
        gpu = runs[f"{dims:.0e}"]["result"]
        if numpy_rate is not None and dims / numpy_rate > 0.5 * (deadline - time.monotonic()):
            comparisons[f"{dims:.0e}"] = {
                "skipped": f"NumPy would take ~{dims / numpy_rate:.0f} s"}
            continue
        cpu, wall = _run({"max_dimension": dims}, "numpy")
        numpy_rate = dims / wall
        mismatches = compare(_deterministic(gpu), _deterministic(cpu))
        diff = max_rel_diff(_deterministic(gpu), _deterministic(cpu))
        worst = max(worst, diff)
        comparisons[f"{dims:.0e}"] = {"numpy_wall_s": round(wall, 1), "max_rel_diff": diff,
                                      "mismatches": mismatches[:20]}
        doc["mismatches"] += [f"{dims:.0e}{m}" for m in mismatches]
    doc["numpy_comparisons"] = comparisons
    doc["gpu_vs_numpy_max_rel_diff"] = worst
    # A run of about 40 s of compute on this GPU, checkpointing every 2 s, killed twice.
    rate = top["compute_dims_per_s"] or top["dims_per_s"]
    dims = int(min(10**15, max(10**11, 40 * rate)))
    dims = int(float(f"{dims:.2g}"))
    params = {"max_dimension": dims}
    reference, ref_wall = _run(params, "cupy")
    left = deadline - time.monotonic()
    if left < 2 * ref_wall + 30:
        raise CannotRun(f"too little time left ({left:.0f} s) for the supervised run")
    killed = supervised_kills(params, reference, left - 5)
    killed["uninterrupted_wall_s"] = round(ref_wall, 1)
    doc["supervised"] = killed
    if not killed["identical"]:
        doc["mismatches"].append("supervised run with worker kills differs from the "
                                 "uninterrupted GPU run")
    if killed["backend"] != "cupy":
        doc["mismatches"].append(f"supervised run computed on {killed['backend']!r}")
    doc["ok"] = not doc["mismatches"]
    return 0 if doc["ok"] else MISMATCH_EXIT


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
