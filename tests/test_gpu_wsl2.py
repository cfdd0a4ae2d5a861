"""WSL2, simulated: the kernel release string injected and a fake NVML that, as under
WSL2, lists no processes. The sensor and `gpu` say what is lacking, and the killed-pid
check falls back to the process table (tested with real processes holding a file)."""

from __future__ import annotations

import functools
import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pynvml as real
import pytest

from nkat.supervisor.gpu.host import detect, kernel_release, state_dir_advice
from nkat.supervisor.gpu.nvml import NvmlSensor
from nkat.supervisor.gpu.proctable import GPU_DEVICE, gpu_device_holders
from nkat.supervisor.gpu.show import EXIT_NO_GPU, EXIT_OK, gpu_command
from nkat.supervisor.testing.fake_nvml import FakeGpu, FakePynvml

WSL2 = "5.15.153.1-microsoft-standard-WSL2"
NATIVE = "6.1.0-18-amd64"


@pytest.mark.parametrize("release, wsl", [
    (WSL2, 2),
    ("4.19.128-microsoft-standard", 2),  # WSL2 kernels before "-WSL2" was added
    ("4.4.0-19041-Microsoft", 1),  # WSL1: no Linux kernel, no GPU
    (NATIVE, None),
])
def test_wsl_is_told_by_the_kernel_release(release: str, wsl: int | None) -> None:
    host = detect(release)
    assert host.wsl == wsl and host.wsl2 == (wsl == 2)
    assert release in host.describe()


def test_the_running_kernel_release_is_read() -> None:
    assert kernel_release() and detect().kernel_release == kernel_release()


def wsl_like_fake() -> FakePynvml:
    """What NVML answers under WSL2: no processes, and (on some GPUs) no utilisation and
    no temperature thresholds."""
    gpu = FakeGpu(pids=(), utilization=None, legacy_thresholds={}, field_values={})
    return FakePynvml([gpu])


def open_sensor(fake: FakePynvml, release: str, **kwargs: object) -> NvmlSensor:
    sensor = NvmlSensor(nvml=fake, xid_events=False, kernel_release=release,
                        **kwargs)  # type: ignore[arg-type]
    sensor.open()
    return sensor


def test_under_wsl2_the_empty_process_list_is_not_believed() -> None:
    fake = wsl_like_fake()
    sensor = open_sensor(fake, WSL2, process_table=lambda: (4242,))
    reading = sensor.read(0, 0.0)
    assert reading.pids is None and "pids" in reading.unsupported
    assert sensor.processes(0) == (4242,)  # from the process table
    assert fake.calls["nvmlDeviceGetComputeRunningProcesses"] == 0
    assert fake.calls["nvmlDeviceGetComputeRunningProcesses_v2"] == 0


def test_under_wsl2_the_sensor_says_once_what_nvml_lacks() -> None:
    sensor = open_sensor(wsl_like_fake(), WSL2, process_table=lambda: ())
    notes = sensor.take_notes()
    [wsl] = [n for n in notes if n.startswith("WSL2")]
    assert WSL2 in wsl and "per-process lists" in wsl
    assert "GPU 0 fields utilization_pct" in wsl
    assert "GPU 0 thresholds shutdown, slowdown, gpu_max, mem_max" in wsl
    sensor.processes(0)
    sensor.processes(0)
    [fallback] = sensor.take_notes()
    assert "NVML under WSL2 lists no processes" in fallback and "process table" in fallback
    assert sensor.take_notes() == []


def test_natively_an_empty_list_means_the_worker_let_go() -> None:
    fake = wsl_like_fake()
    sensor = open_sensor(fake, NATIVE, process_table=lambda: (4242,))
    assert sensor.processes(0) == ()  # NVML's own answer
    assert not [n for n in sensor.take_notes() if n.startswith("WSL")]


@pytest.fixture
def holder(tmp_path: Path):
    """A real process holding a file that stands in for a GPU device node."""
    device = tmp_path / "nvidia0"
    device.write_bytes(b"")
    proc = subprocess.Popen(
        [sys.executable, "-c",
         f"import sys, time; f = open({str(device)!r}); print('ok', flush=True); "
         "time.sleep(60)"],
        stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ok\n"
    yield proc, re.compile("^" + re.escape(str(device)) + "$")
    proc.kill()
    proc.wait()


def test_the_process_table_finds_a_process_holding_a_device_and_forgets_it_when_killed(
    holder: tuple[subprocess.Popen[bytes], re.Pattern[str]],
) -> None:
    proc, device = holder
    holders = gpu_device_holders(device=device)
    assert holders is not None and proc.pid in holders
    proc.kill()
    proc.wait()
    holders = gpu_device_holders(device=device)
    assert holders is not None and proc.pid not in holders


def test_the_killed_pid_check_under_wsl2_waits_for_the_process_to_let_go(
    holder: tuple[subprocess.Popen[bytes], re.Pattern[str]],
) -> None:
    proc, device = holder
    sensor = open_sensor(wsl_like_fake(), WSL2,
                         process_table=functools.partial(gpu_device_holders, device=device))
    held = sensor.processes(0)
    assert held is not None and proc.pid in held  # not released: kill_failed if it stays
    proc.kill()
    proc.wait()
    released = sensor.processes(0)
    assert released is not None and proc.pid not in released


def test_the_gpu_device_pattern_matches_nvidia_and_wsl_nodes_only() -> None:
    for path in ("/dev/nvidia0", "/dev/nvidia12", "/dev/nvidiactl", "/dev/nvidia-uvm",
                 "/dev/dxg"):
        assert GPU_DEVICE.match(path), path
    for path in ("/dev/null", "/dev/nvidia-modeset0x", "/tmp/dev/dxg", "/dev/dri/card0"):
        assert not GPU_DEVICE.match(path), path


def test_without_procfs_the_process_table_cannot_say(tmp_path: Path) -> None:
    assert gpu_device_holders(proc=tmp_path / "no-proc") is None


def test_the_gpu_command_says_what_wsl2_lacks() -> None:
    out = io.StringIO()
    assert gpu_command(out=out, nvml=wsl_like_fake(), kernel_release=WSL2) == EXIT_OK
    text = out.getvalue()
    assert f"platform: WSL2 (kernel {WSL2}); NVML here lacks per-process lists" in text
    assert "processes    n/a" in text
    out = io.StringIO()
    gpu_command(out=out, json_output=True, nvml=wsl_like_fake(), kernel_release=WSL2)
    platform = json.loads(out.getvalue())["platform"]
    assert platform["wsl2"] is True and platform["kernel_release"] == WSL2
    assert platform["lacks"][0].startswith("per-process lists")
    assert "GPU 0 fields utilization_pct" in platform["lacks"]


def test_the_gpu_command_natively_lacks_nothing_it_does_not_say() -> None:
    out = io.StringIO()
    gpu_command(out=out, json_output=True, nvml=FakePynvml(), kernel_release=NATIVE)
    platform = json.loads(out.getvalue())["platform"]
    assert platform == {"description": f"Linux (kernel {NATIVE})",
                        "kernel_release": NATIVE, "wsl2": False, "lacks": []}


def test_no_driver_under_wsl2_points_at_the_windows_driver() -> None:
    fake = FakePynvml()
    fake.init_error = real.NVML_ERROR_LIBRARY_NOT_FOUND
    out = io.StringIO()
    status = gpu_command(out=out, json_output=True, nvml=fake, kernel_release=WSL2)
    report = json.loads(out.getvalue())
    assert status == EXIT_NO_GPU
    assert "install the NVIDIA driver on Windows" in report["message"]
    assert report["platform"]["wsl2"] is True


def test_scanning_the_process_table_is_quick_enough_for_a_kill_check() -> None:
    started = time.monotonic()
    assert gpu_device_holders() is not None
    assert time.monotonic() - started < 5.0  # a kill check runs it a few times at most


MOUNTS = """\
/dev/sdc / ext4 rw,relatime,discard,errors=remount-ro,data=ordered 0 0
C:\\134 /mnt/c 9p rw,noatime,dirsync,aname=drvfs;path=C:\\;uid=1000 0 0
none /mnt/wsl tmpfs rw,relatime 0 0
"""


def test_a_state_dir_on_a_windows_drive_is_warned_about_under_wsl2() -> None:
    advice = state_dir_advice(Path("/mnt/c/Users/me/nkat"), detect(WSL2), MOUNTS)
    assert advice is not None and "Windows drive (/mnt/c, 9p)" in advice
    assert state_dir_advice(Path("/home/me/.local/state/nkat-supervise"), detect(WSL2),
                            MOUNTS) is None
    assert state_dir_advice(Path("/mnt/c/Users/me/nkat"), detect(NATIVE), MOUNTS) is None
