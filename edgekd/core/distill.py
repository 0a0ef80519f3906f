"""``edgekd train`` (supervised) and ``edgekd distill`` (student vs teacher): data, models, teacher, and
what each run writes. The loop itself is in train_loop.py, the batch-norm check in batchnorm.py."""

import json
import logging
import os
from dataclasses import replace

import torch

from .. import EdgeKDError
from . import teachers
from .batchnorm import check_batchnorm
from ..base.files import atomic_write, portable
from .checkpoint import save_checkpoint
from .config import saved
from .augment import Views, default_crop_scale
from .data import load_data, parse_size
from .losses import LOSSES, UNLABELED, make_loss
from .loading import load_model
from .image_store import attach_store_for
from .mixing import attach_mix
from .norm import settle_norm as _settle_norm
from .models import build_model, count_flops, count_params
from .pretrained import build_pretrained, check_student, fetch_pretrained, pretrained_norm, pretrained_view
from .teacher_eval import own_view_top1
from .teacher_speed import check_dtype, settle_teacher_dtype
from .teachers import FrozenTeacher  # noqa: F401  (its old home; tests and scripts import it from here)
from .train_loop import TrainRun, evaluate, fit, seed_everything

log = logging.getLogger(__name__)


def write_json(path, obj):
    """``obj`` as indented JSON at ``path``, written atomically, with the machine's absolute paths made relative
    to its folder (base/files.py portable)."""
    obj = portable(obj, os.path.dirname(os.path.abspath(path)))
    from pathlib import Path

    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def save_config(out, cfg):
    """The run's resolved options as OUT/config.yaml (written atomically), so the run can be repeated."""
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
            metrics["test_top1"] = evaluate(model, run.test, cfg.device, dist=run.dist)
            bn["test_top1_after"] = metrics["test_top1"]
    return metrics


def _save(path, model, spec, data, metrics, cfg):
    return save_checkpoint(path, model, spec=spec, classes=data.classes, input_spec=data.input,
                           data_spec=data.spec, metrics=metrics, config=cfg)


def train_teacher(cfg, spec, data, train, test, ctx, epochs):
    """A teacher given as a model spec (seed-teacher, resnet20, torchvision:resnet18, ...), trained here on the
    data first and saved as OUT/teacher.pt; a resumed run reads the teacher.pt it trained before the interruption.
    ``epochs``: distill's --teacher-epochs (else --epochs). Returns the teachers.Trained that load_teacher turns
    into the Teacher."""
    path = os.path.join(cfg.out, "teacher.pt")
    if cfg.resume and ctx.broadcast_object(os.path.isfile(path)):  # trained before the interruption
        model, ckpt = load_model(path)
        log.info("resuming: teacher already trained (%s)", path)
        return teachers.Trained(model, ckpt, path, dict(ckpt["metrics"]))
    model = build_model(spec, len(data.classes), data.input)
    loss_fn, _ = make_loss("ce", label_smoothing=cfg.label_smoothing)
    t_cfg = replace(cfg, epochs=epochs)
    run = TrainRun(train, test, loss_fn, dist=ctx)
    history = fit(model, run, t_cfg, desc=f"teacher {spec}", state_path=os.path.join(cfg.out, "teacher.state.pt"))
    metrics = _finish(model, run, t_cfg, _summary(spec, epochs, history, model, data))
    metrics["source"] = "trained"
    if ctx.is_main:
        _save(path, model, spec, data, metrics, saved(t_cfg))
    ctx.barrier()  # the others hash teacher.pt for the teacher cache: wait until it is written
    ckpt = {"input": data.input.to_dict(), "classes": data.classes}
    return teachers.Trained(model.eval().cpu(), ckpt, path, metrics)


# Inputs up to this side keep the small-image recipe (pad-crop + flip, CIFAR's); larger ones get the
# random-resized crop of ImageNet training (torchvision / timm).
SMALL_SIDE = 48
# The test split is decoded into memory up to this size (at the student's input); larger ones stream too.
TEST_MEMORY_BYTES = 512 * 1024 ** 2
# Training images sampled for the train split's mean/std when they are not all decoded into memory.
STATS_SAMPLE = 2000


def resolve_augment(cfg, data):
    """The augmentation kind of a run: --augment, with auto (none for digits) and standard chosen by size."""
    augment = cfg.augment or "auto"
    if augment == "auto":  # flips and shifts turn digits into other digits; photos take them well
        augment = "none" if data.spec == "digits" else "standard"
    if augment == "standard":
        augment = "standard" if min(data.input.height, data.input.width) <= SMALL_SIDE else "random-resized-crop"
    return {"pad-crop": "standard"}.get(augment, augment)


def choose_pipeline(cfg, data, kind, n, teacher):
    """memory or stream for this run's training images (logged): memory when the decoded images fit, the
    augmentation works on them (pad-crop or none) and, with a teacher, the files hold no more pixels than the
    student's input (then the teacher's own view of the original is the student's view, resized)."""
    from ..base.progress import REPORT
    from .augment import DECODE_LIMIT_BYTES

    spec = data.input
    nbytes = n * spec.channels * spec.height * spec.width
    larger = any(w > spec.width or h > spec.height for w, h in (data.sizes or ()))
    wanted = cfg.pipeline or "auto"
    shards = getattr(data.train, "stream_only", False)  # WebDataset shards: read per batch, never all at once
    if wanted == "memory" and shards:
        raise EdgeKDError(f"--pipeline memory: {data.spec} is sharded data, which is always streamed from its "
                          "shards; use --pipeline stream or auto")
    if wanted == "memory" and kind == "random-resized-crop":
        raise EdgeKDError("--pipeline memory holds images at the student's size, where a random-resized crop cannot "
                          "be cut from the original picture: use --pipeline stream (or auto), or --augment pad-crop")
    if wanted == "auto":
        fits = nbytes <= DECODE_LIMIT_BYTES
        small = fits and kind in ("none", "standard") and not (teacher and larger)
        wanted = "memory" if small and not shards else "stream"
    say = REPORT.info if cfg.progress else log.info  # the CLI's stdout lines; the log otherwise
    if wanted == "memory":
        say("data: %d training images at %dx%d decoded into memory (%.0f MB), %s augmentation", n, spec.height,
            spec.width, nbytes / 1e6, kind)
    else:
        say("data: %d training images at %dx%d streamed from their %s, decoded per batch in %d worker processes, "
            "%s augmentation", n, spec.height, spec.width, "shards" if shards else "files", cfg.workers, kind)
    return wanted


def prepare_data(cfg, input_spec=None, pretrained=None, unlabeled=None, teacher=False, pretrained_view=None):
    """Load the data spec, decode the (subset of the) train split and the test split into memory or serve them
    from the files (choose_pipeline), settle the normalisation (from the train split unless given; a pretrained
    student's own with ``pretrained`` = (mean, std, source) and --norm auto), and build the augmentation plan.
    ``teacher``: the run has a teacher (distill, quantize), which should see images larger than the student's
    input at their own resolution; ``pretrained_view``: a pretrained student's (size, crop_pct, source).

    With ``unlabeled`` (a folder: --unlabeled) the images of that folder join the training views after the labelled ones,
    with label edgekd.losses.UNLABELED (teacher term only)."""
    from .augment import AugmentPlan, stratified_subset
    from .data import SizeChoice

    data = load_data(cfg.data, cfg.data_root, input_spec=input_spec,
                     choice=SizeChoice(parse_size(cfg.input_size), cfg.crop_pct, pretrained_view))
    subset = None
    if cfg.train_subset:
        subset = stratified_subset(_targets(data.train), cfg.train_subset, seed=0)
    kind = resolve_augment(cfg, data)
    n = len(data.train) if subset is None else len(subset)
    data.pipeline = choose_pipeline(cfg, data, kind, n, teacher)
    if data.pipeline == "memory":
        train_images, train_labels = _memory_train(cfg, data, subset, input_spec, pretrained, unlabeled)
        plan = AugmentPlan(kind, len(train_labels), seed=cfg.aug_seed)
        train = Views(train_images, train_labels, data.input.mean, data.input.std, plan)
    else:
        train = _stream_train(cfg, data, subset, input_spec, pretrained, unlabeled, kind)
    test = _test_views(cfg, data)
    data.train_size = len(train)
    return data, train, test


def _memory_train(cfg, data, subset, input_spec, pretrained, unlabeled):
    """The training images decoded once into a uint8 tensor (with the --unlabeled ones after them)."""
    from .augment import decode_split

    progress, workers, skip = cfg.progress, cfg.workers, cfg.skip_bad_images
    train_images, train_labels = decode_split(data.train, data.input, subset, workers, "decode train", progress, skip)
    data.skipped_images = list(decode_split.skipped)
    data.norm_source = _settle_norm(data, cfg, input_spec, train_images, pretrained)
    data.labelled_images, data.unlabeled = len(train_labels), None
    if unlabeled:
        extra, data.unlabeled = _decode_unlabeled(unlabeled, data, subset, workers, progress, skip)
        train_images = torch.cat([train_images, extra])
        train_labels = torch.cat([train_labels, torch.full((len(extra),), UNLABELED, dtype=train_labels.dtype)])
    return train_images, train_labels


def _stream_train(cfg, data, subset, input_spec, pretrained, unlabeled, kind):
    """Training views served from the files (edgekd.core.stream); the train split's statistics from a
    class-stratified sample of them."""
    from .augment import AugmentPlan, decode_split, stratified_subset
    from .stream import StreamViews

    data.skipped_images = []
    sample, norm = None, cfg.norm or "auto"
    if input_spec is None and (norm == "train" or (norm == "auto" and pretrained is None and data.spec != "digits")):
        pool = torch.as_tensor(subset) if subset is not None else torch.arange(len(data.train))
        picked = pool[stratified_subset(torch.as_tensor(_targets(data.train))[pool], STATS_SAMPLE, seed=0)]
        sample, _ = decode_split(data.train, data.input, picked, cfg.workers, "decode statistics sample",
                                 cfg.progress, skip_bad=True)
    data.norm_source = _settle_norm(data, cfg, input_spec, sample, pretrained)
    labelled = len(data.train) if subset is None else len(subset)
    if data.norm_source == "train split" and len(sample) < labelled:
        data.norm_source = f"train split (a stratified sample of {len(sample)} images)"
    parts = [(data.train, subset, None)]
    data.labelled_images, data.unlabeled = labelled, None
    if unlabeled:
        folder = _unlabeled_folder(unlabeled, data, subset)
        parts.append((folder, None, UNLABELED))
        data.unlabeled = {"folder": folder.folder, "files": folder.found, "images": len(folder),
                          "skipped": dict(folder.skipped), "compared_by_path": hasattr(data.train, "samples")}
    scale = cfg.crop_scale or default_crop_scale(min(data.input.height, data.input.width), cfg.epochs)
    views = StreamViews.of(parts, data.input, None, workers=cfg.workers, skip_bad=cfg.skip_bad_images,
                           scale=scale, desc="train")
    views.plan = AugmentPlan(kind, len(views), seed=cfg.aug_seed, scale=scale)
    return views


def _test_views(cfg, data):
    """The test split: decoded into memory at the student's input when it fits, else served from the files."""
    from .augment import decode_split

    spec = data.input
    if len(data.test) * spec.channels * spec.height * spec.width <= TEST_MEMORY_BYTES:
        images, labels = decode_split(data.test, spec, None, cfg.workers, "decode test", cfg.progress,
                                      cfg.skip_bad_images)
        data.skipped_images = list(getattr(data, "skipped_images", [])) + list(decode_split.skipped)
        return Views(images, labels, spec.mean, spec.std)
    from .stream import StreamViews

    log.info("data: the test split's %d images are streamed from their files", len(data.test))
    return StreamViews.of([(data.test, None, None)], spec, None, workers=cfg.workers, skip_bad=cfg.skip_bad_images,
                          desc="test")


def _decode_unlabeled(unlabeled, data, subset, workers, progress, skip):
    """The --unlabeled folder's images at the data's input (uint8), and their record for metrics.json."""
    from .augment import decode_split
    from .data import split_paths

    labelled = split_paths(data.train, subset)
    folder = _unlabeled_folder(unlabeled, data, subset)
    images, _ = decode_split(folder, data.input, None, workers, "decode unlabeled", progress, skip)
    if not len(images):
        raise EdgeKDError(f"--unlabeled {unlabeled!r}: none of its {folder.found} image files could be read")
    record = {"folder": folder.folder, "files": folder.found, "images": len(images),
              "skipped": {**folder.skipped, "unreadable": len(decode_split.skipped)},
              "compared_by_path": labelled is not None}
    log.info("--unlabeled %s: %d images join %d labelled ones", folder.folder, len(images), data.labelled_images)
    return images, record


def _unlabeled_folder(unlabeled, data, subset):
    """The --unlabeled folder's images, without those of the labelled training set or the test split."""
    from .data import load_unlabeled, split_paths

    labelled = split_paths(data.train, subset)
    if labelled is None:
        log.info("%s has no image files: --unlabeled images cannot be compared with it by path", data.spec)
    return load_unlabeled(unlabeled, labelled, split_paths(data.test))


def _targets(dataset):
    if hasattr(dataset, "targets"):
        return list(dataset.targets)
    return [label for _, label in dataset.samples]


def _data_record(data, train, cfg):
    labelled = getattr(data, "labelled_images", len(train))
    skipped = len(getattr(data, "skipped_images", [])) + len(getattr(train, "skipped", ()))
    return {"spec": data.spec, "train_images": len(train), "labelled_images": labelled,
            "unlabeled_images": len(train) - labelled, "unlabeled": getattr(data, "unlabeled", None),
            "train_subset": cfg.train_subset, "skipped_bad_images": skipped,
            "test_images": None, **train.plan.describe(), "mean": data.input.mean, "std": data.input.std,
            "norm": getattr(data, "norm_source", None), "input_size": [data.input.height, data.input.width],
            "crop_pct": data.input.crop_pct, "pipeline": getattr(data, "pipeline", None),
            "teacher_view_size": list(train.teacher_size) if getattr(train, "teacher_size", None) else None}


def _joined(run_fn):
    """Run ``run_fn(saved, options, ctx)`` inside the torchrun job (or alone): ``saved`` is what config.yaml
    records (the options as given), ``options.device`` becomes this rank's."""

    def wrapper(cfg):
        from . import distributed

        ctx, device = distributed.init(cfg.device)
        try:
            return run_fn(saved(cfg), replace(cfg, device=device), ctx)
        finally:
            ctx.close()

    wrapper.__doc__ = run_fn.__doc__
    return wrapper


def _distributed_record(ctx, cfg, run):
    from .distributed import rank_record

    return {**ctx.describe(cfg.batch_size), "ranks": ctx.gather_objects(rank_record(ctx, cfg.device, run.local_images))}


@_joined
def run_train(saved_cfg, cfg, ctx):
    """``edgekd train``: supervised training of one model. Writes model.pt, metrics.json, config.yaml."""
    check_student(cfg.model, cfg.weights)
    fetch_pretrained(cfg.model)
    seed_everything(cfg.seed)
    data, train, test = prepare_data(cfg, pretrained=pretrained_norm(cfg.model, cfg.weights),
                                     pretrained_view=pretrained_view(cfg.model, cfg.weights))
    model, init = build_pretrained(cfg.model, len(data.classes), data.input, cfg.weights)
    store = attach_store_for(train, cfg, ctx)
    if ctx.is_main:
        save_config(cfg.out, saved_cfg)
    loss_fn, _ = make_loss("ce", label_smoothing=cfg.label_smoothing)
    run = TrainRun(train, test, loss_fn, dist=ctx)
    history = fit(model, run, cfg, desc=cfg.model, state_path=os.path.join(cfg.out, "model.state.pt"))
    metrics = _finish(model, run, cfg, _summary(cfg.model, cfg.epochs, history, model, data))
    metrics["pretrained"], metrics["image_store"], metrics["student_dtype"] = init, store, run.student_dtype
    metrics["train_data"] = {**_data_record(data, train, cfg), "test_images": len(test)}
    metrics["distributed"] = _distributed_record(ctx, cfg, run)
    metrics["cpu"] = cpu_record()
    if ctx.is_main:
        _save(os.path.join(cfg.out, "model.pt"), model.cpu(), cfg.model, data, metrics, saved_cfg)
        write_json(os.path.join(cfg.out, "metrics.json"), metrics)
    return metrics


def _loss_overrides(cfg):
    keys = ("temperature", "alpha", "beta", "student_layer", "teacher_layer")
    overrides = {k: getattr(cfg, k) for k in keys}
    overrides["warmup"] = cfg.dkd_warmup
    return overrides


def _feature_taps(loss_fn, student, teacher, data):
    """Hooks on the chosen student and teacher layers, and the loss's adapter sized to them."""
    from .features import FeatureTap, feature_shape

    s_tap, t_tap = FeatureTap(student, loss_fn.student_layer), FeatureTap(teacher.model, loss_fn.teacher_layer)
    s_shape, t_shape = feature_shape(student, s_tap, data.input), feature_shape(teacher.model, t_tap, teacher.input)
    loss_fn.build_adapter(s_shape, t_shape)
    log.info("feature hint: student %s %s -> teacher %s %s", s_tap.name, s_shape[1:], t_tap.name, t_shape[1:])
    return s_tap, t_tap


def _teacher_cache(cfg, teacher, train, taps, loss_params, ctx):
    """The run's TeacherCache, built by rank 0 (the others read it), and the seconds spent; (None, None) without."""
    if not cfg.teacher_cache:
        return None, None
    if taps is not None:
        log.warning("loss %s needs the teacher's features, which are not cached: the teacher runs live", cfg.loss)
        return None, None
    from ..base.files import refuse_inside
    from .data import data_folders
    from .teacher_cache import TeacherCache

    refuse_inside(cfg.teacher_cache, "--teacher-cache", data_folders(cfg))  # it would become a class of the data

    cache = TeacherCache(cfg.teacher_cache, teacher, train, dtype=cfg.teacher_cache_dtype or "float16",
                         topk=cfg.teacher_cache_topk, temperature=loss_params.get("temperature"))
    seconds = None
    if ctx.is_main:  # rank 0 computes and writes the cache; the others then read it
        seconds = cache.build(teacher, cfg.epochs, device=cfg.device, progress=cfg.progress)
    ctx.barrier()
    if not ctx.is_main:
        cache.build(teacher, cfg.epochs, device=cfg.device, progress=False)
    return cache, ctx.broadcast_object(seconds)


def _live_memo(cache, taps, train, classes):
    """A LiveMemo when the teacher runs live on views that cannot differ: it is asked once per image."""
    if cache is not None or taps is not None:
        return None
    from .teacher_cache import LiveMemo

    return LiveMemo.for_run(train.plan, len(train), classes)


def cpu_record():
    """Threads, usable cores, the OpenMP wait policy, native bf16 and the load, for metrics.json."""
    from ..base import cpu

    return cpu.describe(torch.get_num_threads())


@_joined
def run_distill(saved_cfg, cfg, ctx):
    """``edgekd distill``: train the student against the teacher. Writes student.pt, metrics.json, config.yaml."""
    meta = LOSSES.meta(cfg.loss)
    if not meta["needs_teacher"]:
        raise EdgeKDError(f"loss {cfg.loss!r} uses no teacher; use `edgekd train` or one of "
                          + ", ".join(n for n in LOSSES.names() if LOSSES.meta(n)["needs_teacher"]))
    check_student(cfg.student, cfg.student_weights)
    t_options = teachers.TeacherOptions.from_options(cfg)
    check_dtype(cfg.teacher_dtype, cfg.teacher, teachers.check(cfg.teacher, t_options, meta).kind)
    fetch_pretrained(cfg.student)
    seed_everything(cfg.seed)
    data, train, test = prepare_data(cfg, pretrained=pretrained_norm(cfg.student, cfg.student_weights),
                                     unlabeled=cfg.unlabeled, teacher=True,
                                     pretrained_view=pretrained_view(cfg.student, cfg.student_weights))
    student, student_init = build_pretrained(cfg.student, len(data.classes), data.input, cfg.student_weights)
    loss_fn, loss_params = make_loss(cfg.loss, label_smoothing=cfg.label_smoothing, **_loss_overrides(cfg))
    if ctx.is_main:
        save_config(cfg.out, {**saved_cfg, "loss_params": loss_params})
    # a teacher given as a model spec is trained here first, on the labelled images only
    trained = None
    if teachers.resolve(cfg.teacher, t_options).kind == "model":
        trained = train_teacher(cfg, cfg.teacher, data, train.labelled(), test, ctx,
                                cfg.teacher_epochs or cfg.epochs)
    teacher = teachers.load_teacher(cfg, t_options, data, train.labelled(), test, ctx, evaluate_on=test, trained=trained)
    if ctx.is_main:  # again, now with what the teacher turned out to be
        save_config(cfg.out, {**saved_cfg, "loss_params": loss_params,
                              "teacher_resolved": portable(teacher.describe(), cfg.out)})
    if t_options.views:  # after a teacher trained here: it learnt from every epoch's views
        train.plan.replay(t_options.views)
    attach_mix(train, cfg.mix, cfg.mix_alpha)  # function matching; the teacher trained here saw unmixed views
    if hasattr(train, "set_teacher_size"):  # views from the files: the teacher sees each crop at its own size
        train.set_teacher_size(teacher.loaded.size)
    store = attach_store_for(train, cfg, ctx)  # after the teacher's size is known: it sets the default stored size
    teacher_dtype = settle_teacher_dtype(teacher, cfg.teacher_dtype, cfg.device, train, cfg.channels_last)
    taps = _feature_taps(loss_fn, student, teacher, data) if meta.get("needs_features") else None
    cache, cache_seconds = _teacher_cache(cfg, teacher, train, taps, loss_params, ctx)
    memo = _live_memo(cache, taps, train, len(data.classes))
    seed_everything(cfg.seed)  # the student's run does not depend on whether a teacher was trained
    run = TrainRun(train, test, loss_fn, teacher=teacher, cache=cache, taps=taps, dist=ctx, memo=memo)
    history = fit(student, run, cfg, desc=f"student {cfg.student}",
                  state_path=os.path.join(cfg.out, "student.state.pt"))
    metrics = _finish(student, run, cfg, _summary(cfg.student, cfg.epochs, history, student, data))
    metrics.update(loss=cfg.loss, loss_params=loss_params, teacher={
        **{k: teacher.metrics.get(k) for k in ("model", "source", "epochs", "test_top1", "params", "flops", "history")},
        **teacher.describe(), "dtype": teacher_dtype, **own_view_top1(teacher, data, cfg, ctx)})
    metrics["pretrained"], metrics["image_store"], metrics["student_dtype"] = student_init, store, run.student_dtype
    metrics["train_data"] = {**_data_record(data, train, cfg), "test_images": len(test)}
    metrics["teacher_cache"] = None if cache is None else {"path": cache.path, "build_seconds": cache_seconds,
                                                           "teacher_sha256": cache.teacher_sha,
                                                           "views": train.plan.views, **cache.describe()}
    metrics["teacher_memo"] = None if memo is None else {"teacher_calls": memo.teacher_calls,
                                                         "why": "every epoch shows the same views"}
    metrics["cpu"] = cpu_record()
    metrics["distributed"] = _distributed_record(ctx, cfg, run)
    if ctx.is_main:
        _save(os.path.join(cfg.out, "student.pt"), student.cpu(), cfg.student, data, metrics, saved_cfg)
        write_json(os.path.join(cfg.out, "metrics.json"), metrics)
    return metrics
