"""How strong should the default augmentation be for a given input size and schedule length?

    python recipes/augment_schedule.py [--data photos|cifar10] [--size 64] [--epochs 3,15] [--seeds 0,1]
        [--arms pad-crop,rrc-0.08,rrc-0.25,rrc-0.5,auto] [--work /tmp/edgekd-augment]

Trains the same student (`edgekd train --model resnet8 --input-size SIZE`) once per arm, schedule and seed,
and writes WORK/augment.md with each run's last-epoch test top-1 and the mean over the seeds. Arms:
`pad-crop` (`--augment pad-crop`, 4-pixel padding), `rrc-S` (`--augment random-resized-crop --crop-scale S`:
area fraction S..1), `auto` (edgekd's default for that size and schedule), `store-N` (the views cut from an image
store in WORK/store whose pictures' longer side is N; `store-auto`: the default, twice the input), and parts
joined by `+` (`rrc-0.08+store-64`). `--data photos` makes (once) a
folder of CIFAR-10 train pictures at mixed sizes and aspect ratios around 224 px (tools/measure_images.py's
photos, 5,000 training and 1,000 test pictures) in WORK, outside the repository; `--data cifar10` reads
../shared/data/cifar10 in place with `--train-subset` images. Accuracy does not depend on the machine's load.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tools"))
CIFAR = os.path.join(REPO, "..", "shared", "data", "cifar10")


def arm_options(arm, work=""):
    """The train options of an arm; ``+`` joins parts (``rrc-0.08+store-64``): ``store-N`` cuts the views from an
    image store in WORK/store with its longer side at N (``store-auto``: the default size)."""
    if "+" in arm:
        return [o for part in arm.split("+") for o in arm_options(part, work)]
    if arm == "auto":
        return []
    if arm == "pad-crop":
        return ["--augment", "pad-crop"]
    if arm.startswith("rrc-"):
        return ["--augment", "random-resized-crop", "--crop-scale", arm[4:]]
    if arm.startswith("store-"):
        size = [] if arm == "store-auto" else ["--image-store-size", arm[6:]]
        return ["--pipeline", "stream", "--image-store", os.path.join(work, "store"), *size]
    raise SystemExit(f"unknown arm {arm!r}: use auto, pad-crop, rrc-S (S the smallest area fraction), store-N or "
                     "store-auto, or parts joined by +")


def data_spec(args):
    if args.data == "cifar10":
        return [CIFAR_ABS, "--train-subset", str(args.images)], CIFAR_ABS
    from measure_images import make_photos

    folder = make_photos(os.path.abspath(args.cifar), os.path.join(args.work, "photos"), args.images, args.images // 5)
    return [folder], folder


def run(args, arm, epochs, seed, data):
    out = os.path.join(args.work, f"{args.data}-{args.size}px-{epochs}ep-{arm}-s{seed}")
    cmd = ["train", "--model", args.model, "--data", *data, "--input-size", str(args.size), "--epochs", str(epochs),
           "--seed", str(seed), "--aug-seed", str(seed), "--threads", str(args.threads), "--no-progress",
           *arm_options(arm, args.work), "--out", out]
    metrics = os.path.join(out, "metrics.json")
    if not os.path.exists(metrics):
        subprocess.run([sys.executable, "-m", "edgekd", *cmd, "--force"], check=True, cwd=REPO)
    with open(metrics) as f:
        return json.load(f)["test_top1"], "edgekd " + shlex.join(cmd)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="photos", choices=("photos", "cifar10"), help="(default: %(default)s)")
    ap.add_argument("--size", type=int, default=64, help="the student's --input-size (default: %(default)s)")
    ap.add_argument("--epochs", default="3", help="comma list of schedule lengths (default: %(default)s)")
    ap.add_argument("--seeds", default="0,1", help="comma list (default: %(default)s)")
    ap.add_argument("--arms", default="pad-crop,rrc-0.08,rrc-0.25,rrc-0.5,auto", help="(default: %(default)s)")
    ap.add_argument("--images", type=int, default=5000, help="training images (default: %(default)s)")
    ap.add_argument("--model", default="resnet8", help="student (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="(default: %(default)s)")
    ap.add_argument("--cifar", default=CIFAR, help="CIFAR-10 in ImageFolder layout (default: %(default)s)")
    ap.add_argument("--work", default="/tmp/edgekd-augment", help="photos and runs (default: %(default)s)")
    args = ap.parse_args(argv)
    global CIFAR_ABS
    CIFAR_ABS = os.path.abspath(args.cifar)
    os.makedirs(args.work, exist_ok=True)
    data, _ = data_spec(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    lines = [f"# Augmentation strength: {args.data}, {args.size} px, {args.model}", "",
             "| epochs | arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "|---|---|" + "---|" * (len(seeds) + 1)]
    commands = []
    for epochs in [int(e) for e in args.epochs.split(",")]:
        for arm in args.arms.split(","):
            tops = []
            for seed in seeds:
                top1, command = run(args, arm, epochs, seed, data)
                tops.append(top1)
                commands.append(command)
            lines.append(f"| {epochs} | {arm} | " + " | ".join(f"{100 * t:.2f}%" for t in tops)
                         + f" | {100 * statistics.mean(tops):.2f}% |")
            print(lines[-1], flush=True)
    text = "\n".join(lines + ["", "Commands:", ""] + [f"    {c}" for c in commands]) + "\n"
    with open(os.path.join(args.work, f"augment-{args.data}-{args.size}.md"), "w") as f:
        f.write(text)
    print(text)


CIFAR_ABS = CIFAR

if __name__ == "__main__":
    main()
