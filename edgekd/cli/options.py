"""The options of ``edgekd predict`` and ``edgekd deploy``, one field per option (see edgekd.core.optionspec)."""

from dataclasses import dataclass
from typing import List, Optional

from ..core.optionspec import MAX_THREADS, MAX_TIMEOUT, Options, opt, register


@register("predict")
@dataclass(frozen=True, kw_only=True)
class PredictOptions(Options):
    """The options of ``edgekd predict``."""

    bundle: Optional[str] = opt(None, "a bundle folder or .zip written by edgekd export", metavar="BUNDLE",
        positional=True)
    images: Optional[List[str]] = opt(None, "image files", metavar="IMAGE", positional=True, nargs="+")
    top_k: int = opt(1, "classes to show per image", low=1, high=100_000)
    json: bool = opt(False, "print JSON instead of text")
    threads: Optional[int] = opt(None, "runtime threads (default: the library's)", low=1, high=MAX_THREADS)
    device: str = opt("cpu", "cpu, cuda for ONNX Runtime with CUDA, or an OpenVINO device name such as GPU")


@register("deploy")
@dataclass(frozen=True, kw_only=True)
class DeployOptions(Options):
    """The options of ``edgekd deploy``."""

    bundle: Optional[str] = opt(None, "a bundle folder written by edgekd export", metavar="BUNDLE", positional=True)
    device: Optional[str] = opt(None, "ssh://[user@]host[:port][:DIR]; DIR defaults to ~/edgekd-bundles on the "
        "device", metavar="DEVICE", positional=True)
    ssh_config: Optional[str] = opt(None, "an ssh_config file (default: ~/.ssh/config)", metavar="FILE")
    timeout: int = opt(600, "seconds to wait for the device at each step", low=1, high=MAX_TIMEOUT)
    python: Optional[str] = opt(None, "the device's Python that checks and runs the bundle (default: python3)",
        metavar="PATH")
