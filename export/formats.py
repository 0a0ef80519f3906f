"""The format table: one registry entry per bundle format, with what it supports; it drives both
validation of the command line and dispatch to the exporter."""

from ..registry import Registry

from .onnx import export_onnx

FORMATS = Registry("export format")

FORMATS.register("onnx", precisions=("fp32",), runtime="onnxruntime", suffix=".onnx",
                 atol={"fp32": 1e-4})(export_onnx)


def check_request(fmt, precision):
    """Refuse, up front, a format or a precision the format does not support."""
    from .. import EdgeKDError

    meta = FORMATS.meta(fmt)
    if precision not in meta["precisions"]:
        raise EdgeKDError(f"format {fmt!r} does not support precision {precision!r}; "
                          f"supported: {', '.join(meta['precisions'])}")
    return meta
