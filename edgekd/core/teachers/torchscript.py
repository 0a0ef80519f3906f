"""A TorchScript file as a teacher."""

import os
import zipfile

from ..checkpoint import file_sha256
from ..safe_load import torchscript
from .options import TeacherOptions
from .source import Env, Opaque, Source, first_conv_channels, need_file, split_spec, register_source
from .view import Loaded


def is_torchscript(path: str) -> bool:
    """A TorchScript archive holds code/ and constants.pkl; torch.save's zip (a checkpoint) does not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


@register_source("torchscript")
class TorchScriptSource(Source):
    def matches(self, spec: str, options: TeacherOptions) -> bool:
        return spec.startswith("torchscript:") or (os.path.isfile(spec) and not spec.lower().endswith(
            (".onnx", ".xml", ".pt2", ".zip")) and is_torchscript(spec))

    def check(self, spec: str, options: TeacherOptions) -> None:
        need_file(split_spec(spec, "torchscript"), "teacher TorchScript file")

    def load(self, spec: str, options: TeacherOptions, env: Env) -> Loaded:
        path = split_spec(spec, "torchscript")
        module = torchscript(path, "teacher TorchScript file")
        return Loaded(self.kind, None, module=Opaque(module.eval()), channels=first_conv_channels(module),
                      file=os.path.abspath(path),
                      sha256=file_sha256(path), runtime={"library": "torch.jit"})
