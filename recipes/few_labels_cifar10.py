"""Few labels on CIFAR-10: what do 48,000 unlabelled images and a teacher add to 2,000 labels?

    python recipes/few_labels_cifar10.py [TEACHER.pt] [--data ../shared/data/cifar10] [--out runs/few-labels]

For each seed: (a) the student trained alone with ``edgekd train --train-subset 2000``, (b) the same
student distilled from TEACHER with ``--train-subset 2000 --unlabeled DATA/train`` (the 2,000
labelled images are skipped from the unlabelled folder, so 48,000 join; the teacher cache makes the
teacher run once per view, shared by the seeds). Both runs normalise with the labelled images'
statistics and see the same augmentation; (a) gets as many optimizer steps as (b) by default
(--alone-epochs), so the student's training compute is the same and only the unlabelled images and
the teacher differ. Writes OUT/few_labels.md: each run's top-1, the mean of the seeds, the gain,
and the command of every run. Finished runs (with metrics.json) are kept when it is run again.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))  # recipes/
REPO = os.path.dirname(HERE)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("teacher", nargs="?", default="runs/byot/teacher/model.pt",
                   help="teacher checkpoint (default: %(default)s)")
    p.add_argument("--data", default="../shared/data/cifar10", help="ImageFolder with train/ and test/ (default: %(default)s)")
    p.add_argument("--out", default="runs/few-labels", help="output folder (default: %(default)s)")
    p.add_argument("--student", default="compact-student", help="student spec (default: %(default)s)")
    p.add_argument("--labels", type=int, default=2000, help="labelled images, --train-subset (default: %(default)s)")
    p.add_argument("--seeds", default="0,1", help="comma list of seeds (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=15, help="epochs of the distilled runs over all images (default: %(default)s)")
    p.add_argument("--alone-epochs", type=int, default=None,
                   help="epochs of the student alone on the labelled images (default: the same number of "
                        "optimizer steps as a distilled run)")
    p.add_argument("--loss", default="kd", help="distillation loss (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--teacher-views", type=int, default=None,
                   help="distilled runs: K fixed views per image, so the teacher cache holds K views, not one per "
                        "epoch (default: a new view every epoch)")
    p.add_argument("--views-cost", action="store_true",
                   help="with --teacher-views: also distill the first seed with a new view every epoch, to measure "
                        "what the fixed views cost in accuracy")
    p.add_argument("--extra", default="", help="more options for every run, e.g. '--threads 2 --device cuda'")
    return p.parse_args(argv)


def plan_runs(args):
    """[(name, argv)]: for each seed the student alone, then the student distilled with unlabelled images."""
    seeds = [int(s) for s in args.seeds.split(",")]
    train_dir = os.path.join(args.data, "train")
    common = ["--data", args.data, "--train-subset", str(args.labels),
              "--batch-size", str(args.batch_size), "--no-progress", *shlex.split(args.extra)]
    alone_epochs = args.alone_epochs or _same_steps_epochs(args, train_dir)
    views = ["--teacher-views", str(args.teacher_views)] if args.teacher_views else []
    runs = []
    for seed in seeds:
        distill = ["distill", "--teacher", args.teacher, "--student", args.student, *common, "--unlabeled", train_dir,
                   "--teacher-cache", f"{args.out}/teacher-cache", "--loss", args.loss, "--epochs", str(args.epochs),
                   "--seed", str(seed)]
        runs.append((f"alone-s{seed}", ["train", "--model", args.student, *common, "--epochs", str(alone_epochs),
                                        "--seed", str(seed), "--out", f"{args.out}/alone-s{seed}"]))
        runs.append((f"distill-s{seed}", [*distill, *views, "--out", f"{args.out}/distill-s{seed}"]))
    if views and args.views_cost:  # the same first run with a new view every epoch (no fixed views)
        runs.append((f"every-view-s{seeds[0]}", [*distill[:-1], str(seeds[0]),
                                                 "--out", f"{args.out}/every-view-s{seeds[0]}"]))
    return runs


def _same_steps_epochs(args, train_dir):
    """Epochs over the labelled images that take as many optimizer steps as --epochs over all train images."""
    from edgekd.core.data import image_files

    total = len(image_files(_in_repo(train_dir)))
    steps = -(-total // args.batch_size) * args.epochs
    return max(1, round(steps / -(-args.labels // args.batch_size)))


def _in_repo(path):
    """Paths on the command line are relative to the repository, where every run starts."""
    return path if os.path.isabs(path) else os.path.join(REPO, path)


def run(runs, out):
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    for name, argv in runs:
        if os.path.isfile(os.path.join(out, name, "metrics.json")):
            print(f"keep {name} (finished earlier)", flush=True)
            continue
        print(f"[{time.strftime('%H:%M:%S')}] start {name}: edgekd {shlex.join(argv)}", flush=True)
        start = time.time()
        with open(os.path.join(out, "logs", f"{name}.log"), "w") as log:
            rc = subprocess.call([sys.executable, "-m", "edgekd", *argv, "--force"], stdout=log,
                                 stderr=subprocess.STDOUT, cwd=REPO)
        print(f"[{time.strftime('%H:%M:%S')}] done {name} rc={rc} in {time.time() - start:.0f} s", flush=True)
        if rc != 0:
            sys.exit(f"{name} failed (exit {rc}); see {out}/logs/{name}.log")


def results_markdown(runs, out, args):
    metrics = {name: json.load(open(os.path.join(out, name, "metrics.json"))) for name, _ in runs}
    alone = [m["test_top1"] for n, m in metrics.items() if n.startswith("alone")]
    distilled = [m["test_top1"] for n, m in metrics.items() if n.startswith("distill")]
    views = {n: m["train_data"].get("views") for n, m in metrics.items()}
    lines = [f"# Few labels: {args.labels} labelled CIFAR-10 images, with and without the other images unlabelled",
             "", f"Teacher `{args.teacher}`, student `{args.student}`, loss `{args.loss}`; last-epoch top-1 on the "
             "test split. Written by `recipes/few_labels_cifar10.py`.", "",
             "| run | labelled | unlabelled | epochs | views per image | top-1 |", "|---|---|---|---|---|---|"]
    for name, m in metrics.items():
        d = m["train_data"]
        lines.append(f"| {name} | {d.get('labelled_images', d['train_images'])} | {d.get('unlabeled_images', 0)} | "
                     f"{m['epochs']} | {views[name] or 'one per epoch'} | {100 * m['test_top1']:.2f}% |")
    mean_a, mean_d = statistics.mean(alone), statistics.mean(distilled)
    lines += ["", f"Mean of {len(alone)} seeds: alone {100 * mean_a:.2f}%, distilled with unlabelled images "
                  f"{100 * mean_d:.2f}%, gain {100 * (mean_d - mean_a):+.2f} points.", "", "Commands (from the repository):", ""]
    lines += [f"- {name}: `edgekd {shlex.join(argv)}`" for name, argv in runs]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isfile(_in_repo(args.teacher)):
        sys.exit(f"teacher checkpoint {args.teacher!r} does not exist (train one with edgekd train, or pass its path)")
    runs, out = plan_runs(args), _in_repo(args.out)
    run(runs, out)
    table = results_markdown(runs, out, args)
    with open(os.path.join(out, "few_labels.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
