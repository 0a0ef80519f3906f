"""edgekd bench/deploy against a real OpenSSH server on loopback, with a "device" Python that has
numpy, Pillow and onnxruntime but no torch and no edgekd.

The server (Debian's openssh-server, /usr/sbin/sshd) is started by the test with a generated host key
and client key in a temporary folder, on a free port; .ci/run installs openssh-server. The device's
environment is the virtual environment .venv-device (or $EDGEKD_DEVICE_VENV), made on first use.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
REPO = Path(__file__).resolve().parents[1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real sshd on 127.0.0.1:PORT; yields an ssh_config file whose Host 'edgedevice' reaches it."""
    if not os.path.exists(SSHD) or not shutil.which("ssh-keygen") or not shutil.which("ssh"):
        pytest.skip("OpenSSH server/client not installed (apt-get install openssh-server openssh-client)")
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\nUsePAM no\n"
        f"StrictModes no\nPidFile {d / 'sshd.pid'}\nPermitRootLogin prohibit-password\n"
        f"Subsystem sftp internal-sftp\n")
    os.makedirs("/run/sshd", exist_ok=True) if os.geteuid() == 0 else None
    server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=open(d / "sshd.log", "w"))
    user = os.environ.get("USER") or __import__("getpass").getuser()
    config = d / "ssh_config"
    config.write_text(
        f"Host edgedevice\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n  IdentityFile {d / 'client_key'}\n"
        f"  IdentitiesOnly yes\n  UserKnownHostsFile {d / 'known_hosts'}\n  StrictHostKeyChecking accept-new\n"
        f"Host wrongkey\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n  IdentityFile {d / 'host_key'}\n"
        f"  IdentitiesOnly yes\n  UserKnownHostsFile {d / 'known_hosts'}\n  StrictHostKeyChecking accept-new\n")
    for _ in range(50):
        ok = subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes", "edgedevice", "true"],
                            capture_output=True).returncode == 0
        if ok or server.poll() is not None:
            break
        time.sleep(0.2)
    if not ok:
        server.kill()
        pytest.skip(f"sshd could not start here: {(d / 'sshd.log').read_text()[-300:]}")
    yield config
    server.terminate()
    server.wait(10)


def _venv(path, packages):
    python = path / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        if packages:
            proc = subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], capture_output=True, text=True)
            if proc.returncode != 0:
                shutil.rmtree(path)
                pytest.skip(f"cannot install the device's packages: {proc.stderr.strip().splitlines()[-1:]}")
    return python


@pytest.fixture(scope="session")
def device_python():
    """Python with numpy, Pillow and onnxruntime only: the 'device'."""
    python = _venv(Path(os.environ.get("EDGEKD_DEVICE_VENV", REPO / ".venv-device")), ["numpy", "pillow", "onnxruntime"])
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0, "the device environment must not have torch"
    return python


def test_bench_on_the_device_beside_local_rows(sshd, device_python, digits_run, onnx_bundle, tmp_path, cli):
    out = tmp_path / "bench"
    url = f"ssh://edgedevice{device_python}"
    proc = cli("bench", digits_run / "teacher.pt", onnx_bundle, "--device", f"cpu,{url}", "--ssh-config", sshd,
               "--batch-sizes", "1,4", "--runs", 20, "--min-time", 0, "--warmup", 3, "--rounds", 2, "--out", out, "--no-progress")
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


def test_deploy_installs_atomically_and_predicts_on_the_device(sshd, device_python, onnx_bundle, tmp_path, cli):
    from edgekd.core.data import load_data

    folder = tmp_path / "device-home" / "models"
    proc = cli("deploy", onnx_bundle, f"ssh://edgedevice:{folder}", "--ssh-config", sshd)
    assert "installed" in proc.stdout
    installed = folder / onnx_bundle.name
    assert json.loads((installed / "manifest.json").read_text()) == json.loads((onnx_bundle / "manifest.json").read_text())
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging folder left
    images = []
    for i in range(6):
        images.append(str(tmp_path / f"d{i}.png"))
        load_data("digits").test.images[i].save(images[-1])
    remote = subprocess.run(["ssh", "-F", str(sshd), "edgedevice", f"{device_python} {folder}/edgekd_device_runner.py "
                             f"predict {installed} {' '.join(images)} --json"], capture_output=True, text=True)
    assert remote.returncode == 0, remote.stderr
    local = json.loads(cli("predict", onnx_bundle, *images, "--json").stdout)
    assert [r["top"][0]["label"] for r in json.loads(remote.stdout)] == [r["top"][0]["label"] for r in local]
    # A second deploy replaces the first in place.
    cli("deploy", onnx_bundle, f"ssh://edgedevice:{folder}", "--ssh-config", sshd)
    assert sorted(p.name for p in folder.iterdir()) == sorted([onnx_bundle.name, "edgekd_device_runner.py"])


def _python_without_onnxruntime(tmp_path, python):
    """The device's Python with onnxruntime unimportable, as on a device where it was never installed (a new
    virtual environment with numpy alone costs a pip install per run)."""
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "onnxruntime.py").write_text('raise ImportError("No module named \'onnxruntime\'")\n')
    bare = tmp_path / "bare-python"
    bare.write_text(f"#!/bin/sh\nPYTHONPATH={blocked} exec {python} \"$@\"\n")
    bare.chmod(0o755)
    return bare


def test_missing_runtime_on_the_device_is_a_row_that_names_the_package(sshd, device_python, digits_run, onnx_bundle,
                                                                       tmp_path, cli):
    bare = _python_without_onnxruntime(tmp_path, device_python)
    out = tmp_path / "bench"
    cli("bench", digits_run / "student.pt", onnx_bundle, "--device", f"ssh://edgedevice{bare}", "--ssh-config", sshd,
        "--runs", 5, "--min-time", 0, "--warmup", 1, "--rounds", 1, "--out", out, "--no-progress")
    remote = json.loads((out / "results.json").read_text())["rows"][-1]
    assert remote["status"] == "onnxruntime is not installed here: pip install onnxruntime"


def test_a_bundle_the_devices_runtime_cannot_load_is_a_row(sshd, device_python, onnx_bundle, digits_run, tmp_path, cli):
    from edgekd.bundle.manifest import sha256_file

    broken = tmp_path / "broken"
    shutil.copytree(onnx_bundle, broken)
    (broken / "model.onnx").write_bytes(b"not an onnx model")
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = sha256_file(broken / "model.onnx")
    (broken / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "bench"
    url = f"ssh://edgedevice{device_python}"
    cli("bench", digits_run / "student.pt", broken, "--device", url, "--ssh-config", sshd, "--runs", 5, "--warmup", 1,
        "--rounds", 1, "--out", out, "--no-progress")
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows[0]["device"] == "cpu" and rows[0]["status"] == "ok"  # the checkpoint is measured here
    assert rows[-1]["device"] == url and "cannot load this bundle" in rows[-1]["status"]


def _slow_python(tmp_path):
    slow = tmp_path / "slowpython"
    slow.write_text(f"#!/bin/sh\nsleep 30\nexec {sys.executable} \"$@\"\n")
    slow.chmod(0o755)
    return slow


@pytest.mark.parametrize("device, extra, message", [
    ("ssh://127.0.0.1:{closed}", [], "cannot reach ssh://127.0.0.1:{closed}"),
    ("ssh://wrongkey", [], "refused authentication"),
    ("ssh://edgedevice/no/such/python", [], "cannot run '/no/such/python' there"),
    ("ssh://edgedevice{slow}", ["--timeout", "2"], "did not answer within 2 s"),
    ("ssh://", [], "bad device 'ssh://'"),
])
def test_device_failures_are_one_line_errors(sshd, onnx_bundle, tmp_path, cli_main, device, extra, message):
    fill = {"closed": _free_port(), "slow": _slow_python(tmp_path)}
    start = time.monotonic()
    proc = cli_main("bench", onnx_bundle, "--device", device.format(**fill), "--ssh-config", sshd, *extra,
                    "--runs", 5, "--warmup", 1, "--out", tmp_path / "out", "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert message.format(**fill) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and time.monotonic() - start < 120
    assert not (tmp_path / "out" / "results.json").exists()
