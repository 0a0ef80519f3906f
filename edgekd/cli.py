"""The edgekd command line: one subcommand per pipeline stage; heavy imports happen inside run()."""

import argparse
import os
import sys

from . import EdgeKDError, __version__

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
    g.add_argument("--batch-size", type=_positive_int, default=64, help="images per step (default: %(default)s)")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="optimizer (default: %(default)s)")
    g.add_argument("--lr", type=_positive_float, default=0.05, help="learning rate (default: %(default)s)")
    g.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="learning-rate schedule, per step (default: %(default)s; the article used constant)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="random seed for weights and shuffling (default: %(default)s)")
    g.add_argument("--workers", type=int, default=2,
                   help="data-loading worker processes for folder data (default: %(default)s)")
    g.add_argument("--device", default="cpu", help="torch device to train on: cpu or cuda (default: %(default)s)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def _add_common(p, out_default=None):
    p.add_argument("--out", default=out_default, required=out_default is None, metavar="DIR",
                   help="output folder" + (f" (default: {out_default})" if out_default else ""))
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


def _check_out(out, force):
    """Refuse to mix a new run into a folder that already holds one, unless --force."""
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise EdgeKDError(f"output folder {out!r} is not empty; pass --force to overwrite it or choose another --out")
    if os.path.exists(out) and not os.path.isdir(out):
        raise EdgeKDError(f"output path {out!r} is a file, not a folder")


def _check_device(device):
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise EdgeKDError(f"unknown device {device!r}: choose from cpu, cuda, cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise EdgeKDError(f"device {device!r} requested but no CUDA GPU is available here; use --device cpu")


def _config_of(args):
    skip = {"command", "config", "force", "debug", "func"}
    return {k: v for k, v in vars(args).items() if k not in skip}


class Train(Command):
    name = "train"
    help = "supervised training of one model (a teacher, or a baseline student)"
    description = "Train a model on labelled data with cross-entropy. Writes DIR/model.pt, DIR/metrics.json, DIR/config.yaml."

    def add_arguments(self, p):
        p.add_argument("--model", default="seed-teacher", metavar="SPEC",
                       help="seed-teacher, seed-student, compact-student or torchvision:NAME (default: %(default)s)")
        _add_data_args(p)
        _add_training_args(p)
        _add_common(p)

    def run(self, args):
        from .distill import run_train

        _check_out(args.out, args.force)
        _check_device(args.device)
        m = run_train(_config_of(args))
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
                       help="seed-student, compact-student or torchvision:NAME (default: %(default)s)")
        p.add_argument("--teacher-epochs", type=_positive_int, default=None,
                       help="epochs for a teacher trained here (default: --epochs)")
        # Listed here without importing torch (the registry in edgekd.losses is the authority).
        p.add_argument("--loss", default="kd", metavar="NAME",
                       help="distillation loss (default: %(default)s): kd (Hinton: alpha*T^2*KL + (1-alpha)*CE), "
                            "seed (the seed article's CE + 0.5*soft CE at T=0.5), mse (logit matching)")
        p.add_argument("--temperature", "-T", type=_positive_float, default=None,
                       help="softmax temperature (default: the loss's own, kd 4, seed 0.5)")
        p.add_argument("--alpha", type=float, default=None,
                       help="weight of the teacher term, 0..1 (default: the loss's own, kd 0.9, seed 0.5, mse 0.9)")
        _add_data_args(p)
        _add_training_args(p)
        _add_common(p, out_default=DEFAULT_OUT)

    def run(self, args):
        from .distill import run_distill
        from .losses import LOSSES

        LOSSES.get(args.loss)
        if args.alpha is not None and not 0.0 <= args.alpha <= 1.0:
            raise EdgeKDError(f"--alpha must be between 0 and 1, got {args.alpha}")
        _check_out(args.out, args.force)
        _check_device(args.device)
        m = run_distill(_config_of(args))
        t = m["teacher"]
        print(f"teacher {t['model']}: test top-1 {t['test_top1']:.4f}, {t['params']:,} params")
        print(f"student {m['model']}: test top-1 {m['test_top1']:.4f}, {m['params']:,} params "
              f"({m['loss']} loss, {m['epochs']} epochs) -> {args.out}/student.pt")


class Export(Command):
    name = "export"
    help = "convert a checkpoint to a deployable bundle and check it against PyTorch"
    description = ("Export a checkpoint to ONNX, validate it on real held-out images against the PyTorch model, "
                   "and write a bundle folder DIR with manifest.json. A failed check leaves no bundle.")

    def add_arguments(self, p):
        p.add_argument("checkpoint", metavar="CHECKPOINT", help="a .pt checkpoint written by edgekd train/distill")
        p.add_argument("--format", required=True, metavar="FORMAT", help="bundle format: onnx")
        p.add_argument("--precision", default="fp32", metavar="P", help="numeric precision (default: %(default)s)")
        p.add_argument("--val-size", type=_positive_int, default=1000,
                       help="held-out test images for the parity check (default: %(default)s)")
        p.add_argument("--atol", type=_positive_float, default=None,
                       help="largest allowed |logit difference| from PyTorch (default: 1e-4 for fp32)")
        p.add_argument("--opset", type=_positive_int, default=None, help="ONNX opset (default: the exporter's)")
        _add_data_args(p, default=None)
        p.set_defaults(data=None)
        _add_common(p)

    def run(self, args):
        from .export.pipeline import export_checkpoint

        _check_out(args.out, args.force)
        manifest = export_checkpoint(args.checkpoint, fmt=args.format, precision=args.precision, out=args.out,
                                     data=args.data, data_root=args.data_root, val_size=args.val_size,
                                     atol=args.atol, opset=args.opset)
        v = manifest["validation"]
        print(f"{manifest['format']} {manifest['precision']} bundle -> {args.out}")
        print(f"parity on {v['images']} test images: max |diff| {v['max_abs_diff']:.2e}, top-1 agreement "
              f"{v['top1_agreement']:.4f}, top-1 {v['top1']:.4f} (PyTorch {v['reference_top1']:.4f})")


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
BENCH_DEFAULTS = {"warmup": 20, "runs": 200, "rounds": 5, "max_time": 30.0}
BENCH_QUICK = {"warmup": 5, "runs": 30, "rounds": 3, "max_time": 5.0, "limit": 1000}


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
                           compare=args.compare, compare_tolerance=args.compare_tolerance / 100,
                           ssh_config=args.ssh_config, ssh_timeout=args.timeout, **timing)
        print(result["table"])
        if result["comparison"]:
            print("\n" + result["comparison"])
        print(f"\nwrote {args.out}/results.json, results.csv, report.md, accuracy_vs_latency.png, latency.png")


class Predict(Command):
    name = "predict"
    help = "classify image files with a bundle (no PyTorch needed)"
    description = "Run a bundle on image files with only numpy, Pillow and the bundle's runtime; print labels and scores."

    def add_arguments(self, p):
        p.add_argument("bundle", metavar="BUNDLE", help="a bundle folder written by edgekd export")
        p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
        p.add_argument("--top-k", type=_positive_int, default=1, help="classes to show per image (default: %(default)s)")
        p.add_argument("--json", action="store_true", help="print JSON instead of text")

    def run(self, args):
        import json

        from .export.runtime import load_bundle

        bundle = load_bundle(args.bundle)
        results = bundle.predict_files(args.images, top_k=args.top_k)
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


COMMANDS = [Train(), Distill(), Export(), Bench(), Predict(), Deploy()]


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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser, sub = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "config", None):
            args = _apply_config(parser, sub, argv, args)
        args.func(args)
    except EdgeKDError as e:
        if args.debug:
            raise
        print(f"edgekd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edgekd {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
