"""The machine a bundle runs on, torch-free and standalone (part of the device runner): the CPU, how many
CPUs this process may use, emulation, library versions."""

import os
import platform
import re
import time
from importlib import metadata
from typing import Any, Callable, Dict, List, Optional, Sequence


def time_calls(run: Callable[[Any], Any], inputs: Sequence[Any], warmup: int, runs: int) -> List[float]:
    """Per-call wall times in ms: ``warmup`` untimed calls, then ``runs`` timed ones cycling through inputs."""
    for i in range(warmup):
        run(inputs[i % len(inputs)])
    times: List[float] = []
    for i in range(runs):
        x = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - t0) * 1000.0)
    return times


def library_version(module_name: str) -> Optional[str]:
    """An installed distribution's version, or None."""
    try:
        return metadata.version(module_name)
    except Exception:
        return None


def affinity_cpu_count() -> int:
    """The CPUs in this process's affinity mask (no cgroup quota applied: edgekd.base.cpu.usable_cpus does that)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cpuinfo() -> str:
    """/proc/cpuinfo's text (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def emulation(cpuinfo: Optional[str] = None, machine: Optional[str] = None) -> Optional[str]:
    """``"qemu"`` when this Python runs under QEMU user-mode emulation (an ARM board emulated on an x86
    machine), else None. Emulated timings are not latency: the bench labels such rows and ranks none.

    Three signs, any one enough: a /proc/cpuinfo that says so (edgekd's tools/arm_device.sh writes one);
    qemu-user's own view of the host's x86 cpuinfo under an ARM Python; a binfmt_misc entry that hands
    this machine's own binaries to qemu.
    """
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    machine = (machine or platform.machine()).lower()
    if re.search(r"^model name\s*:.*emulated: qemu", text, re.M | re.I):
        return "qemu"
    x86 = re.search(r"^vendor_id\s*:\s*(GenuineIntel|AuthenticAMD)", text, re.M)
    if machine in ("aarch64", "arm64", "armv7l") and x86:
        return "qemu"
    try:
        with open("/proc/sys/fs/binfmt_misc/qemu-" + machine) as f:
            if f.readline().strip() == "enabled":
                return "qemu"
    except OSError:
        pass
    return None


def environment() -> Dict[str, Any]:
    """The machine this Python runs on, as a JSON record: the CPU's name and flags, cores, platform, Python, the
    runtime libraries' versions, and ``emulated`` under QEMU (what the device runner's ``env`` prints, and the base
    of a benchmark's environment)."""
    text = _cpuinfo()
    fields: Dict[str, str] = {}  # the first value of each /proc/cpuinfo key
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    # x86 names its CPU in "model name" ("model" is a number there); ARM boards in "Hardware" or "Model"
    names = [fields.get(k) for k in ("model name", "hardware", "model")]
    cpu = next((n for n in names if n and not n.isdigit()), None) or platform.processor() or platform.machine()
    flags = (fields.get("flags") or fields.get("features") or "").split()
    versions = {name: library_version(name) for name in ("numpy", "onnxruntime", "openvino", "pillow")}
    env: Dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(), "platform": platform.platform(),
           "python": platform.python_version(), "versions": {k: v for k, v in versions.items() if v},
           "cpu_flags": flags}
    emulated = emulation(text)
    if emulated:
        env["emulated"] = emulated
    return env
