"""The INT8 ladder's last rung, quantization-aware distillation, trained for the export pipeline.

Export converts and checks; it never trains. When post-training INT8 and the float fallback both miss
--max-drop, the ladder (edgekd/export/ladder.py) asks its trainer for a QAT checkpoint: this one runs
``edgekd quantize`` (edgekd/core/quantize.py) in the export's scratch folder. The CLI layer may use both
training and export, so the two meet here.
"""

import os
from typing import TYPE_CHECKING

from ..core.config import resolve
from ..core.options import QuantizeOptions

if TYPE_CHECKING:  # heavy (torch): only for the type checker
    from ..export.ladder import QatRequest


def train_qat(request: "QatRequest") -> str:
    """Run ``edgekd quantize`` as ``request`` (an export.ladder.QatRequest) asks; return the QAT checkpoint's path."""
    from ..core.quantize import QAT_FILE, run_quantize  # heavy: torch, nncf

    given = {"student": request.student, "teacher": request.teacher, "epochs": request.epochs, "data": request.data,
             "data_root": request.data_root, "seed": request.seed, "out": request.folder,
             "progress": request.progress}
    options = resolve("quantize", {k: v for k, v in given.items() if v is not None})
    assert isinstance(options, QuantizeOptions)  # resolve("quantize", ...) makes the quantize command's options
    run_quantize(options)
    return os.path.join(request.folder, QAT_FILE)
