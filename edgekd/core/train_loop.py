"""The training loop shared by ``edgekd train`` and ``edgekd distill``: optimizer, schedule, epochs,
mixed precision, Ctrl-C, and the end-of-epoch state that ``--resume`` continues from."""

import contextlib
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple, cast

import numpy as np
import torch

from .. import EdgeKDError, Interrupted
from ..base.files import atomic_write
from ..base.jsonrec import record_dict, record_from, required
from ..base.progress import REPORT, bar
from .distributed import Context
from .metrics import EpochRecord
from .mixing import mixed_loss
from .precision import settle_student_dtype, student_autocast
from .safe_load import Refused, torch_file

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python's, torch's and numpy's generators."""
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed)


@torch.no_grad()
def evaluate(model: torch.nn.Module, views: Any, device: str = "cpu", batch_size: int = 256,
             dist: Optional[Context] = None) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on un-augmented views of a split; under DDP each rank
    scores every world-th image and the counts are summed, so the figure covers the whole split once."""
    was_training = model.training
    model.eval()
    shard = (dist.rank, dist.world_size) if dist is not None and dist.enabled else None
    correct = 0
    for x, y, _ in views.batches(batch_size, shard=shard):
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    model.train(was_training)
    if shard is not None and dist is not None:
        correct = dist.all_reduce_sum(torch.tensor([correct], dtype=torch.float64)).item()
    return correct / max(len(views), 1)


def make_optimizer(params: Any, cfg: Any) -> torch.optim.Optimizer:
    """--optimizer over the parameters that train."""
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise EdgeKDError(f"unknown optimizer {cfg.optimizer!r}: choose from adamw, sgd")


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then cosine to zero, x0.1 steps, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "step":  # the classic CIFAR schedule: /10 at half and three quarters of training
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    return 1.0


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, steps: int,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """--schedule with --warmup-epochs, stepped once per batch."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    schedule = cfg.schedule
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, warmup, schedule))


class TrainRun:
    """What one call of ``fit`` needs besides the model: data views, loss, teacher, cache, feature taps,
    and the process group (a single process unless run under torchrun)."""

    def __init__(self, train: Any, test: Any, loss_fn: Any, teacher: Any = None, cache: Any = None, taps: Any = None,
                 dist: Optional[Context] = None, memo: Any = None) -> None:
        self.train, self.test, self.loss_fn = train, test, loss_fn
        self.teacher, self.cache, self.taps = teacher, cache, taps
        self.memo = memo  # a LiveMemo: a live teacher asked once per image when views cannot differ
        self.mix = getattr(getattr(train, "plan", None), "mix", None)  # --mix: edgekd.core.mixing.MixPlan
        self.dist = dist or Context()
        self.local_images = 0  # training images this process stepped through (all epochs of this run)
        # --student-dtype: the CPU autocast dtype of the student's forward (None: float32) and why (metrics.json)
        self.student_autocast: Optional[torch.dtype] = None
        self.student_dtype: Optional[Dict[str, Any]] = None


def cuda_speedups(cfg: Any) -> Tuple[Optional[torch.dtype], bool]:
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


def _autocast(dtype: Optional[torch.dtype]) -> Any:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def _to_device(x: torch.Tensor, y: torch.Tensor, device: str, channels_last: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    if str(device).startswith("cuda"):  # pinned pages let the copy overlap with the previous step
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _teacher_logits(run: TrainRun, x: torch.Tensor, idx: Any, epoch: int,
                    xt: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    if run.cache is not None and run.taps is None:
        return run.cache.lookup(epoch, idx).to(x.device)
    if run.teacher is None:
        return None
    xt = xt if xt is not None else x  # the teacher's own view of the same crop when there is one
    if run.memo is not None and run.taps is None:
        return run.memo(run.teacher, xt, idx)
    return run.teacher(xt)


def _step(net: Any, run: TrainRun, x: torch.Tensor, y: torch.Tensor, idx: Any, epoch: int,
          xt: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor], Dict[str, torch.Tensor]]:
    t_logits = _teacher_logits(run, x, idx, epoch, xt)
    if run.student_autocast is None:
        s_logits = net(x)
    else:  # bf16 student on a CPU: its logits back to float32, so the loss and soft targets are float32
        with student_autocast(run.student_autocast):
            s_logits = net(x)
        s_logits = s_logits.float()
    extra: Dict[str, Any] = {}
    if run.taps is not None:  # the teacher's map is an inference-mode tensor: a clone can join autograd
        extra.update(features=(run.taps[0].output, run.taps[1].output.float().clone()))  # float: a bf16 teacher's too
    if run.mix is not None:  # function matching: the teacher's answer for the mixed picture, mixed labels
        view = run.train.plan.view_of(epoch)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        return s_logits, t_logits, mixed_loss(run.loss_fn, run.mix, view, size, s_logits, t_logits, y, idx, **extra)
    return s_logits, t_logits, run.loss_fn(s_logits, t_logits, y, **extra)


class _StopOnSigint:
    """Turn the first Ctrl-C into a flag checked after each batch; a second one stops at once."""

    def __enter__(self) -> "_StopOnSigint":
        self.requested = False
        self._previous = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread (e.g. inside a test runner thread): leave Ctrl-C alone
            self._previous = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class RngState:
    """The generators' states as a training state file holds them (tensors and plain types only)."""

    torch: torch.Tensor
    python: Any
    numpy: List[Any]

    @classmethod
    def now(cls) -> "RngState":
        np_state = cast(Tuple[Any, ...], np.random.get_state())  # the legacy tuple (MT19937)
        return cls(torch.get_rng_state(), random.getstate(),
                   [np_state[0], torch.from_numpy(np_state[1].astype("int64")), *np_state[2:]])

    def restore(self) -> None:
        torch.set_rng_state(self.torch)
        random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in self.python))
        kind, keys, *rest = self.numpy
        np.random.set_state((kind, keys.numpy().astype("uint32"), *rest))


@dataclass
class TrainState:
    """The end-of-epoch training state (``--resume``); on disk the dict of these fields (``rng`` a dict of
    RngState's), read back with weights_only=True."""

    epoch: int
    model: Dict[str, Any]
    loss_fn: Dict[str, Any]
    optimizer: Dict[str, Any]
    scheduler: Dict[str, Any]
    history: List[Dict[str, Any]]   # EpochRecord.to_json of each epoch done
    rng: Dict[str, Any]
    scaler: Optional[Dict[str, Any]] = None

    def to_dict(self) -> Dict[str, Any]:
        return record_dict(self, omit_none=frozenset({"scaler"}))

    @classmethod
    def from_dict(cls, d: Any) -> "TrainState":
        """The state of a loaded file; KeyError naming the first field missing."""
        if not isinstance(d, dict):
            raise TypeError(f"a {type(d).__name__}, not a training state")
        missing = [k for k in required(cls) if k not in d]
        if missing:
            raise KeyError(missing[0])
        return record_from(cls, d)


class _Loop:
    """The moving parts of one training run: the model, what runs it (DDP, torch.compile), the optimizer,
    schedule, gradient scaler and mixed-precision settings."""

    def __init__(self, model: torch.nn.Module, net: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                 scaler: Any, amp_dtype: Optional[torch.dtype], channels_last: bool) -> None:
        self.model, self.net, self.optimizer, self.scheduler = model, net, optimizer, scheduler
        self.scaler, self.amp_dtype, self.channels_last = scaler, amp_dtype, channels_last


def save_state(path: str, model: torch.nn.Module, run: TrainRun, optimizer: torch.optim.Optimizer, scheduler: Any,
               epoch: int, history: List[EpochRecord], scaler: Any = None) -> None:
    """The end-of-epoch training state (weights, optimizer, schedule, RNG, history), written atomically."""
    state = TrainState(epoch, model.state_dict(), run.loss_fn.state_dict(), optimizer.state_dict(),
                       scheduler.state_dict(), [h.to_json() for h in history], record_dict(RngState.now()),
                       None if scaler is None else scaler.state_dict())
    atomic_write(path, lambda tmp: torch.save(state.to_dict(), tmp))


def _resume_error(path: str, e: BaseException) -> EdgeKDError:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return EdgeKDError(f"cannot resume from {path!r}: {reason}; start again with --force")


def read_state(path: str) -> Any:
    """The training state file at ``path`` as loaded, without running pickled code (EdgeKDError when refused);
    ``apply_state`` reads it into a TrainState on every rank."""
    try:
        return torch_file(path, "training state")
    except Refused as e:
        raise _resume_error(path, e.__cause__ or e) from e.__cause__


def apply_state(loaded: Any, path: str, model: torch.nn.Module, run: TrainRun, optimizer: torch.optim.Optimizer,
                scheduler: Any, scaler: Any = None) -> Tuple[int, List[EpochRecord]]:
    """Restore a training state (``read_state``'s); returns (epochs done, history)."""
    try:
        state = TrainState.from_dict(loaded)
        model.load_state_dict(state.model)
        run.loss_fn.load_state_dict(state.loss_fn)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        if scaler is not None and state.scaler is not None:
            scaler.load_state_dict(state.scaler)
        record_from(RngState, state.rng).restore()
        history = [EpochRecord.from_json(h) for h in state.history]
    except Exception as e:
        raise _resume_error(path, e) from e
    return state.epoch, history


def fit(model: torch.nn.Module, run: TrainRun, cfg: Any, desc: str = "train",
        state_path: Optional[str] = None) -> List[EpochRecord]:
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
    history: List[EpochRecord] = []
    done = 0
    if state_path and cfg.resume:
        # rank 0 reads the state and sends it to every rank: other machines need not see the file
        state = dist.broadcast_object(read_state(state_path) if dist.is_main and os.path.isfile(state_path) else None)
        if state is not None:
            done, history = apply_state(state, state_path, model, run, optimizer, scheduler, scaler)
            log.info("%s: resuming after epoch %d from %s", desc, done, state_path)
            if cfg.progress and dist.is_main:
                REPORT.info("%s: resuming after epoch %d/%d", desc, done, cfg.epochs)
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


def _train_batches(run: TrainRun, cfg: Any, epoch: int) -> Iterator[Any]:
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


def _backward(loop: _Loop, run: TrainRun, loss: torch.Tensor) -> None:
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


def _nan_source(x: torch.Tensor, t_logits: Optional[torch.Tensor], s_logits: torch.Tensor) -> str:
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


class _Tally:
    """One epoch's running counts on this process: images, labelled ones, right answers of the student and the
    teacher, and each loss part summed over images."""

    def __init__(self) -> None:
        self.seen, self.labelled, self.correct, self.t_correct = 0.0, 0.0, 0.0, 0.0
        self.sums: Dict[str, float] = {}

    def add(self, y: torch.Tensor, s_logits: torch.Tensor, t_logits: Optional[torch.Tensor],
            parts: Dict[str, torch.Tensor]) -> None:
        self.seen += len(y)
        has_label = y >= 0  # unlabelled images (--unlabeled, label -1) have no right answer to count
        self.labelled += has_label.sum().item()
        self.correct += (s_logits.detach().argmax(1) == y)[has_label].sum().item()
        if t_logits is not None:  # how right the teacher is on the views it is shown (augmentation can hurt it)
            self.t_correct += (t_logits.detach().argmax(1) == y)[has_label].sum().item()
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.item() * len(y)

    def postfix(self, world: int, start: float) -> Dict[str, str]:
        """The progress bar's running figures: the loss and its task and KD parts, images per second."""
        mean = {k: v / self.seen for k, v in self.sums.items()}
        shown = {"loss": "loss", "task": "task_loss", "kd": "kd_loss"}
        return {**{name: f"{mean[k]:.3f}" for name, k in shown.items() if k in mean},
                "ips": f"{self.seen * world / (time.perf_counter() - start):.0f}"}

    def summed(self, dist: Context) -> "_Tally":
        """The counts summed over every rank (this process's alone without torchrun)."""
        keys = sorted(self.sums)
        totals = dist.all_reduce_sum(torch.tensor([self.seen, self.labelled, self.correct, self.t_correct]
                                                  + [self.sums[k] for k in keys], dtype=torch.float64)).tolist()
        out = _Tally()
        out.seen, out.labelled, out.correct, out.t_correct = totals[:4]
        out.sums = dict(zip(keys, totals[4:]))
        return out


def _epoch(loop: _Loop, run: TrainRun, cfg: Any, desc: str, epoch: int, steps_per_epoch: int,
           stop: _StopOnSigint) -> EpochRecord:
    """One epoch of training and its evaluation; returns the epoch's record (counts summed over ranks)."""
    dist, device = run.dist, cfg.device
    if hasattr(run.loss_fn, "set_epoch"):
        run.loss_fn.set_epoch(epoch)
    timed_teacher = run.teacher is not None and hasattr(run.teacher, "take_seconds")
    if timed_teacher:
        run.teacher.take_seconds()  # count this epoch's teacher forwards only
    tally, start = _Tally(), time.perf_counter()
    progress = bar(_train_batches(run, cfg, epoch), total=steps_per_epoch, desc=f"{desc} {epoch}/{cfg.epochs}",
                   unit="batch", disable=not (cfg.progress and dist.is_main), leave=True)
    for batch, (x, xt, y, idx) in enumerate(progress, 1):
        x, y = _to_device(x, y, device, loop.channels_last)
        if xt is not None:
            xt, _ = _to_device(xt, y, device, loop.channels_last)
        with _autocast(loop.amp_dtype):
            s_logits, t_logits, parts = _step(loop.net, run, x, y, idx, epoch, xt)
        loss = parts["loss"]
        bad, stopping = not torch.isfinite(loss).item(), stop.requested
        if dist.enabled:  # every rank must leave the loop at the same batch, or the others wait forever
            bad, stopping = (v > 0 for v in dist.all_reduce_sum(torch.tensor([float(bad), float(stopping)])).tolist())
        if bad:
            raise EdgeKDError(f"{desc}: loss became {loss.item()} in epoch {epoch}, batch {batch}: "
                              f"{_nan_source(x, t_logits, s_logits)}; the last complete epoch ({epoch - 1}) is kept")
        _backward(loop, run, loss)
        tally.add(y, s_logits, t_logits, parts)
        progress.set_postfix(**tally.postfix(dist.world_size, start))
        if stopping:
            progress.close()
            raise Interrupted(f"interrupted in epoch {epoch} of {desc}; the last complete epoch ({epoch - 1}) is saved")
    seconds = time.perf_counter() - start
    run.local_images += int(tally.seen)
    return _epoch_record(loop, run, cfg, desc, epoch, tally.summed(dist), seconds, timed_teacher)


def _epoch_record(loop: _Loop, run: TrainRun, cfg: Any, desc: str, epoch: int, total: _Tally, seconds: float,
                  timed_teacher: bool) -> EpochRecord:
    """The epoch's record, after the test split's evaluation; logged, and shown with --progress."""
    dist = run.dist
    dist.sync_buffers(loop.model)
    every = getattr(cfg, "eval_every", 1) or 1
    evaluated = epoch % every == 0 or epoch == cfg.epochs
    top1 = evaluate(loop.model, run.test, cfg.device, dist=dist) if evaluated else None
    seen, labelled = max(total.seen, 1), max(total.labelled, 1)
    t_seconds = run.teacher.take_seconds() if timed_teacher else None  # 0 when its logits come from the cache
    record = EpochRecord(
        epoch, {k: v / seen for k, v in total.sums.items()}, total.correct / labelled, top1,
        loop.scheduler.get_last_lr()[0], total.seen / seconds, seconds,
        teacher_train_top1=total.t_correct / labelled if run.teacher is not None or run.cache is not None else None,
        teacher_seconds=t_seconds,
        teacher_share=t_seconds / seconds if t_seconds is not None and seconds > 0 else None)
    log.info("%s epoch %d: %s", desc, epoch,
             {k: round(v, 4) for k, v in record.to_json().items() if isinstance(v, float)})
    if cfg.progress and dist.is_main:
        terms = "  ".join(f"{k} {v:.4f}" for k, v in record.terms.items())
        REPORT.info("%s %d/%d: %s  test top-1 %s  (%.0f img/s)", desc, epoch, cfg.epochs, terms,
                    "-" if top1 is None else f"{top1:.4f}", record.images_per_s)
    return record
