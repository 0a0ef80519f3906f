"""``timm:NAME``: a timm model with pretrained weights (or --teacher-weights FILE), its own data config."""

import os
from types import ModuleType
from typing import Any, Optional

from torch import nn

from ... import EdgeKDError
from ..checkpoint import file_sha256
from .options import TeacherOptions
from .source import Env, Source, state_sha256, register_source
from .view import Loaded
from .weights import head_classes, load_state_dict, load_weights


@register_source("timm")
class TimmSource(Source):
    """``timm:NAME``: timm.create_model(NAME, pretrained=True), or with --teacher-weights FILE; its data config
    (input size, mean, std) from timm.data.resolve_data_config, ImageNet names for 1000-class heads."""

    hookable = True

    def matches(self, spec: str, options: TeacherOptions) -> bool:
        return spec.startswith("timm:")

    def check(self, spec: str, options: TeacherOptions) -> None:
        _import_timm()

    def load(self, spec: str, options: TeacherOptions, env: Env) -> Loaded:
        timm = _import_timm()
        name = spec[len("timm:"):]
        if options.weights:
            state = load_state_dict(options.weights)
            model = _create(timm, name, options.weights, pretrained=False, num_classes=head_classes(state) or 1000)
            load_weights(model, options.weights, spec, state)
            file, sha = os.path.abspath(options.weights), file_sha256(options.weights)
        else:
            model = _create(timm, name, None, pretrained=True)  # timm's loader and the Hugging Face cache
            file, sha = f"timm:{name} pretrained", None
        sha = sha or state_sha256(model, spec)
        config = timm.data.resolve_data_config(model=model)
        (c, h, w), mean, std = (config[k] for k in ("input_size", "mean", "std"))  # timm's dict
        lo = Loaded(self.kind, None, module=model, hookable=True, channels=c, size=(h, w), mean=list(mean),
                    std=list(std), file=file, sha256=sha, found={"input": "timm.data.resolve_data_config"},
                    runtime={"library": "torch"},
                    metrics={"model": spec, "source": file, "params": sum(p.numel() for p in model.parameters())})
        if getattr(model, "num_classes", None) == 1000:
            info = timm.data.ImageNetInfo()
            lo.names = [info.index_to_description(i) for i in range(1000)]
            lo.names_from = "timm.data.ImageNetInfo descriptions"
        return lo


def _create(timm: ModuleType, name: str, weights: Optional[str], **kwargs: Any) -> nn.Module:
    """timm.create_model, its failures (an unknown name, no internet) as one line."""
    try:
        return timm.create_model(name, **kwargs)
    except Exception as e:
        if "Unknown model" in str(e):
            raise EdgeKDError(f"unknown timm model {name!r} (see timm.list_models())") from e
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise EdgeKDError(f"timm cannot load {name!r}: {reason}"
                          + ("" if weights else "; on a machine without internet pass --teacher-weights FILE")) from e


def _import_timm() -> ModuleType:
    try:
        import timm
        import timm.data
    except ImportError:
        raise EdgeKDError("timm: teachers need the timm package: pip install 'edgekd[timm]'") from None
    return timm
