"""Trust no file (issue 22, part A): files that carry pickles, folders edgekd does not own, outputs that
would replace inputs, bundles with files their manifest does not list, paths that reach further than asked.

Each test builds the hostile file itself, small, and runs the real command (in-process where it can).
"""

import ast
import io
import json
import os
import pathlib
import zipfile

import pytest
import torch
from torch import nn

import edgekd.cli

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _main(*argv):
    """edgekd's CLI in this process: its exit code (argparse's refusals exit through SystemExit)."""
    try:
        return edgekd.cli.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2), 1))


def _pt2(path, batch=None):
    """A torch.export program of a tiny model at 32x32; a dynamic batch unless ``batch`` fixes it."""
    torch.manual_seed(0)
    model = _Tiny().eval()
    shapes = None if batch else ({0: torch.export.Dim("batch", min=1, max=1024)},)
    program = torch.export.export(model, (torch.zeros(batch or 2, 1, 32, 32),), dynamic_shapes=shapes)
    torch.export.save(program, str(path))
    return path


class _WritesAMarker:
    """A pickle that, when loaded unsafely, runs a command (here: creates a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _evil_pt2(tmp_path):
    """A valid .pt2 whose data/sample_inputs member is an os.system pickle (torch.export.load retries it with
    weights_only=False)."""
    good = _pt2(tmp_path / "good.pt2")
    marker = tmp_path / "PWNED"
    payload = io.BytesIO()
    torch.save(_WritesAMarker(marker), payload)
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        members = [i.filename for i in src.infolist()]
        assert any("/data/sample_inputs/" in n for n in members)
        for info in src.infolist():
            data = payload.getvalue() if "/data/sample_inputs/" in info.filename else src.read(info.filename)
            dst.writestr(info, data)
    return evil, marker


# --- 1. one loader for every file that can carry a pickle --------------------------------------------------

def test_a_pt2_teacher_with_a_code_pickle_never_runs_it(tmp_path, capsys):
    evil, marker = _evil_pt2(tmp_path)
    code = _main("distill", "--teacher", evil, "--teacher-mean", "0.5", "--teacher-std", "0.5", "--epochs", "1",
                 "--train-subset", "40", "--no-progress", "--out", tmp_path / "run")
    err = capsys.readouterr().err
    assert not marker.exists(), "the pickled command ran"
    assert code == 2 and "pickled Python objects" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_the_loader_refuses_a_pt2_and_a_weights_file_that_carry_code(tmp_path):
    from edgekd import EdgeKDError
    from edgekd.core import safe_load

    evil, marker = _evil_pt2(tmp_path)
    with pytest.raises(EdgeKDError, match="pickled Python objects"):
        safe_load.exported_program(str(evil))
    torch.save({"w": _WritesAMarker(marker)}, tmp_path / "w.pth")
    with pytest.raises(EdgeKDError, match="pickled Python objects"):
        safe_load.weights_file(str(tmp_path / "w.pth"))
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the guard is lifted after the load


def test_a_static_batch_pt2_teacher_works(tmp_path, capsys):
    """Exported without dynamic_shapes (batch fixed at 3): run in pieces of 3, not an internal error."""
    pt2 = _pt2(tmp_path / "static.pt2", batch=3)
    code = _main("distill", "--teacher", pt2, "--teacher-mean", "0.5", "--teacher-std", "0.5", "--epochs", "1",
                 "--train-subset", "40", "--batch-size", "16", "--no-progress", "--out", tmp_path / "run")
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "student.pt").is_file()


def test_fixed_batch_wrapper_gives_the_models_own_logits():
    from edgekd.core.teachers import _FixedBatch

    torch.manual_seed(0)
    model = _Tiny().eval()
    program = torch.export.export(model, (torch.zeros(3, 1, 32, 32),))
    x = torch.randn(7, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(_FixedBatch(program.module(), 3)(x), model(x), atol=1e-5)


@pytest.mark.parametrize("name,content", [("garbage.pth", os.urandom(3000)), ("text.pth", b"hello\n"),
                                          ("garbage.safetensors", os.urandom(3000)), ("empty.safetensors", b"")])
def test_garbage_teacher_weights_exit_2_like_student_weights(tmp_path, capsys, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    for option, model in (("--teacher-weights", "--teacher=torchvision:resnet18"),
                          ("--student-weights", "--student=torchvision:resnet18")):
        code = _main("distill", model, option, path, "--epochs", "1", "--train-subset", "20", "--no-progress",
                     "--out", tmp_path / "run")
        err = capsys.readouterr().err
        assert code == 2, (option, err)
        assert "internal error" not in err and "weights_only" not in err and str(path) in err


def test_no_module_unpickles_outside_the_one_loader():
    """Every torch.load / torch.jit.load / torch.export.load / pickle use is in edgekd/core/safe_load.py."""
    offenders = []
    for folder in ("edgekd", "export", "bench", "bundle"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "safe_load.py":
                continue
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and node.attr == "load" and isinstance(node.value, ast.Attribute) \
                        and node.value.attr in ("jit", "export") or (
                        isinstance(node, ast.Attribute) and node.attr == "load" and isinstance(node.value, ast.Name)
                        and node.value.id in ("torch", "pickle", "dill", "joblib")):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
                if isinstance(node, ast.keyword) and node.arg == "weights_only" and \
                        isinstance(node.value, ast.Constant) and node.value.value is False:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.value.lineno} weights_only=False")
                if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                        a.name in ("pickle", "dill", "cloudpickle") for a in node.names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports pickle")
    assert not offenders, offenders
