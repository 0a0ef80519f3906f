"""The training loop behind ``edgekd train`` (supervised) and ``edgekd distill`` (student vs teacher)."""

import json
import logging
import os
import random
import time

import torch
from torch import nn

from . import EdgeKDError
from .checkpoint import atomic_write, load_model, save_checkpoint
from .data import load_data, make_loader
from .losses import LOSSES, make_loss
from .models import build_model, count_flops, count_params

log = logging.getLogger(__name__)


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


class FrozenTeacher(nn.Module):
    """A teacher in eval mode with no gradients, re-normalising inputs made for the student.

    When teacher and student were trained with different mean/std, the student's normalised batch
    is mapped back to pixels and normalised the teacher's way, so the teacher sees what it expects.
    """

    def __init__(self, model, teacher_input, student_input):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        shape = (1, -1, 1, 1)
        self.renorm = (teacher_input.mean, teacher_input.std) != (student_input.mean, student_input.std)
        self.register_buffer("s_mean", torch.tensor(student_input.mean).view(shape))
        self.register_buffer("s_std", torch.tensor(student_input.std).view(shape))
        self.register_buffer("t_mean", torch.tensor(teacher_input.mean).view(shape))
        self.register_buffer("t_std", torch.tensor(teacher_input.std).view(shape))

    def train(self, mode=True):  # the teacher never leaves eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, x):
        if self.renorm:
            x = (x * self.s_std + self.s_mean - self.t_mean) / self.t_std
        return self.model(x)


@torch.no_grad()
def evaluate(model, loader, device="cpu"):
    """Top-1 accuracy on a loader."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        pred = model(x.to(device)).argmax(1).cpu()
        correct += (pred == y).sum().item()
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


def make_optimizer(model, cfg):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    raise EdgeKDError(f"unknown optimizer {cfg['optimizer']!r}: choose from adamw, sgd")


def make_scheduler(optimizer, cfg, steps):
    """Per-step schedule: cosine decay to zero (default) or the article's constant rate."""
    if cfg.get("schedule", "cosine") == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def fit(model, data, loss_fn, cfg, teacher=None, desc="train"):
    """Train ``model`` for cfg['epochs'] epochs; evaluate on the test split after each. Returns the history."""
    from tqdm import tqdm

    device = cfg["device"]
    model.to(device).train()
    if teacher is not None:
        teacher.to(device)
    train_loader = make_loader(data.train, cfg["batch_size"], shuffle=True, workers=cfg["workers"], seed=cfg["seed"])
    test_loader = make_loader(data.test, 256, workers=cfg["workers"])
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps=cfg["epochs"] * len(train_loader))
    history = []
    for epoch in range(1, cfg["epochs"] + 1):
        sums, seen, start = {"loss": 0.0, "task_loss": 0.0, "kd_loss": 0.0}, 0, time.perf_counter()
        bar = tqdm(train_loader, desc=f"{desc} {epoch}/{cfg['epochs']}", unit="batch", leave=True,
                   disable=not cfg.get("progress", True), dynamic_ncols=True)
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            t_logits = teacher(x) if teacher is not None else None
            parts = loss_fn(model(x), t_logits, y)
            if not torch.isfinite(parts["loss"]):
                raise EdgeKDError(f"{desc}: loss became {parts['loss'].item()} in epoch {epoch}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            optimizer.step()
            scheduler.step()
            seen += len(y)
            for k in sums:
                sums[k] += parts[k].item() * len(y)
            rate = seen / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}", task=f"{sums['task_loss'] / seen:.3f}",
                            kd=f"{sums['kd_loss'] / seen:.3f}", ips=f"{rate:.0f}")
        seconds = time.perf_counter() - start
        top1 = evaluate(model, test_loader, device)
        record = {"epoch": epoch, **{k: v / max(seen, 1) for k, v in sums.items()},
                  "test_top1": top1, "images_per_s": seen / seconds, "seconds": seconds}
        history.append(record)
        log.info("%s epoch %d: loss %.4f, test top-1 %.4f", desc, epoch, record["loss"], top1)
        if cfg.get("progress", True):
            print(f"{desc} {epoch}/{cfg['epochs']}: loss {record['loss']:.4f}  test top-1 {top1:.4f}  "
                  f"({record['images_per_s']:.0f} img/s)", flush=True)
    return history


def _write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, write)


def _save_config(out, cfg):
    import yaml

    def write(tmp):
        with open(tmp, "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=True)

    atomic_write(os.path.join(out, "config.yaml"), write)


def _summary(spec, epochs, history, model, data):
    return {"model": spec, "epochs": epochs, "test_top1": history[-1]["test_top1"] if history else None,
            "best_top1": max((h["test_top1"] for h in history), default=None), "history": history,
            "params": count_params(model), "flops": count_flops(model, data.input), "data": data.spec}


def _save(path, model, spec, data, metrics, cfg):
    return save_checkpoint(path, model, spec=spec, classes=data.classes, input_spec=data.input,
                           data_spec=data.spec, metrics=metrics, config=cfg)


def run_train(cfg):
    """``edgekd train``: supervised training of one model. Writes model.pt, metrics.json, config.yaml."""
    seed_everything(cfg["seed"])
    data = load_data(cfg["data"], cfg.get("data_root"))
    model = build_model(cfg["model"], len(data.classes), data.input)
    _save_config(cfg["out"], cfg)
    loss_fn, _ = make_loss("ce")
    history = fit(model, data, loss_fn, cfg, desc=cfg["model"])
    metrics = _summary(cfg["model"], cfg["epochs"], history, model, data)
    _save(os.path.join(cfg["out"], "model.pt"), model, cfg["model"], data, metrics, cfg)
    _write_json(os.path.join(cfg["out"], "metrics.json"), metrics)
    return metrics


def _teacher(cfg, data):
    """Load the teacher checkpoint, or train the teacher spec on the same data first."""
    spec = cfg["teacher"]
    if os.path.isfile(spec):
        model, ckpt = load_model(spec)
        if len(ckpt["classes"]) != len(data.classes):
            raise EdgeKDError(f"teacher {spec!r} has {len(ckpt['classes'])} classes but the data has {len(data.classes)}")
        from .data import InputSpec

        t_in = InputSpec.from_dict(ckpt["input"])
        if (t_in.channels, t_in.height, t_in.width) != (data.input.channels, data.input.height, data.input.width):
            raise EdgeKDError(f"teacher {spec!r} takes {t_in.channels}x{t_in.height}x{t_in.width} inputs but the data "
                              f"gives {data.input.channels}x{data.input.height}x{data.input.width}")
        metrics = dict(ckpt.get("metrics") or {})
        metrics.update(source=os.path.abspath(spec), model=ckpt["model"])
        return model, t_in, metrics
    model = build_model(spec, len(data.classes), data.input)
    loss_fn, _ = make_loss("ce")
    epochs = cfg["teacher_epochs"] or cfg["epochs"]
    history = fit(model, data, loss_fn, {**cfg, "epochs": epochs}, desc=f"teacher {spec}")
    metrics = _summary(spec, epochs, history, model, data)
    metrics["source"] = "trained"
    _save(os.path.join(cfg["out"], "teacher.pt"), model, spec, data, metrics, cfg)
    return model.eval(), data.input, metrics


def run_distill(cfg):
    """``edgekd distill``: train the student against the teacher. Writes student.pt, metrics.json, config.yaml."""
    if not LOSSES.meta(cfg["loss"])["needs_teacher"]:
        raise EdgeKDError(f"loss {cfg['loss']!r} uses no teacher; use `edgekd train` or one of "
                          + ", ".join(n for n in LOSSES.names() if LOSSES.meta(n)["needs_teacher"]))
    seed_everything(cfg["seed"])
    data = load_data(cfg["data"], cfg.get("data_root"))
    student = build_model(cfg["student"], len(data.classes), data.input)
    loss_fn, loss_params = make_loss(cfg["loss"], temperature=cfg.get("temperature"), alpha=cfg.get("alpha"))
    _save_config(cfg["out"], {**cfg, "loss_params": loss_params})
    teacher_model, teacher_input, teacher_metrics = _teacher(cfg, data)
    teacher = FrozenTeacher(teacher_model, teacher_input, data.input)
    seed_everything(cfg["seed"])  # the student's run does not depend on whether a teacher was trained
    history = fit(student, data, loss_fn, cfg, teacher=teacher, desc=f"student {cfg['student']}")
    metrics = _summary(cfg["student"], cfg["epochs"], history, student, data)
    metrics.update(loss=cfg["loss"], loss_params=loss_params, teacher={
        k: teacher_metrics.get(k) for k in ("model", "source", "epochs", "test_top1", "params", "flops", "history")})
    _save(os.path.join(cfg["out"], "student.pt"), student, cfg["student"], data, metrics, cfg)
    _write_json(os.path.join(cfg["out"], "metrics.json"), metrics)
    return metrics
