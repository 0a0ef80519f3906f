"""One weights-file reader for students (--weights, --student-weights) and teachers (--teacher-weights):
every way a training script saves weights loads the same tensors on both sides."""

import pytest
import torch
from torch import nn

from edgekd import EdgeKDError
from edgekd.core.data import InputSpec
from edgekd.core.models import build_model
from edgekd.core.pretrained import build_pretrained, read_weights_file
from edgekd.core.teachers import TEACHERS, TeacherOptions

GREY8 = InputSpec(1, 8, 8, [0.5], [0.5])
FACTORY = '''
from torch import nn


def make():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 10))
'''


def _prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


# How the weights sit in the file: (what torch.save / safetensors writes, the file's suffix).
STYLES = {
    "plain": (lambda s: s, ".pth"),
    "ddp_module_prefix": (lambda s: _prefixed(s, "module."), ".pth"),
    "training_checkpoint": (lambda s: {"epoch": 3, "state_dict": s, "optimizer": {"lr": torch.tensor(0.1)}}, ".pt"),
    "timm_ema_only": (lambda s: {"epoch": 3, "state_dict_ema": _prefixed(s, "module.")}, ".pth"),
    "deit_model_ema": (lambda s: {"model_ema": s, "epoch": 1}, ".pth"),
    "torch_compile_prefix": (lambda s: _prefixed(s, "_orig_mod."), ".pth"),
    "ddp_of_compiled": (lambda s: _prefixed(_prefixed(s, "_orig_mod."), "module."), ".pth"),
    "safetensors": (lambda s: s, ".safetensors"),
    "safetensors_ddp": (lambda s: _prefixed(s, "module."), ".safetensors"),
}


def _write(state, style, path_stem):
    wrap, suffix = STYLES[style]
    path = str(path_stem) + suffix
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in wrap(state).items()}, path)
    else:
        torch.save(wrap(state), path)
    return path


def _random_state(model, seed):
    torch.manual_seed(seed)
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}


def _assert_same(model, state):
    got = model.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_student_weights_load_in_every_style(style, tmp_path):
    reference = _random_state(build_model("compact-student", 10, GREY8), seed=1)
    path = _write(reference, style, tmp_path / "student")
    model, record = build_pretrained("compact-student", 10, GREY8, path)
    _assert_same(model, reference)
    assert record["source"].startswith("file ")


@pytest.mark.parametrize("style", sorted(STYLES))
def test_teacher_weights_load_in_every_style(style, tmp_path, monkeypatch):
    (tmp_path / "my_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace = {}
    exec(FACTORY, namespace)
    reference = _random_state(namespace["make"](), seed=2)
    path = _write(reference, style, tmp_path / "teacher")
    loaded = TEACHERS.get("factory").load("my_factory:make", TeacherOptions(weights=path), None)
    _assert_same(loaded.module, reference)


def test_the_reader_prefers_the_trained_weights_to_the_ema_copy(tmp_path):
    trained, ema = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
    torch.save({"state_dict": trained, "state_dict_ema": ema}, tmp_path / "both.pth")
    assert torch.equal(read_weights_file(str(tmp_path / "both.pth"))["w"], trained["w"])


@pytest.mark.parametrize("flag", ["weights file", "--teacher-weights"])
def test_what_is_not_a_state_dict_is_named_with_its_flag(flag, tmp_path):
    torch.save({"epoch": 3}, tmp_path / "none.pth")
    with pytest.raises(EdgeKDError, match=f"{flag} .*none.pth.* holds no state dict"):
        read_weights_file(str(tmp_path / "none.pth"), flag)
    torch.save(nn.Linear(2, 2), tmp_path / "pickled.pth")
    with pytest.raises(EdgeKDError, match="pickled Python objects"):
        read_weights_file(str(tmp_path / "pickled.pth"), flag)
