"""The training loop behind ``edgekd train`` (supervised) and ``edgekd distill`` (student vs teacher)."""

import json
import logging
import math
import os
import random
import time

import torch
from torch import nn

from . import EdgeKDError, Interrupted
from .checkpoint import atomic_write, load_model, save_checkpoint
from .data import load_data
from .features import is_batchnorm
from .losses import LOSSES, make_loss
from .models import build_model, check_spec, count_flops, count_params

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

    def forward(self, x):
        with torch.inference_mode():  # cheaper than no_grad: no version counters, no autograd metadata
            if self.renorm:
                x = (x * self.s_std + self.s_mean - self.t_mean) / self.t_std
            logits = self.model(x)
        return logits.float().clone()  # a normal tensor again, so the loss may save it for backward


@torch.no_grad()
def evaluate(model, views, device="cpu", batch_size=256, dist=None):
    """Top-1 accuracy of ``model`` (eval mode) on un-augmented views of a split; under DDP each rank
    scores every world-th image and the counts are summed, so the figure covers the whole split once."""
    was_training = model.training
    model.eval()
    shard = (dist.rank, dist.world_size) if dist is not None and dist.enabled else None
    correct = 0
    for x, y, _ in views.batches(batch_size, shard=shard):
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    model.train(was_training)
    if shard is not None:
        correct = dist.all_reduce_sum(torch.tensor([correct], dtype=torch.float64)).item()
    return correct / max(len(views), 1)


def make_optimizer(params, cfg):
    params = [p for p in params if p.requires_grad]
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
                               nesterov=cfg.get("nesterov", False))
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    raise EdgeKDError(f"unknown optimizer {cfg['optimizer']!r}: choose from adamw, sgd")


def lr_factor(step, total, warmup, schedule):
    """Learning-rate multiplier at ``step``: linear warm-up, then cosine to zero, x0.1 steps, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "step":  # the classic CIFAR schedule: /10 at half and three quarters of training
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    return 1.0


def make_scheduler(optimizer, cfg, steps, steps_per_epoch):
    warmup = int(round(cfg.get("warmup_epochs", 0) * steps_per_epoch))
    schedule = cfg.get("schedule", "cosine")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, warmup, schedule))


class TrainRun:
    """What one call of ``fit`` needs besides the model: data views, loss, teacher, cache, feature taps,
    and the process group (a single process unless run under torchrun)."""

    def __init__(self, train, test, loss_fn, teacher=None, cache=None, taps=None, dist=None):
        from .distributed import Context

        self.train, self.test, self.loss_fn = train, test, loss_fn
        self.teacher, self.cache, self.taps = teacher, cache, taps
        self.dist = dist or Context()
        self.local_images = 0  # training images this process stepped through (all epochs of this run)


def cuda_speedups(cfg):
    """(autocast dtype or None, channels_last) for a run. Mixed precision is for CUDA: bf16 where the GPU
    supports it (no loss scaling needed), fp16 with a gradient scaler otherwise."""
    on_cuda = str(cfg["device"]).startswith("cuda")
    amp = cfg.get("amp") or "auto"
    if not on_cuda or amp == "off":
        dtype = None
    elif amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        dtype = torch.bfloat16
    else:
        dtype = torch.float16
    layout = cfg.get("channels_last") or "auto"
    return dtype, layout == "on" or (layout == "auto" and on_cuda)


def _autocast(dtype):
    import contextlib

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def _to_device(x, y, device, channels_last):
    if str(device).startswith("cuda"):  # pinned pages let the copy overlap with the previous step
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _teacher_logits(run, x, idx, epoch):
    if run.cache is not None and run.taps is None:
        return run.cache.lookup(epoch, idx).to(x.device)
    return run.teacher(x) if run.teacher is not None else None


def _step(net, run, x, y, idx, epoch):
    t_logits = _teacher_logits(run, x, idx, epoch)
    s_logits = net(x)
    extra = {}
    if run.taps is not None:  # the teacher's map is an inference-mode tensor: a clone can join autograd
        extra["features"] = (run.taps[0].output, run.taps[1].output.clone())
    return s_logits, run.loss_fn(s_logits, t_logits, y, **extra)


class _StopOnSigint:
    """Turn the first Ctrl-C into a flag checked after each batch; a second one stops at once."""

    def __enter__(self):
        import signal

        self.requested = False
        self._previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread (e.g. inside a test runner thread): leave Ctrl-C alone
            self._previous = None
        return self

    def __exit__(self, *exc):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _rng_state():
    import numpy as np

    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")), *np_state[2:]]}


def _set_rng_state(state):
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), *rest))


class _Loop:
    """The moving parts of one training run: the model, what runs it (DDP, torch.compile), the optimizer,
    schedule, gradient scaler and mixed-precision settings."""

    def __init__(self, model, net, optimizer, scheduler, scaler, amp_dtype, channels_last):
        self.model, self.net, self.optimizer, self.scheduler = model, net, optimizer, scheduler
        self.scaler, self.amp_dtype, self.channels_last = scaler, amp_dtype, channels_last


def save_state(path, model, run, optimizer, scheduler, epoch, history, scaler=None):
    """The end-of-epoch training state (weights, optimizer, schedule, RNG, history), written atomically."""
    state = {"epoch": epoch, "model": model.state_dict(), "loss_fn": run.loss_fn.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "history": history,
             "rng": _rng_state()}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _resume_error(path, e):
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return EdgeKDError(f"cannot resume from {path!r}: {reason}; start again with --force")


def read_state(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _resume_error(path, e) from None


def apply_state(state, path, model, run, optimizer, scheduler, scaler=None):
    """Restore a training state; returns (epochs done, history)."""
    try:
        model.load_state_dict(state["model"])
        run.loss_fn.load_state_dict(state["loss_fn"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
    except Exception as e:
        raise _resume_error(path, e) from None
    return state["epoch"], state["history"]


def fit(model, run, cfg, desc="train", state_path=None):
    """Train ``model`` for cfg['epochs'] epochs, evaluating on the test views after each. Returns the history.

    With ``state_path`` the training state is saved there after every epoch (by rank 0), and a run
    started with cfg['resume'] continues from the last complete epoch found there. Under torchrun the
    model is trained through DistributedDataParallel; ``model`` itself stays unwrapped.
    """
    from tqdm import tqdm

    dist, device = run.dist, cfg["device"]
    amp_dtype, channels_last = cuda_speedups(cfg)
    model.to(device).train()
    run.loss_fn.to(device)
    if run.teacher is not None:
        run.teacher.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        if run.teacher is not None:
            run.teacher.to(memory_format=torch.channels_last)
    steps_per_epoch = run.train.steps_per_epoch(cfg["batch_size"], dist.world_size)
    optimizer = make_optimizer(list(model.parameters()) + list(run.loss_fn.parameters()), cfg)
    scheduler = make_scheduler(optimizer, cfg, cfg["epochs"] * steps_per_epoch, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    history, done = [], 0
    if state_path and cfg.get("resume"):
        # rank 0 reads the state and sends it to every rank: other machines need not see the file
        state = dist.broadcast_object(read_state(state_path) if dist.is_main and os.path.isfile(state_path) else None)
        if state is not None:
            done, history = apply_state(state, state_path, model, run, optimizer, scheduler, scaler)
            log.info("%s: resuming after epoch %d from %s", desc, done, state_path)
            if cfg.get("progress", True) and dist.is_main:
                print(f"{desc}: resuming after epoch {done}/{cfg['epochs']}", flush=True)
    net = dist.wrap(model, device)
    if cfg.get("compile"):
        net = torch.compile(net)
    loop = _Loop(model, net, optimizer, scheduler, scaler, amp_dtype, channels_last)
    with _StopOnSigint() as stop:
        for epoch in range(done + 1, cfg["epochs"] + 1):
            record = _epoch(loop, run, cfg, desc, epoch, steps_per_epoch, stop, tqdm)
            history.append(record)
            if state_path and dist.is_main:
                save_state(state_path, model, run, optimizer, scheduler, epoch, history, scaler)
    return history


def _train_batches(run, cfg, epoch):
    """This process's batches of one epoch: the global batch alone, or its share of it under DDP."""
    dist, bs = run.dist, cfg["batch_size"]
    if dist.enabled:
        return run.train.distributed_batches(bs // dist.world_size, epoch, cfg["seed"], dist.rank, dist.world_size)
    return run.train.batches(bs, epoch=epoch, shuffle_seed=cfg["seed"] * 100_003 + epoch)


def _backward(loop, run, loss):
    loop.optimizer.zero_grad(set_to_none=True)
    if loop.scaler is not None:  # fp16: scale the loss so small gradients do not underflow
        loop.scaler.scale(loss).backward()
        run.dist.average_grads(run.loss_fn.parameters())
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
    else:
        loss.backward()
        run.dist.average_grads(run.loss_fn.parameters())
        loop.optimizer.step()
    loop.scheduler.step()


def _epoch(loop, run, cfg, desc, epoch, steps_per_epoch, stop, tqdm):
    """One epoch of training and its evaluation; returns the epoch's record (counts summed over ranks)."""
    dist, device = run.dist, cfg["device"]
    if hasattr(run.loss_fn, "set_epoch"):
        run.loss_fn.set_epoch(epoch)
    sums, seen, correct, start = {}, 0, 0, time.perf_counter()
    bar = tqdm(_train_batches(run, cfg, epoch), total=steps_per_epoch, desc=f"{desc} {epoch}/{cfg['epochs']}",
               unit="batch", disable=not (cfg.get("progress", True) and dist.is_main), dynamic_ncols=True, leave=True)
    for batch, (x, y, idx) in enumerate(bar, 1):
        x, y = _to_device(x, y, device, loop.channels_last)
        with _autocast(loop.amp_dtype):
            s_logits, parts = _step(loop.net, run, x, y, idx, epoch)
        bad, stopping = not torch.isfinite(parts["loss"]).item(), stop.requested
        if dist.enabled:  # every rank must leave the loop at the same batch, or the others wait forever
            bad, stopping = (v > 0 for v in dist.all_reduce_sum(torch.tensor([float(bad), float(stopping)])).tolist())
        if bad:
            raise EdgeKDError(f"{desc}: loss became {parts['loss'].item()} in epoch {epoch}, batch {batch}; "
                              f"the last complete epoch ({epoch - 1}) is kept; lower --lr and start again")
        _backward(loop, run, parts["loss"])
        seen += len(y)
        correct += (s_logits.detach().argmax(1) == y).sum().item()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v.item() * len(y)
        bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}", task=f"{sums['task_loss'] / seen:.3f}",
                        kd=f"{sums['kd_loss'] / seen:.3f}", ips=f"{seen * dist.world_size / (time.perf_counter() - start):.0f}")
        if stopping:
            bar.close()
            raise Interrupted(f"interrupted in epoch {epoch} of {desc}; the last complete epoch ({epoch - 1}) is saved")
    seconds = time.perf_counter() - start
    run.local_images += seen
    keys = sorted(sums)
    totals = dist.all_reduce_sum(torch.tensor([seen, correct] + [sums[k] for k in keys], dtype=torch.float64)).tolist()
    seen, correct, sums = totals[0], totals[1], dict(zip(keys, totals[2:]))
    dist.sync_buffers(loop.model)
    top1 = evaluate(loop.model, run.test, device, dist=dist)
    record = {"epoch": epoch, **{k: v / max(seen, 1) for k, v in sums.items()}, "train_top1": correct / max(seen, 1),
              "test_top1": top1, "lr": loop.optimizer.param_groups[0]["lr"], "images_per_s": seen / seconds,
              "seconds": seconds}
    log.info("%s epoch %d: %s", desc, epoch, {k: round(v, 4) for k, v in record.items() if isinstance(v, float)})
    if cfg.get("report_epochs", True) and dist.is_main:
        terms = "  ".join(f"{k} {record[k]:.4f}" for k in sums)
        print(f"{desc} {epoch}/{cfg['epochs']}: {terms}  test top-1 {top1:.4f}  "
              f"({record['images_per_s']:.0f} img/s)", flush=True)
    return record


BN_TRAP_GAP = 0.10  # eval-mode accuracy this far below batch-statistics accuracy means stale running stats


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


@torch.no_grad()
def _batchstat_top1(model, x, y):
    """Accuracy with batch statistics (train-mode BN) without changing the running statistics."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    pred = torch.cat([model(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])
    model.load_state_dict(state)
    model.eval()
    return (pred == y).float().mean().item()


def check_batchnorm(model, run, cfg, sample=2000):
    """The batch-norm trap check: compare eval-mode with batch-statistics accuracy on training images.

    A gap over BN_TRAP_GAP means the running statistics do not describe the data; with
    cfg['bn_recalibrate'] 'auto' they are then re-estimated ('always': every time, 'never': only reported).
    Decided on training images only, never on the test split.
    """
    if not any(is_batchnorm(m) for m in model.modules()):
        return None
    device = cfg["device"]
    # A fixed random sample: folder data is class-sorted, and batches of one class would give
    # batch statistics that describe no real batch.
    idx = torch.randperm(len(run.train), generator=torch.Generator().manual_seed(0))[:sample]
    x, y = run.train.batch(idx)
    x, y = x.to(device), y.to(device)
    model.eval()
    with torch.no_grad():
        eval_top1 = (model(x).argmax(1) == y).float().mean().item()
    batch_top1 = _batchstat_top1(model, x, y)
    trapped = eval_top1 < batch_top1 - BN_TRAP_GAP
    mode = cfg.get("bn_recalibrate", "auto")
    report = {"train_sample": len(idx), "eval_top1": eval_top1, "batchstat_top1": batch_top1, "trapped": trapped,
              "recalibrated": False}
    if trapped:
        log.warning("batch-norm trap: eval-mode top-1 %.3f vs %.3f with batch statistics on training images",
                    eval_top1, batch_top1)
    if mode == "always" or (mode == "auto" and trapped):
        report["test_top1_before"] = evaluate(model, run.test, device, dist=run.dist)
        recalibrate_bn(model, run.train, device)
        with torch.no_grad():
            report["eval_top1_after"] = (model(x).argmax(1) == y).float().mean().item()
        report["recalibrated"] = True
    model.eval()
    return report


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


def prepare_data(cfg, input_spec=None):
    """Load the data spec, decode the (subset of the) train split and the test split into memory,
    settle the normalisation (from the train split unless given), and build the augmentation plan."""
    from .augment import AugmentPlan, Views, channel_stats, decode_split, stratified_subset

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
    norm = cfg.get("norm") or "auto"
    if input_spec is None:
        if norm == "train" or (norm == "auto" and data.spec != "digits"):
            data.input.mean, data.input.std = channel_stats(train_images)
        elif norm not in ("auto", "seed"):
            data.input.mean, data.input.std = _parse_stats(norm, data.input.channels)
    augment = cfg.get("augment") or "auto"
    if augment == "auto":  # flips and shifts turn digits into other digits; photos take them well
        augment = "none" if data.spec == "digits" else "standard"
    plan = AugmentPlan(augment, len(train_labels), seed=cfg.get("aug_seed", 0))
    train = Views(train_images, train_labels, data.input.mean, data.input.std, plan)
    test = Views(test_images, test_labels, data.input.mean, data.input.std)
    data.train_size = len(train)
    return data, train, test


def _targets(dataset):
    if hasattr(dataset, "targets"):
        return list(dataset.targets)
    return [label for _, label in dataset.samples]


def _data_record(data, train, cfg):
    return {"spec": data.spec, "train_images": len(train), "train_subset": cfg.get("train_subset"),
            "skipped_bad_images": len(getattr(data, "skipped_images", [])),
            "test_images": None, **train.plan.describe(), "mean": data.input.mean, "std": data.input.std}


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
    check_spec(cfg["model"])
    seed_everything(cfg["seed"])
    data, train, test = prepare_data(cfg)
    model = build_model(cfg["model"], len(data.classes), data.input)
    if ctx.is_main:
        _save_config(cfg["out"], saved_cfg)
    loss_fn, _ = make_loss("ce", label_smoothing=cfg.get("label_smoothing"))
    run = TrainRun(train, test, loss_fn, dist=ctx)
    history = fit(model, run, cfg, desc=cfg["model"], state_path=os.path.join(cfg["out"], "model.state.pt"))
    metrics = _finish(model, run, cfg, _summary(cfg["model"], cfg["epochs"], history, model, data))
    metrics["train_data"] = {**_data_record(data, train, cfg), "test_images": len(test)}
    metrics["distributed"] = _distributed_record(ctx, cfg, run)
    if ctx.is_main:
        _save(os.path.join(cfg["out"], "model.pt"), model.cpu(), cfg["model"], data, metrics, saved_cfg)
        _write_json(os.path.join(cfg["out"], "metrics.json"), metrics)
    return metrics


def _teacher(cfg, data, train, test, ctx):
    """Load the teacher checkpoint, or train the teacher spec on the same data first. Returns
    (model, input spec, metrics, checkpoint path)."""
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
        return model, t_in, metrics, spec
    path = os.path.join(cfg["out"], "teacher.pt")
    if cfg.get("resume") and ctx.broadcast_object(os.path.isfile(path)):  # trained before the interruption
        model, ckpt = load_model(path)
        log.info("resuming: teacher already trained (%s)", path)
        return model, data.input, ckpt["metrics"], path
    model = build_model(spec, len(data.classes), data.input)
    loss_fn, _ = make_loss("ce", label_smoothing=cfg.get("label_smoothing"))
    epochs = cfg["teacher_epochs"] or cfg["epochs"]
    t_cfg = {**cfg, "epochs": epochs}
    run = TrainRun(train, test, loss_fn, dist=ctx)
    history = fit(model, run, t_cfg, desc=f"teacher {spec}", state_path=os.path.join(cfg["out"], "teacher.state.pt"))
    metrics = _finish(model, run, t_cfg, _summary(spec, epochs, history, model, data))
    metrics["source"] = "trained"
    if ctx.is_main:
        _save(path, model, spec, data, metrics, t_cfg)
    ctx.barrier()  # the others hash teacher.pt for the teacher cache: wait until it is written
    return model.eval(), data.input, metrics, path


def _loss_overrides(cfg):
    keys = ("temperature", "alpha", "beta", "student_layer", "teacher_layer")
    overrides = {k: cfg.get(k) for k in keys}
    overrides["warmup"] = cfg.get("dkd_warmup")
    return overrides


def _feature_taps(loss_fn, student, teacher, data):
    """Hooks on the chosen student and teacher layers, and the loss's adapter sized to them."""
    from .features import FeatureTap, feature_shape

    s_tap, t_tap = FeatureTap(student, loss_fn.student_layer), FeatureTap(teacher.model, loss_fn.teacher_layer)
    s_shape, t_shape = feature_shape(student, s_tap, data.input), feature_shape(teacher.model, t_tap, data.input)
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
    check_spec(cfg["student"])
    check_spec(cfg["teacher"])
    seed_everything(cfg["seed"])
    data, train, test = prepare_data(cfg)
    student = build_model(cfg["student"], len(data.classes), data.input)
    loss_fn, loss_params = make_loss(cfg["loss"], label_smoothing=cfg.get("label_smoothing"), **_loss_overrides(cfg))
    if ctx.is_main:
        _save_config(cfg["out"], {**saved_cfg, "loss_params": loss_params})
    teacher_model, teacher_input, teacher_metrics, teacher_path = _teacher(cfg, data, train, test, ctx)
    teacher = FrozenTeacher(teacher_model, teacher_input, data.input)
    taps = _feature_taps(loss_fn, student, teacher, data) if meta.get("needs_features") else None
    cache, cache_seconds = None, None
    if cfg.get("teacher_cache"):
        if taps is not None:
            log.warning("loss %s needs the teacher's features, which are not cached: the teacher runs live", cfg["loss"])
        else:
            from .teacher_cache import TeacherCache

            cache = TeacherCache(cfg["teacher_cache"], teacher_path, train)
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
        k: teacher_metrics.get(k) for k in ("model", "source", "epochs", "test_top1", "params", "flops", "history")})
    metrics["train_data"] = {**_data_record(data, train, cfg), "test_images": len(test)}
    metrics["teacher_cache"] = None if cache is None else {"path": cache.path, "build_seconds": cache_seconds,
                                                           "teacher_sha256": cache.teacher_sha}
    metrics["distributed"] = _distributed_record(ctx, cfg, run)
    if ctx.is_main:
        _save(os.path.join(cfg["out"], "student.pt"), student.cpu(), cfg["student"], data, metrics, saved_cfg)
        _write_json(os.path.join(cfg["out"], "metrics.json"), metrics)
    return metrics
