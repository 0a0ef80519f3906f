"""Teachers: every kind of model a user may learn from, behind one callable.

A ``Teacher`` takes a batch in the *student's* normalised view and returns logits in the *data's*
class order. In between it converts the view for the teacher (back to [0, 1] pixels with the
student's mean/std, grey <-> RGB, RGB -> BGR, a bilinear antialiased resize to the teacher's size,
the teacher's own mean/std), runs the teacher outside autograd, and permutes or slices its outputs
to the data's classes, matched by name wherever the teacher carries names.

Sources (``TEACHERS``, one entry per kind of ``--teacher`` spec): an edgekd checkpoint or a model
spec trained first (the original two), an edgekd bundle, a foreign ONNX file or OpenVINO IR (black
boxes: logits only), TorchScript and ``torch.export`` (.pt2) files, torchvision and timm models with
pretrained weights (or a local weights file), and ``MODULE:FUNCTION`` factories in the user's code.

The package: ``options`` (the --teacher-* flags), ``view`` (the Teacher module: the student's view in, the
data's classes out), ``classes`` (class matching), ``source`` (the registry of sources), ``load``
(load_teacher), and one module per source.
"""

# One module per source; importing them registers each in TEACHERS.
from . import bundle, checkpoint, factory, onnx, openvino, pt2, timm, torchscript, torchvision  # noqa: F401
from .checkpoint import Trained
from .classes import ClassMatch, class_index, read_classes_file
from .load import check, load_teacher, resolve
from .onnx import ort_runner, ort_session
from .openvino import openvino_runner
from .options import COLORS, OUTPUTS, TeacherOptions
from .source import TEACHERS, Env, Source
from .view import FrozenTeacher, Loaded, Teacher, check_probs
from .weights import load_state_dict

__all__ = ["COLORS", "OUTPUTS", "TEACHERS", "ClassMatch", "Env", "FrozenTeacher", "Loaded", "Source", "Teacher",
           "TeacherOptions", "Trained", "check", "check_probs", "class_index", "load_state_dict", "load_teacher",
           "openvino_runner", "ort_runner", "ort_session", "read_classes_file", "resolve"]
