"""Bring your own teacher on CIFAR-10: the same teacher as an edgekd checkpoint, an ONNX FP32 bundle and an
OpenVINO INT8 bundle, each teaching the same student (same seed, epochs and data), live (no cache).

    python recipes/byot_cifar10.py [--data ../shared/data/cifar10] [--out runs/byot]
    python recipes/byot_cifar10.py --teacher-epochs 1 --teacher-subset 500 --train-subset 500 --epochs 1  # smoke

(a) ``edgekd train`` a resnet20 teacher on the whole train split into OUT/teacher, (b) ``edgekd export`` it
to ONNX FP32 and OpenVINO INT8, (c) ``edgekd distill`` resnet8 from the .pt, the ONNX and the OpenVINO INT8
teacher one after the other, (d) write OUT/report.md: teacher source, teacher top-1, student top-1, distill
images/s, the teacher's share of each epoch, and the command of each run. Every step is an ordinary edgekd
command (printed, logged to OUT/logs/); a step whose output exists is skipped, so a rerun resumes.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "cifar10"),
                   help="CIFAR-10 in ImageFolder layout (default: %(default)s)")
    p.add_argument("--out", default=os.path.join("runs", "byot"), help="output folder (default: %(default)s)")
    p.add_argument("--teacher-model", default="resnet20")
    p.add_argument("--teacher-epochs", type=int, default=5, help="teacher training epochs (default: %(default)s)")
    p.add_argument("--teacher-subset", type=int, default=None, help="teacher train images (default: all 50,000)")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--epochs", type=int, default=5, help="distillation epochs, every source (default: %(default)s)")
    p.add_argument("--train-subset", type=int, default=10000, help="distillation train images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads of every run (default: torch's)")
    p.add_argument("--calib-size", type=int, default=300, help="INT8 calibration images (default: %(default)s)")
    return p.parse_args(argv)


def run(argv, out, name):
    """Run ``python -m edgekd ARGV`` with its output in OUT/logs/NAME.log; return the command line."""
    command = [sys.executable, "-m", "edgekd", *map(str, argv)]
    shown = "edgekd " + " ".join(shlex.quote(str(a)) for a in argv)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {shown}", flush=True)
    with open(os.path.join(out, "logs", f"{name}.log"), "w") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"{name} failed (exit {proc.returncode}); see {out}/logs/{name}.log")
    return shown


def main(argv=None):
    a = parse_args(argv)
    out = os.path.abspath(a.out)
    threads = ["--threads", a.threads] if a.threads else []
    common = ["--data", os.path.abspath(a.data), "--seed", a.seed, "--no-progress", "--force", *threads]
    teacher_dir = os.path.join(out, "teacher")
    commands = {}
    if not os.path.isfile(os.path.join(teacher_dir, "model.pt")):
        subset = ["--train-subset", a.teacher_subset] if a.teacher_subset else []
        commands["teacher"] = run(["train", "--model", a.teacher_model, "--epochs", a.teacher_epochs, *subset,
                                   *common, "--out", teacher_dir], out, "teacher")
    checkpoint = os.path.join(teacher_dir, "model.pt")
    bundles = {"onnx-fp32": ("onnx", "fp32"), "openvino-int8": ("openvino", "int8")}
    for name, (fmt, precision) in bundles.items():
        folder = os.path.join(out, f"teacher-{name}")
        if not os.path.isfile(os.path.join(folder, "manifest.json")):
            extra = ["--calib-size", a.calib_size] if precision == "int8" else []
            commands[f"export {name}"] = run(["export", checkpoint, "--format", fmt, "--precision", precision, *extra,
                                              "--no-progress", "--force", "--out", folder], out, f"export-{name}")
    sources = {"checkpoint (.pt, PyTorch)": checkpoint,
               "ONNX FP32 bundle (ONNX Runtime)": os.path.join(out, "teacher-onnx-fp32"),
               "OpenVINO INT8 bundle (OpenVINO)": os.path.join(out, "teacher-openvino-int8")}
    rows = []
    for i, (label, teacher) in enumerate(sources.items()):
        folder = os.path.join(out, f"student-{i}")
        argv = ["distill", "--teacher", teacher, "--student", a.student, "--epochs", a.epochs,
                "--train-subset", a.train_subset, *common, "--out", folder]
        shown = "edgekd " + " ".join(shlex.quote(str(x)) for x in argv)
        if not os.path.isfile(os.path.join(folder, "metrics.json")):
            shown = run(argv, out, f"student-{i}")
        rows.append(row(label, folder, shown))
    write_report(out, rows, commands, a)


def row(label, folder, command):
    with open(os.path.join(folder, "metrics.json")) as f:
        m = json.load(f)
    history = m["history"]
    seconds = sum(h["seconds"] for h in history)
    teacher_seconds = sum(h.get("teacher_seconds") or 0.0 for h in history)
    images = sum(h["images_per_s"] * h["seconds"] for h in history)
    return {"source": label, "teacher_top1": m["teacher"].get("test_top1"), "student_top1": m["test_top1"],
            "images_per_s": images / seconds if seconds else None,
            "teacher_share": teacher_seconds / seconds if seconds else None,
            "teacher_kind": m["teacher"].get("kind"), "command": command}


def _pct(v):
    return "–" if v is None else f"{100 * v:.2f}%"


def write_report(out, rows, commands, a):
    lines = ["# Bring your own teacher: one teacher, three formats, one student (CIFAR-10)", "",
             f"Teacher {a.teacher_model} ({a.teacher_epochs} epochs, {a.teacher_subset or 'all'} train images); "
             f"student {a.student}, {a.epochs} epochs on {a.train_subset} train images, seed {a.seed}, live teacher "
             "(no cache). Teacher top-1 on the test split: the checkpoint's own record for the .pt, measured through "
             "the runtime (ONNX Runtime, OpenVINO) for the bundles. Teacher forward share: the teacher's own forward "
             "seconds (view conversion included) over the epoch's seconds.", "",
             "| teacher source | teacher top-1 | student top-1 | distill images/s | teacher forward share | command |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['source']} | {_pct(r['teacher_top1'])} | {_pct(r['student_top1'])} | "
                     f"{r['images_per_s']:.0f} | {_pct(r['teacher_share'])} | `{r['command']}` |")
    if commands:
        lines += ["", "Steps run now:", ""] + [f"- {k}: `{v}`" for k, v in commands.items()]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(text)


if __name__ == "__main__":
    main()
