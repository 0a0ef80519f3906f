import subprocess
import sys

import pytest

# Keep the libraries' telemetry out of the user's home during tests: the tests call edgekd's library in this
# process, which (unlike the CLI and edgekd's workers) leaves telemetry to its host, so switch it off here.
from edgekd.base.telemetry import switch_off  # noqa: E402

switch_off()


def run_cli(*args, cwd=None, check=True, timeout=600):
    """Run ``python -m edgekd ARGS`` as a user would; return the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", "edgekd", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"edgekd {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def cli():
    """The CLI as a subprocess: ``cli("distill", "--epochs", 1, ...)``. For the real process (exit code,
    stderr, signals) and end-to-end runs; option checks and bad inputs use ``cli_main`` (no new process)."""
    return run_cli


# What a fresh interpreter shows of Python's warnings (its default filters); pytest's own are wider.
_QUIET_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def run_main(capsys, *args):
    """Run ``edgekd ARGS`` in this process through ``edgekd.cli.main``; return a CompletedProcess as
    ``run_cli`` does: the exit code (main's return value or SystemExit's), stdout and stderr. Warnings a
    fresh interpreter would print count as stderr lines. What a run sets for its process (the edgekd
    loggers' handlers, torch's thread count and random state, the Ctrl-C handler) is put back, so cases
    do not leak into each other."""
    import logging
    import signal
    import warnings

    from edgekd.cli import main

    loggers = [logging.getLogger(name) for name in ("edgekd", "edgekd.report")]
    saved = [(log, list(log.handlers), log.level, log.propagate) for log in loggers]
    torch = sys.modules.get("torch")
    threads, rng = (torch.get_num_threads(), torch.get_rng_state()) if torch else (None, None)
    sigint = signal.getsignal(signal.SIGINT)  # training installs its own Ctrl-C handler
    capsys.readouterr()
    argv = [str(a) for a in args]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            for category in _QUIET_WARNINGS:
                warnings.simplefilter("ignore", category)
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's errors, --help
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        signal.signal(signal.SIGINT, sigint)
        for log, handlers, level, propagate in saved:
            log.handlers[:], log.level, log.propagate = handlers, level, propagate
        if torch:
            torch.set_num_threads(threads)
            torch.set_rng_state(rng)
    out, err = capsys.readouterr()
    err += "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in caught)
    return subprocess.CompletedProcess(["edgekd", *argv], code, out, err)


@pytest.fixture
def cli_main(capsys):
    """The CLI in this process: ``cli_main("export", ckpt, "--format", "onnx")`` -> CompletedProcess.
    For option validation and bad inputs: no interpreter start per case."""
    return lambda *args: run_main(capsys, *args)


def _one_line_error(proc, message=""):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr}"
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert message in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """One short real distillation on digits (teacher trained first), shared by the tests that need a checkpoint."""
    out = tmp_path_factory.mktemp("run")
    # a generous limit: on a machine shared with other test suites this takes minutes instead of seconds
    run_cli("distill", "--epochs", 3, "--teacher-epochs", 3, "--out", out, "--force", "--no-progress", timeout=1800)
    return out


@pytest.fixture(scope="session")
def onnx_bundle(digits_run):
    out = digits_run / "student-onnx"
    run_cli("export", digits_run / "student.pt", "--format", "onnx", "--out", out)
    return out


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """A small ImageFolder of real handwritten digits written as PNG files (train/ and test/)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits_folder")
    d = load_digits()
    for i, (img, label) in enumerate(zip(d.images[:400], d.target[:400])):
        split = "test" if i % 5 == 0 else "train"
        folder = root / split / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 / 16).round().astype(np.uint8), "L").save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def one_line_error():
    """``one_line_error(proc, message)``: assert exit 2, exactly one line on stderr holding ``message``, no
    traceback; returns the line."""
    return _one_line_error
