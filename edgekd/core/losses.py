"""Distillation losses, registered by name.

Every loss is called as ``loss(student_logits, teacher_logits, labels)`` and returns its parts:
``{"loss": total, "task_loss": hard-label part, "kd_loss": teacher part}`` so all of them are logged.
Each registration carries its defaults; ``make_loss(name, **overrides)`` builds one.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import EdgeKDError
from ..base.registry import Registry

LOSSES = Registry("loss")
# What each loss registers beside its class (LossInfo reads them): whether it needs a teacher, feature maps,
# its parameters with their defaults, and a line of help.
REGISTERED = ("needs_teacher", "needs_features", "defaults", "summary")
Parts = Dict[str, Tensor]  # the loss and its parts: loss, task_loss, kd_loss, ...
UNLABELED = -1  # the label of an unlabelled image (--unlabeled): it gets the teacher term only


@dataclass(frozen=True)
class LossInfo:
    """What a registered loss needs and takes (its registration's metadata, read in one place)."""

    name: str
    needs_teacher: bool
    needs_features: bool                # feature hooks on student and teacher (fitnet)
    defaults: Dict[str, Any]            # its parameters and their defaults
    summary: str

    @classmethod
    def of(cls, name: str) -> "LossInfo":
        """The loss registered as ``name`` (EdgeKDError naming the losses there are)."""
        meta = LOSSES.meta(name)  # the keyword arguments of its registration
        needs_teacher, needs_features, defaults, summary = (meta.get(k) for k in REGISTERED)
        return cls(name, bool(needs_teacher), bool(needs_features), dict(defaults or {}), str(summary or ""))


class _Loss(nn.Module):
    """Base: the hard-label term, with optional label smoothing (set by make_loss)."""

    label_smoothing = 0.0

    def task(self, student: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy averaged over the labelled samples only; 0 for a batch with none (still a graph
        node, so a loss made only of it can be back-propagated)."""
        if not (labels != UNLABELED).any():
            return student.sum() * 0.0
        return F.cross_entropy(student, labels, ignore_index=UNLABELED, label_smoothing=self.label_smoothing)


@LOSSES.register("ce", needs_teacher=False, defaults={},
                 summary="plain cross-entropy on the labels (supervised training, no teacher)")
class CrossEntropy(_Loss):
    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor, **_: Any) -> Parts:
        task = self.task(student, labels)
        return {"loss": task, "task_loss": task, "kd_loss": torch.zeros_like(task)}


@LOSSES.register("kd", needs_teacher=True, defaults={"temperature": 4.0, "alpha": 0.9},
                 summary="Hinton et al. 2015: alpha*T^2*KL(teacher_T || student_T) + (1-alpha)*CE")
class HintonKD(_Loss):
    """KL between temperature-softened distributions, scaled by T^2 so its gradients keep their size."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        self.temperature, self.alpha = float(temperature), float(alpha)

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor, **_: Any) -> Parts:
        t = self.temperature
        task = self.task(student, labels)
        kd = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                      reduction="batchmean", log_target=True) * (t * t)
        return {"loss": self.alpha * kd + (1.0 - self.alpha) * task, "task_loss": task, "kd_loss": kd}


@LOSSES.register("seed", needs_teacher=True, defaults={"temperature": 0.5, "alpha": 0.5},
                 summary="the seed article's recipe: CE + 0.5 * soft CE against the teacher's softmax at T=0.5")
class SeedLoss(_Loss):
    """The article's loss, made to run: CE(student, labels) + alpha * CE(student_T, softmax(teacher/T)).

    As printed, its soft term is ``cross_entropy(log_softmax(s/T), softmax(t/T))`` with T=0.5 and
    weight 0.5, and no T^2 factor; cross_entropy re-applies log_softmax, which leaves log-probabilities
    unchanged, so this is the soft cross-entropy below, on matching batches.
    """

    def __init__(self, temperature: float = 0.5, alpha: float = 0.5) -> None:
        super().__init__()
        self.temperature, self.alpha = float(temperature), float(alpha)

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor, **_: Any) -> Parts:
        t = self.temperature
        task = self.task(student, labels)
        soft_targets = F.softmax(teacher / t, dim=1)
        kd = -(soft_targets * F.log_softmax(student / t, dim=1)).sum(dim=1).mean()
        return {"loss": task + self.alpha * kd, "task_loss": task, "kd_loss": kd}


@LOSSES.register("mse", needs_teacher=True, defaults={"alpha": 0.9},
                 summary="logit matching (the article's lambda*||f_S - f_T||^2): alpha*MSE + (1-alpha)*CE")
class LogitMSE(_Loss):
    """Squared logit difference, averaged over classes and batch (Ba & Caruana's logit regression)."""

    def __init__(self, alpha: float = 0.9) -> None:
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor, **_: Any) -> Parts:
        task = self.task(student, labels)
        kd = F.mse_loss(student, teacher)
        return {"loss": self.alpha * kd + (1.0 - self.alpha) * task, "task_loss": task, "kd_loss": kd}


@LOSSES.register("dkd", needs_teacher=True,
                 defaults={"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "ce_weight": 1.0, "warmup": 20},
                 summary="Decoupled KD (Zhao et al. 2022): CE + alpha*TCKD + beta*NCKD, ramped in over warmup epochs")
class DecoupledKD(_Loss):
    """DKD splits KD into the target-class term (TCKD: binary KL on p_target vs the rest) and the
    non-target term (NCKD: KL between the distributions over the non-target classes), and weighs
    them separately, because in plain KD NCKD is suppressed by the teacher's confidence.

    Paper defaults for CIFAR-100: alpha 1, beta 8, T 4, CE weight 1, and the KD part ramped in
    linearly over the first 20 of 240 epochs (``warmup``, in epochs; ``set_epoch`` drives it).
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, ce_weight: float = 1.0,
                 warmup: float = 20) -> None:
        super().__init__()
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)
        self.ce_weight, self.warmup, self.epoch = float(ce_weight), float(warmup), 1.0

    def set_epoch(self, epoch: float) -> None:
        self.epoch = epoch

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor, **_: Any) -> Parts:
        t = self.temperature
        task = self.task(student, labels)
        # An unlabelled image has no true class to split target from non-target: the teacher's top class
        # stands in for it (its pseudo-label), which for a labelled image the teacher gets right is the same.
        target = torch.where(labels == UNLABELED, teacher.argmax(1), labels)
        gt = F.one_hot(target, student.shape[1]).bool()
        p_s, p_t = F.softmax(student / t, dim=1), F.softmax(teacher / t, dim=1)
        # TCKD: KL between the binary distributions (p_target, 1 - p_target).
        b_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], dim=1)
        b_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], dim=1)
        tckd = (b_t * (b_t.clamp_min(1e-12).log() - b_s.clamp_min(1e-12).log())).sum(1).mean() * t * t
        # NCKD: KL over the non-target classes only (the target logit pushed to -inf by a large offset).
        mask = gt * 1000.0
        log_q_s = F.log_softmax(student / t - mask, dim=1)
        q_t = F.softmax(teacher / t - mask, dim=1)
        nckd = (q_t * (q_t.clamp_min(1e-12).log() - log_q_s) * ~gt).sum(1).mean() * t * t
        ramp = min(self.epoch / self.warmup, 1.0) if self.warmup > 0 else 1.0
        kd = ramp * (self.alpha * tckd + self.beta * nckd)
        return {"loss": self.ce_weight * task + kd, "task_loss": task, "kd_loss": kd, "tckd": tckd, "nckd": nckd}


@LOSSES.register("fitnet", needs_teacher=True, needs_features=True,
                 defaults={"beta": 100.0, "student_layer": "auto", "teacher_layer": "auto", "temperature": 4.0,
                           "alpha": 0.0},
                 summary="FitNets (Romero et al. 2015) hint: CE + beta*MSE(adapter(student layer), teacher layer)")
class FitNetHint(_Loss):
    """A hint on intermediate features: the student's chosen layer, through a learned 1x1 conv + BN
    adapter (which also maps channel counts; feature maps are resized when sizes differ), regresses
    the teacher's layer.

    Defaults follow the CRD benchmark's one-stage FitNet: beta 100 on the mean squared error, hint at
    a middle stage. ``alpha`` > 0 adds the Hinton KD term on logits (0 by default: a pure hint).
    """

    def __init__(self, beta: float = 100.0, student_layer: str = "auto", teacher_layer: str = "auto",
                 temperature: float = 4.0, alpha: float = 0.0) -> None:
        super().__init__()
        self.beta, self.temperature, self.alpha = float(beta), float(temperature), float(alpha)
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.adapter: Optional[nn.Module] = None

    def build_adapter(self, s_shape: Sequence[int], t_shape: Sequence[int]) -> None:
        """Create the adapter for these feature shapes (called once, before the optimizer is made).

        FitNets always regresses through a learned layer: even when shapes match, asking the
        student's own features to equal the teacher's is a far stronger constraint than a hint.
        """
        self.adapter = nn.Sequential(nn.Conv2d(s_shape[1], t_shape[1], 1, bias=False), nn.BatchNorm2d(t_shape[1]))

    def forward(self, student: Tensor, teacher: Tensor, labels: Tensor,
                features: Optional[Tuple[Tensor, Tensor]] = None, **_: Any) -> Parts:
        task = self.task(student, labels)
        if features is None or self.adapter is None:  # fit() taps both layers and builds the adapter: our bug
            raise RuntimeError("fitnet needs the tapped features and build_adapter() before the first step")
        s_feat, t_feat = features
        s_feat = self.adapter(s_feat)
        if s_feat.shape[-2:] != t_feat.shape[-2:]:
            s_feat = F.interpolate(s_feat, size=t_feat.shape[-2:], mode="bilinear", align_corners=False)
        hint = F.mse_loss(s_feat, t_feat)
        kd = self.beta * hint
        parts = {"hint": hint}
        if self.alpha > 0:
            t = self.temperature
            logit_kd = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean",
                                log_target=True) * t * t
            kd = kd + self.alpha * logit_kd
            parts.update(logit_kd=logit_kd)
        return {"loss": task + kd, "task_loss": task, "kd_loss": kd, **parts}


def _flag(param: str) -> str:
    return {"warmup": "--dkd-warmup"}.get(param, "--" + param.replace("_", "-"))


def _and(items: List[str]) -> str:
    return " and ".join(items) if len(items) < 3 else ", ".join(items[:-1]) + " and " + items[-1]


def check_options(name: str, given: Dict[str, Any]) -> None:
    """Refuse options the loss does not use (``given``: parameter name -> value, None for not given),
    so that ``--loss kd --beta 5`` is an error rather than a silently ignored value."""
    defaults = LossInfo.of(name).defaults
    takes = [k for k in defaults if k != "ce_weight"]  # ce_weight has no option
    unused = [k for k, v in given.items() if v is not None and k not in defaults]
    if unused:
        offered = f"takes {_and([_flag(k) for k in takes])}" if takes else "takes no options"
        raise EdgeKDError(f"--loss {name} {offered}; it does not use {_and([_flag(k) for k in unused])}")


def make_loss(name: str, label_smoothing: Optional[float] = 0.0, **overrides: Any) -> Tuple[nn.Module, Dict[str, Any]]:
    """The named loss with its registered defaults, overridden by any non-None value given; a value
    for an option the loss does not take is refused."""
    check_options(name, overrides)
    params = LossInfo.of(name).defaults
    params.update({k: v for k, v in overrides.items() if v is not None})
    loss = LOSSES.get(name)(**params)
    loss.label_smoothing = float(label_smoothing or 0.0)
    return loss, params
