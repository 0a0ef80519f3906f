"""The torch-free bundle runtime, for devices: ``from edgekd.runtime import load_bundle``.

It imports only numpy, Pillow and the bundle's runtime (onnxruntime or openvino); never PyTorch
(tests/test_export_runtime.py proves it in a fresh interpreter). Example::

    bundle = load_bundle("student-int8.zip")      # a bundle folder or its zip; checksums are verified
    bundle.predict_files(["cat.jpg"], top_k=3)    # [{"image": ..., "top": [{"label", "index", "score"}, ...]}]
    logits = bundle(bundle.preprocess(pil_image)[None])
"""

from .export.runtime import Bundle, OnnxSession, OpenVINOSession, ZippedBundle, load_bundle, open_session, safe_extract

__all__ = ["Bundle", "OnnxSession", "OpenVINOSession", "ZippedBundle", "load_bundle", "open_session", "safe_extract"]
