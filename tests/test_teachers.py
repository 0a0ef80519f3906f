"""Bring your own teacher: every teacher source on a tiny model, the teacher's own view, class matching,
the cache keyed by the teacher's sha256, K replayed views, and the black-box limits.

The models are tiny and random (their logits are all these tests compare); pretrained weights come
from local files the tests write, never from a download.
"""

import json

import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F

from edgekd import EdgeKDError
from edgekd.core.checkpoint import save_checkpoint
from edgekd.core.config import DistillOptions
from edgekd.core.data import InputSpec
from edgekd.core.distill import prepare_data
from edgekd.core.models import build_model
from edgekd.core.teacher_cache import TeacherCache
from edgekd.core.teachers import TeacherOptions, class_index, load_teacher

T_SIZE, T_MEAN, T_STD = 40, 0.3, 0.2  # the teachers' own view: 40 px, not the data's 32 px and 0.5/0.5

TINY_SOURCE = '''
import torch
from torch import nn


class Tiny(nn.Module):
    """Conv, ReLU, 2x2 average pooling, linear: runs at any input size."""

    def __init__(self, channels=1, classes=10):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2), 1))


def make():
    return Tiny()
'''
_namespace = {}
exec(TINY_SOURCE, _namespace)
Tiny = _namespace["Tiny"]


def _cfg(**kw):
    cfg = {"data": "digits", "progress": False, "workers": 0, "train_subset": 60, "augment": "standard", "aug_seed": 1,
           "device": "cpu"}
    cfg.update(kw)
    return DistillOptions(**cfg)


def _spec(spec):
    """The options of a distill run whose --teacher is ``spec``."""
    return DistillOptions(teacher=spec)


def _options(**values):
    """TeacherOptions from distill's --teacher-* options (as config.yaml would give them)."""
    return TeacherOptions.from_options(DistillOptions(**values))


@pytest.fixture(scope="module")
def digits():
    data, train, test = prepare_data(_cfg())
    return data, train, test


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Tiny().eval()


def _expected(model, x, size=T_SIZE, mean=T_MEAN, std=T_STD, channels=1):
    """What the teacher must say: the student's view (0.5/0.5, 32 px) made into the teacher's by hand."""
    pixels = x * 0.5 + 0.5
    if channels == 3:
        pixels = pixels.repeat(1, 3, 1, 1)
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean, std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        return model((pixels - mean) / std)


def _batch(train, n=6):
    x, _ = train.batch(torch.arange(n), epoch=1)
    return x


def _onnx(model, path, size=T_SIZE, channels=1):
    torch.onnx.export(model, (torch.zeros(2, channels, size, size),), str(path), dynamo=True, input_names=["input"],
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},), external_data=False)
    return str(path)


def _checkpoint(path, data, size=T_SIZE, classes=None):
    """An edgekd checkpoint of an untrained compact-student at the teachers' view; returns (path, model)."""
    spec = InputSpec(1, size, size, [T_MEAN], [T_STD])
    torch.manual_seed(5)
    model = build_model("compact-student", 10, spec).eval()
    save_checkpoint(str(path), model, spec="compact-student", classes=classes or data.classes, input_spec=spec,
                    data_spec="digits", metrics={"test_top1": 0.5}, config={})
    return str(path), model


def _make_source(kind, model, tmp_path, data, monkeypatch):
    """(spec, options, reference model) of ``model`` written as a teacher of ``kind`` (checkpoints and bundles
    hold a model edgekd can rebuild instead)."""
    norm = {"teacher_mean": str(T_MEAN), "teacher_std": str(T_STD)}
    if kind == "onnx":
        return "onnx:" + _onnx(model, tmp_path / "t.onnx"), norm, model
    if kind == "openvino":
        import openvino as ov

        ov.save_model(ov.convert_model(_onnx(model, tmp_path / "t.onnx")), str(tmp_path / "t.xml"), compress_to_fp16=False)
        return str(tmp_path / "t.xml"), norm, model
    if kind == "torchscript":  # a .pt file: told apart from an edgekd checkpoint by its contents
        torch.jit.trace(model, torch.zeros(1, 1, T_SIZE, T_SIZE)).save(str(tmp_path / "t.pt"))
        return str(tmp_path / "t.pt"), {**norm, "teacher_input_size": str(T_SIZE)}, model
    if kind == "pt2":
        program = torch.export.export(model, (torch.zeros(2, 1, T_SIZE, T_SIZE),),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
        torch.export.save(program, str(tmp_path / "t.pt2"))
        return str(tmp_path / "t.pt2"), norm, model
    if kind == "factory":
        (tmp_path / "my_teachers.py").write_text(TINY_SOURCE)
        monkeypatch.syspath_prepend(str(tmp_path))
        torch.save(model.state_dict(), tmp_path / "w.pth")
        return "my_teachers:make", {**norm, "teacher_weights": str(tmp_path / "w.pth"),
                                    "teacher_input_size": str(T_SIZE)}, model
    if kind == "checkpoint":
        path, reference = _checkpoint(tmp_path / "t.pt", data)
        return path, {}, reference
    if kind == "bundle":
        from edgekd.export.pipeline import ExportOptions, export_checkpoint

        ckpt, reference = _checkpoint(tmp_path / "t.pt", data)
        export_checkpoint(ckpt, ExportOptions(format="openvino", out=str(tmp_path / "bundle"), val_size=20, progress=False,
                                              zip=True))
        return str(tmp_path / "bundle.zip"), {}, reference
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["onnx", "openvino", "torchscript", "pt2", "factory", "checkpoint", "bundle"])
def test_every_source_gives_the_original_logits_on_its_own_view(kind, tiny, digits, tmp_path, monkeypatch):
    data, train, _ = digits
    spec, opts, reference = _make_source(kind, tiny, tmp_path, data, monkeypatch)
    teacher = load_teacher(_spec(spec), _options(**opts), data)
    assert teacher.kind == kind and len(teacher.sha256) == 64
    assert teacher.describe()["input"]["size"] == [T_SIZE, T_SIZE] and teacher.describe()["view"]["resize"]
    x = _batch(train)
    torch.testing.assert_close(teacher(x), _expected(reference, x), rtol=1e-4, atol=1e-4)
    assert teacher.is_module == (kind in ("factory", "checkpoint"))


def test_an_edgekd_onnx_export_carries_its_classes_and_preprocessing(tiny, digits, tmp_path):
    """`edgekd export` writes the edgekd.* metadata, so the ONNX file alone is a teacher with names."""
    from edgekd.export.pipeline import ExportOptions, export_checkpoint

    data, train, _ = digits
    names = data.classes[::-1]  # a teacher whose outputs run 9..0: matched by name, so reversed back
    ckpt, reference = _checkpoint(tmp_path / "t.pt", data, classes=names)
    export_checkpoint(ckpt, ExportOptions(format="onnx", out=str(tmp_path / "b"), val_size=20, progress=False))
    teacher = load_teacher(_spec(str(tmp_path / "b" / "model.onnx")), TeacherOptions(), data)
    d = teacher.describe()
    assert d["classes"]["matched"] == "by name" and d["classes"]["index"] == list(range(9, -1, -1))
    assert d["input"]["mean"] == [T_MEAN] and d["input"]["from"]["mean"] == "ONNX metadata"
    x = _batch(train)
    torch.testing.assert_close(teacher(x), _expected(reference, x).flip(1), rtol=1e-4, atol=1e-4)


def test_torchvision_teacher_from_a_local_weights_file(digits, tmp_path):
    import torchvision

    data, train, _ = digits
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(model.state_dict(), tmp_path / "resnet18.pth")
    teacher = load_teacher(_spec("torchvision:resnet18"),
                           _options(teacher_weights=str(tmp_path / "resnet18.pth")), data)
    d = teacher.describe()  # size and normalisation from the weights' transforms; grey digits made RGB
    assert (d["kind"], d["input"]["size"], d["input"]["channels"]) == ("torchvision", [224, 224], 3)
    x = _batch(train, 3)
    expected = _expected(model, x, 224, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], channels=3)
    torch.testing.assert_close(teacher(x), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(EdgeKDError, match="no weights 'IMAGENET9'"):
        load_teacher(_spec("torchvision:resnet18:IMAGENET9"), TeacherOptions(), data)


def test_timm_teacher_from_a_local_safetensors_file(digits, tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    data, train, _ = digits
    torch.manual_seed(2)
    model = timm.create_model("test_resnet", num_classes=10).eval()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    teacher = load_teacher(_spec("timm:test_resnet"),
                           _options(teacher_weights=str(tmp_path / "w.safetensors")), data)
    config = timm.data.resolve_data_config(model=model)
    size = config["input_size"][1]
    assert teacher.describe()["input"]["size"] == [size, size]
    x = _batch(train, 3)
    torch.testing.assert_close(teacher(x), _expected(model, x, size, list(config["mean"]), list(config["std"]), 3),
                               rtol=1e-4, atol=1e-4)


def test_class_order_is_matched_by_name_picked_by_index_or_refused(tmp_path):
    data = ["cat", "dog", "fox"]
    index, record = class_index(data, 3, names=["fox", "cat", "dog"], names_from="test")
    assert index == [1, 2, 0] and record.matched == "by name"
    assert class_index(data, 3, names=list(data))[0] is None  # already in order: nothing to permute
    # A subset of a larger teacher by index: three of its 20 outputs, named, in any line order.
    picks = tmp_path / "picks.txt"
    picks.write_text("# teacher output, data class\n17 dog\n3 cat\n\n9 fox\n")
    assert class_index(data, 20, classes_file=str(picks))[0] == [3, 17, 9]
    bare = tmp_path / "bare.txt"
    bare.write_text("5\n6\n7\n")
    assert class_index(data, 20, classes_file=str(bare))[0] == [5, 6, 7]
    names = tmp_path / "names.txt"
    names.write_text("dog\nfox\ncat\nbird\n")
    assert class_index(data, 4, classes_file=str(names))[0] == [2, 0, 1]
    errors = [
        (dict(outputs=7), "has 7 outputs but the data has 3 classes"),
        (dict(outputs=3, names=["fox", "cat", "wolf"]), "data class 'dog' is not a class of teacher"),
        (dict(outputs=4, names=["fox", "cat", "dog"]), "names 3 classes .* but has 4 outputs"),
        (dict(outputs=3, names=["dog", "cat", "dog"]), "names teacher outputs \\[0, 2\\]"),
        (dict(outputs=3, classes_file=str(names)), "names 4 classes but teacher 'teacher' has 3 outputs"),
        (dict(outputs=10, classes_file=str(picks)), "picks output 17, but teacher 'teacher' has 10 outputs"),
    ]
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("1 dog\n2 wolf\n3 cat\n")
    errors.append((dict(outputs=5, classes_file=str(wrong)), "names 'wolf', which is not a data class"))
    short = tmp_path / "short.txt"
    short.write_text("1 dog\n2 cat\n")
    errors.append((dict(outputs=5, classes_file=str(short)), "picks 2 outputs but the data has 3 classes"))
    for kwargs, message in errors:
        with pytest.raises(EdgeKDError, match=message):
            class_index(data, **kwargs)


def test_a_subset_of_a_larger_teacher_and_probabilities(digits, tmp_path):
    """A 20-output teacher that returns probabilities: ten outputs picked by index, log-probs as logits."""
    data, train, _ = digits
    torch.manual_seed(3)
    big = nn.Sequential(Tiny(classes=20), nn.Softmax(dim=1)).eval()
    picks = tmp_path / "picks.txt"
    order = [19 - 2 * k for k in range(10)]
    picks.write_text("".join(f"{i} {name}\n" for i, name in zip(order, data.classes)))
    opts = _options(teacher_mean="0.3", teacher_std="0.2", teacher_outputs="probs", teacher_classes=str(picks))
    teacher = load_teacher(_spec("onnx:" + _onnx(big, tmp_path / "big.onnx")), opts, data)
    x = _batch(train)
    torch.testing.assert_close(teacher(x), _expected(big, x).log()[:, order], rtol=1e-4, atol=1e-4)
    seven = Tiny(classes=7).eval()
    with pytest.raises(EdgeKDError, match="has 7 outputs but the data has 10 classes; pass --teacher-classes"):
        load_teacher(_spec(_onnx(seven, tmp_path / "seven.onnx")), TeacherOptions(mean=[0.5], std=[0.5]), data)
    with pytest.raises(EdgeKDError, match="carries no input normalisation"):
        load_teacher(_spec(str(tmp_path / "big.onnx")), TeacherOptions(), data)


def test_a_teacher_loader_never_trains_a_model_spec(digits, tmp_path):
    """A model-spec teacher is trained by the run that needs it (distill.train_teacher), then handed in."""
    from edgekd.core.distill import train_teacher
    from edgekd.core.distributed import Context

    data, train, test = digits
    from edgekd.core.config import resolve

    cfg = resolve("distill", {"teacher": "seed-teacher", "out": str(tmp_path), "epochs": 1, "progress": False})
    with pytest.raises(EdgeKDError, match="'seed-teacher' is a model spec, which must be trained first"):
        load_teacher(cfg, TeacherOptions(), data, train, test)
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written
    trained = train_teacher(cfg, "seed-teacher", data, train.labelled(), test, Context(), epochs=1)
    teacher = load_teacher(cfg, TeacherOptions(), data, train, test, trained=trained)
    assert teacher.kind == "model" and teacher.metrics["source"] == "trained" and (tmp_path / "teacher.pt").is_file()


def test_teacher_options_are_checked_in_the_library():
    for cfg, message in [({"teacher_std": "0.2,0"}, "every std must be positive"),
                         ({"teacher_input_size": "0"}, "SIZE or HEIGHT,WIDTH in pixels"),
                         ({"teacher_mean": "a,b"}, "one number or one per channel"),
                         ({"teacher_views": "0"}, "positive whole number"),
                         ({"teacher_color": "CMYK"}, "expected one of RGB, BGR, L"),
                         ({"teacher_outputs": "scores"}, "expected one of logits, probs"),
                         ({"teacher_classes": "/no/such/file"}, "does not exist")]:
        with pytest.raises(EdgeKDError, match=message):
            _options(**cfg)


def test_the_cache_is_keyed_by_the_onnx_teachers_sha256_and_replays_k_views(tiny, digits, tmp_path):
    import onnx

    data, train, _ = digits
    path = _onnx(tiny, tmp_path / "t.onnx")
    opts = TeacherOptions(mean=[T_MEAN], std=[T_STD])
    teacher = load_teacher(_spec(path), opts, data)
    train.batch(torch.arange(4), epoch=3)  # views of epoch 3 cached before the replay, as after a teacher's training
    train.plan.replay(2)
    train._epoch = None  # as run_distill does
    try:
        assert train.plan.view_of(3) == 1 and train.plan.view_of(4) == 2
        for a, b in zip(train.plan.params(3), train.plan.params(1)):
            assert torch.equal(a, b)
        cache = TeacherCache(str(tmp_path / "cache"), teacher, train, dtype="float32")  # bit-exact storage
        cache.build(teacher, epochs=5, progress=False)
        assert cache.epochs == 2  # K views, whatever the number of epochs
        idx = torch.arange(len(train))
        for epoch in (1, 2, 3, 4, 5):  # the student's epoch-e batch is view (e-1) mod 2 + 1: the cache agrees
            x, _ = train.batch(idx, epoch=epoch)
            torch.testing.assert_close(cache.lookup(epoch, idx), teacher(x), rtol=0, atol=1e-5)
        assert not torch.allclose(cache.lookup(1, idx), cache.lookup(2, idx), atol=1e-4)
        # Another ONNX file (one metadata entry more) is another teacher: another cache, never stale logits.
        model = onnx.load(path)
        model.metadata_props.add(key="note", value="changed")
        onnx.save(model, path)
        changed = load_teacher(_spec(path), opts, data)
        assert changed.sha256 != teacher.sha256
        assert TeacherCache(str(tmp_path / "cache"), changed, train).path != cache.path
    finally:
        train.plan.replay(None)


def test_fitnet_with_a_black_box_teacher_is_one_line(tiny, tmp_path, cli_main):
    path = _onnx(tiny, tmp_path / "t.onnx")
    proc = cli_main("distill", "--loss", "fitnet", "--teacher", path, "--out", tmp_path / "run")
    assert proc.returncode == 2 and "black box" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_distill_on_digits_from_an_onnx_teacher_of_another_input_size(tmp_path, cli):
    """A 64 px ONNX teacher (its view and class names in its metadata) teaches a 32 px digits student."""
    from edgekd.export.onnx import write_metadata

    torch.manual_seed(4)
    path = _onnx(Tiny().eval(), tmp_path / "t64.onnx", size=64)
    write_metadata(path, [str(d) for d in range(10)], InputSpec(1, 64, 64, [0.4], [0.3]))
    out = tmp_path / "run"
    cli("distill", "--teacher", path, "--epochs", 1, "--train-subset", 120, "--batch-size", 32, "--out", out,
        "--no-progress")
    m = json.loads((out / "metrics.json").read_text())
    t = m["teacher"]
    assert (t["kind"], t["input"]["size"], t["view"]["resize"], t["classes"]["matched"]) == ("onnx", [64, 64], True,
                                                                                           "by name")
    assert 0.0 <= t["test_top1"] <= 1.0 and t["black_box"]
    assert m["history"][0]["teacher_seconds"] > 0 and 0 < m["history"][0]["teacher_share"] < 1
    assert yaml.safe_load((out / "config.yaml").read_text())["teacher_resolved"]["sha256"] == t["sha256"]
    assert (out / "student.pt").is_file() and not (out / "teacher.pt").exists()
