"""Distillation losses, registered by name.

Every loss is called as ``loss(student_logits, teacher_logits, labels)`` and returns its parts:
``{"loss": total, "task_loss": hard-label part, "kd_loss": teacher part}`` so all of them are logged.
Each registration carries its defaults; ``make_loss(name, **overrides)`` builds one.
"""

import torch
from torch import nn
from torch.nn import functional as F

from .registry import Registry

LOSSES = Registry("loss")


@LOSSES.register("ce", needs_teacher=False, defaults={},
                 summary="plain cross-entropy on the labels (supervised training, no teacher)")
class CrossEntropy(nn.Module):
    def forward(self, student, teacher, labels):
        task = F.cross_entropy(student, labels)
        return {"loss": task, "task_loss": task, "kd_loss": torch.zeros_like(task)}


@LOSSES.register("kd", needs_teacher=True, defaults={"temperature": 4.0, "alpha": 0.9},
                 summary="Hinton et al. 2015: alpha*T^2*KL(teacher_T || student_T) + (1-alpha)*CE")
class HintonKD(nn.Module):
    """KL between temperature-softened distributions, scaled by T^2 so its gradients keep their size."""

    def __init__(self, temperature=4.0, alpha=0.9):
        super().__init__()
        self.temperature, self.alpha = float(temperature), float(alpha)

    def forward(self, student, teacher, labels):
        t = self.temperature
        task = F.cross_entropy(student, labels)
        kd = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                      reduction="batchmean", log_target=True) * (t * t)
        return {"loss": self.alpha * kd + (1.0 - self.alpha) * task, "task_loss": task, "kd_loss": kd}


@LOSSES.register("seed", needs_teacher=True, defaults={"temperature": 0.5, "alpha": 0.5},
                 summary="the seed article's recipe: CE + 0.5 * soft CE against the teacher's softmax at T=0.5")
class SeedLoss(nn.Module):
    """The article's loss, made to run: CE(student, labels) + alpha * CE(student_T, softmax(teacher/T)).

    As printed, its soft term is ``cross_entropy(log_softmax(s/T), softmax(t/T))`` with T=0.5 and
    weight 0.5, and no T^2 factor; cross_entropy re-applies log_softmax, which leaves log-probabilities
    unchanged, so this is the soft cross-entropy below, on matching batches.
    """

    def __init__(self, temperature=0.5, alpha=0.5):
        super().__init__()
        self.temperature, self.alpha = float(temperature), float(alpha)

    def forward(self, student, teacher, labels):
        t = self.temperature
        task = F.cross_entropy(student, labels)
        soft_targets = F.softmax(teacher / t, dim=1)
        kd = -(soft_targets * F.log_softmax(student / t, dim=1)).sum(dim=1).mean()
        return {"loss": task + self.alpha * kd, "task_loss": task, "kd_loss": kd}


@LOSSES.register("mse", needs_teacher=True, defaults={"alpha": 0.9},
                 summary="logit matching (the article's lambda*||f_S - f_T||^2): alpha*MSE + (1-alpha)*CE")
class LogitMSE(nn.Module):
    """Squared logit difference, averaged over classes and batch (Ba & Caruana's logit regression)."""

    def __init__(self, alpha=0.9):
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, student, teacher, labels):
        task = F.cross_entropy(student, labels)
        kd = F.mse_loss(student, teacher)
        return {"loss": self.alpha * kd + (1.0 - self.alpha) * task, "task_loss": task, "kd_loss": kd}


def make_loss(name, **overrides):
    """The named loss with its registered defaults, overridden by any non-None value given."""
    meta = LOSSES.meta(name)
    params = dict(meta["defaults"])
    params.update({k: v for k, v in overrides.items() if v is not None and k in params})
    return LOSSES.get(name)(**params), params
