"""Fuzzing the files and values a user hands edgekd (Hypothesis): manifests, config files, checkpoint dicts and
option values. For every generated input, through ``edgekd.cli.main`` in this process: exit 0 or 2 (never 1,
an edgekd bug), no traceback, and nothing outside --out changed (no file created, modified or removed).

The default suite runs a fixed, small set of examples per strategy (derandomized: the same every run, under a
minute in all); ``make test-slow`` runs many more, freshly random each time. A failure prints the smallest
input Hypothesis found. Inputs whose validity costs real work (a valid config starts training) are kept
short of it: the data named on the command line does not exist, so a config that passes every check stops
there with exit 2, after everything in it was read and checked.
"""

import contextlib
import io
import json
import os
import shutil
import sys

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # pytest's importlib mode puts no test folder on the path
from test_hostile_inputs import make_bundle  # noqa: E402

FAST, SLOW = 12, 300  # examples per strategy: the default suite, and make test-slow
BUDGETS = [pytest.param(FAST, id="fast"), pytest.param(SLOW, id="slow", marks=pytest.mark.slow)]


def _settings(examples):
    # database=None: Hypothesis writes nothing into the repository; derandomize: the default suite is repeatable
    return settings(max_examples=examples, deadline=None, database=None, derandomize=examples == FAST,
                    suppress_health_check=list(HealthCheck), print_blob=False)


# ---------------------------------------------------------------------------------------------------
# The harness: one in-process run, its exit code and output, and what it changed on disk

def _snapshot(root, skip):
    """{path: (size, mtime_ns)} of everything under ``root`` except ``skip`` (the --out folder)."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) != str(skip)]
        for name in dirs + files:
            path = os.path.join(folder, name)
            try:
                st_ = os.lstat(path)
            except OSError:
                continue
            found[path] = (st_.st_size, st_.st_mtime_ns) if name in files else None
    return found


def run_edgekd(argv, watch, out):
    """``edgekd ARGV`` in-process; assert the contract and return (code, stdout, stderr)."""
    import torch

    from edgekd.base.progress import REPORT
    from edgekd.cli import main

    for handler in list(REPORT.handlers):
        REPORT.removeHandler(handler)
    threads, cwd = torch.get_num_threads(), os.getcwd()
    before = _snapshot(watch, out)
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as e:  # argparse's usage errors
                code = 0 if e.code is None else e.code
    finally:
        torch.set_num_threads(threads)  # --threads sets the process's torch threads
        os.chdir(cwd)
    after = _snapshot(watch, out)
    err = stderr.getvalue()
    assert code in (0, 2), f"exit {code}: {err.strip()[-600:]}"
    assert "Traceback" not in err, err[-600:]
    changed = sorted(set(before.items()) ^ set(after.items()))
    assert not changed, f"changed outside --out: {changed[:5]}"
    if out is not None and os.path.isdir(out):
        shutil.rmtree(out)
    return code, stdout.getvalue(), err


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """A folder holding a real tiny ONNX bundle, an image, a checkpoint of compact-student, and room for --out."""
    import torch
    from PIL import Image

    from edgekd.core.checkpoint import save_checkpoint
    from edgekd.core.data import default_input
    from edgekd.core.models import build_model

    root = tmp_path_factory.mktemp("fuzz")
    make_bundle(root / "bundle", ["zero", "one", "two"])
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), "L").save(root / "x.png")
    spec = default_input(1, 8, 8)
    torch.manual_seed(0)
    model = build_model("compact-student", 3, spec)
    save_checkpoint(root / "student.pt", model, spec="compact-student", classes=["zero", "one", "two"],
                    input_spec=spec, data_spec="digits", metrics={}, config={})
    return root


# ---------------------------------------------------------------------------------------------------
# Strategies

JSON_LEAF = st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=20)
JSON = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4), max_leaves=12)
MANIFEST_PATHS = [("format",), ("precision",), ("files",), ("model_file",), ("input",), ("input", "shape"),
                  ("input", "color"), ("input", "resize"), ("input", "mean"), ("input", "std"), ("classes",),
                  ("runtime",), ("runtime", "inference_precision"), ("validation",)]
CLASSES = st.lists(st.text(max_size=12), min_size=0, max_size=6)
RESIZE = st.lists(st.integers(-3, 70), min_size=0, max_size=3)


@st.composite
def manifests(draw):
    """A valid manifest with a few fields replaced by other JSON, removed, or made plausible but wrong; or any
    JSON value at all; or text that is not JSON."""
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "any json", "text"]))
    if kind == "text":
        return draw(st.text(max_size=60))
    if kind == "any json":
        return json.dumps(draw(JSON))
    manifest = draw(st.just(None)) or {}
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(MANIFEST_PATHS))
        value = draw(st.sampled_from(["json", "delete", "classes", "resize"]))
        manifest.setdefault("_changes", []).append((path, value, draw(
            JSON if value == "json" else CLASSES if value == "classes" else RESIZE if value == "resize" else st.none())))
    return manifest


def _apply(base, changes):
    m = json.loads(json.dumps(base))
    for path, how, value in changes:
        target = m
        for key in path[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        if how == "delete":
            target.pop(path[-1], None)
        else:
            target[path[-1]] = value
    return json.dumps(m, allow_nan=True)


TRAIN_KEYS = ["epochs", "batch_size", "lr", "seed", "aug_seed", "norm", "model", "workers", "threads", "device",
              "optimizer", "schedule", "label_smoothing", "train_subset", "augment", "momentum", "warmup_epochs",
              "weight_decay", "amp", "channels_last", "compile", "progress", "bn_recalibrate", "weights", "data_root",
              "skip_bad_images", "unlabeled", "resume", "loss_params", "no_such_key"]
YAML_VALUES = JSON | st.sampled_from(["auto", "0.5/0.5", "1e400", "nan", "-1", "cpu", "cuda", "~", "yes", "[", "{a: 1",
                                      "compact-student", "seed-teacher", "&a [1]", "*a"])


@st.composite
def config_texts(draw):
    """YAML text: a mapping of real and unknown keys to values of any type, dumped; or text assembled from YAML
    pieces (anchors, aliases, flow collections, tags) that may or may not parse."""
    import yaml

    if draw(st.booleans()):
        mapping = draw(st.dictionaries(st.sampled_from(TRAIN_KEYS), YAML_VALUES, max_size=5))
        return yaml.safe_dump(mapping, allow_unicode=True)
    pieces = st.sampled_from(["epochs: 1\n", "norm: ", "&x ", "*x", "[", "]", "{", "}", ", ", "!!python/name:os.system",
                              "!!binary aGk=", "<<: *x\n", "lr: .inf\n", "seed: 99999999999999999999\n", "- ", "\n",
                              "batch_size: ", "1", "? ", ": ", "'", "\"", "%YAML 1.1\n", "---\n", "\t"])
    return "".join(draw(st.lists(pieces, max_size=25)))


@st.composite
def checkpoints(draw):
    """A valid checkpoint dict (as keys and values to change) with fields replaced, removed or made plausible but
    wrong: other specs, class lists, input sizes and statistics, state dicts with tensors of other shapes."""
    changes = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(["model", "classes", "input", "input.height", "input.channels", "input.mean",
                                    "input.std", "state_dict", "state_dict.tensor", "qat", "format", "drop"]))
        if key == "model":
            value = draw(st.sampled_from(["seed-student", "compact-student", "resnet8", "x.pt", "torchvision:nope",
                                          "", "timm:", "compact-student\x1b[2J"]) | st.text(max_size=10) | JSON)
        elif key == "classes":
            value = draw(CLASSES | JSON)
        elif key.startswith("input."):
            value = draw(st.integers(-2, 40) | st.lists(st.floats(allow_nan=True), max_size=4) | JSON)
        elif key == "state_dict.tensor":
            value = draw(st.lists(st.integers(0, 4), min_size=0, max_size=4))
        else:
            value = draw(JSON)
        changes.append((key, value))
    return changes


def _checkpoint_with(place, changes, path):
    import torch

    ckpt = torch.load(place / "student.pt", weights_only=True)
    for key, value in changes:
        if key == "drop":
            ckpt.pop(draw_key(ckpt, value), None)
        elif key == "state_dict.tensor" and isinstance(ckpt.get("state_dict"), dict) and ckpt["state_dict"]:
            name = sorted(ckpt["state_dict"])[len(value) % len(ckpt["state_dict"])]
            ckpt["state_dict"][name] = torch.zeros(value)
        elif "." in key:
            outer, inner = key.split(".")
            if isinstance(ckpt.get(outer), dict):
                ckpt[outer][inner] = value
        else:
            ckpt[key] = value
    torch.save(ckpt, path)


def draw_key(ckpt, value):
    keys = sorted(ckpt)
    return keys[hash(json.dumps(value, default=str)) % len(keys)]


NUMBERISH = st.sampled_from(["0", "-1", "1", "2", "nan", "inf", "-inf", "1e309", "4294967296", "18446744073709551616",
                             "99999999999999999999999", "0x10", "1_0", " 3 ", "", "3.5", "1,2", "٣"]) | st.text(max_size=8)
TRAIN_OPTIONS = ["--epochs", "--batch-size", "--lr", "--seed", "--aug-seed", "--norm", "--model", "--workers",
                 "--threads", "--device", "--optimizer", "--schedule", "--label-smoothing", "--train-subset",
                 "--augment", "--momentum", "--warmup-epochs", "--weight-decay", "--amp", "--channels-last",
                 "--bn-recalibrate"]
DISTILL_OPTIONS = ["--teacher-input-size", "--teacher-mean", "--teacher-std", "--teacher-color", "--teacher-outputs",
                   "--teacher-views", "--teacher-threads", "--temperature", "--alpha", "--beta", "--dkd-warmup",
                   "--loss", "--teacher-epochs"]
PREDICT_OPTIONS = ["--top-k", "--threads", "--device"]


# ---------------------------------------------------------------------------------------------------
# The tests

@pytest.mark.parametrize("examples", BUDGETS)
def test_fuzz_manifests(place, examples):
    base = json.loads((place / "bundle" / "manifest.json").read_text())

    @_settings(examples)
    @given(manifests())
    # what it found on the way (each was exit 1), and JSON nested past the parser's recursion limit
    @example({"_changes": [(("runtime",), "json", True)]})
    @example({"_changes": [(("input", "resize"), "resize", [1, 1])]})
    @example({"_changes": [(("classes",), "classes", ["only one"])]})
    @example("[" * 100_000 + "]" * 100_000)
    def check(manifest):
        folder = place / "fuzzed-bundle"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(place / "bundle", folder)
        text = manifest if isinstance(manifest, str) else _apply(base, manifest.get("_changes", []))
        (folder / "manifest.json").write_text(text)
        try:
            run_edgekd(["predict", folder, place / "x.png", "--json", "--top-k", "2"], place, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    check()


@pytest.mark.parametrize("examples", BUDGETS)
def test_fuzz_config_files(place, examples):
    @_settings(examples)
    @given(config_texts(), st.sampled_from(["train", "distill"]))
    @example("norm: " + "[" * 3000 + "]" * 3000 + "\n", "train")  # nested past the YAML composer's recursion
    @example("seed: -1\n", "distill")  # out of numpy's range (was exit 1 at training start)
    def check(text, command):
        config = place / "config.yaml"
        config.write_text(text)
        try:
            code, _, _ = run_edgekd([command, "--config", config, "--data", place / "no-such-data", "--out",
                                     place / "out", "--no-progress"], place, place / "out")
        finally:
            config.unlink()
        assert code == 2  # the data does not exist: nothing may run

    check()


@pytest.mark.parametrize("examples", BUDGETS)
def test_fuzz_checkpoints(place, examples):
    @_settings(examples)
    @given(checkpoints())
    def check(changes):
        path = place / "fuzzed.pt"
        _checkpoint_with(place, changes, path)
        try:
            code, _, _ = run_edgekd(["export", path, "--format", "onnx", "--data", place / "no-such-data",
                                     "--out", place / "out", "--no-progress"], place, place / "out")
        finally:
            path.unlink()
        assert code == 2

    check()


@pytest.mark.parametrize("examples", BUDGETS)
def test_fuzz_option_values(place, examples):
    @_settings(examples)
    @given(st.sampled_from(["train", "distill", "predict"]), st.data())
    def check(command, data):
        names = TRAIN_OPTIONS + (DISTILL_OPTIONS if command == "distill" else []) if command != "predict" \
            else PREDICT_OPTIONS
        chosen = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True))
        argv = [command]
        for name in chosen:
            argv += [f"{name}={data.draw(NUMBERISH)}"]
        if command == "predict":
            run_edgekd(["predict", place / "bundle", place / "x.png", *argv[1:]], place, None)
        else:
            code, _, _ = run_edgekd(argv + ["--data", place / "no-such-data", "--out", place / "out", "--no-progress"],
                                    place, place / "out")
            assert code == 2

    check()


# ---------------------------------------------------------------------------------------------------
# Derived files and geometry (issue 26): the teacher cache, shards, a manifest's crop_pct / resize / shape

GEOMETRY = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10 ** 12), st.none(),
                     st.booleans(), st.text(max_size=5), st.sampled_from([1e-9, 1e-6, 0.01, 0.875, 1.0, 1.0000001]))
SIDES = st.lists(st.integers(-2, 70_000), min_size=0, max_size=3) | st.lists(st.floats(), max_size=2)


@pytest.mark.parametrize("examples", BUDGETS)
def test_fuzz_manifest_geometry(place, examples):
    """crop_pct, resize and the input shape of a manifest: exit 0 or 2, never a resize the memory cannot hold."""
    base = json.loads((place / "bundle" / "manifest.json").read_text())

    @_settings(examples)
    @given(GEOMETRY, SIDES, st.lists(st.integers(-1, 9), max_size=5))
    @example(1e-9, [8, 8], [1, 1, 8, 8])
    @example(0.0001, [4096, 4096], [1, 1, 4096, 4096])
    def check(crop_pct, resize, shape):
        manifest = json.loads(json.dumps(base))
        manifest["input"]["crop_pct"] = crop_pct
        if resize:
            manifest["input"]["resize"] = resize
        if shape:
            manifest["input"]["shape"] = shape
        folder = place / "geometry-bundle"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(place / "bundle", folder)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        try:
            run_edgekd(["predict", folder, place / "x.png", "--json"], place, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    check()


@pytest.fixture(scope="module")
def cache_place(tmp_path_factory):
    """A tiny real teacher, digits views and one built teacher cache (float32, 2 views) to damage."""
    import torch
    from torch import nn

    from edgekd.core.config import TrainOptions
    from edgekd.core.distill import prepare_data
    from edgekd.core.teachers import FrozenTeacher
    from edgekd.core.teacher_cache import TeacherCache

    data, train, _ = prepare_data(TrainOptions(data="digits", progress=False, workers=0, train_subset=40,
                                               augment="standard", aug_seed=1, device="cpu"))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 10))
    teacher = FrozenTeacher(net, data.input, data.input)
    teacher.sha256 = "ef" * 32
    root = tmp_path_factory.mktemp("cache")
    cache = TeacherCache(str(root / "built"), teacher, train, dtype="float32")
    cache.build(teacher, 2, progress=False)
    return root, teacher, train, cache.path


CACHE_DAMAGE = st.sampled_from(["flip", "truncate", "append", "npy", "meta-json", "meta-text", "extra-file"])


@pytest.mark.parametrize("examples", BUDGETS)
def test_fuzz_teacher_cache(cache_place, examples):
    """A damaged cache is rebuilt (and then answers exactly as the teacher) or refused with EdgeKDError."""
    import torch

    from edgekd import EdgeKDError
    from edgekd.core.teacher_cache import TeacherCache

    root, teacher, train, built = cache_place

    @_settings(examples)
    @given(CACHE_DAMAGE, st.sampled_from(["view-0001.npy", "view-0002.npy"]), st.integers(0, 10 ** 6),
           st.binary(max_size=64), JSON, st.sampled_from(["float16", "float64", "int16", "object"]))
    def check(damage, view, where, blob, value, dtype):
        work = root / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(os.path.dirname(built), work)
        folder = work / os.path.basename(built)
        path = folder / view
        data = path.read_bytes()
        if damage == "flip":
            i = where % len(data)
            path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
        elif damage == "truncate":
            path.write_bytes(data[:where % len(data)])
        elif damage == "append":
            path.write_bytes(data + blob)
        elif damage == "npy":
            arr = np.zeros((len(train), 10), dtype=object if dtype == "object" else dtype)
            np.save(path, arr, allow_pickle=dtype == "object")
        elif damage in ("meta-json", "meta-text"):
            (folder / "meta.json").write_bytes(json.dumps(value).encode() if damage == "meta-json" else blob)
        else:
            (folder / "view-abcd.npy").write_bytes(blob)
        cache = TeacherCache(str(work), teacher, train, dtype="float32")
        try:
            cache.build(teacher, 2, progress=False)
        except EdgeKDError:
            return
        idx = torch.arange(len(train))
        for epoch in (1, 2):
            x, _ = train.batch(idx, epoch=epoch)
            torch.testing.assert_close(cache.lookup(epoch, idx), teacher(x), rtol=0, atol=1e-5)

    check()


def _tar_bytes(members):
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


SHARD_NAMES = st.sampled_from(["k0.png", "k0.cls", "k1.png", "k1.cls", "k1.jpg", "k2.cls", ".hidden.png", "noext",
                               "a/b.png", "a/b.cls", "k3.PNG", "k3.cls"])
LABELS = st.one_of(st.integers(-3, 200_000).map(lambda n: str(n).encode()), st.binary(max_size=40))
EXTRA = st.sampled_from([None, "part-9.tar.gz", "notes.txt", "part-8.tar"])


@pytest.mark.parametrize("examples", BUDGETS)
def test_fuzz_shards(place, examples):
    """Shards with any members, labels and neighbours: data loaded, or EdgeKDError naming a shard or a file."""
    from PIL import Image

    from edgekd import EdgeKDError
    from edgekd.core.data import load_data

    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(png, format="PNG")

    @_settings(examples)
    @given(st.lists(st.tuples(SHARD_NAMES, LABELS, st.booleans()), max_size=8), EXTRA, st.integers(0, 4),
           st.booleans())
    def check(members, extra, cut, classes_txt):
        root = place / "wds"
        shutil.rmtree(root, ignore_errors=True)
        tars = []
        for name, label, good_image in members:
            data = label if name.endswith(".cls") else png.getvalue() if good_image else label
            tars.append((name, data))
        blob = _tar_bytes(tars)
        for split in ("train", "test"):
            (root / split).mkdir(parents=True)
            (root / split / "part-0.tar").write_bytes(blob[:len(blob) - 512 * cut] if split == "train" else blob)
        if extra:
            (root / "train" / extra).write_bytes(b"\x1f\x8b not a tar")
        if classes_txt:
            (root / "classes.txt").write_text("a\nb\n")
        try:
            data = load_data(f"webdataset:{root}")
        except EdgeKDError as e:
            assert "\n" not in str(e)
            return
        assert len(data.classes) <= 100_000 and data.train.targets
        shutil.rmtree(root, ignore_errors=True)

    check()
