"""A faster frozen teacher on a CPU: bfloat16 where the CPU computes it natively, channels_last.

A frozen teacher only runs forward passes, and a distillation target is a softened distribution:
bfloat16 (8 bits of mantissa) changes a teacher's top-1 on a few views in a thousand (see
docs/distillation.md, "A fast teacher on a CPU", and tools/measure_teacher.py) while oneDNN's
AMX-BF16 and AVX512-BF16 kernels run it several times faster. Without those instructions bfloat16 is
emulated and slower, so ``auto`` picks it only where the CPU has them (read from /proc/cpuinfo).

The teacher's forward runs under ``torch.autocast(bfloat16)`` (see ``to_bfloat16``); the module keeps
its layer names (feature hooks still find them) and the Teacher returns float32 logits.
"""

import logging

import torch

from .. import EdgeKDError
from ..base.cpu import native_bf16

log = logging.getLogger(__name__)

TEACHER_DTYPES = ("auto", "float32", "bfloat16")
# auto leaves teachers of small inputs in float32 (the same bound as the small-image augmentation): their
# forward is cheap, and the digits and CIFAR-10 results stay what they were.
SMALL_INPUT = 48
# Training views compared between the float32 and bfloat16 teacher before a run (recorded in metrics.json).
AGREEMENT_IMAGES = 256


# Teacher sources whose runtime (ONNX Runtime, OpenVINO) sets the precision: no PyTorch module to cast.
BLACK_BOX_KINDS = ("bundle", "onnx", "openvino")


def check_dtype(choice, spec, kind):
    """Refuse --teacher-dtype bfloat16 for a black-box teacher before any data is read or teacher trained."""
    if choice == "bfloat16" and kind in BLACK_BOX_KINDS:
        raise EdgeKDError(f"--teacher-dtype bfloat16 applies to PyTorch teachers; {spec!r} is a {kind} teacher "
                          "whose runtime sets its own precision (use auto or float32)")


def resolve_dtype(choice, teacher, device):
    """(dtype name, why) for ``--teacher-dtype choice``; a one-line error when it cannot apply."""
    choice = choice or "auto"
    if choice not in TEACHER_DTYPES:
        raise EdgeKDError(f"--teacher-dtype {choice!r}: choose from {', '.join(TEACHER_DTYPES)}")
    black_box = getattr(teacher, "model", None) is None
    if choice == "bfloat16" and black_box:
        raise EdgeKDError(f"--teacher-dtype bfloat16 applies to PyTorch teachers; {teacher.spec!r} is a "
                          f"{teacher.kind} file whose runtime sets its own precision (use auto or float32)")
    if choice == "bfloat16" and str(device).startswith("cuda"):
        return "bfloat16", "asked (--teacher-dtype bfloat16)"
    if choice == "bfloat16":
        native = native_bf16()
        if native is None:
            log.warning("--teacher-dtype bfloat16 on a CPU without native bfloat16 (no AMX-BF16 or AVX512-BF16): "
                        "it is emulated and usually slower than float32")
        return "bfloat16", "asked (--teacher-dtype bfloat16)" + ("" if native else "; emulated on this CPU")
    if choice == "float32":
        return "float32", "asked (--teacher-dtype float32)"
    if black_box:
        return "float32", "auto: a black-box teacher runs in its runtime's own precision"
    if not getattr(teacher, "is_module", True):  # TorchScript / torch.export graphs may have dtypes baked in
        return "float32", f"auto: a {teacher.kind} graph stays as it was saved (--teacher-dtype bfloat16 to try)"
    if str(device).startswith("cuda"):
        return "float32", "auto: on CUDA the teacher follows --amp"
    size = getattr(getattr(teacher, "loaded", None), "size", None)
    if size and max(size) <= SMALL_INPUT:  # small-image runs (digits, CIFAR) keep the results they always had
        return "float32", (f"auto: a teacher at {max(size)} px (<= {SMALL_INPUT}) keeps float32 "
                           "(--teacher-dtype bfloat16 to use it)")
    native = native_bf16()
    if native is None:
        return "float32", "auto: this CPU has no native bfloat16 (AMX-BF16 / AVX512-BF16)"
    return "bfloat16", f"auto: this CPU computes bfloat16 natively ({native})"


class _InputCast:
    """A forward pre-hook giving the teacher's inputs its memory layout."""

    def __init__(self):
        self.channels_last = False

    def __call__(self, module, args):
        return tuple(self.cast(a) for a in args)

    def cast(self, a):
        if self.channels_last and torch.is_tensor(a) and a.dim() == 4:
            a = a.contiguous(memory_format=torch.channels_last)
        return a


def _input_cast(teacher):
    if getattr(teacher, "_input_cast", None) is None:
        teacher._input_cast = _InputCast()
        teacher.model.register_forward_pre_hook(teacher._input_cast)
    return teacher._input_cast


def to_bfloat16(teacher, device="cpu"):
    """Run a PyTorch teacher under bfloat16 autocast (idempotent).

    Autocast rather than casting the weights: convolutions and matrix products run in bfloat16 (the
    time), batch-norm, softmax and reductions stay float32. Measured on a trained resnet20 (1,024
    CIFAR-10 training views): top-1 agreement with float32 99.80 % under autocast, 99.41 % with the
    weights cast, at the same speed within the noise of a shared machine (docs/distillation.md)."""
    if getattr(teacher, "dtype_name", "float32") == "bfloat16":
        return teacher
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    teacher.model.forward = torch.autocast(kind, dtype=torch.bfloat16)(teacher.model.forward)
    teacher.dtype_name = "bfloat16"
    return teacher


def to_channels_last(teacher):
    """NHWC weights and inputs for a PyTorch teacher: oneDNN's convolutions run faster on them (measured in
    docs/distillation.md: x1.2 in float32, x1.7 more in bfloat16, for resnet18 on this project's CPU)."""
    teacher.model.to(memory_format=torch.channels_last)
    _input_cast(teacher).channels_last = True
    return teacher


def settle_teacher_layout(teacher, choice, device):
    """Apply ``--channels-last`` (auto: on for a PyTorch teacher; the student's layout on a CPU stays as it
    was) to the teacher; returns True when it runs channels_last."""
    if getattr(teacher, "model", None) is None or (choice or "auto") == "off":
        return False
    to_channels_last(teacher)
    return True


@torch.no_grad()
def _top1(teacher, x, chunk=64):
    """The teacher's top-1 in chunks: 256 views of a large teacher at once would peak at gigabytes."""
    return torch.cat([teacher(x[i:i + chunk]).argmax(1) for i in range(0, len(x), chunk)])


def settle_teacher_dtype(teacher, choice, device, views=None, channels_last="auto"):
    """Put ``teacher`` in the dtype ``--teacher-dtype`` asks for and the layout ``--channels-last`` asks
    for; returns its record for metrics.json.

    With ``views`` (the training views) and bfloat16 chosen, the float32 and bfloat16 teachers are
    first compared on the first AGREEMENT_IMAGES views of epoch 1: top-1 agreement, recorded."""
    name, why = resolve_dtype(choice, teacher, device)
    record = {"requested": choice or "auto", "used": name, "why": why,
              "channels_last": settle_teacher_layout(teacher, channels_last, device)}
    teacher.dtype_name = getattr(teacher, "dtype_name", "float32")
    if name == "float32":
        return record
    x = None
    if views is not None and len(views):  # the teacher's own view of each crop when there is one (edgekd.stream)
        x, xt, _ = views.batch(torch.arange(min(AGREEMENT_IMAGES, len(views))), epoch=1, teacher_view=True)
        x = (xt if xt is not None else x).to(device)
        before = _top1(teacher, x)
    to_bfloat16(teacher, device)
    if x is not None:
        agree = (_top1(teacher, x) == before).float().mean().item()
        record["top1_agreement_with_float32"] = {"agreement": agree, "images": len(x),
                                                 "views": "training views of epoch 1"}
        log.info("teacher in bfloat16: top-1 agrees with float32 on %.1f%% of %d training views", 100 * agree, len(x))
    teacher.take_seconds()
    return record
