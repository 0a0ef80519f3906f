"""Bench bundles on an edge device over SSH: copy bundles, images and the self-contained runner
there, run it with the device's own Python and runtime, and bring the rows back."""

import json
import logging
import os
import shutil
import tempfile

from ..base import ssh
from ..base.errors import EdgeKDError
from ..bundle.assemble import write_runner
from ..bundle.device import BenchJob

log = logging.getLogger(__name__)
MIN_PYTHON = (3, 8)


def check_device(target, timeout):
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


def bench_bundles(target, bundles, images, labels, batch_sizes, warmup, runs, threads, timeout):
    """Run ``bundles`` ([(name, folder)]) on the device; return (device environment, results by name):
    each ``{"status", "accuracy", "load", "times": {batch_size: [ms, ...]}}``."""
    check_device(target, timeout)
    stage = tempfile.mkdtemp(prefix="edgekd-device-")
    remote = None
    try:
        names = []
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
        result = json.loads(out.decode())
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if remote:
            try:
                ssh.run(target, f"rm -rf {ssh.quote(remote)}", 60)
            except EdgeKDError as e:
                log.warning("could not remove %s on %s: %s", remote, target, e)
    by_name = {}
    for r in result["rows"]:
        r["times"] = {int(b): t for b, t in (r.get("times") or {}).items()}
        r["batch_status"] = {int(b): t for b, t in (r.get("batch_status") or {}).items()}
        by_name[bundles[names.index(r.pop("bundle"))][0]] = r
    return result["environment"], by_name
