"""ONNX export: torch.onnx (dynamo exporter) with a dynamic batch axis, then onnx.checker."""

import contextlib
import io
import logging
import os

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
# Weights go into external data only when the protobuf would pass its 2 GB limit.
EXTERNAL_DATA_BYTES = 1_500_000_000


def export_onnx(model, input_spec, folder, opset=None):
    """Write ``folder/model.onnx`` (+ ``model.onnx.data`` for huge models); return the model file name."""
    import onnx
    import torch

    from .. import EdgeKDError

    example = torch.zeros(2, input_spec.channels, input_spec.height, input_spec.width)
    path = os.path.join(folder, MODEL_FILE)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    kwargs = {"opset_version": opset} if opset else {}
    chatter = io.StringIO()  # the exporter prints progress lines; keep them for --debug logs only
    try:
        with contextlib.redirect_stdout(chatter):
            torch.onnx.export(
                model.eval(), (example,), path, dynamo=True, input_names=["input"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                external_data=weight_bytes > EXTERNAL_DATA_BYTES, **kwargs,
            )
    except Exception as e:
        log.debug(chatter.getvalue())
        raise EdgeKDError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    log.debug(chatter.getvalue())
    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as e:
        raise EdgeKDError(f"exported ONNX model fails onnx.checker: {str(e).splitlines()[0]}") from None
    return MODEL_FILE
