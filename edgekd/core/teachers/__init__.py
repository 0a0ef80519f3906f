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
from .checkpoint import Trained  # noqa: F401
from .classes import class_index, read_classes_file  # noqa: F401
from .load import check, load_teacher, resolve  # noqa: F401
from .onnx import ort_runner, ort_session  # noqa: F401
from .openvino import openvino_runner  # noqa: F401
from .options import COLORS, OUTPUTS, TeacherOptions  # noqa: F401
from .source import TEACHERS, Env, Source  # noqa: F401
from .view import FrozenTeacher, Loaded, Teacher, check_probs  # noqa: F401
from .weights import load_state_dict  # noqa: F401
