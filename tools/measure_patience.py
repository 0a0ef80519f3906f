"""Issue 27's speed figures in one run on one machine: images/s of the student's training step in every setting
that matters for a patient schedule, with ratios to the bare step.

    python tools/measure_patience.py                                   # the full set (minutes on 2 cores)
    python tools/measure_patience.py --sizes 32 --dtypes float32 --steps 2 --warmup 1 --skip qat,pipeline  # smoke

Rows, per input size (--sizes, default 32,160,224) and student dtype (--dtypes, default float32,bfloat16):
  bare       the student's step (forward, KD loss against fixed logits, backward, SGD) on tensors in memory
  cache      a distillation step through edgekd's loop with the teacher's logits replayed from a TeacherCache
  live       the same with the teacher running every step (FrozenTeacher)
  mix        function matching (--mix mixup) with the cache: partners loaded and mixed, mixed-label CE
  qat        edgekd quantize's step: NNCF fake quantizers in the student, the cache as the teacher
and per size in --pipeline-sizes (default 160,224), float32, in --rounds rounds (bare, files, store in turn):
  files      the streamed pipeline (random-resized crops decoded from JPEG files in --workers processes) feeding
             the bare step: one pass over --images pictures, in wall time (waiting for a batch counts)
  store      the same views cut from a decode-once image store (edgekd.core.image_store); its build time printed
             The *_ratio figures are the medians of each round's ratio to that round's bare step; *_decode_ms
             what one decoding worker spends per picture (one process, one thread).
Every ratio is against the bare step at the same size and dtype; the loop rows (cache, live, mix, qat, files,
store) are wall time, the wait for each batch included. Models are random (speed only): --student and --teacher
name them (edgekd model specs). Pictures for the pipeline are generated in --work (smooth random JPEGs of mixed
sizes around --photo-scale x the input), never in the repository.

Prints how it was run first (CPU model and flags, torch threads, versions); run `uptime` beside it, and compare
figures of one run only (the machine's load moves them by 15-35 %).
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from edgekd.base.cpu import short_spin_wait  # noqa: E402

short_spin_wait()  # before torch loads, as every edgekd command that trains does (edgekd.base.cpu)

import torch  # noqa: E402

from edgekd.core.augment import AugmentPlan, Views  # noqa: E402
from edgekd.core.data import InputSpec  # noqa: E402
from edgekd.core.fakequant import fast_quantizers  # noqa: E402
from edgekd.core.losses import make_loss  # noqa: E402
from edgekd.core.mixing import attach_mix  # noqa: E402
from edgekd.core.models import build_model  # noqa: E402
from edgekd.core.precision import student_autocast  # noqa: E402
from edgekd.core.teacher_cache import TeacherCache  # noqa: E402
from edgekd.core.teachers import FrozenTeacher  # noqa: E402
from edgekd.core.train_loop import TrainRun, _backward, _Loop, _step  # noqa: E402

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
CLASSES = 10


def how_run():
    """The CPU's model and the flags that matter for bf16 and INT8, threads and versions."""
    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.processor()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "flags": [f for f in FLAGS if f in flags], "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT")}


def _spec(size):
    return InputSpec(3, size, size, [0.5] * 3, [0.25] * 3, crop_pct=1.0)


def _views(n, size):
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return Views(images, torch.arange(n) % CLASSES, [0.5] * 3, [0.25] * 3,
                 AugmentPlan("standard" if size <= 48 else "none", n, seed=0))


def _optim(model):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def bare_step(student, size, args, dtype):
    """Images/s of the student's bare step on one batch held in memory."""
    x = torch.randn(args.batch_size, 3, size, size)
    y, t = torch.arange(args.batch_size) % CLASSES, torch.randn(args.batch_size, CLASSES)
    loss_fn, _ = make_loss("kd")
    opt, _ = _optim(student)
    seconds = 0.0
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        with student_autocast(dtype):
            s = student(x)
        loss = loss_fn(s.float(), t, y)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= args.warmup:
            seconds += time.perf_counter() - start
    return args.steps * args.batch_size / seconds


def loop_step(student, run, args, dtype):
    """Images/s of edgekd's own training step (train_loop._step and _backward) over ``run.train``'s batches, in
    wall time: the wait for each batch (its decoding, or its workers' share of the cores) counts."""
    student.train()
    opt, sched = _optim(student)
    loop = _Loop(student, student, opt, sched, None, None, False)
    run.student_autocast = dtype
    done, seen, seconds = 0, 0, 0.0
    while done < args.warmup + args.steps:
        batches = run.train.batches(args.batch_size, epoch=1, shuffle_seed=done, teacher_view=True)
        last = time.perf_counter()
        for x, xt, y, idx in batches:  # wall time from the last step's end: waiting for this batch counts
            _, _, parts = _step(student, run, x, y, idx, 1, xt)
            _backward(loop, run, parts["loss"])
            now = time.perf_counter()
            if done >= args.warmup:
                seconds, seen = seconds + now - last, seen + len(y)
            last, done = now, done + 1
            if done >= args.warmup + args.steps:
                break
    return seen / seconds


def _cache(folder, teacher, views, name):
    path = os.path.join(folder, f"{name}.pt")
    torch.save({"name": name}, path)  # the cache is keyed by a file's sha256: one per teacher/setting here
    cache = TeacherCache(os.path.join(folder, "cache"), path, views, dtype="float16")
    cache.build(teacher, 1, progress=False)
    return cache


def _qat_model(student, views):
    from edgekd.core.fakequant import calibrate

    return calibrate(student, views, min(64, len(views)), seed=0, progress=False)


def rows_for(size, dtype_name, args, folder):
    """The bare, cache, live, mix and QAT rows at one size and dtype."""
    dtype = torch.bfloat16 if dtype_name == "bfloat16" else None
    spec = _spec(size)
    torch.manual_seed(0)
    student = build_model(args.student, CLASSES, spec)
    teacher = FrozenTeacher(build_model(args.teacher, CLASSES, spec), spec, spec)
    n = args.batch_size * (args.warmup + args.steps)
    loss_fn, _ = make_loss("kd")
    out = {"bare": bare_step(student, size, args, dtype)}
    views = _views(n, size)
    if "cache" not in args.skip:
        cache = _cache(folder, teacher, views, f"t{size}")
        out["cache"] = loop_step(student, TrainRun(views, None, loss_fn, cache=cache), args, dtype)
    if "live" not in args.skip:
        out["live"] = loop_step(student, TrainRun(views, None, loss_fn, teacher=teacher), args, dtype)
    if "mix" not in args.skip:
        mixed = _views(n, size)
        attach_mix(mixed, "mixup", 1.0)
        run = TrainRun(mixed, None, loss_fn, cache=_cache(folder, teacher, mixed, f"m{size}"))
        out["mix"] = loop_step(student, run, args, dtype)
    if "qat" not in args.skip:
        try:  # a row that fails is recorded with its reason; the others still run
            qmodel = _qat_model(build_model(args.student, CLASSES, spec), views)
            cache = _cache(folder, teacher, views, f"q{size}")
            with fast_quantizers(qmodel):  # as edgekd quantize trains it
                out["qat"] = loop_step(qmodel, TrainRun(views, None, loss_fn, cache=cache), args, dtype)
        except Exception as e:
            out["qat"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return out


def make_photos(root, n, size, scale=1.5):
    """``n`` smooth random JPEG pictures of mixed sizes around ``scale`` x ``size`` in ``root``/train/CLASS."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    shapes = [(3, 2), (2, 3), (1, 1), (16, 9)]
    for k in range(n + CLASSES):  # the last CLASSES pictures: a test split, one per class (edgekd wants one)
        folder = os.path.join(root, "train" if k < n else "test", f"c{k % CLASSES}")
        os.makedirs(folder, exist_ok=True)
        a, b = shapes[k % len(shapes)]
        w, h = int(scale * size * a / max(a, b)), int(scale * size * b / max(a, b))
        small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        small.resize((max(w, size), max(h, size)), Image.BICUBIC).save(os.path.join(folder, f"{k}.jpg"), quality=90)
    return root


def pass_step(student, run, args):
    """Images/s, in wall time, of one pass of edgekd's training step over ``run.train``'s streamed batches: the
    wait for each batch (its decoding, its workers' share of the cores, starting the workers) counts; only the
    first ``args.warmup`` batches are left out."""
    student.train()
    opt, sched = _optim(student)
    loop = _Loop(student, student, opt, sched, None, None, False)
    seen, start = 0, None
    for k, (x, xt, y, idx) in enumerate(run.train.batches(args.batch_size, epoch=1, shuffle_seed=0,
                                                          teacher_view=True)):
        if k == args.warmup:
            start = time.perf_counter()
        _, _, parts = _step(student, run, x, y, idx, 1, xt)
        _backward(loop, run, parts["loss"])
        seen += len(y) if start is not None else 0
    if start is None:
        raise SystemExit(f"--images {len(run.train)} make no more than --warmup {args.warmup} batches of "
                         f"{args.batch_size}: give more --images or fewer --warmup")
    return seen / (time.perf_counter() - start)


def decode_ms(views, n):
    """Milliseconds per picture of cutting one view (decode or store read, crop, resize, flip) in this process on
    one thread: what each decoding worker spends per picture."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        decoder = views._decoder(1, False)
        for i in range(8):
            decoder[i]
        start = time.perf_counter()
        for i in range(min(n, len(views))):
            decoder[i]
        return (time.perf_counter() - start) * 1e3 / min(n, len(views))
    finally:
        torch.set_num_threads(threads)


def pipeline_rows(size, args, folder):
    """Images/s of the bare step, and of the same step fed by streamed views from the files and from an image
    store, in ``args.rounds`` rounds (bare, files, store in each, one after another): each ratio is against the
    bare step of its own round, and the row holds the medians (the machine's load drifts between rounds)."""
    import statistics

    from edgekd.core.data import SizeChoice, load_data, parse_size
    from edgekd.core.image_store import attach_store
    from edgekd.core.stream import StreamViews

    root = make_photos(os.path.join(folder, f"photos{size}"), args.images, size, args.photo_scale)
    data = load_data(root, choice=SizeChoice(size=parse_size([size, size])))
    torch.manual_seed(0)
    student = build_model(args.student, CLASSES, data.input)
    runs, out = {}, {}
    for name in ("files", "store"):
        views = StreamViews.of([(data.train, None, None)], data.input, None, workers=args.workers)
        views.plan = AugmentPlan("random-resized-crop", len(views), seed=0, scale=0.08)
        if name == "store":
            start = time.perf_counter()
            record = attach_store(views, os.path.join(folder, f"store{size}"), progress=False)
            out["store_build_s"], out["store_mb"] = time.perf_counter() - start, record["bytes"] / 1e6
        runs[name] = TrainRun(views, None, _FixedLogits())
        out[f"{name}_decode_ms"] = decode_ms(views, args.batch_size * 4)
    rounds = []
    for _ in range(args.rounds):
        got = {"bare": bare_step(student, size, args, None)}
        for name, run in runs.items():
            got[name] = pass_step(student, run, args)
        rounds.append(got)
        print(f"    round: " + ", ".join(f"{k} {v:.0f}" for k, v in got.items()), flush=True)
    for name in ("bare", "files", "store"):
        out[name] = statistics.median(r[name] for r in rounds)
        if name != "bare":
            out[f"{name}_ratio"] = statistics.median(r[name] / r["bare"] for r in rounds)
    return out


class _FixedLogits(torch.nn.Module):
    """The bare step's loss for a pipeline row: KD against fixed logits (no teacher, no cache)."""

    def __init__(self):
        super().__init__()
        self.kd, _ = make_loss("kd")

    def forward(self, s, t, y, **_):
        return self.kd(s, torch.zeros_like(s), y)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="32,160,224", help="input sizes of the step rows (default: 32,160,224)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="student dtypes (default: float32,bfloat16)")
    p.add_argument("--pipeline-sizes", default="160,224", help="input sizes of the pipeline rows (default: 160,224)")
    p.add_argument("--student", default="torchvision:mobilenet_v3_small", help="student model spec")
    p.add_argument("--teacher", default="torchvision:resnet18", help="teacher model spec (random weights)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default: 64)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--images", type=int, default=3072, help="generated pictures per pipeline size (default: 3072)")
    p.add_argument("--photo-scale", type=float, default=1.5, help="the generated pictures' longer side against the "
                   "input side (default: 1.5; camera photos are 10-20)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the pipeline rows, each timing bare, files and "
                   "store in turn; medians are printed (default: 3)")
    p.add_argument("--workers", type=int, default=2, help="decoding processes of the pipeline rows (default: 2)")
    p.add_argument("--skip", default="", help="rows to leave out: cache,live,mix,qat,pipeline")
    p.add_argument("--work", default=None, help="folder for generated pictures, caches and stores (default: a "
                   "temporary one)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    args.skip = set(filter(None, args.skip.split(",")))
    setup = how_run()
    print("how this was run:", json.dumps(setup))
    results = {"setup": setup, "args": {k: v for k, v in vars(args).items() if k != "skip"}, "rows": []}
    with tempfile.TemporaryDirectory(prefix="edgekd-patience-", dir=args.work) as folder:
        for size in [int(s) for s in args.sizes.split(",") if s]:
            for dtype in [d for d in args.dtypes.split(",") if d]:
                row = rows_for(size, dtype, args, folder)
                _print(f"{size:>4} px {dtype:<9}", row, row["bare"])
                results["rows"].append({"size": size, "dtype": dtype, **row})
        if "pipeline" not in args.skip:
            for size in [int(s) for s in args.pipeline_sizes.split(",") if s]:
                row = pipeline_rows(size, args, folder)
                _print(f"{size:>4} px pipeline", row, row["bare"])
                results["rows"].append({"size": size, "dtype": "float32", "pipeline": True, **row})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def _print(label, row, bare):
    parts = []
    for k, v in row.items():
        if isinstance(v, str):
            parts.append(f"{k} {v}")
        elif k.endswith("_ratio"):
            parts.append(f"{k} {v:.2f}x (median of the rounds' own ratios)")
        elif k.endswith("_s") or k.endswith("_mb"):
            parts.append(f"{k} {v:.1f}")
        elif k.endswith("_ms"):
            parts.append(f"{k} {v:.2f}")
        else:
            parts.append(f"{k} {v:.0f} img/s" + ("" if k == "bare" else f" ({v / bare:.2f}x)"))
    print(f"{label}: " + ", ".join(parts), flush=True)


if __name__ == "__main__":
    main()
