"""Sharded tar data in WebDataset format (``--data webdataset:PATH``): the same views as an image folder,
whole shards dealt to torchrun ranks, and hostile shards refused in one line."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAKE_SHARDS = os.path.join(REPO, "tools", "make_shards.py")
# (width, height) of the pictures: mixed sizes and aspect ratios
SIZES = [(40, 32), (32, 40), (36, 36), (48, 30)]
# Each class is a picture of two colours (top half, bottom half): separable, but only by looking at the pixels.
COLOURS = {"cat": ((200, 40, 40), (40, 40, 200)), "dog": ((40, 200, 40), (200, 200, 40)),
           "owl": ((230, 230, 230), (20, 20, 20))}


def _picture(cls, k, rng):
    w, h = SIZES[k % len(SIZES)]
    top, bottom = COLOURS[cls]
    a = np.zeros((h, w, 3), dtype=np.float64)
    cut = h // 2 + rng.integers(-3, 4)
    a[:cut], a[cut:] = top, bottom
    a += rng.normal(0, 25, a.shape)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8), "RGB")


def _folder(root, train=14, test=6):
    """An image folder of the two-colour classes, PNG and JPEG alternating, mixed sizes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for cls in COLOURS:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                ext = "png" if k % 2 else "jpg"
                _picture(cls, k, rng).save(root / split / cls / f"{cls}{k:03d}.{ext}")
    return root


def _add(tar, name, data, kind=tarfile.REGTYPE, **info):
    ti = tarfile.TarInfo(name)
    ti.type, ti.size = kind, (len(data) if kind == tarfile.REGTYPE else 0)
    for k, v in info.items():
        setattr(ti, k, v)
    tar.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _write_tar(path, samples):
    """A shard of ``samples``: (key, {extension: bytes}), members in key order, as WebDataset writes them."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                _add(tar, f"{key}.{ext}", data)


def _samples_of(split_dir):
    """(key, {ext: bytes}) of an image folder's split in ImageFolder's order (class folders, then files)."""
    from torchvision.datasets import ImageFolder

    found = ImageFolder(str(split_dir), loader=lambda p: p)
    out = []
    for k, (path, label) in enumerate(found.samples):
        ext = os.path.splitext(path)[1].lstrip(".")
        out.append((f"s{k:05d}", {ext: open(path, "rb").read(), "cls": str(label).encode()}))
    return out


def _shards_like(folder, root, per_shard=10):
    """WebDataset shards holding ``folder``'s images in ImageFolder's order (so index i is the same image)."""
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        samples = _samples_of(folder / split)
        for n, start in enumerate(range(0, len(samples), per_shard)):
            _write_tar(root / split / f"part-{n:03d}.tar", samples[start:start + per_shard])
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in sorted(COLOURS)))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    return _shards_like(folder, tmp_path_factory.mktemp("shards") / "wds")


# ----------------------------------------------------------------------------------------------------------
# the format, and tools/make_shards.py

def test_make_shards_writes_webdataset_shards_that_load_as_the_folder(folder, tmp_path, capsys):
    from edgekd.core.data import load_data

    out = tmp_path / "made"
    proc = subprocess.run([sys.executable, MAKE_SHARDS, str(folder), str(out), "--shard-size", "8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out / "train")) == [f"shard-{n:06d}.tar" for n in range(6)]  # 42 images by 8
    assert (out / "classes.txt").read_text().split() == sorted(COLOURS)
    with tarfile.open(out / "train" / "shard-000000.tar") as tar:
        names = tar.getnames()
    # WebDataset's layout: each sample's members together, the image then its .cls
    assert len(names) == 16 and all(a.split(".")[0] == b.split(".")[0] for a, b in zip(names[::2], names[1::2]))
    assert {n.split(".")[1] for n in names} == {"png", "jpg", "cls"}
    data, plain = load_data(f"webdataset:{out}"), load_data(str(folder))
    assert data.classes == plain.classes and len(data.train) == len(plain.train) == 42
    assert sorted(data.train.targets) == sorted(plain.train.targets)
    assert data.spec == f"webdataset:{os.path.abspath(out)}" and data.input == plain.input
    # the bytes are copied: the set of training pictures is the folder's, whatever the shuffle did
    decoded = {data.train[i][0].numpy().tobytes() for i in range(len(data.train))}
    assert decoded == {plain.train[i][0].numpy().tobytes() for i in range(len(plain.train))}

    # never over what exists, never into the folder it reads (the tool's main, in this process)
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_shards", MAKE_SHARDS)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for argv, message in (([folder, out], "already exists"), ([folder, folder / "wds"], "outside the image folder"),
                          ([folder, tmp_path / "x", "--shard-size", "0"], "--shard-size 0")):
        capsys.readouterr()
        assert tool.main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (folder / "wds").exists() and not (tmp_path / "x").exists()


def test_classes_are_class0_to_n_without_classes_txt(shards, tmp_path):
    import shutil

    from edgekd.core.data import load_data

    bare = tmp_path / "bare"
    shutil.copytree(shards, bare)
    (bare / "classes.txt").unlink()
    assert load_data(f"webdataset:{bare}").classes == ["class0", "class1", "class2"]


# ----------------------------------------------------------------------------------------------------------
# the same views as the image folder

def _views(spec, kind, teacher=None):
    from edgekd.core.augment import AugmentPlan
    from edgekd.core.data import SizeChoice, load_data
    from edgekd.core.stream import StreamViews

    data = load_data(spec, choice=SizeChoice(size=(24, 24)))
    views = StreamViews.of([(data.train, None, None)], data.input, None, workers=0)
    views.plan = AugmentPlan(kind, len(views), seed=3, scale=0.08)
    views.set_teacher_size(teacher)
    return data, views


@pytest.mark.parametrize("kind,teacher", [("random-resized-crop", (40, 40)), ("standard", None), ("none", (32, 32))],
                         ids=["random-resized-crop-teacher-view", "pad-crop", "none-teacher-view"])
def test_views_from_shards_equal_views_from_the_same_images_in_a_folder(folder, shards, kind, teacher):
    from edgekd.core.augment import decode_split

    plain, a = _views(str(folder), kind, teacher)
    data, b = _views(f"webdataset:{shards}", kind, teacher)
    assert torch.equal(a.targets, b.targets)
    idx = torch.arange(len(a))
    for epoch in (1, 2):
        xa, ta, ya = a.batch(idx, epoch=epoch, teacher_view=True)
        xb, tb, yb = b.batch(idx, epoch=epoch, teacher_view=True)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert (ta is None and tb is None) or torch.equal(ta, tb)
    # the test split, decoded once as evaluation sees it
    ia, la = decode_split(plain.test, plain.input, progress=False)
    ib, lb = decode_split(data.test, data.input, progress=False)
    assert torch.equal(ia, ib) and torch.equal(la, lb)
    # the teacher cache's key: shard path, size, mtime and member offsets
    assert b.fingerprint() == _views(f"webdataset:{shards}", kind, teacher)[1].fingerprint()
    assert b.fingerprint() != a.fingerprint()


def test_cached_teacher_logits_equal_the_live_teacher_on_views_dealt_to_a_rank(shards, tmp_path):
    """The cache is keyed by item index: the views a rank streams from its own shards find their logits."""
    from edgekd.core.data import InputSpec
    from edgekd.core.models import build_model
    from edgekd.core.teacher_cache import TeacherCache
    from edgekd.core.teachers import FrozenTeacher

    data, views = _views(f"webdataset:{shards}", "random-resized-crop", teacher=(32, 32))
    torch.manual_seed(0)
    t_input = InputSpec(3, 32, 32, [0.4] * 3, [0.3] * 3)
    teacher = FrozenTeacher(build_model("resnet8", 3, t_input), t_input, data.input)
    ckpt = tmp_path / "t.pt"
    torch.save({"x": 1}, ckpt)
    cache = TeacherCache(str(tmp_path / "cache"), str(ckpt), views, dtype="float32")
    cache.build(teacher, 2, batch_size=8, progress=False)
    for epoch in (1, 2):
        for x, xt, _, idx in views.distributed_batches(5, epoch, seed=1, rank=1, world=2, teacher_view=True):
            torch.testing.assert_close(cache.lookup(epoch, idx), teacher(xt), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# torchrun: whole shards dealt to ranks

@pytest.mark.parametrize("sizes", [[5] * 6, [3, 7, 4, 6, 5, 2, 8]], ids=["equal", "unequal"])
@pytest.mark.parametrize("world", [2, 3])
def test_shards_are_dealt_whole_and_disjoint_with_equal_steps(world, sizes):
    from edgekd.core.shards import deal_shards

    groups, start = [], 0
    for n in sizes:
        groups.append(list(range(start, start + n)))
        start += n
    shard_of = {i: s for s, g in enumerate(groups) for i in g}
    per_rank = -(-start // world)
    dealt = deal_shards(groups, world, epoch=1, seed=7)
    assert len(dealt) == world and all(len(order) == per_rank for order in dealt)  # the same steps everywhere
    owned = [{shard_of[i] for i in order} for order in dealt]
    assert all(not (owned[r] & owned[q]) for r in range(world) for q in range(r))  # no shard read by two ranks
    assert set().union(*owned) == set(range(len(sizes)))  # every shard dealt
    trimmed = 0
    for order, mine in zip(dealt, owned):
        own = sum(sizes[s] for s in mine)
        head = order[:min(own, per_rank)]
        assert len(set(head)) == len(head)  # each of its images once...
        runs = [shard_of[i] for k, i in enumerate(head) if k == 0 or shard_of[i] != shard_of[head[k - 1]]]
        assert len(runs) == len(set(runs))  # ...read shard after shard
        if own < per_rank:  # padded with its own images, from the start
            assert order[own:] == (order[:own] * per_rank)[:per_rank - own]
        trimmed += max(0, own - per_rank)
    assert len(set().union(*map(set, dealt))) == start - trimmed
    if sizes == [5] * 6:  # equal shards, a count the world divides: each image exactly once
        assert trimmed == 0 and sorted(i for order in dealt for i in order) == list(range(start))
    assert deal_shards(groups, world, 1, 7) == dealt and deal_shards(groups, world, 2, 7) != dealt


def test_fewer_shards_than_ranks_is_refused_naming_both_counts(shards):
    from edgekd import EdgeKDError
    from edgekd.core.shards import deal_shards

    with pytest.raises(EdgeKDError, match="2 shards for 3 torchrun processes"):
        deal_shards([[0, 1], [2]], 3, 1, 0)
    _, views = _views(f"webdataset:{shards}", "none")  # 42 images in 5 shards
    assert views.steps_per_epoch(10, world=5) == 5  # as many shards as ranks: fine (9 images each, 2 a step)
    with pytest.raises(EdgeKDError, match="5 shards for 6 torchrun processes"):
        views.steps_per_epoch(12, world=6)


def test_each_rank_streams_only_its_own_shards(shards):
    _, views = _views(f"webdataset:{shards}", "none")
    shard_of = views.items.sources[0].shard_of
    steps, owned = [], []
    for rank in range(2):
        batches = list(views.distributed_batches(4, epoch=3, seed=1, rank=rank, world=2))
        idx = torch.cat([i for *_, i in batches])
        steps.append(len(batches))
        owned.append({int(shard_of[i]) for i in idx})
        assert len(idx) == 21
    assert steps[0] == steps[1] == views.steps_per_epoch(8, world=2)
    assert not owned[0] & owned[1] and owned[0] | owned[1] == set(range(5))


def test_torchrun_two_processes_train_on_shards(shards, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "edgekd",
           "train", "--data", f"webdataset:{shards}", "--model", "compact-student", "--input-size", "32",
           "--epochs", "1", "--batch-size", "8", "--workers", "0", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    ranks = metrics["distributed"]["ranks"]
    assert metrics["distributed"]["world_size"] == 2 and metrics["train_data"]["pipeline"] == "stream"
    assert [r["train_images_seen"] for r in ranks] == [21, 21]  # 42 images, ceil(42 / 2) each


# ----------------------------------------------------------------------------------------------------------
# the CLI

def test_train_on_shards_through_the_cli_learns(shards, tmp_path, cli):
    out = tmp_path / "run"
    cli("train", "--data", f"webdataset:{shards}", "--model", "compact-student", "--input-size", 32, "--epochs", 2,
        "--batch-size", 8, "--lr", 0.05, "--workers", 1, "--threads", 1, "--out", out, "--no-progress")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_data"]["pipeline"] == "stream" and metrics["train_data"]["train_images"] == 42
    assert metrics["data"] == "webdataset:" + os.path.relpath(shards, out)  # recorded relative to the run
    ckpt = torch.load(out / "model.pt", weights_only=True)
    assert ckpt["classes"] == sorted(COLOURS)
    assert metrics["test_top1"] > 0.6, metrics["history"]  # three classes: chance is 0.33


def test_shards_are_always_streamed_and_pipeline_memory_is_refused(shards, tmp_path, cli_main, one_line_error,
                                                                   caplog):
    import logging

    from edgekd.core.config import DistillOptions
    from edgekd.core.distill import prepare_data

    with caplog.at_level(logging.INFO):
        data, train, _ = prepare_data(DistillOptions(data=f"webdataset:{shards}", input_size="32", workers=0,
                                                     progress=False))
    assert data.pipeline == "stream" and "streamed from their shards" in caplog.text  # auto picks stream, says so
    proc = cli_main("train", "--data", f"webdataset:{shards}", "--pipeline", "memory", "--epochs", 1,
                    "--out", tmp_path / "out", "--no-progress")
    one_line_error(proc, "always streamed")


# ----------------------------------------------------------------------------------------------------------
# hostile shards: one line, exit 2; nothing extracted

def _png(size=(8, 8), k=0):
    buf = io.BytesIO()
    Image.new("RGB", size, (90 + 30 * (k % 5), 20 + 50 * (k % 3), 200 - 40 * (k % 4))).save(buf, format="PNG")
    return buf.getvalue()


def _huge_png(width=20000, height=20000):
    """A small PNG whose header claims width x height pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _good(n, label=None):
    return [(f"k{k:03d}", {"png": _png(k=k), "cls": str(k % 2 if label is None else label).encode()}) for k in range(n)]


def _damaged(root, damage):
    """A small shard set with one kind of damage in train/part-1.tar; returns the text the error must hold."""
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        _write_tar(root / split / "part-0.tar", _good(4))
    shard = root / "train" / "part-1.tar"
    samples = _good(4)
    if damage == "no-cls":
        del samples[2][1]["cls"]
        _write_tar(shard, samples)
        return "part-1.tar', sample 'k002' has no k002.cls"
    if damage == "no-image":
        samples[1] = ("k001", {"cls": b"0", "json": b"{}"})
        _write_tar(shard, samples)
        return "part-1.tar', sample 'k001' has no image member"
    if damage in ("dangling-link", "device"):
        os.symlink(root / "gone.tar" if damage == "dangling-link" else "/dev/zero", shard)
        return "part-1.tar' cannot be read" if damage == "dangling-link" else "part-1.tar' is not a regular file"
    if damage in ("not-integer", "out-of-range", "negative"):
        samples[1][1]["cls"] = {"not-integer": b"cat", "out-of-range": b"7", "negative": b"-1"}[damage]
        _write_tar(shard, samples)
        (root / "classes.txt").write_text("a\nb\n")
        return "not an integer" if damage == "not-integer" else "class index"
    _write_tar(shard, samples)
    data = shard.read_bytes()
    if damage == "truncated":
        shard.write_bytes(data[:512 * 5 + 100])  # cut inside the third member's data
        return "part-1.tar' is truncated"
    if damage == "corrupt":
        data = bytearray(data)
        data[512 * 4:512 * 4 + 20] = b"\xff" * 20  # the third member's header
        shard.write_bytes(bytes(data))
        return "part-1.tar' is corrupt"
    if damage == "not-tar":
        shard.write_bytes(os.urandom(4096))
        return "part-1.tar' is not a readable uncompressed tar file"
    if damage == "gzip":
        import gzip

        shard.write_bytes(gzip.compress(data))
        return "part-1.tar' is not a readable uncompressed tar file"
    raise AssertionError(damage)


DAMAGE = ["truncated", "corrupt", "not-tar", "gzip", "dangling-link", "device", "no-cls", "no-image", "not-integer",
          "out-of-range", "negative"]


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_shard_is_one_line_naming_it(tmp_path, cli_main, one_line_error, damage):
    message = _damaged(tmp_path / "wds", damage)
    proc = cli_main("train", "--data", f"webdataset:{tmp_path / 'wds'}", "--epochs", 1, "--out", tmp_path / "out",
                    "--no-progress")
    line = one_line_error(proc, message)
    assert "part-1.tar" in line
    assert not (tmp_path / "out" / "model.pt").exists()


@pytest.mark.parametrize("image,message", [(b"this is no picture", "cannot read image"),
                                           (_huge_png(), "is too large to decode")], ids=["unreadable", "too-large"])
def test_a_bad_image_member_is_named_or_skipped_like_a_folder_image(tmp_path, cli_main, one_line_error, image,
                                                                    message):
    root = tmp_path / "wds"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        _write_tar(root / split / "part-0.tar", _good(6))
    samples = _good(6)
    samples[3][1]["png"] = image
    _write_tar(root / "train" / "part-1.tar", samples)
    args = ["train", "--data", f"webdataset:{root}", "--model", "compact-student", "--input-size", 32,
            "--epochs", 1, "--batch-size", 4, "--workers", 0, "--threads", 1, "--no-progress"]
    line = one_line_error(cli_main(*args, "--out", tmp_path / "a"), message)
    assert "part-1.tar:k003.png" in line and "--skip-bad-images" in line
    proc = cli_main(*args, "--skip-bad-images", "--out", tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["train_data"]["skipped_bad_images"] == 1


def test_links_devices_and_folders_are_not_read_and_names_are_only_keys(tmp_path):
    from edgekd.core.data import load_data

    root = tmp_path / "deep" / "wds"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        with tarfile.open(root / split / "part-0.tar", "w") as tar:
            _add(tar, "evil.png", b"", kind=tarfile.SYMTYPE, linkname="/etc/passwd")
            _add(tar, "hard.png", b"", kind=tarfile.LNKTYPE, linkname="../../secret.png")
            _add(tar, "dev.png", b"", kind=tarfile.CHRTYPE, devmajor=1, devminor=3)
            _add(tar, "folder.png", b"", kind=tarfile.DIRTYPE)
            _add(tar, "fifo.png", b"", kind=tarfile.FIFOTYPE)
            for key in ("../../escaped", "/tmp/absolute", "ok"):
                _add(tar, f"{key}.png", _png())
                _add(tar, f"{key}.cls", b"1")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    data = load_data(f"webdataset:{root}")
    assert data.train.names == ["../../escaped.png", "/tmp/absolute.png", "ok.png"]  # three samples; links etc. left
    assert data.classes == ["class0", "class1"] and data.train.targets == [1, 1, 1]
    assert all(x.shape == (3, 8, 8) for x, _ in (data.train[i] for i in range(3)))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written anywhere


def test_a_huge_cls_member_or_label_without_classes_txt_is_refused(tmp_path):
    from edgekd import EdgeKDError
    from edgekd.core.data import load_data

    for cls, message in ((b"1" * 100, "holds 100 bytes"), (b"10000000", "out of range")):
        root = tmp_path / cls[:3].decode() / "wds"
        for split in ("train", "test"):
            (root / split).mkdir(parents=True)
            _write_tar(root / split / "part-0.tar", [("a", {"png": _png(), "cls": cls})])
        with pytest.raises(EdgeKDError, match=message):
            load_data(f"webdataset:{root}")
