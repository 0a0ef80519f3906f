"""The CIFAR-10 distillation recipe: teacher, baseline student, kd, dkd and fitnet students over
several seeds, the teacher-cache speed comparison, and the results table in docs/records/distillation.md.

    python recipes/cifar10_recipe.py [--recipe recipes/cifar10.yaml] [--out runs/cifar10-recipe]

Every run is an ordinary ``edgekd train`` / ``edgekd distill`` command (printed, logged to
OUT/logs/), so any figure of the table can be reproduced alone. Runs go in ``lanes`` side by side.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))  # recipes/
REPO = os.path.dirname(HERE)


def _flags(options):
    argv = []
    for key, value in options.items():
        if value is not None:  # null in the YAML: leave the option at its default (e.g. no train subset)
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def plan_runs(recipe, out):
    """The runs as (name, argv, stage, lane) in the order they go; stage 2 needs stage 1's teacher."""
    common, seeds, student = recipe["common"], recipe["seeds"], recipe["student"]
    data = ["--data", recipe["data"], "--no-progress", "--force"]
    teacher = dict(common, **{k: v for k, v in recipe["teacher"].items() if k != "model"})
    runs = [("teacher", ["train", "--model", recipe["teacher"]["model"], *_flags(teacher), *data,
                         "--out", f"{out}/teacher"], 1, 0)]
    for seed in seeds:
        runs.append((f"baseline-s{seed}", ["train", "--model", student, *_flags(common), "--seed", str(seed), *data,
                                           "--out", f"{out}/baseline-s{seed}"], 1, 1))
    cache_dir, cached = f"{out}/teacher-cache", recipe.get("cache_method", "kd")

    def distill(name, method, seed, extra=()):
        opts = dict(common, **recipe["methods"][method])
        return ["distill", "--teacher", f"{out}/teacher/model.pt", "--student", student, *_flags(opts),
                "--seed", str(seed), *data, *extra, "--out", f"{out}/{name}"]

    # Lane 0 builds the cache in its first run and then replays it; lane 1 runs the teacher live:
    # the first run of each lane is the same kd run, with and without the cache, side by side.
    # fitnet needs the live teacher's features, so its slow runs are split between the lanes.
    lane0, lane1 = [], [(f"{cached}-live-s{seeds[0]}", distill(f"{cached}-live-s{seeds[0]}", cached, seeds[0]))]
    for method in recipe["methods"]:
        for seed in seeds:
            name = f"{method}-s{seed}"
            if method == cached:
                lane0.append((name, distill(name, method, seed, ["--teacher-cache", cache_dir])))
            elif method == "fitnet" and seed == seeds[0]:
                lane1.append((name, distill(name, method, seed)))
            else:
                lane0.append((name, distill(name, method, seed)))
    # Logit methods other than the cached one also replay the cache (same teacher, same views).
    lane0 = [(n, a + ["--teacher-cache", cache_dir] if "--teacher-cache" not in a and "fitnet" not in n else a)
             for n, a in lane0]
    runs += [(n, a, 2, 0) for n, a in lane0] + [(n, a, 2, 1) for n, a in lane1]
    return runs


def _run_lane(runs, out, results):
    for name, argv, _, _ in runs:
        metrics = os.path.join(out, name, "metrics.json")
        if os.path.isfile(metrics):  # finished in an earlier invocation: keep it
            results[name] = {"seconds": None, "rc": 0}
            continue
        cmd = [sys.executable, "-m", "edgekd", *argv]
        print(f"[{time.strftime('%H:%M:%S')}] start {name}: edgekd {' '.join(argv)}", flush=True)
        start = time.time()
        with open(os.path.join(out, "logs", f"{name}.log"), "w") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        results[name] = {"seconds": time.time() - start, "rc": rc}
        print(f"[{time.strftime('%H:%M:%S')}] done {name} rc={rc} in {time.time() - start:.0f}s", flush=True)


def run_all(runs, out, lanes):
    results = {}
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    for stage in (1, 2):
        threads = [threading.Thread(target=_run_lane, args=([r for r in runs if r[2] == stage and r[3] % lanes == lane],
                                                          out, results)) for lane in range(lanes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if stage == 1 and results.get("teacher", {}).get("rc"):
            raise SystemExit("the teacher run failed; see logs/teacher.log")
    return results


START, END = "<!-- recipe-results:start -->", "<!-- recipe-results:end -->"


def _load(out, name):
    path = os.path.join(out, name, "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _pct(x):
    return f"{100 * x:.2f}"


def _seed_cell(values):
    if not values:
        return "not run"
    if len(values) == 1:
        return _pct(values[0])
    return f"{_pct(statistics.mean(values))} ± {100 * (max(values) - min(values)) / 2:.2f}"


def _method_rows(recipe, out):
    """Per method: last-epoch and best-epoch top-1 of every seed, parameters and loop speed."""
    names = ["baseline"] + list(recipe["methods"])
    rows = {}
    for method in names:
        runs = [m for m in (_load(out, f"{method}-s{s}") for s in recipe["seeds"]) if m]
        rows[method] = {"last": [m["test_top1"] for m in runs], "best": [m["best_top1"] for m in runs],
                        "params": runs[0]["params"] if runs else None, "flops": runs[0]["flops"] if runs else None,
                        "ips": [statistics.median(h["images_per_s"] for h in m["history"]) for m in runs]}
    return rows


def _speed(recipe, out):
    """Cached against live: the same kd run (seed, views, init) with and without the teacher cache."""
    method, seed = recipe.get("cache_method", "kd"), recipe["seeds"][0]
    cached, live = _load(out, f"{method}-s{seed}"), _load(out, f"{method}-live-s{seed}")
    if not cached or not live:
        return None
    c_ips = statistics.median(h["images_per_s"] for h in cached["history"])
    l_ips = statistics.median(h["images_per_s"] for h in live["history"])
    users = sum(1 for n in os.listdir(out) if (_load(out, n) or {}).get("teacher_cache"))
    build = cached["teacher_cache"]["build_seconds"]
    images = cached["train_data"]["train_images"] * cached["epochs"]
    return {"cached": c_ips, "live": l_ips, "ratio": c_ips / l_ips, "cached_top1": cached["test_top1"],
            "live_top1": live["test_top1"], "build_seconds": build, "users": users,
            "amortised": images / (images / c_ips + build / max(users, 1)),
            "single": images / (images / c_ips + build), "method": method, "seed": seed}


def results_markdown(recipe, runs, out, recipe_path):
    """The results section of docs/records/distillation.md, from the finished runs' metrics.json files."""
    teacher, rows, speed = _load(out, "teacher"), _method_rows(recipe, out), _speed(recipe, out)
    seeds = ", ".join(map(str, recipe["seeds"]))
    c = recipe["common"]
    lines = [START, "",
             f"Recipe `{os.path.relpath(recipe_path, REPO)}`: teacher `{recipe['teacher']['model']}`, student "
             f"`{recipe['student']}`, CIFAR-10 train subset of {c.get('train_subset', 'all')} images "
             f"(class-stratified, fixed), {c['epochs']} epochs, seeds {seeds}; top-1 on all 10,000 test images. "
             "Figures are the **last epoch**; mean ± half the range over seeds; best epoch only as the second figure.",
             "", "| model | method | top-1 % last epoch | per seed | Δ vs baseline | best epoch % | params | "
             "train img/s (median epoch) |", "|---|---|---|---|---|---|---|---|"]
    if teacher:
        seen = teacher["train_data"]["train_images"]
        lines.append(f"| {teacher['model']} | teacher (CE; {seen:,} train images, {teacher['epochs']} epochs) | {_pct(teacher['test_top1'])} | one run | | "
                     f"{_pct(teacher['best_top1'])} | {teacher['params']:,} | "
                     f"{statistics.median(h['images_per_s'] for h in teacher['history']):.0f} |")
    base = statistics.mean(rows["baseline"]["last"]) if rows["baseline"]["last"] else None
    for method, r in rows.items():
        delta = (f"{100 * (statistics.mean(r['last']) - base):+.2f}" if base is not None and r["last"]
                 and method != "baseline" else "")
        label = "baseline (CE only)" if method == "baseline" else method
        lines.append(f"| {recipe['student']} | {label} | {_seed_cell(r['last'])} | "
                     f"{', '.join(_pct(v) for v in r['last'])} | {delta} | {_seed_cell(r['best'])} | "
                     f"{r['params'] or 0:,} | {statistics.mean(r['ips']) if r['ips'] else 0:.0f} |")
    if speed:
        lines += ["", f"Teacher cache ({speed['method']}, seed {speed['seed']}, the same run with and without it, "
                      "side by side on the same machine):", "",
                  "| | distill images/s (median epoch) | last-epoch top-1 % |", "|---|---|---|",
                  f"| live teacher | {speed['live']:.0f} | {_pct(speed['live_top1'])} |",
                  f"| cached teacher | {speed['cached']:.0f} | {_pct(speed['cached_top1'])} |",
                  f"| ratio / difference | **{speed['ratio']:.2f}x** | "
                  f"{100 * (speed['cached_top1'] - speed['live_top1']):+.2f} points |", "",
                  f"Building the cache (the teacher's forward pass over every view of every epoch, once) took "
                  f"{speed['build_seconds']:.0f} s. Counting it against one run alone gives "
                  f"{speed['single']:.0f} images/s; shared by the {speed['users']} runs of this recipe that replay it, "
                  f"{speed['amortised']:.0f} images/s."]
    lines += ["", *_targets(rows, speed, base), "", _wall(out), "", _data_speed(out), "", "Every run of the table, as run:", "", "```"]
    rel = os.path.relpath(out, REPO)
    lines += ["edgekd " + " ".join(rel + a[len(out):] if a.startswith(out) else a for a in argv) for _, argv, _, _ in runs]
    lines += ["```", "", END]
    return "\n".join(lines)


def _targets(rows, speed, base):
    def mean(m):
        return statistics.mean(rows[m]["last"]) if rows.get(m, {}).get("last") else None

    kd, dkd = mean("kd"), mean("dkd")
    out = ["Targets, checked on these figures:", ""]
    if kd is not None and base is not None:
        out.append(f"- KD at least 1.0 point above the baseline: {100 * (kd - base):+.2f} points — "
                   f"{'met' if kd - base >= 0.01 else 'missed'}.")
    if kd is not None and dkd is not None:
        out.append(f"- DKD at least as good as KD: {100 * (dkd - kd):+.2f} points — {'met' if dkd >= kd else 'missed'}.")
    if speed:
        ok = speed["ratio"] >= 1.8 and abs(speed["cached_top1"] - speed["live_top1"]) <= 0.003
        out.append(f"- cache at least 1.8x faster with top-1 within 0.3 points: {speed['ratio']:.2f}x, "
                   f"{100 * abs(speed['cached_top1'] - speed['live_top1']):.2f} points — {'met' if ok else 'missed'}.")
    return out


def _wall(out):
    path = os.path.join(out, "wall.json")
    if not os.path.isfile(path):
        return ""
    with open(path) as f:
        wall = json.load(f)["wall_seconds"]
    return f"The whole recipe took {wall / 60:.0f} minutes of wall time on this machine (2 shared CPU cores)."


def _data_speed(out):
    path = os.path.join(out, "data_speed.json")
    if not os.path.isfile(path):
        return ""
    with open(path) as f:
        d = json.load(f)
    return (f"Feeding training (`python recipes/cifar10_recipe.py --report-only --measure-data`, "
            f"{d['images']} train images, batch 64, crop + flip): JPEG files through a DataLoader with torchvision "
            f"transforms {d['jpeg_dataloader_0_workers']:.0f} images/s in-process, "
            f"{d['jpeg_dataloader_2_workers']:.0f} with 2 persistent workers; edgekd's decoded views "
            f"{d['decoded_views']:.0f} images/s after a one-off decode at {d['decode_once']:.0f} images/s.")


def write_report(recipe, runs, out, doc, recipe_path):
    """Replace the results section of ``doc`` (between its markers) and print it."""
    section = results_markdown(recipe, runs, out, recipe_path)
    text = open(doc).read() if os.path.isfile(doc) else f"# Distillation\n\n{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    text = head + section + rest.split(END, 1)[1]
    with open(doc, "w") as f:
        f.write(text)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(section + "\n")
    print(section)


def measure_data(recipe, images=5000, batch_size=64):
    """Images/s of two ways to feed training: JPEG files through a DataLoader with workers and
    torchvision transforms, against edgekd's decoded-in-memory views (decoding counted separately)."""
    import torch
    from torchvision import datasets, transforms

    from edgekd.core.augment import AugmentPlan, Views, decode_split, stratified_subset
    from edgekd.core.data import load_data

    data = load_data(os.path.join(REPO, recipe["data"]) if not os.path.isabs(recipe["data"]) else recipe["data"])
    idx = stratified_subset(torch.tensor([y for _, y in data.train.samples]), images)
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
    folder = torch.utils.data.Subset(datasets.ImageFolder(data.train.root, transform=tf), idx.tolist())
    result = {"images": len(idx)}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(folder, batch_size=batch_size, shuffle=True, num_workers=workers,
                                             persistent_workers=workers > 0)
        for epoch in range(2):  # the first pass starts the workers; time the second
            start = time.perf_counter()
            for _ in loader:
                pass
        result[f"jpeg_dataloader_{workers}_workers"] = len(idx) / (time.perf_counter() - start)
    start = time.perf_counter()
    raw, labels = decode_split(data.train, data.input, idx, workers=0, progress=False)
    result["decode_once"] = len(idx) / (time.perf_counter() - start)
    views = Views(raw, labels, [0.5] * 3, [0.5] * 3, AugmentPlan("standard", len(labels)))
    start = time.perf_counter()
    for _ in views.batches(batch_size, epoch=1, shuffle_seed=0):
        pass
    result["decoded_views"] = len(idx) / (time.perf_counter() - start)
    return result


def main(argv=None):
    import yaml

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=os.path.join(REPO, "recipes", "cifar10.yaml"), help="recipe YAML")
    p.add_argument("--out", default=os.path.join(REPO, "runs", "cifar10-recipe"), help="output folder")
    p.add_argument("--doc", default=os.path.join(REPO, "docs", "records", "distillation.md"), help="results document to update")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table from finished runs")
    p.add_argument("--measure-data", action="store_true",
                   help="also time the data pipeline (JPEG DataLoader against decoded views) into OUT/data_speed.json")
    args = p.parse_args(argv)
    with open(args.recipe) as f:
        recipe = yaml.safe_load(f)
    runs = plan_runs(recipe, args.out)
    if not args.report_only:
        start = time.time()
        results = run_all(runs, args.out, recipe.get("lanes", 2))
        with open(os.path.join(args.out, "wall.json"), "w") as f:
            json.dump({"wall_seconds": time.time() - start, "runs": results}, f, indent=2)
    if args.measure_data:
        speed = measure_data(recipe)
        with open(os.path.join(args.out, "data_speed.json"), "w") as f:
            json.dump(speed, f, indent=2)
    write_report(recipe, runs, args.out, args.doc, args.recipe)


if __name__ == "__main__":
    main()
