"""``edgekd export --target``: the device a bundle is made for, and what that changes in the bundle.

- INT8 operand types (ONNX Runtime): chosen by the target's CPU (s8s8 on ARM, u8u8 on x86 AVX2 without
  VNNI, u8s8 with VNNI), not by the CPU that happens to run the export.
- OpenVINO's inference precision: pinned to f32 in the manifest (``runtime.inference_precision``), which
  the runner passes as INFERENCE_PRECISION_HINT. Left alone the CPU plugin computes in f16 on ARM CPUs
  (and bf16 on x86 CPUs with AMX or AVX512_BF16), so the bundle would not run at the precision it was
  validated at. An fp16 bundle stores fp16 weights and still computes in f32.
- Batch: OpenVINO for aarch64 (2026.4) cannot compile a dynamic-batch MobileNetV3-small (``Check
  'any_of(scale.size(), OC, 1U)' failed``), so OpenVINO bundles for arm64 get a static batch of 1; the
  manifest's ``input.shape[0]`` and ``batch_sizes`` say so, and the runner feeds any batch through in
  slices of it. ONNX Runtime runs dynamic batches everywhere.
- ``ssh://...``: the target's CPU is asked over SSH, and the parity gate and the INT8 accuracy check run
  on the device itself (the device runner, with its own runtime), on the same test images.
"""

import io
import json
import logging
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Set

import numpy as np

from .. import EdgeKDError
from ..base import ssh
from ..bundle.assemble import runner_source, write_runner
from .quantize_onnx import cpu_features
from .records import RanOn

log = logging.getLogger(__name__)

NAMES = ("cpu", "arm64", "x86-avx2", "x86-vnni")
ARM = ("aarch64", "arm64")
STATIC_BATCH = 1  # OpenVINO bundles for ARM: the batch edge applications call with


@dataclass
class DeviceEnv:
    """What the device runner's ``env`` says about the device (its JSON, read here)."""

    machine: str
    cpu: Optional[str] = None
    cores: Optional[int] = None
    versions: Optional[Dict[str, str]] = None
    emulated: Any = None                     # what says so (qemu), when the CPU is emulated
    cpu_flags: Set[str] = field(default_factory=set)

    @classmethod
    def from_json(cls, text: str) -> "DeviceEnv":
        d = json.loads(text)
        return cls(str(d.get("machine", "?")), d.get("cpu"), d.get("cores"), d.get("versions"), d.get("emulated"),
                   set(d.get("cpu_flags") or ()))

    def record(self) -> Dict[str, Any]:
        """The manifest's ``target.device``: what is known of it."""
        known = {"cpu": self.cpu, "machine": self.machine, "cores": self.cores, "versions": self.versions,
                 "emulated": self.emulated}
        return {k: v for k, v in known.items() if v is not None}


@dataclass
class Target:
    """What ``--target`` resolved to: a name, the CPU (architecture and feature flags) and, for ssh://, the device."""

    name: str
    arch: str
    flags: Set[str] = field(default_factory=set)
    device: Optional[ssh.Target] = None           # the device, for ssh:// targets
    environment: Optional[DeviceEnv] = None  # what the device runner says there
    timeout: int = 600

    @property
    def here(self) -> bool:
        return self.name == "cpu"

    def static_batch(self, fmt: str) -> Optional[int]:
        """The static batch a bundle of ``fmt`` needs on this target, or None (dynamic batch)."""
        return STATIC_BATCH if fmt == "openvino" and self.arch in ARM else None

    def record(self, fmt: str, int8_types: Optional[str] = None) -> Dict[str, Any]:
        """The manifest's ``target`` entry."""
        rec: Dict[str, Any] = {"name": self.name, "arch": self.arch, "static_batch": self.static_batch(fmt)}
        if fmt == "openvino":
            rec["openvino_inference_precision"] = "f32"
            rec["openvino_inference_precision_note"] = (
                "pinned: the CPU plugin would pick f16 on ARM (bf16 on x86 with AMX/AVX512_BF16); the bundle "
                "is validated at f32")
        if int8_types:
            rec["int8_types"] = int8_types
        if self.environment:
            rec["device"] = self.environment.record()
        return rec


def resolve(spec: Optional[str], ssh_config: Optional[str] = None, timeout: int = 600) -> Target:
    """``--target`` -> Target; a bad name, or an ssh:// device that does not answer, is one line (exit 2)."""
    if spec in (None, "", "cpu"):
        arch, flags = cpu_features()
        return Target("cpu", arch, flags)
    if spec == "arm64":
        return Target("arm64", "aarch64", {"asimd"})
    if spec == "x86-avx2":
        return Target("x86-avx2", "x86_64", {"avx2"})
    if spec == "x86-vnni":
        return Target("x86-vnni", "x86_64", {"avx2", "avx512_vnni"})
    if spec.startswith("ssh://"):
        return _ssh_target(spec, ssh_config, timeout)
    raise EdgeKDError(f"unknown --target {spec!r}: choose {', '.join(NAMES)} or ssh://[user@]host[:port][/python]")


def _ssh_target(spec: str, ssh_config: Optional[str], timeout: int) -> Target:
    device = ssh.parse_target(spec, ssh_config)
    if device.folder:
        raise EdgeKDError(f"--target {spec!r}: give the device's Python after the host (ssh://host/path/to/python), "
                          "not a folder")
    source = runner_source().encode()  # the runner's ``env``, its source sent on stdin: nothing left behind
    try:
        out = ssh.run(device, f"{ssh.quote(device.python)} - env", timeout, input_bytes=source)
    except EdgeKDError as e:
        if not str(e).startswith("running on"):  # cannot reach it, refused keys: ssh's own explanation
            raise
        raise EdgeKDError(f"--target {spec}: cannot run the device runner with {device.python!r} there "
                          f"({str(e).split(' failed: ', 1)[-1]}); give the device's Python 3.8+: "
                          "ssh://host/path/to/python") from e
    env = DeviceEnv.from_json(out.decode().strip().splitlines()[-1])
    log.info("target %s: %s (%s)%s", device, env.cpu, env.machine, ", emulated" if env.emulated else "")
    return Target(str(device) + (device.python if device.python != ssh.DEFAULT_PYTHON else ""),
                  env.machine.lower(), env.cpu_flags, device, env, timeout)


def _remove(device: ssh.Target, remote: str) -> None:
    try:
        ssh.run(device, f"rm -rf {ssh.quote(remote)}", 60)
    except EdgeKDError as e:
        log.warning("could not remove %s on %s: %s", remote, device, e)


def remote_logits(target: Target, folder: str, model_file: str, fmt: str, images: np.ndarray,
                  static_batch: Optional[int] = None) -> np.ndarray:
    """The model file's logits on ``images``, computed on the target device by the device runner."""
    device, timeout, q = target.device, target.timeout, ssh.quote
    if device is None:
        raise ValueError("remote_logits needs an ssh:// target")
    stage = tempfile.mkdtemp(prefix="edgekd-gate-")
    remote = None
    try:
        for name in os.listdir(folder):  # the staging bundle: model files only
            shutil.copy(os.path.join(folder, name), stage)
        write_runner(os.path.join(stage, "device_runner.py"))
        np.save(os.path.join(stage, "images.npy"), np.ascontiguousarray(images, dtype=np.float32))
        with open(os.path.join(stage, "gate.json"), "w") as f:
            json.dump({"model": model_file, "format": fmt, "precision": "f32", "images": "images.npy",
                       "out": "logits.npy", "static_batch": static_batch}, f)
        remote = ssh.run(device, "mktemp -d /tmp/edgekd-gate-XXXXXX", timeout).decode().strip()
        ssh.copy_to(device, [os.path.join(stage, n) for n in sorted(os.listdir(stage))], remote, timeout)
        try:
            ssh.run(device, f"cd {q(remote)} && {q(device.python)} device_runner.py logits gate.json", timeout)
        except EdgeKDError as e:
            raise EdgeKDError(f"the parity gate on {device} failed: {e}") from e
        return np.load(io.BytesIO(ssh.run(device, f"cat {q(remote + '/logits.npy')}", timeout)))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if remote:
            _remove(device, remote)


def where(target: Target) -> RanOn:
    """The manifest's ``validation.ran_on``: where the parity gate (and INT8 check) ran."""
    if target.device is None:
        return RanOn("this machine", platform.machine())
    env = target.environment
    if env is None:
        return RanOn(target.name, None, remote=True)
    return RanOn(target.name, env.machine, env.cpu, env.versions, env.emulated, remote=True)
