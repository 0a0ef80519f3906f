import pickle

import pytest
import torch

from edgekd import EdgeKDError
from edgekd.core.checkpoint import load_checkpoint, save_checkpoint
from edgekd.core.loading import load_model
from edgekd.core.data import InputSpec
from edgekd.core.models import build_model

SPEC = InputSpec(1, 32, 32, [0.5], [0.5])


def test_round_trip_gives_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model("compact-student", 10, SPEC)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, spec="compact-student", classes=list("0123456789"), input_spec=SPEC,
                    data_spec="digits", metrics={"test_top1": 0.5}, config={"epochs": 1})
    raw = torch.load(path, weights_only=True)  # plain types and tensors only
    assert raw["model"] == "compact-student" and raw["input"]["color"] == "L" and raw["params"] > 0
    loaded, ckpt = load_model(str(path))
    x = torch.randn(3, 1, 32, 32)
    model.eval()
    assert torch.equal(model(x), loaded(x))
    assert ckpt["metrics"] == {"test_top1": 0.5} and ckpt["config"] == {"epochs": 1}
    assert not list(tmp_path.glob("*edgekd-tmp-*"))  # the atomic write left nothing behind


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(EdgeKDError, match="not a usable edgekd checkpoint") as refused:
        load_checkpoint(str(path))
    assert refused.value.__cause__ is not None  # torch's own error, for --debug's traceback
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(EdgeKDError, match="not an edgekd checkpoint"):
        load_checkpoint(str(other))


class _WritesAFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_pickled_callable_is_never_run(tmp_path):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": "x", "payload": _WritesAFile(str(target))}, f, protocol=2)
    with pytest.raises(EdgeKDError, match="pickled Python objects"):
        load_checkpoint(str(path))
    assert not target.exists()
