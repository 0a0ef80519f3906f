"""The torch-free bundle runtime: load a bundle, preprocess images exactly as the manifest says, run it.

Needs numpy, Pillow and the bundle's runtime (onnxruntime for ONNX) - never PyTorch.
"""

import os

import numpy as np

from .. import EdgeKDError

from .manifest import read_manifest, sha256_file


def open_session(fmt, model_path, threads=None, device="cpu"):
    """A callable ``run(batch: float32 NCHW array) -> logits array`` for one model file."""
    if fmt == "onnx":
        return OnnxSession(model_path, threads, device)
    raise EdgeKDError(f"no runtime for bundle format {fmt!r}: this edgekd runs onnx")


class OnnxSession:
    """ONNX Runtime on the CPU (or CUDA when its execution provider is installed)."""

    def __init__(self, path, threads=None, device="cpu"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EdgeKDError("ONNX Runtime here has no CUDAExecutionProvider; install onnxruntime-gpu or use cpu")
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(path, opts, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.threads = threads

    def __call__(self, batch):
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


class Bundle:
    """A verified bundle folder: its manifest, its session, and the manifest's preprocessing."""

    def __init__(self, folder, threads=None, device="cpu"):
        self.folder = folder
        self.manifest = read_manifest(folder)
        self.verify()
        self.classes = self.manifest["classes"]
        spec = self.manifest["input"]
        self.color = spec["color"]
        self.size = tuple(spec["resize"])
        self.mean = np.asarray(spec["mean"], dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(spec["std"], dtype=np.float32).reshape(-1, 1, 1)
        self.session = open_session(self.manifest["format"], os.path.join(folder, self.manifest["model_file"]),
                                    threads, device)

    def verify(self):
        """Every file the manifest lists exists inside the folder and matches its sha256."""
        root = os.path.realpath(self.folder)
        for name, digest in self.manifest["files"].items():
            path = os.path.realpath(os.path.join(self.folder, name))
            if os.path.dirname(path) != root:
                raise EdgeKDError(f"bundle file {name!r} points outside the bundle folder")
            if not os.path.isfile(path):
                raise EdgeKDError(f"bundle {self.folder!r} is missing {name!r}")
            if sha256_file(path) != digest:
                raise EdgeKDError(f"bundle file {name!r} does not match its sha256 in manifest.json (corrupt or edited)")

    def preprocess(self, image):
        """PIL image -> (C, H, W) float32, the same steps as the training transform: mode, resize, /255, normalise."""
        from PIL import Image

        if image.mode != self.color:
            image = image.convert(self.color)
        height, width = self.size
        if image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        return (pixels - self.mean) / self.std

    def __call__(self, batch):
        return self.session(batch)

    def predict_files(self, paths, top_k=1):
        from PIL import Image, UnidentifiedImageError

        batch = []
        for path in paths:
            try:
                with Image.open(path) as img:
                    batch.append(self.preprocess(img))
            except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
                raise EdgeKDError(f"cannot read image {path!r}: {e}") from None
        logits = self(np.stack(batch))
        probs = _softmax(logits)
        results = []
        for path, p in zip(paths, probs):
            order = np.argsort(-p)[:top_k]
            results.append({"image": path, "top": [{"label": self.classes[i], "index": int(i), "score": float(p[i])}
                                                   for i in order]})
        return results


def _softmax(logits):
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def load_bundle(folder, threads=None, device="cpu"):
    if not os.path.isdir(folder):
        raise EdgeKDError(f"bundle folder {folder!r} does not exist")
    return Bundle(folder, threads, device)
