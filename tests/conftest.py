import os
import subprocess
import sys

import pytest

# Keep the libraries' telemetry out of the user's home during tests: the tests call edgekd's library in this
# process, which (unlike the CLI and edgekd's workers) leaves telemetry to its host, so switch it off here.
from edgekd.base.telemetry import switch_off  # noqa: E402

switch_off()


def run_cli(*args, cwd=None, check=True, timeout=600):
    """Run ``python -m edgekd ARGS`` as a user would; return the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", "edgekd", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"edgekd {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def cli():
    """The CLI as a subprocess: ``cli("distill", "--epochs", 1, ...)``. For the real process (exit code,
    stderr, signals) and end-to-end runs; option checks and bad inputs use ``cli_main`` (no new process)."""
    return run_cli


# What a fresh interpreter shows of Python's warnings (its default filters); pytest's own are wider.
_QUIET_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def run_main(capsys, *args):
    """Run ``edgekd ARGS`` in this process through ``edgekd.cli.main``; return a CompletedProcess as
    ``run_cli`` does: the exit code (main's return value or SystemExit's), stdout and stderr. Warnings a
    fresh interpreter would print count as stderr lines. What a run sets for its process (the edgekd
    loggers' handlers, torch's thread count and random state, the Ctrl-C handler) is put back, so cases
    do not leak into each other."""
    import logging
    import signal
    import warnings

    from edgekd.cli import main

    loggers = [logging.getLogger(name) for name in ("edgekd", "edgekd.report")]
    saved = [(log, list(log.handlers), log.level, log.propagate) for log in loggers]
    torch = sys.modules.get("torch")
    threads, rng = (torch.get_num_threads(), torch.get_rng_state()) if torch else (None, None)
    sigint = signal.getsignal(signal.SIGINT)  # training installs its own Ctrl-C handler
    capsys.readouterr()
    argv = [str(a) for a in args]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            for category in _QUIET_WARNINGS:
                warnings.simplefilter("ignore", category)
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's errors, --help
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        signal.signal(signal.SIGINT, sigint)
        for log, handlers, level, propagate in saved:
            log.handlers[:], log.level, log.propagate = handlers, level, propagate
        if torch:
            torch.set_num_threads(threads)
            torch.set_rng_state(rng)
    out, err = capsys.readouterr()
    err += "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in caught)
    return subprocess.CompletedProcess(["edgekd", *argv], code, out, err)


@pytest.fixture
def cli_main(capsys):
    """The CLI in this process: ``cli_main("export", ckpt, "--format", "onnx")`` -> CompletedProcess.
    For option validation and bad inputs: no interpreter start per case."""
    return lambda *args: run_main(capsys, *args)


def _one_line_error(proc, message=""):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr}"
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert message in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """One short real distillation on digits (teacher trained first), shared by the tests that need a checkpoint."""
    out = tmp_path_factory.mktemp("run")
    # a generous limit: on a machine shared with other test suites this takes minutes instead of seconds
    run_cli("distill", "--epochs", 3, "--teacher-epochs", 3, "--out", out, "--force", "--no-progress", timeout=1800)
    return out


@pytest.fixture(scope="session")
def onnx_bundle(digits_run):
    out = digits_run / "student-onnx"
    run_cli("export", digits_run / "student.pt", "--format", "onnx", "--out", out)
    return out


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """A small ImageFolder of real handwritten digits written as PNG files (train/ and test/)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits_folder")
    d = load_digits()
    for i, (img, label) in enumerate(zip(d.images[:400], d.target[:400])):
        split = "test" if i % 5 == 0 else "train"
        folder = root / split / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 / 16).round().astype(np.uint8), "L").save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def one_line_error():
    """``one_line_error(proc, message)``: assert exit 2, exactly one line on stderr holding ``message``, no
    traceback; returns the line."""
    return _one_line_error


# --- SSH devices: an OpenSSH server on loopback ("loopback") and the emulated ARM64 board ("arm") ---------
# Shared by tests/test_devices.py and tests/test_arm.py. The ARM board is tools/arm_device.sh's (root and
# binfmt_misc needed); its tests carry the `arm` marker and run with `make test-arm`.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Device:
    """An SSH device for the tests: ``ssh_config`` has Host ``edgedevice`` (and ``wrongkey``, a key it refuses);
    ``python`` has numpy, Pillow and the runtimes, ``bare_python()`` numpy only; ``root`` is the device's ``/``
    as seen from this machine (the ARM board is a chroot), so a test can read what landed there."""

    def __init__(self, kind, ssh_config, python, root="/", emulated=False, bare=None):
        self.kind, self.ssh_config, self.python, self.root, self.emulated = kind, ssh_config, str(python), root, emulated
        self._bare = bare

    def url(self, python=None):
        return f"ssh://edgedevice{python or self.python}"

    def here(self, device_path):
        """This machine's path of a path on the device."""
        from pathlib import Path

        return Path(self.root) / str(device_path).lstrip("/")

    def folder(self, tmp_path):
        """A fresh folder on the device for one test: (its path there, its path here)."""
        import tempfile
        from pathlib import Path

        if self.kind == "loopback":
            path = tempfile.mkdtemp(dir=tmp_path, prefix="device-")
            return path, Path(path)
        here = Path(tempfile.mkdtemp(dir=self.here("/tmp"), prefix="edgekd-test-"))
        return "/" + str(here.relative_to(self.root)), here

    def bare_python(self, tmp_path):
        return self._bare(tmp_path)

    def ssh(self, command):
        return subprocess.run(["ssh", "-F", str(self.ssh_config), "-o", "BatchMode=yes", "edgedevice", command],
                              capture_output=True, text=True, timeout=600)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ssh_config(path, port, user, key, wrong_key, known_hosts):
    blocks = [("edgedevice", key), ("wrongkey", wrong_key)]
    path.write_text("".join(
        f"Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n  IdentityFile {k}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {known_hosts}\n  StrictHostKeyChecking accept-new\n" for alias, k in blocks))
    return path


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real sshd on 127.0.0.1:PORT; yields an ssh_config file whose Host 'edgedevice' reaches it."""
    import getpass
    import shutil
    import time

    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd_bin) or not shutil.which("ssh-keygen") or not shutil.which("ssh"):
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
    server = subprocess.Popen([sshd_bin, "-D", "-e", "-f", str(d / "sshd_config")], stderr=open(d / "sshd.log", "w"))
    user = os.environ.get("USER") or getpass.getuser()
    config = _ssh_config(d / "ssh_config", port, user, d / "client_key", d / "host_key", d / "known_hosts")
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


def make_venv(path, packages):
    """A virtual environment of this machine's Python with ``packages`` (made once; skip if pip cannot)."""
    import shutil

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
    """Python with numpy, Pillow and onnxruntime only: the loopback 'device'."""
    from pathlib import Path

    python = make_venv(Path(os.environ.get("EDGEKD_DEVICE_VENV", os.path.join(REPO, ".venv-device"))),
                       ["numpy", "pillow", "onnxruntime"])
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0, "the device environment must not have torch"
    return python


@pytest.fixture(scope="session")
def arm_board(tmp_path_factory):
    """tools/arm_device.sh's emulated ARM64 board (started here unless it runs already, and then stopped
    again); skips, with the script's one-line reason, where it cannot run (no root, no binfmt_misc)."""
    script = os.path.join(REPO, "tools", "arm_device.sh")
    running = subprocess.run([script, "status"], capture_output=True, text=True).returncode == 0
    if not running:
        print("\nstarting the emulated ARM64 device (the first time it is built: 4-8 minutes)", file=sys.stderr)
        proc = subprocess.run([script, "start"], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip("ARM64 device unavailable: " + ((proc.stderr.strip().splitlines() or ["?"])[-1]))
    env_file = os.path.join(os.environ.get("EDGEKD_ARM_CACHE", "/var/cache/edgekd-arm"), "run", "device.env")
    env = dict(line.split("=", 1) for line in open(env_file).read().split("\n") if "=" in line)
    d = tmp_path_factory.mktemp("arm")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "wrong_key")], check=True)
    config = _ssh_config(d / "ssh_config", env["EDGEKD_ARM_PORT"], "root", env["EDGEKD_ARM_KEY"], d / "wrong_key",
                         env["EDGEKD_ARM_KNOWN_HOSTS"])
    yield Device("arm", config, env["EDGEKD_ARM_PYTHON"], env["EDGEKD_ARM_ROOT"], emulated=True,
                 bare=lambda tmp_path: env["EDGEKD_ARM_BARE_PYTHON"])
    if not running:
        subprocess.run([script, "stop"], capture_output=True)


@pytest.fixture(scope="session", params=["loopback", pytest.param("arm", marks=pytest.mark.arm)])
def device(request):
    """Each SSH device test runs on the loopback sshd and (marker `arm`, `make test-arm`) on the ARM64 board."""
    if request.param == "arm":
        return request.getfixturevalue("arm_board")
    config, python = request.getfixturevalue("sshd"), request.getfixturevalue("device_python")
    from pathlib import Path

    return Device("loopback", config, python, bare=lambda tmp_path: make_venv(Path(tmp_path) / "bare-device", ["numpy"]))
