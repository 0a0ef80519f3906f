"""The registry of teacher sources (one entry per kind of ``--teacher`` spec), their base class, and the helpers
several sources share."""

import hashlib
import json
import os
from typing import Any, Callable, List, Optional, Tuple, Type

import torch
from torch import nn

from ...base.files import require_regular
from ...base.registry import Registry
from ..checkpoint import file_sha256
from .options import TeacherOptions
from .view import Loaded

TEACHERS = Registry("teacher source")


class Env:
    """What a source may need besides the spec: the run's config, data and process group."""

    def __init__(self, cfg: Any, data: Any = None, train: Any = None, test: Any = None, ctx: Any = None,
                 trained: Any = None) -> None:
        self.cfg, self.data, self.train, self.test, self.ctx = cfg, data, train, test, ctx
        self.trained = trained  # a teacher trained from a model spec by the caller (teachers.Trained)


class Source:
    """A kind of teacher spec: ``matches(spec, options)``, ``check`` (cheap), ``load -> Loaded``."""

    kind = ""
    hookable = False

    def matches(self, spec: str, options: TeacherOptions) -> bool:
        raise NotImplementedError

    def check(self, spec: str, options: TeacherOptions) -> None:
        pass

    def load(self, spec: str, options: TeacherOptions, env: Env) -> Loaded:
        raise NotImplementedError


def register_source(name: str) -> Callable[[Type[Source]], Type[Source]]:
    def add(cls: Type[Source]) -> Type[Source]:
        obj = cls()
        obj.kind = name
        TEACHERS.register(name, hookable=cls.hookable)(obj)
        return cls

    return add


def has_suffix(spec: str, prefix: str, suffixes: Tuple[str, ...]) -> bool:
    return spec.startswith(prefix + ":") or (":" not in spec[2:] and spec.lower().endswith(suffixes))


def files_sha256(paths: List[str]) -> str:
    """One sha256 for several files (an IR's .xml and .bin, an ONNX file and its external data)."""
    if len(paths) == 1:
        return file_sha256(paths[0])
    return hashlib.sha256(json.dumps([file_sha256(p) for p in paths]).encode()).hexdigest()


def state_sha256(model: nn.Module, spec: str) -> str:
    """For models built from code and downloaded weights: the spec and every tensor of the state dict."""
    h = hashlib.sha256(spec.encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if tensor.numel() else b"")
    return h.hexdigest()


def split_spec(spec: str, prefix: str) -> str:
    return spec[len(prefix) + 1:] if spec.startswith(prefix + ":") else spec


def need_file(path: str, what: str) -> None:
    """A teacher's file (or a bundle's folder): a regular file, checked by stat (a FIFO named model.onnx would
    block the loader for ever)."""
    if not os.path.isdir(path):
        require_regular(path, what)


def threads_of(options: TeacherOptions) -> int:
    return options.threads or torch.get_num_threads()


def apply_shape(lo: Loaded, dims: Optional[List[Any]], where: str) -> None:
    dims = [d if isinstance(d, int) and d > 0 else None for d in (dims or [])]
    if len(dims) == 4:
        if dims[1] in (1, 3):
            lo.settle(where, channels=dims[1])
        if dims[2] and dims[3]:
            lo.settle(where, size=(dims[2], dims[3]))


def first_conv_channels(module: nn.Module) -> Optional[int]:
    for p in module.parameters():
        if p.dim() == 4:
            return p.shape[1] if p.shape[1] in (1, 3) else None
    return None


class Opaque(nn.Module):
    """Holds a module whose train()/eval()/requires_grad_() raise (torch.export's, TorchScript's): the teacher is
    frozen anyway."""

    def __init__(self, module: Any) -> None:
        super().__init__()
        self.inner = module

    def train(self, mode: bool = True) -> "Opaque":
        return self

    def forward(self, x: torch.Tensor) -> Any:
        return self.inner(x)
