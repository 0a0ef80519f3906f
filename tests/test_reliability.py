"""Reliability: nothing half-written, one-line answers to OS failures, no tracebacks unless --debug."""

import errno
import json
import os
import re
from pathlib import Path

import pytest

from edgekd import cli
from edgekd.core.checkpoint import atomic_write


def _disk_full_after_some_bytes(tmp):
    with open(tmp, "wb") as f:
        f.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device", tmp)


def test_disk_full_while_writing_keeps_the_previous_file_and_leaves_no_partial(tmp_path):
    path = tmp_path / "student.pt"
    path.write_bytes(b"the previous good checkpoint")
    with pytest.raises(OSError):
        atomic_write(str(path), _disk_full_after_some_bytes)
    assert path.read_bytes() == b"the previous good checkpoint"
    assert os.listdir(tmp_path) == ["student.pt"]


@pytest.mark.parametrize("error, code, message", [
    (OSError(errno.ENOSPC, "No space left on device", "/x/model.pt"), 2, "no space left on the device while writing '/x/model.pt'"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/out"), 2, "permission denied for '/ro/out'"),
    (RuntimeError("something broke\nmore"), 1, "internal error: RuntimeError: something broke (rerun with --debug"),
])
def test_failures_become_one_line(monkeypatch, capsys, error, code, message):
    def boom(self, args):
        raise error

    monkeypatch.setattr(cli.Predict, "run", boom)
    assert cli.main(["predict", "b", "x.png"]) == code
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(type(error)):
        cli.main(["--debug", "predict", "b", "x.png"])


def test_output_inside_a_file_or_unwritable_is_refused(tmp_path, monkeypatch):
    from edgekd import EdgeKDError

    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(EdgeKDError, match="not writable"):
        cli._check_out(str(blocker / "out"), force=False)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as for a user without write permission
    with pytest.raises(EdgeKDError, match="is not writable"):
        cli._check_out(str(tmp_path / "new"), force=False)


# ---------------------------------------------------------------------------------------------
# Every bad input: exit code 2, one line on stderr, no traceback, nothing partial left behind.

def _folder(root, layout):
    """Write an ImageFolder: layout maps 'split/class/name' to a PIL image (or raw bytes)."""

    for rel, content in layout.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is None:
            path.mkdir(exist_ok=True)
        else:
            content.save(path)
    return root


def _digits_images(n=40):
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    return [(Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8), "L").convert("RGB"), int(d.target[i]) % 2)
            for i in range(n)]


def _two_class_folder(root, extra=None):
    layout = {f"{'test' if i % 4 == 0 else 'train'}/c{label}/{i:03d}.png": img for i, (img, label) in enumerate(_digits_images())}
    layout.update(extra or {})
    return _folder(root, layout)


def _run(request):
    """The shared digits run, asked of its session fixture only by the cases that need it."""
    return request.getfixturevalue("digits_run")


def _student(request):
    return str(_run(request) / "student.pt")


def _file(tmp, name, text):
    (tmp / name).write_text(text)
    return str(tmp / name)


def _flat(tmp):
    (tmp / "flat").mkdir()
    return str(tmp / "flat")


# (name, (tmp_path, request) -> args, message) for each bad input; paths are made in tmp_path by the case.
CASES = [
    ("missing data path", lambda t, r: ["train", "--data", str(t / "nope")], "does not exist"),
    ("no train/test", lambda t, r: ["train", "--data", _flat(t)], "needs train/ and test/"),
    ("empty class folder",
     lambda t, r: ["train", "--data", str(_two_class_folder(t / "d", {"train/c2/.keep": None, "test/c2/.keep": None}))],
     "c2"),
    ("class folders differ",
     lambda t, r: ["train", "--data", str(_two_class_folder(t / "d", {"train/c9/x.png": _blank()}))],
     "only in train: ['c9']"),
    ("corrupt image",
     lambda t, r: ["train", "--data", str(_two_class_folder(t / "d", {"train/c1/broken.png": b"this is not a png"}))],
     "broken.png"),
    ("teacher/student class count",
     lambda t, r: ["distill", "--teacher", str(_run(r) / "teacher.pt"), "--data", str(_two_class_folder(t / "d"))],
     "has 10 classes but the data has 2"),
    ("checkpoint vs data classes",
     lambda t, r: ["export", _student(r), "--format", "onnx", "--data",
                   str(_two_class_folder(t / "d", {"train/c1/broken.png": b"this is not a png"}))], "classes"),
    ("not a checkpoint", lambda t, r: ["export", _file(t, "notes.pt", "hello"), "--format", "onnx"],
     "not a usable edgekd checkpoint"),
    ("unknown format", lambda t, r: ["export", _student(r), "--format", "tflite"], "unknown export format 'tflite'"),
    ("unknown precision", lambda t, r: ["export", _student(r), "--format", "onnx", "--precision", "int4"],
     "precision 'int4'"),
    ("unknown device", lambda t, r: ["bench", _student(r), "--device", "tpu"], "unknown device 'tpu'"),
    ("unknown backend", lambda t, r: ["bench", _student(r), "--backends", "tensorrt"],
     "unknown bench backend 'tensorrt'"),
    ("calibration set empty",
     lambda t, r: ["export", _student(r), "--format", "onnx", "--precision", "int8", "--calib-size", "0"],
     "expected a positive whole number"),
    ("device not present", lambda t, r: ["train", "--device", "cuda"], "no CUDA GPU"),
    ("output not writable", lambda t, r: ["train", "--out", str(Path(_file(t, "blocker", "a file")) / "out")],
     "not writable"),
    ("epochs 0", lambda t, r: ["train", "--epochs", "0"], "expected a positive whole number, got '0'"),
    ("negative batch size", lambda t, r: ["train", "--batch-size", "-4"], "expected a positive whole number, got '-4'"),
    ("absurd epochs", lambda t, r: ["train", "--epochs", "100000000"], "--epochs"),
    ("absurd lr", lambda t, r: ["train", "--lr", "1e9"], "--lr"),
    ("nan lr", lambda t, r: ["train", "--lr", "nan"], "expected a positive number"),
]


def _blank():
    from PIL import Image

    return Image.new("RGB", (8, 8))


@pytest.mark.parametrize("make, message", [c[1:] for c in CASES],
                         ids=[re.sub(r"[^a-z0-9]+", "-", c[0].lower()).strip("-") for c in CASES])
def test_a_bad_input_is_one_line_exit_2_and_leaves_nothing(request, tmp_path, cli_main, one_line_error, make, message):
    if message == "no CUDA GPU" and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    args = make(tmp_path, request)
    out = tmp_path / "out"
    if "--out" not in args:
        args = args + ["--out", str(out)]
    proc = cli_main(*args, "--no-progress" if args[0] in ("train", "distill", "bench") else "--force")
    one_line_error(proc, message)
    assert not (out.exists() and any(p.suffix in (".pt", ".json", ".onnx", ".md") for p in out.rglob("*")))


def test_mixed_modes_and_sizes_are_converted_and_resized(tmp_path, cli):

    images = _digits_images()
    extra = {
        "train/c0/grey.png": images[0][0].convert("L"),
        "train/c1/rgba.png": images[1][0].convert("RGBA"),
        "train/c0/palette.png": images[2][0].convert("P"),
        "train/c1/big.png": images[3][0].resize((24, 24)),
        "test/c0/small.png": images[4][0].resize((5, 7)),
    }
    data = _two_class_folder(tmp_path / "mixed", extra)
    out = tmp_path / "out"
    cli("train", "--model", "compact-student", "--data", data, "--epochs", 1, "--out", out, "--no-progress")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_data"]["train_images"] == 34 and metrics["train_data"]["test_images"] == 11


def test_skip_bad_images_skips_and_counts(tmp_path, cli):
    data = _two_class_folder(tmp_path / "bad", {"train/c1/broken.png": b"not an image", "train/c0/cut.png": b"\x89PNG\r\n"})
    out = tmp_path / "out"
    cli("train", "--model", "compact-student", "--data", data, "--epochs", 1, "--skip-bad-images", "--out", out,
        "--no-progress")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_data"]["skipped_bad_images"] == 2 and metrics["train_data"]["train_images"] == 30


def test_nan_loss_names_epoch_and_batch_and_keeps_the_previous_checkpoint(tmp_path, cli_main):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.pt").write_bytes(b"the previous good model")
    (out / ".edgekd").write_text('{"command": "train", "files": ["model.pt"]}')  # an earlier edgekd run's
    proc = cli_main("train", "--model", "seed-teacher", "--lr", "9", "--epochs", 2, "--out", out, "--force",
                    "--no-progress")
    assert proc.returncode == 2 and "in epoch 1, batch" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (out / "model.pt").read_bytes() == b"the previous good model"


# ---------------------------------------------------------------------------------------------
# Survive being killed.

def _start(args, out):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "edgekd", *map(str, args), "--out", str(out), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_state(proc, path, epochs_done=1, timeout=600):
    import time

    import torch

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if path.exists():
            try:
                if torch.load(path, weights_only=True)["epoch"] >= epochs_done:
                    return
            except Exception:  # being replaced this instant
                pass
        assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()}"
        time.sleep(0.05)
    raise AssertionError("no end-of-epoch state appeared")


TRAIN = ["train", "--model", "compact-student", "--epochs", 3, "--seed", 3]


def test_sigkill_mid_epoch_then_resume_finishes_like_an_uninterrupted_run(tmp_path, cli):
    import signal

    reference = tmp_path / "reference"
    cli(*TRAIN, "--out", reference, "--no-progress")
    out = tmp_path / "killed"
    proc = _start(TRAIN, out)
    _wait_for_state(proc, out / "model.state.pt", epochs_done=1)
    proc.send_signal(signal.SIGKILL)  # during epoch 2
    proc.wait()
    assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()
    cli("train", "--resume", out)
    resumed = json.loads((out / "metrics.json").read_text())
    uninterrupted = json.loads((reference / "metrics.json").read_text())
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert abs(resumed["test_top1"] - uninterrupted["test_top1"]) <= 0.02
    assert not list(out.glob("*edgekd-tmp-*"))


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path, cli):
    import signal

    out = tmp_path / "run"
    proc = _start(TRAIN, out)
    _wait_for_state(proc, out / "model.state.pt", epochs_done=1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:
        pytest.skip("the run finished before Ctrl-C reached it")
    assert proc.returncode == 130 and f"resume with: edgekd train --resume {out}" in err
    assert "Traceback" not in err
    cli("train", "--resume", out)
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 3


def test_distill_resumes_after_the_teacher_phase(tmp_path, cli):
    import signal

    out = tmp_path / "d"
    args = ["distill", "--epochs", 2, "--teacher-epochs", 1]
    proc = _start(args, out)
    _wait_for_state(proc, out / "student.state.pt", epochs_done=1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "teacher.pt").exists()
    teacher_bytes = (out / "teacher.pt").read_bytes()
    cli("distill", "--resume", out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert (out / "teacher.pt").read_bytes() == teacher_bytes  # the teacher was not trained again


# ---------------------------------------------------------------------------------------------
# Loads that cannot run code; bundles that cannot reach outside their folder.

@pytest.mark.parametrize("field, value, message", [
    ("format", "tflite", "field 'format' must be onnx or openvino"),
    ("classes", [], "field 'classes' must be a non-empty list"),
    ("files", {"../model.onnx": "0" * 64}, "field 'files' must map plain file names"),
])
def test_manifest_schema_errors_name_the_field(tmp_path, onnx_bundle, cli_main, one_line_error, field, value, message):
    import shutil

    from PIL import Image

    img = tmp_path / "x.png"
    Image.new("L", (8, 8)).save(img)
    copy = tmp_path / f"b-{field}"
    shutil.copytree(onnx_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest[field] = value
    (copy / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(cli_main("predict", copy, img), message)


def test_onnx_external_data_outside_the_bundle_is_refused(tmp_path, onnx_bundle, cli_main):
    import shutil

    import onnx

    from edgekd.bundle.manifest import sha256_file

    copy = tmp_path / "b"
    shutil.copytree(onnx_bundle, copy)
    model = onnx.load(str(copy / "model.onnx"))
    tensor = model.graph.initializer[0]  # hand-made, as onnx itself refuses to write such a path
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../stolen.data"
    (copy / "model.onnx").write_bytes(model.SerializeToString())
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = sha256_file(copy / "model.onnx")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    proc = cli_main("predict", copy, tmp_path / "x.png")
    assert proc.returncode == 2 and "not a file of the bundle" in proc.stderr, proc.stderr


def test_a_symlink_in_a_bundle_pointing_outside_is_refused(tmp_path, onnx_bundle, cli_main):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(onnx_bundle, copy)
    outside = tmp_path / "outside.onnx"
    shutil.move(copy / "model.onnx", outside)
    (copy / "model.onnx").symlink_to(outside)
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    proc = cli_main("predict", copy, tmp_path / "x.png")
    assert proc.returncode == 2 and "points outside the bundle folder" in proc.stderr
