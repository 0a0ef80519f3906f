"""The teacher cache on disk (memory-mapped, float16, top-k), views computed once, the bf16 teacher and
the CPU settings: real digits, a tiny real teacher, tmp_path."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from edgekd import EdgeKDError
from edgekd.base import cpu
from edgekd.core.augment import AugmentPlan, Views
from edgekd.core.config import TrainOptions
from edgekd.core.data import InputSpec
from edgekd.core.distill import prepare_data
from edgekd.core.teachers import FrozenTeacher
from edgekd.core.losses import make_loss
from edgekd.core.teacher_cache import LiveMemo, TeacherCache, fill_value
from edgekd.core.teacher_speed import check_dtype, resolve_dtype, settle_teacher_dtype
from edgekd.core.train_loop import TrainRun, fit

SPEC = InputSpec(1, 8, 8, [0.5], [0.5])


class Counted(nn.Module):
    """A small conv net on digits that counts its forward calls (the teacher's passes)."""

    def __init__(self, classes=10):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head, self.calls = nn.Conv2d(1, 6, 3, padding=1), nn.Linear(24, classes), 0

    def forward(self, x):
        self.calls += 1
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2), 1))


@pytest.fixture(scope="module")
def digits():
    return prepare_data(TrainOptions(data="digits", progress=False, workers=0, train_subset=120, augment="standard",
                                     aug_seed=1, device="cpu"))


def _views(train, kind):
    return Views(train.images, train.targets, train.mean.flatten().tolist(), train.std.flatten().tolist(),
                 AugmentPlan(kind, len(train), seed=1))


def _teacher(data):
    return FrozenTeacher(Counted(), data.input, data.input)


def _key_from(teacher):
    teacher.sha256 = "ab" * 32  # a Teacher built here has no file: give it an identity
    return teacher


def test_cache_on_disk_round_trips_exactly_and_float16_is_float32_rounded(digits, tmp_path):
    data, train, _ = digits
    teacher = _key_from(_teacher(data))
    full = TeacherCache(str(tmp_path / "c"), teacher, train, dtype="float32")
    half = TeacherCache(str(tmp_path / "c"), teacher, train, dtype="float16")
    assert full.path != half.path and full.build(teacher, 2, batch_size=50, progress=False) > 0
    half.build(teacher, 2, batch_size=50, progress=False)
    idx = torch.randperm(len(train))[:37]
    for epoch in (1, 2):
        x, _ = train.batch(idx, epoch=epoch)
        torch.testing.assert_close(full.lookup(epoch, idx), teacher(x), rtol=0, atol=1e-5)
        # float16 storage is exactly the float32 logits rounded once
        assert torch.equal(half.lookup(epoch, idx), full.lookup(epoch, idx).half().float())
    assert not torch.allclose(full.lookup(1, idx), full.lookup(2, idx), atol=1e-3)  # views differ: the check can fail
    # On disk: meta.json and one memory-mapped .npy per view; a new run reads them without the teacher.
    assert sorted(os.listdir(half.path)) == ["meta.json", "view-0001.npy", "view-0002.npy"]
    assert os.path.getsize(os.path.join(half.path, "view-0001.npy")) < 128 + len(train) * 10 * 2 + 64
    again = TeacherCache(str(tmp_path / "c"), teacher, train, dtype="float16")
    calls = teacher.model.calls
    assert again.build(teacher, 2, progress=False) == 0.0 and teacher.model.calls == calls
    assert isinstance(again._array(1), np.memmap) and torch.equal(again.lookup(2, idx), half.lookup(2, idx))
    assert again.build(teacher, 3, progress=False) > 0 and again.held() == [1, 2, 3]
    with pytest.raises(EdgeKDError, match="view 4 was asked for"):
        again.lookup(4, idx)


def test_an_interrupted_build_keeps_whole_views_only(digits, tmp_path):
    data, train, _ = digits
    teacher = _key_from(_teacher(data))

    class Stop(Exception):
        pass

    def broken(x):  # the teacher fails in the middle of view 2
        if teacher.model.calls >= 4:
            raise Stop
        return FrozenTeacher.forward(teacher, x)

    teacher.forward = broken
    cache = TeacherCache(str(tmp_path / "c"), teacher, train)
    with pytest.raises(Stop):
        cache.build(teacher, 3, batch_size=50, progress=False)  # 3 batches per view
    assert sorted(os.listdir(cache.path)) == ["meta.json", "view-0001.npy"]  # no half-written view, no temp file


def test_a_cache_of_the_earlier_one_file_format_is_converted_not_recomputed(digits, tmp_path):
    data, train, _ = digits
    teacher = _key_from(_teacher(data))
    cache = TeacherCache(str(tmp_path / "c"), teacher, train, dtype="float32")
    old = torch.randn(3, len(train), 10)
    os.makedirs(tmp_path / "c")
    torch.save({"key": cache.legacy_key, "logits": old}, cache.legacy_path)
    calls = teacher.model.calls
    cache.build(teacher, 2, progress=False)
    assert teacher.model.calls == calls and cache.held() == [1, 2]
    assert torch.equal(cache.lookup(2, torch.arange(5)), old[1, :5])
    # A file with another key (another teacher, seed or data) is never served: the teacher runs.
    torch.save({"key": {**cache.legacy_key, "seed": 99}, "logits": old}, cache.legacy_path)
    fresh = TeacherCache(str(tmp_path / "d"), teacher, train, dtype="float32")
    os.makedirs(tmp_path / "d")
    torch.save({"key": {**cache.legacy_key, "seed": 99}, "logits": old}, fresh.legacy_path)
    fresh.build(teacher, 1, progress=False)
    assert teacher.model.calls > calls and not torch.equal(fresh.lookup(1, torch.arange(5)), old[0, :5])


def test_top_k_keeps_the_largest_logits_and_the_rests_softmax_mass_at_the_temperature(digits, tmp_path):
    torch.manual_seed(0)
    logits, k, t = torch.randn(64, 100) * 3, 5, 4.0
    top = logits.topk(k, dim=1)
    rebuilt = TeacherCache.expand(top.values, top.indices, fill_value(logits, top.values, t), 100)
    p, q = torch.softmax(logits / t, 1), torch.softmax(rebuilt / t, 1)
    torch.testing.assert_close(q.gather(1, top.indices), p.gather(1, top.indices), rtol=1e-5, atol=1e-7)
    rest = torch.ones_like(p).scatter(1, top.indices, 0).bool()
    assert torch.allclose(q[rest].view(64, -1).std(1), torch.zeros(64), atol=1e-7)  # the rest: uniform
    # without a temperature (logit matching) the rest is its mean
    mean_fill = fill_value(logits, top.values, None)
    torch.testing.assert_close(mean_fill, logits[rest].view(64, -1).mean(1))
    # Through the disk: a top-3 cache of a 10-class teacher gives the same reconstruction.
    data, train, _ = digits
    teacher = _key_from(_teacher(data))
    full = TeacherCache(str(tmp_path / "c"), teacher, train, dtype="float32")
    top3 = TeacherCache(str(tmp_path / "c"), teacher, train, dtype="float32", topk=3, temperature=t)
    full.build(teacher, 1, progress=False)
    top3.build(teacher, 1, progress=False)
    ref = full.lookup(1, torch.arange(len(train)))
    tv = ref.topk(3, dim=1)
    torch.testing.assert_close(top3.lookup(1, torch.arange(len(train))),
                               TeacherCache.expand(tv.values, tv.indices, fill_value(ref, tv.values, t), 10))
    assert top3.path != full.path and top3.lookup(1, torch.arange(4)).argmax(1).tolist() == ref[:4].argmax(1).tolist()
    with pytest.raises(EdgeKDError, match="only 10 classes"):
        TeacherCache(str(tmp_path / "e"), teacher, train, topk=10).build(teacher, 1, progress=False)


def test_views_that_cannot_differ_are_computed_once(digits, tmp_path):
    data, train, test = digits
    plain = _views(train, "none")
    teacher = _key_from(_teacher(data))
    cache = TeacherCache(str(tmp_path / "c"), teacher, plain)
    cache.build(teacher, 10, batch_size=50, progress=False)
    assert teacher.model.calls == 3 and cache.held() == [1]  # 120 images in batches of 50: one pass, not ten
    assert torch.equal(cache.lookup(7, torch.arange(9)), cache.lookup(1, torch.arange(9)))
    # A live teacher (no cache) is asked once per image too: epoch 1 only.
    live = _teacher(data)
    memo = LiveMemo.for_run(plain.plan, len(plain), 10)
    assert LiveMemo.for_run(train.plan, len(train), 10) is None  # standard augmentation: views differ by epoch
    cfg = TrainOptions(epochs=3, batch_size=40, lr=0.05, weight_decay=0.0, schedule="constant", warmup_epochs=0,
                       seed=0, device="cpu", progress=False, bn_recalibrate="never")
    student = Counted()
    fit(student, TrainRun(plain, test, make_loss("kd")[0], teacher=live, memo=memo), cfg)
    assert memo.teacher_calls == 3 and live.model.calls == 3  # 120 images in batches of 40, in epoch 1 only
    # what later epochs read is what the teacher said
    x, _ = plain.batch(torch.arange(10), epoch=3)
    torch.testing.assert_close(memo.logits[:10], live(x), rtol=0, atol=1e-5)


def test_bfloat16_teacher_answers_in_float32_keeps_layer_names_and_has_its_own_cache(digits, tmp_path):
    data, train, _ = digits
    fp32 = _key_from(_teacher(data))
    bf16 = _key_from(_teacher(data))
    record = settle_teacher_dtype(bf16, "bfloat16", "cpu", train)
    assert record["used"] == "bfloat16" and bf16.dtype_name == "bfloat16"
    assert record["channels_last"] and bf16._input_cast.channels_last
    agreement = record["top1_agreement_with_float32"]
    assert agreement["images"] == len(train) and 0.9 <= agreement["agreement"] <= 1.0
    x, _ = train.batch(torch.arange(32), epoch=1)
    out = bf16(x)
    assert out.dtype == torch.float32 and dict(bf16.model.named_modules()).keys() == dict(fp32.model.named_modules()).keys()
    torch.testing.assert_close(out, fp32(x), rtol=0.05, atol=0.05)
    assert not torch.equal(out, fp32(x))  # close, not equal: the convolution ran with 8 bits of mantissa
    assert TeacherCache(str(tmp_path), bf16, train).path != TeacherCache(str(tmp_path), fp32, train).path
    assert settle_teacher_dtype(fp32, "float32", "cpu", train, "off") == {
        "requested": "float32", "used": "float32", "why": "asked (--teacher-dtype float32)", "channels_last": False}
    assert getattr(fp32, "_input_cast", None) is None  # nothing changed: no hook on its inputs


def test_teacher_dtype_auto_follows_the_cpus_bf16_flags(digits, monkeypatch):
    data, _, _ = digits
    teacher = _teacher(data)
    monkeypatch.setattr("edgekd.core.teacher_speed.native_bf16", lambda: "AMX-BF16")
    # a 32 px teacher keeps float32 (digits and CIFAR-10 results unchanged); above 48 px auto takes bfloat16
    assert resolve_dtype("auto", teacher, "cpu") == ("float32", "auto: a teacher at 32 px (<= 48) keeps float32 "
                                                                "(--teacher-dtype bfloat16 to use it)")
    assert resolve_dtype("bfloat16", teacher, "cpu")[0] == "bfloat16"
    monkeypatch.setattr(teacher, "loaded", dataclasses.replace(teacher.loaded, size=(160, 160)))
    assert resolve_dtype("auto", teacher, "cpu")[0] == "bfloat16"
    assert resolve_dtype("auto", teacher, "cuda")[0] == "float32"
    monkeypatch.setattr("edgekd.core.teacher_speed.native_bf16", lambda: None)
    assert resolve_dtype("auto", teacher, "cpu") == ("float32", "auto: this CPU has no native bfloat16 "
                                                                "(AMX-BF16 / AVX512-BF16)")
    assert cpu.native_bf16({"avx2", "avx512_bf16", "amx_bf16"}) == "AMX-BF16, AVX512-BF16"
    assert cpu.native_bf16({"avx2", "fma"}) is None
    teacher.model = None  # a black box (ONNX, OpenVINO): its runtime chooses
    teacher.kind, teacher.spec = "onnx", "t.onnx"
    assert resolve_dtype("auto", teacher, "cpu")[0] == "float32"
    with pytest.raises(EdgeKDError, match="applies to PyTorch teachers"):
        resolve_dtype("bfloat16", teacher, "cpu")
    with pytest.raises(EdgeKDError, match="choose from auto, float32, bfloat16"):
        resolve_dtype("float16", teacher, "cpu")
    # the CLI refuses it before reading data or training a teacher
    with pytest.raises(EdgeKDError, match="applies to PyTorch teachers"):
        check_dtype("bfloat16", "t.onnx", "onnx")
    check_dtype("bfloat16", "teacher.pt", "checkpoint")
    check_dtype("auto", "t.onnx", "onnx")


@pytest.mark.parametrize("args, message", [
    (["--teacher-dtype", "float16"], "expected one of auto, float32, bfloat16"),
    (["--teacher-cache-dtype", "int8"], "expected one of float16, float32"),
    (["--teacher-cache-topk", "0"], "--teacher-cache-topk"),
    (["--teacher-cache-topk", "3"], "add --teacher-cache DIR"),
], ids=["dtype", "cache-dtype", "topk-zero", "topk-without-cache"])
def test_cli_refuses_bad_teacher_speed_options_in_one_line(args, message, tmp_path, capsys):
    from edgekd.cli import main

    with pytest.raises(SystemExit) as e:
        code = main(["distill", "--epochs", "1", "--out", str(tmp_path / "o"), "--no-progress", *args])
        raise SystemExit(code)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1


def test_cpu_limits_and_the_short_spin_wait_policy(tmp_path, monkeypatch):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpu.cgroup_cpu_limit(str(tmp_path)) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu.cgroup_cpu_limit(str(tmp_path)) is None
    monkeypatch.setattr(cpu, "cgroup_cpu_limit", lambda: 1.5)
    assert cpu.usable_cpus() == 1
    # Before torch is imported edgekd sets GOMP_SPINCOUNT=3000; a user's own choice is kept.
    code = ("import os, edgekd.base.cpu as c; r = c.short_spin_wait(); import torch, json; "
            "print(json.dumps([r, os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY')]))")
    env = {k: v for k, v in os.environ.items() if k not in cpu.WAIT_VARIABLES}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    record, spin, policy = json.loads(out.stdout)
    assert spin == "3000" and policy is None and record["set_by"] == "edgekd"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True,
                         text=True, check=True)
    record, spin, policy = json.loads(out.stdout)
    assert policy == "ACTIVE" and spin is None and record["set_by"] == "user"
    for name in cpu.WAIT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert cpu._settle_wait()["set_by"] == "nobody (torch was imported first)"  # here torch is: too late to matter


@pytest.mark.slow
def test_distill_records_the_cache_the_teachers_dtype_and_the_cpu(digits, cli, tmp_path):
    from edgekd.core.checkpoint import save_checkpoint
    from edgekd.core.models import build_model

    data, _, _ = digits
    path = tmp_path / "teacher.pt"
    save_checkpoint(str(path), build_model("compact-student", 10, data.input), spec="compact-student",
                    classes=data.classes, input_spec=data.input, data_spec="digits", metrics={}, config={})
    base = ["distill", "--teacher", path, "--train-subset", 100, "--epochs", 3, "--no-progress", "--workers", 0]
    cli(*base, "--teacher-cache", tmp_path / "c", "--teacher-cache-topk", 4, "--out", tmp_path / "a")
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    # digits: --augment auto is none, so three epochs need one view
    assert m["teacher_cache"]["views_held"] == 1 and m["teacher_cache"]["storage"]["topk"] == 4
    assert m["teacher_cache"]["storage"]["fill_temperature"] == 4.0  # kd's
    assert m["teacher"]["dtype"]["used"] == ("bfloat16" if cpu.native_bf16() else "float32")
    env_choice = any(k in os.environ for k in cpu.WAIT_VARIABLES)
    assert m["cpu"]["wait"]["set_by"] == ("user" if env_choice else "edgekd") and m["cpu"]["threads"] >= 1
    # without a cache the live teacher is asked in the first epoch only
    cli(*base, "--teacher-dtype", "float32", "--out", tmp_path / "b")
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["teacher_memo"]["teacher_calls"] == 2 and m["teacher"]["dtype"]["used"] == "float32"  # 100 images, batch 64
