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

import numpy as np

from ..bundle.manifest import read_manifest

TOP_LAYERS = 25
_ORT_INT8_OPS = ("QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm", "DynamicQuantizeMatMul",
                 "QLinearAdd", "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearMul")


def _group(entries, runs):
    """entries: (layer, op_type, precision, microseconds) over all runs -> the record (ms per call)."""
    total = sum(e[3] for e in entries) or 1.0
    by_type, by_layer = {}, {}
    for layer, op, precision, us in entries:
        t = by_type.setdefault(op, {"op_type": op, "ms": 0.0, "calls": 0, "precision": {}})
        t["ms"] += us / 1000 / runs
        t["calls"] += 1
        t["precision"][precision] = t["precision"].get(precision, 0.0) + us / 1000 / runs
        lay = by_layer.setdefault(layer, {"name": layer, "op_type": op, "precision": precision, "ms": 0.0})
        lay["ms"] += us / 1000 / runs
    for rows in (by_type, by_layer):
        for r in rows.values():
            r["share"] = round(r["ms"] * 1000 * runs / total, 4)
            r["ms"] = round(r["ms"], 5)
    per_precision = {}
    for _, _, precision, us in entries:
        per_precision[precision] = per_precision.get(precision, 0.0) + us / total
    return {"total_ms": round(total / 1000 / runs, 5), "runs": runs,
            "precision_share": {k: round(v, 4) for k, v in sorted(per_precision.items())},
            "by_type": sorted(by_type.values(), key=lambda r: -r["ms"]),
            "by_layer": sorted(by_layer.values(), key=lambda r: -r["ms"])[:TOP_LAYERS]}


def _ort_precision(op, args):
    if op in _ORT_INT8_OPS:
        return "int8"
    types = [next(iter(t)) for t in args.get("input_type_shape", []) if isinstance(t, dict) and t]
    first = types[0] if types else "float"
    return {"float": "fp32", "float16": "fp16", "int8": "int8", "uint8": "int8"}.get(first, first)


def profile_onnxruntime(model_path, batch, runs, threads=None):
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
    nodes = [e for e in trace if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    per_call = len(nodes) // (runs + 1) if nodes else 0
    entries = [(re.sub(r"_kernel_time$", "", e["name"]), e["args"].get("op_name", "?"),
                _ort_precision(e["args"].get("op_name", ""), e["args"]), float(e["dur"]))
               for e in nodes[per_call:]]
    return {"runtime": "onnxruntime", **_group(entries, runs)}


def _ov_precision(exec_type):
    m = re.search(r"_(I8|U8|FP32|F32|BF16|FP16|F16|I32)$", exec_type, re.IGNORECASE)
    if not m:
        return "other"
    tag = m.group(1).upper()
    return {"I8": "int8", "U8": "int8", "FP32": "fp32", "F32": "fp32", "BF16": "bf16", "FP16": "fp16",
            "F16": "fp16", "I32": "int32"}[tag]


def profile_openvino(model_path, batch, runs, threads=None, fp32=False):
    os.environ.setdefault("OPENVINO_TELEMETRY_OPT_OUT", "1")
    import openvino as ov

    core = ov.Core()
    config = {"PERF_COUNT": True, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if fp32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    request = core.compile_model(core.read_model(model_path), "CPU", config).create_infer_request()
    request.infer({0: batch})
    entries, exec_types = [], {}
    for _ in range(runs):
        request.infer({0: batch})
        for p in request.profiling_info:  # the counters of the last call
            if p.status == p.Status.EXECUTED and p.real_time.total_seconds() > 0:
                entries.append((p.node_name, p.node_type, _ov_precision(p.exec_type),
                                p.real_time.total_seconds() * 1e6))
                exec_types[p.node_name] = p.exec_type
    record = _group(entries, runs)
    for layer in record["by_layer"]:
        layer["exec_type"] = exec_types.get(layer["name"])
    return {"runtime": "openvino", **record}


def profile_bundle(folder, images, batch_size=1, runs=20, threads=None, runtime=None):
    """Per-operator profile of a bundle folder on ``images`` (float32 NCHW) at ``batch_size`` on the CPU, in
    ``runtime`` (onnxruntime or openvino; default: the bundle format's; OpenVINO also reads an ONNX bundle)."""
    manifest = read_manifest(folder)
    batch = np.ascontiguousarray(np.take(images, range(batch_size), axis=0, mode="wrap"), dtype=np.float32)
    path = os.path.join(folder, manifest.model_file)
    if (runtime or {"onnx": "onnxruntime"}.get(manifest.format, "openvino")) == "onnxruntime":
        return profile_onnxruntime(path, batch, runs, threads)
    return profile_openvino(path, batch, runs, threads, fp32=manifest.precision == "fp32")
