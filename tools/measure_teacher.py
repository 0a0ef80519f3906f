"""How fast a frozen teacher runs on this CPU, and how a distillation shares the CPU with others.

    python tools/measure_teacher.py dtype [--teacher SPEC|CKPT] [--sizes 32,160] [--images 256] [--batch 64]
    python tools/measure_teacher.py contention [--seconds 10] [--threads 2] [--policies default,passive,spin-3k,edgekd]
    python tools/measure_teacher.py topk --teacher CKPT [--ks 1,2,5] [--train-subset 5000] [--epochs 5]

``dtype``: the teacher in float32 and bfloat16 (weights cast, as edgekd's --teacher-dtype bfloat16
does; and torch.autocast for comparison), each with and without channels_last, on real CIFAR-10
training views (../shared/data/cifar10, the standard pad-crop + flip view of epoch 1) resized to each
size: images/s, top-1 agreement with the float32 teacher, largest logit difference. ``--teacher`` is
an edgekd model spec (random weights unless a checkpoint .pt is given; agreement is only meaningful
for a trained teacher, e.g. one from ``edgekd train --model resnet20``).

``contention``: a real distillation step (resnet20 teacher live, resnet8 student, Hinton KD, batch 64,
32 px) in a fresh process per case: alone, and with one busy process (``python -c 'while True:
pass'``) started beside it; for each wait policy: libgomp's default (spinning), OMP_WAIT_POLICY=PASSIVE,
1 thread, and edgekd's own setting (edgekd.base.cpu.short_spin_wait, what `edgekd distill` does).

``topk``: the same distillation (seeds, views, teacher) from a float16 cache (the default), a float32
one, one made by the teacher in float32 rather than --teacher-dtype auto, and top-k ones: the
student's test top-1, the cache's size, and KL(teacher || rebuilt) at T = 4.

Each prints a table and, with --json, the figures; they print `uptime` before and after: on a shared
machine the figures move with other people's work.
"""

import argparse
import json
import os
import subprocess
import sys
import time

CIFAR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10")


# ---------------------------------------------------------------------------------------------------
# dtype: float32 against bfloat16

def _views(n, size):
    """n real CIFAR-10 training views (epoch 1 of the standard augmentation), normalised, at ``size`` px."""
    import torch
    from torch.nn import functional as F

    from edgekd.core.augment import AugmentPlan, Views, decode_split
    from edgekd.core.data import load_data

    data = load_data(os.path.abspath(CIFAR))
    idx = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:n]
    images, labels = decode_split(data.train, data.input, idx, workers=0, progress=False)
    views = Views(images, labels, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26], AugmentPlan("standard", len(labels)))
    x, _ = views.batch(torch.arange(len(labels)), epoch=1)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def _teacher(spec, size):
    import torch

    from edgekd.core.data import InputSpec
    from edgekd.core.models import build_model

    if spec.endswith(".pt"):
        from edgekd.core.loading import load_model

        return load_model(spec)[0].eval()
    torch.manual_seed(0)
    return build_model(spec, 10, InputSpec(3, size, size, [0.5] * 3, [0.5] * 3)).eval()


VARIANTS = [(mode, cl) for mode in ("float32", "bfloat16", "autocast") for cl in (False, True)]


def _prepare(model, x, mode, channels_last):
    """The model and views as one variant runs them: bf16 weights and inputs, or autocast; NCHW or NHWC."""
    import torch

    if mode == "bfloat16":
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    return model, x


def _pass(model, x, batch, mode):
    """(seconds, float32 logits) of one pass over ``x``."""
    import contextlib

    import torch

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        start = time.perf_counter()
        out = torch.cat([model(x[i:i + batch]).float() for i in range(0, len(x), batch)])
    return time.perf_counter() - start, out


def measure_dtype(args):
    """Every variant once per round, rounds interleaved (a slow spell hits all variants alike); the speed-up
    is the median over rounds of each round's ratio to float32."""
    import copy
    import statistics

    rows = []
    for size in args.sizes:
        x = _views(args.images, size)
        base = _teacher(args.teacher, size)
        runs = {v: _prepare(copy.deepcopy(base), x, *v) for v in VARIANTS}
        for v, (model, xv) in runs.items():  # warm-up: oneDNN picks and caches its kernels
            _pass(model, xv[:args.batch], args.batch, v[0])
        seconds, logits = {v: [] for v in VARIANTS}, {}
        for _ in range(args.repeats):
            for v, (model, xv) in runs.items():
                s, logits[v] = _pass(model, xv, args.batch, v[0])
                seconds[v].append(s)
        reference = logits[("float32", False)]
        for v in VARIANTS:
            ratio = statistics.median(b / s for s, b in zip(seconds[v], seconds[("float32", False)]))
            row = {"size": size, "dtype": v[0], "channels_last": v[1], "images": len(x), "rounds": args.repeats,
                   "images_per_s": len(x) / statistics.median(seconds[v]), "speedup_vs_float32": ratio,
                   "top1_agreement": (logits[v].argmax(1) == reference.argmax(1)).float().mean().item(),
                   "max_abs_logit_diff": (logits[v] - reference).abs().max().item()}
            rows.append(row)
            print(f"{size:>4} px  {v[0]:<9} channels_last={v[1]!s:<5}  {row['images_per_s']:8.1f} img/s  "
                  f"x{ratio:.2f} vs float32  agreement {row['top1_agreement']:.4f}  "
                  f"max |dlogit| {row['max_abs_logit_diff']:.3g}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------
# contention: a distillation beside a busy process

KD_STEPS = r"""
import sys, time
threads, seconds, policy = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if policy == "edgekd":
    from edgekd.base.cpu import short_spin_wait
    short_spin_wait()
import torch
torch.set_num_threads(threads)
from edgekd.core.data import InputSpec
from edgekd.core.losses import make_loss
from edgekd.core.models import build_model
spec = InputSpec(3, 32, 32, [0.5] * 3, [0.5] * 3)
torch.manual_seed(0)
teacher, student = build_model("resnet20", 10, spec).eval(), build_model("resnet8", 10, spec)
loss_fn, opt = make_loss("kd")[0], torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
def step():
    with torch.inference_mode():
        t = teacher(x)
    loss = loss_fn(student(x), t.clone(), y)["loss"]
    opt.zero_grad(); loss.backward(); opt.step()
for _ in range(3):
    step()
n, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    step(); n += len(x)
print(n / (time.perf_counter() - start))
"""

POLICIES = {"default": ({}, None), "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, None), "1-thread": ({}, 1),
            "edgekd": ({}, None),
            # a short spin before sleeping (libgomp's default is 300,000 pause loops): not in the default set
            "spin-3k": ({"GOMP_SPINCOUNT": "3000"}, None), "spin-30k": ({"GOMP_SPINCOUNT": "30000"}, None)}
DEFAULT_POLICIES = ["default", "passive", "1-thread", "edgekd"]


def _kd_rate(threads, seconds, policy):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    extra, forced = POLICIES[policy]
    env.update(extra)
    out = subprocess.run([sys.executable, "-c", KD_STEPS, str(forced or threads), str(seconds), policy], env=env,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure_contention(args):
    rows = []
    for policy in args.policies:
        alone = _kd_rate(args.threads, args.seconds, policy)
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.5)
            shared = _kd_rate(args.threads, args.seconds, policy)
        finally:
            busy.kill()
            busy.wait()
        rows.append({"policy": policy, "threads": POLICIES[policy][1] or args.threads, "alone_images_per_s": alone,
                     "with_busy_images_per_s": shared, "ratio": shared / alone})
        print(f"{policy:<9} threads={rows[-1]['threads']}  alone {alone:7.1f} img/s  beside a busy process "
              f"{shared:7.1f} img/s  ({shared / alone:.2f}x)", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------
# topk: what keeping only the k largest logits per view costs the student

def _distill(args, out, extra):
    cmd = [sys.executable, "-m", "edgekd", "distill", "--teacher", args.teacher, "--student", args.student,
           "--data", args.data, "--epochs", str(args.epochs), "--teacher-cache", os.path.join(args.out, "cache"),
           "--no-progress", "--force", "--out", out, *extra]
    if args.train_subset:
        cmd += ["--train-subset", str(args.train_subset)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def _reconstruction(cache_path, k, temperature):
    """Mean KL(teacher_T || rebuilt_T) over the first view's images, and top-1 kept (always, by design)."""
    import numpy as np
    import torch

    from edgekd.core.teacher_cache import TeacherCache, fill_value

    logits = torch.from_numpy(np.load(os.path.join(cache_path, "view-0001.npy")).astype(np.float32))
    top = logits.topk(k, dim=1)
    rebuilt = TeacherCache.expand(top.values, top.indices, fill_value(logits, top.values, temperature), logits.shape[1])
    p, log_q = torch.softmax(logits / temperature, 1), torch.log_softmax(rebuilt / temperature, 1)
    return (p * (p.clamp_min(1e-30).log() - log_q)).sum(1).mean().item()


def measure_topk(args):
    """The same distillation (same seeds, views, teacher) from a full float16 cache, a float32 one and top-k ones."""
    rows, full = [], None
    for variant in ["float16"] + [f"top{k}" for k in args.ks] + ["float32", "teacher-float32"]:
        extra = (["--teacher-cache-dtype", "float32"] if variant == "float32" else
                 ["--teacher-dtype", "float32"] if variant == "teacher-float32" else
                 ["--teacher-cache-topk", variant[3:]] if variant.startswith("top") else [])
        m = _distill(args, os.path.join(args.out, variant), extra)
        full = full or m  # the float16 cache: the reference the top-k ones are rebuilt from
        row = {"cache": variant, "test_top1": m["test_top1"], "cache_bytes": m["teacher_cache"]["bytes"],
               "teacher_test_top1": m["teacher"].get("test_top1"), "teacher_dtype": m["teacher"]["dtype"],
               "cache_build_seconds": m["teacher_cache"]["build_seconds"]}
        if variant.startswith("top"):
            row["kl_teacher_vs_rebuilt_at_T4"] = _reconstruction(full["teacher_cache"]["path"], int(variant[3:]), 4.0)
        rows.append(row)
        print(f"{variant:<8} student test top-1 {row['test_top1']:.4f}  cache {row['cache_bytes'] / 1e6:.2f} MB"
              + (f"  KL(teacher || rebuilt) at T=4: {row['kl_teacher_vs_rebuilt_at_T4']:.4f}"
                 if "kl_teacher_vs_rebuilt_at_T4" in row else ""), flush=True)
    return rows


def _uptime():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("dtype", help="float32 against bfloat16 (and channels_last) for a frozen teacher")
    d.add_argument("--teacher", default="torchvision:resnet18", help="an edgekd model spec or a checkpoint .pt")
    d.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[32, 160])
    d.add_argument("--images", type=int, default=256)
    d.add_argument("--batch", type=int, default=64)
    d.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    c = sub.add_parser("contention", help="a 2-thread distillation alone and beside one busy process")
    c.add_argument("--seconds", type=float, default=10.0)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--policies", type=lambda s: s.split(","), default=DEFAULT_POLICIES,
                   help=f"comma list of {', '.join(POLICIES)} (default: %(default)s)")
    k = sub.add_parser("topk", help="student accuracy from a full teacher cache against top-k ones")
    k.add_argument("--teacher", required=True, help="a trained teacher checkpoint")
    k.add_argument("--student", default="resnet8")
    k.add_argument("--data", default=os.path.abspath(CIFAR))
    k.add_argument("--train-subset", type=int, default=5000)
    k.add_argument("--epochs", type=int, default=5)
    k.add_argument("--ks", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 5])
    k.add_argument("--out", default="runs/topk")
    for s in (d, c, k):
        s.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    before = _uptime()
    print("before:", before, flush=True)
    rows = {"dtype": measure_dtype, "contention": measure_contention, "topk": measure_topk}[args.what](args)
    after = _uptime()
    print("after: ", after)
    if args.json:
        import platform

        with open(args.json, "w") as f:
            json.dump({"what": args.what, "args": {k: v for k, v in vars(args).items() if k != "json"},
                       "uptime_before": before, "uptime_after": after, "cpu": platform.processor(),
                       "cpus": os.cpu_count(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
