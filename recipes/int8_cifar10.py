"""INT8 that keeps its accuracy, on CIFAR-10: a distilled torchvision mobilenet_v3_small quantized three ways
(post-training, post-training with the float fallback, quantization-aware distillation) into ONNX and
OpenVINO bundles, all measured on the 10,000 test images and benchmarked at batch 1 and 32 with --profile.

    python recipes/int8_cifar10.py --teacher runs/byot/teacher/model.pt   # the run in docs/records/export.md
    python recipes/int8_cifar10.py --epochs 1 --train-subset 1000 --qat-epochs 1 --qat-subset 500 \\
        --val-size 500 --quick-bench --out runs/int8-smoke                  # a smoke run

Steps, each an ordinary edgekd command (printed, logged to OUT/logs/; a step whose output exists is skipped,
so a rerun resumes):
(a) the teacher: --teacher PATH, else ``edgekd train`` resnet20 into OUT/teacher;
(b) ``edgekd distill`` the student (torchvision:mobilenet_v3_small, random init, small-input stem) -> OUT/student;
(c) FP32 bundles, then for ONNX and OpenVINO: PTQ alone (fallback and QAT off, no drop limit), PTQ with the
    fallback (--max-drop, up to --max-fallback-layers layers in float, steered by --tune-size train images, QAT
    off; a fallback that cannot meet --max-drop is reported as such);
(d) ``edgekd quantize`` (quantization-aware distillation against the same teacher) -> OUT/qat, exported to both
    (and to ONNX once more with --qat-onnx nncf, NNCF's quantizers as trained, for the profile);
(e) ``edgekd bench`` of every bundle at batch 1 and 32 with --profile -> OUT/bench;
(f) OUT/report.md: the ladder table (top-1 and drop per rung and format, layers kept in float, layers INT8),
    throughput and INT8/FP32 ratios per runtime, the per-layer INT8 error table and the profile's precision shares.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = ("onnx", "openvino")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "cifar10"),
                   help="CIFAR-10 in ImageFolder layout")
    p.add_argument("--out", default=os.path.join("runs", "int8"), help="output folder")
    p.add_argument("--teacher", default=None, help="a teacher edgekd distill takes (default: train resnet20 first)")
    p.add_argument("--teacher-epochs", type=int, default=8, help="epochs of the resnet20 teacher when trained here")
    p.add_argument("--student", default="torchvision:mobilenet_v3_small", help="student model spec")
    p.add_argument("--epochs", type=int, default=12, help="distillation epochs")
    p.add_argument("--train-subset", type=int, default=None, help="distillation train images (default: all 50,000)")
    p.add_argument("--qat-epochs", type=int, default=2, help="quantization-aware distillation epochs")
    p.add_argument("--qat-lr", type=float, default=0.001, help="quantization-aware distillation learning rate")
    p.add_argument("--qat-subset", type=int, default=None, help="QAT train images (default: all)")
    p.add_argument("--val-size", type=int, default=10000, help="test images of every parity gate (10,000: all)")
    p.add_argument("--max-drop", type=float, default=0.3, help="the fallback rung's target, top-1 points")
    p.add_argument("--max-fallback-layers", type=int, default=10)
    p.add_argument("--tune-size", type=int, default=1000, help="train images that steer the fallback")
    p.add_argument("--calib-size", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads of training runs (default: torch's)")
    p.add_argument("--quick-bench", action="store_true", help="edgekd bench --quick (a smoke run)")
    p.add_argument("--no-bench", action="store_true", help="stop before the benchmark (run it later on a quiet machine)")
    return p.parse_args(argv)


def run(argv, out, name, commands, done, check=True):
    """Record ``edgekd ARGV`` under NAME; unless DONE (a file) exists, run it as ``python -m edgekd`` with its
    output in OUT/logs/NAME.log. Returns the exit code (0 when skipped)."""
    shown = "edgekd " + " ".join(shlex.quote(str(a)) for a in argv)
    commands[name] = shown
    if os.path.isfile(done):
        return 0
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {shown}", flush=True)
    with open(os.path.join(out, "logs", f"{name}.log"), "w") as log:
        log.write(f"$ {shown}\n")
        log.flush()
        proc = subprocess.run([sys.executable, "-m", "edgekd", *map(str, argv)], stdout=log, stderr=subprocess.STDOUT,
                              cwd=REPO)
    if check and proc.returncode != 0:
        sys.exit(f"{name} failed (exit {proc.returncode}); see {out}/logs/{name}.log")
    return proc.returncode


def _last_error(out, name):
    with open(os.path.join(out, "logs", f"{name}.log")) as f:
        lines = [line.strip() for line in f if "error" in line]
    return lines[-1] if lines else "?"


def _read(path):
    with open(path) as f:
        return json.load(f)


def main(argv=None):
    a = parse_args(argv)
    out = os.path.abspath(a.out)
    data = os.path.abspath(a.data)
    threads = ["--threads", a.threads] if a.threads else []
    commands = {}

    teacher = os.path.abspath(a.teacher) if a.teacher else os.path.join(out, "teacher", "model.pt")
    if not a.teacher:
        run(["train", "--model", "resnet20", "--epochs", a.teacher_epochs, "--data", data, "--seed", a.seed, *threads,
             "--no-progress", "--force", "--out", os.path.dirname(teacher)], out, "teacher", commands, teacher)

    student = os.path.join(out, "student", "student.pt")
    subset = ["--train-subset", a.train_subset] if a.train_subset else []
    # AdamW: a MobileNetV3 from random weights learns faster with it than with SGD in a dozen epochs
    run(["distill", "--teacher", teacher, "--student", a.student, "--data", data, "--epochs", a.epochs, *subset,
         "--optimizer", "adamw", "--lr", 0.002, "--weight-decay", 0.05, "--seed", a.seed, *threads, "--no-progress",
         "--out", os.path.dirname(student)], out, "distill", commands, student)

    qat = os.path.join(out, "qat", "student-qat.pt")

    def quantize():
        subset = ["--train-subset", a.qat_subset] if a.qat_subset else []
        run(["quantize", student, "--teacher", teacher, "--epochs", a.qat_epochs, "--lr", a.qat_lr,
             "--calib-size", a.calib_size, *subset, "--seed", a.seed, *threads, "--no-progress",
             "--out", os.path.dirname(qat)], out, "quantize", commands, qat)

    gate = ["--val-size", a.val_size, "--no-progress", "--force"]
    variants = {  # name -> (checkpoint, precision, options); later rungs off where a rung is shown alone
        "fp32": (student, "fp32", []),
        "ptq": (student, "int8", ["--calib-size", a.calib_size, "--max-drop", 100, "--max-fallback-layers", 0,
                                  "--qat-epochs", 0]),
        "fallback": (student, "int8", ["--calib-size", a.calib_size, "--max-drop", a.max_drop,
                                       "--max-fallback-layers", a.max_fallback_layers, "--tune-size", a.tune_size,
                                       "--qat-epochs", 0]),
        "qat": (qat, "int8", []),
        # ONNX also with NNCF's trained quantizers exactly (--qat-onnx nncf), to show in the profile why it is not the default
        "qat-nncf": (qat, "int8", ["--qat-onnx", "nncf"]),
    }
    bundles, failures = [], {}
    for name, (checkpoint, precision, extra) in variants.items():  # the post-training rungs first: PTQ's loss is known early
        if name == "qat":
            quantize()
        for fmt in FORMATS:
            if name == "qat-nncf" and fmt != "onnx":
                continue
            folder = os.path.join(out, f"{fmt}-{name}")
            step = f"export-{fmt}-{name}"
            code = run(["export", checkpoint, "--format", fmt, "--precision", precision, *extra, *gate,
                        "--out", folder], out, step, commands, os.path.join(folder, "manifest.json"),
                       check=name != "fallback")
            if code:  # the fallback could not meet --max-drop: the report says so, the rest is benchmarked
                failures[f"{fmt}-{name}"] = _last_error(out, step)
            else:
                bundles.append(folder)

    bench = os.path.join(out, "bench")
    quick = ["--quick"] if a.quick_bench else ["--limit", a.val_size]
    if not a.no_bench:
        run(["bench", student, *bundles, "--device", "cpu", "--batch-sizes", "1,32", "--profile", "--data", data,
             *quick, "--no-progress", "--force", "--out", bench], out, "bench", commands,
            os.path.join(bench, "results.json"))
    report = write_report(out, a, teacher, bundles, failures, commands)
    print(f"report -> {report}")


def _manifest(out, name):
    path = os.path.join(out, name, "manifest.json")
    return _read(path) if os.path.isfile(path) else None


def _ladder_table(out, failures):
    lines = ["| format | rung | top-1 | drop vs FP32 student (pts) | layers INT8 | kept in float | gate |",
             "|---|---|---|---|---|---|---|"]
    for fmt in FORMATS:
        fp32 = _manifest(out, f"{fmt}-fp32")
        if fp32:
            lines.append(f"| {fmt} | FP32 | {fp32['validation']['top1']:.4f} | - | - | - | "
                         f"max diff {fp32['validation']['max_abs_diff']:.1e} |")
        for name, label in (("ptq", "PTQ"), ("fallback", "PTQ + fallback"), ("qat", "QAT (edgekd quantize)"),
                            ("qat-nncf", "QAT, NNCF's quantizers as trained (--qat-onnx nncf)")):
            m = _manifest(out, f"{fmt}-{name}")
            if m is None and name == "qat-nncf" and fmt != "onnx":
                continue
            if m is None:
                lines.append(f"| {fmt} | {label} | - | - | - | - | failed: {failures.get(f'{fmt}-{name}', '?')} |")
                continue
            v = m["validation"]
            if name.startswith("qat"):  # its gate compares with the fake-quantized model; the drop that counts is vs FP32
                top1, drop = v["top1"], m["qat"]["drop_vs_fp32_student"]
                kept = []
            else:
                top1, drop = v["top1"], v["drop"]
                kept = m["fallback"]["layers_in_float"]
            q = m["quantization"]
            total = q.get("layers") or 0
            lines.append(f"| {fmt} | {label} | {top1:.4f} | {drop:.2f} | {total - len(kept)} of {total} | "
                         f"{', '.join(kept) or '-'} | passed (--max-drop {v.get('max_drop')}) |")
    return "\n".join(lines)


def _speed_table(bench):
    rows = _read(os.path.join(bench, "results.json"))["rows"]
    lines = ["| bundle | backend | batch | top-1 | img/s | vs FP32 same runtime |", "|---|---|---|---|---|---|"]
    fp32 = {(r["backend"], r["batch_size"]): r.get("throughput_ips") for r in rows
            if r["model"].endswith("-fp32") and r.get("throughput_ips")}
    for r in sorted(rows, key=lambda r: (r["batch_size"], r["backend"], r["model"])):
        ips = r.get("throughput_ips")
        base = fp32.get((r["backend"], r["batch_size"]))
        ratio = f"{ips / base:.2f}x" if ips and base else "-"
        top1 = "-" if r.get("top1") is None else f"{r['top1']:.4f}"
        lines.append(f"| {r['model']} | {r['backend']} | {r['batch_size']} | {top1} | "
                     f"{'-' if ips is None else f'{ips:,.0f}'} | {ratio} |")
    return "\n".join(lines)


def _profile_table(bench):
    rows = [r for r in _read(os.path.join(bench, "results.json"))["rows"] if isinstance(r.get("profile"), dict)]
    lines = ["| bundle | backend | batch | time by precision | top operator types (share of time) |",
             "|---|---|---|---|---|"]
    for r in rows:
        p = r["profile"]
        shares = ", ".join(f"{k} {v * 100:.0f}%" for k, v in p.get("precision_share", {}).items())
        types = ", ".join(f"{t['op_type']} {t['share'] * 100:.0f}%" for t in p.get("by_type", [])[:4])
        lines.append(f"| {r['model']} | {r['backend']} | {r['batch_size']} | {shares} | {types} |")
    return "\n".join(lines)


def _layers_table(m, top=10):
    rep = m.get("int8_layers") or {}
    lines = [f"{rep.get('count', '?')} weighted layers, SQNR on {rep.get('images', '?')} train images; worst first",
             "", "| layer | op | output SQNR (dB) | dB lost in the layer | in float |", "|---|---|---|---|---|"]
    for r in rep.get("layers", [])[:top]:
        lines.append(f"| {r['name']} | {r['op']} | {r['sqnr_db']:.1f} | {r['loss_db']:.1f} | "
                     f"{'yes' if r['in_float'] else '-'} |")
    return "\n".join(lines)


def write_report(out, a, teacher, bundles, failures, commands):
    import platform

    flags = set()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = {w for line in f if line.startswith("flags") for w in line.split()}
    cpu = (platform.processor() or platform.machine(), os.cpu_count(),
           ", ".join(sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16"})))
    distill = _read(os.path.join(out, "student", "metrics.json"))
    quant = _read(os.path.join(out, "qat", "metrics.json"))
    parts = [f"# INT8 on CIFAR-10: {a.student}", "",
             f"Written by `python recipes/int8_cifar10.py {' '.join(shlex.quote(x) for x in sys.argv[1:])}`.",
             f"CPU: {cpu[0]}, {cpu[1]} cores, flags {cpu[2] or 'none of note'}.", "",
             f"Teacher `{teacher}`; student top-1 (FP32, PyTorch, {a.val_size} test images in the gates): "
             f"{distill.get('test_top1')}. QAT: {quant['epochs']} epoch(s), fake-quantized top-1 "
             f"{quant['qat']['int8_top1_before']:.4f} before training, {quant['test_top1']:.4f} after.", "",
             "## The ladder", "", _ladder_table(out, failures), ""]
    for fmt in FORMATS:
        m = _manifest(out, f"{fmt}-ptq")
        if m:
            parts += [f"## Per-layer INT8 error, {fmt} PTQ (plot: `{fmt}-ptq/int8_layers.png`)", "", _layers_table(m), ""]
    bench = os.path.join(out, "bench")
    if os.path.isfile(os.path.join(bench, "results.json")):
        parts += ["## Speed (edgekd bench, this machine)", "", _speed_table(bench), "",
                  "## Where the time goes (edgekd bench --profile; plot: `bench/profile.png`)", "", _profile_table(bench), ""]
    parts += ["## Commands", ""] + [f"- {k}: `{v}`" for k, v in commands.items()]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")
    return path


if __name__ == "__main__":
    main()
