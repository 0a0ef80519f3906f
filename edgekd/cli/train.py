"""The commands that train (train, distill, quantize) and the one that prepares their images (prepare): their
checks of the command line and of this machine, and the run folder they write into."""

import contextlib
from typing import Any, ContextManager, List, Optional, Tuple, Union

from .. import EdgeKDError
from ..base import cpu
from ..base.files import refuse_inside
from ..base.marker import OUTPUTS
from ..base.outdir import RunFolder, refuse_inputs_inside
from ..base.progress import printable
from ..core.config import DEFAULT_OUT
from ..core.data import data_folders
from ..core.distributed import env_local_rank, env_rank, env_world_size
from ..bench.options import BenchOptions
from ..core.options import DistillOptions, PrepareOptions, QuantizeOptions, TrainOptions
from .command import Command, KeepLines

# Commands that train: their OpenMP threads spin only briefly at barriers unless the user chose otherwise
# (edgekd/base/cpu.py); bench and export keep the libraries' defaults, so latencies are measured as a deployment
# would run them.
TRAINING_COMMANDS = ("train", "distill", "quantize")
Inputs = List[Tuple[str, Optional[str]]]
Training = Union[TrainOptions, DistillOptions, QuantizeOptions]


def check_training_args(args: Training) -> None:
    """Rules of the command line and of this machine (the other rules across options are the options classes'
    ``validate``); CPU threads set here, before any torch work."""
    if args.warmup_epochs > args.epochs:  # not in TrainOptions: distill's teacher runs with --teacher-epochs
        raise EdgeKDError(f"--warmup-epochs must be between 0 and --epochs ({args.epochs}), got {args.warmup_epochs}")
    if not args.out:
        raise EdgeKDError("--out DIR is required (or --resume DIR to continue a run)")
    _check_distributed(args)
    check_device(args.device)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    elif cpu.usable_cpus() < torch.get_num_threads():  # a container's CPU quota: torch counts the host's cores
        torch.set_num_threads(cpu.usable_cpus())


def run_folder(args: Union[Training, BenchOptions], inputs: Inputs) -> ContextManager[Any]:
    """The locked, checked run folder (rank 0 only: the other ranks of a torchrun job write nothing)."""
    if env_rank() != 0:
        return contextlib.nullcontext()
    if not args.out:  # refused before this by the options and check_training_args
        raise EdgeKDError("--out DIR is required")
    # the names a training command replaces (and bench: the whole folder); fit's folders are a fit's own
    replaced = None if args.command == "bench" else set().union(*(OUTPUTS[c] for c in TRAINING_COMMANDS + ("bench",)))
    # every file a command reads is an input: the --config file too (the run writes its own config.yaml)
    refuse_inputs_inside(args.out, inputs + [("--config", args.config)], replaced)
    refuse_inside(args.out, "--out", data_folders(args))  # an output inside the data is read back as data
    return RunFolder(args.out, args.command, force=args.force, resume=bool(getattr(args, "resume", None)))


def _check_distributed(args: Training) -> None:
    """Under torchrun (WORLD_SIZE > 1) the global batch must split evenly over the processes."""
    world = env_world_size()
    if world > 1 and args.batch_size % world:
        raise EdgeKDError(f"--batch-size {args.batch_size} is the global batch and must split evenly over the {world} "
                          f"processes of this torchrun job: use a multiple of {world}")
    if world > 1 and args.device.startswith("cuda"):
        import torch

        local = env_local_rank()
        if torch.cuda.is_available() and local >= torch.cuda.device_count():
            raise EdgeKDError(f"local rank {local} has no GPU: this machine has {torch.cuda.device_count()}; "
                              "use --nproc_per_node at most that")


def check_device(device: str) -> None:
    """Refuse a training device that is not cpu, cuda or cuda:N, or CUDA where there is no GPU."""
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise EdgeKDError(f"unknown device {device!r}: choose from cpu, cuda, cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise EdgeKDError(f"device {device!r} requested but no CUDA GPU is available here; use --device cpu")


class Train(Command):
    name = "train"
    help = "supervised training of one model (a teacher, or a baseline student)"
    description = "Train a model on labelled data with cross-entropy. Writes DIR/model.pt, DIR/metrics.json, DIR/config.yaml."

    def run(self, args: TrainOptions) -> None:
        from ..core.distill import run_train  # heavy: torch

        check_training_args(args)
        inputs = [("--model", args.model), ("--data", args.data), ("--weights", args.weights),
                  ("--unlabeled", args.unlabeled)]
        with run_folder(args, inputs):
            m = run_train(args)
        if env_rank() != 0:
            return
        print(f"{m['model']}: test top-1 {m['test_top1']:.4f} after {m['epochs']} epochs -> {args.out}/model.pt")


class Distill(Command):
    name = "distill"
    help = "train a compact student against a teacher (knowledge distillation)"
    description = ("Distill a student from a teacher. With no --teacher checkpoint the teacher is trained first on "
                   "the same data. With no arguments at all: digits, seed-teacher -> compact-student, into "
                   f"{DEFAULT_OUT}. Writes DIR/student.pt, DIR/teacher.pt (if trained), DIR/metrics.json, DIR/config.yaml.")

    def add_arguments(self, p: Any) -> None:
        p.formatter_class = KeepLines  # the teacher examples keep their lines
        super().add_arguments(p)

    def run(self, args: DistillOptions) -> None:
        from ..core.distill import run_distill  # heavy: torch
        from ..core.losses import LOSSES, check_options

        LOSSES.get(args.loss)
        if args.alpha is not None and args.alpha > 1.0 and args.loss != "dkd":
            raise EdgeKDError(f"--alpha must be between 0 and 1, got {args.alpha}")
        check_options(args.loss, {"temperature": args.temperature, "alpha": args.alpha, "beta": args.beta,
                                  "warmup": args.dkd_warmup, "student_layer": args.student_layer,
                                  "teacher_layer": args.teacher_layer})
        check_training_args(args)
        inputs = [("--teacher", args.teacher), ("--student", args.student), ("--data", args.data),
                  ("--student-weights", args.student_weights), ("--teacher-weights", args.teacher_weights),
                  ("--teacher-classes", args.teacher_classes), ("--unlabeled", args.unlabeled)]
        with run_folder(args, inputs):
            m = run_distill(args)
        if env_rank() != 0:
            return
        t = m["teacher"]
        params = f", {t['params']:,} params" if t.get("params") else ""
        top1 = f"{t['test_top1']:.4f}" if t.get("test_top1") is not None else "unknown"
        print(printable(f"teacher {t['model'] or t['spec']} ({t['kind']}): test top-1 {top1}{params}"))
        print(f"student {m['model']}: test top-1 {m['test_top1']:.4f}, {m['params']:,} params "
              f"({m['loss']} loss, {m['epochs']} epochs) -> {args.out}/student.pt")


class Quantize(Command):
    name = "quantize"
    help = "quantization-aware distillation: fine-tune a student with INT8 fake quantizers against its teacher"
    description = ("Insert NNCF fake quantizers into a student checkpoint where OpenVINO and ONNX Runtime quantize it "
                   "(calibrated on train images), fine-tune it for a few epochs at a small learning rate against the "
                   "teacher with a distillation loss, and write DIR/student-qat.pt, DIR/metrics.json, DIR/config.yaml. "
                   "Export it with edgekd export DIR/student-qat.pt --precision int8 (no new calibration). "
                   "See docs/export.md (the INT8 ladder).")

    def run(self, args: QuantizeOptions) -> None:
        from ..core.losses import LOSSES
        from ..core.quantize import run_quantize  # heavy: torch, nncf

        LOSSES.get(args.loss)
        check_training_args(args)
        inputs = [("STUDENT", args.student), ("--teacher", args.teacher), ("--data", args.data)]
        with run_folder(args, inputs):
            m = run_quantize(args)
        q = m["qat"]
        print(f"QAT student {m['model']}: INT8 (fake-quantized) top-1 {q['int8_top1_before']:.4f} before, "
              f"{m['test_top1']:.4f} after {m['epochs']} epoch(s); FP32 {q['fp32_top1']:.4f}; "
              f"{len(q['layers_int8'])} layers INT8 -> {args.out}/student-qat.pt")


class Prepare(Command):
    name = "prepare"
    help = "decode a data set's training pictures once into an image store for --image-store"
    description = ("Decode every training picture of DATA once, shrunk so its longest side is at most --max-size, "
                   "into memory-mapped files with an index under --out; train and distill given --image-store "
                   "with the same folder and size then cut their crops from it with no JPEG decode. Keyed by the "
                   "files and the size, checksummed; a damaged store is refused.")

    def run(self, args: PrepareOptions) -> None:
        from ..core.image_store import run_prepare  # heavy: torch

        if not args.data or not args.out:  # PrepareOptions.validate refuses these first
            raise EdgeKDError("edgekd prepare needs DATA and --out DIR")
        record = run_prepare(args.data, args.out, args.max_size, data_root=args.data_root, unlabeled=args.unlabeled,
                             train_subset=args.train_subset, workers=args.workers, progress=args.progress)
        print(f"image store -> {record.get('path', args.out)}: " + ", ".join(
            f"{k} {v}" for k, v in record.items() if k in ("images", "max_size", "bytes", "build_seconds")))
