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
key. Under torchrun whole shards are dealt to ranks (``deal_shards``).
"""

import io
import logging
import os
import random
import stat
import tarfile

from .. import EdgeKDError
from ..bundle.runner import MAX_IMAGE_PIXELS, printable, to_8bit

log = logging.getLogger(__name__)

SPEC = "webdataset:"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # in order of preference when a sample has several
LAZY_EXTS = ("jpg", "jpeg")  # opened header-only and decoded at reduced scale, as a folder's JPEG files
# A .cls member is a short decimal integer; anything longer is not a class index.
MAX_LABEL_BYTES = 32
# Labels without classes.txt name classes class0..classN-1: a label this large is a broken file, not a class.
MAX_CLASSES = 100_000
# The largest image member read into memory: an uncompressed 32-bit picture at edgekd's pixel limit. The
# pixel limit itself is checked on the decoded header, as for a folder's image.
MAX_MEMBER_BYTES = 4 * MAX_IMAGE_PIXELS
MAX_CLASSES_FILE = 16 * 1024 ** 2
BLOCK = 512  # tar's block: the end-of-archive marker is two zero blocks


def _quote(text):
    return repr(printable(str(text)))


class ShardCutShort(OSError):
    """A shard that lost bytes after it was scanned."""


class _Member(io.BytesIO):
    """An image member's bytes, named ``shard.tar:member`` where an error prints it (runner.open_image)."""

    def __init__(self, data, name):
        super().__init__(data)
        self.label = name

    def __str__(self):
        return self.label


def split_name(name):
    """(key, extension) of a member name as WebDataset splits it (the key keeps any folders), or None for a
    name without an extension or a WebDataset meta file (``__name__``)."""
    folder, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    if not folder and base.startswith("__") and base.endswith("__"):
        return None
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def scan_shard(path):
    """[(key, {extension: (offset, size)})] of one shard, read from its headers only. A shard that is not a
    plain tar file, or that is truncated or corrupt past some member, is an EdgeKDError naming it."""
    size = os.stat(path).st_size
    samples = []
    try:
        with tarfile.open(path, "r:") as tar:  # "r:": uncompressed only (random access needs plain tar)
            for member in tar:  # headers only: tarfile seeks over the data
                if not member.isreg() or member.issparse():  # links, devices, folders: never read
                    continue
                if member.offset_data + member.size > size:
                    raise EdgeKDError(f"shard {_quote(path)} is truncated: member {_quote(member.name)} ends at byte "
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
            raise EdgeKDError(f"shard {_quote(path)} is truncated: its last member is cut off at byte {size}; "
                              "write the shard again") from None
        raise EdgeKDError(f"shard {_quote(path)} is not a readable uncompressed tar file ({e}); "
                          "give .tar shards in WebDataset format") from None
    _check_end(path, end, size)
    return samples


def _check_end(path, end, size):
    """tarfile stops quietly at a damaged or missing header: what follows the last member must be the end
    marker (zero blocks), or the shard was cut or overwritten there."""
    if size - end < BLOCK:
        raise EdgeKDError(f"shard {_quote(path)} is truncated: it ends at byte {size} without tar's end-of-archive "
                          "marker; write the shard again")
    with open(path, "rb") as f:
        f.seek(end)
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                return
            if chunk.count(0) != len(chunk):
                raise EdgeKDError(f"shard {_quote(path)} is corrupt: the tar header at byte {end} cannot be read, "
                                  "so the members after it would be lost; write the shard again")


def _read_label(f, path, key, where, classes):
    offset, size = where
    name = f"{_quote(path)}, sample {_quote(key)}"
    if size > MAX_LABEL_BYTES:
        raise EdgeKDError(f"shard {name}: {key}.cls holds {size} bytes, not an integer class index")
    f.seek(offset)
    text = f.read(size)
    try:
        label = int(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise EdgeKDError(f"shard {name}: {key}.cls holds {_quote(text[:MAX_LABEL_BYTES])}, not an integer "
                          "class index") from None
    top = len(classes) if classes is not None else MAX_CLASSES
    if not 0 <= label < top:
        said = f"classes.txt names {top} classes" if classes is not None else f"at most {MAX_CLASSES} classes"
        raise EdgeKDError(f"shard {name}: class index {label} is out of range (0 to {top - 1}: {said})")
    return label


def _image_member(path, key, members):
    for ext in IMAGE_EXTS:
        if ext in members:
            return ext
    raise EdgeKDError(f"shard {_quote(path)}, sample {_quote(key)} has no image member "
                      f"({key}.{'|'.join(IMAGE_EXTS)}); found: {', '.join(sorted(members)) or 'none'}")


def _shard_files(split):
    """The .tar files of one split folder, sorted; each must be a regular file."""
    names = sorted(n for n in os.listdir(split) if n.endswith(".tar"))
    if not names:
        raise EdgeKDError(f"{_quote(split)} holds no .tar shards (compressed shards such as .tar.gz are not read: "
                          "random access needs plain tar)")
    paths = [os.path.join(split, n) for n in names]
    for p in paths:
        if not stat.S_ISREG(os.stat(p).st_mode):
            raise EdgeKDError(f"shard {_quote(p)} is not a regular file")
    return paths


class ShardSet:
    """One split of sharded data: per sample its shard, its image member's offset, size and extension, and its
    label; the images stay in the shards. Item i is (transform(RGB image), label), like an ImageFolder's."""

    stream_only = True  # training views are always decoded per batch from the shards (edgekd.core.stream)

    def __init__(self, split, classes, transform=None):
        import numpy as np

        self.root, self.classes, self.transform = os.path.abspath(split), classes, transform
        self.shards, self.stats = [], []
        shard_of, offsets, sizes, self.names, self.exts, self.targets = [], [], [], [], [], []
        for path in _shard_files(split):
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
                    if "cls" not in members:
                        raise EdgeKDError(f"shard {_quote(path)}, sample {_quote(key)} has no {key}.cls member "
                                          "(its class index)")
                    ext = _image_member(path, key, members)
                    self.targets.append(_read_label(f, path, key, members["cls"], classes))
                    shard_of.append(k)
                    offsets.append(members[ext][0])
                    sizes.append(members[ext][1])
                    self.names.append(f"{key}.{ext}")
                    self.exts.append(ext)
        if not self.targets:
            raise EdgeKDError(f"the shards under {_quote(split)} hold no samples")
        self.shard_of = np.asarray(shard_of, dtype=np.int32)
        self.offsets, self.sizes = np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64)

    def __len__(self):
        return len(self.targets)

    def item_name(self, i):
        """``shard.tar:KEY.ext`` of sample i, as errors name it."""
        return f"{self.shards[self.shard_of[i]]}:{self.names[i]}"

    def item_fingerprint(self, i):
        """What sample i's pixels depend on: its shard (path, size, mtime) and its member's place in it."""
        k = int(self.shard_of[i])
        size, mtime = self.stats[k]
        return f"{self.shards[k]}\0{size}\0{mtime}\0{int(self.offsets[i])}\0{int(self.sizes[i])}"

    def read(self, i):
        """The image member's bytes, by seek + read from its shard (an OSError when they cannot be had)."""
        size = int(self.sizes[i])
        if size > MAX_MEMBER_BYTES:
            from .data import ImageTooLarge

            raise ImageTooLarge(f"image {_quote(self.item_name(i))} is too large to read ({size / 1e6:.0f} MB; "
                                f"edgekd reads image members up to {MAX_MEMBER_BYTES / 1e6:.0f} MB)")
        with open(self.shards[self.shard_of[i]], "rb") as f:
            f.seek(int(self.offsets[i]))
            data = f.read(size)
        if len(data) != size:
            raise ShardCutShort(f"shard {_quote(self.shards[self.shard_of[i]])} was cut short after it was scanned: "
                          f"{self.names[i]} has {len(data)} of its {size} bytes")
        return data

    def _open(self, i):
        from .data import ImageTooLarge
        from ..bundle.runner import open_image

        return open_image(_Member(self.read(i), self.item_name(i)), ImageTooLarge)

    def open_item(self, i):
        """(PIL image, lazy) as edgekd.core.stream opens a folder's file: JPEGs header-only (decoded later, at a
        reduced scale where that suffices), other images loaded as a folder's loader loads them."""
        if self.exts[i] in LAZY_EXTS:
            return self._open(i), True
        return self.pil_item(i), False

    def pil_item(self, i):
        """Sample i as RGB, exactly as an image folder's loader (edgekd.core.data.load_image) gives its file."""
        with self._open(i) as img:
            return to_8bit(img).convert("RGB")

    def __getitem__(self, i):
        img = self.pil_item(i)
        return (self.transform(img) if self.transform is not None else img), self.targets[i]

    def bad_reason(self, i):
        """Why sample i cannot be decoded, found again here (a loader worker's exception is lost)."""
        from .data import ImageTooLarge

        try:
            with self._open(i) as img:
                img.load()
        except (ImageTooLarge, ShardCutShort) as e:
            return str(e)
        except Exception:  # unreadable: the usual case, said below
            pass
        return f"cannot read image {_quote(self.item_name(i))}: corrupt or not an image"


def read_classes(path):
    """The class names of ``classes.txt`` (one a line), or None when there is no such file."""
    if not os.path.exists(path):
        return None
    if not os.path.isfile(path) or os.path.getsize(path) > MAX_CLASSES_FILE:
        raise EdgeKDError(f"{_quote(path)} is not a class list (a text file of at most "
                          f"{MAX_CLASSES_FILE // 1024 ** 2} MB, one class name a line)")
    with open(path, encoding="utf-8", errors="replace") as f:
        names = [line.strip() for line in f.read().splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or not all(names):
        raise EdgeKDError(f"{_quote(path)} must name one class a line, with no empty lines")
    doubles = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) != len(names) else []
    if doubles:
        raise EdgeKDError(f"{_quote(path)} names a class twice: {_quote(doubles[0])}")
    return names


def load_shards(path, input_spec=None, choice=None):
    """The ``webdataset:PATH`` spec as a Data: its two splits as ShardSets, the classes, the input spec."""
    from .data import Data, check_reach, choose_input, eval_transform

    if not os.path.isdir(path):
        raise EdgeKDError(f"webdataset folder {_quote(path)} does not exist (expected a folder with train/ and "
                          "test/ or val/, each holding .tar shards)")
    train_dir = os.path.join(path, "train")
    test_dir = next((os.path.join(path, s) for s in ("test", "val") if os.path.isdir(os.path.join(path, s))), None)
    if not os.path.isdir(train_dir) or test_dir is None:
        found = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        raise EdgeKDError(f"webdataset folder {_quote(path)} needs train/ and test/ (or val/) sub-folders of .tar "
                          f"shards; found: {', '.join(found) or 'no sub-folders'}")
    check_reach(path, "webdataset folder", walk=[train_dir, test_dir])
    named = read_classes(os.path.join(path, "classes.txt"))
    train, test = ShardSet(train_dir, named), ShardSet(test_dir, named)
    classes = named or [f"class{c}" for c in range(max(max(train.targets), max(test.targets)) + 1)]
    channels, sizes = _probe_sizes(train)
    spec_in = input_spec or choose_input(channels, sizes, choice, where=train_dir)
    train.classes = test.classes = classes
    train.transform = test.transform = eval_transform(spec_in)
    return Data(f"{SPEC}{os.path.abspath(path)}", train, test, classes, spec_in, sizes)


def _probe_sizes(split):
    """(channels, {(width, height)}) from the headers of up to SIZE_PROBES images spread over the split, as
    edgekd.core.data does for a folder; unreadable ones are passed over (decoding names or skips them)."""
    from .data import SIZE_PROBES
    from ..bundle.runner import WIDE_MODES

    step = max(1, len(split) // SIZE_PROBES)
    channels, sizes = None, set()
    for i in range(0, len(split), step)[:SIZE_PROBES]:
        try:
            with split._open(i) as img:
                if channels is None:
                    channels = 1 if img.mode in ("L", "1") + WIDE_MODES else 3
                sizes.add(img.size)
        except (OSError, SyntaxError, ValueError):
            continue
    if channels is None:
        raise EdgeKDError(f"no readable images found in the shards under {_quote(split.root)}")
    return channels, sizes


# --- torchrun: whole shards dealt to ranks -----------------------------------------------------------------

def deal_shards(groups, world, epoch, seed):
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
    if len(groups) < world:
        raise EdgeKDError(f"{len(groups)} shards for {world} torchrun processes: each process reads whole shards, "
                          "so there must be at least as many shards as processes; write smaller shards "
                          "(tools/make_shards.py --shard-size) or run fewer processes")
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


# --- writing shards from an image folder (tools/make_shards.py) --------------------------------------------

def write_shards(folder, out, shard_size=1000, seed=0):
    """Write ``folder`` (an image folder: train/ and test/ or val/, one sub-folder per class) as WebDataset
    shards under ``out``: ``out/train/shard-000000.tar``, ..., the same for the test split, and
    ``out/classes.txt``. Samples are shuffled with ``seed`` before they are cut into shards of ``shard_size``
    (so a shard holds every class); image bytes are copied as they are (JPEG, PNG, WebP), other formats are
    written as PNG. Returns {split: number of shards}."""
    from torchvision.datasets import ImageFolder

    from .data import check_link_loops, check_reach

    if int(shard_size) < 1:
        raise EdgeKDError(f"--shard-size {shard_size}: give a number of samples per shard, at least 1")
    src, dst = os.path.realpath(folder), os.path.realpath(out)
    if not os.path.isdir(src):
        raise EdgeKDError(f"{_quote(folder)} is not a folder (expected train/ and test/ or val/, one folder per class)")
    if dst == src or dst.startswith(src + os.sep) or src.startswith(dst + os.sep):
        raise EdgeKDError(f"the shards {_quote(out)} must be written outside the image folder {_quote(folder)}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise EdgeKDError(f"{_quote(out)} already exists and is not an empty folder: shards never overwrite files")
    splits = [s for s in ("train", "test", "val") if os.path.isdir(os.path.join(src, s))]
    if "train" not in splits or len(splits) < 2:
        raise EdgeKDError(f"{_quote(folder)} needs train/ and test/ (or val/) sub-folders, one folder per class")
    check_reach(src, "image folder")
    classes, counts = None, {}
    for split in splits:
        check_link_loops(os.path.join(src, split))
        found = ImageFolder(os.path.join(src, split), loader=str)  # paths only: the bytes are copied
        if classes is not None and found.classes != classes:
            raise EdgeKDError(f"class folders differ between the splits of {_quote(folder)}")
        classes = found.classes
        samples = list(found.samples)
        random.Random(int(seed)).shuffle(samples)
        os.makedirs(os.path.join(out, split), exist_ok=True)
        starts = range(0, len(samples), int(shard_size))
        for n, start in enumerate(starts):
            _write_shard(os.path.join(out, split, f"shard-{n:06d}.tar"), samples[start:start + int(shard_size)],
                         start)
        counts[split] = len(starts)
    _atomic_text(os.path.join(out, "classes.txt"), "".join(f"{c}\n" for c in classes))
    return counts


def _member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path, samples, first):
    """One shard, written under a temporary name and renamed: a shard is whole or absent."""
    tmp = path + ".partial"
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for k, (image, label) in enumerate(samples):
                key = f"{first + k:08d}"
                ext, data = _image_bytes(image)
                _member(tar, f"{key}.{ext}", data)
                _member(tar, f"{key}.cls", str(int(label)).encode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _image_bytes(path):
    """(extension, bytes) of an image file for a shard: JPEG, PNG and WebP as they are, others as PNG."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext in IMAGE_EXTS:
        with open(path, "rb") as f:
            return ext, f.read()
    from .data import open_image

    buf = io.BytesIO()
    with open_image(path) as img:
        img = to_8bit(img)  # grey stays grey
        if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
            img = img.convert("RGB")
        img.save(buf, format="PNG")
    return "png", buf.getvalue()


def _atomic_text(path, text):
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
