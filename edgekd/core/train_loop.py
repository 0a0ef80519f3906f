"""The training loop shared by ``edgekd train`` and ``edgekd distill``: optimizer, schedule, epochs,
mixed precision, Ctrl-C, and the end-of-epoch state that ``--resume`` continues from."""

import logging
import math
import os
import random
import time

import torch

from .. import EdgeKDError, Interrupted
from ..base.files import atomic_write
from ..base.progress import REPORT, bar

log = logging.getLogger(__name__)


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


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
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise EdgeKDError(f"unknown optimizer {cfg.optimizer!r}: choose from adamw, sgd")


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
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    schedule = cfg.schedule
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, warmup, schedule))


class TrainRun:
    """What one call of ``fit`` needs besides the model: data views, loss, teacher, cache, feature taps,
    and the process group (a single process unless run under torchrun)."""

    def __init__(self, train, test, loss_fn, teacher=None, cache=None, taps=None, dist=None, memo=None):
        from .distributed import Context

        self.train, self.test, self.loss_fn = train, test, loss_fn
        self.teacher, self.cache, self.taps = teacher, cache, taps
        self.memo = memo  # a LiveMemo: a live teacher asked once per image when views cannot differ
        self.mix = getattr(getattr(train, "plan", None), "mix", None)  # --mix: edgekd.core.mixing.MixPlan
        self.dist = dist or Context()
        self.local_images = 0  # training images this process stepped through (all epochs of this run)
        # --student-dtype: the CPU autocast dtype of the student's forward (None: float32) and why (metrics.json)
        self.student_autocast, self.student_dtype = None, None


def cuda_speedups(cfg):
    """(autocast dtype or None, channels_last) for a run. Mixed precision is for CUDA: bf16 where the GPU
    supports it (no loss scaling needed), fp16 with a gradient scaler otherwise."""
    on_cuda = str(cfg.device).startswith("cuda")
    amp = cfg.amp or "auto"
    if not on_cuda or amp == "off":
        dtype = None
    elif amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        dtype = torch.bfloat16
    else:
        dtype = torch.float16
    layout = cfg.channels_last or "auto"
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


def _teacher_logits(run, x, idx, epoch, xt=None):
    if run.cache is not None and run.taps is None:
        return run.cache.lookup(epoch, idx).to(x.device)
    if run.teacher is None:
        return None
    xt = xt if xt is not None else x  # the teacher's own view of the same crop when there is one
    if run.memo is not None and run.taps is None:
        return run.memo(run.teacher, xt, idx)
    return run.teacher(xt)


def _step(net, run, x, y, idx, epoch, xt=None):
    t_logits = _teacher_logits(run, x, idx, epoch, xt)
    if run.student_autocast is None:
        s_logits = net(x)
    else:  # bf16 student on a CPU: its logits back to float32, so the loss and soft targets are float32
        from .precision import student_autocast

        with student_autocast(run.student_autocast):
            s_logits = net(x)
        s_logits = s_logits.float()
    extra = {}
    if run.taps is not None:  # the teacher's map is an inference-mode tensor: a clone can join autograd
        extra["features"] = (run.taps[0].output, run.taps[1].output.float().clone())  # float: a bf16 teacher's too
    if run.mix is not None:  # function matching: the teacher's answer for the mixed picture, mixed labels
        from .mixing import mixed_loss

        view = run.train.plan.view_of(epoch)
        return s_logits, t_logits, mixed_loss(run.loss_fn, run.mix, view, tuple(x.shape[-2:]), s_logits, t_logits,
                                              y, idx, **extra)
    return s_logits, t_logits, run.loss_fn(s_logits, t_logits, y, **extra)


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
    from .safe_load import Refused, torch_file

    try:
        return torch_file(path, "training state")
    except Refused as e:
        raise _resume_error(path, e.__cause__ or e) from e.__cause__


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
        raise _resume_error(path, e) from e
    return state["epoch"], state["history"]


def fit(model, run, cfg, desc="train", state_path=None):
    """Train ``model`` for cfg.epochs epochs, evaluating on the test views after each. Returns the history.

    With ``state_path`` the training state is saved there after every epoch (by rank 0), and a run
    started with cfg.resume continues from the last complete epoch found there. Under torchrun the
    model is trained through DistributedDataParallel; ``model`` itself stays unwrapped.
    """
    dist, device = run.dist, cfg.device
    amp_dtype, channels_last = cuda_speedups(cfg)
    model.to(device).train()
    run.loss_fn.to(device)
    if run.teacher is not None:
        run.teacher.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        if run.teacher is not None:
            run.teacher.to(memory_format=torch.channels_last)
    steps_per_epoch = run.train.steps_per_epoch(cfg.batch_size, dist.world_size)
    optimizer = make_optimizer(list(model.parameters()) + list(run.loss_fn.parameters()), cfg)
    scheduler = make_scheduler(optimizer, cfg, cfg.epochs * steps_per_epoch, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    history, done = [], 0
    if state_path and cfg.resume:
        # rank 0 reads the state and sends it to every rank: other machines need not see the file
        state = dist.broadcast_object(read_state(state_path) if dist.is_main and os.path.isfile(state_path) else None)
        if state is not None:
            done, history = apply_state(state, state_path, model, run, optimizer, scheduler, scaler)
            log.info("%s: resuming after epoch %d from %s", desc, done, state_path)
            if cfg.progress and dist.is_main:
                REPORT.info("%s: resuming after epoch %d/%d", desc, done, cfg.epochs)
    from .precision import settle_student_dtype

    run.student_autocast, run.student_dtype = settle_student_dtype(model, run.train, cfg, channels_last)
    net = dist.wrap(model, device)
    if cfg.compile:
        net = torch.compile(net)
    loop = _Loop(model, net, optimizer, scheduler, scaler, amp_dtype, channels_last)
    with _StopOnSigint() as stop:
        for epoch in range(done + 1, cfg.epochs + 1):
            record = _epoch(loop, run, cfg, desc, epoch, steps_per_epoch, stop)
            history.append(record)
            if state_path and dist.is_main:
                save_state(state_path, model, run, optimizer, scheduler, epoch, history, scaler)
    return history


def _train_batches(run, cfg, epoch):
    """This process's (x, x_teacher or None, y, idx) batches of one epoch: the global batch alone, or its share
    of it under DDP. x_teacher is the same view at the teacher's own size when the views are decoded from the
    files (edgekd.core.stream) and a live teacher needs it."""
    dist, bs = run.dist, cfg.batch_size
    # Decoding the teacher's view costs a second resize per image: only for a teacher that runs live.
    live = run.teacher is not None and (run.cache is None or run.taps is not None)
    if dist.enabled:
        batches = run.train.distributed_batches(bs // dist.world_size, epoch, cfg.seed, dist.rank, dist.world_size,
                                                teacher_view=live)
    else:
        batches = run.train.batches(bs, epoch=epoch, shuffle_seed=cfg.seed * 100_003 + epoch, teacher_view=live)
    return batches if live else ((x, None, y, idx) for x, y, idx in batches)


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


def _nan_source(x, t_logits, s_logits):
    """Where a non-finite loss came from, in the order the numbers flow (data, teacher, student, the loss), and
    what to do: only a student that diverged is the learning rate's doing."""
    if not torch.isfinite(x).all():
        return "the input images hold NaN or infinity (the data, not the learning rate): check the data"
    if t_logits is not None and not torch.isfinite(t_logits).all():
        return ("the teacher's outputs hold NaN or infinity on this batch (the teacher, not the learning rate): "
                "check the teacher file, its --teacher-dtype and its input")
    if not torch.isfinite(s_logits).all():
        return "the student's outputs became NaN or infinity (training diverged): lower --lr and start again"
    return "the inputs and outputs are finite, the loss is not: check the loss's options (--temperature, --alpha)"


def _epoch(loop, run, cfg, desc, epoch, steps_per_epoch, stop):
    """One epoch of training and its evaluation; returns the epoch's record (counts summed over ranks)."""
    dist, device = run.dist, cfg.device
    if hasattr(run.loss_fn, "set_epoch"):
        run.loss_fn.set_epoch(epoch)
    timed_teacher = run.teacher is not None and hasattr(run.teacher, "take_seconds")
    if timed_teacher:
        run.teacher.take_seconds()  # count this epoch's teacher forwards only
    sums, seen, labelled, correct, t_correct, start = {}, 0, 0, 0, 0, time.perf_counter()
    progress = bar(_train_batches(run, cfg, epoch), total=steps_per_epoch, desc=f"{desc} {epoch}/{cfg.epochs}",
                   unit="batch", disable=not (cfg.progress and dist.is_main), leave=True)
    for batch, (x, xt, y, idx) in enumerate(progress, 1):
        x, y = _to_device(x, y, device, loop.channels_last)
        if xt is not None:
            xt, _ = _to_device(xt, y, device, loop.channels_last)
        with _autocast(loop.amp_dtype):
            s_logits, t_logits, parts = _step(loop.net, run, x, y, idx, epoch, xt)
        bad, stopping = not torch.isfinite(parts["loss"]).item(), stop.requested
        if dist.enabled:  # every rank must leave the loop at the same batch, or the others wait forever
            bad, stopping = (v > 0 for v in dist.all_reduce_sum(torch.tensor([float(bad), float(stopping)])).tolist())
        if bad:
            raise EdgeKDError(f"{desc}: loss became {parts['loss'].item()} in epoch {epoch}, batch {batch}: "
                              f"{_nan_source(x, t_logits, s_logits)}; the last complete epoch ({epoch - 1}) is kept")
        _backward(loop, run, parts["loss"])
        seen += len(y)
        has_label = y >= 0  # unlabelled images (--unlabeled, label -1) have no right answer to count
        labelled += has_label.sum().item()
        correct += (s_logits.detach().argmax(1) == y)[has_label].sum().item()
        if t_logits is not None:  # how right the teacher is on the views it is shown (augmentation can hurt it)
            t_correct += (t_logits.detach().argmax(1) == y)[has_label].sum().item()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v.item() * len(y)
        progress.set_postfix(loss=f"{sums['loss'] / seen:.3f}", task=f"{sums['task_loss'] / seen:.3f}",
                        kd=f"{sums['kd_loss'] / seen:.3f}", ips=f"{seen * dist.world_size / (time.perf_counter() - start):.0f}")
        if stopping:
            progress.close()
            raise Interrupted(f"interrupted in epoch {epoch} of {desc}; the last complete epoch ({epoch - 1}) is saved")
    seconds = time.perf_counter() - start
    run.local_images += seen
    keys = sorted(sums)
    totals = dist.all_reduce_sum(torch.tensor([seen, labelled, correct, t_correct] + [sums[k] for k in keys],
                                              dtype=torch.float64)).tolist()
    seen, labelled, correct, t_correct, sums = totals[0], totals[1], totals[2], totals[3], dict(zip(keys, totals[4:]))
    dist.sync_buffers(loop.model)
    top1 = evaluate(loop.model, run.test, device, dist=dist)
    record = {"epoch": epoch, **{k: v / max(seen, 1) for k, v in sums.items()}, "train_top1": correct / max(labelled, 1),
              "test_top1": top1, "lr": loop.optimizer.param_groups[0]["lr"], "images_per_s": seen / seconds,
              "seconds": seconds}
    if run.teacher is not None or run.cache is not None:
        record["teacher_train_top1"] = t_correct / max(labelled, 1)
    if timed_teacher:  # the live teacher's own forward time (0 when its logits come from the cache)
        record["teacher_seconds"] = run.teacher.take_seconds()
        record["teacher_share"] = record["teacher_seconds"] / seconds if seconds > 0 else None
    log.info("%s epoch %d: %s", desc, epoch, {k: round(v, 4) for k, v in record.items() if isinstance(v, float)})
    if cfg.progress and dist.is_main:
        terms = "  ".join(f"{k} {record[k]:.4f}" for k in sums)
        REPORT.info("%s %d/%d: %s  test top-1 %.4f  (%.0f img/s)", desc, epoch, cfg.epochs, terms, top1,
                    record["images_per_s"])
    return record
