"""The CPU edgekd trains on: how many cores it may use, whether it computes bfloat16 natively, and how
its OpenMP threads wait. Torch-free: the wait policy must be settled before torch is imported.

Why the wait policy: PyTorch's CPU kernels run on GNU OpenMP (libgomp), whose threads spin at every
barrier for GOMP_SPINCOUNT = 300,000 pause loops (milliseconds on current Xeons) before sleeping.
When another process takes one of the cores, an OpenMP thread that has finished its share spins
through its whole time slice waiting for a peer that is not running, at every parallel region of
every layer. Measured on this project's 2-core Xeon (tools/measure_teacher.py contention, four
rounds on a quiet machine, docs/distillation.md): a 2-thread distillation step fell from 720-748 to
88-209 images/s beside one busy process. Sleeping at once (OMP_WAIT_POLICY=PASSIVE) kept 332-361
beside it but cost 18-26 % alone (555-608 images/s); a short spin of 3,000 pause loops keeps most of both:
659-699 alone, 303-324 beside a busy process (the 0.5x that losing one of two cores costs).
"""

import os
import sys
from typing import Any, Dict, Optional, Set

# What training commands set when the user has not chosen: spin briefly at barriers, then sleep.
SPIN_COUNT = "3000"
# Variables that already express the user's choice of waiting (libgomp's and Intel OpenMP's).
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


class _Wait:
    """The wait policy this process settled on (``short_spin_wait``'s record), None until it has."""

    record: Optional[Dict[str, Any]] = None


def short_spin_wait() -> Dict[str, Any]:
    """Make OpenMP threads spin only briefly at barriers (GOMP_SPINCOUNT=3000) unless the user chose how
    they wait.

    Must run before torch is imported: libgomp reads its environment once, when it is loaded. Returns
    a record for metrics.json (also the ``wait`` of ``describe``): the setting in force and who set it."""
    if _Wait.record is None:
        _Wait.record = _settle_wait()
    return _Wait.record


def _settle_wait() -> Dict[str, Any]:
    chosen = {k: os.environ[k] for k in WAIT_VARIABLES if k in os.environ}
    if chosen:
        return {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "set_by": "user", "env": chosen}
    if "torch" in sys.modules:  # too late to matter: say so rather than pretend
        return {"omp_wait_policy": None, "set_by": "nobody (torch was imported first)", "env": {}}
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return {"omp_wait_policy": None, "set_by": "edgekd", "env": {"GOMP_SPINCOUNT": SPIN_COUNT}}


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> Optional[float]:
    """The CPU quota of this process's cgroup in cores (a container's --cpus), or None when unlimited."""
    try:  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"
        with open(os.path.join(root, "cpu.max")) as f:
            quota_text, period_text = f.read().split()[:2]
        return None if quota_text == "max" else max(int(quota_text) / int(period_text), 0.0)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period = int(f.read())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """Cores this process may run on: its affinity mask, capped by a cgroup quota (rounded down, at least 1).

    torch's default thread count is the affinity mask's size; in a container limited to 2 CPUs of a
    64-core host that is 64 threads taking turns on 2 cores' worth of time."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    return max(1, min(cpus, int(limit))) if limit else cpus


def cpu_flags(path: str = "/proc/cpuinfo") -> Set[str]:
    """The first processor's feature flags (Linux; an empty set elsewhere)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(flags: Optional[Set[str]] = None) -> Optional[str]:
    """Which bfloat16 instructions the CPU has (AMX-BF16 and/or AVX512-BF16), or None without either."""
    flags = cpu_flags() if flags is None else flags
    found = [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    return ", ".join(found) or None


def others_running() -> Optional[int]:
    """Runnable tasks on the machine besides this process's own threads, now (a snapshot, for the record)."""
    try:
        with open("/proc/stat") as f:
            running = next(int(line.split()[1]) for line in f if line.startswith("procs_running"))
        mine = 0
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as f:
                mine += f.read().rsplit(")", 1)[1].split()[0] == "R"
        return max(running - mine, 0)
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def describe(threads: int) -> Dict[str, Any]:
    """The CPU record of a run (metrics.json -> cpu): cores usable, threads, wait policy, bf16, load now."""
    load: Optional[float]
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"usable_cpus": usable_cpus(), "cgroup_limit": cgroup_cpu_limit(), "threads": threads,
            "wait": _Wait.record, "native_bf16": native_bf16(), "load_1min": load,
            "others_running": others_running()}
