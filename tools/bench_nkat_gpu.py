"""The host side of the NKAT CuPy path, measured without a GPU (``bench.py nkat``).

``python -m nkat.worker --standalone --backend cupy`` runs against ``tools/null_cupy.py``,
copied as ``cupy`` onto the worker's ``PYTHONPATH``: the worker's own CuPy backend, its
runner and the job's CUDA path, unchanged, with kernels that return at once and buffers
that are NumPy arrays of the real shapes and dtypes. What is left is everything the host
does per batch: probes, launches, the copy, the wait, decoding the record into exact
sums, the merge, and the runner's own work.

    figures = host_cap()   # {"gpu_host_cap_dims_per_s": ..., ...}

Batches are sized as the runner's adaptive policy sizes them on a GPU: in a run whose
stand-in device takes (units x unit_dims) / MODEL_DEVICE_DIMS_PER_S per batch, the size
the runner settles on is read from its ``batch.resized`` log lines; the median of a few
such runs (``gpu_host_batch_units_seen`` lists them: the policy's choice moves with the
host's noise). The figure is the dims of such a batch over the host seconds per batch of
another run at that fixed size, its kernels taking no time: the wall time of the
worker's whole run loop (from ``performance.epoch_throughput``) over its batches.
``gpu_host_cap_dims_per_s_2e20_units``: the same at 2^20 units a batch, the size an
in-process simulation of the policy chose before (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchlib import p50, set_args  # run as a script: tools/ is on the path

from nkat.worker.jobs.nkat_highdim import NkatHighDim

#: A guess at an H200's float64 rate for this kernel (a log, two divisions and a few
#: multiply-adds per N): only the batch size depends on it.
MODEL_DEVICE_DIMS_PER_S = 5e11
UNIT_DIMS = 1 << 16
#: Units of the sizing run: room for the doublings from the default batch to 2^22 units
#: and a few batches at the size settled on (about a second of modelled device time).
SIZING_UNITS = 1 << 23
NULL_CUPY = Path(__file__).with_name("null_cupy.py")


def _worker(folder: Path, params: dict[str, Any], device_dims_per_s: float
            ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A standalone CuPy run on the stand-in device: (result, its JSON log lines)."""
    env = dict(os.environ, NULL_CUPY_DEVICE_DIMS_PER_S=repr(device_dims_per_s),
               PYTHONPATH=os.pathsep.join(p for p in (str(folder),
                                                      os.environ.get("PYTHONPATH")) if p))
    env.pop("NKAT_FAILPOINTS", None)
    out = folder / "result.json"
    proc = subprocess.run([sys.executable, "-m", "nkat.worker", "--standalone", "--backend",
                           "cupy", *set_args(params), "--out", str(out)],
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the worker on the stand-in device failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    logs = []
    for line in proc.stderr.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            logs.append(event)
    result: dict[str, Any] = json.loads(out.read_text())
    if result.get("provenance", {}).get("backend") != "cupy":
        raise RuntimeError(f"the run did not use the stand-in CuPy: {result.get('provenance')}")
    return result, logs


def _settled_size(folder: Path) -> int:
    """The batch size the runner's adaptive policy settles on for the modelled device:
    the last ``batch.resized`` of a run on it (the default batch when it never resized)."""
    _, logs = _worker(folder, {"max_dimension": SIZING_UNITS * UNIT_DIMS,
                               "unit_dims": UNIT_DIMS}, MODEL_DEVICE_DIMS_PER_S)
    resized = [int(e["to"]) for e in logs if e.get("event") == "batch.resized"]
    return resized[-1] if resized else NkatHighDim.default_batch_units


def _host_seconds(folder: Path, size: int, batches: int) -> float:
    """Host seconds per batch of the worker's run loop at a fixed ``size``, kernels free."""
    result, _ = _worker(folder, {"max_dimension": size * batches * UNIT_DIMS,
                                 "unit_dims": UNIT_DIMS, "batch_size": size,
                                 "batch_size_adaptive": False}, 0.0)
    loop_seconds = result["summary"]["total_dimensions"] / result["performance"][
        "epoch_throughput"]
    return float(loop_seconds) / batches


def host_cap(quick: bool = False) -> dict[str, Any]:
    batches = 50 if quick else 300
    with tempfile.TemporaryDirectory(prefix="nkat-null-cupy-") as tmp:
        folder = Path(tmp)
        shutil.copyfile(NULL_CUPY, folder / "cupy.py")
        # The policy's choice moves with this shared host's noise: the median of a few.
        seen = [_settled_size(folder) for _ in range(3 if quick else 5)]
        size = int(p50(seen))
        host = _host_seconds(folder, size, batches)
        host_2e20 = _host_seconds(folder, 1 << 20, batches)
    return {
        "gpu_host_cap_dims_per_s": round(size * UNIT_DIMS / host),
        "gpu_host_batch_units": size,
        "gpu_host_batch_units_seen": seen,
        "gpu_host_batch_seconds": round(host, 6),
        "gpu_host_cap_dims_per_s_2e20_units": round((1 << 20) * UNIT_DIMS / host_2e20),
        "gpu_host_model_device_dims_per_s": MODEL_DEVICE_DIMS_PER_S,
    }
