"""Exact cached teacher outputs (the FKD idea): the teacher's logits for every (image, epoch) view, once.

A distillation step spends most of its time in the teacher's forward pass when the teacher is
larger than the student. Because the augmentation of image ``i`` in epoch ``e`` is fixed by the
augmentation seed (edgekd.augment.AugmentPlan), the teacher's answer for that view can be computed
once and replayed: the student learns from exactly what the teacher said about exactly the view it
sees. The cache is a file keyed by the teacher checkpoint's sha256, the augmentation seed and the
training images, so any run with the same teacher, data and seed reuses it (several seeds,
several losses) and a changed teacher can never be served stale logits.

Any teacher of edgekd.teachers is keyed by its own sha256 (a checkpoint, ONNX or OpenVINO file, a bundle's
manifest hashes, a pretrained model's weights) and by its view of the data (input size, mean/std,
colour, outputs, class mapping). With ``--teacher-views K`` the augmentation plan replays K views per
image (epoch e shows view (e - 1) mod K + 1), so the cache holds K epochs and serves a run of any length.
"""

import hashlib
import json
import logging
import os

import torch

from .. import EdgeKDError
from .checkpoint import atomic_write, file_sha256  # noqa: F401  (file_sha256: its old home)

log = logging.getLogger(__name__)



def data_fingerprint(views):
    """A hash of the training images, labels and normalisation: the cache is only valid for these."""
    if hasattr(views, "fingerprint"):  # views decoded from the files (edgekd.stream): files, labels, geometry
        return views.fingerprint()
    h = hashlib.sha256()
    h.update(views.images.contiguous().numpy().tobytes())
    h.update(views.targets.numpy().tobytes())
    h.update(json.dumps([views.mean.flatten().tolist(), views.std.flatten().tolist()]).encode())
    return h.hexdigest()


class TeacherCache:
    """Teacher logits per (view, image index) for one teacher, augmentation plan and data.

    ``teacher`` is an edgekd.teachers.Teacher (keyed by its sha256 and its view of the data) or the path
    of a teacher checkpoint (keyed by the file's sha256 alone).
    """

    def __init__(self, folder, teacher, views):
        if views.plan is None:
            raise EdgeKDError("the teacher cache needs an augmentation plan")
        if isinstance(teacher, (str, os.PathLike)):
            self.teacher_sha, view = file_sha256(teacher), None
        else:
            self.teacher_sha, view = teacher.sha256, teacher.cache_key()
        self.key = {"teacher_sha256": self.teacher_sha, **views.plan.describe(), "data_sha256": data_fingerprint(views)}
        if view is not None:
            self.key["teacher_view"] = view
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = os.path.join(folder, f"teacher-{self.teacher_sha[:12]}-aug{views.plan.seed}-{digest}.pt")
        self.views = views
        self.logits = None  # (epochs, N, classes) float32

    def load(self):
        if os.path.isfile(self.path):
            from .. import EdgeKDError
            from .safe_load import torch_file

            try:
                blob = torch_file(self.path, "teacher cache")
            except EdgeKDError:  # a damaged cache file is computed again
                return
            if isinstance(blob, dict) and blob.get("key") == self.key:
                self.logits = blob["logits"]

    @property
    def epochs(self):
        return 0 if self.logits is None else self.logits.shape[0]

    @torch.no_grad()
    def build(self, teacher, epochs, batch_size=256, device="cpu", progress=True):
        """Make sure the views of epochs 1..``epochs`` are cached, computing only the missing ones (with
        ``--teacher-views K`` at most K). Returns seconds spent."""
        import time

        from ..base.progress import bar

        self.load()
        if self.views.plan.views:
            epochs = min(epochs, self.views.plan.views)
        if self.epochs >= epochs:
            log.info("teacher cache hit: %s (%d epochs)", self.path, self.epochs)
            return 0.0
        start, n = time.perf_counter(), len(self.views)
        teacher.eval().to(device)
        new = []
        for epoch in range(self.epochs + 1, epochs + 1):
            out, rows = [], []
            for x, xt, _, idx in bar(self.views.batches(batch_size, epoch=epoch, teacher_view=True),
                                     total=-(-n // batch_size), desc=f"teacher cache epoch {epoch}/{epochs}",
                                     unit="batch", disable=not progress):
                out.append(teacher((xt if xt is not None else x).to(device)).float().cpu())
                rows.append(idx)
            logits = torch.cat(out)
            # by index: an unreadable image left out (--skip-bad-images) keeps a zero row that is never looked up
            placed = logits.new_zeros((n, logits.shape[1]))
            placed[torch.cat(rows)] = logits
            new.append(placed)
        stacked = torch.stack(new)
        self.logits = stacked if self.logits is None else torch.cat([self.logits, stacked])
        blob = {"key": self.key, "logits": self.logits}
        atomic_write(self.path, lambda tmp: torch.save(blob, tmp))
        seconds = time.perf_counter() - start
        log.info("teacher cache: %d epochs x %d views in %.1f s -> %s", len(new), n, seconds, self.path)
        return seconds

    def lookup(self, epoch, idx):
        """The cached teacher logits of images ``idx`` as seen in ``epoch`` (1-based)."""
        epoch = self.views.plan.view_of(epoch)
        if epoch > self.epochs:
            raise EdgeKDError(f"teacher cache {self.path} holds {self.epochs} epochs, epoch {epoch} was asked for")
        return self.logits[epoch - 1, idx]
