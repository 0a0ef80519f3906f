"""The options of ``edgekd bench``, one field per option (see edgekd.core.optionspec)."""

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

from ..core.optionspec import MAX_IMAGES, MAX_THREADS, MAX_TIMEOUT, Options, opt, register


@dataclass(frozen=True)
class TimingPreset:
    """The full or --quick values of the timing options (None in the configuration means "the preset's")."""

    warmup: int
    runs: int
    rounds: int
    max_time: float
    min_time: float
    limit: Optional[int] = None   # accuracy on at most this many test images (None: the whole split)

    def to_dict(self) -> Dict[str, Any]:
        """The preset as a dict (``limit`` only when the preset sets one), as edgekd fit's settings keep it."""
        return {k: v for k, v in asdict(self).items() if v is not None}


BENCH_DEFAULTS = TimingPreset(warmup=20, runs=200, rounds=5, max_time=30.0, min_time=2.0)
BENCH_QUICK = TimingPreset(warmup=5, runs=30, rounds=3, max_time=5.0, min_time=0.2, limit=1000)
TIMING_FIELDS = ("warmup", "runs", "rounds", "max_time", "min_time")


@register("bench")
@dataclass(frozen=True, kw_only=True)
class BenchOptions(Options):
    """The options of ``edgekd bench``."""

    models: Optional[List[str]] = opt(None, "checkpoints (.pt) and bundle folders; teacher first", metavar="MODEL",
        positional=True, nargs="+")
    device: List[str] = opt(["cpu"], "cpu, cuda, cuda:N, openvino:CPU, openvino:GPU, openvino:NPU, openvino:AUTO, "
        "or an edge device over SSH, ssh://[user@]host[:port][/python][?device=NPU], where the bundles run with "
        "the device's own runtime (see docs/devices.md); a device or backend that is not available becomes a row "
        "with the reason", metavar="DEV[,DEV...]")
    ssh_config: Optional[str] = opt(None, "an ssh_config file for ssh:// devices (default: ~/.ssh/config)",
        metavar="FILE")
    timeout: int = opt(600, "seconds to wait for an ssh:// device at each step", low=1, high=MAX_TIMEOUT)
    backends: Optional[List[str]] = opt(None, "torch, onnxruntime, openvino: run each model in every listed backend "
        "that can read it (a checkpoint through ONNX Runtime/OpenVINO is exported to ONNX first) (default: each "
        "model in its own format's runtime)", metavar="B[,B...]")
    batch_sizes: List[int] = opt([1], "batch sizes to time, e.g. 1,8,32", low=1, item="int", metavar="N[,N...]")
    warmup: Optional[int] = opt(None, "untimed calls before timing each batch size (default: 20; --quick 5)", low=1,
        high=1_000_000)
    runs: Optional[int] = opt(None, "timed calls per model and batch size, each on different test images (default: "
        "200; --quick 30)", low=1, high=1_000_000)
    rounds: Optional[int] = opt(None, "interleaved rounds the runs are split into, visiting the models in turn "
        "(default: 5; --quick 3)", low=1, high=1000)
    max_time: Optional[float] = opt(None, "at most S seconds of timed calls per model and batch size (default: "
        "30.0; --quick 5.0)", low=0, low_open=True, metavar="S")
    min_time: Optional[float] = opt(None, "at least S seconds of timed calls per model and batch size: a model "
        "faster than S/--runs per call gets more calls, so its percentiles rest on more than a few milliseconds "
        "of the machine's state; 0 for exactly --runs calls (default: 2.0; --quick 0.2)", low=0, metavar="S")
    remeasure_slow: float = opt(15.0, "measure a visit again when the machine ran slow during it. Shared VMs have "
        "slow spells of seconds that slow every model alike. A visit counts when its median and the slower of two "
        "short untimed checks (just before and after it) are each within PCT%% of the fastest among the same "
        "row's visits; the others are repeated in extra rounds (at most twice --rounds). Every visit stays in "
        "results.json. 0 keeps every visit", low=0, metavar="PCT")
    threads: Optional[int] = opt(None, "threads for every backend: torch threads, ONNX Runtime intra-op threads, "
        "OpenVINO INFERENCE_NUM_THREADS (default: each library's own choice, or the number of --cpus)", low=1,
        high=MAX_THREADS)
    cpus: Optional[str] = opt(None, "pin every worker to these CPUs, e.g. 0 or 0,1 or 0-3 (an edge profile: a "
        "smaller CPU; default: all)", metavar="LIST")
    limit: Optional[int] = opt(None, "accuracy on N test images spread over the split (default: the whole test "
        "split; --quick 1000)", low=1, high=MAX_IMAGES)
    max_drop: float = opt(1.0, "the best deployment is the fastest row within PTS top-1 points of the teacher", low=0,
        metavar="PTS")
    compare: Optional[str] = opt(None, "an earlier results.json (or its folder): print what got faster, slower, "
        "more or less accurate; also written to DIR/compare.md (default: none)", metavar="OLD")
    compare_tolerance: float = opt(10.0, "p50 changes within this percentage count as unchanged", low=0, low_open=True,
        metavar="PCT")
    quick: bool = opt(False, "a short run: fewer warm-up and timed calls, accuracy on at most 1000 images")
    profile: bool = opt(False, "after timing, per-operator times of each ONNX Runtime / OpenVINO row on the CPU "
        "(its profiler / performance counters, with the precision each layer ran in) into results.json, report.md "
        "and profile.png")
    progress: bool = opt(True, "hide the progress bar", negate="--no-progress")
    data: Optional[str] = opt(None, "digits (scikit-learn, embedded), a folder PATH or imagefolder:PATH with train/ "
        "and test/ (or val/), webdataset:PATH (the same sub-folders holding .tar shards), cifar10 or cifar100 "
        "(default: the checkpoint's data)", metavar="SPEC")
    data_root: Optional[str] = opt(None, "where cifar10/cifar100 live or are downloaded to (an ImageFolder copy is "
        "read in place)", metavar="DIR")
    out: Optional[str] = opt(None, "output folder (default: none)", metavar="DIR", required=True)
    force: bool = opt(False, "replace the outputs of an earlier edgekd run in --out (never files edgekd did not "
        "write; default: refuse a non-empty --out)", yaml=False)
    config: Optional[str] = opt(None, "YAML file of option values (keys as in the saved config.yaml); the command "
        "line wins (default: none)", metavar="FILE", yaml=False)
