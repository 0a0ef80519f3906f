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
    """The CLI as a subprocess: ``cli("distill", "--epochs", 1, ...)``."""
    return run_cli


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """One short real distillation on digits (teacher trained first), shared by the tests that need a checkpoint."""
    out = tmp_path_factory.mktemp("run")
    run_cli("distill", "--epochs", 3, "--teacher-epochs", 3, "--out", out, "--force", "--no-progress")
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
