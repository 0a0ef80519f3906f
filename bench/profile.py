"""Where the time goes: per-operator times of a bundle from ONNX Runtime's profiler and OpenVINO's performance
counters, grouped by operator type and by layer, with the precision each ran in.

``profile_bundle(folder, images, batch_size, runs, threads)`` -> {"by_type": [...], "by_layer": [...], ...}.
It opens its own session (profiling slows every call a little, so the timed session stays untouched).
``edgekd bench --profile`` asks each worker for it after timing (bench/worker.py ``profile``).
"""

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..bundle.manifest import read_manifest
from ..bundle.rows import LayerTime, OpTime, Profile, Record

TOP_LAYERS = 25
_ORT_INT8_OPS = ("QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul",
                 "QLinearAdd", "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearMul")
Entry = Tuple[str, str, str, float]  # layer, op type, precision, microseconds


def _group(runtime: str, entries: Sequence[Entry], runs: int) -> Profile:
    """entries (layer, op_type, precision, microseconds) over all runs -> the profile (ms per call)."""
    total = sum(e[3] for e in entries) or 1.0
    by_type: Dict[str, OpTime] = {}
    by_layer: Dict[str, LayerTime] = {}
    for layer, op, precision, us in entries:
        t = by_type.setdefault(op, OpTime(op_type=op))
        t.ms += us / 1000 / runs
        t.calls += 1
        t.precision[precision] = t.precision.get(precision, 0.0) + us / 1000 / runs
        lay = by_layer.setdefault(layer, LayerTime(name=layer, op_type=op, precision=precision))
        lay.ms += us / 1000 / runs
    for r in list(by_type.values()) + list(by_layer.values()):
        r.share = round(r.ms * 1000 * runs / total, 4)
        r.ms = round(r.ms, 5)
    per_precision: Dict[str, float] = {}
    for _, _, precision, us in entries:
        per_precision[precision] = per_precision.get(precision, 0.0) + us / total
    return Profile(runtime=runtime, total_ms=round(total / 1000 / runs, 5), runs=runs,
                   precision_share={k: round(v, 4) for k, v in sorted(per_precision.items())},
                   by_type=sorted(by_type.values(), key=lambda r: -r.ms),
                   by_layer=sorted(by_layer.values(), key=lambda r: -r.ms)[:TOP_LAYERS])


@dataclass
class KernelArgs(Record):
    """The ``args`` of a kernel event in ONNX Runtime's profile."""

    op_name: str = "?"
    input_type_shape: List[Any] = field(default_factory=list)


@dataclass
class TraceEvent(Record):
    """One event of ONNX Runtime's profile (Chrome trace format); the kernels are ``Node`` events."""

    cat: Optional[str] = None
    name: str = ""
    dur: float = 0.0
    args: KernelArgs = field(default_factory=KernelArgs)


def _ort_precision(op: str, args: KernelArgs) -> str:
    if op in _ORT_INT8_OPS:
        return "int8"
    types = [next(iter(t)) for t in args.input_type_shape if isinstance(t, dict) and t]
    first = types[0] if types else "float"
    return {"float": "fp32", "float16": "fp16", "int8": "int8", "uint8": "int8"}.get(first, first)


def profile_onnxruntime(model_path: str, batch: Any, runs: int, threads: Optional[int] = None) -> Profile:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgekd-profile-") as tmp:
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "ort")
        if threads:
            opts.intra_op_num_threads = threads
        session = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: batch}
        session.run(None, feed)  # warm-up, dropped below by counting only the last ``runs`` calls
        for _ in range(runs):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            trace = json.load(f)
    events = [TraceEvent.from_json(e) for e in trace if isinstance(e, dict)]
    nodes = [e for e in events if e.cat == "Node" and e.name.endswith("_kernel_time")]
    per_call = len(nodes) // (runs + 1) if nodes else 0
    entries = [(re.sub(r"_kernel_time$", "", e.name), e.args.op_name, _ort_precision(e.args.op_name, e.args),
                float(e.dur)) for e in nodes[per_call:]]
    return _group("onnxruntime", entries, runs)


def _ov_precision(exec_type: str) -> str:
    m = re.search(r"_(I8|U8|FP32|F32|BF16|FP16|F16|I32)$", exec_type, re.IGNORECASE)
    if not m:
        return "other"
    tag = m.group(1).upper()
    return {"I8": "int8", "U8": "int8", "FP32": "fp32", "F32": "fp32", "BF16": "bf16", "FP16": "fp16",
            "F16": "fp16", "I32": "int32"}[tag]


def profile_openvino(model_path: str, batch: Any, runs: int, threads: Optional[int] = None,
                     fp32: bool = False) -> Profile:
    os.environ.setdefault("OPENVINO_TELEMETRY_OPT_OUT", "1")
    import openvino as ov

    core = ov.Core()
    config: Dict[str, Any] = {"PERF_COUNT": True, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if fp32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    request = core.compile_model(core.read_model(model_path), "CPU", config).create_infer_request()
    request.infer({0: batch})
    entries: List[Entry] = []
    exec_types: Dict[str, str] = {}
    for _ in range(runs):
        request.infer({0: batch})
        for p in request.profiling_info:  # the counters of the last call
            if p.status == p.Status.EXECUTED and p.real_time.total_seconds() > 0:
                entries.append((p.node_name, p.node_type, _ov_precision(p.exec_type),
                                p.real_time.total_seconds() * 1e6))
                exec_types[p.node_name] = p.exec_type
    record = _group("openvino", entries, runs)
    for layer in record.by_layer:
        layer.exec_type = exec_types.get(layer.name)
    return record


def profile_bundle(folder: str, images: Any, batch_size: int = 1, runs: int = 20, threads: Optional[int] = None,
                   runtime: Optional[str] = None) -> Profile:
    """Per-operator profile of a bundle folder on ``images`` (float32 NCHW) at ``batch_size`` on the CPU, in
    ``runtime`` (onnxruntime or openvino; default: the bundle format's; OpenVINO also reads an ONNX bundle)."""
    manifest = read_manifest(folder)
    batch = np.ascontiguousarray(np.take(images, range(batch_size), axis=0, mode="wrap"), dtype=np.float32)
    path = os.path.join(folder, manifest.model_file)
    if (runtime or {"onnx": "onnxruntime"}.get(manifest.format, "openvino")) == "onnxruntime":
        return profile_onnxruntime(path, batch, runs, threads)
    return profile_openvino(path, batch, runs, threads, fp32=manifest.precision == "fp32")
