"""The edgekd command line: one subcommand per pipeline stage; heavy imports happen inside run()."""

import argparse
import os
import sys

from . import EdgeKDError, Interrupted, __version__

DEFAULT_OUT = os.path.join("runs", "default")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: what is wrong, and where the full usage is."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Command:
    """A subcommand: declares its arguments, imports its heavy code only in run()."""

    name = help = description = ""

    def add_arguments(self, p):
        raise NotImplementedError

    def run(self, args):
        raise NotImplementedError


def _add_data_args(p, default="digits"):
    p.add_argument("--data", default=default, metavar="SPEC",
                   help="digits (scikit-learn, embedded), a folder PATH or imagefolder:PATH with train/ and "
                        "test/ (or val/), cifar10 or cifar100 (default: %(default)s)")
    p.add_argument("--data-root", metavar="DIR",
                   help="where cifar10/cifar100 live or are downloaded to (an ImageFolder copy is read in place)")


def _add_training_args(p):
    g = p.add_argument_group("training (the seed article used --lr 0.01 --batch-size 128 --schedule constant)")
    g.add_argument("--epochs", type=_positive_int, default=15, help="epochs of training (default: %(default)s)")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="leave unreadable image files out (counted in metrics.json) instead of stopping at the first")
    g.add_argument("--batch-size", type=_positive_int, default=64, help="images per step (default: %(default)s)")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                   help="sgd (with momentum) or adamw (try --lr 0.002 --weight-decay 0.05) (default: %(default)s)")
    g.add_argument("--lr", type=_positive_float, default=0.05, help="peak learning rate (default: %(default)s)")
    g.add_argument("--schedule", choices=["cosine", "step", "constant"], default="cosine",
                   help="learning-rate schedule after warm-up, per step: cosine to zero, step (x0.1 at 50%% and "
                        "75%% of training) or constant (default: %(default)s; the article used constant)")
    g.add_argument("--warmup-epochs", type=float, default=1.0,
                   help="linear learning-rate warm-up, in epochs (0 for none) (default: %(default)s)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (default: %(default)s)")
    g.add_argument("--label-smoothing", type=float, default=0.0,
                   help="label smoothing of the hard-label term, 0..1 (default: %(default)s)")
    g.add_argument("--augment", choices=["auto", "none", "standard"], default="auto",
                   help="standard: random crop with 4-pixel padding + horizontal flip; auto: standard for photos, "
                        "none for digits (default: %(default)s)")
    g.add_argument("--aug-seed", type=int, default=0,
                   help="seed of the augmentation parameters per (image, epoch); runs with the same seed see the "
                        "same views and share a teacher cache (default: %(default)s)")
    g.add_argument("--train-subset", type=_positive_int, default=None, metavar="N",
                   help="train on N images of the train split, class-stratified, fixed choice (default: all)")
    g.add_argument("--norm", default="auto", metavar="STATS",
                   help="input normalisation: train (mean/std of the train split), seed (0.5/0.5), MEAN/STD "
                        "(e.g. 0.49,0.48,0.45/0.25,0.24,0.26), auto: train except digits (default: %(default)s)")
    g.add_argument("--bn-recalibrate", choices=["auto", "always", "never"], default="auto",
                   help="after training, compare eval-mode with batch-statistics accuracy on training images and "
                        "re-estimate batch-norm statistics when they disagree (auto), always, or never "
                        "(default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="random seed for weights and shuffling (default: %(default)s)")
    g.add_argument("--workers", type=int, default=2,
                   help="worker processes that decode folder images (once, into memory) (default: %(default)s)")
    g.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is often faster on a busy machine)")
    g.add_argument("--device", default="cpu",
                   help="torch device to train on: cpu or cuda; under torchrun each process takes cuda:LOCAL_RANK "
                        "(default: %(default)s)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    s = p.add_argument_group("GPU speed and several processes",
                             "Run under torchrun (torchrun --nproc_per_node N -m edgekd ...) to train in N processes: "
                             "--batch-size is the global batch, split evenly over them, and --lr applies as written "
                             "(README, Scaling).")
    s.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="mixed precision on CUDA: bf16 where the GPU supports it, else fp16 with a gradient scaler "
                        "(auto); off for float32. CPU runs are float32 (default: %(default)s)")
    s.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                   help="NHWC memory layout for convolutions (auto: on for CUDA, off for CPU) (default: %(default)s)")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the student (first steps are slow while it compiles; default: off)")


MAX_EPOCHS, MAX_BATCH, MAX_LR = 10_000, 65_536, 10.0  # beyond these a value is a typo, not a plan


def _check_training_args(args):
    """Ranges argparse cannot express; CPU threads set here, before any torch work."""
    if not 0.0 <= args.label_smoothing < 1.0:
        raise EdgeKDError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.warmup_epochs < 0 or args.warmup_epochs > args.epochs:
        raise EdgeKDError(f"--warmup-epochs must be between 0 and --epochs ({args.epochs}), got {args.warmup_epochs}")
    if args.norm not in ("auto", "train", "seed") and "/" not in args.norm:
        raise EdgeKDError(f"--norm {args.norm!r}: use auto, train, seed or MEAN/STD such as 0.49,0.48,0.45/0.25,0.24,0.26")
    if not args.out:
        raise EdgeKDError("--out DIR is required (or --resume DIR to continue a run)")
    for option, value, limit in (("--epochs", args.epochs, MAX_EPOCHS), ("--batch-size", args.batch_size, MAX_BATCH),
                                 ("--lr", args.lr, MAX_LR)):
        if value > limit:
            raise EdgeKDError(f"{option} {value} is beyond any sensible run (at most {limit:,})")
    _check_distributed(args)
    if _rank() == 0:  # only rank 0 writes into --out (the others would find rank 0's first files)
        _check_out(args.out, args.force)
    _check_device(args.device)
    if args.amp in ("bf16", "fp16") and not args.device.startswith("cuda"):
        raise EdgeKDError(f"--amp {args.amp} needs --device cuda; CPU training is float32 (use --amp auto or off)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _rank():
    from .distributed import env_rank

    return env_rank()


def _check_distributed(args):
    """Under torchrun (WORLD_SIZE > 1) the global batch must split evenly over the processes."""
    from .distributed import env_local_rank, env_world_size

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


def _add_common(p, out_default=None, resumable=False):
    p.add_argument("--out", default=out_default, required=out_default is None and not resumable, metavar="DIR",
                   help="output folder" + (f" (default: {out_default})" if out_default else ""))
    if resumable:
        p.add_argument("--resume", metavar="DIR",
                       help="continue an interrupted run in DIR from its last complete epoch, with the options "
                            "saved in DIR/config.yaml")
    p.add_argument("--force", action="store_true", help="write into --out even if it already holds files")
    p.add_argument("--config", metavar="FILE",
                   help="YAML file of option values (keys as in the saved config.yaml); the command line wins")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _nonnegative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of 0 or more, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of 0 or more, got {text!r}")
    return value


def _check_out(out, force):
    """Refuse to mix a new run into a folder that already holds one (unless --force), or one we cannot write."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise EdgeKDError(f"output path {out!r} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise EdgeKDError(f"output folder {out!r} is not empty; pass --force to overwrite it or choose another --out")
    existing = out
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing.rstrip(os.sep)) or "."
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EdgeKDError(f"output folder {out!r} is not writable ({existing!r} does not allow it); choose another --out")


def _check_device(device):
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise EdgeKDError(f"unknown device {device!r}: choose from cpu, cuda, cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise EdgeKDError(f"device {device!r} requested but no CUDA GPU is available here; use --device cpu")


MODEL_HELP = ("seed-teacher, seed-student, compact-student, a CIFAR ResNet (resnet8, resnet14, resnet20, resnet32, "
              "resnet44, resnet56, resnet110, resnet8x4, resnet32x4) or torchvision:NAME (small-input stem chosen "
              "automatically at <=64 px; torchvision:NAME:small-stem or :imagenet-stem to force)")


def _config_of(args):
    skip = {"command", "config", "force", "debug", "func"}
    return {k: v for k, v in vars(args).items() if k not in skip}


class Train(Command):
    name = "train"
    help = "supervised training of one model (a teacher, or a baseline student)"
    description = "Train a model on labelled data with cross-entropy. Writes DIR/model.pt, DIR/metrics.json, DIR/config.yaml."

    def add_arguments(self, p):
        p.add_argument("--model", default="seed-teacher", metavar="SPEC", help=MODEL_HELP + " (default: %(default)s)")
        _add_data_args(p)
        _add_training_args(p)
        _add_common(p, resumable=True)

    def run(self, args):
        from .distill import run_train

        _check_training_args(args)
        m = run_train(_config_of(args))
        if _rank() != 0:
            return
        print(f"{m['model']}: test top-1 {m['test_top1']:.4f} after {m['epochs']} epochs -> {args.out}/model.pt")


class Distill(Command):
    name = "distill"
    help = "train a compact student against a teacher (knowledge distillation)"
    description = ("Distill a student from a teacher. With no --teacher checkpoint the teacher is trained first on "
                   "the same data. With no arguments at all: digits, seed-teacher -> compact-student, into "
                   f"{DEFAULT_OUT}. Writes DIR/student.pt, DIR/teacher.pt (if trained), DIR/metrics.json, DIR/config.yaml.")

    def add_arguments(self, p):
        p.add_argument("--teacher", default="seed-teacher", metavar="SPEC",
                       help="a teacher checkpoint (.pt), or a model spec to train first (default: %(default)s)")
        p.add_argument("--student", default="compact-student", metavar="SPEC",
                       help=MODEL_HELP + " (default: %(default)s)")
        p.add_argument("--teacher-epochs", type=_positive_int, default=None,
                       help="epochs for a teacher trained here (default: --epochs)")
        # Listed here without importing torch (the registry in edgekd.losses is the authority).
        p.add_argument("--loss", default="kd", metavar="NAME",
                       help="distillation loss (default: %(default)s): kd (Hinton: alpha*T^2*KL + (1-alpha)*CE), "
                            "dkd (Decoupled KD: CE + alpha*TCKD + beta*NCKD), fitnet (FitNets hint on a middle "
                            "layer through a learned adapter), seed (the seed article's CE + 0.5*soft CE at T=0.5), "
                            "mse (logit matching)")
        p.add_argument("--temperature", "-T", type=_positive_float, default=None,
                       help="softmax temperature (default: the loss's own, kd 4, dkd 4, seed 0.5)")
        p.add_argument("--alpha", type=float, default=None,
                       help="weight of the teacher term (default: the loss's own: kd 0.9, seed 0.5, mse 0.9; "
                            "dkd: TCKD weight 1; fitnet: weight of an added logit KD term, 0)")
        p.add_argument("--beta", type=float, default=None,
                       help="dkd: NCKD weight (default 8); fitnet: hint weight (default 100)")
        p.add_argument("--dkd-warmup", type=float, default=None,
                       help="dkd: epochs over which the distillation terms ramp in linearly (default: 20, the paper's)")
        p.add_argument("--student-layer", default=None, metavar="NAME",
                       help="fitnet: the student's hinted layer, a module name (default: auto, the middle stage)")
        p.add_argument("--teacher-layer", default=None, metavar="NAME",
                       help="fitnet: the teacher's hint layer, a module name (default: auto, the middle stage)")
        p.add_argument("--teacher-cache", default=None, metavar="DIR",
                       help="compute the teacher's logits once per (image, epoch) view into DIR (keyed by the "
                            "teacher checkpoint's sha256, the augmentation seed and the data) and replay them, "
                            "instead of running the teacher every step (logit losses; default: off)")
        _add_data_args(p)
        _add_training_args(p)
        _add_common(p, out_default=DEFAULT_OUT, resumable=True)

    def run(self, args):
        from .distill import run_distill
        from .losses import LOSSES

        LOSSES.get(args.loss)
        if args.alpha is not None and not 0.0 <= args.alpha <= 1.0 and args.loss != "dkd":
            raise EdgeKDError(f"--alpha must be between 0 and 1, got {args.alpha}")
        if args.beta is not None and args.beta < 0:
            raise EdgeKDError(f"--beta must be 0 or more, got {args.beta}")
        _check_training_args(args)
        m = run_distill(_config_of(args))
        if _rank() != 0:
            return
        t = m["teacher"]
        print(f"teacher {t['model']}: test top-1 {t['test_top1']:.4f}, {t['params']:,} params")
        print(f"student {m['model']}: test top-1 {m['test_top1']:.4f}, {m['params']:,} params "
              f"({m['loss']} loss, {m['epochs']} epochs) -> {args.out}/student.pt")


class Export(Command):
    name = "export"
    help = "convert a checkpoint to a deployable bundle and check it against PyTorch"
    description = ("Export a checkpoint to ONNX or OpenVINO IR at fp32, fp16 or int8, validate it on real held-out "
                   "test images against the PyTorch model (the parity gate), and write a bundle folder DIR with "
                   "manifest.json (and DIR.zip with --zip). INT8 is calibrated on class-stratified train images and "
                   "must stay within --max-drop points of FP32 top-1; when it does not, the most sensitive layers "
                   "are kept in float. A failed check leaves no bundle. See docs/export.md.")

    def add_arguments(self, p):
        p.add_argument("checkpoint", metavar="CHECKPOINT", help="a .pt checkpoint written by edgekd train/distill")
        p.add_argument("--format", required=True, metavar="FORMAT", help="bundle format: onnx or openvino")
        p.add_argument("--precision", default="fp32", metavar="P",
                       help="fp32, fp16 (weights halved; inputs and outputs stay float32) or int8 (default: %(default)s)")
        p.add_argument("--val-size", type=_positive_int, default=1000,
                       help="held-out test images for the parity gate (default: %(default)s)")
        p.add_argument("--atol", type=_positive_float, default=None,
                       help="largest allowed |logit difference| from PyTorch (default: 1e-4 for fp32, 5e-2 for fp16)")
        p.add_argument("--opset", type=_positive_int, default=None, help="ONNX opset (default: the exporter's)")
        g = p.add_argument_group("int8")
        g.add_argument("--quant", choices=["static", "dynamic"], default=None,
                       help="static (calibrated, the default) or dynamic (ONNX only; slow for conv nets)")
        g.add_argument("--calib-data", metavar="SPEC", default=None,
                       help="data whose train split calibrates INT8 (default: the checkpoint's data)")
        g.add_argument("--calib-size", type=_positive_int, default=300,
                       help="calibration images, class-stratified (default: %(default)s)")
        g.add_argument("--calib-method", default=None, metavar="M",
                       help="ONNX: minmax (default), entropy or percentile; OpenVINO: nncf (its own statistics)")
        g.add_argument("--seed", type=int, default=0, help="seed of the calibration sample (default: %(default)s)")
        g.add_argument("--max-drop", type=float, default=1.0,
                       help="fail INT8 when its top-1 is more than P points below FP32 (default: %(default)s)")
        g.add_argument("--max-fallback-layers", type=_non_negative_int, default=10,
                       help="most layers kept in float to meet --max-drop; 0 turns the fallback off (default: %(default)s)")
        g.add_argument("--int8-types", default=None, metavar="T",
                       help="ONNX: auto (by CPU features: u8s8 with VNNI, u8u8 without, s8s8 on ARM), u8s8, u8u8, s8s8")
        g.add_argument("--reduce-range", action="store_true", help="ONNX: 7-bit weights (for CPUs without VNNI)")
        g.add_argument("--per-tensor", dest="per_channel", action="store_false",
                       help="ONNX: one weight scale per tensor instead of per output channel")
        g.add_argument("--no-speed-check", dest="speed_check", action="store_false",
                       help="skip the short FP32-vs-INT8 timing on this machine")
        p.add_argument("--zip", action="store_true", help="also pack the bundle into DIR.zip")
        p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
        _add_data_args(p, default=None)
        p.set_defaults(data=None)
        _add_common(p)

    def run(self, args):
        from .export.pipeline import ExportOptions, export_checkpoint

        _check_out(args.out, args.force)
        _log_to_stderr()
        opts = ExportOptions(
            fmt=args.format, precision=args.precision, out=args.out, data=args.data, data_root=args.data_root,
            val_size=args.val_size, atol=args.atol, opset=args.opset, quant=args.quant, calib_data=args.calib_data,
            calib_size=args.calib_size, calib_method=args.calib_method, seed=args.seed, max_drop=args.max_drop,
            max_fallback_layers=args.max_fallback_layers, int8_types=args.int8_types, reduce_range=args.reduce_range,
            per_channel=args.per_channel, zip=args.zip, speed_check=args.speed_check, progress=args.progress)
        m = export_checkpoint(args.checkpoint, opts)
        v = m["validation"]
        print(f"{m['format']} {m['precision']} bundle -> {args.out}{' (+ ' + args.out.rstrip('/') + '.zip)' if args.zip else ''}"
              f": {m['size_bytes'] / 1e6:.3f} MB, exported in {m['export_seconds']:.1f} s")
        print(f"parity on {v['images']} test images: max |diff| {v['max_abs_diff']:.2e}, top-1 agreement "
              f"{v['top1_agreement']:.4f}, top-1 {v['top1']:.4f} (PyTorch {v['reference_top1']:.4f}, "
              f"drop {v['drop']:+.2f} points)")
        if m.get("fallback", {}).get("layers_in_float"):
            f = m["fallback"]
            print(f"kept in float: {', '.join(f['layers_in_float'])} (drop {f['drop_before']:.2f} -> {f['drop_after']:.2f})")
        for warning in m.get("warnings", []):
            print(f"warning: {warning}")


def _non_negative_int(text):
    if text.strip() == "0":
        return 0
    return _positive_int(text)


def _log_to_stderr():
    """Show the library's INFO lines (export time, size, warnings) on stderr, as one plain line each."""
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("edgekd")
    if not logger.handlers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _csv_list(kind, convert=str):
    """An argparse type for comma lists: ``1,8,32`` -> [1, 8, 32]."""

    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            values = [convert(t) for t in items]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind}, got {text!r}")
        return list(dict.fromkeys(values))

    return parse


# Full and --quick values of the timing options (None on the command line means "not given").
BENCH_DEFAULTS = {"warmup": 20, "runs": 200, "rounds": 5, "max_time": 30.0, "min_time": 2.0}
BENCH_QUICK = {"warmup": 5, "runs": 30, "rounds": 3, "max_time": 5.0, "min_time": 0.2, "limit": 1000}


class Bench(Command):
    name = "bench"
    help = "measure latency and accuracy of checkpoints and bundles, teacher first"
    description = ("Benchmark every MODEL (checkpoints run in PyTorch, ONNX bundles in ONNX Runtime, OpenVINO bundles "
                   "in OpenVINO; --backends runs them through several), each backend in its own worker process, on "
                   "the same held-out images, timed in interleaved rounds. The first model is the reference (the "
                   "teacher). Writes DIR/results.json, results.csv, report.md, accuracy_vs_latency.png and "
                   "latency.png, and prints the table.")

    def add_arguments(self, p):
        p.add_argument("models", nargs="+", metavar="MODEL", help="checkpoints (.pt) and bundle folders; teacher first")
        p.add_argument("--device", default=["cpu"], type=_csv_list("devices"), metavar="DEV[,DEV...]",
                       help="cpu, cuda, cuda:N, openvino:CPU, openvino:GPU, openvino:NPU, openvino:AUTO, or an edge "
                            "device over SSH, ssh://[user@]host[:port][/python][?device=NPU], where the bundles run "
                            "with the device's own runtime (see docs/devices.md); a device or backend that is not "
                            "available becomes a row with the reason (default: cpu)")
        p.add_argument("--ssh-config", metavar="FILE", help="an ssh_config file for ssh:// devices (default: ~/.ssh/config)")
        p.add_argument("--timeout", type=_positive_int, default=600,
                       help="seconds to wait for an ssh:// device at each step (default: %(default)s)")
        p.add_argument("--backends", type=_csv_list("backends"), default=None, metavar="B[,B...]",
                       help="torch, onnxruntime, openvino: run each model in every listed backend that can read it "
                            "(a checkpoint through ONNX Runtime/OpenVINO is exported to ONNX first) "
                            "(default: each model in its own format's runtime)")
        p.add_argument("--batch-sizes", type=_csv_list("positive whole numbers", _positive_int), default=[1],
                       metavar="N[,N...]", help="batch sizes to time, e.g. 1,8,32 (default: 1)")
        p.add_argument("--warmup", type=_positive_int, default=None,
                       help=f"untimed calls before timing each batch size (default: {BENCH_DEFAULTS['warmup']}; "
                            f"--quick {BENCH_QUICK['warmup']})")
        p.add_argument("--runs", type=_positive_int, default=None,
                       help=f"timed calls per model and batch size, each on different test images (default: "
                            f"{BENCH_DEFAULTS['runs']}; --quick {BENCH_QUICK['runs']})")
        p.add_argument("--rounds", type=_positive_int, default=None,
                       help=f"interleaved rounds the runs are split into, visiting the models in turn (default: "
                            f"{BENCH_DEFAULTS['rounds']}; --quick {BENCH_QUICK['rounds']})")
        p.add_argument("--max-time", type=_positive_float, default=None, metavar="S",
                       help=f"at most S seconds of timed calls per model and batch size (default: "
                            f"{BENCH_DEFAULTS['max_time']:g}; --quick {BENCH_QUICK['max_time']:g})")
        p.add_argument("--min-time", type=_nonnegative_float, default=None, metavar="S",
                       help=f"at least S seconds of timed calls per model and batch size: a model faster than "
                            f"S/--runs per call gets more calls, so its percentiles rest on more than a few "
                            f"milliseconds of the machine's state; 0 for exactly --runs calls (default: {BENCH_DEFAULTS['min_time']:g}; "
                            f"--quick {BENCH_QUICK['min_time']:g})")
        p.add_argument("--remeasure-slow", type=_nonnegative_float, default=15.0, metavar="PCT",
                       help="measure a visit again when the machine ran slow during it. Shared VMs have slow spells "
                            "of seconds that slow every model alike. A visit counts when its median and the slower "
                            "of two short untimed checks (just before and after it) are each within PCT%% of the "
                            "fastest among the same row's visits; the others are repeated in extra rounds (at most "
                            "twice --rounds). Every visit stays in results.json. 0 keeps every visit "
                            "(default: %(default)g)")
        p.add_argument("--threads", type=_positive_int, default=None,
                       help="threads for every backend: torch threads, ONNX Runtime intra-op threads, OpenVINO "
                            "INFERENCE_NUM_THREADS (default: each library's own choice, or the number of --cpus)")
        p.add_argument("--cpus", default=None, metavar="LIST",
                       help="pin every worker to these CPUs, e.g. 0 or 0,1 or 0-3 (an edge profile: a smaller CPU)")
        p.add_argument("--limit", type=_positive_int, default=None,
                       help="accuracy on N test images spread over the split (default: the whole test split; "
                            f"--quick {BENCH_QUICK['limit']})")
        p.add_argument("--max-drop", type=float, default=1.0, metavar="PTS",
                       help="the best deployment is the fastest row within PTS top-1 points of the teacher "
                            "(default: %(default)s)")
        p.add_argument("--compare", metavar="OLD", default=None,
                       help="an earlier results.json (or its folder): print what got faster, slower, more or less "
                            "accurate; also written to DIR/compare.md")
        p.add_argument("--compare-tolerance", type=_positive_float, default=10.0, metavar="PCT",
                       help="p50 changes within this percentage count as unchanged (default: %(default)s)")
        p.add_argument("--quick", action="store_true",
                       help="a short run: fewer warm-up and timed calls, accuracy on at most 1000 images")
        p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
        _add_data_args(p, default=None)
        p.set_defaults(data=None)
        _add_common(p)

    def run(self, args):
        from .bench.run import run_bench

        _check_out(args.out, args.force)
        preset = BENCH_QUICK if args.quick else BENCH_DEFAULTS
        timing = {k: getattr(args, k) if getattr(args, k) is not None else preset[k] for k in BENCH_DEFAULTS}
        limit = args.limit if args.limit is not None else preset.get("limit")
        result = run_bench(args.models, args.out, devices=args.device, data=args.data, data_root=args.data_root,
                           backends=args.backends, batch_sizes=args.batch_sizes, threads=args.threads,
                           cpus=args.cpus, limit=limit, max_drop=args.max_drop / 100, progress=args.progress,
                           remeasure_slow=args.remeasure_slow / 100,
                           compare=args.compare, compare_tolerance=args.compare_tolerance / 100,
                           ssh_config=args.ssh_config, ssh_timeout=args.timeout, **timing)
        print(result["table"])
        if result["comparison"]:
            print("\n" + result["comparison"])
        print(f"\nwrote {args.out}/results.json, results.csv, report.md, accuracy_vs_latency.png, latency.png")


class Predict(Command):
    name = "predict"
    help = "classify image files with a bundle (no PyTorch needed)"
    description = ("Run a bundle (folder or .zip) on image files with only numpy, Pillow and the bundle's runtime "
                   "(onnxruntime or openvino): verify its checksums, preprocess as training did, print labels and scores.")

    def add_arguments(self, p):
        p.add_argument("bundle", metavar="BUNDLE", help="a bundle folder or .zip written by edgekd export")
        p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
        p.add_argument("--top-k", type=_positive_int, default=1, help="classes to show per image (default: %(default)s)")
        p.add_argument("--json", action="store_true", help="print JSON instead of text")
        p.add_argument("--threads", type=_positive_int, default=None, help="runtime threads (default: the library's)")
        p.add_argument("--device", default="cpu",
                       help="cpu (default), cuda for ONNX Runtime with CUDA, or an OpenVINO device name such as GPU")

    def run(self, args):
        import json

        from .runtime import load_bundle

        bundle = load_bundle(args.bundle, threads=args.threads, device=args.device)
        results = bundle.predict_files(args.images, top_k=min(args.top_k, len(bundle.classes)))
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            for r in results:
                print(r["image"] + ": " + ", ".join(f"{p['label']} {p['score']:.4f}" for p in r["top"]))


class Deploy(Command):
    name = "deploy"
    help = "install a bundle on an edge device over SSH (checksummed, atomic)"
    description = ("Copy a bundle to a device over SSH with your own ssh config and keys (never a password), verify "
                   "its sha256 sums there with the device's Python, and move it into place atomically. The device "
                   "needs Python 3.8+, numpy, Pillow and the bundle's runtime (onnxruntime or openvino); no torch.")

    def add_arguments(self, p):
        p.add_argument("bundle", metavar="BUNDLE", help="a bundle folder written by edgekd export")
        p.add_argument("device", metavar="DEVICE",
                       help="ssh://[user@]host[:port][:DIR]; DIR defaults to ~/edgekd-bundles on the device")
        p.add_argument("--ssh-config", metavar="FILE", help="an ssh_config file (default: ~/.ssh/config)")
        p.add_argument("--timeout", type=_positive_int, default=600,
                       help="seconds to wait for the device at each step (default: %(default)s)")

    def run(self, args):
        from .deploy import RUNNER_NAME, deploy

        target, dest, env = deploy(args.bundle, args.device, args.ssh_config, args.timeout)
        folder = dest.rsplit("/", 1)[0]
        print(f"installed {args.bundle} on {target} at {dest} ({env['cpu']}, Python {env['python']}, "
              + ", ".join(f"{k} {v}" for k, v in sorted(env["versions"].items())) + ")")
        print(f"run it there: {target.python} {folder}/{RUNNER_NAME} predict {dest} IMAGE...")

# --- int8: quantization-aware distillation (edgekd quantize); self-contained for the config port ---
class Quantize(Command):
    name = "quantize"
    help = "quantization-aware distillation: fine-tune a student with INT8 fake quantizers against its teacher"
    description = ("Insert NNCF fake quantizers into a student checkpoint where OpenVINO and ONNX Runtime quantize it "
                   "(calibrated on train images), fine-tune it for a few epochs at a small learning rate against the "
                   "teacher with a distillation loss, and write DIR/student-qat.pt, DIR/metrics.json, DIR/config.yaml. "
                   "Export it with edgekd export DIR/student-qat.pt --precision int8 (no new calibration). "
                   "See docs/export.md (the INT8 ladder).")

    def add_arguments(self, p):
        p.add_argument("student", metavar="STUDENT", help="an FP32 student checkpoint (.pt) from edgekd distill/train")
        p.add_argument("--teacher", default=None, metavar="PATH",
                       help="teacher checkpoint (default: the one the student was distilled from, or teacher.pt beside it)")
        p.add_argument("--loss", default="kd", metavar="NAME", help="a logit distillation loss: kd, dkd, seed, mse "
                                                                    "(default: %(default)s)")
        p.add_argument("--temperature", "-T", type=_positive_float, default=None, help="softmax temperature (loss default)")
        p.add_argument("--alpha", type=float, default=None, help="weight of the teacher term (loss default)")
        p.add_argument("--beta", type=float, default=None, help="dkd: NCKD weight (loss default)")
        p.add_argument("--calib-size", type=_positive_int, default=300,
                       help="train images that set the initial quantizer ranges (default: %(default)s)")
        p.add_argument("--teacher-cache", default=None, metavar="DIR", help="replay the teacher's logits (as distill)")
        _add_data_args(p, default=None)
        _add_training_args(p)
        # QAT starts from a trained student: a short run at a small, non-warming learning rate.
        p.set_defaults(epochs=1, lr=0.001, warmup_epochs=0.0, data=None)
        _add_common(p, resumable=True)

    def run(self, args):
        from .losses import LOSSES
        from .quantize import run_quantize

        LOSSES.get(args.loss)
        _check_training_args(args)
        m = run_quantize(_config_of(args))
        q = m["qat"]
        print(f"QAT student {m['model']}: INT8 (fake-quantized) top-1 {q['int8_top1_before']:.4f} before, "
              f"{m['test_top1']:.4f} after {m['epochs']} epoch(s); FP32 {q['fp32_top1']:.4f}; "
              f"{len(q['layers_int8'])} layers INT8 -> {args.out}/student-qat.pt")
# --- end int8 ---


COMMANDS = [Train(), Distill(), Export(), Bench(), Predict(), Deploy(), Quantize()]


def build_parser():
    parser = Parser(
        prog="edgekd", description="Distill a compact vision student from a teacher, export it and benchmark it.")
    parser.add_argument("--version", action="version", version=f"edgekd {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description)
        cmd.add_arguments(p)
        p.set_defaults(func=cmd.run)
    return parser, sub


def _apply_config(parser, sub, argv, args):
    """YAML values become the subcommand's defaults; options given on the command line still win."""
    import yaml

    path = args.config
    if not os.path.isfile(path):
        raise EdgeKDError(f"config file {path!r} does not exist")
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise EdgeKDError(f"config file {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise EdgeKDError(f"config file {path!r} must hold a mapping of option: value")
    subparser = sub.choices[args.command]
    known = {a.dest for a in subparser._actions}
    ignored = {"loss_params", "command"}  # written into saved configs for the record
    unknown = sorted(set(values) - known - ignored)
    if unknown:
        raise EdgeKDError(f"config file {path!r} has unknown keys {unknown}; accepted: {', '.join(sorted(known - {'help'}))}")
    subparser.set_defaults(**{k: v for k, v in values.items() if k not in ignored})
    return parser.parse_args(argv)


# Exit codes (documented in the README's troubleshooting section).
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _os_error_line(e):
    """One line for an operating-system error: which file, and what went wrong with it."""
    import errno

    where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on the device while writing{where}; free some space (nothing partial was kept)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied for{where}: choose a writable --out folder"
    return f"{e.strerror or type(e).__name__}{where}"


def _apply_resume(parser, sub, argv, args):
    """--resume DIR: the run's saved options become the defaults, written back into DIR."""
    folder = args.resume
    config = os.path.join(folder, "config.yaml")
    if not os.path.isfile(config):
        raise EdgeKDError(f"cannot resume {folder!r}: it has no config.yaml (not an edgekd train/distill folder)")
    args.config = config
    args = _apply_config(parser, sub, argv, args)
    args.out, args.force, args.resume = folder, True, folder
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser, sub = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "resume", None):
            args = _apply_resume(parser, sub, argv, args)
        elif getattr(args, "config", None):
            args = _apply_config(parser, sub, argv, args)
        args.func(args)
    except Interrupted as e:
        if _rank() == 0:  # every rank stops at the same batch; one of them says so
            print(f"edgekd {args.command}: {e}; resume with: edgekd {args.command} --resume {args.out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except EdgeKDError as e:
        if args.debug:
            raise
        print(f"edgekd {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        if args.debug:
            raise
        print(f"edgekd {args.command}: error: {_os_error_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"edgekd {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug: say so in one line; --debug shows the traceback
        if args.debug:
            raise
        print(f"edgekd {args.command}: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(rerun with --debug for the traceback and report it)", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK
