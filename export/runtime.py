"""The torch-free bundle runtime: load a bundle (a folder or its .zip), verify every checksum,
preprocess images exactly as training did, run the model, return class names and scores.

Needs numpy, Pillow and the bundle's runtime (onnxruntime for ONNX, openvino for OpenVINO IR), never
PyTorch; ``edgekd.runtime`` is its public import path.
"""

import os
import shutil
import tempfile
import zipfile
import zlib

import numpy as np

from .. import EdgeKDError

from .manifest import read_manifest, sha256_file


def open_session(fmt, model_path, threads=None, device="cpu"):
    """A callable ``run(batch: float32 NCHW array) -> logits array`` for one model file."""
    if fmt == "onnx":
        return OnnxSession(model_path, threads, device)
    if fmt == "openvino":
        return OpenVINOSession(model_path, threads, device)
    raise EdgeKDError(f"no runtime for bundle format {fmt!r}: this edgekd runs onnx, openvino")


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


class OpenVINOSession:
    """OpenVINO on the CPU (or an Intel GPU/NPU by its device name), at f32 unless the model is quantized.

    The CPU plugin would otherwise run FP32 models in bf16 on CPUs with bf16 support, moving logits by
    about 1e-2 and breaking the parity the bundle was validated with.
    """

    def __init__(self, path, threads=None, device="cpu", precision="f32"):
        os.environ.setdefault("OPENVINO_TELEMETRY_OPT_OUT", "1")
        import openvino as ov

        core = ov.Core()
        target = device.upper() if device != "cpu" else "CPU"
        if target not in core.available_devices:
            raise EdgeKDError(f"OpenVINO has no device {target!r} here; available: {', '.join(core.available_devices)}")
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if target == "CPU":
            config["INFERENCE_PRECISION_HINT"] = precision
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(path), target, config)
        self.request = self.compiled.create_infer_request()
        self.threads = threads

    def __call__(self, batch):
        self.request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
        return self.request.get_output_tensor(0).data.copy()


def check_external_data(model_path, listed):
    """ONNX weights stored beside the model must be checksummed files of the bundle, never paths outside it."""
    try:
        import onnx
    except ImportError:  # a device without the onnx package: ONNX Runtime resolves only what the manifest listed
        return
    try:
        model = onnx.load(model_path, load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: the file is not an ONNX model at all
        raise EdgeKDError(f"bundle model file {os.path.basename(model_path)!r} is not a readable ONNX model "
                          f"({type(e).__name__}): the bundle is damaged; export it again") from None
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if location not in listed:
            raise EdgeKDError(f"ONNX weight {tensor.name!r} refers to {location!r}, which is not a file of the bundle "
                              "(external data must stay inside the bundle folder)")


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
        if self.manifest["format"] == "onnx":
            check_external_data(os.path.join(self.folder, self.manifest["model_file"]), self.manifest["files"])

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


def load_bundle(path, threads=None, device="cpu"):
    """A verified Bundle from a bundle folder or a ``.zip`` written by ``edgekd export --zip``."""
    if os.path.isfile(path):
        if not zipfile.is_zipfile(path):
            raise EdgeKDError(f"bundle {path!r} is a file but not a bundle zip (expected a bundle folder or its .zip)")
        return ZippedBundle(path, threads, device)
    if not os.path.isdir(path):
        raise EdgeKDError(f"bundle {path!r} does not exist (expected a bundle folder or its .zip)")
    return Bundle(path, threads, device)


# A bundle zip is a model (weights compress little) and a manifest: these bounds refuse a zip bomb before
# a byte is written, and leave room for any model a device can run.
ZIP_MAX_BYTES = 8 * 1024 ** 3      # total size of the members once unpacked
ZIP_MAX_MEMBERS = 1000
ZIP_MAX_RATIO = 200                # unpacked / packed size of a member larger than ZIP_RATIO_FROM
ZIP_RATIO_FROM = 1024 ** 2


def _zip_bomb_problem(infos):
    """Why a zip's members are too big to unpack (their sizes as the central directory states them), or None.

    zipfile stops reading a member at its stated size, so the stated sizes bound what extractall writes.
    """
    if len(infos) > ZIP_MAX_MEMBERS:
        return f"it has {len(infos)} members (a bundle has a handful; at most {ZIP_MAX_MEMBERS})"
    total = sum(i.file_size for i in infos)
    if total > ZIP_MAX_BYTES:
        return f"its members unpack to {total / 1e9:.1f} GB (at most {ZIP_MAX_BYTES / 1e9:.1f} GB)"
    for i in infos:
        if i.file_size > ZIP_RATIO_FROM and i.file_size > ZIP_MAX_RATIO * max(i.compress_size, 1):
            return (f"member {i.filename!r} unpacks {i.file_size / max(i.compress_size, 1):.0f} times larger than "
                    f"it is packed ({i.file_size / 1e6:.0f} MB; at most {ZIP_MAX_RATIO} times): a zip bomb")
    return None


def safe_extract(archive, folder):
    """Unpack a bundle zip into ``folder``, refusing members that would land outside it or are links, and zip bombs."""
    root = os.path.realpath(folder)
    try:
        with zipfile.ZipFile(archive) as z:
            bomb = _zip_bomb_problem(z.infolist())
            if bomb:
                raise EdgeKDError(f"bundle zip {archive!r} is refused: {bomb}")
            for info in z.infolist():
                target = os.path.realpath(os.path.join(folder, info.filename))
                is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
                if os.path.isabs(info.filename) or is_link or not target.startswith(root + os.sep):
                    raise EdgeKDError(f"bundle zip {archive!r} has a member {info.filename!r} that escapes "
                                      "the bundle folder; refusing to unpack it")
            z.extractall(folder)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise EdgeKDError(f"bundle zip {archive!r} is damaged: {e or type(e).__name__}") from None
    entries = os.listdir(folder)
    # Zips made by edgekd hold one top folder; accept a flat zip too.
    if len(entries) == 1 and os.path.isdir(os.path.join(folder, entries[0])):
        return os.path.join(folder, entries[0])
    return folder


class ZippedBundle(Bundle):
    """A Bundle unpacked from its zip into a private temporary folder (removed when closed)."""

    def __init__(self, archive, threads=None, device="cpu"):
        self.tmp = tempfile.mkdtemp(prefix="edgekd-bundle-")
        try:
            super().__init__(safe_extract(archive, self.tmp), threads, device)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self.archive = archive

    def close(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __del__(self):
        self.close()
