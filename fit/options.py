"""``edgekd fit``'s options: one frozen dataclass, the command line made from its fields' metadata."""

from dataclasses import dataclass, field, fields
from typing import Optional

from ..core.config import MAX_SEED, MAX_THREADS, Opt, check


def _opt(default, help, kind=None, **rule):
    """A field with its command-line declaration (an Opt of edgekd/core/config.py: the same checks)."""
    return field(default=default, metadata={"opt": (kind, help, rule)})


@dataclass(frozen=True, kw_only=True)
class FitOptions:
    """The options of ``edgekd fit``."""

    teacher: Optional[str] = _opt(None, "the trained teacher: an edgekd checkpoint or bundle, ONNX/OpenVINO file, "
                                  "torchvision/timm pretrained, ... (any --teacher of edgekd distill except a model "
                                  "spec to train: train it first)", metavar="SPEC")
    data: str = _opt("digits", "the data: digits, a folder, imagefolder:PATH, cifar10 ...", metavar="SPEC")
    data_root: Optional[str] = _opt(None, "where cifar10/cifar100 live", metavar="DIR")
    device: str = _opt("cpu", "where latency is measured: cpu, openvino:CPU, ssh://[user@]host[/python] "
                       "(an emulated board is refused as a latency basis)")
    threads: Optional[int] = _opt(None, "runtime threads on the device while timing", low=1, high=MAX_THREADS)
    batch_size: int = _opt(1, "the batch size the latency budget is for", low=1, high=4096)
    budget: Optional[str] = _opt(None, "the budget: comma-separated KEY OP NUMBER terms over p50_ms, p90_ms, size_mb, "
                                 "mem_mb (<=) and top1 (>=), e.g. p50_ms<=5,size_mb<=4,top1>=0.9", metavar="EXPR")
    space: Optional[str] = _opt(None, "a YAML file with students, input_sizes, precisions, runtimes (lists) replacing "
                                "the default space's (default: from the data and the teacher)", metavar="FILE")
    trials: int = _opt(20, "finished trials (complete or pruned) of the study, all workers together", low=1,
                       high=100_000)
    hours: Optional[float] = _opt(None, "stop starting trials after H hours (default: no limit)", low=0, low_open=True,
                                  metavar="H")
    epochs_short: int = _opt(3, "epochs of each trial's short schedule (pruned early by successive halving)", low=1,
                             high=10_000)
    epochs: int = _opt(15, "epochs of the finalists' full schedule", low=1, high=10_000)
    finalists: int = _opt(2, "best feasible trials trained on the full schedule, exported and measured again", low=1,
                          high=100)
    teacher_views: int = _opt(2, "fixed augmented views per image in the shared teacher cache: the teacher runs "
                              "images x views times for the whole fit", low=1, high=1000)
    train_subset: Optional[int] = _opt(None, "distil on N class-stratified train images", low=1, high=10_000_000)
    unlabeled: Optional[str] = _opt(None, "a folder of unlabelled images for the teacher term", metavar="DIR")
    teacher_input_size: Optional[str] = _opt(None, "the teacher's input size (as edgekd distill)", metavar="H[,W]")
    teacher_mean: Optional[str] = _opt(None, "the teacher's normalisation mean (as edgekd distill)", metavar="M")
    teacher_std: Optional[str] = _opt(None, "the teacher's normalisation std (as edgekd distill)", metavar="S")
    teacher_classes: Optional[str] = _opt(None, "the teacher's class mapping file (as edgekd distill)", metavar="FILE")
    teacher_weights: Optional[str] = _opt(None, "weights for a torchvision/timm/factory teacher", metavar="FILE")
    train_threads: Optional[int] = _opt(None, "torch threads for training (default: torch's)", low=1,
                                        high=MAX_THREADS)
    seed: int = _opt(0, "seed of the sampler and of every trial", low=0, high=MAX_SEED)
    quick: bool = _opt(False, "short timings (bench's --quick preset) for every latency measurement")
    storage: Optional[str] = _opt(None, "the study's storage URL, e.g. postgresql+psycopg://user@host/db, so other "
                                  "machines can --join (default: sqlite in --out)", metavar="URL")
    join: Optional[str] = _opt(None, "work on an existing fit's study: its --out DIR or its storage URL (trials only)",
                               metavar="DIR|URL")
    resume: Optional[str] = _opt(None, "continue a killed fit in DIR (no finished trial is run again)", metavar="DIR")
    heartbeat: int = _opt(10, "seconds between a running trial's heartbeats; a trial silent for two is retried",
                          low=1, high=3600)
    latency_cache: Optional[str] = _opt(None, "folder of the per-device latency tables (default: "
                                        "~/.cache/edgekd/latency)", metavar="DIR")
    ssh_config: Optional[str] = _opt(None, "an ssh_config file for ssh:// devices", metavar="FILE")
    timeout: int = _opt(600, "seconds to wait for an ssh:// device at each step", low=1, high=7 * 24 * 3600)
    out: Optional[str] = _opt(None, "output folder", metavar="DIR")
    force: bool = _opt(False, "replace an earlier edgekd fit's outputs in --out")

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                object.__setattr__(self, f.name, check(_as_opt(f), value))


def _as_opt(f) -> Opt:
    kind, help, rule = f.metadata["opt"]
    types = {int: "int", float: "float", bool: "bool"}
    base = f.type if isinstance(f.type, type) else None
    if kind is None:
        text = str(f.type)
        kind = next((v for k, v in types.items() if base is k or k.__name__ in text), "str")
    return Opt(f.name, kind, f.default, help, **rule)


def add_arguments(parser) -> None:
    """The command line of ``edgekd fit`` (every value arrives as text; FitOptions converts and checks it)."""
    for f in fields(FitOptions):
        opt = _as_opt(f)
        if opt.kind == "bool":
            parser.add_argument(opt.flag, dest=opt.name, action="store_const", const=True, default=None, help=opt.help)
        else:
            default = "" if opt.default is None else f" (default: {opt.default})"
            parser.add_argument(opt.flag, dest=opt.name, default=None, metavar=opt.metavar,
                                help=opt.help + ("" if "default" in opt.help else default))


def from_namespace(ns) -> FitOptions:
    given = {f.name: getattr(ns, f.name) for f in fields(FitOptions) if getattr(ns, f.name, None) is not None}
    return FitOptions(**given)
