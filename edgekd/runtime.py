"""The torch-free bundle runtime's earlier import path: ``from edgekd.runtime import load_bundle`` keeps
working for code written against it; the runtime itself is edgekd.bundle (bundle/ in the source tree)."""

from .bundle import Bundle, BundleError, ZippedBundle, load_bundle, open_model, safe_extract, verify_bundle

__all__ = ["Bundle", "BundleError", "ZippedBundle", "load_bundle", "open_model", "safe_extract", "verify_bundle"]
