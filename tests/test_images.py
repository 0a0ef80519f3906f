"""Images as users have them: mixed sizes and aspect ratios, one evaluation geometry shared by training and the
torch-free runner, random-resized crops streamed from the files, the teacher's own view of each crop."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

CIFAR = "/work/shared/data/cifar10"
# (width, height) of the generated pictures: landscape, portrait, square, a wide 16:9 and a 3:2 one
SIZES = [(96, 64), (64, 96), (72, 72), (128, 72), (90, 60)]


def _cifar_files(split, cls, n):
    folder = os.path.join(CIFAR, split, cls)
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder))[:n]]


def _photos(root, per_class=8, classes=("airplane", "cat", "ship"), sizes=SIZES, quality=92):
    """An ImageFolder of real CIFAR-10 pictures resized to mixed sizes and aspect ratios, saved as JPEG."""
    for split, n in (("train", per_class), ("test", max(2, per_class // 2))):
        for cls in classes:
            os.makedirs(root / split / cls, exist_ok=True)
            for k, path in enumerate(_cifar_files(split, cls, n)):
                img = Image.open(path).convert("RGB").resize(sizes[k % len(sizes)], Image.BICUBIC)
                img.save(root / split / cls / os.path.basename(path), quality=quality)
    return root


needs_cifar = pytest.mark.skipif(not os.path.isdir(CIFAR), reason="CIFAR-10 copy not present")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return _photos(tmp_path_factory.mktemp("photos"))


# ----------------------------------------------------------------------------------------------------------
# one evaluation geometry

RUNNER_SCRIPT = r"""
import json, sys
import numpy as np
sys.modules["torch"] = None  # the device runner must not need PyTorch
from PIL import Image
sys.path.insert(0, sys.argv[1])
import device_runner as runner
job = json.load(open(sys.argv[2]))
out = [runner.preprocess(Image.open(p), runner.ModelInput.from_json(job["spec"])) for p in job["paths"]]
np.save(sys.argv[3], np.stack(out))
"""


@needs_cifar
@pytest.mark.parametrize("size,crop_pct", [((64, 64), 0.875), ((48, 80), 1.0), ((80, 48), 0.9)],
                         ids=["square-0.875", "wide-1.0", "tall-0.9"])
def test_training_eval_transform_and_torch_free_runner_give_the_same_tensor(photos, tmp_path, size, crop_pct):
    from edgekd.bundle.assemble import write_runner
    from edgekd.core.data import InputSpec, eval_transform

    spec = InputSpec(3, size[0], size[1], [0.49, 0.48, 0.45], [0.25, 0.24, 0.26], crop_pct)
    paths = sorted(str(p) for p in (photos / "train").rglob("*.jpg"))[:len(SIZES)]
    assert len({Image.open(p).size for p in paths}) == len(SIZES)  # several sizes and aspect ratios
    ours = torch.stack([eval_transform(spec)(Image.open(p).convert("RGB")) for p in paths]).numpy()
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"spec": spec.manifest(), "paths": paths}))
    runner_dir = os.path.dirname(write_runner(str(tmp_path / "device_runner.py")))
    script = tmp_path / "run.py"
    script.write_text(RUNNER_SCRIPT)
    subprocess.run([sys.executable, str(script), runner_dir, str(job), str(tmp_path / "out.npy")], check=True,
                   cwd=tmp_path)
    theirs = np.load(tmp_path / "out.npy")
    assert ours.shape == (len(paths), 3, *size)
    np.testing.assert_array_equal(ours, theirs)


@needs_cifar
def test_square_geometry_is_torchvisions_resize_shorter_side_then_center_crop(photos):
    """The convention is torchvision's (and timm's): Resize(int(size / crop_pct)) + CenterCrop(size)."""
    from torchvision import transforms

    from edgekd.core.data import InputSpec, eval_transform

    spec = InputSpec(3, 64, 64, [0.5] * 3, [0.5] * 3, 0.875)
    reference = transforms.Compose([transforms.Resize(int(64 / 0.875)), transforms.CenterCrop(64),
                                    transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
    for path in sorted((photos / "train").rglob("*.jpg"))[:len(SIZES)]:
        img = Image.open(path).convert("RGB")
        assert torch.equal(eval_transform(spec)(img), reference(img)), path


def test_timm_keep_ratio_geometry_for_a_non_square_input():
    timm_transforms = pytest.importorskip("timm.data.transforms")
    from edgekd.bundle.preprocessing import resize_crop

    for w, h in [(640, 480), (480, 640), (1024, 683), (1280, 720), (33, 100)]:
        img = Image.new("RGB", (w, h))
        expected_h, expected_w = timm_transforms.ResizeKeepRatio.get_params(img, (int(160 / 0.9), int(224 / 0.9)), 0.0)
        new, box = resize_crop((w, h), (160, 224), 0.9)
        assert new == (expected_w, expected_h)
        assert box[2] - box[0] == 224 and box[3] - box[1] == 160


def test_an_old_manifest_without_crop_pct_still_stretches_and_bad_crop_pct_is_refused():
    from edgekd.bundle.manifest import ModelInput, schema_problem
    from edgekd.bundle.preprocessing import preprocess
    from edgekd.core.data import InputSpec

    old = {"color": "RGB", "resize": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}  # no crop_pct: made before it
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 80, 3), dtype=np.uint8))
    expected = (np.asarray(img.resize((32, 32), Image.BILINEAR), np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(preprocess(img, ModelInput.from_json(old)), expected.transpose(2, 0, 1), atol=1e-6)
    assert InputSpec.from_dict({"channels": 3, "height": 32, "width": 32, "mean": [0.5] * 3, "std": [0.5] * 3}).crop_pct is None
    manifest = {"format": "onnx", "precision": "fp32", "files": {"model.onnx": "0" * 64}, "model_file": "model.onnx",
                "classes": ["a"], "input": {"shape": [-1, 3, 32, 32], **old}}
    assert schema_problem(manifest) is None
    manifest["input"]["crop_pct"] = 1.5
    assert "crop_pct" in schema_problem(manifest)


def test_input_size_defaults_to_the_datas_own_size_or_224_for_mixed_sizes(caplog):
    from edgekd.core.data import SizeChoice, choose_input

    own = choose_input(3, {(32, 32)})
    assert (own.height, own.width, own.crop_pct) == (32, 32, 1.0)
    wide = choose_input(3, {(64, 48)})
    assert (wide.height, wide.width) == (48, 64)  # height, width of the data's own size
    with caplog.at_level(logging.WARNING):
        mixed = choose_input(3, {(640, 480), (480, 640)}, where="photos")
    assert (mixed.height, mixed.width, mixed.crop_pct) == (224, 224, 0.875)
    assert "2 different sizes" in caplog.text and "224x224" in caplog.text
    thumbs = choose_input(3, {(64, 48), (48, 64), (60, 60)})
    assert (thumbs.height, thumbs.width) == (48, 48)  # thumbnails of mixed sizes are not upsampled to 224
    pre = choose_input(3, {(640, 480), (480, 640)}, SizeChoice(pretrained=((256, 256), 0.95, "timm x")))
    assert (pre.height, pre.crop_pct) == (256, 0.95)
    given = choose_input(3, {(640, 480), (32, 32)}, SizeChoice(size=(160, 120), crop_pct=0.9))
    assert (given.height, given.width, given.crop_pct) == (160, 120, 0.9)


@pytest.mark.parametrize("value", ["0", "a", "1,2,3", "-5", "9000"], ids=["zero", "text", "three", "negative", "huge"])
def test_bad_input_size_is_a_one_line_error(value, capsys):
    from edgekd.cli import main

    assert main(["train", "--input-size", value, "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "--input-size" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------
# streaming views, random-resized crops, the teacher's own view

def _stream(photos, size=(48, 48), kind="random-resized-crop", teacher=None, draft=True):
    from edgekd.core.augment import AugmentPlan
    from edgekd.core.data import load_data, parse_size, SizeChoice
    from edgekd.core.stream import StreamViews

    data = load_data(str(photos), choice=SizeChoice(size=parse_size(list(size))))
    views = StreamViews.of([(data.train, None, None)], data.input, None, workers=0)
    views.plan = AugmentPlan(kind, len(views), seed=3, scale=0.08)
    views.set_teacher_size(teacher)
    return data, views


@needs_cifar
def test_streamed_views_are_replayed_from_seed_and_epoch_and_differ_between_epochs(photos):
    _, views = _stream(photos)
    idx = torch.arange(len(views))
    a, _ = views.batch(idx, epoch=1)
    b, _ = views.batch(idx, epoch=1)
    c, _ = views.batch(idx, epoch=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (len(views), 3, 48, 48)
    # the same images through worker processes, shuffled: each image gets the same view as above
    views.workers = 2
    for x, y, i in views.batches(7, epoch=1, shuffle_seed=5):
        assert torch.equal(x, a[i])


@needs_cifar
def test_the_teacher_sees_the_same_crop_of_the_original_at_its_own_size(photos):
    """Student at 32 px, teacher at 96 px: the teacher's view is cut from the original picture (sharper than
    the student's pixels upsampled), and shrunk back it is the student's view."""
    from torch.nn import functional as F

    from edgekd.core.stream import rrc_box, view_rng

    _, views = _stream(photos, size=(32, 32), teacher=(96, 96))
    views.items.sources[0].samples = views.items.sources[0].samples  # (files, read in place)
    idx = torch.arange(len(views))
    x, xt, _ = views.batch(idx, epoch=1, teacher_view=True)
    assert xt.shape == (len(views), 3, 96, 96)
    # by hand for image 0: the box on the original picture (no reduced decoding), resized to 96
    path = views.items.path(0)
    img = Image.open(path).convert("RGB")
    rng = view_rng(3, 1, 0)
    left, top, w, h = rrc_box(rng, *img.size, (0.08, 1.0))
    flip = rng.random() < 0.5
    manual = img.resize((96, 96), Image.BILINEAR, box=(left, top, left + w, top + h))
    if flip:
        manual = manual.transpose(Image.FLIP_LEFT_RIGHT)
    manual = torch.from_numpy(np.array(manual)).permute(2, 0, 1).float() / 255
    got = xt[0] * views.std[0] + views.mean[0]
    assert (got - manual).abs().max() < 0.02  # the same crop (JPEG draft decoding may differ by a level or two)
    shrunk = F.interpolate(xt, size=(32, 32), mode="bilinear", antialias=True)
    assert (shrunk - x).abs().mean() < 0.1
    # the teacher's view holds detail that the student's pixels upsampled do not
    up = F.interpolate(x, size=(96, 96), mode="bilinear", align_corners=False)
    assert (xt - up).abs().mean() > 0.01


def test_random_resized_box_follows_torchvisions_bounds():
    from edgekd.core.stream import rrc_box, view_rng

    for i in range(200):
        left, top, w, h = rrc_box(view_rng(0, 1, i), 640, 480, (0.08, 1.0))
        assert 0 <= left and 0 <= top and left + w <= 640 and top + h <= 480
        assert 0.08 * 0.7 <= w * h / (640 * 480) <= 1.0
    assert rrc_box(view_rng(0, 1, 0), 640, 480, (0.08, 1.0)) == rrc_box(view_rng(0, 1, 0), 640, 480, (0.08, 1.0))


@needs_cifar
def test_large_jpegs_are_decoded_at_reduced_size(tmp_path):
    """A 1024x768 JPEG shown at 48 px is decoded at 1/8 scale (libjpeg's DCT scaling) and looks the same."""
    from edgekd.core.stream import _Decoder, _Items
    from edgekd.core.augment import AugmentPlan
    from edgekd.core.data import InputSpec

    src = Image.open(_cifar_files("train", "ship", 1)[0]).convert("RGB").resize((1024, 768), Image.BICUBIC)
    (tmp_path / "a" / "x").mkdir(parents=True)
    src.save(tmp_path / "a" / "x" / "big.jpg", quality=90)
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(tmp_path / "a"))
    spec = InputSpec(3, 48, 48, [0.5] * 3, [0.5] * 3, 0.875).manifest()
    plan = AugmentPlan("random-resized-crop", 1, seed=0, scale=0.5)
    fast = _Decoder(_Items([(folder, None, None)]), spec, plan, None, (0.5, 1.0), draft=True)
    full = _Decoder(_Items([(folder, None, None)]), spec, plan, None, (0.5, 1.0), draft=False)
    fast.epoch = full.epoch = 1
    from PIL import JpegImagePlugin

    opened = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        out = real_draft(self, mode, size)
        opened.append(self.size)
        return out

    JpegImagePlugin.JpegImageFile.draft = spy
    try:
        a = fast[0][0].float()
    finally:
        JpegImagePlugin.JpegImageFile.draft = real_draft
    b = full[0][0].float()
    assert opened and opened[0][0] < 1024  # decoded smaller than the file
    assert (a - b).abs().mean() < 4  # of 255: the same view


@needs_cifar
def test_cached_teacher_logits_equal_the_live_teacher_on_the_streamed_views(photos, tmp_path):
    from edgekd.core.models import build_model
    from edgekd.core.teacher_cache import TeacherCache
    from edgekd.core.teachers import FrozenTeacher
    from edgekd.core.data import InputSpec

    data, views = _stream(photos, size=(32, 32), teacher=(48, 48))
    torch.manual_seed(0)
    t_input = InputSpec(3, 48, 48, [0.4] * 3, [0.3] * 3)
    teacher = FrozenTeacher(build_model("resnet8", 3, t_input), t_input, data.input)
    ckpt = tmp_path / "t.pt"
    torch.save({"x": 1}, ckpt)
    cache = TeacherCache(str(tmp_path / "cache"), str(ckpt), views, dtype="float32")  # exact: float16 is its own test
    cache.build(teacher, 2, batch_size=8, progress=False)
    for epoch in (1, 2):
        for x, xt, _, idx in views.batches(5, epoch=epoch, shuffle_seed=1, teacher_view=True):
            assert xt.shape[-1] == 48
            torch.testing.assert_close(cache.lookup(epoch, idx), teacher(xt), rtol=1e-4, atol=1e-5)


@needs_cifar
def test_unreadable_image_in_a_stream_is_named_or_skipped(photos, tmp_path):
    import shutil

    from edgekd import EdgeKDError

    root = tmp_path / "bad"
    shutil.copytree(photos, root)
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg at all")
    _, views = _stream(root)
    with pytest.raises(EdgeKDError, match="broken.jpg"):
        list(views.batches(64, epoch=1))
    views.skip_bad = True
    seen = sum(len(y) for _, y, _ in views.batches(64, epoch=1))
    assert seen == len(views) - 1 and len(views.skipped) == 1


# ----------------------------------------------------------------------------------------------------------
# the whole path through the CLI

@needs_cifar
def test_pipeline_is_memory_for_uniform_small_data_and_stream_for_mixed_photos(photos, tmp_path, caplog):
    from edgekd.core.distill import prepare_data

    from edgekd.core.config import DistillOptions

    uniform = tmp_path / "uniform"
    _photos(uniform, per_class=4, sizes=[(32, 32)])
    with caplog.at_level(logging.INFO):
        data, train, _ = prepare_data(DistillOptions(data=str(uniform), workers=0, progress=False), teacher=True)
    assert data.pipeline == "memory" and (data.input.height, data.input.width) == (32, 32)
    assert train.plan.kind == "standard"  # CIFAR's pad-crop at 32 px
    assert "decoded into memory" in caplog.text
    data, train, test = prepare_data(DistillOptions(data=str(photos), input_size="64", workers=0, progress=False),
                                     teacher=True)
    assert data.pipeline == "stream" and train.plan.kind == "random-resized-crop"
    assert (data.input.height, data.input.width, data.input.crop_pct) == (64, 64, 0.875)
    assert test.images.shape[1:] == (3, 64, 64)


@needs_cifar
@pytest.mark.slow
def test_distill_at_an_input_size_records_it_and_the_bundle_predicts_as_training_evaluates(photos, tmp_path, cli):
    import yaml

    from edgekd.core.data import InputSpec, eval_transform

    out = tmp_path / "run"
    cli("distill", "--data", photos, "--input-size", "40,56", "--teacher", "resnet8", "--teacher-epochs", 1,
        "--student", "resnet8", "--epochs", 1, "--batch-size", 8, "--workers", 1, "--out", out, "--no-progress")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_data"]["input_size"] == [40, 56] and metrics["train_data"]["pipeline"] == "stream"
    assert metrics["train_data"]["augment"] == "standard"  # 40 px: the small-image pad-crop
    assert 0 <= metrics["history"][0]["teacher_train_top1"] <= 1
    assert yaml.safe_load((out / "config.yaml").read_text())["input_size"] == "40,56"
    ckpt = torch.load(out / "student.pt", weights_only=True)
    assert (ckpt["input"]["height"], ckpt["input"]["width"], ckpt["input"]["crop_pct"]) == (40, 56, 0.875)
    cli("export", out / "student.pt", "--format", "onnx", "--out", out / "bundle", "--val-size", 8)
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    assert manifest["input"]["crop_pct"] == 0.875 and manifest["input"]["resize"] == [40, 56]
    image = sorted((photos / "test").rglob("*.jpg"))[1]
    proc = cli("predict", out / "bundle", image, "--json", "--top-k", 3)
    scores = [t["score"] for t in json.loads(proc.stdout)[0]["top"]]
    from edgekd.core.checkpoint import load_checkpoint
    from edgekd.core.models import build_model

    model = build_model("resnet8", 3, InputSpec.from_dict(ckpt["input"]))
    model.load_state_dict(load_checkpoint(str(out / "student.pt"))["state_dict"])
    x = eval_transform(InputSpec.from_dict(ckpt["input"]))(Image.open(image).convert("RGB"))
    probs = torch.softmax(model.eval()(x[None]), 1)[0].sort(descending=True).values[:3]
    np.testing.assert_allclose(scores, probs.tolist(), atol=1e-4)
