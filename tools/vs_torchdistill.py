"""edgekd against torchdistill: the same CIFAR-10 distillation, the same teacher weights, in one run.

    python tools/vs_torchdistill.py TEACHER.pt --td-python VENV/bin/python [--data ../shared/data/cifar10]
        [--subset 10000] [--epochs 3] [--seeds 0,1] [--threads 2] [--out runs/vs-torchdistill]

TEACHER.pt is an edgekd checkpoint of a CIFAR ResNet (e.g. `edgekd train --model resnet20`); the student is
a fresh `resnet8` (--student). torchdistill runs in its own environment (--td-python: a venv with
`pip install torchdistill` and the same torch), so neither tool's packages touch the other's.

What runs, per seed, one after another on the same machine:
  (a) `edgekd distill` with the teacher live, (b) `edgekd distill --teacher-cache` replaying a cache built
  beforehand (the build is timed and reported apart), (c) torchdistill 's DistillationBox (its KDLoss,
  T 4, alpha 0.9 on the KL term) with the same teacher weights, the same architectures (edgekd's module
  code, imported from this repository), the same images, batch size, optimizer (SGD lr 0.05, momentum 0.9,
  weight decay 5e-4), schedule (one epoch of linear warm-up, then cosine, stepped per batch) and
  augmentation (pad 4 + random crop + flip), the images decoded once into memory as torchvision's
  CIFAR10 dataset holds them, the teacher in eval mode (torchdistill leaves it in train mode otherwise).
The training images are a class-stratified subset, linked (or copied) into OUT/data, outside the
repository, so both tools read the same files. Images/s counts training steps only (no evaluation);
top-1 is the last epoch's on the 10,000 test images. Writes OUT/report.md and OUT/results.json.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("teacher", nargs="?", help="edgekd teacher checkpoint (a CIFAR ResNet)")
    p.add_argument("--td-python", default="/work/venv-td/bin/python",
                   help="python of an environment with torchdistill installed (default: %(default)s)")
    p.add_argument("--data", default="../shared/data/cifar10", help="ImageFolder with train/ and test/ (default: %(default)s)")
    p.add_argument("--student", default="resnet8", help="student model spec (default: %(default)s)")
    p.add_argument("--subset", type=int, default=10000, help="training images, class-stratified (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=3, help="(default: %(default)s)")
    p.add_argument("--seeds", default="0,1", help="comma list (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--out", default="runs/vs-torchdistill", help="(default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="also run both edgekd rows with --compile (torch.compile "
                   "of the student; its compile time falls in the first epoch's images/s)")
    p.add_argument("--torchdistill-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_subset(data, out, per_class_total):
    """OUT/data/{train,test}: `per_class_total / classes` training images per class (sorted names) and the whole
    test split, as hard links (copies across file systems). Returns the folder."""
    root = os.path.join(out, "data")
    if os.path.isdir(root):
        return root
    tmp = root + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    classes = sorted(os.listdir(os.path.join(data, "train")))
    per_class = per_class_total // len(classes)
    for split, limit in (("train", per_class), ("test", None)):
        for c in classes:
            src = os.path.join(data, split, c)
            dst = os.path.join(tmp, split, c)
            os.makedirs(dst)
            for name in sorted(os.listdir(src))[:limit]:
                try:
                    os.link(os.path.join(src, name), os.path.join(dst, name))
                except OSError:
                    shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    os.rename(tmp, root)
    return root


def edgekd_run(args, data, seed, name, extra):
    """One `edgekd distill`; returns (images/s over its epochs, last-epoch test top-1, seconds)."""
    out = os.path.join(args.out, f"{name}-s{seed}")
    cmd = [sys.executable, "-m", "edgekd", "distill", "--teacher", args.teacher, "--student", args.student,
           "--data", data, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--loss", "kd",
           "--seed", str(seed), "--threads", str(args.threads), "--no-progress", "--out", out, "--force", *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    seconds = time.perf_counter() - start
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    # images/s of the training steps (edgekd's per-epoch figure excludes evaluation, as the worker's does)
    rates = [h["images_per_s"] for h in metrics["history"] if h.get("images_per_s")]
    cache = metrics.get("teacher_cache") or {}
    return {"images_per_second": statistics.mean(rates), "top1": metrics["test_top1"], "seconds": seconds,
            "cache_build_seconds": cache.get("build_seconds"), "command": " ".join(cmd[1:])}


def torchdistill_run(args, data, seed):
    cmd = [args.td_python, os.path.abspath(__file__), args.teacher, "--torchdistill-worker", "--data", data,
           "--student", args.student, "--epochs", str(args.epochs), "--threads", str(args.threads),
           "--batch-size", str(args.batch_size), "--seed", str(seed), "--out", args.out]
    env = {**os.environ, "PYTHONPATH": REPO}
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(seconds=time.perf_counter() - start, command=" ".join(cmd[1:]))
    return result


# ---- the torchdistill side (runs under --td-python) ----

def _memory_dataset(folder, transform):
    """ImageFolder decoded once into memory (RGB PIL images), as torchvision's CIFAR10 holds its images."""
    import torch
    from PIL import Image
    from torchvision.datasets import ImageFolder

    files = ImageFolder(folder)
    images = [Image.open(path).convert("RGB") for path, _ in files.samples]
    for image in images:
        image.load()

    class Memory(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return transform(images[i]), files.targets[i]

    return Memory()


def _models(args):
    """The teacher (checkpoint weights, eval mode) and a fresh student, from edgekd's own module code."""
    import torch
    from edgekd.core.models import build_model

    ckpt = torch.load(args.teacher, weights_only=True, map_location="cpu")
    spec = argparse.Namespace(channels=3, height=32, width=32)
    teacher = build_model(ckpt["model"], len(ckpt["classes"]), spec)
    teacher.load_state_dict(ckpt["state_dict"])
    torch.manual_seed(args.seed)
    student = build_model(args.student, len(ckpt["classes"]), spec)
    return teacher.eval(), student, ckpt["input"]


def _train_config(args, steps_per_epoch):
    import math
    import torch

    total, warmup = args.epochs * steps_per_epoch, steps_per_epoch

    def lr_lambda(step):  # edgekd's default: one epoch of linear warm-up, then cosine to 0, per step
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    kd = {"key": "KDLoss", "kwargs": {"student_module_path": ".", "student_module_io": "output",
                                      "teacher_module_path": ".", "teacher_module_io": "output",
                                      "temperature": 4.0, "alpha": 0.1, "beta": 0.9, "reduction": "batchmean"}}
    return {
        "num_epochs": args.epochs,
        "train_data_loader": {"dataset_id": "train", "sampler": {"class_or_func": torch.utils.data.RandomSampler,
                                                                 "kwargs": {}},
                              "kwargs": {"batch_size": args.batch_size, "num_workers": 0, "drop_last": True}},
        "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "forward_hook": {"input": [], "output": []}, "wrapper": None,
                    "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "adaptations": None, "sequential": [], "frozen_modules": [],
                    "forward_hook": {"input": [], "output": []}, "wrapper": None, "requires_grad": True},
        "optimizer": {"key": "SGD", "kwargs": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}},
        "scheduler": {"key": "LambdaLR", "kwargs": {"lr_lambda": lr_lambda}, "scheduling_step": 1},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {"criterion": kd, "weight": 1.0}}}},
    }


def torchdistill_worker(args):
    """Distil with torchdistill's DistillationBox; print one JSON line: images/s and test top-1."""
    import torch
    from torchvision import transforms
    from torchdistill.core.distillation import get_distillation_box

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    teacher, student, input_spec = _models(args)
    norm = transforms.Normalize(input_spec["mean"], input_spec["std"])
    train = _memory_dataset(os.path.join(args.data, "train"), transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm]))
    test = _memory_dataset(os.path.join(args.data, "test"), transforms.Compose([transforms.ToTensor(), norm]))
    steps = len(train) // args.batch_size
    box = get_distillation_box(teacher, student, {"train": train}, _train_config(args, steps),
                               torch.device("cpu"), None, False, 1.0)
    images, seconds = 0, 0.0
    for epoch in range(args.epochs):
        box.pre_epoch_process(epoch=epoch)
        box.teacher_model.eval()
        start = time.perf_counter()
        for sample_batch, targets, supp_dict in box.train_data_loader:
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            images += len(targets)
        seconds += time.perf_counter() - start
    student.eval()
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(test, batch_size=256):
            correct += (student(x).argmax(1) == y).sum().item()
    import torchdistill

    print(json.dumps({"images_per_second": images / seconds, "top1": correct / len(test),
                      "torchdistill": torchdistill.__version__, "torch": torch.__version__}))


def report(args, rows, cache_build):
    lines = ["# edgekd against torchdistill", "",
             f"`python tools/vs_torchdistill.py {args.teacher} --subset {args.subset} --epochs {args.epochs} "
             f"--seeds {args.seeds} --threads {args.threads}{' --compile' if args.compile else ''}` on "
             f"{platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}.", "",
             "| run | seed | images/s | vs torchdistill | top-1 | wall |", "|---|---|---|---|---|---|"]
    for seed, runs in rows.items():
        base = runs["torchdistill"]["images_per_second"]
        for name, r in runs.items():
            lines.append(f"| {name} | {seed} | {r['images_per_second']:.0f} | {r['images_per_second'] / base:.2f}x "
                         f"| {100 * r['top1']:.2f}% | {r['seconds']:.0f} s |")
    lines += ["", f"Building the teacher cache (once, shared by the seeds): {cache_build:.0f} s.", "",
              "Commands:", ""]
    for seed, runs in rows.items():
        lines += [f"    {r['command']}" for r in runs.values()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.torchdistill_worker:
        return torchdistill_worker(args)
    if not args.teacher:
        sys.exit("give the teacher checkpoint (e.g. edgekd train --model resnet20 ... --out runs/t; runs/t/model.pt)")
    args.teacher, args.out = os.path.abspath(args.teacher), os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    data = make_subset(os.path.abspath(args.data), args.out, args.subset)
    cache = os.path.join(args.out, "teacher-cache")
    # The cache is built by a first cached run (its build time is in its metrics); the replays are compared.
    cache_build = edgekd_run(args, data, 0, "cache-build", ["--teacher-cache", cache])["cache_build_seconds"] or 0.0
    rows = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        rows[seed] = {"torchdistill": torchdistill_run(args, data, seed),
                      "edgekd, live teacher": edgekd_run(args, data, seed, "live", []),
                      "edgekd, teacher cache": edgekd_run(args, data, seed, "cached", ["--teacher-cache", cache])}
        if args.compile:
            rows[seed]["edgekd, live teacher, --compile"] = edgekd_run(args, data, seed, "live-compile", ["--compile"])
            rows[seed]["edgekd, teacher cache, --compile"] = edgekd_run(
                args, data, seed, "cached-compile", ["--teacher-cache", cache, "--compile"])
        print(json.dumps(rows[seed]), flush=True)
    text = report(args, rows, cache_build)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"rows": rows, "cache_build_seconds": cache_build}, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
