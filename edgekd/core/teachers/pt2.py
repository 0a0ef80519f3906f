"""A ``torch.export`` program (.pt2) as a teacher."""

import os

import torch

from ... import EdgeKDError
from ..checkpoint import file_sha256
from .source import Opaque, Source, apply_shape, need_file, has_suffix, split_spec, register_source
from .view import Loaded


@register_source("pt2")
class ExportedProgramSource(Source):
    def matches(self, spec, options):
        return has_suffix(spec, "pt2", (".pt2",))

    def check(self, spec, options):
        need_file(split_spec(spec, "pt2"), "teacher torch.export file")

    def load(self, spec, options, env):
        path = split_spec(spec, "pt2")
        try:
            program = torch.export.load(path)
        except Exception as e:
            raise EdgeKDError(f"cannot load torch.export program {path!r}: {str(e).strip().splitlines()[0][:300]}") from e
        lo = Loaded(self.kind, None, module=Opaque(program.module()), file=os.path.abspath(path),
                    sha256=file_sha256(path), runtime={"library": "torch.export"})
        user = set(program.graph_signature.user_inputs)
        for node in program.graph.nodes:
            if node.op == "placeholder" and node.name in user and hasattr(node.meta.get("val"), "shape"):
                apply_shape(lo, [d if isinstance(d, int) else None for d in node.meta["val"].shape], "the exported program")
                break
        return lo
