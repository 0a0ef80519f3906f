"""Issue 27 (patient and consistent): function matching on replayed, cacheable mixed views; the decode-once image
store; bf16 student steps; the teacher's top-1 on its own view."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from edgekd import EdgeKDError
from edgekd.core.augment import AugmentPlan, Views
from edgekd.core.losses import UNLABELED, make_loss
from edgekd.core.mixing import MixPlan, attach_mix, mixed_loss
from edgekd.core.teacher_cache import TeacherCache


def _views(n=24, size=16, kind="standard", seed=3, mix=None, labels=None):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    targets = labels if labels is not None else torch.arange(n) % 4
    views = Views(images, targets, [0.5] * 3, [0.25] * 3, AugmentPlan(kind, n, seed=seed))
    if mix:
        attach_mix(views, mix, 1.0)
    return views


def _by_index(views, epoch, batch_size, shuffle_seed):
    out = {}
    for x, y, idx in views.batches(batch_size, epoch=epoch, shuffle_seed=shuffle_seed):
        for k, i in enumerate(idx.tolist()):
            out[i] = x[k]
    return out


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixed_views_are_the_same_in_any_batch_and_differ_from_unmixed(kind):
    views = _views(mix=kind)
    a, b = _by_index(views, 2, 5, shuffle_seed=1), _by_index(views, 2, 11, shuffle_seed=7)
    assert sorted(a) == list(range(24)) and all(torch.equal(a[i], b[i]) for i in a)
    plain = _by_index(_views(), 2, 24, shuffle_seed=None)
    changed = sum(not torch.equal(a[i], plain[i]) for i in a)
    assert changed >= 20  # a partner can be the picture itself; nearly all are mixed
    assert not all(torch.equal(a[i], _by_index(views, 3, 24, None)[i]) for i in a)  # another epoch, other pairs
    # the mixed picture is the rule applied to the two unmixed views
    mix, view = views.plan.mix, 2
    i, p = 0, int(views.plan.mix.partners(view, [0])[0])
    expect = mix.mix(plain[i][None], plain[p][None], view, torch.tensor([i]))[0]
    torch.testing.assert_close(a[i], expect)
    if kind == "cutmix":  # a box of the partner's pixels, its area what lam leaves
        lam = float(mix.lam(view, [i], (16, 16))[0])
        assert ((a[i] == plain[p]).all(0).float().mean() >= 1 - lam - 1e-6)


def test_mix_settings_are_in_the_cache_key_and_none_keeps_the_old_key(tmp_path):
    path = tmp_path / "t.pt"
    torch.save({"x": 1}, path)
    plain, mixed, cut = _views(), _views(mix="mixup"), _views(mix="cutmix")
    paths = {TeacherCache(str(tmp_path), str(path), v).path for v in (plain, mixed, cut)}
    assert len(paths) == 3
    assert "mix" not in plain.plan.describe() and mixed.plan.describe()["mix"]["kind"] == "mixup"
    with pytest.raises(EdgeKDError, match="--mix-alpha"):
        MixPlan("mixup", float("nan"), 0, [0])
    with pytest.raises(EdgeKDError, match="--mix"):
        MixPlan("blend", 1.0, 0, [0])


@pytest.mark.parametrize("kind,augment", [("mixup", "standard"), ("cutmix", "none")])
def test_cached_teacher_answers_for_mixed_views_equal_the_live_teacher(tmp_path, kind, augment):
    from edgekd.core.data import InputSpec
    from edgekd.core.models import build_model
    from edgekd.core.teachers import FrozenTeacher

    views = _views(n=30, kind=augment, mix=kind)
    spec = InputSpec(3, 16, 16, [0.5] * 3, [0.25] * 3)
    torch.manual_seed(0)
    teacher = FrozenTeacher(build_model("seed-student", 4, spec), spec, spec)
    path = tmp_path / "t.pt"
    torch.save({"x": 1}, path)
    cache = TeacherCache(str(tmp_path / "cache"), str(path), views, dtype="float32")
    cache.build(teacher, 2, batch_size=7, progress=False)
    assert len(cache.held()) == 2  # mixed views differ by epoch even without augmentation
    for epoch in (1, 2):
        for x, y, idx in views.batches(8, epoch=epoch, shuffle_seed=epoch):
            torch.testing.assert_close(cache.lookup(epoch, idx), teacher(x), rtol=0, atol=1e-5)


def test_mixed_labels_follow_the_usual_rule_and_an_unlabelled_side_gets_the_teacher_term_only():
    labels = torch.tensor([0, 1, 2, 3, UNLABELED, 1, 2, 0])
    views = _views(n=8, labels=labels, mix="mixup")
    mix, loss_fn = views.plan.mix, make_loss("kd")[0]
    idx = torch.arange(8)
    torch.manual_seed(1)
    s, t = torch.randn(8, 4), torch.randn(8, 4)
    parts = mixed_loss(loss_fn, mix, 1, (16, 16), s, t, labels, idx)
    partner, lam = mix.partners(1, idx), mix.lam(1, idx, (16, 16))
    yb = labels[partner]
    both = (labels >= 0) & (yb >= 0)
    ce = torch.nn.functional.cross_entropy
    expect = torch.stack([lam[k] * ce(s[k:k + 1], labels[k:k + 1]) + (1 - lam[k]) * ce(s[k:k + 1], yb[k:k + 1])
                          for k in range(8) if both[k]]).mean()
    torch.testing.assert_close(parts["task_loss"], expect)
    kd_only = loss_fn(s, t, torch.full_like(labels, UNLABELED))
    torch.testing.assert_close(parts["loss"], kd_only["loss"] + (1 - loss_fn.alpha) * expect)
    torch.testing.assert_close(parts["kd_loss"], kd_only["kd_loss"])


@pytest.mark.slow  # a whole CLI pipeline in subprocesses: make test-slow
def test_distill_cli_with_cutmix_and_cache_records_the_mix(tmp_path, cli):
    out = tmp_path / "run"
    args = ["distill", "--teacher-epochs", "1", "--epochs", "2", "--mix", "cutmix", "--mix-alpha", "0.5",
            "--teacher-cache", tmp_path / "cache", "--no-progress", "--out", out]
    cli(*args)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_data"]["mix"] == {"kind": "cutmix", "alpha": 0.5, "pairs": "per image from (aug seed, view)"}
    assert metrics["teacher_cache"]["views_held"] == 2 and metrics["history"][-1]["test_top1"] > 0.1  # above chance


# ----------------------------------------------------------------------------------------------------------
# the decode-once image store

SIZES = [(96, 64), (64, 96), (72, 72), (128, 72)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """An ImageFolder of smooth random JPEG pictures of mixed sizes and aspect ratios (3 classes)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
            for k in range(n):
                small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
                small.resize(SIZES[k % len(SIZES)], Image.BICUBIC).save(root / split / c / f"{k}.jpg", quality=95)
    return root


def _stream_views(photos, size=24):
    from edgekd.core.data import SizeChoice, load_data, parse_size
    from edgekd.core.stream import StreamViews

    data = load_data(str(photos), choice=SizeChoice(size=parse_size([size, size])))
    views = StreamViews.of([(data.train, None, None)], data.input, None, workers=0)
    views.plan = AugmentPlan("random-resized-crop", len(views), seed=3, scale=0.3)
    return data, views


def test_store_views_are_the_files_crops_and_a_damaged_store_is_refused(photos, tmp_path):
    from edgekd.core.image_store import attach_store

    _, files = _stream_views(photos)
    _, stored = _stream_views(photos)
    record = attach_store(stored, str(tmp_path / "store"), max_size=256)
    assert record["images"] == len(files) == 18 and record["max_size"] == 256
    idx = torch.arange(len(files))
    a, _ = files.batch(idx, epoch=2)
    b, _ = stored.batch(idx, epoch=2)
    assert (a - b).abs().mean() < 0.05  # the same boxes; the files' views are decoded at a reduced JPEG scale
    assert stored.fingerprint() != files.fingerprint()  # a teacher cache of one is not served for the other
    _, small = _stream_views(photos)
    shrunk = attach_store(small, str(tmp_path / "store"), max_size=48)  # another size: another store
    assert shrunk["path"] != record["path"] and shrunk["bytes"] < record["bytes"]
    c, _ = small.batch(idx, epoch=2)
    assert c.shape == a.shape and (a - c).abs().mean() < 0.15  # cut in the original picture's coordinates
    # reused as it is; damaged -> refused in one line
    _, again = _stream_views(photos)
    assert attach_store(again, str(tmp_path / "store"), max_size=256)["path"] == record["path"]
    with open(os.path.join(record["path"], "pixels.u8"), "r+b") as f:
        f.seek(100)
        f.write(b"\x01\x02\x03")
    with pytest.raises(EdgeKDError, match="damaged"):
        attach_store(_stream_views(photos)[1], str(tmp_path / "store"), max_size=256)
    with pytest.raises(EdgeKDError, match="inside the data folder"):
        from edgekd.core.image_store import open_store

        open_store(str(photos / "store"), files.items, "RGB", 64, data_roots=[str(photos)])


def test_store_crops_give_the_teacher_its_own_size_from_the_same_box(photos, tmp_path):
    from edgekd.core.image_store import attach_store

    _, files = _stream_views(photos)
    _, stored = _stream_views(photos)
    for views in (files, stored):
        views.set_teacher_size((40, 40))  # the teacher's own input, larger than the student's 24 px
    attach_store(stored, str(tmp_path / "store"), max_size=256)
    idx = torch.arange(len(files))
    a_student, a_teacher, _ = files.batch(idx, epoch=1, teacher_view=True)
    b_student, b_teacher, _ = stored.batch(idx, epoch=1, teacher_view=True)
    assert b_student.shape == (18, 3, 24, 24) and b_teacher.shape == (18, 3, 40, 40)
    assert (a_student - b_student).abs().mean() < 0.05 and (a_teacher - b_teacher).abs().mean() < 0.05
    # the teacher's view is the student's box at another size, flipped alike: shrunk, it is the student's view
    shrunk = torch.nn.functional.interpolate(b_teacher, size=(24, 24), mode="bilinear", antialias=True)
    assert (shrunk - b_student).abs().mean() < 0.05
    assert torch.equal(stored.batch(idx, epoch=1, teacher_view=True)[1], b_teacher)  # replayed exactly


def test_a_store_prepared_ahead_is_reused_by_distill(photos, tmp_path, cli, one_line_error):
    store = tmp_path / "store"
    assert "images 18" in cli("prepare", photos, "--out", store, "--max-size", 64, "--no-progress").stdout
    out = tmp_path / "run"
    cli("distill", "--data", photos, "--input-size", 24, "--teacher", "seed-student", "--teacher-epochs", 1,
        "--epochs", 1, "--image-store", store, "--image-store-size", 64, "--workers", 0, "--no-progress",
        "--mix", "mixup", "--out", out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["image_store"]["images"] == 18 and metrics["image_store"]["max_size"] == 64
    assert len(os.listdir(store)) == 1  # the store prepare wrote, reused
    one_line_error(cli("distill", "--data", photos, "--input-size", 24, "--image-store", photos / "inside",
                       "--no-progress", "--out", tmp_path / "refused", check=False), "inside the data folder")
    assert not (tmp_path / "refused" / "student.pt").exists()


# ----------------------------------------------------------------------------------------------------------
# bf16 student steps; the teacher's own view

@pytest.mark.slow  # a whole CLI pipeline in subprocesses: make test-slow
def test_student_dtype_bfloat16_keeps_float32_state_and_auto_keeps_the_faster(tmp_path, cli):
    out = tmp_path / "bf16"
    cli("train", "--model", "seed-student", "--epochs", 1, "--student-dtype", "bfloat16", "--no-progress",
        "--out", out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["student_dtype"]["chosen"] == "bfloat16" and metrics["test_top1"] > 0.3
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert {v.dtype for v in ckpt["state_dict"].values() if v.is_floating_point()} == {torch.float32}
    auto = tmp_path / "auto"
    cli("train", "--model", "seed-student", "--epochs", 1, "--student-dtype", "auto", "--no-progress", "--out", auto)
    record = json.loads((auto / "metrics.json").read_text())["student_dtype"]
    speed = record["images_per_s"]
    assert record["chosen"] == max(speed, key=speed.get) and set(speed) == {"float32", "bfloat16"}


def test_teacher_top1_on_its_own_view_is_decoded_at_its_size(photos):
    from types import SimpleNamespace

    from edgekd.core.data import InputSpec
    from edgekd.core.distributed import Context
    from edgekd.core.models import build_model
    from edgekd.core.teacher_eval import own_view_top1
    from edgekd.core.teachers import FrozenTeacher

    data, _ = _stream_views(photos, size=24)
    t_input = InputSpec(3, 48, 48, [0.4] * 3, [0.3] * 3)
    torch.manual_seed(0)
    model = build_model("seed-student", 3, t_input)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    teacher = FrozenTeacher(model, t_input, data.input)
    cfg = SimpleNamespace(workers=0, skip_bad_images=False, device="cpu")
    record = own_view_top1(teacher, data, cfg, Context())
    assert 0 <= record["test_top1_own_view"] <= 1 and len(record["test_top1_views"]) == 2
    assert seen and set(seen) == {(48, 48)}


def test_default_crop_scale_widens_with_the_schedule_and_is_milder_for_small_inputs(photos):
    from edgekd.core.augment import FULL_SCALE, default_crop_scale
    from edgekd.core.config import DistillOptions
    from edgekd.core.distill import prepare_data

    assert default_crop_scale(64, 3) > default_crop_scale(224, 3) > default_crop_scale(224, 15) > FULL_SCALE
    assert default_crop_scale(32, 100) == default_crop_scale(224, 1000) == FULL_SCALE
    assert default_crop_scale(64, 1) == default_crop_scale(64, 3)  # short schedules: the mildest range
    cfg = dict(data=str(photos), input_size="64", workers=0, progress=False, epochs=3)
    _, train, _ = prepare_data(DistillOptions(**cfg), teacher=True)
    assert train.plan.describe()["scale"] == [default_crop_scale(64, 3), 1.0]
    _, train, _ = prepare_data(DistillOptions(**cfg, crop_scale=0.2), teacher=True)  # --crop-scale wins
    assert train.plan.describe()["scale"] == [0.2, 1.0]


def test_streamed_mixed_views_with_the_teachers_own_size_are_cached_exactly(photos, tmp_path):
    from edgekd.core.data import InputSpec
    from edgekd.core.models import build_model
    from edgekd.core.teachers import FrozenTeacher

    data, views = _stream_views(photos, size=24)
    views.set_teacher_size((40, 40))
    attach_mix(views, "cutmix", 1.0)
    t_input = InputSpec(3, 40, 40, [0.4] * 3, [0.3] * 3)
    torch.manual_seed(0)
    teacher = FrozenTeacher(build_model("seed-student", 3, t_input), t_input, data.input)
    path = tmp_path / "t.pt"
    torch.save({"x": 1}, path)
    cache = TeacherCache(str(tmp_path / "cache"), str(path), views, dtype="float32")
    cache.build(teacher, 1, batch_size=4, progress=False)
    seen = 0
    for x, xt, _, idx in views.batches(5, epoch=1, shuffle_seed=2, teacher_view=True):
        assert x.shape[-1] == 24 and xt.shape[-1] == 40
        torch.testing.assert_close(cache.lookup(1, idx), teacher(xt), rtol=1e-4, atol=1e-5)
        seen += len(idx)
    assert seen == len(views)
