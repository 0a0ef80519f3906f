"""Which layers INT8 hurts: per weighted layer (Conv, Gemm/MatMul), the signal-to-quantization-noise ratio
(SQNR, dB) of its input and output in the INT8 model against the FP32 model on the same train images.

- ``sqnr_db``: the layer's output against FP32's; it carries every error made upstream as well.
- ``loss_db``: SQNR lost across the layer (input SQNR minus output SQNR): what the layer itself adds,
  mostly its weight quantization. Layers are ranked by it, worst first: an outlier weight that wipes out
  a layer's other weights shows here, while the layers after it only inherit its damage.

ONNX: the QDQ graph runs with ONNX Runtime's graph optimisations off, i.e. the quantization the graph
defines, emulated in float (a fused INT8 kernel cannot expose its inputs; a kernel-level effect, such as
the AVX2 saturation of s8s8, shows in the parity gate instead). OpenVINO: likewise, both IRs run in the CPU
plugin with low-precision transformations off and the layers' inputs and outputs added as results. Layers
are matched by name, else by (op, weight shape, occurrence).
"""

import logging
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .openvino import WEIGHTED_OPS, import_openvino
from .records import LayerReport, LayerRow

if TYPE_CHECKING:  # heavy: only for the type checker
    import onnx
    import openvino

log = logging.getLogger(__name__)

CAP_DB = 120.0  # SQNR of an exact match (no noise): a finite number, so the manifest stays valid JSON
TOP = 20
PLOT_FILE = "int8_layers.png"


@dataclass
class Layer:
    """A weighted layer of one model: its name and op, and the points compared (its input and its output after
    the affine tail): tensor names in ONNX, output ports in OpenVINO (``node`` is the op itself)."""

    name: str
    op: str
    inp: Any
    out: Any
    shape: Optional[str] = None
    node: Any = None


Pairs = List[Tuple[Layer, Layer]]
Sums = Dict[Tuple[int, str], List[float]]  # (pair, "in" | "out") -> [signal power, noise power]


def sqnr_db(signal: float, noise: float) -> float:
    if noise <= 0:
        return CAP_DB
    if signal <= 0:
        return -CAP_DB
    return max(-CAP_DB, min(CAP_DB, 10 * math.log10(signal / noise)))


def _match(fp_layers: List[Layer], q_layers: List[Layer]) -> Pairs:
    """Pairs (fp, q) of layers: by name where the names agree, else by (op, weight shape, occurrence)."""
    by_name = {layer.name: layer for layer in fp_layers}
    pairs = [(by_name[q.name], q) for q in q_layers if q.name in by_name]
    if len(pairs) == len(q_layers):
        return pairs

    def keyed(layers: List[Layer]) -> Dict[Tuple[str, Optional[str], int], Layer]:
        seen: Dict[Tuple[str, Optional[str]], int] = {}
        out = {}
        for layer in layers:
            sig = (layer.op, layer.shape)
            seen[sig] = seen.get(sig, 0) + 1
            out[sig + (seen[sig],)] = layer
        return out

    fp_keys = keyed(fp_layers)
    return [(fp_keys[k], q) for k, q in keyed(q_layers).items() if k in fp_keys]


Outputs = Dict[Tuple[int, str], np.ndarray]


def _accumulate(pairs: Pairs, fp_out: Outputs, q_out: Outputs, sums: Sums) -> None:
    for k, _ in enumerate(pairs):
        for port in ("in", "out"):
            f = np.asarray(fp_out[(k, port)], dtype=np.float64)
            q = np.asarray(q_out[(k, port)], dtype=np.float64)
            if f.shape != q.shape:
                continue
            s = sums.setdefault((k, port), [0.0, 0.0])
            s[0] += float((f * f).sum())
            s[1] += float(((f - q) ** 2).sum())


# --- ONNX ---------------------------------------------------------------------------------------------

# Followed from a weighted op to the point compared: batch norm, bias and scale (folded into the op in one
# graph, not in the other), the activation (the CPU plugin fuses it into an INT8 convolution, whose
# pre-activation output it cannot expose).
# The layer's own output quantization (QDQ pair, FakeQuantize) is followed too, so both formats charge it to
# the layer that produces the tensor.
AFFINE = ("BatchNormalization", "BatchNormInference", "Mul", "Add", "Multiply", "Relu", "Clip", "Clamp",
          "QuantizeLinear", "DequantizeLinear", "FakeQuantize")


def _onnx_layers(model: "onnx.ModelProto") -> List[Layer]:
    """Weighted nodes with the tensor after their affine tail (batch norm, bias, scale): a graph where batch
    norm was folded into the Conv and one where it was not (QDQ weights block folding) meet there."""
    g = model.graph
    consts = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    consumers: Dict[str, List[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    layers = []
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        out = n.output[0]
        while len(consumers.get(out, [])) == 1:
            c = consumers[out][0]
            if c.op_type not in AFFINE or any(i != out and i not in consts for i in c.input):
                break
            out = c.output[0]
        layers.append(Layer(n.name or n.output[0], n.op_type, n.input[0], out))
    return layers


Runner = Callable[[np.ndarray], Any]


def _onnx_runner(model: "onnx.ModelProto", tensors: List[str], path: str) -> Runner:
    """A session on ``model`` with ``tensors`` added as outputs; returns run(batch) -> {tensor: array}."""
    import onnx
    import onnxruntime as ort

    present = {o.name for o in model.graph.output}
    for t in dict.fromkeys(tensors):
        if t not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    onnx.save(model, path)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    feed = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> Dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {feed: batch})))

    return run


def _ends(layer: Layer) -> Dict[str, Any]:
    return {"in": layer.inp, "out": layer.out}


def onnx_report(fp32_path: str, int8_path: str, images: np.ndarray, scratch: str) -> Tuple[Pairs, Sums]:
    import onnx

    fp, q = onnx.load(fp32_path), onnx.load(int8_path)
    pairs = _match(_onnx_layers(fp), _onnx_layers(q))
    fp_run = _onnx_runner(fp, [t for a, _ in pairs for t in (a.inp, a.out)], os.path.join(scratch, "report-fp32.onnx"))
    q_run = _onnx_runner(q, [t for _, b in pairs for t in (b.inp, b.out)], os.path.join(scratch, "report-int8.onnx"))
    sums: Sums = {}
    for i in range(0, len(images), 32):
        batch = np.ascontiguousarray(images[i:i + 32])
        f, g = fp_run(batch), q_run(batch)
        _accumulate(pairs, {(k, p): f[_ends(a)[p]] for k, (a, _) in enumerate(pairs) for p in ("in", "out")},
                    {(k, p): g[_ends(b)[p]] for k, (_, b) in enumerate(pairs) for p in ("in", "out")}, sums)
    return pairs, sums


# --- OpenVINO -----------------------------------------------------------------------------------------

def _ov_constant(node: "openvino.Node", depth: int) -> bool:
    """A constant, or computed from constants only (a bias reshaped or converted on its way to the Add)."""
    if node.get_type_name() in ("Constant", "ShapeOf"):  # a shape is bookkeeping, not data
        return True
    inputs = [i.get_source_output().get_node() for i in node.inputs()]
    return depth > 0 and bool(inputs) and all(_ov_constant(n, depth - 1) for n in inputs)


def _ov_tail(port: "openvino.Output") -> "openvino.Output":
    """Follow a single-consumer chain of Multiply/Add by constants (batch norm, bias) from ``port``."""
    while True:
        # a ShapeOf reading the tensor (dynamic-shape bookkeeping of the ONNX frontend) is not a consumer
        targets = [t for t in port.get_target_inputs() if t.get_node().get_type_name() != "ShapeOf"]
        if len(targets) != 1:
            return port
        node = targets[0].get_node()
        others = [i.get_source_output().get_node() for i in node.inputs() if i.get_source_output() != port]
        if node.get_type_name() not in AFFINE or not all(_ov_constant(o, 4) for o in others):
            return port
        port = node.output(0)


def _ov_layers(model: "openvino.Model") -> List[Layer]:
    return [Layer(op.get_friendly_name(), op.get_type_name(), op.input(0).get_source_output(), _ov_tail(op.output(0)),
                  shape=str(op.input(1).get_partial_shape()), node=op)
            for op in model.get_ordered_ops() if op.get_type_name() in WEIGHTED_OPS]


def _ov_runner(core: "openvino.Core", model: "openvino.Model", layers: List[Layer]) -> Runner:
    ports = []
    for layer in layers:
        ports += [layer.inp, layer.out]
    added = model.add_outputs(ports)  # a port that already is a result (the logits) is not added twice
    outputs = list(model.outputs)
    index = [next(i for i, o in enumerate(outputs) if o.get_node() == a.get_node() and o.get_index() == a.get_index())
             for a in added]
    # Low-precision transformations off: FakeQuantize then runs as itself, in float, so every layer's output
    # is observable (with them on, a Result inside a fused INT8 chain read back wrong values in our tests).
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "LP_TRANSFORMS_MODE": "NO"})

    def run(batch: np.ndarray) -> List[np.ndarray]:
        res = compiled(batch)
        return [res[i] for i in index]

    return run


def openvino_report(fp32_path: str, int8_path: str, images: np.ndarray,
                    scratch: Optional[str] = None) -> Tuple[Pairs, Sums]:
    ov = import_openvino()
    core = ov.Core()
    fp, q = core.read_model(fp32_path), core.read_model(int8_path)
    pairs = _match(_ov_layers(fp), _ov_layers(q))
    fp_run = _ov_runner(core, fp, [a for a, _ in pairs])
    q_run = _ov_runner(core, q, [b for _, b in pairs])
    sums: Sums = {}

    def keyed(values: List[np.ndarray]) -> Outputs:
        return {(k, p): values[2 * k + (p == "out")] for k in range(len(pairs)) for p in ("in", "out")}

    for i in range(0, len(images), 32):
        batch = np.ascontiguousarray(images[i:i + 32])
        _accumulate(pairs, keyed(fp_run(batch)), keyed(q_run(batch)), sums)
    return pairs, sums


# --- the report ---------------------------------------------------------------------------------------

def layer_report(fmt: str, fp32_path: str, int8_path: str, images: np.ndarray, scratch: str,
                 folder: Optional[str] = None, in_float: Sequence[str] = (), top: int = TOP) -> Optional[LayerReport]:
    """The ranked per-layer record for the manifest (top ``top`` layers + summary); with ``folder``, also
    writes the plot there as int8_layers.png. Returns None (with a warning) when it cannot be measured."""
    try:
        run = onnx_report if fmt == "onnx" else openvino_report
        pairs, sums = run(fp32_path, int8_path, images, scratch)
    except Exception as e:  # a report must never cost the user the bundle
        log.warning("per-layer INT8 report skipped: %s: %s", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    layers = _rows(pairs, sums, set(in_float))
    if not layers:
        log.warning("per-layer INT8 report skipped: no layer of the INT8 model matched the FP32 model")
        return None
    layers.sort(key=lambda r: -r.loss_db)
    worst = layers[0]
    report = LayerReport(metric="SQNR (dB) of each weighted layer's output vs FP32; loss_db = input SQNR - output "
                                "SQNR (what the layer adds); ranked by loss_db, worst first",
                         images=int(len(images)), split="train (tuning images)", count=len(layers), worst=worst.name,
                         median_sqnr_db=float(np.median([r.sqnr_db for r in layers])),
                         min_sqnr_db=min(r.sqnr_db for r in layers), layers=layers[:top])
    if folder is not None and _plot(layers[:top], os.path.join(folder, PLOT_FILE), fmt):
        report.plot = PLOT_FILE
    log.info("INT8 per-layer report: worst %s (loses %.1f dB, output SQNR %.1f dB)", worst.name, worst.loss_db,
             worst.sqnr_db)
    return report


def _rows(pairs: Pairs, sums: Sums, in_float: set) -> List[LayerRow]:
    rows = []
    for k, (a, b) in enumerate(pairs):
        if (k, "out") not in sums:
            continue
        out = sqnr_db(*sums[(k, "out")])
        inp = sqnr_db(*sums[(k, "in")]) if (k, "in") in sums else CAP_DB
        rows.append(LayerRow(name=b.name, fp32_name=a.name, op=b.op, sqnr_db=round(out, 2),
                             input_sqnr_db=round(inp, 2), loss_db=round(inp - out, 2), in_float=b.name in in_float))
    return rows


def _plot(layers: List[LayerRow], path: str, fmt: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; %s not written", os.path.basename(path))
        return False
    names = [r.name[-40:] for r in layers][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(layers) + 1.5))
    ax.barh(names, [r.loss_db for r in layers][::-1], color="tab:red", label="dB lost in the layer")
    ax.barh(names, [r.sqnr_db for r in layers][::-1], color="tab:blue", alpha=0.35, label="output SQNR (dB)")
    ax.set_xlabel("dB")
    ax.set_title(f"INT8 quantization error per layer ({fmt}); worst at the top")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
