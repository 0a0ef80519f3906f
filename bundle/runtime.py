"""The torch-free bundle runtime: load a bundle (a folder or its .zip), verify every checksum,
preprocess images exactly as training did, run the model, return class names and scores.

Needs numpy, Pillow and the bundle's runtime (onnxruntime for ONNX, openvino for OpenVINO IR), never
PyTorch; ``edgekd.bundle`` is its public import path. The session, preprocessing and checksum code is
bundle/{checks,preprocessing,sessions}.py's, which the device runner carries too (edgekd.bundle.assemble): one
implementation for predict, export validation, bench and devices.
"""

import os
import shutil
import tempfile
import zipfile
import zlib
from typing import Any, Dict, List, Optional, Sequence

from ..base.errors import EdgeKDError
from .device import ranked
from .manifest import Manifest, verify
from .preprocessing import load_images, preprocess
from .sessions import open_session


def check_external_data(model_path: str, listed: Dict[str, str]) -> None:
    """ONNX weights stored beside the model must be checksummed files of the bundle, never paths outside it."""
    try:
        import onnx
    except ImportError:  # a device without the onnx package: ONNX Runtime resolves only what the manifest listed
        return
    try:
        model = onnx.load(model_path, load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: the file is not an ONNX model at all
        raise EdgeKDError(f"bundle model file {os.path.basename(model_path)!r} is not a readable ONNX model "
                          f"({type(e).__name__}): the bundle is damaged; export it again") from e
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if location not in listed:
            raise EdgeKDError(f"ONNX weight {tensor.name!r} refers to {location!r}, which is not a file of the bundle "
                              "(external data must stay inside the bundle folder)")


def verify_bundle(folder: str) -> Manifest:
    """The bundle's Manifest (schema-checked), after checking every listed file against its sha256 and that
    ONNX external data stays inside the bundle."""
    manifest = verify(folder)
    if manifest.format == "onnx":
        check_external_data(os.path.join(folder, manifest.model_file), manifest.files)
    return manifest


class Bundle:
    """A verified bundle folder: its manifest, its session, and the manifest's preprocessing.

    Verification, preprocessing and the session are the device runner's (the one implementation, also copied
    to devices); ``runtime`` picks another runtime than the format's (openvino for ONNX).
    """

    def __init__(self, folder: str, threads: Optional[int] = None, device: str = "cpu",
                 runtime: Optional[str] = None) -> None:
        self.folder = folder
        self.manifest = verify_bundle(folder)
        self.classes = self.manifest.classes
        self.run, self.info = open_session(folder, self.manifest, threads, device, runtime)

    def preprocess(self, image: Any) -> Any:
        """PIL image -> (C, H, W) float32, the same steps as the training transform: mode, resize, /255, normalise."""
        return preprocess(image, self.manifest.input)

    def __call__(self, batch: Any) -> Any:
        return self.run(batch)

    def predict_files(self, paths: Sequence[Any], top_k: int = 1) -> List[Dict[str, Any]]:
        """The top ``top_k`` classes of each image file."""
        return ranked(paths, self(load_images(paths, self.manifest.input)), self.classes, top_k)


def load_bundle(path: str, threads: Optional[int] = None, device: str = "cpu", runtime: Optional[str] = None) -> Bundle:
    """A verified Bundle from a bundle folder or a ``.zip`` written by ``edgekd export --zip``."""
    if os.path.isfile(path):
        if not zipfile.is_zipfile(path):
            raise EdgeKDError(f"bundle {path!r} is a file but not a bundle zip (expected a bundle folder or its .zip)")
        return ZippedBundle(path, threads, device, runtime)
    if not os.path.isdir(path):
        raise EdgeKDError(f"bundle {path!r} does not exist (expected a bundle folder or its .zip)")
    return Bundle(path, threads, device, runtime)


# A bundle zip is a model (weights compress little) and a manifest: these bounds refuse a zip bomb before
# a byte is written, and leave room for any model a device can run.
ZIP_MAX_BYTES = 8 * 1024 ** 3      # total size of the members once unpacked
ZIP_MAX_MEMBERS = 1000
ZIP_MAX_RATIO = 200                # unpacked / packed size of a member larger than ZIP_RATIO_FROM
ZIP_RATIO_FROM = 1024 ** 2


def _zip_bomb_problem(infos: List[zipfile.ZipInfo]) -> Optional[str]:
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


def safe_extract(archive: str, folder: str) -> str:
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
        raise EdgeKDError(f"bundle zip {archive!r} is damaged: {e or type(e).__name__}") from e
    entries = os.listdir(folder)
    # Zips made by edgekd hold one top folder; accept a flat zip too.
    if len(entries) == 1 and os.path.isdir(os.path.join(folder, entries[0])):
        return os.path.join(folder, entries[0])
    return folder


def renamed(error: Exception, tmp: str, name: Any) -> Exception:
    """``error`` with a temporary folder's path replaced by the name the user knows (a zip: ``b.zip/b/model.onnx``;
    an export's staging folder: its --out): the folder is gone by the time the message is read."""
    name = str(name)
    text = str(error).replace(os.path.realpath(tmp), name).replace(str(tmp), name)
    try:
        return type(error)(text)
    except TypeError:  # an error class with other arguments: the message is what the user needs
        return EdgeKDError(text)


class ZippedBundle(Bundle):
    """A Bundle unpacked from its zip into a private temporary folder (removed when closed)."""

    def __init__(self, archive: str, threads: Optional[int] = None, device: str = "cpu",
                 runtime: Optional[str] = None) -> None:
        self.tmp = tempfile.mkdtemp(prefix="edgekd-bundle-")
        try:
            super().__init__(safe_extract(archive, self.tmp), threads, device, runtime)
        except EdgeKDError as e:  # its message names files in the folder removed below: name them in the zip
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise renamed(e, self.tmp, archive) from e
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self.archive = archive

    def close(self) -> None:
        """Remove the unpacked copy."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __del__(self) -> None:
        self.close()
