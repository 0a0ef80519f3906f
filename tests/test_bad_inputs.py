"""Every bad input: exit code 2, exactly one line on stderr that names it, no traceback, nothing left on disk.

One table, one test id per row: each row makes its bad input in tmp_path (from the shared digits run and ONNX
bundle where it needs them), runs the CLI's entry point in this process, and is checked the same way; a few rows
also run as a real process. Exit 1 is for edgekd's own bugs only.
"""

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib

import pytest


def _checkpoint(tmp, run, name, change):
    """A copy of the digits student checkpoint with ``change(ckpt)`` applied (it may return a replacement)."""
    import torch

    ckpt = torch.load(run / "student.pt", weights_only=True)
    ckpt = change(ckpt) or ckpt
    path = tmp / f"{name}.pt"
    torch.save(ckpt, path)
    return path


def _all_nan(ckpt):
    for tensor in ckpt["state_dict"].values():
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))


def _wrong_shape(ckpt):
    name = next(k for k, v in ckpt["state_dict"].items() if v.ndim == 4)
    ckpt["state_dict"][name] = ckpt["state_dict"][name][:, :, :1, :1].clone()


def _bundle(tmp, bundle, name, change):
    """A copy of the ONNX bundle with ``change(folder, manifest)`` applied; checksums follow the files."""
    from edgekd.bundle.manifest import sha256_file

    copy = tmp / name
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    change(copy, manifest)
    for f in manifest["files"] if isinstance(manifest.get("files"), dict) else []:
        if (copy / f).is_file() and isinstance(manifest["files"][f], str):
            manifest["files"][f] = sha256_file(copy / f)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _set(path, value):
    def change(_folder, manifest):
        *parents, last = path
        target = manifest
        for p in parents:
            target = target[p]
        target[last] = value
    return change


def _garbage_model(folder, manifest):
    (folder / manifest["model_file"]).write_bytes(os.urandom(4096))


def _missing_file(folder, manifest):
    (folder / manifest["model_file"]).unlink()
    manifest["files"][manifest["model_file"]] = "0" * 64


def _zip_bomb(tmp, bundle):
    """A bundle zip whose extra member is 64 MB of zeros packed into about 64 KB."""
    path = tmp / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(os.listdir(bundle)):
            z.write(bundle / f, f"b/{f}")
        z.writestr("b/padding.bin", bytes(64 * 1024 ** 2))
    return path


def huge_png(path, width=15000, height=15000):
    """A PNG whose header claims width x height grey pixels, in a few hundred bytes: refused before decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + bytes(width // 8 + 1)
    idat = zlib.compress(row * 8)  # a few rows: a decoder would stop early, but nothing decodes it
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _folder(root, extra=()):
    """A two-class ImageFolder of real digits (train/ and test/), plus ``extra(root)``."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for i in range(40):
        folder = root / ("test" if i % 4 == 0 else "train") / f"c{int(d.target[i]) % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8), "L").save(folder / f"{i:03d}.png")
    for make in extra:
        make(root)
    return root


class Inputs:
    """What the cases are made from, in tmp_path, made on first use; the shared digits run and ONNX bundle are
    asked of their session fixtures only when a case needs them (a case re-run alone starts no distillation
    it does not use)."""

    def __init__(self, request, tmp):
        self.request, self.tmp = request, tmp

    @property
    def run(self):
        return self.request.getfixturevalue("digits_run")

    @property
    def bundle(self):
        return self.request.getfixturevalue("onnx_bundle")

    @property
    def student(self):
        return self.run / "student.pt"

    @property
    def image(self):
        from PIL import Image

        path = self.tmp / "x.png"
        Image.new("L", (8, 8)).save(path)
        return path

    @property
    def not_dict(self):
        import torch

        path = self.tmp / "list.pt"
        torch.save([1, 2, 3], path)
        return path

    def checkpoint(self, name, change):
        return _checkpoint(self.tmp, self.run, name, change)

    def bundle_with(self, name, change):
        return _bundle(self.tmp, self.bundle, name, change)

    def folder(self, name, *extra):
        return _folder(self.tmp / name, extra)

    def export(self, checkpoint, *extra):
        return ["export", checkpoint, "--format", "onnx", "--no-progress", "--out", "OUT", *extra]

    def bench(self, *extra):
        return ["bench", self.student, "--quick", "--no-progress", "--out", "OUT", *extra]

    def predict(self, bundle):
        return ["predict", bundle, self.image]


# (name, inputs -> args, message fragment) for each bad input; ``OUT`` in args is the output folder.
CASES = [
    # checkpoints
    ("checkpoint is a list", lambda i: i.export(i.not_dict), "found a list"),
    ("checkpoint without classes",
     lambda i: i.export(i.checkpoint("noclasses", lambda c: c.pop("classes") and None)), "found no classes"),
    ("checkpoint input is a string",
     lambda i: i.export(i.checkpoint("inputstr", lambda c: c.update(input="32x32"))), "field 'input' must be a dict"),
    ("checkpoint channels is a string",
     lambda i: i.export(i.checkpoint("chanstr", lambda c: c["input"].update(channels="1"))), "field 'input.channels'"),
    ("checkpoint state_dict is a list",
     lambda i: i.export(i.checkpoint("sdlist", lambda c: c.update(state_dict=[1, 2]))), "field 'state_dict'"),
    ("checkpoint with wrong shapes", lambda i: i.export(i.checkpoint("shapes", _wrong_shape)), "size mismatch"),
    ("checkpoint of NaN weights", lambda i: i.export(i.checkpoint("nan", _all_nan)),
     "the model's output holds NaN or infinity on"),
    ("bench a checkpoint of the wrong type", lambda i: ["bench", i.not_dict, "--out", "OUT", "--no-progress"],
     "found a list"),
    # bundles
    ("manifest classes is a string", lambda i: i.predict(i.bundle_with("cls", _set(["classes"], "abc"))),
     "field 'classes'"),
    ("manifest resize holds a string",
     lambda i: i.predict(i.bundle_with("resize", _set(["input", "resize"], ["32", 32]))), "input.resize"),
    ("manifest mean holds NaN",
     lambda i: i.predict(i.bundle_with("mean", _set(["input", "mean"], [float("nan")]))), "input.mean"),
    ("manifest model_file is a number", lambda i: i.predict(i.bundle_with("mf", _set(["model_file"], 3))),
     "model_file"),
    ("manifest without fields", lambda i: i.predict(i.bundle_with("empty", lambda f, m: m.clear())),
     "field 'format' is missing"),
    ("garbage model file", lambda i: i.predict(i.bundle_with("garbage", _garbage_model)), "not a readable ONNX model"),
    ("missing model file", lambda i: i.predict(i.bundle_with("missing", _missing_file)), "is missing"),
    ("zip bomb", lambda i: i.predict(_zip_bomb(i.tmp, i.bundle)), "zip bomb"),
    # data
    ("huge image",
     lambda i: ["train", "--model", "compact-student", "--data",
                i.folder("huge", lambda r: huge_png(r / "train" / "c0" / "huge.png")), "--epochs", 1, "--out", "OUT",
                "--no-progress"],
     "huge.png' is too large to decode (225 megapixels"),
    ("symlink loop",
     lambda i: ["train", "--data", i.folder("loop", lambda r: (r / "train" / "c1" / "again").symlink_to(r / "train")),
                "--epochs", 1, "--out", "OUT", "--no-progress"],
     "symbolic-link loop"),
    # devices: nothing that reaches ssh may be read as an option
    ("ssh host starting with -", lambda i: i.bench("--device", f"ssh://-oProxyCommand=touch {i.tmp}/pwned"),
     "host '-o"),
    ("ssh user starting with -", lambda i: i.bench("--device", "ssh://-oProxyCommand=x@host"), "user '-o"),
    ("ssh port out of range", lambda i: i.bench("--device", "ssh://host:70000"), "port 70000"),
    ("deploy folder starting with -", lambda i: ["deploy", i.bundle, "ssh://host:-rf"], "folder '-rf'"),
    # numbers
    ("export --val-size 0", lambda i: i.export(i.student, "--val-size", "0"), "positive whole number"),
    ("export --val-size -5", lambda i: i.export(i.student, "--val-size", "-5"), "positive whole number"),
    ("export --atol nan", lambda i: i.export(i.student, "--atol", "nan"), "positive number"),
    ("export --atol -1", lambda i: i.export(i.student, "--atol", "-1"), "positive number"),
    ("export --calib-size -1", lambda i: i.export(i.student, "--calib-size", "-1"), "positive whole number"),
    ("bench --max-time nan", lambda i: i.bench("--max-time", "nan"), "positive number"),
    ("bench --min-time -1", lambda i: i.bench("--min-time", "-1"), "0 or more"),
    ("bench --threads -1", lambda i: i.bench("--threads", "-1"), "positive whole number"),
    ("bench --batch-sizes 0", lambda i: i.bench("--batch-sizes", "0"), "positive whole numbers"),
    ("bench --remeasure-slow nan", lambda i: i.bench("--remeasure-slow", "nan"), "0 or more"),
    ("bench --batch-sizes 100000", lambda i: i.bench("--batch-sizes", "1,100000"), "the largest batch that fits is"),
    ("predict --top-k -1", lambda i: [*i.predict(i.bundle), "--top-k", "-1"], "positive whole number"),
    ("train --threads -1", lambda i: ["train", "--threads", "-1", "--out", "OUT"], "positive whole number"),
    ("train --label-smoothing nan", lambda i: ["train", "--label-smoothing", "nan", "--out", "OUT"],
     "--label-smoothing"),
    ("distill --temperature nan", lambda i: ["distill", "--temperature", "nan", "--out", "OUT"], "positive number"),
    ("distill --alpha nan", lambda i: ["distill", "--alpha", "nan", "--out", "OUT"], "--alpha"),
]


def case_id(name):
    """A case's name as a test id: 'export --val-size -5' -> 'export-val-size-minus5'."""
    name = re.sub(r" -$", " dash", re.sub(r"(?<= )-(?=\d)", "minus", name))
    return re.sub(r"[^a-z0-9_]+", "-", name.lower()).strip("-")


@pytest.mark.parametrize("make, message", [c[1:] for c in CASES], ids=[case_id(c[0]) for c in CASES])
def test_a_bad_input_exits_2_with_one_line_and_leaves_nothing(request, tmp_path, cli_main, one_line_error, make,
                                                              message):
    args = make(Inputs(request, tmp_path))
    out = tmp_path / "out"
    proc = cli_main(*[out if a == "OUT" else a for a in args])
    one_line_error(proc, message)
    assert not (out.exists() and any(out.rglob("*"))), sorted(p.name for p in out.rglob("*"))
    assert not list(tmp_path.glob(".out*")), "an export's staging folder was left"
    assert not (tmp_path / "pwned").exists(), "ssh ran a ProxyCommand from the device URL"


# The same answers from the real process: argparse's own error, a value checked against the option table, and a
# bundle refused by the runtime deep inside predict.
@pytest.mark.parametrize("make, message", [
    (lambda i: ["train", "--no-such-option", "1"], "unrecognized arguments: --no-such-option"),
    (lambda i: ["train", "--epochs", "0", "--out", "OUT"], "--epochs: expected a positive whole number, got '0'"),
    (lambda i: i.predict(i.bundle_with("garbage", _garbage_model)), "not a readable ONNX model"),
], ids=["argparse", "option-table", "runtime"])
def test_the_cli_process_exits_2_with_one_line_and_no_traceback(request, tmp_path, cli, one_line_error, make, message):
    out = tmp_path / "out"
    proc = cli(*[out if a == "OUT" else a for a in make(Inputs(request, tmp_path))], check=False)
    one_line_error(proc, message)
    assert not out.exists()


def test_huge_images_are_skipped_and_counted_with_skip_bad_images(tmp_path, cli):
    data = _folder(tmp_path / "data", [lambda r: huge_png(r / "train" / "c0" / "huge.png")])
    out = tmp_path / "out"
    cli("train", "--model", "compact-student", "--data", data, "--epochs", 1, "--skip-bad-images", "--out", out,
        "--no-progress")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_data"]["skipped_bad_images"] == 1 and metrics["train_data"]["train_images"] == 30


def test_a_link_to_a_folder_elsewhere_is_followed_once(tmp_path):
    from edgekd.core.data import check_link_loops, load_data

    data = _folder(tmp_path / "data")
    elsewhere = _folder(tmp_path / "other") / "train" / "c1"
    (data / "train" / "c1" / "more").symlink_to(elsewhere)
    check_link_loops(str(data / "train"))
    assert len(load_data(str(data)).train) == 30 + len(list(elsewhere.iterdir()))


def test_openvino_and_nncf_count_and_send_nothing(tmp_path):
    """Without edgekd, importing openvino writes a client id and a usage count under ~/intel (and sends an
    event); in an edgekd process (telemetry switched off, as the CLI's main() and edgekd's workers do first),
    importing openvino and nncf and converting a model writes nothing."""
    home_plain, home_edgekd = tmp_path / "plain", tmp_path / "edgekd"
    home_plain.mkdir()
    home_edgekd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    subprocess.run([sys.executable, "-c", "import openvino"], env={**env, "HOME": str(home_plain)}, check=True,
                   timeout=300)
    assert list(home_plain.rglob("*")), "openvino no longer writes telemetry files: the test cannot tell"
    code = ("from edgekd.base.telemetry import switch_off; switch_off()\nimport torch, openvino as ov, nncf\n"
            "ov.convert_model(torch.nn.Conv2d(1, 2, 3), example_input=torch.zeros(1, 1, 8, 8))\n")
    subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(home_edgekd)}, check=True, timeout=300,
                   capture_output=True)
    assert not list(home_edgekd.rglob("*"))


def test_importing_edgekd_leaves_the_host_process_alone():
    """A library import patches nothing: telemetry is switched off by the CLI and edgekd's workers, explicitly."""
    code = ("import sys; before = list(sys.meta_path); import edgekd, edgekd.core.distill, edgekd.export.pipeline\n"
            "assert sys.meta_path == before, sys.meta_path\n"
            "from edgekd.base.telemetry import switch_off; switch_off(); assert sys.meta_path != before\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_zip_bounds_refuse_before_anything_is_written(tmp_path):
    from edgekd import EdgeKDError
    from edgekd.bundle.runtime import safe_extract

    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(1001):
            z.writestr(f"b/{i}", b"")
    folder = tmp_path / "x"
    folder.mkdir()
    with pytest.raises(EdgeKDError, match="1001 members"):
        safe_extract(archive, folder)
    assert not list(folder.iterdir())
