"""A foreign ONNX file, run by ONNX Runtime (a black box: logits only); the ONNX Runtime session the bundle
source shares."""

import json
import os
from typing import TYPE_CHECKING, Any, Callable, Dict, List

import numpy as np
import torch

from ... import EdgeKDError
from ...bundle.manifest import METADATA_KEYS
from ..config import MAX_INPUT_SIDE
from .options import COLORS, OUTPUTS, TeacherOptions
from .source import Env, Source, apply_shape, files_sha256, need_file, has_suffix, split_spec, threads_of, register_source
from .view import Loaded

if TYPE_CHECKING:  # heavy: only for the type checker
    import onnxruntime as ort


def ort_session(path: str, threads: int) -> "ort.InferenceSession":
    """ONNX Runtime with torch's thread count and no spinning: its idle workers must not steal the cores
    torch needs for the student's step between two teacher calls."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise EdgeKDError(f"ONNX Runtime cannot load {path!r}: {str(e).strip().splitlines()[0][:300]}") from e


def ort_runner(session: "ort.InferenceSession") -> Callable[[torch.Tensor], torch.Tensor]:
    """A torch-in, torch-out call of an ONNX Runtime session; a fixed batch size is served in chunks."""
    first = session.get_inputs()[0]
    fixed = first.shape[0] if first.shape and isinstance(first.shape[0], int) and first.shape[0] > 0 else None

    def run(x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        if fixed is None or len(batch) == fixed:
            return torch.from_numpy(session.run(None, {first.name: batch})[0])
        outs = []
        for start in range(0, len(batch), fixed):
            part = batch[start:start + fixed]
            pad = fixed - len(part)
            if pad:
                part = np.concatenate([part, np.repeat(part[-1:], pad, 0)])
            outs.append(session.run(None, {first.name: part})[0][:fixed - pad])
        return torch.from_numpy(np.concatenate(outs))

    return run


def _onnx_files(path: str) -> List[str]:
    """The ONNX file and the external-data files it names (all of them decide its answers)."""
    try:
        import onnx
    except ImportError:
        return [path]
    model = onnx.load(path, load_external_data=False)
    extra = sorted({e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                    for e in t.external_data if e.key == "location"})
    return [path] + [os.path.join(os.path.dirname(path), name) for name in extra]


@register_source("onnx")
class OnnxSource(Source):
    """A foreign ONNX file, run by ONNX Runtime: a black box whose view comes from options or its metadata."""

    def matches(self, spec: str, options: TeacherOptions) -> bool:
        return has_suffix(spec, "onnx", (".onnx",))

    def check(self, spec: str, options: TeacherOptions) -> None:
        need_file(split_spec(spec, "onnx"), "teacher ONNX file")

    def load(self, spec: str, options: TeacherOptions, env: Env) -> Loaded:
        path = split_spec(spec, "onnx")
        threads = threads_of(options)
        session = ort_session(path, threads)
        meta = dict(session.get_modelmeta().custom_metadata_map)
        dims = session.get_inputs()[0].shape
        lo = Loaded(self.kind, ort_runner(session), file=os.path.abspath(path), sha256=files_sha256(_onnx_files(path)),
                    runtime={"library": "onnxruntime", "threads": threads, "spinning": False})
        apply_shape(lo, dims, "the ONNX graph")
        _apply_metadata(lo, meta, spec)
        return lo


def _apply_metadata(lo: Loaded, meta: Dict[str, str], spec: str) -> None:
    """Read edgekd's ONNX metadata_props keys (export.onnx.METADATA_KEYS) when the file carries them."""
    def value(key: str) -> Any:
        text = meta.get(METADATA_KEYS[key])
        if text is None:
            return None
        try:
            return json.loads(text) if key != "color" and key != "outputs" else text
        except (ValueError, RecursionError):  # JSONDecodeError, or nested past json's recursion limit
            raise EdgeKDError(f"teacher {spec!r}: metadata {METADATA_KEYS[key]!r} is not JSON: {text[:80]!r}") from None

    for key in ("mean", "std", "color", "outputs", "classes", "input_size"):
        v = value(key)
        if v is None:
            continue
        if key in ("classes", "mean", "std", "input_size") and not (
                isinstance(v, list) and v and all(isinstance(i, (str, int, float)) and not isinstance(i, bool) for i in v)):
            raise EdgeKDError(f"teacher {spec!r}: metadata {METADATA_KEYS[key]!r} must be a JSON list of "
                              f"{'names' if key == 'classes' else 'numbers'}, got {str(v)[:80]!r}")
        if key == "classes":
            lo.names, lo.names_from = [str(c) for c in v], f"ONNX metadata {METADATA_KEYS['classes']}"
        elif key == "input_size":
            if len(v) != 2 or not all(isinstance(i, int) and 1 <= i <= MAX_INPUT_SIDE for i in v):
                raise EdgeKDError(f"teacher {spec!r}: metadata {METADATA_KEYS[key]!r} must be [height, width], whole "
                                  f"numbers from 1 to {MAX_INPUT_SIDE}, got {str(v)[:80]!r}")
            lo.settle("ONNX metadata", size=tuple(v))
        else:
            lo.settle("ONNX metadata", **{key: v})
    if lo.color is not None and lo.color not in COLORS or lo.outputs is not None and lo.outputs not in OUTPUTS:
        raise EdgeKDError(f"teacher {spec!r}: metadata color {lo.color!r} / outputs {lo.outputs!r} not understood "
                          f"(color: {', '.join(COLORS)}; outputs: {', '.join(OUTPUTS)})")
