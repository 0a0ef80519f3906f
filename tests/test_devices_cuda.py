"""Every device, not just the CPU: the probes that make a tensor (FLOPs, the forward check, feature
shapes) make it where the model is. The 'meta' device stands in for a GPU on machines without one:
a CPU tensor fed to a meta model fails exactly as it would on CUDA. The CUDA tests skip without a GPU;
tools/cuda_check.sh runs the whole CUDA path on a GPU machine."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from edgekd.core.data import InputSpec
from edgekd.core.models import build_model, count_flops, example_input

SPEC = InputSpec(1, 8, 8, [0.5], [0.5])
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", ["seed-student", "compact-student"])
def test_count_flops_on_the_models_device(name):
    model = build_model(name, 10, SPEC)
    on_cpu = count_flops(model, SPEC)
    # The model away from the CPU: count_flops must probe it there (a CPU tensor would raise).
    assert count_flops(model.to("meta"), SPEC) == on_cpu > 0


def test_summary_after_training_on_another_device():
    """distill's metrics summary runs count_flops on the model where training left it."""
    from edgekd.core.distill import _summary
    from edgekd.core.metrics import EpochRecord

    model = build_model("seed-student", 10, SPEC).to("meta")
    history = [EpochRecord(epoch=1, terms={}, train_top1=0.5, test_top1=0.5, lr=0.1, images_per_s=1.0, seconds=1.0)]
    summary = _summary("seed-student", 1, history, model, SimpleNamespace(input=SPEC, spec="digits"))
    assert summary.flops == count_flops(build_model("seed-student", 10, SPEC), SPEC)
    assert summary.params > 0


def test_count_flops_keeps_training_mode():
    model = build_model("seed-student", 10, SPEC).train()
    count_flops(model, SPEC)
    assert model.training


def test_example_input_follows_device_and_dtype():
    model = torch.nn.Linear(3, 2).to(torch.float64)
    assert example_input(model, 1, 2, 2).dtype == torch.float64
    x = example_input(torch.nn.Linear(3, 2).to("meta"), 1, 2, 2)
    assert x.device.type == "meta" and x.shape == (1, 1, 2, 2)
    assert example_input(torch.nn.ReLU(), 3, 4, 4).device.type == "cpu"  # no weights: the CPU


def test_feature_shape_on_the_models_device():
    from edgekd.core.features import FeatureTap, feature_shape

    model = build_model("seed-student", 10, SPEC).to("meta")
    tap = FeatureTap(model, "auto")
    assert feature_shape(model, tap, SPEC)[0] == 1
    tap.remove()


@cuda
def test_count_flops_on_cuda():
    model = build_model("seed-student", 10, SPEC)
    assert count_flops(model.cuda(), SPEC) == count_flops(model.cpu(), SPEC)


@cuda
def test_distill_export_bench_on_cuda(cli, tmp_path):
    run = tmp_path / "run"
    cli("distill", "--device", "cuda", "--epochs", 1, "--teacher-epochs", 1, "--out", run, "--no-progress")
    cli("export", run / "student.pt", "--format", "onnx", "--out", tmp_path / "onnx")
    cli("bench", run / "student.pt", tmp_path / "onnx", "--device", "cuda", "--backends", "torch",
        "--out", tmp_path / "bench")
    assert (tmp_path / "bench" / "results.json").is_file()


def test_cuda_check_script_parses_and_refuses_a_machine_without_cuda(tmp_path):
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "cuda_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: run tools/cuda_check.sh itself")
    proc = subprocess.run(["bash", script, str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
