"""Every CUDA kernel variant the job can generate compiles with NVRTC, as CuPy compiles a
RawModule, for the GPUs the project supports: no GPU needed, NVRTC runs on the CPU.

CuPy compiles a RawModule, with the options the job passes (``--std=c++14``), either to a
cubin (``-arch=sm_XX``, when its NVRTC knows the GPU) or to PTX that the driver finishes
(``-arch=compute_XX``). What is compiled, ~0.5 s of CPU per PTX-only compile and ~0.9 s
per cubin compile:

* every variant (``nkat_cuda.VARIANTS``) for every arch (``ARCHS``) once with
  ``-arch=sm_XX``: that one compile yields both the cubin (an ELF) and the PTX it was
  made from, which is checked as below. Its PTX is byte for byte the one
  ``-arch=compute_XX`` yields (NVRTC 12), so this also checks the PTX CuPy's other path
  hands the driver at each arch, without a second compile per arch;
* every variant once with ``-arch=compute_XX`` at the lowest arch, so that CuPy's
  PTX-only path itself is run. Its PTX differs between archs only in ``.target``;
* a kernel with an error, which must fail with NVRTC's message.

The PTX checked: each kernel is an ``.entry``, NVRTC printed no warning, and the float32
(speed) variant uses no double-precision instruction.

NVRTC comes from the ``nvidia-cuda-nvrtc-cu12`` wheel (the test extra), loaded with
ctypes. The test is skipped only where that wheel has no build (not Linux); anywhere
it installs, a kernel that does not compile fails.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path

import pytest

from nkat.worker.jobs import nkat_cuda

ARCHS = ("75", "80", "90")
KERNELS = ("nkat_units", "nkat_finish", "nkat_probes")
F64_OPS = ("add.f64", "mul.f64", "fma.rn.f64", "div.rn.f64", "cvt.f64")


def _load_nvrtc() -> ctypes.CDLL:
    spec = importlib.util.find_spec("nvidia.cuda_nvrtc")
    if spec is None or not spec.submodule_search_locations:
        if sys.platform.startswith("linux"):
            pytest.fail("NVRTC is missing: pip install -e '.[test]' brings "
                        "nvidia-cuda-nvrtc-cu12")
        pytest.skip("no NVRTC wheel for this platform")
    libdir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    candidates = sorted(libdir.glob("libnvrtc.so*")) + sorted(libdir.glob("nvrtc64*.dll"))
    if not candidates:
        pytest.fail(f"no NVRTC library in {libdir}")
    return ctypes.CDLL(str(candidates[0]))


@pytest.fixture(scope="module")
def nvrtc() -> ctypes.CDLL:
    lib = _load_nvrtc()
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def compile_cuda(lib: ctypes.CDLL, source: str,
                 options: list[str]) -> tuple[bytes, bytes, str]:
    """(PTX, cubin, log) of one NVRTC compile. NVRTC makes a cubin only for an
    ``-arch=sm_XX`` compile: for ``-arch=compute_XX`` it reports a cubin of size 0, given
    here as ``b""``. Raises AssertionError with NVRTC's log on a compile error."""
    prog = ctypes.c_void_p()
    check = _checker(lib)
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"nkat.cu", 0, None,
                                 None), "create")
    try:
        argv = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        status = lib.nvrtcCompileProgram(prog, len(options), argv)
        size = ctypes.c_size_t()
        check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "log size")
        log = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetProgramLog(prog, log), "log")
        text = log.value.decode(errors="replace")
        assert status == 0, f"NVRTC {' '.join(options)}: " \
            f"{lib.nvrtcGetErrorString(status).decode()}\n{text}"

        def output(get_size, get, what: str) -> bytes:
            check(get_size(prog, ctypes.byref(size)), f"{what} size")
            if size.value == 0:
                return b""
            out = ctypes.create_string_buffer(size.value)
            check(get(prog, out), what)
            return out.raw

        ptx = output(lib.nvrtcGetPTXSize, lib.nvrtcGetPTX, "PTX")
        cubin = output(lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN, "cubin")
        return ptx, cubin, text
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _checker(lib: ctypes.CDLL):
    def check(status: int, what: str) -> None:
        assert status == 0, f"nvrtc {what}: {lib.nvrtcGetErrorString(status).decode()}"
    return check


def assert_good_ptx(ptx: bytes, log: str, dtype: str, arch: str) -> None:
    """PTX for ``arch`` with every kernel's entry, compiled without a warning; in speed
    mode (float32) with no double-precision instruction."""
    text = ptx.decode(errors="replace")
    assert f".target sm_{arch}" in text, "PTX for another arch"
    for kernel in KERNELS:
        assert f".entry {kernel}" in text, kernel
    assert "warning" not in log.lower(), log
    if dtype == "float32":
        # speed mode: no double-precision arithmetic on the device at all.
        assert not any(op in text for op in F64_OPS), "speed mode must not use doubles"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("dtype", "precision"), nkat_cuda.VARIANTS)
def test_every_kernel_variant_compiles_with_nvrtc(nvrtc, dtype, precision, arch):
    # CuPy's cubin path; the PTX of the same compile is checked too (module docstring).
    ptx, cubin, log = compile_cuda(nvrtc, nkat_cuda.source(dtype, precision),
                                   [f"-arch=sm_{arch}", "--std=c++14"])
    assert_good_ptx(ptx, log, dtype, arch)
    assert cubin[:4] == b"\x7fELF"


@pytest.mark.parametrize(("dtype", "precision"), nkat_cuda.VARIANTS)
def test_every_kernel_variant_compiles_to_ptx_only(nvrtc, dtype, precision):
    # CuPy's PTX path (-arch=compute_XX): no cubin, the driver compiles the PTX.
    arch = ARCHS[0]
    ptx, cubin, log = compile_cuda(nvrtc, nkat_cuda.source(dtype, precision),
                                   [f"-arch=compute_{arch}", "--std=c++14"])
    assert cubin == b"", "NVRTC made a cubin for a virtual architecture"
    assert_good_ptx(ptx, log, dtype, arch)


def test_a_broken_kernel_fails_with_nvrtcs_message(nvrtc):
    with pytest.raises(AssertionError, match="undefined"):
        compile_cuda(nvrtc, nkat_cuda.source("float64") + "\n__device__ int f() { return x; }",
                     ["-arch=compute_80", "--std=c++14"])
