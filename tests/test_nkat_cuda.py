"""The CUDA kernel without a GPU: its source compiled by g++ behind a thread-per-CUDA-thread
shim, driven through a stand-in for the few CuPy calls the job makes, and compared with the
NumPy backend; its exact fold is compared with the host's bit for bit. Skipped where no
C++20 compiler is found; ``nvcc`` compiles its device code when present (NVRTC:
test_nkat_nvrtc.py)."""

import ctypes
import hashlib
import shutil
import subprocess
import types

import numpy as np
import pytest
from hypothesis import strategies as st

from nkat.worker.job import RunContext
from nkat.worker.jobs import nkat_cuda
from nkat.worker.jobs.fixedpoint import LIMBS, from_limbs
from nkat.worker.jobs.nkat_highdim import NkatHighDim
from nkat.worker.jobs.nkat_sums import SHIFT_BITS, fold_q, fold_s

# CUDA's built-ins for a CPU: __shared__ becomes static (blocks run one after another, so
# a function's statics are that block's shared memory), __syncthreads a std::barrier. The
# threads and the barrier (RUNTIME, C++20) are compiled once per module, apart from the
# kernels: <thread> and <barrier> are most of g++'s time on a kernel module, which
# includes only SHIM and is compiled as C++14, the standard the job asks NVRTC for.
RUNTIME = r"""
#include <barrier>
#include <thread>
#include <vector>
static std::barrier<>* block_barrier;
__attribute__((visibility("hidden"))) void shim_syncthreads() {
    block_barrier->arrive_and_wait();
}
// A thread per CUDA thread, running blocks one after another: run(body, t, b) is thread t
// of block b, and no thread starts block b + 1 before every thread has finished block b.
__attribute__((visibility("hidden"))) void shim_launch(
        unsigned grid, unsigned block, void (*run)(void*, unsigned, unsigned), void* body) {
    std::barrier<> barrier(block);
    block_barrier = &barrier;
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t)
        threads.emplace_back([=, &barrier] {
            for (unsigned b = 0; b < grid; ++b) {
                run(body, t, b);
                barrier.arrive_and_wait();
            }
        });
    for (auto& th : threads) th.join();
}
"""

SHIM = r"""
#include <algorithm>
#include <cmath>
#include <cstring>
using std::exp; using std::fabs; using std::log; using std::max; using std::min;
using std::llrint; using std::llrintf;
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline long long __double_as_longlong(double x) { long long b; memcpy(&b, &x, 8); return b; }
inline double __longlong_as_double(long long b) { double x; memcpy(&x, &b, 8); return x; }
inline int __float_as_int(float x) { int b; memcpy(&b, &x, 4); return b; }
inline float __int_as_float(int b) { float x; memcpy(&x, &b, 4); return x; }
struct Dim { unsigned x; };
thread_local Dim threadIdx, blockIdx;
static Dim blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
__attribute__((visibility("hidden"))) void shim_syncthreads();
__attribute__((visibility("hidden"))) void shim_launch(
    unsigned grid, unsigned block, void (*run)(void*, unsigned, unsigned), void* body);
inline void __syncthreads() { shim_syncthreads(); }
template <typename F> void launch(unsigned grid, unsigned block, F body) {
    blockDim.x = block;
    gridDim.x = grid;
    shim_launch(grid, block, [](void* f, unsigned t, unsigned b) {
        threadIdx.x = t; blockIdx.x = b; (*static_cast<F*>(f))();
    }, &body);
}
"""

KERNELS = {
    "nkat_units": "long long first_n, long long unit_dims, long long last_n, "
                  "long long half_n, long long exp_from, long long count, "
                  "long long* block_limbs, long long* block_ext",
    "nkat_finish": "int blocks, long long* block_limbs, long long* block_ext, long long* record",
    "nkat_probes": "long long* ns, int count, long long exp_from, long long* out",
    "fold_check": "long long* ints, double* reals, long long* out",
}

# Not part of the module: the device fold on given inputs, to compare with the host's.
FOLD_CHECK = r"""
extern "C" __global__ void fold_check(const long long* ints, const double* reals,
                                      long long* out) {
    int flags = 0;
    fold_s(out, out + LIMBS, ints[0], ints[1], (real)reals[0], (real)reals[1], &flags);
    for (int which = 0; which < 3; ++which)
        fold_q(out + (2 + which) * LIMBS, which, ints[0], ints[2], ints[3], (int)ints[4],
               (real)reals[2], (real)reals[3], (real)reals[4], &flags);
    out[5 * LIMBS] = flags;
}
"""

CXX = shutil.which("g++")


class DeviceArray:
    def __init__(self, host: np.ndarray) -> None:
        self.host = host
        self.size = host.size

    def __getitem__(self, key):
        return DeviceArray(self.host[key])

    def get(self, stream=None, out=None, blocking=True) -> np.ndarray:
        if out is None:
            return self.host.copy()
        out[...] = self.host
        return out


class Stream:
    def __init__(self, non_blocking: bool = False) -> None:
        self.entered = 0

    def __enter__(self):
        self.entered += 1
        return self

    def __exit__(self, *exc) -> None:
        pass


class Event:
    """Work runs at once here, so every event has already happened."""

    def __init__(self) -> None:
        self.recorded = 0

    def record(self, stream) -> None:
        self.recorded += 1

    def synchronize(self) -> None:
        assert self.recorded, "waited for an event never recorded"


class RawModule:
    def __init__(self, code: str, options: tuple, build_dir) -> None:
        launchers = []
        for name, signature in KERNELS.items():
            names = ", ".join(p.split()[-1].lstrip("*") for p in signature.split(", "))
            launchers.append(f'extern "C" void launch_{name}(unsigned g, unsigned b, '
                             f"{signature}) {{ launch(g, b, [=] {{ {name}({names}); }}); }}")
        source = "\n".join([SHIM, code, FOLD_CHECK, *launchers])
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        cpp, lib = build_dir / f"{digest}.cpp", build_dir / f"{digest}.so"
        if not lib.exists():
            cpp.write_text(source)
            subprocess.run([CXX, "-std=c++14", "-O1", "-shared", "-fPIC", str(cpp),
                            str(build_dir / "runtime.o"), "-o", str(lib), "-lpthread"],
                           check=True, capture_output=True)
        self.lib = ctypes.CDLL(str(lib))

    def get_function(self, name: str):
        launcher = getattr(self.lib, f"launch_{name}")

        def call(grid, block, args):
            converted = [ctypes.c_uint(grid[0]), ctypes.c_uint(block[0])]
            for a in args:
                if isinstance(a, DeviceArray):
                    converted.append(ctypes.c_void_p(a.host.ctypes.data))
                elif isinstance(a, (np.int64, int)):
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
    # Preprocessing alone says whether the library has std::barrier (its feature-test
    # macro is defined where it is declared), at a tenth of the cost of compiling it.
    if subprocess.run([CXX, "-std=c++20", "-E", "-x", "c++", "-"], text=True,
                      input="#include <barrier>\n#ifndef __cpp_lib_barrier\n#error\n#endif\n",
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode:
        pytest.skip("g++ lacks C++20 <barrier>")
    build_dir = tmp_path_factory.mktemp("cuda-shim")
    # The threads' half of the shim, which every kernel module links.
    runtime = build_dir / "runtime.cpp"
    runtime.write_text(RUNTIME)
    subprocess.run([CXX, "-std=c++20", "-O1", "-fPIC", "-c", str(runtime), "-o",
                    str(build_dir / "runtime.o")], check=True, capture_output=True)
    return fake_module(build_dir)


def fake_module(build_dir):
    xp = types.ModuleType("cupy")
    xp.float64, xp.int64 = np.float64, np.int64
    # Garbage-filled, as fresh device memory is: a field the kernels forget shows.
    xp.empty = lambda n, dtype: DeviceArray(np.full(n, 0x7FF4DEADBEEF, dtype=dtype))
    xp.zeros = lambda n, dtype: DeviceArray(np.zeros(n, dtype=dtype))
    xp.asarray = lambda a: DeviceArray(np.array(a))
    xp.RawModule = lambda code, options: RawModule(code, options, build_dir)
    xp.cuda = types.SimpleNamespace(Stream=Stream, Event=Event,
                                    alloc_pinned_memory=lambda n: bytearray(n))
    return xp


CONTEXT = RunContext("cupy", "emulated", 1, 0, 1.0, 0, "x")


def drive(params: dict, xp, schedule: list[int]) -> dict:
    job = NkatHighDim(params)
    done, i, total = 0, 0, job.units_total()
    while done < total:
        count = min(schedule[i % len(schedule)], total - done)
        job.merge_batch(done, count, job.compute_batch(xp, done, count).wait())
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
@pytest.mark.parametrize(("dtype", "precision"), nkat_cuda.VARIANTS)
def test_cuda_source_compiles_with_nvcc(tmp_path, dtype, precision):
    # The device half of `nvcc -c` (cicc, then ptxas for nvcc's default arch), without
    # the host half, which a RawModule never has: -fatbin holds the same PTX and cubin
    # that `-c` embeds in its object, and an error in the kernel fails it the same way.
    src = tmp_path / "nkat.cu"
    src.write_text(nkat_cuda.source(dtype, precision))
    done = subprocess.run(["nvcc", "--std=c++14", "-fatbin", str(src), "-o",
                           str(tmp_path / "nkat.fatbin")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "nkat.fatbin").read_bytes()[:4] == b"\x50\xed\x55\xba"  # fatbin


def test_cuda_ties_go_to_the_first_dimension(fake_cupy):
    # In float32 S(N) near 10^7 repeats over runs of ~20 N: the peak is the first N of
    # the top run, whichever thread, block or unit holds its other members.
    lo, hi = 10**7, 10**7 + 5000
    params = {"min_dimension": lo, "max_dimension": hi, "unit_dims": 3000,
              "precision_mode": "speed"}
    result = drive(params, fake_cupy, [2])
    kernel = nkat_cuda.CudaKernel(fake_cupy, "float32", precision=False)
    ns = np.arange(lo, hi + 1, dtype=np.int64)
    values = fake_cupy.empty(ns.size, np.int64)
    kernel._probes(((ns.size + 127) // 128,), (128,),
                   (fake_cupy.asarray(ns), np.int32(ns.size), np.int64(kernel.exp_from), values))
    s = values.get().astype(np.uint32).view(np.float32)
    assert np.count_nonzero(s == s.max()) > 1
    assert result["theoretical_validation"]["convergence_pattern"]["peak_dimension"] == \
        lo + int(np.argmax(s))
    assert result["statistics"]["minimum"]["dimension"] == lo + int(np.argmin(s))


# Magnitudes a run can reach: N·q stays small where N is large (q falls like 1/N²).
FOLD_INPUTS = st.tuples(
    st.integers(1, 1 << 24),                       # n
    st.integers(1, (1 << 32) - 1),                 # k
    st.integers(1, 1 << 40),                       # c2
    st.integers(0, (1 << 24) - 1),                 # q_m
    st.integers(-230, -24),                        # q_e
    st.lists(st.floats(-1e3, 1e3, allow_subnormal=True), min_size=5, max_size=5))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_device_fold_makes_the_host_fold_integers(fake_cupy, dtype):
    from hypothesis import given, settings

    module = fake_cupy.RawModule(code=nkat_cuda.source(dtype), options=())
    check = module.get_function("fold_check")
    kb = SHIFT_BITS[dtype]
    cast = np.float32 if dtype == "float32" else np.float64

    @settings(max_examples=60, deadline=None)
    @given(FOLD_INPUTS)
    def same(inputs):
        n, k, c2, q_m, q_e, reals = inputs
        if dtype == "float32":
            k &= (1 << 24) - 1
        reals = [float(cast(x)) for x in reals]
        out = fake_cupy.zeros(5 * LIMBS + 1, np.int64)
        check((1,), (1,), (fake_cupy.asarray(np.array([n, k, c2, q_m, q_e], dtype=np.int64)),
                           fake_cupy.asarray(np.array(reals, dtype=np.float64)), out))
        limbs = out.get()
        assert limbs[5 * LIMBS] == 0
        host = [0] * 7
        fold_s(host, False, n, k, kb, reals[0], reals[1])
        fold_q(host, n, c2, q_m, q_e, reals[2], reals[3], reals[4])
        device = [from_limbs(limbs[f * LIMBS:(f + 1) * LIMBS].tolist()) for f in range(5)]
        assert device == host[:2] + host[4:]

    same()
    # Beyond 2^64 the limbs end: the kernel says so instead of wrapping around.
    out = fake_cupy.zeros(5 * LIMBS + 1, np.int64)
    check((1,), (1,), (fake_cupy.asarray(np.array([1, 1, 1 << 50, 0, 0], dtype=np.int64)),
                       fake_cupy.asarray(np.array([0, 0, 2.0**20, 0, 0], dtype=np.float64)),
                       out))
    assert out.get()[5 * LIMBS] == nkat_cuda.FLAG_OVERFLOW


def test_a_batch_is_one_queued_record_on_the_kernels_stream(fake_cupy):
    kernel = nkat_cuda.CudaKernel(fake_cupy, "float64", precision=False)
    first = kernel.launch(1, 3, 100, 10_000, 5000, [7, 250])
    second = kernel.launch(301, 2, 100, 10_000, 5000, [])
    with pytest.raises(RuntimeError, match="third batch"):
        kernel.launch(501, 1, 100, 10_000, 5000, [])
    assert kernel.stream.entered == 2
    a, b = first.wait(), second.wait()
    assert len(a.probes) == 2 and b.probes == []
    assert a.max[1] == 300 and a.min[1] == 17  # S peaks at the top, dips near Nc
    assert all(isinstance(v, int) for v in a.sums)
    kernel.launch(501, 1, 100, 10_000, 5000, [])  # both slots are free again
