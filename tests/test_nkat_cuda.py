"""The CUDA kernel without a GPU: its source compiled by g++ behind a thread-per-CUDA-thread
shim, driven through a stand-in for the few CuPy calls the job makes, and compared with the
NumPy backend. Skipped where no C++20 compiler is found; ``nvcc`` checks it when present."""

import ctypes
import hashlib
import shutil
import subprocess
import types

import numpy as np
import pytest

from nkat.worker.job import RunContext
from nkat.worker.jobs import nkat_cuda
from nkat.worker.jobs.nkat_highdim import NkatHighDim

# CUDA's built-ins for a CPU: __shared__ becomes static (blocks run one after another, so
# a function's statics are that block's shared memory), __syncthreads a std::barrier.
SHIM = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <thread>
#include <vector>
using std::exp; using std::fabs; using std::log; using std::max; using std::min;
struct Dim { unsigned x; };
thread_local Dim threadIdx, blockIdx;
static Dim blockDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
static std::barrier<>* block_barrier;
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
template <typename F> void launch(unsigned grid, unsigned block, F body) {
    blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b) {
        std::barrier<> barrier(block);
        block_barrier = &barrier;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block; ++t)
            threads.emplace_back([=] { threadIdx.x = t; blockIdx.x = b; body(); });
        for (auto& th : threads) th.join();
    }
}
"""

KERNELS = {
    "nkat_segments": "long long first_n, long long unit_dims, long long last_n, "
                     "long long half_n, long long exp_from, int segs, int centered, "
                     "double* centers, double* out",
    "nkat_units": "int units, int segs, double* seg_out, double* out, long long first_n, "
                  "long long unit_dims, long long last_n, long long half_n, "
                  "int centers_out, double* centers",
    "nkat_probes": "long long* ns, int count, long long exp_from, double* out",
}

CXX = shutil.which("g++")


class DeviceArray:
    def __init__(self, host: np.ndarray) -> None:
        self.host = host

    def __getitem__(self, key):
        return DeviceArray(self.host[key])

    def get(self) -> np.ndarray:
        return self.host.copy()


class RawModule:
    def __init__(self, code: str, options: tuple, build_dir) -> None:
        launchers = []
        for name, signature in KERNELS.items():
            names = ", ".join(p.split()[-1].lstrip("*") for p in signature.split(", "))
            launchers.append(f'extern "C" void launch_{name}(unsigned g, unsigned b, '
                             f"{signature}) {{ launch(g, b, [=] {{ {name}({names}); }}); }}")
        source = "\n".join([SHIM, code, *launchers])
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        cpp, lib = build_dir / f"{digest}.cpp", build_dir / f"{digest}.so"
        if not lib.exists():
            cpp.write_text(source)
            subprocess.run([CXX, "-std=c++20", "-O1", "-shared", "-fPIC", str(cpp), "-o",
                            str(lib), "-lpthread"], check=True, capture_output=True)
        self.lib = ctypes.CDLL(str(lib))

    def get_function(self, name: str):
        launcher = getattr(self.lib, f"launch_{name}")

        def call(grid, block, args):
            converted = [ctypes.c_uint(grid[0]), ctypes.c_uint(block[0])]
            for a in args:
                if isinstance(a, DeviceArray):
                    converted.append(ctypes.c_void_p(a.host.ctypes.data))
                elif isinstance(a, np.int64):
                    converted.append(ctypes.c_longlong(int(a)))
                else:
                    assert isinstance(a, np.int32), type(a)
                    converted.append(ctypes.c_int(int(a)))
            launcher(*converted)

        return call


@pytest.fixture(scope="module")
def fake_cupy(tmp_path_factory):
    if CXX is None:
        pytest.skip("no g++")
    build_dir = tmp_path_factory.mktemp("cuda-shim")
    probe = build_dir / "probe.cpp"
    probe.write_text("#include <barrier>\nint main() { std::barrier<> b(1); }\n")
    if subprocess.run([CXX, "-std=c++20", str(probe), "-o", str(build_dir / "probe")],
                      capture_output=True).returncode:
        pytest.skip("g++ lacks C++20 <barrier>")
    xp = types.ModuleType("cupy")
    xp.float64 = np.float64
    # NaN-filled, as fresh device memory holds garbage: a field the kernels forget shows.
    xp.empty = lambda n, dtype: DeviceArray(np.full(n, np.nan, dtype=dtype))
    xp.zeros = lambda n, dtype: DeviceArray(np.zeros(n, dtype=dtype))
    xp.asarray = lambda a: DeviceArray(np.array(a))
    xp.RawModule = lambda code, options: RawModule(code, options, build_dir)
    return xp


CONTEXT = RunContext("cupy", "emulated", 1, 0, 1.0, 0, "x")


def drive(params: dict, xp, schedule: list[int]) -> dict:
    job = NkatHighDim(params)
    done, i, total = 0, 0, job.units_total()
    while done < total:
        count = min(schedule[i % len(schedule)], total - done)
        for part in job.compute(xp, done, count):
            job.merge(part)
        done, i = done + count, i + 1
    return job.deterministic_result(job.finalize(CONTEXT))


def assert_close(a, b, rel, path="result"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_close(a[k], b[k], rel, f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, rel, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=rel, abs=1e-15), path
    else:
        assert a == b, path


@pytest.mark.parametrize(("mode", "lo", "hi", "unit", "rel"), [
    ("balanced", 1, 9000, 8192, 1e-12),    # two segments a unit, the half inside unit 0
    ("precision", 17, 777, 100, 1e-12),    # one short segment a unit, the centred pass
    ("speed", 20_000, 21_200, 500, 1e-5),  # float32, across the exp cut-off
])
def test_cuda_kernel_matches_numpy_and_ignores_batches(fake_cupy, mode, lo, hi, unit, rel):
    params = {"min_dimension": lo, "max_dimension": hi, "unit_dims": unit,
              "precision_mode": mode, "curve_points": 9, "mpmath_samples": 4}
    gpu = drive(params, fake_cupy, [3])
    assert drive(params, fake_cupy, [1, 2]) == gpu
    assert_close(gpu, drive(params, np, [4]), rel)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cuda_source_compiles_with_nvcc(tmp_path, dtype):
    src = tmp_path / "nkat.cu"
    src.write_text(nkat_cuda.source(dtype))
    subprocess.run(["nvcc", "--std=c++14", "-c", str(src), "-o", str(tmp_path / "nkat.o")],
                   check=True, capture_output=True)


def test_cuda_ties_go_to_the_first_dimension(fake_cupy):
    # In float32 S(N) near 10^7 repeats over runs of ~20 N: the peak is the first N of
    # the top run, whichever thread, block or segment holds its other members.
    lo, hi = 10**7, 10**7 + 5000
    params = {"min_dimension": lo, "max_dimension": hi, "unit_dims": 3000,
              "precision_mode": "speed"}
    result = drive(params, fake_cupy, [2])
    kernel = nkat_cuda.CudaKernel(fake_cupy, "float32", precision=False)
    ns = np.arange(lo, hi + 1, dtype=np.int64)
    values = fake_cupy.empty(ns.size, np.float64)
    kernel._probes(((ns.size + 127) // 128,), (128,),
                   (fake_cupy.asarray(ns), np.int32(ns.size), np.int64(kernel.exp_from), values))
    s = values.get()
    assert np.count_nonzero(s == s.max()) > 1
    assert result["theoretical_validation"]["convergence_pattern"]["peak_dimension"] == \
        lo + int(np.argmax(s))
    assert result["statistics"]["minimum"]["dimension"] == lo + int(np.argmin(s))
