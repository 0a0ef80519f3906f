"""The options classes are written classes that mypy reads: a valid construction type-checks, an unknown
option name (as an attribute or a keyword) is a type error."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mypy(tmp_path, name, code):
    path = tmp_path / f"{name}.py"
    path.write_text(code)
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", os.path.join(ROOT, "pyproject.toml"),
                           "--cache-dir", str(tmp_path / "cache"), str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT, "MYPYPATH": ROOT})
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def mypy_available():
    if subprocess.run([sys.executable, "-m", "mypy", "--version"], capture_output=True).returncode:
        pytest.skip("mypy is not installed in this environment")


def test_a_valid_construction_type_checks_and_an_unknown_option_does_not(tmp_path, mypy_available):
    good = ("from edgekd.export.options import ExportOptions\n"
            "opts = ExportOptions(format='onnx', out='b')\n"
            "fmt: str | None = opts.format\n"
            "size: int = opts.val_size\n")
    rc, out = _mypy(tmp_path, "good", good)
    assert rc == 0, out
    bad = ("from edgekd.core.options import TrainOptions\n"
           "from edgekd.export.options import ExportOptions\n"
           "ExportOptions(format='onnx', out='b').no_such_option\n"
           "TrainOptions(epochs=3, no_such_keyword=1)\n"
           "n: str = TrainOptions().epochs\n")
    rc, out = _mypy(tmp_path, "bad", bad)
    assert rc == 1, out
    assert 'has no attribute "no_such_option"' in out, out
    assert 'Unexpected keyword argument "no_such_keyword"' in out, out
    assert "Incompatible types in assignment" in out, out
