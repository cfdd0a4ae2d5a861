"""`nkat-supervise gpu`: what the supervisor would see of the GPU, without starting a run.

Opens the sensor (NVML, or a profile with `--sim-gpu`), prints each device with its
thresholds and one reading, and closes it. Exit status: 0 shown, 1 no GPU or driver (the
message says why), 2 bad profile. `--json` prints one object, stable for scripts::

    {"source": "nvml" | "scripted" | "none",
     "message": "one line for a person",
     "devices": [{"index": 0, "uuid": "GPU-…", "name": "…",
                  "thresholds": {"shutdown", "slowdown", "gpu_max", "mem_max",
                                 "enforced_power_limit_w"},
                  "reading": {"temperature", "thermal_margin", "power_w",
                              "utilization_pct", "memory_used", "memory_total",
                              "memory_reserved", "clock_event_reasons",
                              "clock_event_reason_names", "ecc_uncorrected_volatile",
                              "pids", "lost", "unsupported": [...], "errors": {...}}}],
     "notes": ["API fallbacks, fields not reported, …"],
     "platform": {"description": "WSL2 (kernel …)" | "Linux (kernel …)",
                  "kernel_release": "…", "wsl2": true | false,
                  "lacks": ["per-process lists (NVML lists no processes)",
                            "GPU 0 fields utilization_pct", …]}}

``lacks`` is filled under WSL2 only: what NVML there does not give, known or seen.

Units: °C, W, bytes, percent. A value is null when not reported (its field is then in
`unsupported`) or when reading it failed (its field is in `errors`).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from types import ModuleType
from typing import Any, TextIO

from nkat.supervisor.exitcode import ExitCode
from nkat.supervisor.gpu.host import WSL2_KNOWN_GAPS, Host, detect
from nkat.supervisor.gpu.nvml import NvmlSensor
from nkat.supervisor.gpu.scripted import ProfileError, ScriptedSensor
from nkat.supervisor.gpu.sensor import GpuSensor, GpuUnavailable, Reading, reason_names

#: Exit codes: 0 a GPU was read, 1 none can be read (a run then goes on with GPU checks
#: off), 2 the --sim-gpu profile is unusable.
EXIT_OK, EXIT_NO_GPU, EXIT_BAD_PROFILE = ExitCode.OK, ExitCode.CHECK_FAILED, ExitCode.USAGE

_GIB = float(1 << 30)


def gpu_command(
    *,
    json_output: bool = False,
    sim_gpu: str | None = None,
    sim_at: float = 0.0,
    out: TextIO | None = None,
    nvml: ModuleType | None = None,
    kernel_release: str | None = None,
) -> int:
    """Run `nkat-supervise gpu`; returns the exit status.

    json_output: `--json`. sim_gpu: `--sim-gpu PROFILE`, a path or a shipped profile name.
    sim_at: the profile time to read a simulated GPU at, in profile seconds.
    out: where to print (stdout by default; errors of a text run go to stderr).
    nvml: the pynvml module to use instead of importing it (tests pass a fake).
    kernel_release: the kernel release string to judge the platform by (tests simulate
    WSL2 with it); None: the running kernel's.
    """
    out = out or sys.stdout
    host = detect(kernel_release)
    sensor: GpuSensor
    if sim_gpu:
        try:
            sensor = ScriptedSensor.from_profile(sim_gpu, start_at=sim_at)
        except ProfileError as err:
            return _fail(out, json_output, "scripted", f"bad GPU profile: {err}", EXIT_BAD_PROFILE,
                         host)
        message = f"simulated GPU from profile {sensor.profile.source} at t={sim_at:g} s"
    else:
        # One reading needs no Xid event thread.
        sensor = NvmlSensor(nvml=nvml, xid_events=False, kernel_release=kernel_release)
    try:
        sensor.open()
    except GpuUnavailable as err:
        message = (
            f"no GPU to watch: {err}. GPU checks are off; "
            "use --sim-gpu PROFILE to see a simulated one"
        )
        if host.wsl2:
            message += (". Under WSL2 the driver is the Windows one: install the NVIDIA "
                        "driver on Windows (not in Linux); it provides "
                        "/usr/lib/wsl/lib/libnvidia-ml.so.1")
        return _fail(out, json_output, "none", message, EXIT_NO_GPU, host)
    try:
        devices = device_reports(sensor)
        notes = sensor.take_notes()
    finally:
        sensor.close()
    if not sim_gpu:
        message = f"{len(devices)} GPU{'s' if len(devices) != 1 else ''} through NVML"
    platform = platform_report(host, devices)
    report = {"source": sensor.source, "message": message, "devices": devices, "notes": notes,
              "platform": platform}
    if json_output:
        print(json.dumps(report, indent=2), file=out)
    else:
        print(message, file=out)
        if host.wsl2:
            print(f"platform: {host.describe()}; NVML here lacks "
                  + "; ".join(platform["lacks"]), file=out)
        for device in devices:
            _print_device(device, out)
        if notes:
            print("\nnotes:", file=out)
            for note in notes:
                print(f"  {note}", file=out)
    return EXIT_OK


def device_reports(sensor: GpuSensor) -> list[dict[str, Any]]:
    """The "devices" list above for an opened sensor: thresholds and one reading each."""
    return [
        {
            **asdict(device),
            "thresholds": asdict(sensor.thresholds(device.index)),
            "reading": reading_json(sensor.read(device.index, time.monotonic())),
        }
        for device in sensor.devices()
    ]


def platform_report(host: Host, devices: list[dict[str, Any]]) -> dict[str, Any]:
    """The "platform" object above: under WSL2, what NVML lacks there (the known gaps and
    what these devices do not report)."""
    lacks: list[str] = []
    if host.wsl2:
        lacks.extend(WSL2_KNOWN_GAPS)
        for device in devices:
            fields = [f for f in device["reading"]["unsupported"] if f != "pids"]
            limits = [k for k, v in device["thresholds"].items() if v is None]
            if fields:
                lacks.append(f"GPU {device['index']} fields {', '.join(fields)}")
            if limits:
                lacks.append(f"GPU {device['index']} thresholds {', '.join(limits)}")
    return {"description": host.describe(), "kernel_release": host.kernel_release,
            "wsl2": host.wsl2, "lacks": lacks}


def reading_json(reading: Reading) -> dict[str, Any]:
    """A reading as plain JSON values, without its (process-local) monotonic time."""
    data = asdict(reading)
    del data["t_mono"], data["index"]
    bits = reading.clock_event_reasons
    data["clock_event_reason_names"] = None if bits is None else reason_names(bits)
    data["pids"] = None if reading.pids is None else list(reading.pids)
    data["unsupported"] = sorted(reading.unsupported)
    data["errors"] = dict(sorted(reading.errors.items()))
    return data


def _fail(out: TextIO, as_json: bool, source: str, message: str, status: int,
          host: Host | None = None) -> int:
    if as_json:
        report: dict[str, Any] = {"source": source, "message": message, "devices": [],
                                  "notes": []}
        if host is not None:
            report["platform"] = platform_report(host, [])
        print(json.dumps(report, indent=2), file=out)
    else:
        print(f"nkat-supervise gpu: {message}", file=sys.stderr)
    return status


def _print_device(dev: dict[str, Any], out: TextIO) -> None:
    r, t = dev["reading"], dev["thresholds"]

    def val(data: dict[str, Any], key: str, unit: str = "") -> str:
        value = data[key]
        if value is None:
            return "error" if key in r["errors"] else "n/a"
        return f"{value:g}{unit}" if isinstance(value, float) else f"{value}{unit}"

    lines = [f"GPU {dev['index']}  {dev['name']}  {dev['uuid']}"]
    limits = [f"{k} {val(t, k, ' C')}" for k in ("shutdown", "slowdown", "gpu_max", "mem_max")]
    limits.append(f"power limit {val(t, 'enforced_power_limit_w', ' W')}")
    lines.append("  thresholds   " + ", ".join(limits))
    if r["lost"]:
        lines.append("  state        LOST: the GPU fell off the bus or needs a reset")
    else:
        used, total, reserved = r["memory_used"], r["memory_total"], r["memory_reserved"]
        if used is None or total is None:
            memory = f"used {val(r, 'memory_used')}, total {val(r, 'memory_total')}"
        else:
            memory = f"{used / _GIB:.1f} of {total / _GIB:.1f} GiB ({100 * used / total:.0f} %)"
            if reserved is not None:
                memory += f", reserved {reserved / _GIB:.1f} GiB"
        names, pids = r["clock_event_reason_names"], r["pids"]
        lines += [
            f"  temperature  {val(r, 'temperature', ' C')}"
            f" (margin {val(r, 'thermal_margin', ' C')})",
            f"  power        {val(r, 'power_w', ' W')},"
            f" utilisation {val(r, 'utilization_pct', ' %')}",
            f"  memory       {memory}",
            "  clock events "
            + (val(r, "clock_event_reasons") if names is None else ", ".join(names) or "none"),
            f"  ecc          {val(r, 'ecc_uncorrected_volatile')} uncorrected (volatile)",
            "  processes    "
            + (val(r, "pids") if pids is None else ", ".join(map(str, pids)) or "none"),
        ]
        if r["unsupported"]:
            lines.append("  not reported " + ", ".join(r["unsupported"]))
        lines += [f"  error        {key}: {message}" for key, message in r["errors"].items()]
    print("\n" + "\n".join(lines), file=out)
