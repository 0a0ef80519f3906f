"""``edgekd train`` (supervised) and ``edgekd distill`` (student vs teacher): data, models, teacher, and
what each run writes. The loop itself is in train_loop.py, the batch-norm check in batchnorm.py."""

import json
import logging
import os

import torch

from .. import EdgeKDError
from . import teachers
from .batchnorm import check_batchnorm
from .checkpoint import atomic_write, save_checkpoint
from .data import load_data
from .losses import LOSSES, UNLABELED, make_loss
from .models import (build_pretrained, check_student, count_flops, count_params,
                     fetch_pretrained, pretrained_norm)
from .teachers import FrozenTeacher  # noqa: F401  (its old home; tests and scripts import it from here)
from .train_loop import TrainRun, evaluate, fit, seed_everything

log = logging.getLogger(__name__)


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


def _finish(model, run, cfg, metrics):
    """Batch-norm check (and re-estimation); the reported last-epoch figure is the model as saved."""
    bn = check_batchnorm(model, run, cfg)
    if bn is not None:
        metrics["batchnorm"] = bn
        if bn["recalibrated"]:
            metrics["test_top1"] = evaluate(model, run.test, cfg["device"], dist=run.dist)
            bn["test_top1_after"] = metrics["test_top1"]
    return metrics


def _save(path, model, spec, data, metrics, cfg):
    return save_checkpoint(path, model, spec=spec, classes=data.classes, input_spec=data.input,
                           data_spec=data.spec, metrics=metrics, config=cfg)


def _parse_stats(text, channels):
    """'M1,M2,M3/S1,S2,S3' (or one value each) -> (mean, std) lists."""
    try:
        mean_text, std_text = text.split("/")
        mean = [float(v) for v in mean_text.split(",")]
        std = [float(v) for v in std_text.split(",")]
    except ValueError:
        raise EdgeKDError(f"--norm {text!r}: use auto, train, seed or MEAN/STD such as 0.49,0.48,0.45/0.25,0.24,0.26") from None
    mean, std = (mean * channels if len(mean) == 1 else mean), (std * channels if len(std) == 1 else std)
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise EdgeKDError(f"--norm {text!r}: need {channels} means and {channels} positive stds")
    return mean, std


def prepare_data(cfg, input_spec=None, pretrained=None):
    """Load the data spec, decode the (subset of the) train split and the test split into memory,
    settle the normalisation (from the train split unless given; a pretrained student's own with
    ``pretrained`` = (mean, std, source) and --norm auto), and build the augmentation plan.

    With cfg['unlabeled'] the images of that folder join the training views after the labelled ones,
    with label edgekd.losses.UNLABELED (teacher term only)."""
    from .augment import AugmentPlan, Views, decode_split, stratified_subset

    data = load_data(cfg["data"], cfg.get("data_root"), input_spec=input_spec)
    progress, workers = cfg.get("progress", True), cfg.get("workers", 0)
    subset = None
    if cfg.get("train_subset"):
        subset = stratified_subset(_targets(data.train), cfg["train_subset"], seed=cfg.get("subset_seed", 0))
    skip = cfg.get("skip_bad_images", False)
    train_images, train_labels = decode_split(data.train, data.input, subset, workers, "decode train", progress, skip)
    skipped = list(decode_split.skipped)
    test_images, test_labels = decode_split(data.test, data.input, None, workers, "decode test", progress, skip)
    data.skipped_images = skipped + list(decode_split.skipped)
    data.norm_source = _settle_norm(data, cfg, input_spec, train_images, pretrained)
    data.labelled_images, data.unlabeled = len(train_labels), None
    if cfg.get("unlabeled"):
        extra, data.unlabeled = _decode_unlabeled(cfg, data, subset, workers, progress, skip)
        train_images = torch.cat([train_images, extra])
        train_labels = torch.cat([train_labels, torch.full((len(extra),), UNLABELED, dtype=train_labels.dtype)])
    augment = cfg.get("augment") or "auto"
    if augment == "auto":  # flips and shifts turn digits into other digits; photos take them well
        augment = "none" if data.spec == "digits" else "standard"
    plan = AugmentPlan(augment, len(train_labels), seed=cfg.get("aug_seed", 0))
    train = Views(train_images, train_labels, data.input.mean, data.input.std, plan)
    test = Views(test_images, test_labels, data.input.mean, data.input.std)
    data.train_size = len(train)
    return data, train, test


def _settle_norm(data, cfg, input_spec, train_images, pretrained):
    """Set data.input's mean/std for this run; returns where they came from (recorded in metrics.json).

    A pretrained student keeps the statistics its weights were trained with (ImageNet's, usually) unless
    --norm says otherwise: its first layers expect inputs scaled that way, as in any fine-tuning recipe.
    The train split's statistics come from the labelled images only, so a run with --unlabeled is
    normalised like the same run without it."""
    from .augment import channel_stats

    norm = cfg.get("norm") or "auto"
    if input_spec is not None:
        return "checkpoint"
    if norm == "auto" and pretrained is not None:
        mean, std, source = pretrained
        data.input.mean, data.input.std = _fit_channels(mean, data.input.channels), _fit_channels(std, data.input.channels)
        return f"pretrained: {source}"
    if norm == "train" or (norm == "auto" and data.spec != "digits"):
        data.input.mean, data.input.std = channel_stats(train_images)
        return "train split"
    if norm not in ("auto", "seed"):
        data.input.mean, data.input.std = _parse_stats(norm, data.input.channels)
        return "given (--norm)"
    return "seed (0.5/0.5)"


def _fit_channels(values, channels):
    """RGB statistics for ``channels`` inputs: their average for grey (whose stem weights are RGB summed)."""
    if len(values) == channels:
        return list(values)
    return [sum(values) / len(values)] * channels


def _decode_unlabeled(cfg, data, subset, workers, progress, skip):
    """The --unlabeled folder's images at the data's input (uint8), and their record for metrics.json."""
    from .augment import decode_split
    from .data import load_unlabeled, split_paths

    labelled = split_paths(data.train, subset)
    if labelled is None:
        log.info("%s has no image files: --unlabeled images cannot be compared with it by path", data.spec)
    folder = load_unlabeled(cfg["unlabeled"], labelled, split_paths(data.test))
    images, _ = decode_split(folder, data.input, None, workers, "decode unlabeled", progress, skip)
    if not len(images):
        raise EdgeKDError(f"--unlabeled {cfg['unlabeled']!r}: none of its {folder.found} image files could be read")
    record = {"folder": folder.folder, "files": folder.found, "images": len(images),
              "skipped": {**folder.skipped, "unreadable": len(decode_split.skipped)},
              "compared_by_path": labelled is not None}
    log.info("--unlabeled %s: %d images join %d labelled ones", folder.folder, len(images), data.labelled_images)
    return images, record


def _targets(dataset):
    if hasattr(dataset, "targets"):
        return list(dataset.targets)
    return [label for _, label in dataset.samples]


def _data_record(data, train, cfg):
    labelled = getattr(data, "labelled_images", len(train))
    return {"spec": data.spec, "train_images": len(train), "labelled_images": labelled,
            "unlabeled_images": len(train) - labelled, "unlabeled": getattr(data, "unlabeled", None),
            "train_subset": cfg.get("train_subset"), "skipped_bad_images": len(getattr(data, "skipped_images", [])),
            "test_images": None, **train.plan.describe(), "mean": data.input.mean, "std": data.input.std,
            "norm": getattr(data, "norm_source", None)}


def _joined(run_fn):
    """Run ``run_fn(cfg, ctx)`` inside the torchrun job (or alone); cfg['device'] becomes this rank's."""

    def wrapper(cfg):
        from . import distributed

        ctx, device = distributed.init(cfg["device"])
        try:
            return run_fn(cfg, {**cfg, "device": device}, ctx)
        finally:
            ctx.close()

    wrapper.__doc__ = run_fn.__doc__
    return wrapper


def _distributed_record(ctx, cfg, run):
    from .distributed import rank_record

    return {**ctx.describe(cfg["batch_size"]), "ranks": ctx.gather_objects(rank_record(ctx, cfg["device"], run.local_images))}


@_joined
def run_train(saved_cfg, cfg, ctx):
    """``edgekd train``: supervised training of one model. Writes model.pt, metrics.json, config.yaml."""
    if cfg.get("unlabeled"):
        raise EdgeKDError("--unlabeled images are learned from the teacher's answers and edgekd train has no teacher: "
                          "use edgekd distill --unlabeled DIR")
    check_student(cfg["model"], cfg.get("weights"))
    fetch_pretrained(cfg["model"])
    seed_everything(cfg["seed"])
    data, train, test = prepare_data(cfg, pretrained=pretrained_norm(cfg["model"], cfg.get("weights")))
    model, init = build_pretrained(cfg["model"], len(data.classes), data.input, cfg.get("weights"))
    if ctx.is_main:
        _save_config(cfg["out"], saved_cfg)
    loss_fn, _ = make_loss("ce", label_smoothing=cfg.get("label_smoothing"))
    run = TrainRun(train, test, loss_fn, dist=ctx)
    history = fit(model, run, cfg, desc=cfg["model"], state_path=os.path.join(cfg["out"], "model.state.pt"))
    metrics = _finish(model, run, cfg, _summary(cfg["model"], cfg["epochs"], history, model, data))
    metrics["pretrained"] = init
    metrics["train_data"] = {**_data_record(data, train, cfg), "test_images": len(test)}
    metrics["distributed"] = _distributed_record(ctx, cfg, run)
    if ctx.is_main:
        _save(os.path.join(cfg["out"], "model.pt"), model.cpu(), cfg["model"], data, metrics, saved_cfg)
        _write_json(os.path.join(cfg["out"], "metrics.json"), metrics)
    return metrics


def _loss_overrides(cfg):
    keys = ("temperature", "alpha", "beta", "student_layer", "teacher_layer")
    overrides = {k: cfg.get(k) for k in keys}
    overrides["warmup"] = cfg.get("dkd_warmup")
    return overrides


def _feature_taps(loss_fn, student, teacher, data):
    """Hooks on the chosen student and teacher layers, and the loss's adapter sized to them."""
    from .features import FeatureTap, feature_shape

    s_tap, t_tap = FeatureTap(student, loss_fn.student_layer), FeatureTap(teacher.model, loss_fn.teacher_layer)
    s_shape, t_shape = feature_shape(student, s_tap, data.input), feature_shape(teacher.model, t_tap, teacher.input)
    loss_fn.build_adapter(s_shape, t_shape)
    log.info("feature hint: student %s %s -> teacher %s %s", s_tap.name, s_shape[1:], t_tap.name, t_shape[1:])
    return s_tap, t_tap


@_joined
def run_distill(saved_cfg, cfg, ctx):
    """``edgekd distill``: train the student against the teacher. Writes student.pt, metrics.json, config.yaml."""
    meta = LOSSES.meta(cfg["loss"])
    if not meta["needs_teacher"]:
        raise EdgeKDError(f"loss {cfg['loss']!r} uses no teacher; use `edgekd train` or one of "
                          + ", ".join(n for n in LOSSES.names() if LOSSES.meta(n)["needs_teacher"]))
    check_student(cfg["student"], cfg.get("student_weights"))
    t_options = teachers.TeacherOptions.from_cfg(cfg)
    teachers.check(cfg["teacher"], t_options, meta)
    fetch_pretrained(cfg["student"])
    seed_everything(cfg["seed"])
    data, train, test = prepare_data(cfg, pretrained=pretrained_norm(cfg["student"], cfg.get("student_weights")))
    student, student_init = build_pretrained(cfg["student"], len(data.classes), data.input, cfg.get("student_weights"))
    loss_fn, loss_params = make_loss(cfg["loss"], label_smoothing=cfg.get("label_smoothing"), **_loss_overrides(cfg))
    if ctx.is_main:
        _save_config(cfg["out"], {**saved_cfg, "loss_params": loss_params})
    # a teacher trained here learns from the labelled images only
    teacher = teachers.load_teacher(cfg, t_options, data, train.labelled(), test, ctx, evaluate_on=test)
    if ctx.is_main:  # again, now with what the teacher turned out to be
        _save_config(cfg["out"], {**saved_cfg, "loss_params": loss_params, "teacher_resolved": teacher.describe()})
    if t_options.views:  # after a teacher trained here: it learnt from every epoch's views
        train.plan.replay(t_options.views)
    taps = _feature_taps(loss_fn, student, teacher, data) if meta.get("needs_features") else None
    cache, cache_seconds = None, None
    if cfg.get("teacher_cache"):
        if taps is not None:
            log.warning("loss %s needs the teacher's features, which are not cached: the teacher runs live", cfg["loss"])
        else:
            from .teacher_cache import TeacherCache

            cache = TeacherCache(cfg["teacher_cache"], teacher, train)
            if ctx.is_main:  # rank 0 computes and writes the cache; the others then read it
                cache_seconds = cache.build(teacher, cfg["epochs"], device=cfg["device"], progress=cfg.get("progress", True))
            ctx.barrier()
            if not ctx.is_main:
                cache.build(teacher, cfg["epochs"], device=cfg["device"], progress=False)
            cache_seconds = ctx.broadcast_object(cache_seconds)
    seed_everything(cfg["seed"])  # the student's run does not depend on whether a teacher was trained
    run = TrainRun(train, test, loss_fn, teacher=teacher, cache=cache, taps=taps, dist=ctx)
    history = fit(student, run, cfg, desc=f"student {cfg['student']}",
                  state_path=os.path.join(cfg["out"], "student.state.pt"))
    metrics = _finish(student, run, cfg, _summary(cfg["student"], cfg["epochs"], history, student, data))
    metrics.update(loss=cfg["loss"], loss_params=loss_params, teacher={
        **{k: teacher.metrics.get(k) for k in ("model", "source", "epochs", "test_top1", "params", "flops", "history")},
        **teacher.describe()})
    metrics["pretrained"] = student_init
    metrics["train_data"] = {**_data_record(data, train, cfg), "test_images": len(test)}
    metrics["teacher_cache"] = None if cache is None else {"path": cache.path, "build_seconds": cache_seconds,
                                                           "teacher_sha256": cache.teacher_sha,
                                                           "views": train.plan.views}
    metrics["distributed"] = _distributed_record(ctx, cfg, run)
    if ctx.is_main:
        _save(os.path.join(cfg["out"], "student.pt"), student.cpu(), cfg["student"], data, metrics, saved_cfg)
        _write_json(os.path.join(cfg["out"], "metrics.json"), metrics)
    return metrics
