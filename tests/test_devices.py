"""edgekd bench/deploy against real SSH devices whose Python has numpy, Pillow and the runtimes but no
torch and no edgekd: each test runs on two devices (the ``device`` fixture, tests/conftest.py).

- loopback: an OpenSSH server on this machine (Debian's openssh-server, started by the fixture with
  generated keys on a free port; .ci/run installs it), the device's environment the virtual environment
  .venv-device (or $EDGEKD_DEVICE_VENV), made on first use.
- arm (marker ``arm``, ``make test-arm``): the emulated ARM64 board of tools/arm_device.sh (aarch64
  Debian under qemu-user, its sshd on loopback); skipped with the script's reason where it cannot run.
"""

import json
import shutil
import socket
import time

import pytest


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bench_on_the_device_beside_local_rows(device, digits_run, onnx_bundle, tmp_path, cli):
    out = tmp_path / "bench"
    url = device.url()
    proc = cli("bench", digits_run / "teacher.pt", onnx_bundle, "--device", f"cpu,{url}", "--ssh-config",
               device.ssh_config, "--batch-sizes", "1,4", "--runs", 20, "--min-time", 0, "--warmup", 3, "--rounds", 2,
               "--out", out, "--no-progress")
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert [(r["model"], r["device"], r["batch_size"]) for r in rows] == [
        ("teacher", "cpu", 1), ("teacher", "cpu", 4), ("student-onnx", "cpu", 1), ("student-onnx", "cpu", 4),
        ("student-onnx", url, 1), ("student-onnx", url, 4)]
    local, remote = rows[2], rows[4]
    assert remote["status"] == "ok", remote["status"]
    assert remote["top1"] == local["top1"] and remote["agreement_vs_teacher"] == local["agreement_vs_teacher"]
    assert remote["latency_ms"]["runs"] == 20 and rows[5]["throughput_ips"] > 0
    env = result["device_environments"][url]
    assert "onnxruntime" in env["versions"] and "torch" not in env["versions"] and env["cores"] >= 1
    assert url in proc.stdout
    # An emulated board says so in its rows, and none of them is ranked or compared for speed.
    assert remote.get("emulated") == ("qemu" if device.emulated else None) == env.get("emulated")
    if device.emulated:
        assert env["machine"] == "aarch64"
        assert not any(r["best"] for r in rows[4:]) and remote["speedup_vs_teacher"] is None
        assert "emulated" in (out / "report.md").read_text()


def test_deploy_installs_atomically_and_predicts_on_the_device(device, onnx_bundle, tmp_path, cli):
    from edgekd.core.data import load_data

    base, base_here = device.folder(tmp_path)
    folder, folder_here = f"{base}/models", base_here / "models"
    proc = cli("deploy", onnx_bundle, f"ssh://edgedevice:{folder}", "--ssh-config", device.ssh_config,
               "--python", device.python)
    assert "installed" in proc.stdout
    installed = folder_here / onnx_bundle.name
    assert json.loads((installed / "manifest.json").read_text()) == json.loads((onnx_bundle / "manifest.json").read_text())
    assert not [p for p in folder_here.iterdir() if p.name.startswith(".")]  # no staging folder left
    images, here = [], []
    for i in range(6):
        here.append(str(base_here / f"d{i}.png"))
        images.append(f"{base}/d{i}.png")
        load_data("digits").test.images[i].save(here[-1])
    remote = device.ssh(f"{device.python} {folder}/edgekd_device_runner.py predict {folder}/{onnx_bundle.name} "
                        f"{' '.join(images)} --json")
    assert remote.returncode == 0, remote.stderr
    local = json.loads(cli("predict", onnx_bundle, *here, "--json").stdout)
    assert [r["top"][0]["label"] for r in json.loads(remote.stdout)] == [r["top"][0]["label"] for r in local]
    # A second deploy replaces the first in place.
    cli("deploy", onnx_bundle, f"ssh://edgedevice:{folder}", "--ssh-config", device.ssh_config,
        "--python", device.python)
    assert sorted(p.name for p in folder_here.iterdir()) == sorted([onnx_bundle.name, "edgekd_device_runner.py"])


def test_missing_runtime_on_the_device_is_a_row_that_names_the_package(device, digits_run, onnx_bundle, tmp_path, cli):
    bare = device.bare_python(tmp_path)
    out = tmp_path / "bench"
    cli("bench", digits_run / "student.pt", onnx_bundle, "--device", device.url(bare), "--ssh-config",
        device.ssh_config, "--runs", 5, "--min-time", 0, "--warmup", 1, "--rounds", 1, "--out", out, "--no-progress")
    remote = json.loads((out / "results.json").read_text())["rows"][-1]
    assert remote["status"] == "onnxruntime is not installed here: pip install onnxruntime"


def test_a_bundle_the_devices_runtime_cannot_load_is_a_row(device, onnx_bundle, digits_run, tmp_path, cli):
    from edgekd.bundle.manifest import sha256_file

    broken = tmp_path / "broken"
    shutil.copytree(onnx_bundle, broken)
    import onnx

    # a well-formed ONNX file (it passes the checks here) whose graph names an operator no runtime has
    model = onnx.load(broken / "model.onnx", load_external_data=False)
    model.graph.node[0].op_type, model.graph.node[0].domain = "NoSuchOp", "edgekd.test"
    model.opset_import.add(domain="edgekd.test", version=1)
    onnx.save(model, broken / "model.onnx")
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = sha256_file(broken / "model.onnx")
    (broken / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "bench"
    url = device.url()
    cli("bench", digits_run / "student.pt", broken, "--device", url, "--ssh-config", device.ssh_config, "--runs", 5,
        "--warmup", 1, "--rounds", 1, "--out", out, "--no-progress")
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows[0]["device"] == "cpu" and rows[0]["status"] == "ok"  # the checkpoint is measured here
    assert rows[-1]["device"] == url and "cannot load this bundle" in rows[-1]["status"]


def _slow_python(device, tmp_path):
    """A device Python that answers after 30 s."""
    folder, here = device.folder(tmp_path)
    (here / "slowpython").write_text(f"#!/bin/sh\nsleep 30\nexec {device.python} \"$@\"\n")
    (here / "slowpython").chmod(0o755)
    return f"{folder}/slowpython"


@pytest.mark.parametrize("url, extra, message", [
    ("ssh://127.0.0.1:{closed}", [], "cannot reach ssh://127.0.0.1:{closed}"),
    ("ssh://wrongkey", [], "refused authentication"),
    ("ssh://edgedevice/no/such/python", [], "cannot run '/no/such/python' there"),
    ("ssh://edgedevice{slow}", ["--timeout", "2"], "did not answer within 2 s"),
    ("ssh://", [], "bad device 'ssh://'"),
])
def test_device_failures_are_one_line_errors(device, digits_run, onnx_bundle, tmp_path, cli_main, url, extra, message):
    fill = {"closed": _free_port(), "slow": _slow_python(device, tmp_path) if "{slow}" in url else ""}
    start = time.monotonic()
    proc = cli_main("bench", onnx_bundle, "--device", url.format(**fill), "--ssh-config", device.ssh_config, *extra,
                    "--runs", 5, "--warmup", 1, "--out", tmp_path / "out", "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert message.format(**fill) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and time.monotonic() - start < 120
    assert not (tmp_path / "out" / "results.json").exists()
