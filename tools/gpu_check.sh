#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU (issue 11), from a bare copy of
# the repository: makes its own virtualenv, installs the project with its `gpu` extra,
# then runs tools/gpu_check.py (NVML through the project's sensor, the CuPy backend over
# 10^10 and 10^11 dimensions, the same against NumPy, a supervised GPU run whose worker
# is SIGKILLed twice against an uninterrupted one). Prints one JSON document on stdout;
# exits 0 when everything matched, 1 on a mismatch, 2 when a check could not run.
#
#   bash tools/gpu_check.sh                      # venv in .gpu-check/venv
#   GPU_CHECK_WHEELS=dir bash tools/gpu_check.sh # offline: install from wheels in dir
#
# GPU_CHECK_VENV  where the virtualenv goes (default: .gpu-check/venv in the repository)
# GPU_CHECK_WHEELS  a folder of wheels to install from, for a machine without a registry
# GPU_CHECK_BUDGET_S  seconds the checks may take after the install (default 420)
# The venv sees the system's site-packages, so a CuPy already installed for the machine's
# CUDA is used when the `gpu` extra cannot be installed (the JSON says which happened).
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${GPU_CHECK_VENV:-$repo/.gpu-check/venv}"
budget="${GPU_CHECK_BUDGET_S:-420}"
log="$(mktemp -t nkat-gpu-check.XXXXXX)"

fail() {  # fail STAGE MESSAGE: the one JSON document, for a check that cannot run
    python3 - "$1" "$2" "$log" <<'PY'
import json, sys
stage, message, log = sys.argv[1:]
try:
    tail = open(log, errors="replace").read()[-2000:]
except OSError:
    tail = ""
print(json.dumps({"ok": False, "stage": stage, "error": message, "log_tail": tail},
                 indent=2, sort_keys=True))
PY
    exit 2
}

if ! command -v nvidia-smi >/dev/null 2>&1; then
    fail gpu "no NVIDIA GPU here: nvidia-smi is not on PATH (run this on a GPU machine)"
fi
if ! nvidia-smi -L >>"$log" 2>&1; then
    fail gpu "nvidia-smi finds no usable GPU"
fi

if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv --system-site-packages "$venv" >>"$log" 2>&1 || fail venv "cannot create $venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"

pip_args=(--quiet --disable-pip-version-check)
if [[ -n "${GPU_CHECK_WHEELS:-}" ]]; then
    # Offline: the build backend (setuptools) comes from the system, not the registry.
    pip_args+=(--no-index --find-links "$GPU_CHECK_WHEELS" --no-build-isolation)
fi
extra="installed"
if ! python -m pip install "${pip_args[@]}" -e "${repo}[gpu]" >>"$log" 2>&1; then
    # No registry (or no wheel for this CUDA): the project alone, on a CuPy already here.
    python -m pip install "${pip_args[@]}" --no-build-isolation --no-deps -e "$repo" \
        >>"$log" 2>&1 \
        || fail install "cannot install the project (see log_tail)"
    extra="unavailable; using the CuPy already installed"
fi
if ! python -c "import cupy, nkat.worker, nkat.supervisor, zmq, structlog" >>"$log" 2>&1; then
    fail install "the gpu extra or the project's dependencies do not import (see log_tail)"
fi

out="$(mktemp -t nkat-gpu-check-json.XXXXXX)"
cd "$repo" || fail setup "cannot enter $repo"
PYTHONUNBUFFERED=1 timeout "$((budget + 30))" \
    python tools/gpu_check.py --budget-s "$budget" --out "$out" >>"$log" 2>&1
code=$?
if [[ ! -s "$out" ]]; then
    fail checks "tools/gpu_check.py ended with $code and no document"
fi
python - "$out" "$extra" "$(python -m pip show cupy-cuda12x cupy-cuda13x cupy 2>/dev/null \
    | awk '/^(Name|Version):/{printf "%s ", $2}')" <<'PY'
import json, sys
path, extra, cupy = sys.argv[1:]
doc = json.load(open(path))
doc["gpu_extra"] = extra
doc["cupy_package"] = cupy.strip()
print(json.dumps(doc, indent=2, sort_keys=True))
PY
exit "$code"
