"""Bench bundles on an edge device over SSH: copy bundles, images and the self-contained runner
there, run it with the device's own Python and runtime, and bring the rows back."""

import json
import logging
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

from ..base import ssh
from ..base.errors import EdgeKDError
from ..bundle.assemble import write_runner
from ..bundle.device import BenchJob
from ..bundle.rows import DeviceBench, DeviceRow, MachineEnvironment, RecordError

log = logging.getLogger(__name__)
MIN_PYTHON = (3, 8)


def check_device(target: ssh.Target, timeout: int) -> None:
    """The device's Python answers and is new enough; returns its environment (CPU, cores, versions)."""
    probe = ("import sys, json; print(json.dumps(list(sys.version_info[:2])))")
    out = ssh.run(target, f"{ssh.quote(target.python)} -c {ssh.quote(probe)} 2>&1 || echo NO_PYTHON", timeout)
    text = out.decode(errors="replace").strip()
    if "NO_PYTHON" in text or not text.startswith("["):
        raise EdgeKDError(f"{target}: cannot run {target.python!r} there ({text.splitlines()[0] if text else 'no output'}); "
                          "install Python 3.8+ or give its path: ssh://host/usr/bin/python3")
    version = tuple(json.loads(text.splitlines()[-1]))
    if version < MIN_PYTHON:
        raise EdgeKDError(f"{target}: Python {'.'.join(map(str, version))} is too old; the device runner needs 3.8+")


def bench_bundles(target: ssh.Target, bundles: Sequence[Tuple[str, str]], images: str, labels: str,
                  batch_sizes: Sequence[int], warmup: int, runs: int, threads: Optional[int],
                  timeout: int) -> Tuple[MachineEnvironment, Dict[str, DeviceRow]]:
    """Run ``bundles`` ([(name, folder)]) on the device; return (device environment, its row by bundle name):
    status, accuracy, load and the raw times by batch size."""
    check_device(target, timeout)
    stage = tempfile.mkdtemp(prefix="edgekd-device-")
    remote = None
    try:
        names: List[str] = []
        for i, (name, folder) in enumerate(bundles):
            local = os.path.join(stage, f"bundle{i}")
            shutil.copytree(folder, local)
            names.append(f"bundle{i}")
        write_runner(os.path.join(stage, "device_runner.py"))  # the self-contained bundle runner
        shutil.copy(images, os.path.join(stage, "images.npy"))
        shutil.copy(labels, os.path.join(stage, "labels.npy"))
        job = BenchJob(bundles=names, images="images.npy", labels="labels.npy", warmup=warmup, runs=runs,
                       batch_sizes=list(batch_sizes), threads=threads, openvino_device=target.openvino_device)
        with open(os.path.join(stage, "job.json"), "w") as f:
            f.write(job.to_json())
        remote = ssh.run(target, "mktemp -d /tmp/edgekd-bench-XXXXXX", timeout).decode().strip()
        ssh.copy_to(target, [os.path.join(stage, n) for n in sorted(os.listdir(stage))], remote, timeout)
        log.info("running the device runner on %s", target)
        out = ssh.run(target, f"cd {ssh.quote(remote)} && {ssh.quote(target.python)} device_runner.py bench job.json",
                      timeout)
        result = _parse(out, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if remote:
            try:
                ssh.run(target, f"rm -rf {ssh.quote(remote)}", 60)
            except EdgeKDError as e:
                log.warning("could not remove %s on %s: %s", remote, target, e)
    return result.environment, {bundles[names.index(r.bundle)][0]: r for r in result.rows}


def _parse(out: bytes, target: ssh.Target) -> DeviceBench:
    """The device runner's JSON answer as its record (EdgeKDError when it is not one)."""
    try:
        return DeviceBench.from_json(json.loads(out.decode()))
    except (ValueError, RecordError) as e:
        raise EdgeKDError(f"{target}: the device runner's answer is not its bench record: {e}") from e
