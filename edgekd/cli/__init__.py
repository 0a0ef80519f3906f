"""The edgekd command line: one subcommand per pipeline stage; heavy imports happen inside run()."""

import argparse
import contextlib
import errno
import json
import logging
import sys
from types import SimpleNamespace
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar

from .. import EdgeKDError, Interrupted, __version__
from ..base.cpu import short_spin_wait
from ..base.files import refuse_inside
from ..base.outdir import BundleFolder, check_contents, check_writable
from ..base.progress import CurrentStreamHandler, PrintableFormatter, printable, report_to_stdout
from ..base.telemetry import switch_off
# Importing a command's options class registers it (edgekd.core.optionspec.register) for add_options and resolve.
from ..bench.options import BenchOptions
from ..bench.run import request, run_bench
from ..bundle import load_bundle
from ..bundle.device import text_lines
from ..core import config
from ..core.data import data_folders
from ..core.distributed import env_rank
from ..export.options import ExportOptions
from ..export.records import ExportSummary
from .command import Command, Parser
from .deploy import RUNNER_NAME, deploy, run_hint
from .fit import Fit
from .int8 import train_qat
from .options import DeployOptions, PredictOptions
from .train import TRAINING_COMMANDS, Distill, Prepare, Quantize, Train, run_folder

N = TypeVar("N", int, float)


def _number(text: str, convert: Callable[[str], N], ok: Callable[[N], bool], what: str) -> N:
    """An argparse type's body: ``text`` converted, or ArgumentTypeError naming what is accepted (NaN and
    infinity fail ``ok``). The option tables of edgekd/config.py check every command's own options;
    these serve the scripts of tools/."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    return _number(text, int, lambda v: v >= 1, "a positive whole number")


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    return _number(text, float, lambda v: 0 < v < float("inf"), "a positive number")


def _check_out(out: str, force: bool) -> None:
    """Refuse an --out that is a file or not writable, or (without --force) not empty; creates nothing."""
    check_writable(out)
    check_contents(out, force)


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

    def run(self, args: ExportOptions) -> None:
        from ..export.pipeline import export_checkpoint  # heavy: torch, onnx

        if args.out is None:  # the options refuse a missing --out before this
            raise EdgeKDError("--out DIR is required")
        # a bundle inside the data it validates or calibrates on would be read back as images of that data
        refuse_inside(args.out, "--out", data_folders(args) + data_folders(SimpleNamespace(data=args.calib_data)))
        folder = BundleFolder(args.out, args.force, args.zip, [
            ("CHECKPOINT", args.checkpoint), ("--data", args.data), ("--calib-data", args.calib_data),
            ("--data-root", args.data_root), ("--qat-teacher", args.qat_teacher),
            ("--config", args.config)])
        with folder, _log_to_stderr():  # checked and locked for the whole export
            manifest = export_checkpoint(str(args.checkpoint), args, train_qat=train_qat)
        print("\n".join(ExportSummary.from_manifest(manifest).lines(args.out, args.zip)))


@contextlib.contextmanager
def _log_to_stderr() -> Iterator[None]:
    """Show the library's INFO lines (export time, size, warnings) on stderr, as one plain line each, for the
    command's duration (the CLI run in-process leaves no handler behind for the next command)."""
    logger = logging.getLogger("edgekd")
    handler = None
    if not logger.handlers:
        handler = CurrentStreamHandler("stderr")
        handler.setFormatter(PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    # torch's C++-extension builder warns, when NNCF imports it, that an nvcc without a CUDA runtime was
    # found: nothing edgekd builds, and a stray line in the output of a CPU export.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
        if handler is not None:
            logger.removeHandler(handler)


def csv_list(kind: str, convert: Callable[[str], Any] = str) -> Callable[[str], List[Any]]:
    """An argparse type for comma lists: ``1,8,32`` -> [1, 8, 32]."""

    def parse(text: str) -> List[Any]:
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

    def run(self, args: BenchOptions) -> None:
        inputs = [("MODEL", m) for m in args.models or []] + [("--compare", args.compare), ("--data", args.data)]
        with run_folder(args, inputs):
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

    def run(self, args: PredictOptions) -> None:
        bundle = load_bundle(str(args.bundle), threads=args.threads, device=args.device)
        results = bundle.predict_files(args.images or [], top_k=min(args.top_k, len(bundle.classes)))
        if args.json:  # strict JSON: a non-finite score is null with "finite": false, never a bare NaN
            print(json.dumps(results, indent=2, allow_nan=False))
        else:
            print("\n".join(text_lines(results)))


class Deploy(Command):
    name = "deploy"
    help = "install a bundle on an edge device over SSH (checksummed, atomic)"
    description = ("Copy a bundle to a device over SSH with your own ssh config and keys (never a password), check "
                   "it there with the device's Python and runtime (sha256 sums, load and compile, one batch, the "
                   "parity images of a bundle exported with --target), and move it into place atomically; a bundle "
                   "that fails the check is refused with the device's error. The device needs Python 3.8+, numpy, "
                   "Pillow and the bundle's runtime (onnxruntime or openvino); no torch.")

    def run(self, args: DeployOptions) -> None:
        target, dest, env = deploy(str(args.bundle), str(args.device), args.ssh_config, args.timeout, args.python)
        folder = dest.rsplit("/", 1)[0]
        print(f"installed {args.bundle} on {target} at {dest} ({env.cpu}, Python {env.python}, "
              + ", ".join(f"{k} {v}" for k, v in sorted((env.versions or {}).items())) + ")")
        print("run it there: " + run_hint(target.python, folder + "/" + RUNNER_NAME, dest))


COMMANDS: List[Command] = [Train(), Distill(), Quantize(), Prepare(), Export(), Bench(), Predict(), Deploy(), Fit()]


def build_parser() -> Tuple[Parser, Any]:
    """The ``edgekd`` parser and its subparsers' action (one subparser per command)."""
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


def _os_error_line(e: OSError) -> str:
    """One line for an operating-system error: which file, and what went wrong with it."""
    where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on the device while writing{where}; free some space (nothing partial was kept)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied for{where}: choose a writable --out folder"
    return f"{e.strerror or type(e).__name__}{where}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``edgekd ARGV``: run one command; return its exit code (README: troubleshooting)."""
    switch_off()  # an edgekd process: OpenVINO/NNCF telemetry off before either can be imported
    argv = sys.argv[1:] if argv is None else argv
    parser, sub = build_parser()
    args = parser.parse_args(argv)
    report_to_stdout()  # the per-epoch lines the library logs to edgekd.report
    # before any import of torch loads OpenMP (see edgekd/base/cpu.py); fit trains too
    if args.command in TRAINING_COMMANDS or args.command == "fit":
        short_spin_wait()
    opts: Any = None
    try:
        opts = config.parse_args(args)  # defaults < --config / --resume's config.yaml < command line, all checked
        args.func(opts)  # the command's typed options (a frozen dataclass of edgekd/core/config.py)
    except Interrupted as e:
        if env_rank() == 0:  # every rank stops at the same batch; one of them says so
            out = getattr(opts, "out", None) if opts is not None else "DIR"
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
