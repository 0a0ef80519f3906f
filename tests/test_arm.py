"""Bundles made for, checked on and deployed to the emulated ARM64 board (tools/arm_device.sh; `make test-arm`).

A MobileNetV3-small student (torchvision:mobilenet_v3_small, edgekd's small-input stem, digits 32x32 grey,
one short epoch) is exported at FP32, FP16 and INT8 in both formats with ``--target ssh://`` the board:
the parity gate and the INT8 check run on the board itself. Top-1 on the board and on this machine over
the same test images come from one ``edgekd bench --device cpu,ssh://...``. With EDGEKD_ARM_REPORT=FILE
the table of docs/devices.md is written to FILE.
"""

import json
import os
import shutil

import pytest

pytestmark = pytest.mark.arm

BUNDLES = [(fmt, p) for fmt in ("onnx", "openvino") for p in ("fp32", "fp16", "int8")]
MAX_DROP = 6.0  # INT8 gate in points: a one-epoch student on 50 images moves by whole images (2 points each)
IMAGES = 50


@pytest.fixture(scope="module")
def student(tmp_path_factory, cli):
    out = tmp_path_factory.mktemp("mnv3")
    cli("train", "--model", "torchvision:mobilenet_v3_small", "--epochs", 1, "--train-subset", 600, "--out", out,
        "--no-progress", timeout=3600)
    return out / "model.pt"


# What the gate on the board refuses: OpenVINO 2026.4.1's NNCF INT8 model loses most of its top-1 on the
# emulated aarch64 CPU (0.66 -> 0.18 on 50 digits images for a student that keeps it on x86), so
# `--target ssh://` the board writes no bundle. If a later OpenVINO fixes it, this set shrinks.
REFUSED_ON_THE_BOARD = {("openvino", "int8")}


@pytest.fixture(scope="module")
def arm_bundles(arm_board, student, tmp_path_factory, cli):
    """The bundles, each exported --target the board (the gate runs there); {(format, precision): folder}."""
    out = tmp_path_factory.mktemp("arm-bundles")
    bundles, refused = {}, {}
    for fmt, precision in BUNDLES:
        folder = out / f"{fmt}-{precision}"
        int8 = ["--calib-size", 100, "--max-drop", MAX_DROP, "--qat-epochs", 0] if precision == "int8" else []
        if (fmt, precision) in REFUSED_ON_THE_BOARD:
            int8 += ["--max-fallback-layers", 0]
        proc = cli("export", student, "--format", fmt, "--precision", precision, "--target", arm_board.url(),
                   "--ssh-config", arm_board.ssh_config, "--val-size", IMAGES, *int8, "--out", folder, "--no-progress",
                   check=(fmt, precision) not in REFUSED_ON_THE_BOARD, timeout=3600)
        if proc.returncode == 0:
            bundles[fmt, precision] = folder
        else:
            refused[fmt, precision] = proc.stderr.strip()
    return bundles, refused


def test_the_gate_on_the_board_refuses_what_does_not_hold_there(arm_bundles):
    bundles, refused = arm_bundles
    assert set(refused) == REFUSED_ON_THE_BOARD and set(bundles) == set(BUNDLES) - REFUSED_ON_THE_BOARD
    for (fmt, precision), stderr in refused.items():
        # the log says which board it asked (INFO lines); the refusal itself is one line, the last
        error = [line for line in stderr.splitlines() if ": error: " in line]
        assert len(error) == 1 and error[0] == stderr.splitlines()[-1] and "Traceback" not in stderr, stderr
        assert all(line.startswith("INFO ") for line in stderr.splitlines()[:-1]), stderr  # no stray warnings
        assert "parity check failed: INT8 top-1" in error[0] and "no bundle written" in error[0], stderr


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def test_bundles_for_the_board_record_their_target_and_where_the_gate_ran(arm_bundles):
    for (fmt, precision), folder in arm_bundles[0].items():
        m = _manifest(folder)
        ran_on = m["validation"]["ran_on"]
        assert ran_on["where"].startswith("ssh://edgedevice") and ran_on["machine"] == "aarch64", ran_on
        assert ran_on["emulated"] == "qemu" and m["target"]["arch"] == "aarch64"
        assert m["parity"]["images"] == 8 and "parity.npy" in m["files"]
        if fmt == "openvino":  # OpenVINO for aarch64: a static batch, f32 pinned
            assert m["input"]["shape"][0] == 1 and m["batch_sizes"] == [1] and m["target"]["static_batch"] == 1
            assert m["target"]["openvino_inference_precision"] == "f32" and m["runtime"]["inference_precision"] == "f32"
        else:
            assert m["input"]["shape"][0] == -1 and m["batch_sizes"] == "any"
        if (fmt, precision) == ("onnx", "int8"):  # chosen for the board's CPU, not this machine's
            assert m["target"]["int8_types"] == "s8s8" and m["quantization"]["cpu"]["arch"] == "aarch64"
        if precision == "int8":
            assert m["speed_check"]["status"].startswith("skipped")


def test_top1_on_the_board_matches_this_machine(arm_board, arm_bundles, student, tmp_path, cli):
    """FP32 equal; FP16 and INT8 within the bundle's gate; emulated rows say so and are not ranked."""
    arm_bundles, refused = arm_bundles
    url = arm_board.url()
    out = tmp_path / "bench"
    cli("bench", student, *arm_bundles.values(), "--device", f"cpu,{url}", "--ssh-config", arm_board.ssh_config,
        "--batch-sizes", "1,4", "--runs", 3, "--warmup", 1, "--rounds", 1, "--min-time", 0, "--limit", IMAGES,
        "--out", out, "--no-progress", timeout=3600)
    result = json.loads((out / "results.json").read_text())
    rows = {(r["model"], r["device"], r["batch_size"]): r for r in result["rows"]}
    table = ["| bundle | top-1 here (x86-64) | top-1 on the ARM64 board | agreement with PyTorch here / on the board "
             "| gate ran on the board |", "|---|---|---|---|---|"]
    for (fmt, precision), folder in arm_bundles.items():
        here, there = rows[folder.name, "cpu", 1], rows[folder.name, url, 1]
        assert here["status"] == "ok" and there["status"] == "ok", (here["status"], there["status"])
        assert there["emulated"] == "qemu" and "emulated" not in here and there["speedup_vs_teacher"] is None
        if precision == "fp32":
            assert there["top1"] == here["top1"] and there["agreement_vs_teacher"] == here["agreement_vs_teacher"]
        else:
            assert abs(there["top1"] - here["top1"]) * 100 <= MAX_DROP, (folder.name, here["top1"], there["top1"])
        b4 = rows[folder.name, url, 4]
        if fmt == "openvino":  # static batch 1: batch 4 is not run, and says why
            assert "static batch of 1" in b4["status"] and "static batch of 1" in rows[folder.name, "cpu", 4]["status"]
        else:
            assert b4["status"] == "ok"
        gate = _manifest(folder)["validation"]["ran_on"]
        table.append(f"| {fmt} {precision} | {here['top1']:.4f} | {there['top1']:.4f} | "
                     f"{here['agreement_vs_teacher']:.4f} / {there['agreement_vs_teacher']:.4f} | "
                     f"{'yes' if gate.get('machine') == 'aarch64' else 'no'} |")
    for fmt, precision in refused:
        table.append(f"| {fmt} {precision} | - | - | - | yes: refused there, no bundle written |")
    assert not any(r["best"] for r in result["rows"] if r.get("emulated"))
    report = (out / "report.md").read_text()
    assert "Emulated devices" in report and "not latency" in report
    env = result["device_environments"][url]
    text = "\n".join(table) + (f"\n\n{IMAGES} digits test images; board: {env['cpu']}, "
                               + ", ".join(f"{k} {v}" for k, v in sorted(env["versions"].items())) + "\n")
    print("\n" + text)
    if os.environ.get("EDGEKD_ARM_REPORT"):
        with open(os.environ["EDGEKD_ARM_REPORT"], "w") as f:
            f.write(text)


def test_deploy_refuses_what_does_not_hold_on_the_board_and_installs_the_bundle_made_for_it(
        arm_board, arm_bundles, student, tmp_path, cli):
    """OpenVINO INT8 exported for arm64 with the gate on this machine: its parity images disagree on the board,
    so deploy refuses it with the board's own figures; the FP32 OpenVINO bundle installs and predicts."""
    arm_bundles = arm_bundles[0]
    folder, here = arm_board.folder(tmp_path)
    int8 = tmp_path / "ov-int8-gated-here"
    cli("export", student, "--format", "openvino", "--precision", "int8", "--target", "arm64", "--val-size", IMAGES,
        "--calib-size", 100, "--max-drop", MAX_DROP, "--qat-epochs", 0, "--out", int8, "--no-progress", timeout=3600)
    deploy = ["--ssh-config", arm_board.ssh_config, "--python", arm_board.python]
    proc = cli("deploy", int8, f"ssh://edgedevice:{folder}", *deploy, check=False)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "refused bundle 'ov-int8-gated-here', nothing installed: parity check failed on this device" in proc.stderr
    assert not (here / int8.name).exists() and not [p for p in here.iterdir() if p.name.startswith(".")]

    made_for_it = arm_bundles["openvino", "fp32"]
    proc = cli("deploy", made_for_it, f"ssh://edgedevice:{folder}", *deploy)
    assert "installed" in proc.stdout
    from edgekd.core.data import load_data

    images = []
    for i in range(5):
        load_data("digits").test.images[i].save(here / f"d{i}.png")
        images.append(f"{folder}/d{i}.png")
    remote = arm_board.ssh(f"{arm_board.python} {folder}/edgekd_device_runner.py predict {folder}/{made_for_it.name} "
                           f"{' '.join(images)} --json")
    assert remote.returncode == 0, remote.stderr
    local = json.loads(cli("predict", made_for_it, *[here / f"d{i}.png" for i in range(5)], "--json").stdout)
    assert [r["top"][0]["label"] for r in json.loads(remote.stdout)] == [r["top"][0]["label"] for r in local]


def test_deploy_refuses_a_bundle_whose_parity_images_disagree_on_the_board(arm_board, arm_bundles, tmp_path, cli):
    """The manifest's parity logits are the exporting machine's; a bundle that answers otherwise is refused."""
    bad = tmp_path / "disagrees"
    shutil.copytree(arm_bundles[0]["onnx", "fp32"], bad)
    m = _manifest(bad)
    m["parity"]["logits"] = [[-v for v in row] for row in m["parity"]["logits"]]
    (bad / "manifest.json").write_text(json.dumps(m))
    folder, here = arm_board.folder(tmp_path)
    proc = cli("deploy", bad, f"ssh://edgedevice:{folder}", "--ssh-config", arm_board.ssh_config,
               "--python", arm_board.python, check=False)
    assert proc.returncode == 2 and "parity check failed on this device" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (here / "disagrees").exists()


def _ir_from_the_old_onnx_exporter(bundle, batch):
    """Put into ``bundle`` the IR a user gets from torchvision's MobileNetV3-small (random weights, the bundle's input
    and classes) through torch's TorchScript-based ONNX exporter and openvino.convert_model, with a dynamic
    (``batch`` None) or static batch; the manifest's files and parity logits follow (computed here, on x86-64)."""
    import numpy as np
    import openvino as ov
    import torch
    import torchvision

    from dataclasses import replace

    from edgekd.bundle import load_bundle
    from edgekd.bundle.manifest import Manifest, sha256_file

    m = Manifest.read(str(bundle))
    c, h, w = m.input.shape[1:]
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=len(m.classes))
    model.features[0][0] = torch.nn.Conv2d(c, 16, 3, 2, 1, bias=False)
    onnx = bundle.parent / f"{bundle.name}.onnx"
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if batch is None else None
    torch.onnx.export(model.eval(), torch.zeros(1, c, h, w), onnx, dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes=axes, opset_version=17)
    ov.save_model(ov.convert_model(str(onnx)), str(bundle / m.model_file), compress_to_fp16=False)
    shape = [-1 if batch is None else batch, c, h, w]
    m = m.with_changes(files={f: sha256_file(str(bundle / f)) for f in m.files}, input=replace(m.input, shape=shape))
    m.write(str(bundle))
    images = np.load(bundle / m.record("parity")["file"])
    logits = np.concatenate([load_bundle(str(bundle))(images[i:i + 1]) for i in range(len(images))])
    m.with_changes(parity={**m.record("parity"), "logits": logits.tolist()}).write(str(bundle))


def test_a_dynamic_batch_ir_that_does_not_compile_on_the_board_is_refused_and_its_static_batch_installs(
        arm_board, student, tmp_path, cli):
    """OpenVINO for aarch64 (2026.4) fails to compile MobileNetV3-small from torch's TorchScript-based ONNX exporter
    with a dynamic batch (dnnl_postops_composer 'any_of(scale.size(), OC, 1U)'); x86-64 compiles it. deploy
    refuses that bundle with the board's error and installs nothing; the same IR with the static batch that
    `--target arm64` gives OpenVINO bundles compiles, agrees and installs."""
    made = tmp_path / "ov-arm64"
    cli("export", student, "--format", "openvino", "--target", "arm64", "--val-size", 8, "--out", made, "--no-progress")
    folder, here = arm_board.folder(tmp_path)
    deploy = ["--ssh-config", arm_board.ssh_config, "--python", arm_board.python]
    dynamic, static = tmp_path / "dynamic-batch", tmp_path / "static-batch"
    for bundle, batch in ((dynamic, None), (static, 1)):
        shutil.copytree(made, bundle)
        _ir_from_the_old_onnx_exporter(bundle, batch)
    proc = cli("deploy", dynamic, f"ssh://edgedevice:{folder}", *deploy, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    error = [line for line in proc.stderr.splitlines() if not line.startswith("INFO ")]
    assert len(error) == 1 and "refused bundle 'dynamic-batch', nothing installed" in error[0], proc.stderr
    assert "any_of(scale.size(), OC, 1U)" in error[0], proc.stderr  # the board's own words
    assert not (here / "dynamic-batch").exists() and not [p for p in here.iterdir() if p.name.startswith(".")]
    proc = cli("deploy", static, f"ssh://edgedevice:{folder}", *deploy)
    assert proc.stdout.startswith("installed ") and (here / "static-batch" / "manifest.json").is_file(), proc.stdout
