"""Every CUDA kernel variant the job can generate compiles with NVRTC, as CuPy compiles a
RawModule, for the GPUs the project supports: no GPU needed, NVRTC runs on the CPU.

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


def compile_ptx(lib: ctypes.CDLL, source: str, options: list[str]) -> tuple[bytes, str]:
    """(PTX or cubin, log); raises AssertionError with NVRTC's log on a compile error."""
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
        cubin = any(o.startswith("-arch=sm_") for o in options)
        get_size, get = ((lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN) if cubin
                         else (lib.nvrtcGetPTXSize, lib.nvrtcGetPTX))
        check(get_size(prog, ctypes.byref(size)), "output size")
        out = ctypes.create_string_buffer(size.value)
        check(get(prog, out), "output")
        return out.raw, text
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _checker(lib: ctypes.CDLL):
    def check(status: int, what: str) -> None:
        assert status == 0, f"nvrtc {what}: {lib.nvrtcGetErrorString(status).decode()}"
    return check


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("dtype", "precision"), nkat_cuda.VARIANTS)
def test_every_kernel_variant_compiles_with_nvrtc(nvrtc, dtype, precision, arch):
    source = nkat_cuda.source(dtype, precision)
    # CuPy compiles to PTX (-arch=compute_XX) or, when the driver allows, to a cubin
    # (-arch=sm_XX), with the options the job passes (--std=c++14).
    ptx, log = compile_ptx(nvrtc, source, [f"-arch=compute_{arch}", "--std=c++14"])
    text = ptx.decode(errors="replace")
    for kernel in KERNELS:
        assert f".entry {kernel}" in text, kernel
    assert "warning" not in log.lower(), log
    if dtype == "float32":
        # speed mode: no double-precision arithmetic on the device at all.
        assert not any(op in text for op in ("add.f64", "mul.f64", "fma.rn.f64",
                                             "div.rn.f64", "cvt.f64")), \
            "speed mode must not use doubles"
    cubin, _ = compile_ptx(nvrtc, source, [f"-arch=sm_{arch}", "--std=c++14"])
    assert cubin[:4] == b"\x7fELF"


def test_a_broken_kernel_fails_with_nvrtcs_message(nvrtc):
    with pytest.raises(AssertionError, match="undefined"):
        compile_ptx(nvrtc, nkat_cuda.source("float64") + "\n__device__ int f() { return x; }",
                    ["-arch=compute_80", "--std=c++14"])
