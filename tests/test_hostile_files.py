"""Trust no file: files that carry pickles, folders edgekd does not own, outputs that
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


def _rewrite_graph(good, evil, edit):
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("/models/model.json"):
                data = edit(data.decode()).encode()
            dst.writestr(info, data)
    return evil


def test_a_pt2_whose_graph_would_run_code_is_refused_before_torch_reads_it(tmp_path):
    """torch's deserializer evaluates symbolic shapes with sympy.sympify (Python's eval) and resolves targets by
    attribute lookup from torch (torch.os.system resolves): both are checked in the archive first."""
    import re

    from edgekd import EdgeKDError
    from edgekd.core import safe_load

    good = _pt2(tmp_path / "good.pt2")
    marker = tmp_path / "PWNED"

    def sympy_eval(text):
        expr = re.search(r'"expr_str": "([^"]*)"', text).group(1)
        return text.replace(f'"expr_str": "{expr}"', '"expr_str": "__import__(\'os\').system(\'touch %s\') or %s"'
                            % (marker, expr), 1)

    def os_target(text):
        return text.replace('"target": "torch.ops.aten.linear.default"', '"target": "torch.os.system"', 1)

    for name, edit, message in (("sympy.pt2", sympy_eval, "not a sympy expression"),
                                ("target.pt2", os_target, "'torch.os.system', which is not a torch operator")):
        evil = _rewrite_graph(good, tmp_path / name, edit)
        assert evil.read_bytes() != good.read_bytes()
        with pytest.raises(EdgeKDError, match=message):
            safe_load.exported_program(str(evil))
    assert not marker.exists()


def test_ordinary_exported_programs_pass_the_graph_check(tmp_path):
    """Batch norm (aten._native_batch_norm_legit_no_training), dynamic shapes, operator.getitem."""
    from edgekd.core import safe_load

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    program = torch.export.export(model, (torch.zeros(2, 1, 16, 16),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64),
                                                   2: torch.export.Dim("h", min=8, max=64)},))
    torch.export.save(program, str(tmp_path / "bn.pt2"))
    loaded = safe_load.exported_program(str(tmp_path / "bn.pt2"))
    x = torch.randn(3, 1, 20, 16)
    with torch.no_grad():
        assert torch.allclose(loaded.module()(x), model(x), atol=1e-5)


def test_a_static_batch_pt2_teacher_works(tmp_path, capsys):
    """Exported without dynamic_shapes (batch fixed at 3): run in pieces of 3, not an internal error."""
    pt2 = _pt2(tmp_path / "static.pt2", batch=3)
    code = _main("distill", "--teacher", pt2, "--teacher-mean", "0.5", "--teacher-std", "0.5", "--epochs", "1",
                 "--train-subset", "40", "--batch-size", "16", "--no-progress", "--out", tmp_path / "run")
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "student.pt").is_file()


def test_fixed_batch_wrapper_gives_the_models_own_logits():
    from edgekd.core.teachers.pt2 import FixedBatch as _FixedBatch

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


# --- shared: a checkpoint and bundles edgekd wrote ---------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An edgekd checkpoint of a compact-student (untrained: these tests check files, not accuracy)."""
    from edgekd.core.checkpoint import save_checkpoint
    from edgekd.core.data import InputSpec
    from edgekd.core.models import build_model

    path = tmp_path_factory.mktemp("ckpt") / "student.pt"
    spec = InputSpec(1, 32, 32, [0.5], [0.5])
    torch.manual_seed(0)
    model = build_model("compact-student", 10, spec).eval()
    save_checkpoint(str(path), model, spec="compact-student", classes=[str(i) for i in range(10)], input_spec=spec,
                    data_spec="digits", metrics={"test_top1": 0.1}, config={})
    return path


@pytest.fixture(scope="module")
def bundles(ckpt, tmp_path_factory):
    """An ONNX and an OpenVINO bundle written by edgekd export (in this process)."""
    from edgekd.export.pipeline import ExportOptions, export_checkpoint

    root = tmp_path_factory.mktemp("bundles")
    for fmt in ("onnx", "openvino"):
        export_checkpoint(str(ckpt), ExportOptions(format=fmt, out=str(root / fmt), val_size=20, progress=False))
    return root


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(pathlib.Path(folder).rglob("*"))
            if p.is_file() and not p.name.endswith(".edgekd.lock")}


def _one_line(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


# --- 2. ownership by marker, not by name -------------------------------------------------------------------

def test_bench_force_keeps_hand_written_files_with_edgekds_names(bundles, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: settings\n")
    (mine / "report.md").write_text("# my report\n")
    before = _tree(mine)
    code = _main("bench", bundles / "onnx", "--quick", "--out", mine, "--force")
    assert code == 2
    _one_line(capsys, "was not written by edgekd", "config.yaml")
    assert _tree(mine) == before and sorted(os.listdir(mine)) == ["config.yaml", "report.md"]


def test_a_marked_folder_still_keeps_a_file_its_marker_does_not_list(tmp_path, capsys):
    """An edgekd run folder where the user put report.md afterwards: bench --force would overwrite it."""
    out = tmp_path / "runs"
    out.mkdir()
    (out / ".edgekd").write_text(json.dumps({"command": "train", "files": ["model.pt"]}))
    (out / "model.pt").write_bytes(b"edgekd's")
    (out / "report.md").write_text("mine")
    from edgekd import EdgeKDError
    from edgekd.base.outdir import RunFolder

    with pytest.raises(EdgeKDError, match="report.md, which edgekd did not write"):
        with RunFolder(str(out), "bench", force=True):
            pass
    assert (out / "report.md").read_text() == "mine" and (out / "model.pt").read_bytes() == b"edgekd's"
    with RunFolder(str(out), "train", force=True):  # train writes no report.md: it is left alone
        (out / "model.pt").write_bytes(b"new")
    assert (out / "report.md").read_text() == "mine"
    marker = json.loads((out / ".edgekd").read_text())
    assert "report.md" not in marker["files"] and "model.pt" in marker["files"]


def test_export_force_refuses_a_bundle_folder_holding_a_users_file(ckpt, bundles, tmp_path, capsys):
    out = _copy(bundles / "onnx", tmp_path / "b")
    (out / "NOTES.txt").write_text("calibrated on the lab's camera")
    before = _tree(out)
    code = _main("export", ckpt, "--format", "onnx", "--out", out, "--force", "--val-size", "20", "--no-progress")
    assert code == 2
    _one_line(capsys, "NOTES.txt", "--force only replaces edgekd's own outputs")
    assert _tree(out) == before


def test_a_failed_quantize_leaves_nothing_that_blocks_the_retry(tmp_path):
    """quantize writes quantizers.json and qat.before.json early; a failure after that takes them away (they
    are quantize's own outputs), and the retry finds an empty folder."""
    from edgekd.base.outdir import RunFolder

    out = tmp_path / "q"
    with pytest.raises(RuntimeError):
        with RunFolder(str(out), "quantize"):
            (out / "config.yaml").write_text("{}")
            (out / "quantizers.json").write_text("{}")
            (out / "qat.before.json").write_text("{}")
            raise RuntimeError("the teacher failed to load")
    assert not out.exists()
    with RunFolder(str(out), "quantize"):  # the retry, without --force
        (out / "quantizers.json").write_text("{}")
    assert "quantizers.json" in json.loads((out / ".edgekd").read_text())["files"]
    with RunFolder(str(out), "quantize", force=True):  # and its own files are replaced with --force
        pass


# --- 3. an output never replaces an input; every folder a command writes is locked -------------------------

def test_a_config_file_inside_out_is_never_replaced(tmp_path, capsys):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / ".edgekd").write_text(json.dumps({"command": "train", "files": ["config.yaml"]}))
    (exp / "config.yaml").write_text("epochs: 1\nmodel: compact-student\ntrain_subset: 40\n")
    before = _tree(exp)
    code = _main("train", "--config", exp / "config.yaml", "--out", exp, "--force", "--no-progress")
    assert code == 2
    _one_line(capsys, "--config", "an output never overwrites an input")
    assert _tree(exp) == before


def test_two_exports_into_one_folder_the_second_is_refused(ckpt, tmp_path, capsys):
    import subprocess
    import sys
    import time

    out = tmp_path / "b"
    lock = tmp_path / ".b.edgekd.lock"
    first = subprocess.Popen([sys.executable, "-m", "edgekd", "export", str(ckpt), "--format", "onnx", "--out",
                              str(out), "--val-size", "20", "--no-progress"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    start = time.monotonic()
    while not (lock.exists() and f"pid {first.pid}" in lock.read_text()):
        assert first.poll() is None and time.monotonic() - start < 300, first.communicate()
        time.sleep(0.02)
    code = _main("export", ckpt, "--format", "onnx", "--out", out, "--force", "--val-size", "20", "--no-progress")
    assert code == 2
    _one_line(capsys, f"output folder '{out}' is in use by another edgekd run (pid {first.pid}, edgekd export)")
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert (out / "manifest.json").is_file() and not lock.exists()


# --- 4. a bundle is exactly its manifest -------------------------------------------------------------------

def _unlisted(bundles, tmp_path, fmt):
    """A copy of the ``fmt`` bundle whose weights file is dropped from the manifest's files map and then
    changed: nobody checksums it any more, yet the runtime reads it."""
    out = _copy(bundles / fmt, tmp_path / f"{fmt}-unlisted")
    manifest = json.loads((out / "manifest.json").read_text())
    weights = "model.bin" if fmt == "openvino" else next(n for n in manifest["files"] if n != manifest["model_file"]) \
        if len(manifest["files"]) > 1 else None
    if weights is None:  # an ONNX model with its weights inside: an extra file is the same hole
        weights = "extra.bin"
        (out / weights).write_bytes(b"\0" * 64)
    else:
        del manifest["files"][weights]
        data = bytearray((out / weights).read_bytes())
        data[-8:] = b"\x7f" * 8
        (out / weights).write_bytes(bytes(data))
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out, weights


def _digit_png(tmp_path):
    from PIL import Image

    path = tmp_path / "seven.png"
    Image.new("L", (8, 8), 128).save(path)
    return path


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_a_file_the_manifest_does_not_list_fails_verification_everywhere(bundles, tmp_path, capsys, fmt):
    import subprocess
    import sys

    out, weights = _unlisted(bundles, tmp_path, fmt)
    image = _digit_png(tmp_path)
    for argv in (["predict", out, image],
                 ["bench", out, "--quick", "--out", tmp_path / "bench"],
                 ["deploy", out, "ssh://nobody@127.0.0.1:1"],
                 ["distill", "--teacher", out, "--epochs", "1", "--train-subset", "20", "--no-progress",
                  "--out", tmp_path / "run"]):
        assert _main(*argv) == 2, argv
        _one_line(capsys, weights, "does not list")
    from edgekd.bundle.assemble import write_runner

    runner = subprocess.run([sys.executable, write_runner(str(tmp_path / "device_runner.py")), "verify", str(out)],
                            capture_output=True, text=True)
    assert runner.returncode == 2 and weights in runner.stderr and "does not list" in runner.stderr


def test_a_listed_file_that_is_missing_fails_verification(bundles, tmp_path, capsys):
    out = _copy(bundles / "openvino", tmp_path / "b")
    (out / "model.bin").unlink()
    assert _main("predict", out, _digit_png(tmp_path)) == 2
    _one_line(capsys, "missing", "model.bin")


def test_every_file_edgekd_writes_into_a_bundle_is_listed(bundles):
    from edgekd.bundle.runtime import verify_bundle

    for fmt in ("onnx", "openvino"):
        manifest = verify_bundle(str(bundles / fmt))
        assert set(os.listdir(bundles / fmt)) == set(manifest.files) | {"manifest.json"}


# --- 5. nothing reaches further than asked -----------------------------------------------------------------

def _strings(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def _machine_paths(obj, root):
    return [s for s in _strings(obj) if str(root) in s]


def test_manifests_record_no_path_of_the_exporting_machine(bundles, tmp_path_factory):
    root = tmp_path_factory.getbasetemp()
    for fmt in ("onnx", "openvino"):
        manifest = json.loads((bundles / fmt / "manifest.json").read_text())
        assert not _machine_paths(manifest, root), fmt
        assert manifest["source"]["checkpoint"] == "student.pt"


def test_runs_record_paths_relative_to_the_run_and_still_resolve(digits_folder, tmp_path, capsys, monkeypatch):
    """A distillation from a .pt2 teacher on an image folder with unlabelled images: metrics.json, the
    checkpoint and config.yaml's resolved teacher hold no absolute path of this machine, and an export run
    from another working folder still finds the data the checkpoint names."""
    import yaml

    root = tmp_path.parent.parent  # the session's base temporary folder: every path here lies under it
    teacher = _pt2(tmp_path / "teacher.pt2")
    unlabeled = tmp_path / "more"
    unlabeled.mkdir()
    for png in sorted((digits_folder / "test" / "digit3").iterdir())[:4]:
        (unlabeled / png.name).write_bytes(png.read_bytes())
    out = tmp_path / "runs" / "x"
    code = _main("distill", "--data", digits_folder, "--teacher", teacher, "--teacher-mean", "0.5", "--teacher-std",
                 "0.5", "--unlabeled", unlabeled, "--epochs", "1", "--train-subset", "40", "--no-progress",
                 "--out", out)
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert not _machine_paths(metrics, root), _machine_paths(metrics, root)
    assert metrics["teacher"]["file"] == os.path.relpath(teacher, out)
    ckpt = torch.load(out / "student.pt", weights_only=True)
    assert not _machine_paths({"data": ckpt["data"], "metrics": ckpt["metrics"]}, root)
    resolved = yaml.safe_load((out / "config.yaml").read_text())["teacher_resolved"]
    assert not _machine_paths(resolved, root)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code = _main("export", out / "student.pt", "--format", "onnx", "--out", tmp_path / "b", "--val-size", "20",
                 "--no-progress")
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["data"] == "imagefolder:" + os.path.relpath(digits_folder, tmp_path / "b")
    assert not _machine_paths(manifest, root)


def _images(folder, n=3):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("L", (8, 8), 40 * i).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("case", ["proc", "root-link", "ancestor-link", "system-link"])
def test_unlabeled_never_walks_into_the_root_an_ancestor_or_a_system_folder(tmp_path, case):
    from edgekd import EdgeKDError
    from edgekd.core.data import load_unlabeled

    folder = _images(tmp_path / "unlabeled")
    if case == "proc":
        folder = pathlib.Path("/proc")
    elif case == "root-link":
        (folder / "everything").symlink_to("/")
    elif case == "ancestor-link":
        (folder / "up").symlink_to(tmp_path)
    else:
        (folder / "me").symlink_to("/proc/self")
    with pytest.raises(EdgeKDError, match="system folder|file-system root|holds the folder itself"):
        load_unlabeled(str(folder))


def test_data_folder_with_a_link_to_the_root_is_refused_before_it_is_walked(digits_folder, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(digits_folder, data)
    (data / "train" / "digit1" / "all").symlink_to("/")
    code = _main("train", "--data", data, "--epochs", "1", "--no-progress", "--out", tmp_path / "run")
    assert code == 2
    _one_line(capsys, "file-system root", "remove the link")


def test_links_to_image_files_and_folders_elsewhere_keep_working(tmp_path):
    from edgekd.core.data import check_reach, load_unlabeled

    elsewhere = _images(tmp_path / "elsewhere" / "batch1", 3)
    single = _images(tmp_path / "single", 1) / "0.png"
    folder = tmp_path / "unlabeled"
    folder.mkdir()
    (folder / "batch1").symlink_to(elsewhere)
    (folder / "one.png").symlink_to(single)
    (folder / "again").symlink_to(elsewhere)  # a second link to the same folder is read once
    found = load_unlabeled(str(folder))
    assert len(found) == 4
    check_reach(str(folder), "--unlabeled")


def test_export_force_replaces_only_a_zip_its_manifest_accounts_for(ckpt, tmp_path, capsys):
    out = tmp_path / "b"
    assert _main("export", ckpt, "--format", "onnx", "--out", out, "--zip", "--val-size", "20", "--no-progress") == 0
    capsys.readouterr()
    with zipfile.ZipFile(tmp_path / "b.zip", "a") as z:
        z.writestr("b/NOTES.txt", "mine")
    import shutil

    shutil.rmtree(out)
    before = (tmp_path / "b.zip").read_bytes()
    assert _main("export", ckpt, "--format", "onnx", "--out", out, "--zip", "--force", "--val-size", "20",
                 "--no-progress") == 2
    _one_line(capsys, "is not a bundle zip written by edgekd")
    assert (tmp_path / "b.zip").read_bytes() == before
