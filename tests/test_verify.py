"""Verify everything edgekd reads back (issue 26): markers that know what they own, caches that prove what they
hold, files that are files, sizes bounded before memory is taken, no silent answers, messages that name the
user's thing. Each case builds its hostile input small in tmp_path and runs the real code (the CLI in this
process where it can). Anything that could hang (a FIFO) runs under an alarm, so a regression fails here."""

import contextlib
import json
import os
import signal
import tarfile

import numpy as np
import pytest

from edgekd import EdgeKDError

DIGITS = [str(i) for i in range(10)]


@contextlib.contextmanager
def no_hang(seconds=60):
    """Fail (not hang) when the block blocks: open() of a FIFO is interrupted by the alarm's exception."""
    def fail(*_):
        raise TimeoutError(f"blocked for {seconds} s (a FIFO was opened?)")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _png(path, value=0, size=8):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8), "L").save(path)
    return path


def _folder(root, classes=("a", "b"), per_class=3):
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            for i in range(per_class):
                _png(root / split / name / f"{i}.png", 40 * c + i)
    return root


def _bundle(folder, classes, weight=None, size=8, crop_pct=None):
    """An ONNX bundle: a (1, size, size) grey input, flattened and multiplied by ``weight`` into class scores."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgekd.bundle.manifest import sha256_file, write_manifest

    if weight is None:
        weight = np.random.default_rng(0).normal(size=(size * size, len(classes))).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(classes)])],
        [numpy_helper.from_array(np.asarray(weight, dtype=np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    os.makedirs(folder, exist_ok=True)
    onnx.save(model, os.path.join(folder, "model.onnx"))
    spec = {"shape": [1, 1, size, size], "layout": "NCHW", "color": "L", "resize": [size, size], "mean": [0.5],
            "std": [0.5]}
    if crop_pct is not None:
        spec["crop_pct"] = crop_pct
    write_manifest(str(folder), {"format": "onnx", "precision": "fp32", "model_file": "model.onnx",
                                 "files": {"model.onnx": sha256_file(os.path.join(folder, "model.onnx"))},
                                 "input": spec, "classes": list(classes)})
    return folder


# --- 1. ownership that knows what it wrote ------------------------------------------------------------------

@pytest.mark.parametrize("marker", ["with-kinds", "old-marker-without-kinds"])
def test_force_never_removes_a_user_folder_named_like_an_output(tmp_path, cli_main, one_line_error, marker):
    out = tmp_path / "run"
    (out / "metrics.json").mkdir(parents=True)
    (out / "metrics.json" / "mine.txt").write_text("the user's own file")
    (out / "model.pt").write_bytes(b"an earlier model")
    record = {"command": "train", "edgekd": "0.1.0", "files": ["model.pt", "metrics.json"]}
    if marker == "with-kinds":
        record["kinds"] = {"model.pt": "file", "metrics.json": "file"}
    (out / ".edgekd").write_text(json.dumps(record))
    proc = cli_main("train", "--epochs", 1, "--out", out, "--force", "--no-progress")
    one_line_error(proc, "metrics.json")
    assert (out / "metrics.json" / "mine.txt").read_text() == "the user's own file"
    assert (out / "model.pt").read_bytes() == b"an earlier model"


def test_a_marker_records_each_outputs_kind_and_the_command(tmp_path):
    from edgekd.base.marker import owned, owned_kinds, read_marker
    from edgekd.base.outdir import RunFolder

    out = tmp_path / "run"
    with RunFolder(str(out), "train"):
        (out / "model.pt").write_bytes(b"m")
        (out / "metrics.json").write_text("{}")
    marker = read_marker(str(out))
    assert marker is not None
    assert marker.command == "train" and marker.kinds == {"metrics.json": "file", "model.pt": "file"}
    assert owned_kinds(str(out)) == {"metrics.json": "file", "model.pt": "file"}
    os.remove(out / "model.pt")
    (out / "model.pt").mkdir()  # the same name, now a folder: not what edgekd wrote
    assert owned(str(out)) == {"metrics.json"}


def test_export_force_into_a_fifo_manifest_or_zip_is_refused_not_waited_on(tmp_path):
    from edgekd.base.outdir import bundle_problem

    (tmp_path / "b").mkdir()
    os.mkfifo(tmp_path / "b" / "manifest.json")
    with no_hang():
        assert bundle_problem(str(tmp_path / "b")) == "it has no readable manifest.json"
    os.mkfifo(tmp_path / "b.zip")
    from edgekd.base.outdir import check_zip

    with no_hang(), pytest.raises(EdgeKDError, match="is not a bundle zip written by edgekd"):
        check_zip(str(tmp_path / "b.zip"), force=True)


def test_a_command_never_replaces_another_commands_run(tmp_path, cli_main, one_line_error):
    out = tmp_path / "run"
    out.mkdir()
    (out / "student.pt").write_bytes(b"a trained student")
    (out / "metrics.json").write_text("{}")
    (out / ".edgekd").write_text(json.dumps({"command": "distill", "files": ["student.pt", "metrics.json"],
                                             "kinds": {"student.pt": "file", "metrics.json": "file"}}))
    one_line_error(cli_main("train", "--epochs", 1, "--out", out, "--force", "--no-progress"),
                   "holds a run of edgekd 'distill'; edgekd train never replaces another command's run")
    assert (out / "student.pt").read_bytes() == b"a trained student"


# --- 2. derived artifacts prove themselves --------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    from edgekd.core.config import TrainOptions
    from edgekd.core.distill import prepare_data

    return prepare_data(TrainOptions(data="digits", progress=False, workers=0, train_subset=60, augment="standard",
                                     aug_seed=1, device="cpu"))


class _Counted:
    """A tiny real teacher (a torch module) that counts its forward passes."""

    def __new__(cls, data):
        import torch
        from torch import nn

        from edgekd.core.teachers import FrozenTeacher

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.conv, self.head, self.calls = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(16, 10), 0

            def forward(self, x):
                self.calls += 1
                return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2), 1))

        teacher = FrozenTeacher(Net(), data.input, data.input)
        teacher.sha256 = "cd" * 32
        return teacher


def _damage_view(path, how):
    from numpy.lib.format import open_memmap

    data = np.load(path)
    if how == "values-replaced":  # a valid file of the right shape, other numbers
        out = open_memmap(path, mode="w+", dtype=data.dtype, shape=data.shape)
        out[:] = 7.0
        out.flush()
    elif how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "short":  # fewer rows, a valid file
        np.save(path, data[:5])
    elif how == "object-dtype":
        np.save(path, np.array([{"a": 1}] * len(data), dtype=object), allow_pickle=True)
    elif how == "other-dtype":
        np.save(path, data.astype(np.float64))


@pytest.mark.parametrize("how", ["values-replaced", "truncated", "short", "object-dtype", "other-dtype"])
def test_a_teacher_cache_view_that_does_not_prove_itself_is_rebuilt(digits, tmp_path, how):
    import torch

    from edgekd.core.teacher_cache import TeacherCache

    data, train, _ = digits
    teacher = _Counted(data)
    cache = TeacherCache(str(tmp_path / "c"), teacher, train, dtype="float32")
    cache.build(teacher, 1, batch_size=30, progress=False)
    _damage_view(os.path.join(cache.path, "view-0001.npy"), how)
    again = TeacherCache(str(tmp_path / "c"), teacher, train, dtype="float32")
    calls = teacher.model.calls
    assert again.build(teacher, 1, batch_size=30, progress=False) > 0 and teacher.model.calls > calls  # rebuilt
    idx = torch.arange(len(train))
    x, _ = train.batch(idx, epoch=1)
    torch.testing.assert_close(again.lookup(1, idx), teacher(x), rtol=0, atol=1e-5)


def test_a_teacher_cache_changed_after_the_build_is_refused_on_use(digits, tmp_path):
    import torch

    from edgekd.core.teacher_cache import TeacherCache

    data, train, _ = digits
    teacher = _Counted(data)
    TeacherCache(str(tmp_path / "c"), teacher, train, dtype="float32").build(teacher, 1, progress=False)
    reader = TeacherCache(str(tmp_path / "c"), teacher, train, dtype="float32")  # a rank that did not build it
    reader.load()
    _damage_view(os.path.join(reader.path, "view-0001.npy"), "values-replaced")
    with pytest.raises(EdgeKDError, match="does not match its checksum"):
        reader.lookup(1, torch.arange(3))


def test_views_without_their_description_are_computed_again_and_a_folder_view_is_refused(digits, tmp_path):
    from edgekd.core.teacher_cache import TeacherCache

    data, train, _ = digits
    teacher = _Counted(data)
    cache = TeacherCache(str(tmp_path / "c"), teacher, train, dtype="float32")
    cache.build(teacher, 1, progress=False)
    os.remove(os.path.join(cache.path, "meta.json"))
    calls = teacher.model.calls
    again = TeacherCache(str(tmp_path / "c"), teacher, train, dtype="float32")
    assert again.build(teacher, 1, progress=False) > 0 and teacher.model.calls > calls
    assert again._view_problem(1) is None
    os.remove(os.path.join(cache.path, "view-0001.npy"))
    os.mkdir(os.path.join(cache.path, "view-0001.npy"))
    with pytest.raises(EdgeKDError, match="not a regular file"):
        TeacherCache(str(tmp_path / "c"), teacher, train, dtype="float32").build(teacher, 1, progress=False)
    assert os.path.isdir(os.path.join(cache.path, "view-0001.npy"))


@pytest.mark.parametrize("how", ["not-json", "bad-classes", "another-key", "a-fifo"])
def test_a_badly_described_teacher_cache_is_refused_in_one_line(digits, tmp_path, how):
    from edgekd.core.teacher_cache import TeacherCache

    data, train, _ = digits
    teacher = _Counted(data)
    cache = TeacherCache(str(tmp_path / "c"), teacher, train, dtype="float32")
    cache.build(teacher, 1, progress=False)
    meta = os.path.join(cache.path, "meta.json")
    record = json.load(open(meta))
    os.remove(meta)
    if how == "not-json":
        open(meta, "w").write("{not json")
    elif how == "bad-classes":
        record["description"]["classes"] = "ten"
        json.dump(record, open(meta, "w"))
    elif how == "another-key":
        record["description"]["key"]["teacher_sha256"] = "00" * 32
        json.dump(record, open(meta, "w"))
    else:
        os.mkfifo(meta)
    with no_hang(), pytest.raises(EdgeKDError, match="teacher cache .* (unreadable|describes|another teacher)"):
        TeacherCache(str(tmp_path / "c"), teacher, train, dtype="float32").build(teacher, 1, progress=False)


def test_an_integrity_index_proves_files_and_drops_another_description(tmp_path):
    from edgekd.base.integrity import Index

    (tmp_path / "a.bin").write_bytes(b"derived bytes")
    index = Index.open(str(tmp_path), {"made from": "x"})
    assert index.check("a.bin") and not index.problem  # not listed: unproven
    index.record("a.bin")
    assert Index.open(str(tmp_path), {"made from": "x"}).check("a.bin") is None
    (tmp_path / "a.bin").write_bytes(b"derived bytez")
    assert "checksum" in Index.open(str(tmp_path), {"made from": "x"}).check("a.bin")
    other = Index.open(str(tmp_path), {"made from": "y"})
    assert other.problem and other.check("a.bin")


@pytest.mark.parametrize("option", ["--teacher-cache", "--out"])
def test_a_cache_or_an_output_inside_the_data_is_refused(tmp_path, cli_main, one_line_error, option):
    data = _folder(tmp_path / "data")
    inside = data / "train" / "derived"
    argv = ["distill", "--data", data, "--epochs", 1, "--no-progress", "--out",
            inside if option == "--out" else tmp_path / "out"]
    if option == "--teacher-cache":
        argv += ["--teacher-cache", inside]
    one_line_error(cli_main(*argv), f"{option} {str(inside)!r} is inside the data")
    assert not inside.exists()


def test_an_export_inside_its_validation_or_calibration_data_is_refused(tmp_path, cli_main, one_line_error,
                                                                        digits_run):
    data = _folder(tmp_path / "data")
    for option in ("--data", "--calib-data"):
        inside = data / "test" / "bundle"
        argv = ["export", digits_run / "student.pt", "--format", "onnx", option, data, "--out", inside]
        one_line_error(cli_main(*argv), f"--out {str(inside)!r} is inside the data")
        assert not inside.exists()


# --- 3. regular files only ------------------------------------------------------------------------------------

def test_fifo_socket_and_device_are_refused_before_open(tmp_path):
    import socket

    from edgekd.base.files import NotRegularFile, open_regular, require_regular

    os.mkfifo(tmp_path / "pipe.png")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock.png"))
    with no_hang():
        for path, kind in ((tmp_path / "pipe.png", "FIFO"), (tmp_path / "sock.png", "socket"),
                           ("/dev/null", "character device"), (tmp_path, "folder")):
            with pytest.raises(NotRegularFile, match=f"not a regular file \\(it is an? {kind}"):
                open_regular(path, "image")
    sock.close()
    assert require_regular(_png(tmp_path / "ok.png"), "image").st_size > 0


@pytest.mark.parametrize("where", ["train", "unlabeled"])
def test_a_fifo_named_like_an_image_is_refused_not_waited_on(tmp_path, cli_main, one_line_error, where):
    data = _folder(tmp_path / "data")
    argv = ["distill", "--data", data, "--epochs", 1, "--no-progress", "--out", tmp_path / "out"]
    if where == "train":
        os.mkfifo(data / "train" / "a" / "pipe.png")
    else:
        (tmp_path / "more").mkdir()
        _png(tmp_path / "more" / "x.png")
        os.mkfifo(tmp_path / "more" / "pipe.png")
        argv += ["--unlabeled", tmp_path / "more"]
    with no_hang(120):
        one_line_error(cli_main(*argv), "pipe.png' is not a regular file (it is a FIFO")


@pytest.mark.parametrize("name", ["pipe.onnx", "pipe.pt"])
def test_a_fifo_teacher_file_is_refused_not_waited_on(tmp_path, cli_main, one_line_error, name):
    os.mkfifo(tmp_path / name)
    with no_hang(120):
        proc = cli_main("distill", "--teacher", tmp_path / name, "--teacher-mean", "0.5", "--teacher-std", "0.5",
                        "--epochs", 1, "--out", tmp_path / "out", "--no-progress")
    one_line_error(proc, name)


def test_a_fifo_shard_and_a_fifo_class_list_are_refused(tmp_path):
    from edgekd.core.data import load_data

    root = tmp_path / "wds"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        os.mkfifo(root / split / "part-0.tar")
    with no_hang(), pytest.raises(EdgeKDError, match="part-0.tar' is not a regular file"):
        load_data(f"webdataset:{root}")
    os.mkfifo(root / "classes.txt")
    with no_hang(), pytest.raises(EdgeKDError, match="classes.txt' is not a regular file"):
        load_data(f"webdataset:{root}")


def test_make_shards_refuses_a_fifo_image_and_leaves_no_output(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_shards", os.path.join(os.path.dirname(__file__), "..",
                                                                              "tools", "make_shards.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    data = _folder(tmp_path / "data")
    os.mkfifo(data / "test" / "b" / "pipe.png")
    with no_hang():
        assert tool.main([str(data), str(tmp_path / "shards")]) == 2
    assert not (tmp_path / "shards").exists()


def test_predict_refuses_a_fifo_image(tmp_path, cli_main, one_line_error):
    bundle = _bundle(tmp_path / "b", ["a", "b"])
    os.mkfifo(tmp_path / "pipe.png")
    with no_hang():
        one_line_error(cli_main("predict", bundle, tmp_path / "pipe.png"), "is not a regular file")


def test_a_fifo_config_file_is_refused(tmp_path, cli_main, one_line_error):
    os.mkfifo(tmp_path / "config.yaml")
    with no_hang():
        one_line_error(cli_main("train", "--config", tmp_path / "config.yaml", "--out", tmp_path / "out"),
                       "config file")


@pytest.mark.parametrize("command", ["predict", "deploy"])
def test_a_manifest_linked_out_of_the_bundle_is_refused(tmp_path, cli_main, one_line_error, command):
    bundle = _bundle(tmp_path / "b", ["a", "b"])
    outside = tmp_path / "elsewhere.json"
    os.replace(bundle / "manifest.json", outside)
    os.symlink(outside, bundle / "manifest.json")
    image = _png(tmp_path / "x.png")
    argv = ["predict", bundle, image] if command == "predict" else ["deploy", bundle, "ssh://nohost.invalid"]
    one_line_error(cli_main(*argv), "links out of a bundle are refused")


# --- 4. bounds in memory --------------------------------------------------------------------------------------

def test_crop_pct_that_asks_for_billions_of_pixels_is_refused(tmp_path, cli_main, one_line_error):
    one_line_error(cli_main("train", "--crop-pct", "1e-9", "--epochs", 1, "--out", tmp_path / "out", "--no-progress"),
                   "megapixels")
    assert not (tmp_path / "out" / "model.pt").exists()


def test_a_manifest_crop_pct_that_asks_for_billions_of_pixels_is_refused(tmp_path, cli_main, one_line_error):
    bundle = _bundle(tmp_path / "b", ["a", "b"])
    manifest = json.load(open(bundle / "manifest.json"))
    manifest["input"]["crop_pct"] = 1e-9
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(cli_main("predict", bundle, _png(tmp_path / "x.png")), "megapixels")


def test_the_runner_refuses_a_resize_beyond_the_pixel_limit_before_allocating():
    from edgekd.base.errors import BundleError
    from edgekd.bundle.preprocessing import resize_crop

    with pytest.raises(BundleError, match="megapixels"):
        resize_crop((640, 480), (224, 224), 1e-9)


def test_teacher_input_size_is_bounded_by_the_bytes_of_a_batch(tmp_path, cli_main, one_line_error):
    line = one_line_error(cli_main("distill", "--teacher-input-size", 4096, "--batch-size", 256, "--epochs", 1,
                                   "--out", tmp_path / "out", "--no-progress"), "--teacher-input-size 4096")
    assert "51.5 GB" in line and "limit" in line


def test_a_stray_label_in_a_shard_is_refused_not_made_a_class(tmp_path):
    import io

    from edgekd.core.data import load_data

    root = tmp_path / "wds"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        with tarfile.open(root / split / "part-0.tar", "w") as tar:
            for k, label in enumerate([0, 1, 0, 99999 if split == "train" else 1]):
                png = io.BytesIO()
                from PIL import Image

                Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(png, format="PNG")
                for name, data in ((f"k{k}.png", png.getvalue()), (f"k{k}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    with pytest.raises(EdgeKDError, match="reach class index 99999 but only 3 of the 100000 classes"):
        load_data(f"webdataset:{root}")


def test_byte_bounds_name_the_value_and_the_limit_and_refuse_nan():
    from edgekd.base.bounds import check_bytes

    with pytest.raises(EdgeKDError, match=r"--x 7: it asks for 2.0 GB of memory, more than the limit of 1.0 GB"):
        check_bytes("--x", 7, 2e9, 1e9)
    with pytest.raises(EdgeKDError):
        check_bytes("--x", "nan", float("nan"), 1e9)


# --- 5. no silent answers -------------------------------------------------------------------------------------

def test_bench_marks_a_row_with_non_finite_outputs_as_failed(tmp_path, cli_main):
    bundle = _bundle(tmp_path / "nan", DIGITS, weight=np.full((64, 10), np.nan, np.float32))
    proc = cli_main("bench", bundle, "--quick", "--no-progress", "--out", tmp_path / "out")
    rows = json.load(open(tmp_path / "out" / "results.json"))["rows"]
    assert rows and all("non-finite" in row["status"] for row in rows), (proc.stderr, rows)
    assert all(row.get("top1") is None for row in rows)


def test_duplicate_keys_in_a_json_manifest_are_an_error(tmp_path, cli_main, one_line_error):
    bundle = _bundle(tmp_path / "b", ["a", "b"])
    text = (bundle / "manifest.json").read_text()
    twice = text.replace('"precision": "fp32"', '"precision": "fp32", "precision": "int8"')
    (bundle / "manifest.json").write_text(twice)
    one_line_error(cli_main("predict", bundle, _png(tmp_path / "x.png")), "appears twice")


@pytest.mark.parametrize("name", ["part-1.tar.gz", "notes.txt"])
def test_a_file_among_shards_that_is_not_a_tar_is_refused_by_name(tmp_path, name):
    from edgekd.core.data import load_data

    root = tmp_path / "wds"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        with tarfile.open(root / split / "part-0.tar", "w"):
            pass
    (root / "train" / name).write_bytes(b"x")
    with pytest.raises(EdgeKDError, match=f"holds '{name}', which is not a .tar shard"):
        load_data(f"webdataset:{root}")


@pytest.mark.parametrize("opset", [9, 17, 30])
def test_an_unsupported_opset_is_refused_with_the_range(tmp_path, cli_main, one_line_error, opset):
    one_line_error(cli_main("export", tmp_path / "x.pt", "--format", "onnx", "--opset", opset, "--out", tmp_path / "b"),
                   "opsets 18 to 23")
    assert not (tmp_path / "b").exists()


# --- 6. messages that name the user's thing -------------------------------------------------------------------

@pytest.mark.parametrize("source", ["data", "teacher", "student", "loss"])
def test_a_non_finite_loss_is_traced_to_its_source(source):
    import torch

    from edgekd.core.train_loop import _nan_source

    x, t, s = torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 4)
    {"data": x, "teacher": t, "student": s, "loss": torch.zeros(1, 1)}[source][0, 0] = float("nan")
    said = _nan_source(x, t, s)
    assert {"data": "the data", "teacher": "the teacher", "student": "lower --lr", "loss": "the loss"}[source] in said
    assert source == "student" or "--lr" not in said


def test_the_deploy_hint_is_shell_quoted():
    import shlex

    from edgekd.cli.deploy import run_hint

    folder = "/opt/my models/$(touch x)"
    hint = run_hint("/usr/bin/python 3", folder + "/edgekd_runner.py", folder + "/b'x")
    assert shlex.split(hint) == ["/usr/bin/python 3", folder + "/edgekd_runner.py", "predict", folder + "/b'x",
                                 "IMAGE..."]


def test_a_missing_image_is_named_as_the_user_typed_it(tmp_path, cli_main, one_line_error, monkeypatch):
    bundle = _bundle(tmp_path / "b", ["a", "b"])
    monkeypatch.chdir(tmp_path)
    one_line_error(cli_main("predict", bundle, "nothing here.png"), "'nothing here.png'")


def test_the_pixel_bounds_are_one_number_everywhere():
    from edgekd.base.bounds import MAX_RESIZE_PIXELS
    from edgekd.bundle import manifest, preprocessing

    assert MAX_RESIZE_PIXELS == preprocessing.MAX_IMAGE_PIXELS == manifest.MAX_RESIZE_PIXELS
