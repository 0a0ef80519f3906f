"""Cached teacher outputs (the FKD idea): the teacher's logits for every (image, view), computed once.

A distillation step spends most of its time in the teacher's forward pass when the teacher is
larger than the student. Because the augmentation of image ``i`` in epoch ``e`` is fixed by the
augmentation seed (edgekd.augment.AugmentPlan), the teacher's answer for that view can be computed
once and replayed: the student learns from what the teacher said about exactly the view it sees.

On disk a cache is a folder: ``meta.json`` (the key and the storage) and one ``view-NNNN.npy`` per
view, written whole under a temporary name and renamed, then read memory-mapped, so a cache of
100,000 images x K views x 1,000 classes (200 MB per view in float16) never has to fit in memory and
an interrupted build keeps the views it finished. Storage: float16 logits (default; each logit
rounded to 11 significant bits, a relative 2^-11 = 0.05 %), float32 (bit-exact), or with
``topk=k`` only the k largest logits per view and one fill value for the rest (see ``fill_value``).

The key: the teacher's sha256 (a checkpoint, ONNX or OpenVINO file, a bundle's manifest hashes, a
pretrained model's weights), its view of the data (input size, mean/std, colour, outputs, class
mapping), the dtype it computes in when that is not float32, the augmentation plan and a hash of the
training images. Another teacher, seed, data or dtype is another folder, never stale logits. A cache
written by edgekd before this format (one ``.pt`` file) with the same key is converted, not recomputed.

Views that cannot differ are computed once: with ``--augment none`` every epoch shows the same
pixels, so one view serves every epoch; with ``--teacher-views K`` there are K.
"""

import hashlib
import json
import logging
import math
import os

import torch

from .. import EdgeKDError
from ..base.files import atomic_write
from .checkpoint import file_sha256  # noqa: F401  (file_sha256: its old home)

log = logging.getLogger(__name__)

DTYPES = ("float16", "float32")
FORMAT = 2
# float16's largest finite value is 65504; a teacher whose logits reach this is refused in float16.
FLOAT16_MAX = 65000.0


def data_fingerprint(views):
    """A hash of the training images, labels and normalisation: the cache is only valid for these."""
    if hasattr(views, "fingerprint"):  # views decoded from the files (edgekd.stream): files, labels, geometry
        return views.fingerprint()
    h = hashlib.sha256()
    h.update(views.images.contiguous().numpy().tobytes())
    h.update(views.targets.numpy().tobytes())
    h.update(json.dumps([views.mean.flatten().tolist(), views.std.flatten().tolist()]).encode())
    return h.hexdigest()


def distinct_views(plan):
    """How many different views an image has under ``plan`` (None: a new one every epoch)."""
    if plan.kind == "none" and getattr(plan, "mix", None) is None:  # every epoch shows the same pixels (a mix: not)
        return 1
    return plan.views


def view_number(plan, epoch):
    """The view (1-based) that ``epoch`` shows; epochs whose views cannot differ share one."""
    return 1 if distinct_views(plan) == 1 else plan.view_of(epoch)


def fill_value(logits, top_values, temperature):
    """One logit for every class outside the top k, per row: what the KD loss sees for them.

    With a temperature T it keeps the rest's share of the teacher's softmax at T exact:
    ``T * (logsumexp(rest / T) - log(C - k))``, so C - k classes at that logit hold the same mass as the
    real ones (FKD's uniform rest, at the loss's temperature; the top-k's distribution is exact).
    Without one (logit matching) it is the rest's mean, the constant nearest to them in squared error.
    """
    classes, k = logits.shape[1], top_values.shape[1]
    if k >= classes:
        return torch.zeros(len(logits))
    rest = logits.scatter(1, logits.topk(k, dim=1).indices, float("nan"))
    if temperature is None:
        return rest.nanmean(1)
    scaled = (rest / temperature).nan_to_num(nan=-math.inf)
    return temperature * (torch.logsumexp(scaled, 1) - math.log(classes - k))


class TeacherCache:
    """Teacher logits per (view, image index) for one teacher, augmentation plan and data.

    ``teacher`` is an edgekd.teachers.Teacher (keyed by its sha256, its view of the data and its dtype)
    or the path of a teacher checkpoint (keyed by the file's sha256 alone). ``dtype`` is the storage
    (float16 or float32); ``topk`` keeps the k largest logits per view, the rest filled by
    ``fill_value`` at ``temperature`` (the KD loss's; None for logit matching).
    """

    def __init__(self, folder, teacher, views, dtype="float16", topk=None, temperature=None):
        if views.plan is None:
            raise EdgeKDError("the teacher cache needs an augmentation plan")
        if dtype not in DTYPES:
            raise EdgeKDError(f"teacher cache dtype {dtype!r}: choose from {', '.join(DTYPES)}")
        if topk is not None and (int(topk) != topk or topk < 1):
            raise EdgeKDError(f"--teacher-cache-topk {topk!r}: expected a positive whole number")
        if isinstance(teacher, (str, os.PathLike)):
            self.teacher_sha, view, compute = file_sha256(teacher), None, None
        else:
            self.teacher_sha, view = teacher.sha256, teacher.cache_key()
            compute = getattr(teacher, "dtype_name", "float32")
        self.key = {"teacher_sha256": self.teacher_sha, **views.plan.describe(), "data_sha256": data_fingerprint(views)}
        if view is not None:
            self.key["teacher_view"] = view
        self.legacy_key = dict(self.key)  # what a one-file cache of earlier edgekd versions was keyed by
        if compute not in (None, "float32"):  # a bf16 teacher's answers are not a float32 teacher's
            self.key["teacher_dtype"] = f"{compute} (autocast)"  # how it was computed is part of the answer
        self.storage = {"format": FORMAT, "dtype": dtype, "topk": None if topk is None else int(topk),
                        "fill_temperature": None if topk is None else temperature}
        digest = hashlib.sha256(json.dumps([self.key, self.storage], sort_keys=True).encode()).hexdigest()[:16]
        name = f"teacher-{self.teacher_sha[:12]}-aug{views.plan.seed}"
        self.path = os.path.join(folder, f"{name}-{digest}")
        legacy = hashlib.sha256(json.dumps(self.legacy_key, sort_keys=True).encode()).hexdigest()[:16]
        self.legacy_path = os.path.join(folder, f"{name}-{legacy}.pt")
        self.views, self.classes = views, None
        self._arrays = {}  # view number -> memory-mapped array

    # -- what is on disk ---------------------------------------------------------------------------

    def _view_file(self, v):
        return os.path.join(self.path, f"view-{v:04d}.npy")

    def _meta(self):
        return {"key": self.key, "storage": self.storage, "images": len(self.views), "classes": self.classes}

    def load(self):
        """Read meta.json when its key matches (another key in this folder is an error: never served)."""
        meta_path = os.path.join(self.path, "meta.json")
        if not os.path.isfile(meta_path):
            return
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("key") != self.key or meta.get("storage") != self.storage:
            raise EdgeKDError(f"teacher cache {self.path} was written for another teacher, data or storage; "
                              "delete that folder (edgekd wrote it) and run again")
        self.classes = meta["classes"]

    def held(self):
        """The view numbers stored complete on disk."""
        if not os.path.isdir(self.path):
            return []
        return sorted(int(n[5:9]) for n in os.listdir(self.path) if n.startswith("view-") and n.endswith(".npy"))

    @property
    def epochs(self):
        """Views held (the old name: one view per epoch before views could be shared)."""
        return len(self.held())

    def needed(self, epochs):
        """The view numbers that epochs 1..``epochs`` show."""
        return sorted({view_number(self.views.plan, e) for e in range(1, int(epochs) + 1)})

    def _array(self, v):
        if v not in self._arrays:
            import numpy as np

            if not os.path.isfile(self._view_file(v)):
                raise EdgeKDError(f"teacher cache {self.path} holds views {self.held()}, view {v} was asked for")
            self._arrays[v] = np.load(self._view_file(v), mmap_mode="r")
        return self._arrays[v]

    # -- writing -------------------------------------------------------------------------------------

    def _start(self, classes):
        if self.classes is not None and self.classes != classes:
            raise EdgeKDError(f"teacher cache {self.path} holds {self.classes} classes, the teacher gives {classes}")
        if self.storage["topk"] and self.storage["topk"] >= classes:
            raise EdgeKDError(f"--teacher-cache-topk {self.storage['topk']}: the teacher has only {classes} classes; "
                              "keep all logits (leave it out) or choose fewer")
        if classes > 32767 and self.storage["topk"]:
            raise EdgeKDError(f"--teacher-cache-topk stores class indices as int16: {classes} classes are too many")
        self.classes = classes
        os.makedirs(self.path, exist_ok=True)
        meta_path = os.path.join(self.path, "meta.json")
        if not os.path.isfile(meta_path):
            atomic_write(meta_path, lambda tmp: _write_json(tmp, self._meta()))

    def _row_dtype(self):
        import numpy as np

        dt = np.float16 if self.storage["dtype"] == "float16" else np.float32
        k = self.storage["topk"]
        if not k:
            return dt, (self.classes,)
        return np.dtype([("values", dt, (k,)), ("index", np.int16, (k,)), ("fill", dt)]), ()

    def _encode(self, logits):
        """A batch of float32 logits as storage rows (a numpy array)."""
        import numpy as np

        if self.storage["dtype"] == "float16" and logits.abs().max().item() > FLOAT16_MAX:
            raise EdgeKDError(f"the teacher's logits reach {logits.abs().max().item():.3g}, beyond float16; "
                              "use --teacher-cache-dtype float32")
        dtype, _ = self._row_dtype()
        k = self.storage["topk"]
        if not k:
            return logits.numpy().astype(dtype)
        top = logits.topk(k, dim=1)
        rows = np.empty(len(logits), dtype=dtype)
        rows["values"], rows["index"] = top.values.numpy(), top.indices.numpy().astype(np.int16)
        rows["fill"] = fill_value(logits, top.values, self.storage["fill_temperature"]).numpy()
        return rows

    def _write_view(self, v, batches):
        """Write view ``v`` from an iterator of (idx, float32 logits) into a file of its own, renamed when whole.
        Rows never given (an image left out by --skip-bad-images) stay zero and are never looked up."""
        from numpy.lib.format import open_memmap

        final = self._view_file(v)
        tmp, out = f"{final}.tmp-{os.getpid()}", None
        try:
            for idx, logits in batches:
                if out is None:  # the class count is known from the first batch
                    self._start(int(logits.shape[1]))
                    dtype, tail = self._row_dtype()
                    out = open_memmap(tmp, mode="w+", dtype=dtype, shape=(len(self.views), *tail))
                out[idx.numpy()] = self._encode(logits)
            out.flush()
            del out
            os.replace(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @torch.no_grad()
    def build(self, teacher, epochs, batch_size=256, device="cpu", progress=True):
        """Make sure the views of epochs 1..``epochs`` are cached, computing only the missing ones (one view
        with --augment none, at most K with ``--teacher-views K``). Returns seconds spent."""
        import time

        from ..base.progress import bar

        self.load()
        missing = [v for v in self.needed(epochs) if v not in self.held()]
        if not missing:
            log.info("teacher cache hit: %s (%d views)", self.path, self.epochs)
            return 0.0
        start, n = time.perf_counter(), len(self.views)
        if self._import_legacy(missing):
            return time.perf_counter() - start
        teacher.eval().to(device)
        for v in missing:
            def logits(v=v):  # the teacher's own view of each crop when there is one (edgekd.stream)
                for x, xt, _, idx in bar(self.views.batches(batch_size, epoch=v, teacher_view=True),
                                         total=-(-n // batch_size), desc=f"teacher cache view {v}", unit="batch",
                                         disable=not progress):
                    yield idx, teacher((xt if xt is not None else x).to(device)).float().cpu()
            self._write_view(v, logits())
        seconds = time.perf_counter() - start
        log.info("teacher cache: %d views x %d images in %.1f s -> %s", len(missing), n, seconds, self.path)
        return seconds

    def _import_legacy(self, missing):
        """Convert a one-file cache of an earlier edgekd (same key) instead of running the teacher again."""
        from .safe_load import torch_file

        if not os.path.isfile(self.legacy_path) or self.key != self.legacy_key:
            return False
        try:
            blob = torch_file(self.legacy_path, "teacher cache")
        except EdgeKDError:  # a damaged old file: computed again
            return False
        if not isinstance(blob, dict) or blob.get("key") != self.legacy_key:
            return False
        logits = blob["logits"]  # (epochs, N, classes) float32; its epoch e was view e
        if any(v > len(logits) for v in missing):
            return False
        for v in missing:
            self._write_view(v, [(torch.arange(logits.shape[1]), logits[v - 1])])
        log.info("teacher cache: converted %s into %s (%d views); the old file can be deleted",
                 self.legacy_path, self.path, len(missing))
        return True

    # -- reading -------------------------------------------------------------------------------------

    def lookup(self, epoch, idx):
        """The cached teacher logits (float32) of images ``idx`` as seen in ``epoch`` (1-based)."""
        import numpy as np

        rows = self._array(view_number(self.views.plan, epoch))[np.asarray(idx)]
        if not self.storage["topk"]:
            return torch.from_numpy(rows.astype(np.float32))
        return self.expand(torch.from_numpy(rows["values"].astype(np.float32)),
                           torch.from_numpy(rows["index"].astype(np.int64)),
                           torch.from_numpy(rows["fill"].astype(np.float32)), self.classes)

    @staticmethod
    def expand(values, index, fill, classes):
        """Full logits from the top-k ``values`` at ``index`` and one ``fill`` per row for the rest."""
        return fill.view(-1, 1).expand(len(fill), classes).clone().scatter_(1, index, values)

    def describe(self):
        """The cache's record for metrics.json."""
        return {"path": self.path, "views_held": self.epochs, "storage": self.storage, "classes": self.classes,
                "bytes": sum(os.path.getsize(self._view_file(v)) for v in self.held())}


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# A live teacher's answers are kept in memory up to this size when every epoch shows the same views.
MEMO_LIMIT_BYTES = 512 * 1024 ** 2


class LiveMemo:
    """A live teacher's logits, remembered when views cannot differ (--augment none, no --teacher-cache).

    The first epoch asks the teacher; later epochs read what it said about the same pixels, so ten
    epochs cost one teacher pass, not ten. Float32, as the teacher returned them: the same answers as
    asking again. Images are remembered as they come, so a resumed run or a DDP rank fills its own share.
    """

    def __init__(self, images):
        self.images, self.logits, self.known = int(images), None, torch.zeros(int(images), dtype=torch.bool)
        self.teacher_calls = 0

    @classmethod
    def for_run(cls, plan, images, classes):
        """A memo for this run, or None when views differ by epoch or the logits would not fit the limit."""
        if plan is None or distinct_views(plan) != 1:
            return None
        if images * classes * 4 > MEMO_LIMIT_BYTES:
            log.info("the teacher's logits for %d images x %d classes exceed %d MB: it runs every epoch; "
                     "--teacher-cache DIR keeps them on disk", images, classes, MEMO_LIMIT_BYTES // 1024 ** 2)
            return None
        return cls(images)

    def __call__(self, teacher, x, idx):
        idx = torch.as_tensor(idx, dtype=torch.long).cpu()
        if self.logits is not None and bool(self.known[idx].all()):
            return self.logits[idx].to(x.device)
        out = teacher(x)
        self.teacher_calls += 1
        if self.logits is None:
            self.logits = torch.empty(self.images, out.shape[1])
        self.logits[idx] = out.detach().float().cpu()
        self.known[idx] = True
        return out
