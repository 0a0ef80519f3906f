"""What ``edgekd train`` and ``edgekd distill`` record: one epoch's figures (``EpochRecord``) and a run's
metrics.json (``RunMetrics``, DESIGN.md "Machine-readable outputs"), written as JSON at the edge (``to_json``)."""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from ..base.jsonrec import field_names, record_dict, record_from

JSON = Dict[str, Any]


@dataclass
class EpochRecord:
    """One epoch of training: the loss's parts averaged over its images, accuracy, learning rate and speed."""

    epoch: int
    terms: Dict[str, float]                      # the loss's parts by name (loss, task_loss, kd_loss, ...)
    train_top1: float
    test_top1: Optional[float]                   # None for an epoch not evaluated (--eval-every)
    lr: float
    images_per_s: float
    seconds: float
    teacher_train_top1: Optional[float] = None   # with a teacher (live or cached): its top-1 on the views shown
    teacher_seconds: Optional[float] = None      # a live teacher's own forward time (0 when cached)
    teacher_share: Optional[float] = None        # teacher_seconds / seconds (None for an epoch of 0 s)

    def to_json(self) -> JSON:
        """The history entry of metrics.json: the parts by name beside the other figures."""
        d = record_dict(self, omit_none=frozenset({"teacher_train_top1", "teacher_seconds"}))
        terms, epoch = d.pop("terms"), d.pop("epoch")
        if self.teacher_seconds is None:  # the share is written beside the seconds (even when it is None)
            d.pop("teacher_share")
        return {"epoch": epoch, **terms, **d}

    @classmethod
    def from_json(cls, d: JSON) -> "EpochRecord":
        """The record of a history entry (a resumed run's state file holds them as JSON)."""
        names = field_names(cls)
        return record_from(cls, d, terms={k: float(v) for k, v in d.items() if k not in names})


@dataclass(kw_only=True)
class RunMetrics:
    """A run's metrics.json (its keys in this order). The teacher trained by distill writes the first group (and
    ``source``); train adds the run's records, distill also the loss, the teacher and how its logits were served."""

    model: str
    epochs: int
    test_top1: Optional[float] = None            # the last epoch's, or after the batch-norm re-estimation
    best_top1: Optional[float] = None
    history: List[EpochRecord]
    params: int
    flops: Optional[int]
    data: str
    batchnorm: Optional[JSON] = None             # edgekd.core.batchnorm's report (models with batch norm)
    source: Optional[str] = None                 # "trained": a teacher trained by distill
    loss: Optional[str] = None                   # distill only, from here on
    loss_params: Optional[JSON] = None
    teacher: Optional[JSON] = None
    run: Optional["RunRecords"] = None           # train and distill's own run (not the trained teacher's)

    @classmethod
    def of(cls, spec: str, epochs: int, history: List[EpochRecord], params: int, flops: Optional[int],
           data: str) -> "RunMetrics":
        """The summary of a finished ``history``: the last and the best test top-1."""
        evaluated = [h.test_top1 for h in history if h.test_top1 is not None]  # --eval-every skips some epochs
        return cls(model=spec, epochs=epochs, test_top1=history[-1].test_top1 if history else None,
                   best_top1=max(evaluated, default=None), history=history, params=params, flops=flops, data=data)

    def to_json(self) -> JSON:
        """metrics.json's dict (JSON types only; paths are made relative by the writer)."""
        d = record_dict(self, omit_none=frozenset({"batchnorm", "source", "loss", "loss_params", "teacher"}))
        d.update(history=[h.to_json() for h in self.history])
        run = d.pop("run")
        return {**d, **(run.to_json(distill=self.loss is not None) if run is not None else {})}


@dataclass
class RunRecords:
    """What a train or distill run records beside its figures."""

    pretrained: Optional[JSON]        # edgekd.core.pretrained's record of the student's starting weights
    image_store: Optional[JSON]       # edgekd.core.image_store's record, or None
    student_dtype: Optional[JSON]     # --student-dtype's choice and why
    train_data: JSON                  # the data as trained on (distill.data_record)
    cpu: JSON                         # threads, cores, OpenMP wait policy (edgekd.base.cpu)
    distributed: JSON                 # the torchrun job, one record per rank
    teacher_cache: Optional[JSON] = None   # distill: the teacher cache's record, or None
    teacher_memo: Optional[JSON] = None    # distill: the live teacher's memo, or None

    def to_json(self, distill: bool) -> JSON:
        """The run's part of metrics.json: distill records its teacher's cache and memo, then the CPU and the job;
        train the job, then the CPU."""
        d = record_dict(self)
        cpu, job, cache, memo = (d.pop(k) for k in ("cpu", "distributed", "teacher_cache", "teacher_memo"))
        if distill:
            return {**d, "teacher_cache": cache, "teacher_memo": memo, "cpu": cpu, "distributed": job}
        return {**d, "distributed": job, "cpu": cpu}
