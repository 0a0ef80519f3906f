"""``MODULE:FUNCTION``: a function in the user's own code that returns the teacher module."""

import contextlib
import importlib
import os
import re
from typing import Iterator

from torch import nn

from ... import EdgeKDError
from .options import TeacherOptions
from .source import Env, Source, first_conv_channels, state_sha256, register_source
from .view import Loaded
from .weights import load_weights

# The spec prefixes of the sources; a MODULE:FUNCTION factory never uses one of these as its module.
PREFIXES = ("bundle", "onnx", "openvino", "torchscript", "pt2", "torchvision", "timm")
FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@contextlib.contextmanager
def user_code(what: str) -> Iterator[None]:
    """Run the user's own code (a factory, the module it lives in): whatever it raises, SystemExit and
    KeyboardInterrupt included (sys.exit() at import would end edgekd with exit 0 having done nothing), becomes
    one EdgeKDError line naming ``what``; edgekd's own errors pass through."""
    try:
        yield
    except EdgeKDError:
        raise
    except BaseException as e:  # noqa: B036 - the user's code, not edgekd's: contained whatever it raises
        if isinstance(e, SystemExit):
            reason = f"it called sys.exit({'' if e.code is None else repr(e.code)})"
        elif isinstance(e, KeyboardInterrupt):
            reason = "it raised KeyboardInterrupt"
        else:
            text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            reason = f"it raised {type(e).__name__}" + (f": {text}" if text else "")
        raise EdgeKDError(f"{what} failed: {reason}") from e


@register_source("factory")
class FactorySource(Source):
    """``MODULE:FUNCTION``: a function in the user's code (importable from PYTHONPATH) returning an nn.Module,
    called with no arguments; --teacher-weights loads a state dict into it."""

    hookable = True

    def matches(self, spec: str, options: TeacherOptions) -> bool:
        return bool(FACTORY.match(spec)) and spec.split(":")[0] not in PREFIXES and not os.path.exists(spec)

    def load(self, spec: str, options: TeacherOptions, env: Env) -> Loaded:
        module_name, fn_name = spec.split(":")
        with user_code(f"importing {module_name!r} for teacher {spec!r}"):
            try:
                module = importlib.import_module(module_name)
            except ImportError as e:
                raise EdgeKDError(f"cannot import {module_name!r} for teacher {spec!r}: {e} (is its folder on "
                                  "PYTHONPATH?)") from e
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise EdgeKDError(f"module {module_name!r} has no function {fn_name!r} (teacher {spec!r})")
        with user_code(f"teacher factory {spec!r}"):
            model = fn()
        if not isinstance(model, nn.Module):
            raise EdgeKDError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
        file = getattr(module, "__file__", None)
        if options.weights:
            load_weights(model, options.weights, spec)
            file = os.path.abspath(options.weights)
        return Loaded(self.kind, None, module=model, hookable=True, channels=first_conv_channels(model), file=file,
                      sha256=state_sha256(model, spec), runtime={"library": "torch"},
                      metrics={"model": spec, "source": file, "params": sum(p.numel() for p in model.parameters())})
