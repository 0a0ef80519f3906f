"""The batch-norm trap check: stale running statistics (torchvision's MobileNetV3 after a short run)
make eval mode score near chance; compare with batch statistics and re-estimate them when they disagree."""

import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from ..base.jsonrec import record_dict
from .features import is_batchnorm
from .train_loop import evaluate

log = logging.getLogger(__name__)


BN_TRAP_GAP = 0.10  # eval-mode accuracy this far below batch-statistics accuracy means stale running stats


@dataclass
class BatchNormReport:
    """The check's record (metrics.json's ``batchnorm``): eval-mode against batch-statistics top-1 on a sample of
    training images, and, when the statistics were re-estimated, the figures before and after."""

    train_sample: int
    eval_top1: float
    batchstat_top1: float
    trapped: bool
    recalibrated: bool = False
    test_top1_before: Optional[float] = None
    eval_top1_after: Optional[float] = None
    test_top1_after: Optional[float] = None   # set by the run that reports the model as saved

    def to_json(self) -> Dict[str, Any]:
        return record_dict(self, omit_none=frozenset({"test_top1_before", "eval_top1_after", "test_top1_after"}))


@torch.no_grad()
def recalibrate_bn(model, views, device="cpu", batch_size=256, max_images=10000):
    """Re-estimate every batch-norm layer's running mean/var on un-augmented training images.

    torchvision's MobileNetV3 uses momentum 0.01, so after a short run its running statistics still
    mostly hold their initial values and eval mode scores near chance; a cumulative average over
    the training images (momentum None) fixes that without touching any weight.
    """
    bns = [m for m in model.modules() if is_batchnorm(m)]
    if not bns:
        return model
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    seen = 0
    for x, _, _ in views.batches(batch_size):
        model(x.to(device))
        seen += len(x)
        if seen >= max_images:
            break
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.train(was_training)
    return model


CHUNK = 256  # images decoded and run at once: batch statistics over 256 images, memory bounded at any input size


@torch.no_grad()
def _top1(model, chunks, device, batch_stats=False):
    """Eval-mode top-1 over the chunks, each chunk decoded once; with ``batch_stats`` also (as a pair) the top-1
    with each chunk's batch statistics (train-mode BN). The running statistics a train-mode forward moves are
    put back after every chunk, so each eval-mode answer sees the model as it was."""
    state = {k: v.clone() for k, v in model.state_dict().items()} if batch_stats else None
    right_eval = right_batch = total = 0
    for x, y in chunks():
        x, y = x.to(device), y.to(device)
        model.eval()
        right_eval += (model(x).argmax(1) == y).sum().item()
        if state is not None:
            model.train()
            right_batch += (model(x).argmax(1) == y).sum().item()
            model.load_state_dict(state)
        total += len(y)
    model.eval()
    total = max(total, 1)
    return (right_eval / total, right_batch / total) if batch_stats else right_eval / total


def check_batchnorm(model: Any, run: Any, cfg: Any, sample: int = 2000) -> Optional[BatchNormReport]:
    """The batch-norm trap check: compare eval-mode with batch-statistics accuracy on training images.

    A gap over BN_TRAP_GAP means the running statistics do not describe the data; with
    cfg.bn_recalibrate 'auto' they are then re-estimated ('always': every time, 'never': only reported).
    Decided on training images only, never on the test split.
    """
    if not any(is_batchnorm(m) for m in model.modules()):
        return None
    device = cfg.device
    # A fixed random sample: folder data is class-sorted, and batches of one class would give
    # batch statistics that describe no real batch.
    labelled = run.train.labelled()  # accuracy needs labels: unlabelled images (--unlabeled) stay out
    idx = torch.randperm(len(labelled), generator=torch.Generator().manual_seed(0))[:sample]

    def chunks():  # decoded a chunk at a time: 2,000 images at 224 px would be 1.2 GB at once, more in the model
        for start in range(0, len(idx), CHUNK):
            yield labelled.batch(idx[start:start + CHUNK])

    eval_top1, batch_top1 = _top1(model, chunks, device, batch_stats=True)
    trapped = eval_top1 < batch_top1 - BN_TRAP_GAP
    mode = cfg.bn_recalibrate
    report = BatchNormReport(len(idx), eval_top1, batch_top1, trapped)
    if trapped:
        log.warning("batch-norm trap: eval-mode top-1 %.3f vs %.3f with batch statistics on training images",
                    eval_top1, batch_top1)
    if mode == "always" or (mode == "auto" and trapped):
        report.test_top1_before = evaluate(model, run.test, device, dist=run.dist)
        recalibrate_bn(model, run.train, device)
        report.eval_top1_after = _top1(model, chunks, device)
        report.recalibrated = True
    model.eval()
    return report
