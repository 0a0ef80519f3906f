"""Every bad input: exit code 2, exactly one line on stderr that names it, no traceback, nothing left on disk.

One table; each row makes its bad input in tmp_path from the shared digits run and ONNX bundle, runs the
CLI as a user would, and is checked the same way. Exit 1 is for edgekd's own bugs only.
"""

import json
import os
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


def _cases(tmp, run, bundle):
    """(name, args, message fragment) for each bad input; ``OUT`` in args is the output folder."""
    from PIL import Image

    student = run / "student.pt"
    image = tmp / "x.png"
    Image.new("L", (8, 8)).save(image)
    export = ["export", "--format", "onnx", "--no-progress", "--out", "OUT"]
    bench = ["bench", str(student), "--quick", "--no-progress", "--out", "OUT"]
    not_dict = tmp / "list.pt"
    import torch

    torch.save([1, 2, 3], not_dict)
    huge = _folder(tmp / "huge", [lambda r: huge_png(r / "train" / "c0" / "huge.png")])
    loop = _folder(tmp / "loop", [lambda r: (r / "train" / "c1" / "again").symlink_to(r / "train")])
    return [
        # checkpoints
        ("checkpoint is a list", [export[0], not_dict, *export[1:]], "found a list"),
        ("checkpoint without classes", [export[0], _checkpoint(tmp, run, "noclasses", lambda c: c.pop("classes") and None),
                                        *export[1:]], "found no classes"),
        ("checkpoint input is a string", [export[0], _checkpoint(tmp, run, "inputstr", lambda c: c.update(input="32x32")),
                                          *export[1:]], "field 'input' must be a dict"),
        ("checkpoint channels is a string",
         [export[0], _checkpoint(tmp, run, "chanstr", lambda c: c["input"].update(channels="1")), *export[1:]],
         "field 'input.channels'"),
        ("checkpoint state_dict is a list",
         [export[0], _checkpoint(tmp, run, "sdlist", lambda c: c.update(state_dict=[1, 2])), *export[1:]],
         "field 'state_dict'"),
        ("checkpoint with wrong shapes", [export[0], _checkpoint(tmp, run, "shapes", _wrong_shape), *export[1:]],
         "size mismatch"),
        ("checkpoint of NaN weights", [export[0], _checkpoint(tmp, run, "nan", _all_nan), *export[1:]],
         "the model's output holds NaN or infinity on"),
        ("bench a checkpoint of the wrong type", ["bench", not_dict, "--out", "OUT", "--no-progress"], "found a list"),
        # bundles
        ("manifest classes is a string", ["predict", _bundle(tmp, bundle, "cls", _set(["classes"], "abc")), image],
         "field 'classes'"),
        ("manifest resize holds a string",
         ["predict", _bundle(tmp, bundle, "resize", _set(["input", "resize"], ["32", 32])), image], "input.resize"),
        ("manifest mean holds NaN",
         ["predict", _bundle(tmp, bundle, "mean", _set(["input", "mean"], [float("nan")])), image], "input.mean"),
        ("manifest model_file is a number", ["predict", _bundle(tmp, bundle, "mf", _set(["model_file"], 3)), image],
         "model_file"),
        ("manifest without fields", ["predict", _bundle(tmp, bundle, "empty", lambda f, m: m.clear()), image],
         "field 'format' is missing"),
        ("garbage model file", ["predict", _bundle(tmp, bundle, "garbage", _garbage_model), image],
         "not a readable ONNX model"),
        ("missing model file", ["predict", _bundle(tmp, bundle, "missing", _missing_file), image], "is missing"),
        ("zip bomb", ["predict", _zip_bomb(tmp, bundle), image], "zip bomb"),
        # data
        ("huge image", ["train", "--model", "compact-student", "--data", huge, "--epochs", 1, "--out", "OUT",
                        "--no-progress"], "huge.png' is too large to decode (225 megapixels"),
        ("symlink loop", ["train", "--data", loop, "--epochs", 1, "--out", "OUT", "--no-progress"],
         "symbolic-link loop"),
        # devices: nothing that reaches ssh may be read as an option
        ("ssh host starting with -", [*bench, "--device", f"ssh://-oProxyCommand=touch {tmp}/pwned"], "host '-o"),
        ("ssh user starting with -", [*bench, "--device", "ssh://-oProxyCommand=x@host"], "user '-o"),
        ("ssh port out of range", [*bench, "--device", "ssh://host:70000"], "port 70000"),
        ("deploy folder starting with -", ["deploy", bundle, "ssh://host:-rf"], "folder '-rf'"),
        # numbers
        ("export --val-size 0", [export[0], student, *export[1:], "--val-size", "0"], "positive whole number"),
        ("export --val-size -5", [export[0], student, *export[1:], "--val-size", "-5"], "positive whole number"),
        ("export --atol nan", [export[0], student, *export[1:], "--atol", "nan"], "positive number"),
        ("export --atol -1", [export[0], student, *export[1:], "--atol", "-1"], "positive number"),
        ("export --calib-size -1", [export[0], student, *export[1:], "--calib-size", "-1"], "positive whole number"),
        ("bench --max-time nan", [*bench, "--max-time", "nan"], "positive number"),
        ("bench --min-time -1", [*bench, "--min-time", "-1"], "0 or more"),
        ("bench --threads -1", [*bench, "--threads", "-1"], "positive whole number"),
        ("bench --batch-sizes 0", [*bench, "--batch-sizes", "0"], "positive whole numbers"),
        ("bench --remeasure-slow nan", [*bench, "--remeasure-slow", "nan"], "0 or more"),
        ("bench --batch-sizes 100000", [*bench, "--batch-sizes", "1,100000"], "the largest batch that fits is"),
        ("predict --top-k -1", ["predict", bundle, image, "--top-k", "-1"], "positive whole number"),
        ("train --threads -1", ["train", "--threads", "-1", "--out", "OUT"], "positive whole number"),
        ("train --label-smoothing nan", ["train", "--label-smoothing", "nan", "--out", "OUT"], "--label-smoothing"),
        ("distill --temperature nan", ["distill", "--temperature", "nan", "--out", "OUT"], "positive number"),
        ("distill --alpha nan", ["distill", "--alpha", "nan", "--out", "OUT"], "--alpha"),
    ]


def test_every_bad_input_exits_2_with_one_line_and_leaves_nothing(tmp_path, digits_run, onnx_bundle, cli):
    failures = []
    for name, args, message in _cases(tmp_path, digits_run, onnx_bundle):
        out = tmp_path / f"out-{len(failures)}-{name.replace(' ', '_')}"
        proc = cli(*[out if a == "OUT" else a for a in args], check=False)
        lines = proc.stderr.strip().splitlines()
        problems = []
        if proc.returncode != 2:
            problems.append(f"exit {proc.returncode}")
        if len(lines) != 1:
            problems.append(f"{len(lines)} lines on stderr")
        if "Traceback" in proc.stderr:
            problems.append("a traceback")
        if message not in proc.stderr:
            problems.append(f"no {message!r}")
        if out.exists() and any(out.rglob("*")):
            problems.append(f"left {sorted(p.name for p in out.rglob('*'))}")
        if list(tmp_path.glob(f".{out.name}*")):  # an export's staging folder
            problems.append("left a staging folder")
        if problems:
            failures.append(f"{name}: {', '.join(problems)}: {proc.stderr.strip()[-400:]}")
    assert not (tmp_path / "pwned").exists(), "ssh ran a ProxyCommand from the device URL"
    assert not failures, "\n".join(failures)


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
