"""The options of ``edgekd fit``, one field per option (see edgekd.core.optionspec)."""

from dataclasses import dataclass
from typing import Optional

from ..core.optionspec import MAX_IMAGES, MAX_SEED, MAX_THREADS, MAX_TIMEOUT, Options, opt, register


@register("fit")
@dataclass(frozen=True, kw_only=True)
class FitOptions(Options):
    """The options of ``edgekd fit``."""

    teacher: Optional[str] = opt(None, "the trained teacher: an edgekd checkpoint or bundle, ONNX/OpenVINO file, "
        "torchvision/timm pretrained, ... (any --teacher of edgekd distill except a model spec to train: train it "
        "first) (default: none)", metavar="SPEC")
    data: str = opt("digits", "the data: digits, a folder, imagefolder:PATH, webdataset:PATH, cifar10 or cifar100",
        metavar="SPEC")
    data_root: Optional[str] = opt(None, "where cifar10/cifar100 live (default: none)", metavar="DIR")
    device: str = opt("cpu", "where latency is measured: cpu, openvino:CPU, ssh://[user@]host[/python] (an "
        "emulated board is refused as a latency basis)")
    threads: Optional[int] = opt(None, "runtime threads on the device while timing (default: the runtime's)", low=1,
        high=MAX_THREADS)
    batch_size: int = opt(1, "the batch size the latency budget is for", low=1, high=4096)
    budget: Optional[str] = opt(None, "the budget: comma-separated KEY OP NUMBER terms over p50_ms, p90_ms, size_mb, "
        "mem_mb (<=) and top1 (>=), e.g. p50_ms<=5,size_mb<=4,top1>=0.9 (default: none)", metavar="EXPR")
    space: Optional[str] = opt(None, "a YAML file with students, input_sizes, precisions, runtimes (lists) replacing "
        "the default space's (default: from the data and the teacher)", metavar="FILE")
    trials: int = opt(20, "finished trials (complete or pruned) of the study, all workers together", low=1,
        high=100_000)
    hours: Optional[float] = opt(None, "the whole fit's time: the latency table and the trials use up to "
        "--search-share of it, and the finalists' schedule fills the rest (a --join worker: stop starting trials "
        "after H hours) (default: no limit)", low=0, low_open=True, metavar="H")
    search_share: float = opt(0.35, "with --hours: the share of the time after which no trial starts (the rest "
        "trains the finalists)", low=0, high=1, low_open=True, metavar="F")
    epochs_short: int = opt(3, "epochs of each trial's short schedule (pruned early by successive halving)", low=1,
        high=10_000)
    epochs: Optional[int] = opt(None, "epochs of the finalists' full schedule, continued from their trial's weights "
        "(default: with --hours as many as the time left allows, else 15)", low=1, high=10_000)
    trial_test_subset: int = opt(2000, "each trial is scored (and pruned) on N class-stratified test images, the "
        "same N for every trial: a ranking, cheaper than the whole split; the finalists are scored on the whole "
        "split (0: the whole split for trials too)", low=0, high=MAX_IMAGES, metavar="N")
    finalists: int = opt(2, "best feasible trials trained on the full schedule, exported and measured again", low=1,
        high=100)
    finalist_margin: float = opt(0.02, "a runner-up becomes a finalist only if its short-schedule top-1 is within M "
        "of the best trial's (0.02: 2 points); one pair that leads clearly gets the finalists' whole time", low=0,
        high=1, metavar="M")
    teacher_views: int = opt(2, "fixed augmented views per image in the shared teacher cache: the teacher runs "
        "images x views times for the whole fit", low=1, high=1000)
    train_subset: Optional[int] = opt(None, "distil on N class-stratified train images (default: all)", low=1,
        high=MAX_IMAGES)
    unlabeled: Optional[str] = opt(None, "a folder of unlabelled images for the teacher term (default: none)",
        metavar="DIR")
    teacher_input_size: Optional[str] = opt(None, "the teacher's input size, as edgekd distill (default: from the "
        "teacher)", metavar="H[,W]")
    teacher_mean: Optional[str] = opt(None, "the teacher's normalisation mean, as edgekd distill (default: from the "
        "teacher)", metavar="M")
    teacher_std: Optional[str] = opt(None, "the teacher's normalisation std, as edgekd distill (default: from the "
        "teacher)", metavar="S")
    teacher_classes: Optional[str] = opt(None, "the teacher's class mapping file, as edgekd distill (default: by "
        "name)", metavar="FILE")
    teacher_weights: Optional[str] = opt(None, "weights for a torchvision/timm/factory teacher (default: none)",
        metavar="FILE")
    train_threads: Optional[int] = opt(None, "torch threads for training (default: torch's)", low=1, high=MAX_THREADS)
    seed: int = opt(0, "seed of the sampler and of every trial", low=0, high=MAX_SEED)
    quick: bool = opt(False, "short timings (bench's --quick preset) for every latency measurement")
    storage: Optional[str] = opt(None, "the study's storage URL, e.g. postgresql+psycopg://user@host/db, so other "
        "machines can --join (default: SQLite in --out)", metavar="URL")
    join: Optional[str] = opt(None, "work on an existing fit's study: its --out DIR or its storage URL (trials only; "
        "default: none)", metavar="DIR|URL", yaml=False)
    heartbeat: int = opt(10, "seconds between a running trial's heartbeats; a trial silent for two is retried",
        low=1, high=3600)
    latency_cache: Optional[str] = opt(None, "folder of the per-device latency tables (default: "
        "~/.cache/edgekd/latency)", metavar="DIR")
    ssh_config: Optional[str] = opt(None, "an ssh_config file for ssh:// devices (default: ~/.ssh/config)",
        metavar="FILE")
    timeout: int = opt(600, "seconds to wait for an ssh:// device at each step", low=1, high=MAX_TIMEOUT)
    out: Optional[str] = opt(None, "output folder (default: none)", metavar="DIR")
    resume: Optional[str] = opt(None, "continue a killed fit in DIR (its config.yaml); no finished trial is lost or "
        "run again (default: none)", metavar="DIR")
    force: bool = opt(False, "replace the outputs of an earlier edgekd fit in --out (default: refuse a non-empty "
        "--out)", yaml=False)
    config: Optional[str] = opt(None, "YAML file of option values (keys as in the saved config.yaml); the command "
        "line wins (default: none)", metavar="FILE", yaml=False)
