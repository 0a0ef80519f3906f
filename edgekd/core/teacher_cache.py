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
import re
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Set, Tuple

import numpy as np
import torch
from numpy.lib.format import open_memmap

from .. import EdgeKDError
from ..base.bounds import MAX_BATCH_BYTES, MAX_CLASSES, batch_bytes
from ..base.integrity import Index, read_description, read_record
from ..base.jsonrec import field_names, record_dict, record_from
from ..base.progress import bar
from .checkpoint import file_sha256
from .safe_load import torch_file

log = logging.getLogger(__name__)

DTYPES = ("float16", "float32")
FORMAT = 2
# float16's largest finite value is 65504; a teacher whose logits reach this is refused in float16.
FLOAT16_MAX = 65000.0
META = "meta.json"  # the cache's description and its views' checksums (an edgekd.base.integrity index)
_VIEW_NAME = re.compile(r"^view-(\d{4})\.npy$")
# A top-k row's fields: the k largest logits, their class indices, and the one logit of every other class.
TOPK_FIELDS = ("values", "index", "fill")


@dataclass(frozen=True)
class Storage:
    """How a cache stores the logits (meta.json's ``storage``): float16 or float32, all of them or the top k."""

    format: int
    dtype: str
    topk: Optional[int]
    fill_temperature: Optional[float]   # the top-k's fill value's temperature (None: all logits, or the mean)

    def to_json(self) -> Dict[str, Any]:
        return record_dict(self)


@dataclass(frozen=True)
class CacheMeta:
    """meta.json's description of a cache: its key, storage, and the images and classes of every view."""

    key: Any
    storage: Any
    images: Any
    classes: Any

    @classmethod
    def from_json(cls, d: Any) -> Optional["CacheMeta"]:
        """The description in a parsed meta.json, or None when it is not one (not a dict, or fields missing)."""
        if not isinstance(d, dict) or not field_names(cls) <= d.keys():
            return None
        return record_from(cls, d)


@dataclass(frozen=True)
class LegacyCache:
    """A one-file cache of edgekd before the folder format: its key and (epochs, N, classes) float32 logits."""

    key: Any
    logits: Any

    @classmethod
    def read(cls, path: str) -> Optional["LegacyCache"]:
        """The file at ``path`` when it is one (loaded without running pickled code), else None."""
        try:
            blob = torch_file(path, "teacher cache")
        except EdgeKDError:  # a damaged old file: computed again
            return None
        if not isinstance(blob, dict) or not field_names(cls) <= blob.keys():
            return None
        return record_from(cls, blob)


def data_fingerprint(views: Any) -> str:
    """A hash of the training images, labels and normalisation: the cache is only valid for these."""
    if hasattr(views, "fingerprint"):  # views decoded from the files (edgekd.stream): files, labels, geometry
        return views.fingerprint()
    h = hashlib.sha256()
    h.update(views.images.contiguous().numpy().tobytes())
    h.update(views.targets.numpy().tobytes())
    h.update(json.dumps([views.mean.flatten().tolist(), views.std.flatten().tolist()]).encode())
    return h.hexdigest()


def distinct_views(plan: Any) -> int:
    """How many different views an image has under ``plan`` (None: a new one every epoch)."""
    if plan.kind == "none" and getattr(plan, "mix", None) is None:  # every epoch shows the same pixels (a mix: not)
        return 1
    return plan.views


def view_number(plan: Any, epoch: int) -> int:
    """The view (1-based) that ``epoch`` shows; epochs whose views cannot differ share one."""
    return 1 if distinct_views(plan) == 1 else plan.view_of(epoch)


def fill_value(logits: torch.Tensor, top_values: torch.Tensor, temperature: Optional[float]) -> torch.Tensor:
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

    def __init__(self, folder: str, teacher: Any, views: Any, dtype: str = "float16", topk: Optional[int] = None,
                 temperature: Optional[float] = None) -> None:
        if views.plan is None:
            raise EdgeKDError("the teacher cache needs an augmentation plan")
        if dtype not in DTYPES:
            raise EdgeKDError(f"teacher cache dtype {dtype!r}: choose from {', '.join(DTYPES)}")
        if topk is not None and (int(topk) != topk or topk < 1):
            raise EdgeKDError(f"--teacher-cache-topk {topk!r}: expected a positive whole number")
        if isinstance(teacher, (str, os.PathLike)):
            self.teacher_sha, view, compute = file_sha256(os.fspath(teacher)), None, None
        else:
            self.teacher_sha, view = teacher.sha256, teacher.cache_key()
            compute = getattr(teacher, "dtype_name", "float32")
        # what a one-file cache of earlier edgekd versions was keyed by
        self.legacy_key: Dict[str, Any] = {"teacher_sha256": self.teacher_sha, **views.plan.describe(),
                                           "data_sha256": data_fingerprint(views),
                                           **({} if view is None else {"teacher_view": view})}
        # a bf16 teacher's answers are not a float32 teacher's: how it was computed is part of the answer
        autocast = {} if compute in (None, "float32") else {"teacher_dtype": f"{compute} (autocast)"}
        self.key: Dict[str, Any] = {**self.legacy_key, **autocast}
        self.storage = Storage(FORMAT, dtype, None if topk is None else int(topk), None if topk is None else temperature)
        digest = hashlib.sha256(json.dumps([self.key, self.storage.to_json()],
                                           sort_keys=True).encode()).hexdigest()[:16]
        name = f"teacher-{self.teacher_sha[:12]}-aug{views.plan.seed}"
        self.path = os.path.join(folder, f"{name}-{digest}")
        legacy = hashlib.sha256(json.dumps(self.legacy_key, sort_keys=True).encode()).hexdigest()[:16]
        self.legacy_path = os.path.join(folder, f"{name}-{legacy}.pt")
        self.views = views
        self.classes: Optional[int] = None
        self._arrays: Dict[int, Any] = {}  # view number -> memory-mapped array
        self._integrity: Optional[Index] = None
        self._verified: Set[int] = set()  # views whose checksum and header were checked in this process

    # -- what is on disk ---------------------------------------------------------------------------

    def _view_file(self, v: int) -> str:
        return os.path.join(self.path, f"view-{v:04d}.npy")

    def _meta(self) -> Dict[str, Any]:
        return record_dict(CacheMeta(self.key, self.storage.to_json(), len(self.views), self.classes))

    def _damaged(self, why: str) -> EdgeKDError:
        return EdgeKDError(f"teacher cache {self.path} {why}; delete that folder (edgekd wrote it) and run again")

    def load(self) -> None:
        """Read meta.json when its key matches (another key in this folder is an error: never served); a meta.json
        that is not one edgekd wrote is refused in one line, never trusted."""
        meta_path = os.path.join(self.path, META)
        if not os.path.lexists(meta_path):
            return
        try:  # an index (edgekd.base.integrity) describing the cache; before checksums, the description alone
            meta = CacheMeta.from_json(read_description(meta_path) or read_record(meta_path))
        except ValueError as e:  # not a regular file, not JSON, too large, nested too deeply
            raise self._damaged(f"has an unreadable {META} ({str(e)[:100]})") from None
        if meta is None or meta.key != self.key or meta.storage != self.storage.to_json():
            raise self._damaged("was written for another teacher, data or storage")
        classes = meta.classes
        if meta.images != len(self.views) or isinstance(classes, bool) or not isinstance(classes, int) \
                or not 1 <= classes <= MAX_CLASSES:
            raise self._damaged(f"describes {meta.images!r} images of {classes!r} classes, not "
                                f"{len(self.views)} images of 1 to {MAX_CLASSES} classes")
        self.classes = classes

    def held(self) -> List[int]:
        """The view numbers stored complete on disk (named view-NNNN.npy; other names are not views)."""
        if not os.path.isdir(self.path):
            return []
        return sorted(int(m.group(1)) for m in map(_VIEW_NAME.match, os.listdir(self.path)) if m)

    def _index(self) -> Index:
        """The checksummed index of the views (edgekd.base.integrity), for this key, storage and shape."""
        if self._integrity is None:
            self._integrity = Index.open(self.path, self._meta(), name=META)
            if self._integrity.problem:
                log.warning("teacher cache %s: %s; its views are computed again", self.path, self._integrity.problem)
        return self._integrity

    def _view_problem(self, v: int) -> Optional[str]:
        """Why view ``v`` on disk cannot be trusted (checksum, or a header of another dtype or shape), or None."""
        name = os.path.basename(self._view_file(v))
        problem = self._index().check(name)
        if problem:
            return problem
        dtype, tail = self._row_dtype()
        try:
            with open(self._view_file(v), "rb") as f:
                version = np.lib.format.read_magic(f)
                read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                if version not in read:
                    return f"{name} is a numpy file of version {version}, which edgekd does not write"
                shape, _, found = read[version](f)  # the header only: no data, never a pickle
        except (OSError, ValueError) as e:
            return f"{name} is not a numpy array file ({str(e)[:80]})"
        if found != np.dtype(dtype) or tuple(shape) != (len(self.views), *tail):
            return f"{name} holds {found} {tuple(shape)}, {np.dtype(dtype)} {(len(self.views), *tail)} was expected"
        return None

    def _check_views(self) -> None:
        """Every view on disk proves itself before use; one that does not is removed and computed again."""
        for v in self.held():
            path = self._view_file(v)
            problem = self._view_problem(v) if self.classes is not None else f"the cache has no {META}"
            if not problem:
                self._verified.add(v)
                continue
            if os.path.isdir(path) and not os.path.islink(path):  # not a file edgekd wrote: never removed
                raise self._damaged(f"cannot be used: {problem}")
            log.warning("teacher cache %s: %s: not trusted, computed again", self.path, problem)
            if self.classes is not None:
                self._index().forget(os.path.basename(path))
            os.remove(path)

    @property
    def epochs(self) -> int:
        """Views held (the old name: one view per epoch before views could be shared)."""
        return len(self.held())

    def needed(self, epochs: int) -> List[int]:
        """The view numbers that epochs 1..``epochs`` show."""
        return sorted({view_number(self.views.plan, e) for e in range(1, int(epochs) + 1)})

    def _array(self, v: int) -> Any:
        if v not in self._arrays:
            if not os.path.isfile(self._view_file(v)):
                raise EdgeKDError(f"teacher cache {self.path} holds views {self.held()}, view {v} was asked for")
            if v not in self._verified:  # a rank that did not build it checks it too: never trusted as found
                problem = self._view_problem(v) if self.classes is not None else "the cache has no meta.json"
                if problem:
                    raise self._damaged(f"cannot be used: {problem}")
                self._verified.add(v)
            self._arrays[v] = np.load(self._view_file(v), mmap_mode="r", allow_pickle=False)
        return self._arrays[v]

    # -- writing -------------------------------------------------------------------------------------

    def _start(self, classes: int) -> None:
        if self.classes is not None and self.classes != classes:
            raise EdgeKDError(f"teacher cache {self.path} holds {self.classes} classes, the teacher gives {classes}")
        topk = self.storage.topk
        if topk and topk >= classes:
            raise EdgeKDError(f"--teacher-cache-topk {topk}: the teacher has only {classes} classes; "
                              "keep all logits (leave it out) or choose fewer")
        if classes > 32767 and topk:
            raise EdgeKDError(f"--teacher-cache-topk stores class indices as int16: {classes} classes are too many")
        self.classes = classes
        os.makedirs(self.path, exist_ok=True)
        if not os.path.lexists(os.path.join(self.path, META)):
            self._index().save()

    def _row_dtype(self) -> Tuple[Any, Tuple[int, ...]]:
        dt = np.float16 if self.storage.dtype == "float16" else np.float32
        k = self.storage.topk
        if not k:
            return dt, (int(self.classes or 0),)
        return np.dtype(list(zip(TOPK_FIELDS, (dt, np.int16, dt), ((k,), (k,), ())))), ()

    def _encode(self, logits: torch.Tensor) -> Any:
        """A batch of float32 logits as storage rows (a numpy array)."""
        if self.storage.dtype == "float16" and logits.abs().max().item() > FLOAT16_MAX:
            raise EdgeKDError(f"the teacher's logits reach {logits.abs().max().item():.3g}, beyond float16; "
                              "use --teacher-cache-dtype float32")
        dtype, _ = self._row_dtype()
        k = self.storage.topk
        if not k:
            return logits.numpy().astype(dtype)
        top = logits.topk(k, dim=1)
        rows = np.empty(len(logits), dtype=dtype)
        fill = fill_value(logits, top.values, self.storage.fill_temperature)
        for name, column in zip(TOPK_FIELDS, (top.values.numpy(), top.indices.numpy().astype(np.int16), fill.numpy())):
            rows[name] = column
        return rows

    def _write_view(self, v: int, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write view ``v`` from an iterator of (idx, float32 logits) into a file of its own, renamed when whole.
        Rows never given (an image left out by --skip-bad-images) stay zero and are never looked up."""
        final = self._view_file(v)
        tmp, out = f"{final}.tmp-{os.getpid()}", None
        try:
            for idx, logits in batches:
                if out is None:  # the class count is known from the first batch
                    self._start(int(logits.shape[1]))
                    dtype, tail = self._row_dtype()
                    out = open_memmap(tmp, mode="w+", dtype=dtype, shape=(len(self.views), *tail))
                out[idx.numpy()] = self._encode(logits)
            if out is None:
                raise EdgeKDError(f"teacher cache view {v}: the training views gave no batch")
            out.flush()
            del out
            self._index().forget(os.path.basename(final))
            os.replace(tmp, final)
            self._index().record(os.path.basename(final))
            self._verified.add(v)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @torch.no_grad()
    def build(self, teacher: Any, epochs: int, batch_size: int = 256, device: str = "cpu",
              progress: bool = True) -> float:
        """Make sure the views of epochs 1..``epochs`` are cached, computing only the missing ones (one view
        with --augment none, at most K with ``--teacher-views K``). Returns seconds spent."""
        self.load()
        self._check_views()
        missing = [v for v in self.needed(epochs) if v not in self.held()]
        if not missing:
            log.info("teacher cache hit: %s (%d views)", self.path, self.epochs)
            return 0.0
        start, n = time.perf_counter(), len(self.views)
        size = getattr(self.views, "teacher_size", None)
        if size:  # the teacher's own views: a batch of them stays within edgekd's batch memory bound
            batch_size = max(1, min(int(batch_size), MAX_BATCH_BYTES // batch_bytes(1, 3, *size)))
        if self._import_legacy(missing):
            return time.perf_counter() - start
        teacher.eval().to(device)
        for v in missing:
            def logits(v: int = v) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:  # the teacher's own view of each crop when there is one (edgekd.stream)
                for x, xt, _, idx in bar(self.views.batches(batch_size, epoch=v, teacher_view=True),
                                         total=-(-n // batch_size), desc=f"teacher cache view {v}", unit="batch",
                                         disable=not progress):
                    yield idx, teacher((xt if xt is not None else x).to(device)).float().cpu()
            self._write_view(v, logits())
        seconds = time.perf_counter() - start
        log.info("teacher cache: %d views x %d images in %.1f s -> %s", len(missing), n, seconds, self.path)
        return seconds

    def _import_legacy(self, missing: List[int]) -> bool:
        """Convert a one-file cache of an earlier edgekd (same key) instead of running the teacher again."""
        if not os.path.isfile(self.legacy_path) or self.key != self.legacy_key:
            return False
        legacy = LegacyCache.read(self.legacy_path)
        if legacy is None or legacy.key != self.legacy_key:
            return False
        logits = legacy.logits  # (epochs, N, classes) float32; its epoch e was view e
        if any(v > len(logits) for v in missing):
            return False
        for v in missing:
            self._write_view(v, [(torch.arange(logits.shape[1]), logits[v - 1])])
        log.info("teacher cache: converted %s into %s (%d views); the old file can be deleted",
                 self.legacy_path, self.path, len(missing))
        return True

    # -- reading -------------------------------------------------------------------------------------

    def lookup(self, epoch: int, idx: Any) -> torch.Tensor:
        """The cached teacher logits (float32) of images ``idx`` as seen in ``epoch`` (1-based)."""
        rows = self._array(view_number(self.views.plan, epoch))[np.asarray(idx)]
        if not self.storage.topk:
            return torch.from_numpy(rows.astype(np.float32))
        values, index, fill = (torch.from_numpy(rows[name].astype(kind))
                               for name, kind in zip(TOPK_FIELDS, (np.float32, np.int64, np.float32)))
        return self.expand(values, index, fill, int(self.classes or 0))

    @staticmethod
    def expand(values: torch.Tensor, index: torch.Tensor, fill: torch.Tensor, classes: int) -> torch.Tensor:
        """Full logits from the top-k ``values`` at ``index`` and one ``fill`` per row for the rest."""
        return fill.view(-1, 1).expand(len(fill), classes).clone().scatter_(1, index, values)

    def describe(self) -> Dict[str, Any]:
        """The cache's description: where, the views held, the storage, the classes and the bytes on disk."""
        return {"path": self.path, "views_held": self.epochs, "storage": self.storage.to_json(),
                "classes": self.classes, "bytes": sum(os.path.getsize(self._view_file(v)) for v in self.held())}

    def record(self, build_seconds: Optional[float]) -> Dict[str, Any]:
        """The cache's record for metrics.json: its description, the build's seconds and the teacher's sha256."""
        return {"path": self.path, "build_seconds": build_seconds, "teacher_sha256": self.teacher_sha,
                "views": self.views.plan.views, **self.describe()}


# A live teacher's answers are kept in memory up to this size when every epoch shows the same views.
MEMO_LIMIT_BYTES = 512 * 1024 ** 2


class LiveMemo:
    """A live teacher's logits, remembered when views cannot differ (--augment none, no --teacher-cache).

    The first epoch asks the teacher; later epochs read what it said about the same pixels, so ten
    epochs cost one teacher pass, not ten. Float32, as the teacher returned them: the same answers as
    asking again. Images are remembered as they come, so a resumed run or a DDP rank fills its own share.
    """

    def __init__(self, images: int) -> None:
        self.images, self.known = int(images), torch.zeros(int(images), dtype=torch.bool)
        self.logits: Optional[torch.Tensor] = None
        self.teacher_calls = 0

    @classmethod
    def for_run(cls, plan: Any, images: int, classes: int) -> Optional["LiveMemo"]:
        """A memo for this run, or None when views differ by epoch or the logits would not fit the limit."""
        if plan is None or distinct_views(plan) != 1:
            return None
        if images * classes * 4 > MEMO_LIMIT_BYTES:
            log.info("the teacher's logits for %d images x %d classes exceed %d MB: it runs every epoch; "
                     "--teacher-cache DIR keeps them on disk", images, classes, MEMO_LIMIT_BYTES // 1024 ** 2)
            return None
        return cls(images)

    def __call__(self, teacher: Any, x: torch.Tensor, idx: Any) -> torch.Tensor:
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

    def describe(self) -> Dict[str, Any]:
        """The memo's record for metrics.json."""
        return {"teacher_calls": self.teacher_calls, "why": "every epoch shows the same views"}
