"""Function matching (Beyer et al. 2022, "Knowledge distillation: a good teacher is patient and consistent"):
mixup or cutmix of training views, the student learning the teacher's answer for the mixed picture.

Pairs and ratios are drawn per image, not per batch: image ``i``'s partner and mixing ratio in view ``v``
come from a generator seeded by (augmentation seed, v) alone. The mixed picture of image ``i`` is therefore
the same whatever batch, shuffle, batch size or torchrun rank it lands in, so the teacher cache can hold the
teacher's answer for it under image ``i`` (the cache's key holds the mix settings through
AugmentPlan.describe) and a cached run equals a live one. The price: each batch also loads its images'
partners (from memory, or decoded from the files, where an image store keeps that cheap).

The cross-entropy part, where labels exist, is the usual mixed-label rule
``lam * CE(y_a) + (1 - lam) * CE(y_b)``, averaged over the mixed pictures whose two sides are both
labelled. A picture with an unlabelled side gets the teacher term only: weighting only its labelled side
would teach the student that a picture that is partly something else is, with weight lam, only its
labelled class, which is the teacher's job to say. ``lam`` is the picture's own share: the ratio drawn for
mixup, the area left uncovered for cutmix (timm's corrected lambda, at the student's size).

The epoch's ``train_top1`` (and ``teacher_train_top1``) under mixing count the argmax against each mixed
picture's own first label: a rough figure only; test top-1 is measured on unmixed test views as always.

Mixing is applied to the normalised float views; normalisation is affine, so this equals mixing pixels.
The student's and the teacher's views of one picture are mixed with the same partner and ratio, and a
cutmix box is one box in relative coordinates, cut at each view's own resolution.
"""

import logging
from typing import Any, Dict, Optional, Tuple

import torch
from torch.nn import functional as F

from .. import EdgeKDError
from .losses import UNLABELED, DecoupledKD, FitNetHint, HintonKD, LogitMSE, SeedLoss

log = logging.getLogger(__name__)

MIXES = ("none", "mixup", "cutmix")
# Beta(1, 1): ratios uniform in 0..1, the strong mixing function matching relies on (Beyer et al. used mixup
# and cutmix at full strength); a smaller alpha keeps most pictures close to one image.
DEFAULT_ALPHA = 1.0


class MixPlan:
    """Partners, ratios and cutmix boxes of every image in every view, from (seed, view) alone."""

    def __init__(self, kind: str, alpha: float, seed: int, targets: Any) -> None:
        if kind not in MIXES or kind == "none":
            raise EdgeKDError(f"--mix {kind!r}: choose from {', '.join(MIXES)}")
        if not alpha > 0:  # also refuses NaN
            raise EdgeKDError(f"--mix-alpha {alpha!r}: expected a positive number (Beta(alpha, alpha) strength)")
        self.kind, self.alpha, self.seed = kind, float(alpha), int(seed)
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self._view: Optional[int] = None
        self._draw: Tuple[torch.Tensor, torch.Tensor, torch.Tensor] = (torch.empty(0), torch.empty(0), torch.empty(0))

    def describe(self) -> Dict[str, Any]:
        """The mix settings, for metrics.json and the teacher cache's key."""
        return {"kind": self.kind, "alpha": self.alpha, "pairs": "per image from (aug seed, view)"}

    def draw(self, view: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(partner, lam, box) of every image in ``view``: partner indices, drawn ratios, and for cutmix the box
        as (top, left, bottom, right) fractions of the picture."""
        import numpy as np

        if self._view != view:
            n = len(self.targets)
            rng = np.random.default_rng([self.seed, int(view), 0x6D6978])  # "mix": apart from the crop draws
            partner = torch.from_numpy(rng.permutation(n))
            lam = torch.from_numpy(rng.beta(self.alpha, self.alpha, n)).float()
            centre = torch.from_numpy(rng.random((n, 2))).float()
            half = (1.0 - lam).clamp_min(0).sqrt() / 2  # a box of area 1 - lam, the picture's shape
            box = torch.stack([centre[:, 0] - half, centre[:, 1] - half, centre[:, 0] + half, centre[:, 1] + half], 1)
            self._view, self._draw = view, (partner, lam, box.clamp(0, 1))
        return self._draw

    def partners(self, view: int, idx: Any) -> torch.Tensor:
        """The partner of each image ``idx`` in ``view``."""
        return self.draw(view)[0][torch.as_tensor(idx, dtype=torch.long)]

    def lam(self, view: int, idx: Any, size: Tuple[int, int]) -> torch.Tensor:
        """Each picture's own share at (height, width) ``size``: the ratio (mixup), the uncovered area (cutmix)."""
        _, lam, box = self.draw(view)
        idx = torch.as_tensor(idx, dtype=torch.long)
        if self.kind == "mixup":
            return lam[idx]
        rows = [_pixel_box(b, size) for b in box[idx]]
        covered = torch.tensor([(y1 - y0) * (x1 - x0) for y0, x0, y1, x1 in rows], dtype=torch.float32)
        return 1.0 - covered / (size[0] * size[1])

    def mix(self, x: torch.Tensor, xp: torch.Tensor, view: int, idx: Any) -> torch.Tensor:
        """``x`` mixed with its partners' views ``xp`` (same shape), for the images ``idx`` of ``view``."""
        _, lam, box = self.draw(view)
        idx = torch.as_tensor(idx, dtype=torch.long)
        if self.kind == "mixup":
            w = lam[idx].to(x.dtype).view(-1, 1, 1, 1)
            return w * x + (1 - w) * xp
        out = x.clone()
        for k, b in enumerate(box[idx]):
            y0, x0, y1, x1 = _pixel_box(b, x.shape[-2:])
            out[k, :, y0:y1, x0:x1] = xp[k, :, y0:y1, x0:x1]
        return out


def attach_mix(views: Any, kind: Optional[str], alpha: Optional[float]) -> Optional[MixPlan]:
    """Mix ``views``' training batches from now on (--mix; nothing for none). Returns the MixPlan or None."""
    if kind in (None, "none"):
        return None
    if views.plan is None:
        raise EdgeKDError("--mix needs an augmentation plan")
    views.plan.mix = MixPlan(kind, DEFAULT_ALPHA if alpha is None else alpha, views.plan.seed, views.targets)
    log.info("function matching: %s, Beta(%g, %g) ratios, partners per image from the augmentation seed", kind,
             views.plan.mix.alpha, views.plan.mix.alpha)
    return views.plan.mix


def _pixel_box(box: torch.Tensor, size: Any) -> Tuple[int, int, int, int]:
    h, w = int(size[0]), int(size[1])
    y0, x0, y1, x1 = box.tolist()
    return round(y0 * h), round(x0 * w), round(y1 * h), round(x1 * w)


def with_partners(mix: MixPlan, view: int, idx: Any) -> torch.Tensor:
    """The indices to load for a batch ``idx``: the batch, then the partners not in it."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    partner = mix.partners(view, idx)
    extra = partner[~torch.isin(partner, idx)].unique()
    return torch.cat([idx, extra])


def mix_loaded(mix: MixPlan, view: int, wanted: Any, x: torch.Tensor, xt: Optional[torch.Tensor], y: torch.Tensor,
               idx: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Mix a loaded batch: ``idx`` (with partners, survivors of unreadable files) -> the ``wanted`` images that
    survived, each mixed with its partner (itself when the partner's file was unreadable)."""
    row = {int(i): k for k, i in enumerate(idx.tolist())}
    keep = [int(i) for i in torch.as_tensor(wanted).tolist() if int(i) in row]
    if not keep:
        return x[:0], None if xt is None else xt[:0], y[:0], idx[:0]
    me = torch.tensor([row[i] for i in keep])
    them = torch.tensor([row.get(int(p), row[i]) for i, p in zip(keep, mix.partners(view, keep).tolist())])
    kept = torch.tensor(keep, dtype=torch.long)
    xm = mix.mix(x[me], x[them], view, kept)
    xtm = None if xt is None else mix.mix(xt[me], xt[them], view, kept)
    return xm, xtm, y[me], idx[me]


def task_weight(loss_fn: Any) -> float:
    """The weight each loss gives its cross-entropy term (edgekd.core.losses' formulas)."""
    if isinstance(loss_fn, (HintonKD, LogitMSE)):
        return 1.0 - loss_fn.alpha
    if isinstance(loss_fn, DecoupledKD):
        return loss_fn.ce_weight
    if isinstance(loss_fn, (SeedLoss, FitNetHint)):
        return 1.0
    raise EdgeKDError(f"--mix does not know how {type(loss_fn).__name__} weighs its cross-entropy term")


def mixed_loss(loss_fn: Any, mix: MixPlan, view: int, size: Tuple[int, int], s_logits: torch.Tensor,
               t_logits: Optional[torch.Tensor], y: torch.Tensor, idx: torch.Tensor,
               **extra: Any) -> Dict[str, torch.Tensor]:
    """The loss's parts for mixed pictures: its teacher term on the mixed picture (labels withheld: a mixed
    picture has no single true class) plus the mixed-label cross-entropy where both sides are labelled."""
    parts = dict(loss_fn(s_logits, t_logits, torch.full_like(y, UNLABELED), **extra))
    idx = idx.cpu()
    y_b = mix.targets[mix.partners(view, idx)].to(y.device)
    lam = mix.lam(view, idx, size).to(s_logits.device)  # size: the student's (height, width)
    both = (y >= 0) & (y_b >= 0)
    if both.any():
        smooth = loss_fn.label_smoothing
        ce_a = F.cross_entropy(s_logits[both], y[both], reduction="none", label_smoothing=smooth)
        ce_b = F.cross_entropy(s_logits[both], y_b[both], reduction="none", label_smoothing=smooth)
        task = (lam[both] * ce_a + (1 - lam[both]) * ce_b).mean()
    else:
        task = s_logits.sum() * 0.0
    return {**parts, "loss": parts["loss"] + task_weight(loss_fn) * task, "task_loss": task}
