"""One runtime: bundle verification, preprocessing and sessions live only in the bundle modules the device runner
carries (the file copied to devices); predict, export validation and bench use it, with one OpenVINO precision policy.
Also the quiet switches: --no-progress silences NNCF, and bars off a terminal print one line."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from edgekd.base.errors import BundleError
from edgekd.bundle import assemble, preprocessing, sessions
from edgekd.bundle.manifest import Manifest, precision_hint, verify

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _calls(path):
    """Every attribute or function name called in a source file."""
    return _calls_in(pathlib.Path(path).read_text())


def _calls_in(text):
    """Every attribute or function name called in Python source."""
    tree = ast.parse(text)
    return {getattr(n.func, "attr", getattr(n.func, "id", None)) for n in ast.walk(tree) if isinstance(n, ast.Call)}


def test_sessions_are_created_in_one_place_only():
    """No other library module opens an ONNX Runtime or OpenVINO session on a bundle or hashes its files."""
    session_makers = {"InferenceSession", "compile_model", "sha256"}
    for path in ["bundle/runtime.py", "bench/backends.py", "export/pipeline.py", "export/speed.py", "edgekd/cli/__init__.py"]:
        assert not _calls(ROOT / path) & session_makers, path
    assert session_makers <= _calls_in(assemble.runner_source())


def test_the_runtime_and_bench_use_the_runners_functions():
    from edgekd.bench import backends
    from edgekd.bundle import runtime

    assert runtime.open_session is sessions.open_session and runtime.preprocess is preprocessing.preprocess
    bundle_init = ast.get_source_segment((ROOT / "bundle/runtime.py").read_text(),
                                         next(n for n in ast.walk(ast.parse((ROOT / "bundle/runtime.py").read_text()))
                                              if isinstance(n, ast.ClassDef) and n.name == "Bundle"))
    assert "open_session(" in bundle_init and "preprocess(" in bundle_init
    assert "load_bundle" in (ROOT / "bench/backends.py").read_text()
    assert backends.BACKENDS.meta("openvino")["reads"] == ("openvino", "onnx")


def test_the_runner_stands_alone_without_edgekd_or_torch(onnx_bundle, tmp_path):
    """Copied to a device with only numpy, Pillow and onnxruntime, the runner verifies, runs and predicts."""
    from PIL import Image

    copy = tmp_path / "device_runner.py"
    copy.write_text(assemble.runner_source())
    image = tmp_path / "3.png"
    Image.fromarray(np.full((8, 8), 128, np.uint8), "L").save(image)
    code = ("import sys\n"
            "for name in ('torch', 'edgekd'):\n"
            "    sys.modules[name] = None  # any import of them fails\n"
            "sys.path.insert(0, sys.argv[1])\n"
            "import device_runner as r\n"
            "assert r.BundleError.__mro__[1] is Exception\n"
            "sys.exit(r.main(['predict', sys.argv[2], sys.argv[3], '--json']))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(onnx_bundle), str(image)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from edgekd.bundle import load_bundle

    assert json.loads(proc.stdout) == load_bundle(str(onnx_bundle)).predict_files([str(image)])


def test_predict_bench_and_device_agree_on_a_bundle(onnx_bundle):
    from edgekd.bench.backends import BACKENDS
    from edgekd.bundle import load_bundle

    bundle = load_bundle(str(onnx_bundle), threads=1)
    batch = np.random.default_rng(0).standard_normal((3, *bundle.manifest.input.shape[1:]), dtype=np.float32)
    bench_run, info = BACKENDS.get("onnxruntime")(str(onnx_bundle), 1, "cpu")
    device_run, _ = sessions.open_session(str(onnx_bundle), verify(str(onnx_bundle)), threads=1)
    ov_run, ov_info = BACKENDS.get("openvino")(str(onnx_bundle), 1, "cpu")
    assert info == {"threads": 1, "runtime_device": "CPUExecutionProvider", "outputs": len(bundle.manifest.classes)}
    np.testing.assert_array_equal(bundle(batch), bench_run(batch))
    np.testing.assert_array_equal(bundle(batch), device_run(batch))
    np.testing.assert_allclose(ov_run(batch), bundle(batch), atol=1e-4)
    assert ov_info["runtime_precision"] == "f32"


@pytest.mark.parametrize("manifest, hint", [({}, "f32"), ({"runtime": {"inference_precision": None}}, "f32"),
                                            ({"runtime": {"inference_precision": "f32"}}, "f32")])
def test_openvino_cpu_runs_every_bundle_at_the_precision_it_was_validated_at(manifest, hint):
    """The CPU plugin would run FP32 models in bf16 on CPUs with AVX512_BF16; every caller passes f32."""
    manifest = Manifest.from_dict({"format": "openvino", "precision": "fp32", "model_file": "model.xml",
                                   "files": {"model.xml": "0" * 64, "model.bin": "1" * 64}, "classes": ["a"],
                                   "input": {"shape": [-1, 1, 8, 8], "layout": "NCHW", "mean": [0.5], "std": [0.5],
                                             "color": "L", "resize": [8, 8]}, **manifest})
    assert precision_hint(manifest) == hint
    config = sessions.openvino_config("CPU", 2, precision_hint(manifest))
    assert config == {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2}
    assert sessions.openvino_config("GPU.0", 2, "f32") == {"PERFORMANCE_HINT": "LATENCY"}  # CPU-plugin properties


@pytest.mark.parametrize("device, name", [("cpu", "CPU"), ("openvino:GPU.1", "GPU.1"), ("npu", "NPU"),
                                          ("openvino:AUTO", "AUTO")])
def test_openvino_device_names(device, name):
    assert sessions.openvino_device(device) == name


def test_a_tampered_bundle_is_refused_by_every_entry_point(onnx_bundle, tmp_path):
    import shutil

    from edgekd import EdgeKDError
    from edgekd.bench.backends import BACKENDS
    from edgekd.bundle import load_bundle

    copy = tmp_path / "b"
    shutil.copytree(onnx_bundle, copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    for call in (lambda: load_bundle(str(copy)), lambda: BACKENDS.get("onnxruntime")(str(copy), 1, "cpu"),
                 lambda: BACKENDS.get("openvino")(str(copy), 1, "cpu"), lambda: verify(str(copy))):
        with pytest.raises(EdgeKDError, match="does not match its sha256"):
            call()


def test_a_missing_runtime_names_the_package(onnx_bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BundleError, match="pip install onnxruntime"):
        sessions.open_session(str(onnx_bundle), verify(str(onnx_bundle)))


def test_cuda_without_its_provider_is_one_line(onnx_bundle):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has ONNX Runtime's CUDA provider")
    with pytest.raises(BundleError, match="onnxruntime-gpu"):
        sessions.open_session(str(onnx_bundle), verify(str(onnx_bundle)), device="cuda")


def test_bars_off_a_terminal_print_one_line(capsys):
    from edgekd.base.progress import bar

    total = 0
    for i in bar(range(500), desc="epoch 1/1", unit="batch"):
        total += i
    with bar(total=40, desc="validating", unit="img") as progress:
        for _ in range(4):
            progress.update(10)
    for _ in bar(range(5), desc="hidden", disable=True):
        pass
    err = capsys.readouterr().err.splitlines()
    assert total == sum(range(500))
    assert [line.split(" in ")[0] for line in err] == ["epoch 1/1: 500/500 batch", "validating: 40/40 img"]


def _tiny_openvino_model():
    import openvino as ov
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3))
    return ov.convert_model(net.eval(), example_input=torch.zeros(1, 1, 8, 8), input=[-1, 1, 8, 8])


@pytest.mark.parametrize("progress", [True, False])
def test_no_progress_silences_nncf(capfd, progress):
    """NNCF draws its own rich bars ("Statistics collection") and INFO lines; --no-progress hides both."""
    os.environ.setdefault("OPENVINO_TELEMETRY_OPT_OUT", "1")
    from edgekd.export.openvino import _nncf_quantize

    calib = np.random.default_rng(0).standard_normal((8, 1, 8, 8), dtype=np.float32)
    model = _tiny_openvino_model()
    capfd.readouterr()
    _nncf_quantize(model, calib, progress=progress)
    out = "".join(capfd.readouterr())
    assert ("Statistics collection" in out) == progress, out


def test_training_reports_each_epoch_on_stdout_and_one_bar_line_per_epoch(cli, tmp_path):
    """The per-epoch lines go through logging (edgekd.report) and the CLI still prints them on stdout;
    off a terminal the progress bar is one stderr line per epoch, never carriage-return redraws."""
    proc = cli("train", "--model", "seed-student", "--epochs", 2, "--out", tmp_path / "run")
    epochs = [line for line in proc.stdout.splitlines() if line.startswith("seed-student ")]
    assert [line.split(":")[0] for line in epochs] == ["seed-student 1/2", "seed-student 2/2"]
    assert all("test top-1 " in line and "img/s" in line for line in epochs)
    bars = [line for line in proc.stderr.splitlines() if " batch in " in line]
    epoch_bars = [line.split(":")[0] for line in bars if line.startswith("seed-student ")]
    assert epoch_bars == ["seed-student 1/2", "seed-student 2/2"]
    assert all(line.startswith(("seed-student ", "decode ")) for line in bars), bars  # a stage is one line too
    assert "\r" not in proc.stderr
