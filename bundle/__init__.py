"""The torch-free bundle runtime, for devices: ``from edgekd.bundle import load_bundle``.

It imports only numpy, Pillow and the bundle's runtime (onnxruntime or openvino); never PyTorch
(tests/test_export_runtime.py proves it in a fresh interpreter). Example::

    bundle = load_bundle("student-int8.zip")      # a bundle folder or its zip; checksums are verified
    bundle.predict_files(["cat.jpg"], top_k=3)    # [{"image": ..., "top": [{"label", "index", "score"}, ...]}]
    logits = bundle(bundle.preprocess(pil_image)[None])
"""

from ..base.errors import BundleError
from .sessions import open_model
from .runtime import Bundle, ZippedBundle, load_bundle, safe_extract, verify_bundle

__all__ = ["Bundle", "BundleError", "ZippedBundle", "load_bundle", "open_model", "safe_extract", "verify_bundle"]
