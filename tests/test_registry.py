import pytest

from edgekd import EdgeKDError
from edgekd.base.registry import Registry


def test_register_get_names_and_meta():
    reg = Registry("widget")

    @reg.register("beta", speed=2)
    def beta():
        return "b"

    reg.register("alpha")(lambda: "a")
    assert reg.names() == ["alpha", "beta"]
    assert reg.get("beta") is beta
    assert reg.meta("beta") == {"speed": 2}
    assert "alpha" in reg and "gamma" not in reg


def test_duplicate_registration_is_refused():
    reg = Registry("widget")
    reg.register("a")(object)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(object)


def test_unknown_name_lists_choices_and_suggests_the_closest():
    reg = Registry("loss")
    for name in ("kd", "seed", "mse"):
        reg.register(name)(object)
    with pytest.raises(EdgeKDError) as e:
        reg.get("sed")
    msg = str(e.value)
    assert "unknown loss 'sed'" in msg and "kd, mse, seed" in msg and "did you mean 'seed'" in msg


def test_project_registries_hold_their_entries():
    from edgekd.bench.backends import BACKENDS
    from edgekd.export.formats import FORMATS
    from edgekd.core.losses import LOSSES
    from edgekd.core.models import MODELS

    assert {"kd", "seed", "mse", "ce"} <= set(LOSSES.names())
    assert {"seed-teacher", "seed-student", "compact-student"} <= set(MODELS.names())
    assert "onnx" in FORMATS.names()
    assert {"torch", "onnxruntime"} <= set(BACKENDS.names())
