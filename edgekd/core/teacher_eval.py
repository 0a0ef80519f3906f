"""The teacher's test top-1 on its own view: each test picture decoded from the file at the
teacher's input size (the evaluation geometry: shorter side to size / crop_pct, center crop), as training now feeds
it, beside the figure on the student's view resized to the teacher's input. A 224 px teacher scored 1.6 points
lower on a 64 px student's view upsampled than on its own on photos: the second figure is the teacher's."""

import logging
from typing import Any, Dict

import torch

from .stream import StreamViews

log = logging.getLogger(__name__)

STUDENT_VIEW = "test_top1: the student's test view (its input size) resized to the teacher's input"
OWN_VIEW = ("test_top1_own_view: each test picture decoded at the teacher's own input size from the full "
            "picture, as training feeds the teacher")


@torch.no_grad()
def own_view_top1(teacher: Any, data: Any, cfg: Any, ctx: Any) -> Dict[str, Any]:
    """{"test_top1_own_view", "test_top1_views"} for metrics.json's teacher record; the own view equals the
    student's view when the sizes are equal (then no second pass)."""
    size = tuple(teacher.loaded.size)
    if size == (data.input.height, data.input.width):
        return {"test_top1_own_view": teacher.metrics.get("test_top1"),
                "test_top1_views": "the teacher's input is the student's: one view"}
    views = StreamViews.of([(data.test, None, None)], data.input, None, workers=cfg.workers,
                           skip_bad=cfg.skip_bad_images, desc="teacher test view")
    views.set_teacher_size(size)
    shard = (ctx.rank, ctx.world_size) if ctx.enabled else None
    correct = seen = 0
    teacher.to(cfg.device)
    for x, xt, y, _ in views.batches(128, shard=shard, teacher_view=True):
        pred = teacher((xt if xt is not None else x).to(cfg.device)).argmax(1).cpu()
        correct, seen = correct + (pred == y).sum().item(), seen + len(y)
    if shard is not None:
        correct, seen = ctx.all_reduce_sum(torch.tensor([correct, seen], dtype=torch.float64)).tolist()
    if hasattr(teacher, "take_seconds"):
        teacher.take_seconds()  # not a training step's teacher time
    top1 = correct / max(seen, 1)
    log.info("teacher test top-1 on its own %dx%d view: %.4f", size[0], size[1], top1)
    return {"test_top1_own_view": top1, "test_top1_views": [STUDENT_VIEW, OWN_VIEW]}
