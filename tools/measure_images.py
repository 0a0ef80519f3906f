"""Measure edgekd's input pipeline on photos of mixed sizes: peak memory, images/s of distillation
with a cached teacher against the student's bare training step, and the decode rate.

    python tools/measure_images.py --images 2000 --work /tmp/edgekd-measure          # small
    python tools/measure_images.py --images 50000 --work /tmp/edgekd-measure          # the 50,000-image figure

1. Makes a folder of CIFAR-10 train pictures resized (bicubic) to mixed sizes and aspect ratios around 224 px
   (224x224, 298x224, 224x298, 336x224, 256x192, 192x256), saved as JPEG quality 90, in --work (never in
   the repository); 10 classes, --images in train/, a tenth of that in test/.
2. Trains a small teacher on it (`edgekd train --model torchvision:mobilenet_v3_small --input-size 224`, a
   short run: the figures here are about speed and memory, not accuracy) and builds its cache.
3. Distils `--student` at `--input-size` with `--teacher-cache` (the teacher's logits replayed) and records
   the peak resident memory of the whole process tree (edgekd and its decoding workers, proportional set
   sizes summed, sampled every 0.1 s) and of the main process, and images/s per epoch (metrics.json).
4. Times the student's bare training step (forward, KD loss against fixed logits, backward, SGD) on
   tensors already in memory, and the decode rate of the streamed views alone (no training).

Prints one JSON object and writes it to WORK/measure.json. Figures depend on the machine's load: run
`uptime` first and report it with them.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

SIZES = [(224, 224), (298, 224), (224, 298), (336, 224), (256, 192), (192, 256)]  # (width, height)
CIFAR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10")


def make_photos(src, out, n_train, n_test):
    """CIFAR-10 pictures at mixed sizes and aspect ratios (train/ and test/, class folders); reused if present."""
    from PIL import Image

    done = os.path.join(out, f".made-{n_train}-{n_test}")
    if os.path.exists(done):
        return out
    for split, n in (("train", n_train), ("test", n_test)):
        classes = sorted(os.listdir(os.path.join(src, split)))
        per = -(-n // len(classes))
        for c in classes:
            os.makedirs(os.path.join(out, split, c), exist_ok=True)
            names = sorted(os.listdir(os.path.join(src, split, c)))[:per]
            for k, name in enumerate(names):
                img = Image.open(os.path.join(src, split, c, name)).convert("RGB")
                img.resize(SIZES[k % len(SIZES)], Image.BICUBIC).save(os.path.join(out, split, c, name), quality=90)
    open(done, "w").close()
    return out


def _tree_rss(pid):
    """Resident bytes of ``pid`` and its descendants (PSS, summed, from /proc), and of ``pid`` alone (RSS)."""
    def rss(p, key="Pss:"):  # proportional set size: pages shared with forked workers are counted once in the sum
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith(key):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            with open(f"/proc/{p}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def children(p):
        found = []
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    found += [int(c) for c in f.read().split()]
        except OSError:
            pass
        return found

    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss(p)
        stack += children(p)
    return total, rss(pid, "Rss:")


def run_measured(cmd):
    """Run ``cmd``; (seconds, peak tree RSS bytes, peak main RSS bytes)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0, 0]

    def sample():
        while proc.poll() is None:
            tree, main = _tree_rss(proc.pid)
            peak[0], peak[1] = max(peak[0], tree), max(peak[1], main)
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return time.perf_counter() - start, peak[0], peak[1]


def bare_step_rate(student, size, batch, classes, threads, steps=8):
    """Images/s of the student's training step on tensors already in memory (KD loss against fixed logits)."""
    import torch

    from edgekd.core.data import InputSpec
    from edgekd.core.losses import make_loss
    from edgekd.core.models import build_model

    torch.set_num_threads(threads)
    model = build_model(student, classes, InputSpec(3, size, size, [0.5] * 3, [0.5] * 3)).train()
    loss_fn, _ = make_loss("kd")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y, t = torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,)), torch.randn(batch, classes)
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        opt.zero_grad()
        loss_fn(model(x), t, y)["loss"].backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def decode_rate(folder, size, workers, batch, limit):
    """Images/s of the streamed training views alone (random-resized crop at ``size``, no training)."""
    import torch

    from edgekd.core.augment import AugmentPlan
    from edgekd.core.data import SizeChoice, load_data
    from edgekd.core.stream import StreamViews

    data = load_data(folder, choice=SizeChoice(size=(size, size)))
    idx = torch.arange(min(limit, len(data.train)))
    views = StreamViews.of([(data.train, idx, None)], data.input, None, workers=workers)
    views.plan = AugmentPlan("random-resized-crop", len(views), scale=0.08)
    start, n = time.perf_counter(), 0
    for x, _, _ in views.batches(batch, epoch=1, shuffle_seed=0):
        n += len(x)
    return n / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000, help="training images (a tenth as many test images)")
    ap.add_argument("--work", default="/tmp/edgekd-measure", help="where the photos and runs go (outside the repo)")
    ap.add_argument("--cifar", default=CIFAR, help="CIFAR-10 in ImageFolder layout")
    ap.add_argument("--student", default="torchvision:mobilenet_v3_small")
    ap.add_argument("--input-size", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    # The bare step below runs in this process: give its OpenMP threads the wait policy edgekd's own
    # training commands use (set before torch loads), so the two rates differ by the input pipeline only.
    from edgekd.base.cpu import short_spin_wait

    short_spin_wait()
    photos = make_photos(os.path.abspath(args.cifar), os.path.join(args.work, f"photos-{args.images}"), args.images,
                         max(20, args.images // 10))
    edgekd = [sys.executable, "-m", "edgekd"]
    common = ["--workers", str(args.workers), "--threads", str(args.threads), "--no-progress", "--force"]
    teacher = os.path.join(args.work, "teacher")
    if not os.path.isfile(os.path.join(teacher, "model.pt")):  # a quick teacher: the figures are speed and memory
        run_measured(edgekd + ["train", "--model", "torchvision:mobilenet_v3_small", "--data", photos, "--input-size", "224",
                               "--train-subset", "200", "--epochs", "1", "--out", teacher] + common)
    out = os.path.join(args.work, f"distill-{args.images}-{args.input_size}")
    cmd = edgekd + ["distill", "--teacher", os.path.join(teacher, "model.pt"), "--student", args.student,
                    "--data", photos, "--input-size", str(args.input_size), "--epochs", str(args.epochs),
                    "--batch-size", str(args.batch_size), "--teacher-cache", os.path.join(args.work, "cache"),
                    "--teacher-views", "1", "--bn-recalibrate", "never", "--out", out] + common
    seconds, tree, main_rss = run_measured(cmd)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    result = {
        "command": " ".join(cmd[2:]), "images": args.images, "input_size": args.input_size, "student": args.student,
        "workers": args.workers, "threads": args.threads, "seconds": round(seconds, 1),
        "peak_rss_tree_mb": round(tree / 2 ** 20), "peak_rss_main_mb": round(main_rss / 2 ** 20),
        "pipeline": metrics["train_data"]["pipeline"], "augment": metrics["train_data"]["augment"],
        "distill_images_per_s": [round(h["images_per_s"], 1) for h in metrics["history"]],
        "cache_build_seconds": (metrics.get("teacher_cache") or {}).get("build_seconds"),
        "bare_step_images_per_s": round(bare_step_rate(args.student, args.input_size, args.batch_size, 10,
                                                       args.threads), 1),
        "decode_images_per_s": round(decode_rate(photos, args.input_size, args.workers, args.batch_size,
                                                 min(args.images, 1000)), 1),
        "load_average": os.getloadavg(), "cpus": os.cpu_count(),
    }
    result["distill_vs_bare"] = round(max(result["distill_images_per_s"]) / result["bare_step_images_per_s"], 2)
    with open(os.path.join(args.work, "measure.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
