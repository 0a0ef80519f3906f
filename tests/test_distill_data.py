"""The training data pipeline, replayable augmentation, the exact teacher cache, CIFAR ResNets,
the small-input stem and the batch-norm trap check, on small real image folders."""

import json
import os
import shutil
from dataclasses import replace

import pytest
import torch

from edgekd import EdgeKDError
from edgekd.core.augment import AugmentPlan, Views, apply_views, channel_stats, decode_split, stratified_subset
from edgekd.core.checkpoint import save_checkpoint
from edgekd.core.config import TrainOptions
from edgekd.core.data import InputSpec
from edgekd.core.batchnorm import check_batchnorm
from edgekd.core.distill import prepare_data
from edgekd.core.teachers import FrozenTeacher
from edgekd.core.train_loop import TrainRun, evaluate, fit
from edgekd.core.losses import make_loss
from edgekd.core.models import build_model, count_params
from edgekd.core.teacher_cache import TeacherCache

CIFAR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10")


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory):
    """A small ImageFolder of real CIFAR-10 photos: 30 train and 6 test images per class."""
    if not os.path.isdir(CIFAR):
        pytest.skip("../shared/data/cifar10 is not here")
    root = tmp_path_factory.mktemp("cifar_small")
    for split, count in (("train", 30), ("test", 6)):
        for cls in sorted(os.listdir(os.path.join(CIFAR, split))):
            src = os.path.join(CIFAR, split, cls)
            dst = root / split / cls
            dst.mkdir(parents=True)
            for name in sorted(os.listdir(src))[:count]:
                shutil.copy(os.path.join(src, name), dst / name)
    return root


def _cfg(folder, **kw):
    cfg = {"data": str(folder), "epochs": 1, "batch_size": 32, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
           "weight_decay": 5e-4, "schedule": "cosine", "warmup_epochs": 0, "seed": 0, "device": "cpu",
           "progress": False, "workers": 0, "augment": "standard", "aug_seed": 3}
    cfg.update(kw)
    return TrainOptions(**cfg)


def test_pipeline_decodes_a_folder_normalises_with_train_stats_and_subsets_by_class(cifar_folder):
    data, train, test = prepare_data(_cfg(cifar_folder, train_subset=100))
    assert train.images.dtype == torch.uint8 and train.images.shape == (100, 3, 32, 32)
    assert torch.bincount(train.targets).tolist() == [10] * 10  # stratified
    assert len(test) == 60 and data.input.mean != [0.5] * 3
    full, _ = decode_split(data.train, data.input)
    mean, std = channel_stats(full[stratified_subset(torch.tensor(data.train.targets), 100)])
    assert data.input.mean == pytest.approx(mean) and data.input.std == pytest.approx(std)
    x, y = test.batch(torch.arange(60))
    assert x.mean().abs() < 0.3 and y.tolist() == data.test.targets  # un-augmented, in order
    with pytest.raises(EdgeKDError, match="--norm"):
        prepare_data(_cfg(cifar_folder, norm="0.5,0.5/0"))


def test_augmentation_is_a_padded_crop_and_flip_replayed_from_seed_and_epoch():
    plan = AugmentPlan("standard", 50, seed=5)
    for a, b in zip(plan.params(3), AugmentPlan("standard", 50, seed=5).params(3)):
        assert torch.equal(a, b)
    assert not torch.equal(plan.params(3)[0], plan.params(4)[0])
    img = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    out = apply_views(img, torch.tensor([0]), torch.tensor([4]), torch.tensor([0]), pad=4)
    assert torch.equal(out[0, :, 4:, :], img[0, :, :4, :]) and out[0, :, :4, :].sum() == 0  # shifted down 4
    flipped = apply_views(img, torch.tensor([4]), torch.tensor([4]), torch.tensor([1]), pad=4)
    assert torch.equal(flipped[0], img[0].flip(-1))
    # The batched gather equals cropping and flipping each image by hand.
    batch = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    dy, dx, fl = AugmentPlan("standard", 16, seed=1).params(2)
    padded = torch.nn.functional.pad(batch, (4, 4, 4, 4))
    hand = [padded[k, :, y:y + 32, x:x + 32] for k, (y, x) in enumerate(zip(dy.tolist(), dx.tolist()))]
    hand = torch.stack([v.flip(-1) if f else v for v, f in zip(hand, fl.tolist())])
    assert fl.any() and torch.equal(apply_views(batch, dy, dx, fl, 4), hand)
    with pytest.raises(EdgeKDError, match="unknown augmentation"):
        AugmentPlan("heavy", 5)


def test_cached_teacher_logits_equal_a_live_forward_on_the_same_view(cifar_folder, tmp_path):
    data, train, test = prepare_data(_cfg(cifar_folder, train_subset=120))
    model = build_model("resnet8", 10, data.input)  # untrained: its forward pass is all the cache replays
    path = str(tmp_path / "teacher.pt")
    save_checkpoint(path, model, spec="resnet8", classes=data.classes, input_spec=data.input, data_spec=data.spec,
                    metrics={}, config={})
    teacher = FrozenTeacher(model, data.input, data.input)
    cache = TeacherCache(str(tmp_path / "cache"), path, train, dtype="float32")  # float16: see test_teacher_fast.py
    assert cache.build(teacher, epochs=2, progress=False) > 0
    # A student's loop: shuffled batches, each epoch's own views; the teacher is asked live.
    for epoch in (1, 2):
        for x, _, idx in train.batches(37, epoch=epoch, shuffle_seed=epoch):
            torch.testing.assert_close(cache.lookup(epoch, idx), teacher(x), rtol=0, atol=1e-5)
    # Different views (another epoch) give different logits: the check above can fail.
    assert not torch.allclose(cache.lookup(1, torch.arange(20)), cache.lookup(2, torch.arange(20)), atol=1e-3)
    # Reused from disk by a new run with the same teacher file and seed; extended when more epochs are asked.
    again = TeacherCache(str(tmp_path / "cache"), path, train, dtype="float32")
    everyone = torch.arange(len(train))
    assert again.build(teacher, epochs=2, progress=False) == 0.0
    assert torch.equal(again.lookup(2, everyone), cache.lookup(2, everyone))
    assert again.build(teacher, epochs=3, progress=False) > 0 and again.epochs == 3
    # Another augmentation seed or another teacher file is another cache.
    other_seed = Views(train.images, train.targets, data.input.mean, data.input.std, AugmentPlan("standard", len(train), 4))
    assert TeacherCache(str(tmp_path / "cache"), path, other_seed).path != cache.path
    with open(path, "ab") as f:
        f.write(b"\0")
    assert TeacherCache(str(tmp_path / "cache"), path, train).path != cache.path
    with pytest.raises(EdgeKDError, match="view 4 was asked for"):
        again.lookup(4, torch.arange(2))


def test_cifar_resnets_have_the_literatures_sizes():
    spec = InputSpec(3, 32, 32, [0.5] * 3, [0.5] * 3)
    # He et al. 2016: ResNet-20 0.27M, ResNet-56 0.85M parameters (CIFAR-10 head).
    assert count_params(build_model("resnet20", 10, spec)) == pytest.approx(0.27e6, rel=0.03)
    assert count_params(build_model("resnet56", 10, spec)) == pytest.approx(0.85e6, rel=0.03)
    assert count_params(build_model("resnet8", 10, spec)) < count_params(build_model("resnet20", 10, spec))
    m = build_model("resnet8x4", 100, spec)
    assert m.fc.in_features == 256 and m(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_small_input_stem_for_torchvision_models_at_32x32():
    spec = InputSpec(3, 32, 32, [0.5] * 3, [0.5] * 3)
    r18 = build_model("torchvision:resnet18", 10, spec)
    assert r18.conv1.kernel_size == (3, 3) and r18.conv1.stride == (1, 1) and isinstance(r18.maxpool, torch.nn.Identity)
    seen = {}
    r18.layer1.register_forward_hook(lambda m, i, o: seen.update(layer1=o.shape))
    r18(torch.zeros(1, 3, 32, 32))
    assert seen["layer1"][-2:] == (32, 32)  # full resolution into the first stage (ImageNet stem: 8x8)
    big = build_model("torchvision:resnet18:imagenet-stem", 10, spec)
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, torch.nn.MaxPool2d)
    assert build_model("torchvision:resnet18", 10, InputSpec(3, 128, 128, [0.5] * 3, [0.5] * 3)).conv1.kernel_size == (7, 7)
    mobile = build_model("torchvision:mobilenet_v3_small", 10, spec)
    assert mobile.features[0][0].stride == (1, 1)
    with pytest.raises(EdgeKDError, match="unknown stem"):
        build_model("torchvision:resnet18:tiny-stem", 10, spec)


def test_batchnorm_trap_is_detected_on_training_images_and_fixed_by_reestimation(cifar_folder):
    cfg = _cfg(cifar_folder, epochs=2, augment="none")
    data, train, test = prepare_data(cfg)
    model = build_model("compact-student", 10, data.input)
    run = TrainRun(train, test, make_loss("ce")[0])
    fit(model, run, cfg)
    healthy = check_batchnorm(model, run, cfg)
    assert healthy.trapped is False and healthy.recalibrated is False
    # Stale statistics, as torchvision's MobileNetV3 (momentum 0.01) keeps after a short run.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(3.0)
            m.running_var.fill_(0.01)
    stale = evaluate(model, test)
    report = check_batchnorm(model, run, cfg)
    assert report.trapped and report.recalibrated and report.test_top1_before == stale
    assert report.eval_top1_after > report.eval_top1 + 0.1
    assert check_batchnorm(model, run, replace(cfg, bn_recalibrate="never")).recalibrated is False


def test_distill_cli_dkd_with_cache_logs_every_part_and_reuses_the_cache(cifar_folder, tmp_path, cli):
    common = ["--data", cifar_folder, "--epochs", 1, "--teacher-epochs", 1, "--no-progress", "--threads", 1,
              "--train-subset", 100, "--teacher-cache", tmp_path / "cache"]
    cli("distill", "--teacher", "resnet8", "--loss", "dkd", *common, "--out", tmp_path / "a")
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert {"loss", "task_loss", "kd_loss", "tckd", "nckd", "train_top1", "lr"} <= set(m["history"][0])
    assert m["teacher_cache"]["build_seconds"] > 0 and len(os.listdir(tmp_path / "cache")) == 1
    ckpt = torch.load(tmp_path / "a" / "student.pt", weights_only=True)
    assert ckpt["input"]["mean"] != [0.5] * 3 and ckpt["input"]["mean"] == m["train_data"]["mean"]
    cli("distill", "--teacher", tmp_path / "a" / "teacher.pt", "--loss", "kd", *common, "--out", tmp_path / "b")
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["teacher_cache"]["build_seconds"] == 0.0
    cli("distill", "--teacher", tmp_path / "a" / "teacher.pt", "--loss", "fitnet", "--epochs", 1, "--data", cifar_folder,
        "--train-subset", 100, "--no-progress", "--threads", 1, "--out", tmp_path / "c")
    h = json.loads((tmp_path / "c" / "metrics.json").read_text())["history"][0]
    assert h["hint"] > 0 and h["kd_loss"] == pytest.approx(100 * h["hint"], rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_distill_step_with_cache_runs_on_cuda(cifar_folder, tmp_path):
    cfg = _cfg(cifar_folder, device="cuda", train_subset=64)
    data, train, test = prepare_data(cfg)
    teacher_model = build_model("resnet8", 10, data.input)
    path = str(tmp_path / "t.pt")
    save_checkpoint(path, teacher_model, spec="resnet8", classes=data.classes, input_spec=data.input,
                    data_spec=data.spec, metrics={}, config={})
    teacher = FrozenTeacher(teacher_model, data.input, data.input).cuda()
    cache = TeacherCache(str(tmp_path / "cache"), path, train)
    cache.build(teacher, 1, device="cuda", progress=False)
    student = build_model("compact-student", 10, data.input)
    history = fit(student, TrainRun(train, test, make_loss("kd")[0], teacher=teacher, cache=cache), cfg)
    assert 0.0 <= history[-1]["test_top1"] <= 1.0
