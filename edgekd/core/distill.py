"""``edgekd train`` (supervised) and ``edgekd distill`` (student vs teacher): data, models, teacher, and
what each run writes. The loop itself is in train_loop.py, the batch-norm check in batchnorm.py."""

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import EdgeKDError
from ..base import cpu
from ..base.files import atomic_write, portable, refuse_inside
from ..base.progress import REPORT
from . import distributed, teachers
from .augment import DECODE_LIMIT_BYTES, AugmentPlan, Views, decode_split, default_crop_scale, stratified_subset
from .batchnorm import check_batchnorm
from .checkpoint import Checkpoint, save_checkpoint
from .config import saved
from .data import Data, SizeChoice, data_folders, load_data, load_unlabeled, parse_size, split_paths
from .features import FeatureTap, feature_shape
from .image_store import attach_store_for
from .loading import load_model
from .losses import LOSSES, UNLABELED, LossInfo, make_loss
from .metrics import EpochRecord, RunMetrics, RunRecords
from .mixing import attach_mix
from .models import build_model, count_flops, count_params
from .norm import settle_norm as _settle_norm
from .pretrained import build_pretrained, check_student, fetch_pretrained, pretrained_norm, pretrained_view
from .stream import StreamViews
from .teacher_cache import LiveMemo, TeacherCache
from .teacher_eval import own_view_top1
from .teacher_speed import check_dtype, settle_teacher_dtype
from .train_loop import TrainRun, evaluate, fit, seed_everything

log = logging.getLogger(__name__)


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, written atomically, with the machine's absolute paths made relative
    to its folder (base/files.py portable)."""
    obj = portable(obj, os.path.dirname(os.path.abspath(path)))
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def save_config(out: str, cfg: Dict[str, Any]) -> None:
    """The run's resolved options as OUT/config.yaml (written atomically), so the run can be repeated."""
    import yaml

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=True)

    atomic_write(os.path.join(out, "config.yaml"), write)


def _summary(spec: str, epochs: int, history: List[EpochRecord], model: nn.Module, data: Data) -> RunMetrics:
    return RunMetrics.of(spec, epochs, history, count_params(model), count_flops(model, data.input), data.spec)


def _finish(model: nn.Module, run: TrainRun, cfg: Any, metrics: RunMetrics) -> RunMetrics:
    """Batch-norm check (and re-estimation); the reported last-epoch figure is the model as saved."""
    bn = check_batchnorm(model, run, cfg)
    if bn is not None:
        if bn.recalibrated:
            metrics.test_top1 = bn.test_top1_after = evaluate(model, run.test, cfg.device, dist=run.dist)
        metrics.batchnorm = bn.to_json()
    return metrics


def _save(path: str, model: nn.Module, spec: str, data: Data, metrics: Dict[str, Any],
          cfg: Dict[str, Any]) -> Checkpoint:
    return save_checkpoint(path, model, spec=spec, classes=data.classes, input_spec=data.input,
                           data_spec=data.spec, metrics=metrics, config=cfg)


def train_teacher(cfg: Any, spec: str, data: Data, train: Any, test: Any, ctx: distributed.Context,
                  epochs: int) -> teachers.Trained:
    """A teacher given as a model spec (seed-teacher, resnet20, torchvision:resnet18, ...), trained here on the
    data first and saved as OUT/teacher.pt; a resumed run reads the teacher.pt it trained before the interruption.
    ``epochs``: distill's --teacher-epochs (else --epochs). Returns the teachers.Trained that load_teacher turns
    into the Teacher."""
    path = os.path.join(cfg.out, "teacher.pt")
    if cfg.resume and ctx.broadcast_object(os.path.isfile(path)):  # trained before the interruption
        model, ckpt = load_model(path)
        log.info("resuming: teacher already trained (%s)", path)
        return teachers.Trained(model, ckpt.input, ckpt.classes, path, dict(ckpt.metrics))
    model = build_model(spec, len(data.classes), data.input)
    loss_fn, _ = make_loss("ce", label_smoothing=cfg.label_smoothing)
    t_cfg = replace(cfg, epochs=epochs)
    run = TrainRun(train, test, loss_fn, dist=ctx)
    history = fit(model, run, t_cfg, desc=f"teacher {spec}", state_path=os.path.join(cfg.out, "teacher.state.pt"))
    summary = _finish(model, run, t_cfg, _summary(spec, epochs, history, model, data))
    summary.source = "trained"
    metrics = summary.to_json()
    if ctx.is_main:
        _save(path, model, spec, data, metrics, saved(t_cfg))
    ctx.barrier()  # the others hash teacher.pt for the teacher cache: wait until it is written
    return teachers.Trained(model.eval().cpu(), data.input, list(data.classes), path, metrics)


# Inputs up to this side keep the small-image recipe (pad-crop + flip, CIFAR's); larger ones get the
# random-resized crop of ImageNet training (torchvision / timm).
SMALL_SIDE = 48
# The test split is decoded into memory up to this size (at the student's input); larger ones stream too.
TEST_MEMORY_BYTES = 512 * 1024 ** 2
# Training images sampled for the train split's mean/std when they are not all decoded into memory.
STATS_SAMPLE = 2000


def resolve_augment(cfg: Any, data: Data) -> str:
    """The augmentation kind of a run: --augment, with auto (none for digits) and standard chosen by size."""
    augment = cfg.augment or "auto"
    if augment == "auto":  # flips and shifts turn digits into other digits; photos take them well
        augment = "none" if data.spec == "digits" else "standard"
    if augment == "standard":
        augment = "standard" if min(data.input.height, data.input.width) <= SMALL_SIDE else "random-resized-crop"
    return {"pad-crop": "standard"}.get(augment, augment)


def choose_pipeline(cfg: Any, data: Data, kind: str, n: int, teacher: bool) -> str:
    """memory or stream for this run's training images (logged): memory when the decoded images fit, the
    augmentation works on them (pad-crop or none) and, with a teacher, the files hold no more pixels than the
    student's input (then the teacher's own view of the original is the student's view, resized)."""
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


def prepare_data(cfg: Any, input_spec: Any = None, pretrained: Optional[Tuple[List[float], List[float], str]] = None,
                 unlabeled: Optional[str] = None, teacher: bool = False,
                 pretrained_view: Optional[Tuple[Tuple[int, ...], float, str]] = None) -> Tuple[Data, Any, Any]:
    """Load the data spec, decode the (subset of the) train split and the test split into memory or serve them
    from the files (choose_pipeline), settle the normalisation (from the train split unless given; a pretrained
    student's own with ``pretrained`` = (mean, std, source) and --norm auto), and build the augmentation plan.
    ``teacher``: the run has a teacher (distill, quantize), which should see images larger than the student's
    input at their own resolution; ``pretrained_view``: a pretrained student's (size, crop_pct, source).

    With ``unlabeled`` (a folder: --unlabeled) the images of that folder join the training views after the labelled ones,
    with label edgekd.losses.UNLABELED (teacher term only)."""
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
        train: Any = Views(train_images, train_labels, data.input.mean, data.input.std, plan)
    else:
        train = _stream_train(cfg, data, subset, input_spec, pretrained, unlabeled, kind)
    test = _test_views(cfg, data)
    data.train_size = len(train)
    return data, train, test


def _memory_train(cfg: Any, data: Data, subset: Any, input_spec: Any, pretrained: Any,
                  unlabeled: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The training images decoded once into a uint8 tensor (with the --unlabeled ones after them)."""
    progress, workers, skip = cfg.progress, cfg.workers, cfg.skip_bad_images
    data.skipped_images = []
    train_images, train_labels = decode_split(data.train, data.input, subset, workers, "decode train", progress, skip,
                                              skipped=data.skipped_images)
    data.norm_source = _settle_norm(data, cfg, input_spec, train_images, pretrained)
    data.labelled_images, data.unlabeled = len(train_labels), None
    if unlabeled:
        extra, data.unlabeled = _decode_unlabeled(unlabeled, data, subset, workers, progress, skip)
        train_images = torch.cat([train_images, extra])
        train_labels = torch.cat([train_labels, torch.full((len(extra),), UNLABELED, dtype=train_labels.dtype)])
    return train_images, train_labels


def _stream_train(cfg: Any, data: Data, subset: Any, input_spec: Any, pretrained: Any, unlabeled: Optional[str],
                  kind: str) -> StreamViews:
    """Training views served from the files (edgekd.core.stream); the train split's statistics from a
    class-stratified sample of them."""
    data.skipped_images = []
    sample, norm = None, cfg.norm or "auto"
    if input_spec is None and (norm == "train" or (norm == "auto" and pretrained is None and data.spec != "digits")):
        pool = torch.as_tensor(subset) if subset is not None else torch.arange(len(data.train))
        picked = pool[stratified_subset(torch.as_tensor(_targets(data.train))[pool], STATS_SAMPLE, seed=0)]
        sample, _ = decode_split(data.train, data.input, picked, cfg.workers, "decode statistics sample",
                                 cfg.progress, skip_bad=True)
    data.norm_source = _settle_norm(data, cfg, input_spec, sample, pretrained)
    labelled = len(data.train) if subset is None else len(subset)
    if data.norm_source == "train split" and sample is not None and len(sample) < labelled:
        data.norm_source = f"train split (a stratified sample of {len(sample)} images)"
    parts: List[Tuple[Any, Any, Optional[int]]] = [(data.train, subset, None)]
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


def _test_views(cfg: Any, data: Data) -> Any:
    """The test split: decoded into memory at the student's input when it fits, else served from the files."""
    spec = data.input
    n = getattr(cfg, "test_subset", None)
    subset = _test_subset(data.test, n) if n and n < len(data.test) else None
    count = len(data.test) if subset is None else len(subset)
    if count * spec.channels * spec.height * spec.width <= TEST_MEMORY_BYTES:
        images, labels = decode_split(data.test, spec, subset, cfg.workers, "decode test", cfg.progress,
                                      cfg.skip_bad_images, skipped=data.skipped_images)
        return Views(images, labels, spec.mean, spec.std)
    log.info("data: the test split's %d images are streamed from their files", count)
    return StreamViews.of([(data.test, subset, None)], spec, None, workers=cfg.workers, skip_bad=cfg.skip_bad_images,
                          desc="test")


def _test_subset(test: Any, n: int) -> Any:
    """--test-subset's indices: class-stratified where the split knows its labels, else every k-th image."""
    if hasattr(test, "targets") or hasattr(test, "samples"):
        return stratified_subset(_targets(test), n, seed=0)
    return torch.linspace(0, len(test) - 1, n).round().long().unique()


def _decode_unlabeled(unlabeled: str, data: Data, subset: Any, workers: int, progress: bool,
                      skip: bool) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """The --unlabeled folder's images at the data's input (uint8), and their record for metrics.json."""
    labelled = split_paths(data.train, subset)
    folder = _unlabeled_folder(unlabeled, data, subset)
    unreadable: List[str] = []
    images, _ = decode_split(folder, data.input, None, workers, "decode unlabeled", progress, skip, skipped=unreadable)
    if not len(images):
        raise EdgeKDError(f"--unlabeled {unlabeled!r}: none of its {folder.found} image files could be read")
    record = {"folder": folder.folder, "files": folder.found, "images": len(images),
              "skipped": {**folder.skipped, "unreadable": len(unreadable)},
              "compared_by_path": labelled is not None}
    log.info("--unlabeled %s: %d images join %d labelled ones", folder.folder, len(images), data.labelled_images)
    return images, record


def _unlabeled_folder(unlabeled: str, data: Data, subset: Any) -> Any:
    """The --unlabeled folder's images, without those of the labelled training set or the test split."""
    labelled = split_paths(data.train, subset)
    if labelled is None:
        log.info("%s has no image files: --unlabeled images cannot be compared with it by path", data.spec)
    return load_unlabeled(unlabeled, labelled, split_paths(data.test))


def _targets(dataset: Any) -> List[int]:
    if hasattr(dataset, "targets"):
        return list(dataset.targets)
    return [label for _, label in dataset.samples]


def _data_record(data: Data, train: Any, test: Any, cfg: Any) -> Dict[str, Any]:
    """metrics.json's ``train_data``: what was trained on, how it was augmented and normalised."""
    labelled = len(train) if data.labelled_images is None else data.labelled_images
    skipped = len(data.skipped_images) + len(getattr(train, "skipped", ()))
    return {"spec": data.spec, "train_images": len(train), "labelled_images": labelled,
            "unlabeled_images": len(train) - labelled, "unlabeled": data.unlabeled,
            "train_subset": cfg.train_subset, "skipped_bad_images": skipped,
            "test_images": len(test), **train.plan.describe(), "mean": data.input.mean, "std": data.input.std,
            "norm": data.norm_source, "input_size": [data.input.height, data.input.width],
            "crop_pct": data.input.crop_pct, "pipeline": data.pipeline,
            "teacher_view_size": list(train.teacher_size) if getattr(train, "teacher_size", None) else None}


def _joined(run_fn: Callable[[Dict[str, Any], Any, distributed.Context], Dict[str, Any]]
            ) -> Callable[[Any], Dict[str, Any]]:
    """Run ``run_fn(saved, options, ctx)`` inside the torchrun job (or alone): ``saved`` is what config.yaml
    records (the options as given), ``options.device`` becomes this rank's."""

    def wrapper(cfg: Any) -> Dict[str, Any]:
        ctx, device = distributed.init(cfg.device)
        try:
            return run_fn(saved(cfg), replace(cfg, device=device), ctx)
        finally:
            ctx.close()

    wrapper.__doc__ = run_fn.__doc__
    return wrapper


def _run_records(ctx: distributed.Context, cfg: Any, run: TrainRun, data: Data, train: Any, test: Any,
                 pretrained: Optional[Dict[str, Any]], store: Optional[Dict[str, Any]]) -> RunRecords:
    """What train and distill record beside the figures: starting weights, image store, student dtype, the data,
    the CPU and the torchrun job."""
    ranks = ctx.gather_objects(distributed.rank_record(ctx, cfg.device, run.local_images))
    return RunRecords(pretrained, store, run.student_dtype, _data_record(data, train, test, cfg), cpu_record(),
                      {**ctx.describe(cfg.batch_size), "ranks": ranks})


@_joined
def run_train(saved_cfg: Dict[str, Any], cfg: Any, ctx: distributed.Context) -> Dict[str, Any]:
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
    summary = _finish(model, run, cfg, _summary(cfg.model, cfg.epochs, history, model, data))
    summary.run = _run_records(ctx, cfg, run, data, train, test, init, store)
    metrics = summary.to_json()
    if ctx.is_main:
        _save(os.path.join(cfg.out, "model.pt"), model.cpu(), cfg.model, data, metrics, saved_cfg)
        write_json(os.path.join(cfg.out, "metrics.json"), metrics)
    return metrics


def _loss_overrides(cfg: Any) -> Dict[str, Any]:
    return {"temperature": cfg.temperature, "alpha": cfg.alpha, "beta": cfg.beta, "student_layer": cfg.student_layer,
            "teacher_layer": cfg.teacher_layer, "warmup": cfg.dkd_warmup}


def _feature_taps(loss_fn: Any, student: nn.Module, teacher: Any, data: Data) -> Tuple[FeatureTap, FeatureTap]:
    """Hooks on the chosen student and teacher layers, and the loss's adapter sized to them."""
    s_tap, t_tap = FeatureTap(student, loss_fn.student_layer), FeatureTap(teacher.model, loss_fn.teacher_layer)
    s_shape, t_shape = feature_shape(student, s_tap, data.input), feature_shape(teacher.model, t_tap, teacher.input)
    loss_fn.build_adapter(s_shape, t_shape)
    log.info("feature hint: student %s %s -> teacher %s %s", s_tap.name, s_shape[1:], t_tap.name, t_shape[1:])
    return s_tap, t_tap


def _teacher_cache(cfg: Any, teacher: Any, train: Any, taps: Any, temperature: Optional[float],
                   ctx: distributed.Context) -> Tuple[Optional[TeacherCache], Optional[float]]:
    """The run's TeacherCache, built by rank 0 (the others read it), and the seconds spent; (None, None) without."""
    if not cfg.teacher_cache:
        return None, None
    if taps is not None:
        log.warning("loss %s needs the teacher's features, which are not cached: the teacher runs live", cfg.loss)
        return None, None
    refuse_inside(cfg.teacher_cache, "--teacher-cache", data_folders(cfg))  # it would become a class of the data
    cache = TeacherCache(cfg.teacher_cache, teacher, train, dtype=cfg.teacher_cache_dtype or "float16",
                         topk=cfg.teacher_cache_topk, temperature=temperature)
    seconds = None
    if ctx.is_main:  # rank 0 computes and writes the cache; the others then read it
        seconds = cache.build(teacher, cfg.epochs, device=cfg.device, progress=cfg.progress)
    ctx.barrier()
    if not ctx.is_main:
        cache.build(teacher, cfg.epochs, device=cfg.device, progress=False)
    return cache, ctx.broadcast_object(seconds)


def _live_memo(cache: Optional[TeacherCache], taps: Any, train: Any, classes: int) -> Optional[LiveMemo]:
    """A LiveMemo when the teacher runs live on views that cannot differ: it is asked once per image."""
    if cache is not None or taps is not None:
        return None
    return LiveMemo.for_run(train.plan, len(train), classes)


def cpu_record() -> Dict[str, Any]:
    """Threads, usable cores, the OpenMP wait policy, native bf16 and the load, for metrics.json."""
    return cpu.describe(torch.get_num_threads())


def _check_distill(cfg: Any) -> Tuple[LossInfo, Any]:
    """The loss (one that uses a teacher), the student and the teacher, checked before any data is loaded."""
    loss = LossInfo.of(cfg.loss)
    if not loss.needs_teacher:
        raise EdgeKDError(f"loss {cfg.loss!r} uses no teacher; use `edgekd train` or one of "
                          + ", ".join(n for n in LOSSES.names() if LossInfo.of(n).needs_teacher))
    check_student(cfg.student, cfg.student_weights)
    t_options = teachers.TeacherOptions.from_options(cfg)
    check_dtype(cfg.teacher_dtype, cfg.teacher, teachers.check(cfg.teacher, t_options, loss.needs_features).kind)
    return loss, t_options


@_joined
def run_distill(saved_cfg: Dict[str, Any], cfg: Any, ctx: distributed.Context) -> Dict[str, Any]:
    """``edgekd distill``: train the student against the teacher. Writes student.pt, metrics.json, config.yaml."""
    loss, t_options = _check_distill(cfg)
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
    taps = _feature_taps(loss_fn, student, teacher, data) if loss.needs_features else None
    cache, cache_seconds = _teacher_cache(cfg, teacher, train, taps, loss_params.get("temperature"), ctx)
    memo = _live_memo(cache, taps, train, len(data.classes))
    seed_everything(cfg.seed)  # the student's run does not depend on whether a teacher was trained
    run = TrainRun(train, test, loss_fn, teacher=teacher, cache=cache, taps=taps, dist=ctx, memo=memo)
    history = fit(student, run, cfg, desc=f"student {cfg.student}",
                  state_path=os.path.join(cfg.out, "student.state.pt"))
    summary = _finish(student, run, cfg, _summary(cfg.student, cfg.epochs, history, student, data))
    summary.loss, summary.loss_params = cfg.loss, loss_params
    summary.teacher = {**_teacher_figures(teacher.metrics), **teacher.describe(), "dtype": teacher_dtype,
                       **own_view_top1(teacher, data, cfg, ctx)}
    summary.run = replace(_run_records(ctx, cfg, run, data, train, test, student_init, store),
                          teacher_cache=None if cache is None else cache.record(cache_seconds),
                          teacher_memo=None if memo is None else memo.describe())
    metrics = summary.to_json()
    if ctx.is_main:
        _save(os.path.join(cfg.out, "student.pt"), student.cpu(), cfg.student, data, metrics, saved_cfg)
        write_json(os.path.join(cfg.out, "metrics.json"), metrics)
    return metrics


# The figures of the teacher's own metrics that distill's metrics.json repeats in its teacher record.
TEACHER_FIGURES = ("model", "source", "epochs", "test_top1", "params", "flops", "history")


def _teacher_figures(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {k: metrics.get(k) for k in TEACHER_FIGURES}

