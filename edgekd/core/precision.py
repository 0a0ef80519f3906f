"""The student's compute dtype on a CPU (``--student-dtype float32|bfloat16|auto``).

bfloat16 is not a rule on CPUs: with AMX the teacher ran 3x faster in bf16, while on a Zen 4 CPU (AVX512_BF16,
no AMX) mobilenet_v3_small trained at 160 px at 0.95x of float32 (docs, FINDINGS.md). So ``auto`` measures:
a few training steps of both, on a copy of the actual student at the actual input size and batch, and keeps
the faster; the choice and the timings go into metrics.json.

Under bfloat16 only the student's forward (and so its backward) runs in ``torch.autocast("cpu", bfloat16)``;
its logits are turned back to float32 before the loss, so losses and soft targets are float32, and the weights,
the optimizer's state and the checkpoints stay float32 (autocast casts copies of the weights per op).
CUDA runs keep --amp, which already covers them.
"""

import contextlib
import copy
import logging
import time

import torch

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "auto")
# auto: steps timed per dtype after warm-up steps (the first bf16 steps pick their kernels)
TIMED_STEPS, WARMUP_STEPS = 3, 2


def student_autocast(dtype):
    """The context the student's forward runs in: bf16 autocast on the CPU, or nothing."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cpu", dtype=dtype)


def _sample_batch(views, batch_size):
    n = min(int(batch_size), len(views))
    out = views.batch(torch.arange(n), epoch=1)
    x, y = out[0], out[-1]
    return x, y.clamp_min(0)  # an unlabelled image (-1) times like a labelled one


def time_steps(model, x, y, dtype, steps=TIMED_STEPS, warmup=WARMUP_STEPS):
    """Images per second of training steps (forward, cross-entropy, backward, SGD step) of a copy of ``model``
    under ``dtype`` (None: float32): the model itself is not changed."""
    net = copy.deepcopy(model).train()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    seconds = 0.0
    for step in range(warmup + steps):
        start = time.perf_counter()
        with student_autocast(dtype):
            logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= warmup:
            seconds += time.perf_counter() - start
    return steps * len(x) / seconds


def settle_student_dtype(model, views, cfg, channels_last=False):
    """(autocast dtype or None, record for metrics.json) of a run's --student-dtype."""
    requested = getattr(cfg, "student_dtype", None) or "float32"  # edgekd quantize has no such option
    if str(cfg.device).startswith("cuda") or requested == "float32":
        why = "--amp decides on CUDA" if str(cfg.device).startswith("cuda") and requested != "float32" else "asked"
        return None, {"requested": requested, "chosen": "float32", "reason": why}
    if requested == "bfloat16":
        return torch.bfloat16, {"requested": requested, "chosen": "bfloat16", "reason": "asked"}
    x, y = _sample_batch(views, cfg.batch_size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    speed = {"float32": time_steps(model, x, y, None), "bfloat16": time_steps(model, x, y, torch.bfloat16)}
    chosen = max(speed, key=lambda name: speed[name])
    record = {"requested": "auto", "chosen": chosen, "images_per_s": {k: round(v, 1) for k, v in speed.items()},
              "timed": f"{TIMED_STEPS} steps after {WARMUP_STEPS} of warm-up, batch {len(x)} at "
                       f"{x.shape[-2]}x{x.shape[-1]}",
              "reason": f"{chosen} ran {max(speed.values()) / min(speed.values()):.2f}x the other"}
    log.info("--student-dtype auto: %s (float32 %.0f img/s, bfloat16 %.0f img/s)", chosen, speed["float32"],
             speed["bfloat16"])
    return (torch.bfloat16 if chosen == "bfloat16" else None), record
