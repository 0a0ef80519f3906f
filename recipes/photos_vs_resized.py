"""Does training from photos of mixed sizes cost accuracy against the same pictures shrunk beforehand?

    python recipes/photos_vs_resized.py [--images 5000] [--size 64] [--model resnet8] [--epochs 10] [--seeds 0,1]

Makes (outside the repository, in --work) the mixed-size folder of tools/measure_images.py (CIFAR-10 train and
test pictures resized to 224x224, 298x224, 224x298, 336x224, 256x192 and 192x256, JPEG quality 90), and a
copy of it that a user would have made by hand: every picture's shorter side resized to --size and the centre
square kept (PNG, lossless), so both folders hold the same pictures. Then trains the same student with
`edgekd train --input-size SIZE` from each, one run per seed:

- ``resized``: the pre-shrunk squares (uniform size: crop 1.0, edgekd's augmentation at that size);
- ``photos``: the mixed-size originals, streamed (random-resized crop drawn on the original picture,
  evaluation at the default crop 0.875, as timm evaluates);
- ``photos-crop1``: the same with ``--crop-pct 1.0``, whose evaluation view is exactly the pre-shrunk
  square.

Each student is evaluated on its own folder's test split (the same 1,000 pictures). Writes WORK/photos_vs_resized.md
with each run's top-1, the mean per arm and every command; finished runs are kept when it is run again.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tools"))
from measure_images import CIFAR, make_photos  # noqa: E402  (the same mixed-size folder as the speed figures)


def resized_copy(photos, out, size):
    """Every picture of ``photos``: shorter side to ``size``, centre ``size`` x ``size`` square, as PNG."""
    from PIL import Image

    done = os.path.join(out, f".made-{size}")
    if os.path.exists(done):
        return out
    for split in ("train", "test"):
        for c in sorted(os.listdir(os.path.join(photos, split))):
            os.makedirs(os.path.join(out, split, c), exist_ok=True)
            for name in sorted(os.listdir(os.path.join(photos, split, c))):
                img = Image.open(os.path.join(photos, split, c, name)).convert("RGB")
                scale = size / min(img.size)
                w, h = max(size, round(img.size[0] * scale)), max(size, round(img.size[1] * scale))
                img = img.resize((w, h), Image.BILINEAR)
                left, top = (w - size) // 2, (h - size) // 2
                img.crop((left, top, left + size, top + size)).save(
                    os.path.join(out, split, c, os.path.splitext(name)[0] + ".png"))
    open(done, "w").close()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=5000, help="training pictures (1,000 test pictures)")
    ap.add_argument("--test-images", type=int, default=1000, help="test pictures (default: %(default)s)")
    ap.add_argument("--size", type=int, default=64, help="the student's --input-size (default: %(default)s)")
    ap.add_argument("--model", default="resnet8", help="student spec (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=10, help="epochs per run (default: %(default)s)")
    ap.add_argument("--seeds", default="0,1", help="comma list of seeds (default: %(default)s)")
    ap.add_argument("--arms", default="resized,photos,photos-crop1", help="which runs (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=1, help="decoding workers (default: %(default)s)")
    ap.add_argument("--work", default="/tmp/edgekd-photos", help="photos and runs (default: %(default)s)")
    ap.add_argument("--cifar", default=CIFAR, help="CIFAR-10 in ImageFolder layout")
    args = ap.parse_args()
    photos = make_photos(os.path.abspath(args.cifar), os.path.join(args.work, f"photos-{args.images}"), args.images,
                         args.test_images)
    resized = resized_copy(photos, os.path.join(args.work, f"resized-{args.images}-{args.size}"), args.size)
    data = {"resized": (resized, []), "photos": (photos, []), "photos-crop1": (photos, ["--crop-pct", "1.0"])}
    rows, commands = [], []
    for arm in args.arms.split(","):
        folder, extra = data[arm]
        for seed in [int(s) for s in args.seeds.split(",")]:
            out = os.path.join(args.work, "runs", f"{arm}-{args.size}-{args.model}-e{args.epochs}-s{seed}")
            cmd = ["edgekd", "train", "--model", args.model, "--data", folder, "--input-size", str(args.size),
                   "--epochs", str(args.epochs), "--seed", str(seed), "--workers", str(args.workers),
                   "--no-progress", "--out", out] + extra
            commands.append(shlex.join(cmd))
            if not os.path.isfile(os.path.join(out, "metrics.json")):
                print("+", commands[-1], flush=True)
                subprocess.run([sys.executable, "-m", "edgekd"] + cmd[1:] + ["--force"], check=True,
                               stdout=subprocess.DEVNULL)
            m = json.load(open(os.path.join(out, "metrics.json")))
            rows.append((arm, seed, m["test_top1"], m["train_data"]["pipeline"], m["train_data"]["augment"],
                         m["history"][-1].get("images_per_s")))
    lines = [f"# Mixed-size photos against the same pictures pre-shrunk ({args.model}, {args.size} px, "
             f"{args.images} training pictures, {args.epochs} epochs)", "",
             "| arm | seed | test top-1 | pipeline | augmentation | images/s (last epoch) |", "|---|---|---|---|---|---|"]
    lines += [f"| {a} | {s} | {t:.2%} | {p} | {g} | {r:.0f} |" for a, s, t, p, g, r in rows]
    lines += ["", "| arm | mean test top-1 |", "|---|---|"]
    for arm in dict.fromkeys(r[0] for r in rows):
        lines.append(f"| {arm} | {statistics.mean(r[2] for r in rows if r[0] == arm):.2%} |")
    lines += ["", "Commands:", "", *[f"    {c}" for c in commands]]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.work, "photos_vs_resized.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
