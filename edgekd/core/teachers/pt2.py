"""A ``torch.export`` program (.pt2) as a teacher."""

import os
from typing import Any

import torch
from torch import nn

from ..checkpoint import file_sha256
from ..safe_load import exported_program
from .options import TeacherOptions
from .source import Env, Opaque, Source, apply_shape, need_file, has_suffix, split_spec, register_source
from .view import Loaded, as_logits


@register_source("pt2")
class ExportedProgramSource(Source):
    def matches(self, spec: str, options: TeacherOptions) -> bool:
        return has_suffix(spec, "pt2", (".pt2",))

    def check(self, spec: str, options: TeacherOptions) -> None:
        need_file(split_spec(spec, "pt2"), "teacher torch.export file")

    def load(self, spec: str, options: TeacherOptions, env: Env) -> Loaded:
        path = split_spec(spec, "pt2")
        program = exported_program(path, "teacher torch.export file")  # weights-only, its graph checked first
        lo = Loaded(self.kind, None, module=Opaque(program.module()), file=os.path.abspath(path),
                    sha256=file_sha256(path), runtime={"library": "torch.export"})
        user = set(program.graph_signature.user_inputs)
        for node in program.graph.nodes:
            val: Any = node.meta.get("val") if node.op == "placeholder" and node.name in user else None  # torch.fx's
            if hasattr(val, "shape"):
                dims = [d if isinstance(d, int) else None for d in val.shape]
                apply_shape(lo, dims, "the exported program")
                if dims and dims[0]:  # exported with a fixed batch: run it in batches of exactly that size
                    lo.module = FixedBatch(lo.module, dims[0])
                break
        return lo


class FixedBatch(nn.Module):
    """A teacher exported for one batch size (torch.export without dynamic_shapes): the batch is cut into
    pieces of that size, the last one padded with copies of its last image and the padding's outputs dropped."""

    def __init__(self, module: Any, batch: int) -> None:
        super().__init__()
        self.inner, self.batch = module, batch

    def train(self, mode: bool = True) -> "FixedBatch":
        return self

    def forward(self, x: torch.Tensor) -> Any:
        outs = []
        for start in range(0, x.shape[0], self.batch):
            piece = x[start:start + self.batch]
            n = piece.shape[0]
            if n < self.batch:
                piece = torch.cat([piece, piece[-1:].expand(self.batch - n, *piece.shape[1:])])
            outs.append(as_logits(self.inner(piece))[:n])
        return torch.cat(outs)
