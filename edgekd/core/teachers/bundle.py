"""An edgekd bundle (folder or .zip) as a teacher: checksums verified, the manifest's view and class names."""

import hashlib
import json
import os

from ...bundle import load_bundle
from ...bundle.manifest import MANIFEST_FILE
from ..checkpoint import file_sha256
from .onnx import ort_runner, ort_session
from .openvino import openvino_runner
from .options import TeacherOptions
from .source import Env, Source, need_file, split_spec, threads_of, register_source
from .view import Loaded


@register_source("bundle")
class BundleSource(Source):
    """An edgekd bundle (folder or .zip): checksums verified, the manifest's view and class names."""

    def matches(self, spec: str, options: TeacherOptions) -> bool:
        path = split_spec(spec, "bundle")
        return spec.startswith("bundle:") or (os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST_FILE))) \
            or (os.path.isfile(path) and path.lower().endswith(".zip"))

    def check(self, spec: str, options: TeacherOptions) -> None:
        need_file(split_spec(spec, "bundle"), "teacher bundle")

    def load(self, spec: str, options: TeacherOptions, env: Env) -> Loaded:
        path = split_spec(spec, "bundle")
        bundle = load_bundle(path, threads=1)
        del bundle.run  # the bundle's own session spins; the teacher opens one that does not
        m = bundle.manifest
        model_path = os.path.join(bundle.folder, m.model_file)
        threads = threads_of(options)
        if m.format == "onnx":
            run = ort_runner(ort_session(model_path, threads))
        else:
            run, _ = openvino_runner(model_path, threads)
        sha = file_sha256(path) if os.path.isfile(path) else hashlib.sha256(
            json.dumps(m.files, sort_keys=True).encode()).hexdigest()
        spec_in = m.input
        return Loaded(self.kind, run, channels=m.channels, size=spec_in.resize,
                      mean=list(spec_in.mean), std=list(spec_in.std), color=spec_in.color,
                      names=list(m.classes), names_from="the bundle manifest", file=os.path.abspath(path),
                      sha256=sha, runtime={"library": m.format, "precision": m.precision, "threads": threads},
                      metrics={"model": m.record("model"), "source": os.path.abspath(path),
                               "bundle_top1": m.validation.get("top1")},
                      found={"input": "the bundle manifest"}, keep=bundle)
