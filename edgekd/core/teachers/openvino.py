"""A foreign OpenVINO IR (.xml + .bin), run by OpenVINO (a black box: logits only)."""

import os
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from ... import EdgeKDError
from .options import TeacherOptions
from .source import Env, Source, apply_shape, files_sha256, need_file, has_suffix, split_spec, threads_of, register_source
from .view import Loaded


def openvino_runner(path: str, threads: int) -> Tuple[Callable[[torch.Tensor], torch.Tensor], List[Optional[int]]]:
    """OpenVINO on the CPU with a latency hint (one stream), torch's thread count, no thread pinning, f32 for
    float layers (INT8 layers stay INT8)."""
    os.environ.setdefault("OPENVINO_TELEMETRY_OPT_OUT", "1")
    import openvino as ov

    core = ov.Core()
    try:
        model = core.read_model(path)
        compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                                                     "INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False})
    except Exception as e:
        raise EdgeKDError(f"OpenVINO cannot load {path!r}: {str(e).strip().splitlines()[0][:300]}") from e
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        request.infer({0: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    shape = model.inputs[0].get_partial_shape()
    dims = [d.get_length() if d.is_static else None for d in shape] if shape.rank.is_static else []
    return run, dims


@register_source("openvino")
class OpenVINOSource(Source):
    """A foreign OpenVINO IR (.xml + .bin), run by OpenVINO: a black box whose view comes from options."""

    def matches(self, spec: str, options: TeacherOptions) -> bool:
        return has_suffix(spec, "openvino", (".xml",))

    def check(self, spec: str, options: TeacherOptions) -> None:
        path = split_spec(spec, "openvino")
        need_file(path, "teacher OpenVINO IR")
        need_file(os.path.splitext(path)[0] + ".bin", "the weights of the OpenVINO IR")

    def load(self, spec: str, options: TeacherOptions, env: Env) -> Loaded:
        path = split_spec(spec, "openvino")
        threads = threads_of(options)
        run, dims = openvino_runner(path, threads)
        lo = Loaded(self.kind, run, file=os.path.abspath(path),
                    sha256=files_sha256([path, os.path.splitext(path)[0] + ".bin"]),
                    runtime={"library": "openvino", "threads": threads, "hint": "LATENCY"})
        apply_shape(lo, dims, "the OpenVINO model")
        return lo
