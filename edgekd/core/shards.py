"""Sharded tar data in WebDataset format (``--data webdataset:PATH``), read by random access, without the
``webdataset`` library.

PATH holds ``train/`` and ``test/`` (or ``val/``), each a folder of ``.tar`` shards, and optionally
``classes.txt`` (one class name a line). A sample is the run of consecutive members sharing a key (the member
name up to the first dot of its last part, WebDataset's rule): ``KEY.jpg|jpeg|png|webp`` is the image,
``KEY.cls`` its integer class index. Without classes.txt the classes are ``class0 .. classN-1`` for the
largest label seen.

Each shard's headers are read once with ``tarfile`` (the image member's offset and size and the label of
every sample); an image is then read by seek + read from its shard. So every sample has an index, like an
image of a folder: the per-index views of edgekd.core.stream, the teacher cache's fingerprint (shard path,
size, mtime and member offsets) and ``--teacher-views`` stay exact. Nothing is extracted to disk: only
regular-file members are read (links, devices and folders are passed over) and a member's name is only a
key. Under torchrun whole shards are dealt to ranks (``deal_shards``). edgekd.core.data resolves the spec
(``_webdataset``); tools/make_shards.py writes shards from an image folder.
"""

import io
import logging
import os
import random
import tarfile
from collections import Counter

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

from .. import EdgeKDError
from ..base.bounds import MAX_CLASSES as _BOUND, check_classes
from ..base.files import require_regular
from ..bundle.preprocessing import MAX_IMAGE_PIXELS, open_image, printable, to_8bit

log = logging.getLogger(__name__)

SPEC = "webdataset:"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # in order of preference when a sample has several
LAZY_EXTS = ("jpg", "jpeg")  # opened header-only and decoded at reduced scale, as a folder's JPEG files
# A .cls member is a short decimal integer; anything longer is not a class index.
MAX_LABEL_BYTES = 32
# Labels without classes.txt name classes class0..classN-1: a label this large is a broken file, not a class.
MAX_CLASSES = _BOUND
# Without classes.txt, classes without a sample are tolerated up to this many (or as many as have samples).
MAX_EMPTY_CLASSES = 16
# The largest image member read into memory: an uncompressed 32-bit picture at edgekd's pixel limit. The
# pixel limit itself is checked on the decoded header, as for a folder's image.
MAX_MEMBER_BYTES = 4 * MAX_IMAGE_PIXELS
MAX_CLASSES_FILE = 16 * 1024 ** 2
BLOCK = 512  # tar's block: the end-of-archive marker is two zero blocks


def quoted(text: object) -> str:
    """A name as messages print it: quoted, control characters escaped."""
    return repr(printable(str(text)))


class ShardCutShort(OSError):
    """A shard that lost bytes after it was scanned."""


class _Member(io.BytesIO):
    """An image member's bytes, named ``shard.tar:member`` where an error prints it (preprocessing.open_image)."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.label = name

    def __str__(self) -> str:
        return self.label


def split_name(name: str) -> Optional[Tuple[str, str]]:
    """(key, extension) of a member name as WebDataset splits it (the key keeps any folders), or None for a
    name WebDataset passes over too: no extension, or a hidden file (``._x.jpg``, macOS's resource forks)."""
    folder, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def scan_shard(path: str) -> List[Tuple[str, Dict[str, Tuple[int, int]]]]:
    """[(key, {extension: (offset, size)})] of one shard, read from its headers only. A shard that is not a
    plain tar file, or that is truncated or corrupt past some member, is an EdgeKDError naming it."""
    size = os.stat(path).st_size
    samples: List[Tuple[str, Dict[str, Tuple[int, int]]]] = []
    try:
        with tarfile.open(path, "r:") as tar:  # "r:": uncompressed only (random access needs plain tar)
            while True:
                member = tar.next()  # a header; tarfile seeks over the data
                if member is None:
                    break
                # tarfile keeps every header it read (a list its stubs do not declare): memory would grow with the shard
                tar.members.clear()  # type: ignore[attr-defined]
                if not member.isreg() or member.issparse():  # links, devices, folders: never read
                    continue
                if member.offset_data + member.size > size:
                    raise EdgeKDError(f"shard {quoted(path)} is truncated: member {quoted(member.name)} ends at byte "
                                      f"{member.offset_data + member.size} of {size}; write the shard again")
                parts = split_name(member.name)
                if parts is None:
                    continue
                key, ext = parts
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1].setdefault(ext, (member.offset_data, member.size))
            end = tar.offset
    except (tarfile.TarError, EOFError) as e:
        if "unexpected end of data" in str(e):  # tarfile's words for a member cut off by the end of the file
            raise EdgeKDError(f"shard {quoted(path)} is truncated: its last member is cut off at byte {size}; "
                              "write the shard again") from None
        raise EdgeKDError(f"shard {quoted(path)} is not a readable uncompressed tar file ({e}); "
                          "give .tar shards in WebDataset format") from None
    _check_end(path, end, size)
    return samples


def _check_end(path: str, end: int, size: int) -> None:
    """tarfile stops quietly at a damaged or missing header: what follows the last member must be the end
    marker (zero blocks), or the shard was cut or overwritten there."""
    if size - end < BLOCK:
        raise EdgeKDError(f"shard {quoted(path)} is truncated: it ends at byte {size} without tar's end-of-archive "
                          "marker; write the shard again")
    with open(path, "rb") as f:
        f.seek(end)
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                return
            if chunk.count(0) != len(chunk):
                raise EdgeKDError(f"shard {quoted(path)} is corrupt: the tar header at byte {end} cannot be read, "
                                  "so the members after it would be lost; write the shard again")


def _read_label(f: Any, path: str, key: str, where: Tuple[int, int], classes: Optional[List[str]]) -> int:
    offset, size = where
    name = f"{quoted(path)}, sample {quoted(key)}"
    if size > MAX_LABEL_BYTES:
        raise EdgeKDError(f"shard {name}: {key}.cls holds {size} bytes, not an integer class index")
    f.seek(offset)
    text = f.read(size)
    try:
        label = int(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise EdgeKDError(f"shard {name}: {key}.cls holds {quoted(text[:MAX_LABEL_BYTES])}, not an integer "
                          "class index") from None
    top = len(classes) if classes is not None else MAX_CLASSES
    if not 0 <= label < top:
        said = f"classes.txt names {top} classes" if classes is not None else f"at most {MAX_CLASSES} classes"
        raise EdgeKDError(f"shard {name}: class index {label} is out of range (0 to {top - 1}: {said})")
    return label


def _sample(f: Any, path: str, key: str, members: Dict[str, Tuple[int, int]],
            classes: Optional[List[str]]) -> Tuple[str, int]:
    """(image extension, label) of one sample; EdgeKDError naming shard and key when it lacks either."""
    if "cls" not in members:
        raise EdgeKDError(f"shard {quoted(path)}, sample {quoted(key)} has no {key}.cls member (its class index)")
    return _image_member(path, key, members), _read_label(f, path, key, members["cls"], classes)


def _image_member(path: str, key: str, members: Dict[str, Tuple[int, int]]) -> str:
    for ext in IMAGE_EXTS:
        if ext in members:
            return ext
    raise EdgeKDError(f"shard {quoted(path)}, sample {quoted(key)} has no image member "
                      f"({key}.{'|'.join(IMAGE_EXTS)}); found: {', '.join(sorted(members)) or 'none'}")


def _shard_files(split: str) -> List[str]:
    """The .tar files of one split folder, sorted; each must be a regular file, and nothing else may lie there
    (a .tar.gz or any other file would otherwise be passed over without a word)."""
    names = sorted(os.listdir(split))
    other = [n for n in names if not n.lower().endswith(".tar")]
    if other:
        raise EdgeKDError(f"{quoted(split)} holds {', '.join(quoted(n) for n in other[:3])}"
                          f"{' and more' if len(other) > 3 else ''}, which is not a .tar shard (compressed shards such "
                          "as .tar.gz are not read: random access needs plain tar); move it out of the split folder")
    if not names:
        raise EdgeKDError(f"{quoted(split)} holds no .tar shards")
    paths = [os.path.join(split, n) for n in names]
    for p in paths:  # a FIFO would hang the first read; a dangling link, no permission
        require_regular(p, "shard", printable(p))
    return paths


def label_classes(targets: Sequence[int], where: str) -> List[str]:
    """Class names ``class0 .. classN-1`` for labels without classes.txt, N the largest label + 1. Most classes
    must have a sample (at most MAX_EMPTY_CLASSES or as many empty ones as classes with samples): a stray label
    99999 would otherwise make a 100,000-class model. Bounded by MAX_CLASSES too."""
    count = max(targets) + 1
    check_classes(count, f"the labels of {where}")
    seen = len(set(targets))
    if count - seen > max(MAX_EMPTY_CLASSES, seen):
        raise EdgeKDError(f"the labels of {where} reach class index {count - 1} but only {seen} of the {count} "
                          "classes this implies have a sample: a stray label, or classes numbered with gaps; name "
                          "the classes in classes.txt (one a line) or fix the label")
    return [f"class{c}" for c in range(count)]


class ShardSet:
    """One split of sharded data: per sample its shard, its image member's offset, size and extension, and its
    label; the images stay in the shards. Item i is (transform(RGB image), label), like an ImageFolder's.
    ``too_large``: the error of an image above edgekd's limits (edgekd.core.data.ImageTooLarge, a ValueError, so
    --skip-bad-images skips it as a folder's image)."""

    stream_only = True  # training views are always decoded per batch from the shards (edgekd.core.stream)

    def __init__(self, split: str, classes: Optional[List[str]], too_large: Type[Exception],
                 transform: Optional[Callable[[Any], Any]] = None) -> None:
        import numpy as np

        self.root, self.classes, self.transform = os.path.abspath(split), classes, transform
        self.too_large = too_large
        self.shards: List[str] = []
        self.stats: List[Any] = []
        shard_of, offsets, sizes, self.names, self.exts, self.targets = [], [], [], [], [], []
        for path in _shard_files(split):
            try:
                st = os.stat(path)
                samples = scan_shard(path)
                if not samples:
                    log.warning("shard %s holds no samples: left out", printable(path))
                    continue
                k = len(self.shards)
                self.shards.append(os.path.abspath(path))
                self.stats.append((st.st_size, st.st_mtime_ns))
                with open(path, "rb") as f:
                    for key, members in samples:
                        ext, label = _sample(f, path, key, members, classes)
                        self.targets.append(label)
                        shard_of.append(k)
                        offsets.append(members[ext][0])
                        sizes.append(members[ext][1])
                        self.names.append(f"{key}.{ext}")
                        self.exts.append(ext)
            except OSError as e:  # no permission, a read error of the disk
                raise EdgeKDError(f"shard {quoted(path)} cannot be read: {e.strerror or e}") from None
        if not self.targets:
            raise EdgeKDError(f"the shards under {quoted(split)} hold no samples")
        self.shard_of = np.asarray(shard_of, dtype=np.int32)
        self.offsets, self.sizes = np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.targets)

    def item_name(self, i: int) -> str:
        """``shard.tar:KEY.ext`` of sample i, as errors and logs name it (control characters escaped)."""
        return printable(f"{self.shards[self.shard_of[i]]}:{self.names[i]}")

    def item_fingerprint(self, i: int) -> str:
        """What sample i's pixels depend on: its shard (path, size, mtime) and its member's place in it."""
        k = int(self.shard_of[i])
        size, mtime = self.stats[k]
        return f"{self.shards[k]}\0{size}\0{mtime}\0{int(self.offsets[i])}\0{int(self.sizes[i])}"

    def read(self, i: int) -> bytes:
        """The image member's bytes, by seek + read from its shard (an OSError when they cannot be had)."""
        size = int(self.sizes[i])
        if size > MAX_MEMBER_BYTES:
            raise self.too_large(f"image {quoted(self.item_name(i))} is too large to read ({size / 1e6:.0f} MB; "
                                f"edgekd reads image members up to {MAX_MEMBER_BYTES / 1e6:.0f} MB)")
        with open(self.shards[self.shard_of[i]], "rb") as f:
            f.seek(int(self.offsets[i]))
            data = f.read(size)
        if len(data) != size:
            raise ShardCutShort(f"shard {quoted(self.shards[self.shard_of[i]])} was cut short after it was scanned: "
                                f"{quoted(self.names[i])} has {len(data)} of its {size} bytes")
        return data

    def open(self, i: int) -> Any:
        """Sample i's image, opened lazily (header only) behind edgekd's pixel limit."""
        return open_image(_Member(self.read(i), self.item_name(i)), self.too_large)

    def open_item(self, i: int) -> Tuple[Any, bool]:
        """(PIL image, lazy) as edgekd.core.stream opens a folder's file: JPEGs header-only (decoded later, at a
        reduced scale where that suffices), other images loaded as a folder's loader loads them."""
        if self.exts[i] in LAZY_EXTS:
            return self.open(i), True
        return self.pil_item(i), False

    def pil_item(self, i: int) -> Any:
        """Sample i as RGB, exactly as an image folder's loader (edgekd.core.data.load_image) gives its file."""
        with self.open(i) as img:
            return to_8bit(img).convert("RGB")

    def __getitem__(self, i: int) -> Tuple[Any, int]:
        img = self.pil_item(i)
        return (self.transform(img) if self.transform is not None else img), self.targets[i]

    def bad_reason(self, i: int) -> str:
        """Why sample i cannot be decoded, found again here (a loader worker's exception is lost)."""
        try:
            with self.open(i) as img:
                img.load()
        except (self.too_large, ShardCutShort) as e:
            return str(e)
        except (FileNotFoundError, PermissionError) as e:  # the shard went away after it was scanned
            return f"cannot read image {quoted(self.item_name(i))}: {e.strerror}"
        except Exception:  # unreadable: the usual case, said below
            pass
        return f"cannot read image {quoted(self.item_name(i))}: corrupt or not an image"


def read_classes(path: str) -> Optional[List[str]]:
    """The class names of ``classes.txt`` (one a line), or None when there is no such file."""
    if not os.path.lexists(path):
        return None
    if require_regular(path, "class list", printable(path)).st_size > MAX_CLASSES_FILE:
        raise EdgeKDError(f"{quoted(path)} is not a class list (a text file of at most "
                          f"{MAX_CLASSES_FILE // 1024 ** 2} MB, one class name a line)")
    with open(path, encoding="utf-8", errors="replace") as f:
        names = [line.strip() for line in f.read().splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or not all(names):
        raise EdgeKDError(f"{quoted(path)} must name one class a line, with no empty lines")
    doubles = sorted(n for n, count in Counter(names).items() if count > 1)
    if doubles:
        raise EdgeKDError(f"{quoted(path)} names a class twice: {quoted(doubles[0])}")
    return names


# --- torchrun: whole shards dealt to ranks -----------------------------------------------------------------

def check_shard_count(shards: int, world: int) -> None:
    """Each torchrun process reads whole shards: there must be at least as many as processes."""
    if shards < world:
        raise EdgeKDError(f"{shards} shards for {world} torchrun processes: each process reads whole shards, "
                          "so there must be at least as many shards as processes; write smaller shards "
                          "(tools/make_shards.py --shard-size) or run fewer processes")


def deal_shards(groups: Sequence[Sequence[int]], world: int, epoch: int, seed: int) -> List[List[int]]:
    """Every rank's item order for one epoch: a list of ``world`` lists of item indices.

    ``groups`` holds each shard's items (in member order). The shards are shuffled from (seed, epoch) and
    dealt like cards: the i-th shard of that order goes to rank i % world, so a rank reads only its own
    shards, one after another; each shard's items are shuffled within it (a shuffle buffer of one shard, as
    WebDataset shuffles). Every rank takes exactly ceil(N / world) items, so all take the same number of
    steps: a rank whose shards hold fewer *pads* by repeating its own items from the start (as
    DistributedSampler pads), a rank whose shards hold more *trims* its last ones for this epoch (the dealing
    changes every epoch, so no image is always left out). With shards of equal size and a shard count that
    world divides, neither happens.
    """
    check_shard_count(len(groups), world)
    rng = random.Random(f"edgekd-shards/{int(seed)}/{int(epoch)}")
    order = list(range(len(groups)))
    rng.shuffle(order)
    per_rank = -(-sum(len(g) for g in groups) // world)
    dealt = []
    for rank in range(world):
        mine = []
        for s in order[rank::world]:
            items = list(groups[s])
            random.Random(f"edgekd-shard-items/{int(seed)}/{int(epoch)}/{s}").shuffle(items)
            mine += items
        if len(mine) < per_rank:  # pad with this rank's own items, from the start
            mine += (mine * -(-(per_rank - len(mine)) // len(mine)))[:per_rank - len(mine)]
        dealt.append(mine[:per_rank])
    return dealt
