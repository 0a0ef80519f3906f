"""The edgekd command line: one subcommand per pipeline stage; heavy imports happen inside run()."""

import argparse
import sys

from .. import EdgeKDError, Interrupted, __version__
from ..core import config
from ..core.config import DEFAULT_OUT
# Importing a command's options class registers it (edgekd.core.optionspec.register) for add_options and resolve.
from ..bench.options import BenchOptions  # noqa: F401
from ..export.options import ExportOptions  # noqa: F401
from .options import DeployOptions, PredictOptions  # noqa: F401
from ..fit.options import FitOptions  # noqa: F401


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: what is wrong, and where the full usage is."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Command:
    """A subcommand: declares its arguments, imports its heavy code only in run()."""

    name = help = description = ""

    def add_arguments(self, p):
        config.add_options(p, self.name)  # from the command's options class (edgekd/core/config.py)

    def run(self, args):
        raise NotImplementedError


def _check_training_args(args):
    """Rules of the command line and of this machine (the other rules across options are the options classes'
    ``validate``); CPU threads set here, before any torch work."""
    from ..base import cpu

    if args.warmup_epochs > args.epochs:  # not in TrainOptions: distill's teacher runs with --teacher-epochs
        raise EdgeKDError(f"--warmup-epochs must be between 0 and --epochs ({args.epochs}), got {args.warmup_epochs}")
    if not args.out:
        raise EdgeKDError("--out DIR is required (or --resume DIR to continue a run)")
    _check_distributed(args)
    _check_device(args.device)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    elif cpu.usable_cpus() < torch.get_num_threads():  # a container's CPU quota: torch counts the host's cores
        torch.set_num_threads(cpu.usable_cpus())


def _run_folder(args, inputs):
    """The locked, checked run folder (rank 0 only: the other ranks of a torchrun job write nothing)."""
    import contextlib

    from ..base.files import refuse_inside
    from ..base.outdir import OUTPUTS, RunFolder, refuse_inputs_inside
    from ..core.data import data_folders

    if _rank() != 0:
        return contextlib.nullcontext()
    replaced = None if args.command == "bench" else set().union(*OUTPUTS.values())
    # every file a command reads is an input: the --config file too (the run writes its own config.yaml)
    refuse_inputs_inside(args.out, inputs + [("--config", args.config)], replaced)
    refuse_inside(args.out, "--out", data_folders(args))  # an output inside the data is read back as data
    return RunFolder(args.out, args.command, force=args.force, resume=bool(getattr(args, "resume", None)))


def _rank():
    from ..core.distributed import env_rank

    return env_rank()


def _check_distributed(args):
    """Under torchrun (WORLD_SIZE > 1) the global batch must split evenly over the processes."""
    from ..core.distributed import env_local_rank, env_world_size

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


def _number(text, convert, ok, what):
    """An argparse type's body: ``text`` converted, or ArgumentTypeError naming what is accepted (NaN and
    infinity fail ``ok``). The option tables of edgekd/config.py check every command's own options;
    these serve the scripts of tools/."""
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text):
    """An argparse type: a whole number of at least 1."""
    return _number(text, int, lambda v: v >= 1, "a positive whole number")


def positive_float(text):
    """An argparse type: a finite number above 0."""
    return _number(text, float, lambda v: 0 < v < float("inf"), "a positive number")


def _nonnegative_float(text):
    return _number(text, float, lambda v: 0 <= v < float("inf"), "a number of 0 or more")


def _check_out(out, force):
    """Refuse an --out that is a file or not writable, or (without --force) not empty; creates nothing."""
    from ..base.outdir import check_contents, check_writable

    check_writable(out)
    check_contents(out, force)


def _check_device(device):
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

    def run(self, args):
        from ..core.distill import run_train

        _check_training_args(args)
        inputs = [("--model", args.model), ("--data", args.data), ("--weights", args.weights),
                  ("--unlabeled", args.unlabeled)]
        with _run_folder(args, inputs):
            m = run_train(args)
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
        p.formatter_class = _KeepLines  # the teacher examples keep their lines
        super().add_arguments(p)

    def run(self, args):
        from ..core.distill import run_distill
        from ..core.losses import LOSSES

        from ..core.losses import check_options

        LOSSES.get(args.loss)
        if args.alpha is not None and args.alpha > 1.0 and args.loss != "dkd":
            raise EdgeKDError(f"--alpha must be between 0 and 1, got {args.alpha}")
        check_options(args.loss, {"temperature": args.temperature, "alpha": args.alpha, "beta": args.beta,
                                  "warmup": args.dkd_warmup, "student_layer": args.student_layer,
                                  "teacher_layer": args.teacher_layer})
        _check_training_args(args)
        inputs = [("--teacher", args.teacher), ("--student", args.student), ("--data", args.data),
                  ("--student-weights", args.student_weights), ("--teacher-weights", args.teacher_weights),
                  ("--teacher-classes", args.teacher_classes), ("--unlabeled", args.unlabeled)]
        with _run_folder(args, inputs):
            m = run_distill(args)
        if _rank() != 0:
            return
        t = m["teacher"]
        params = f", {t['params']:,} params" if t.get("params") else ""
        top1 = f"{t['test_top1']:.4f}" if t.get("test_top1") is not None else "unknown"
        from ..base.progress import printable

        print(printable(f"teacher {t['model'] or t['spec']} ({t['kind']}): test top-1 {top1}{params}"))
        print(f"student {m['model']}: test top-1 {m['test_top1']:.4f}, {m['params']:,} params "
              f"({m['loss']} loss, {m['epochs']} epochs) -> {args.out}/student.pt")


class _KeepLines(argparse.HelpFormatter):
    """Wraps help text as usual, except text with its own line breaks (the example table)."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class Export(Command):
    name = "export"
    help = "convert a checkpoint to a deployable bundle and check it against PyTorch"
    description = ("Export a checkpoint to ONNX or OpenVINO IR at fp32, fp16 or int8, validate it on real held-out "
                   "test images against the PyTorch model (the parity gate), and write a bundle folder DIR with "
                   "manifest.json (and DIR.zip with --zip). INT8 is calibrated on class-stratified train images and "
                   "must stay within --max-drop points of FP32 top-1; when it does not, the most sensitive layers "
                   "are kept in float, and when that fails too, the student is fine-tuned with fake quantizers "
                   "against its teacher (--qat-epochs, every layer INT8). A failed check leaves no bundle. "
                   "See docs/export.md.")

    def run(self, args):
        from ..base.outdir import BundleFolder
        from ..export.pipeline import export_checkpoint
        from .int8 import train_qat

        from types import SimpleNamespace

        from ..base.files import refuse_inside
        from ..core.data import data_folders

        # a bundle inside the data it validates or calibrates on would be read back as images of that data
        refuse_inside(args.out, "--out", data_folders(args) + data_folders(SimpleNamespace(data=args.calib_data)))
        folder = BundleFolder(args.out, args.force, args.zip, [
            ("CHECKPOINT", args.checkpoint), ("--data", args.data), ("--calib-data", args.calib_data),
            ("--data-root", args.data_root), ("--qat-teacher", args.qat_teacher),
            ("--config", args.config)])
        with folder:  # checked and locked for the whole export
            _log_to_stderr()
            m = export_checkpoint(args.checkpoint, args, train_qat=train_qat)  # args: export/options.py's ExportOptions
        v = m["validation"]
        print(f"{m['format']} {m['precision']} bundle -> {args.out}{' (+ ' + args.out.rstrip('/') + '.zip)' if args.zip else ''}"
              f": {m['size_bytes'] / 1e6:.3f} MB, exported in {m['export_seconds']:.1f} s")
        print(f"parity on {v['images']} test images: max |diff| {v['max_abs_diff']:.2e}, top-1 agreement "
              f"{v['top1_agreement']:.4f}, top-1 {v['top1']:.4f} (PyTorch {v['reference_top1']:.4f}, "
              f"drop {v['drop']:+.2f} points)")
        if len(m.get("ladder", [])) > 1:
            print("INT8 ladder: " + " -> ".join(f"{r['rung']} drop {r['drop']:.2f} ({'pass' if r['passed'] else 'fail'})"
                                               for r in m["ladder"]))
        if m.get("fallback", {}).get("layers_in_float") and m["fallback"].get("used", True):
            f = m["fallback"]
            print(f"kept in float: {', '.join(f['layers_in_float'])} (drop {f['drop_before']:.2f} -> {f['drop_after']:.2f})")
        for warning in m.get("warnings", []):
            print(f"warning: {warning}")


def _log_to_stderr():
    """Show the library's INFO lines (export time, size, warnings) on stderr, as one plain line each."""
    import logging

    from ..base.progress import PrintableFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("edgekd")
    if not logger.handlers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    # torch's C++-extension builder warns, when NNCF imports it, that an nvcc without a CUDA runtime was
    # found: nothing edgekd builds, and a stray line in the output of a CPU export.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def csv_list(kind, convert=str):
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


class Bench(Command):
    name = "bench"
    help = "measure latency and accuracy of checkpoints and bundles, teacher first"
    description = ("Benchmark every MODEL (checkpoints run in PyTorch, ONNX bundles in ONNX Runtime, OpenVINO bundles "
                   "in OpenVINO; --backends runs them through several), each backend in its own worker process, on "
                   "the same held-out images, timed in interleaved rounds. The first model is the reference (the "
                   "teacher). Writes DIR/results.json, results.csv, report.md, accuracy_vs_latency.png and "
                   "latency.png, and prints the table.")

    def run(self, args):
        from ..base.progress import printable
        from ..bench.run import request, run_bench

        inputs = [("MODEL", m) for m in args.models] + [("--compare", args.compare), ("--data", args.data)]
        with _run_folder(args, inputs):
            result = run_bench(*request(args))  # plan, measurement, results from the BenchOptions
        print(printable(result.table))
        if result.comparison:
            print("\n" + printable(result.comparison))
        print(f"\nwrote {args.out}/results.json, results.csv, report.md, accuracy_vs_latency.png, latency.png"
              + (", profile.png" if args.profile else ""))


class Predict(Command):
    name = "predict"
    help = "classify image files with a bundle (no PyTorch needed)"
    description = ("Run a bundle (folder or .zip) on image files with only numpy, Pillow and the bundle's runtime "
                   "(onnxruntime or openvino): verify its checksums, preprocess as training did, print labels and scores.")

    def run(self, args):
        import json

        from ..bundle import load_bundle

        from ..bundle.device import text_lines

        bundle = load_bundle(args.bundle, threads=args.threads, device=args.device)
        results = bundle.predict_files(args.images, top_k=min(args.top_k, len(bundle.classes)))
        if args.json:  # strict JSON: a non-finite score is null with "finite": false, never a bare NaN
            print(json.dumps(results, indent=2, allow_nan=False))
        else:
            print("\n".join(text_lines(results)))


class Prepare(Command):
    name = "prepare"
    help = "decode a data set's training pictures once into an image store for --image-store"
    description = ("Decode every training picture of DATA once, shrunk so its longest side is at most --max-size, "
                   "into memory-mapped files with an index under --out; train and distill given --image-store "
                   "with the same folder and size then cut their crops from it with no JPEG decode. Keyed by the "
                   "files and the size, checksummed; a damaged store is refused.")

    def run(self, args):
        from ..core.image_store import run_prepare

        record = run_prepare(args.data, args.out, args.max_size, data_root=args.data_root, unlabeled=args.unlabeled,
                             train_subset=args.train_subset, workers=args.workers, progress=args.progress)
        print(f"image store -> {record.get('path', args.out)}: " + ", ".join(
            f"{k} {v}" for k, v in record.items() if k in ("images", "max_size", "bytes", "build_seconds")))


class Deploy(Command):
    name = "deploy"
    help = "install a bundle on an edge device over SSH (checksummed, atomic)"
    description = ("Copy a bundle to a device over SSH with your own ssh config and keys (never a password), check "
                   "it there with the device's Python and runtime (sha256 sums, load and compile, one batch, the "
                   "parity images of a bundle exported with --target), and move it into place atomically; a bundle "
                   "that fails the check is refused with the device's error. The device needs Python 3.8+, numpy, "
                   "Pillow and the bundle's runtime (onnxruntime or openvino); no torch.")

    def run(self, args):
        from .deploy import RUNNER_NAME, deploy, run_hint

        target, dest, env = deploy(args.bundle, args.device, args.ssh_config, args.timeout, args.python)
        folder = dest.rsplit("/", 1)[0]
        print(f"installed {args.bundle} on {target} at {dest} ({env['cpu']}, Python {env['python']}, "
              + ", ".join(f"{k} {v}" for k, v in sorted(env["versions"].items())) + ")")
        print("run it there: " + run_hint(target.python, folder + "/" + RUNNER_NAME, dest))

class Quantize(Command):
    name = "quantize"
    help = "quantization-aware distillation: fine-tune a student with INT8 fake quantizers against its teacher"
    description = ("Insert NNCF fake quantizers into a student checkpoint where OpenVINO and ONNX Runtime quantize it "
                   "(calibrated on train images), fine-tune it for a few epochs at a small learning rate against the "
                   "teacher with a distillation loss, and write DIR/student-qat.pt, DIR/metrics.json, DIR/config.yaml. "
                   "Export it with edgekd export DIR/student-qat.pt --precision int8 (no new calibration). "
                   "See docs/export.md (the INT8 ladder).")

    def run(self, args):
        from ..core.losses import LOSSES
        from ..core.quantize import run_quantize

        LOSSES.get(args.loss)
        _check_training_args(args)
        inputs = [("STUDENT", args.student), ("--teacher", args.teacher), ("--data", args.data)]
        with _run_folder(args, inputs):
            m = run_quantize(args)
        q = m["qat"]
        print(f"QAT student {m['model']}: INT8 (fake-quantized) top-1 {q['int8_top1_before']:.4f} before, "
              f"{m['test_top1']:.4f} after {m['epochs']} epoch(s); FP32 {q['fp32_top1']:.4f}; "
              f"{len(q['layers_int8'])} layers INT8 -> {args.out}/student-qat.pt")


from .fit import Fit  # noqa: E402  (edgekd fit: its options are declared in fit/options.py)

COMMANDS = [Train(), Distill(), Quantize(), Prepare(), Export(), Bench(), Predict(), Deploy(), Fit()]


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


# Commands that train: their OpenMP threads sleep at barriers unless the user chose otherwise (bench and
# export keep the libraries' defaults, so latencies are measured as a deployment would run them).
TRAINING_COMMANDS = ("train", "distill", "quantize")


def main(argv=None):
    from ..base.telemetry import switch_off

    switch_off()  # an edgekd process: OpenVINO/NNCF telemetry off before either can be imported
    argv = sys.argv[1:] if argv is None else argv
    parser, sub = build_parser()
    args = parser.parse_args(argv)
    from ..base.progress import printable, report_to_stdout

    report_to_stdout()  # the per-epoch lines the library logs to edgekd.report
    if args.command in TRAINING_COMMANDS:  # before any import of torch loads OpenMP: see edgekd/base/cpu.py
        from ..base.cpu import short_spin_wait

        short_spin_wait()
    opts = None
    try:
        opts = config.parse_args(args)  # defaults < --config / --resume's config.yaml < command line, all checked
        args.func(opts)  # the command's typed options (a frozen dataclass of edgekd/core/config.py)
    except Interrupted as e:
        if _rank() == 0:  # every rank stops at the same batch; one of them says so
            out = opts.out if opts is not None else "DIR"
            print(f"edgekd {args.command}: {e}; resume with: edgekd {args.command} --resume {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except EdgeKDError as e:
        if args.debug:
            raise
        print(f"edgekd {args.command}: error: {printable(e)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        if args.debug:
            raise
        print(f"edgekd {args.command}: error: {printable(_os_error_line(e))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"edgekd {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug: say so in one line; --debug shows the traceback
        if args.debug:
            raise
        print(f"edgekd {args.command}: internal error: {type(e).__name__}: {printable(str(e).splitlines()[0]) if str(e) else ''} "
              "(rerun with --debug for the traceback and report it)", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK
